"""Per-sample contributions in factored ("ghost") form, and the contractions on them.

A layer rule describes the contribution of each of its parameters to every sample without
materializing it, as one of two terms:

* :class:`Bilinear` -- the parameter viewed as a matrix W ∈ R^{R×C} (``param.reshape(R, C)``)
  receives c_z(W) = Σ_t u_t v_tᵀ with row factors U_z = [u_t] ∈ R^{T×R} and column factors
  V_z = [v_t] ∈ R^{T×C}. A factor is either dense (:class:`DenseFactor`, ``[n, T, D]``) or a
  weighted one-hot index (:class:`OneHotFactor`, ``[n, T]`` indices into D), the form of an
  embedding lookup, so that a vocabulary-sized one-hot matrix never exists.
* :class:`PerSample` -- the contribution itself, ``[n, *param.shape]`` (cheap parameters:
  biases, norm weights, and the torch.func fallback).

Contractions (all return one value per training sample):

* dense:    ⟨P, c_z⟩ = Σ_t u_tᵀ P v_t                         (P = J ⊙ ∇L_val)
* pairwise: Σ_v ⟨c_v, c_z⟩ = Σ_v sum((U_z U_vᵀ) ∘ (V_z V_vᵀ))  (ghost dot-product)
"""

from __future__ import annotations

import abc
import dataclasses

import torch

# Upper bound on the elements of one [n, m, T, S] gram block in the pairwise path; the
# validation samples are processed in chunks to stay under it.
_GRAM_BUDGET = 1 << 24


class Factor(abc.ABC):
    """One side (rows or columns) of a bilinear per-sample contribution: [n, T] vectors in R^D."""

    @property
    @abc.abstractmethod
    def n(self) -> int:
        """Number of samples."""

    @property
    @abc.abstractmethod
    def T(self) -> int:
        """Number of positions (tokens, spatial locations, calls) summed per sample."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Feature dimension D."""

    @property
    @abc.abstractmethod
    def cost(self) -> int:
        """Flops per pair of positions in a gram product (D for dense, 1 for one-hot)."""

    @abc.abstractmethod
    def to(self, dtype: torch.dtype) -> Factor:
        """This factor in ``dtype``."""

    @abc.abstractmethod
    def scaled(self, s: torch.Tensor) -> Factor:
        """f_t ⊙ s for a feature-wise scale ``s`` of shape ``[D]``."""

    @abc.abstractmethod
    def project(self, M: torch.Tensor) -> torch.Tensor:
        """f_tᵀ M for ``M`` of shape ``[D, E]``: returns ``[n, T, E]``."""

    @abc.abstractmethod
    def inner(self, Y: torch.Tensor) -> torch.Tensor:
        """Σ_t f_t · Y_t for ``Y`` of shape ``[n, T, D]``: returns ``[n]``."""

    @abc.abstractmethod
    def select(self, rows: slice) -> Factor:
        """The samples ``rows`` of this factor."""

    @abc.abstractmethod
    def dense(self) -> torch.Tensor:
        """The factor as a dense ``[n, T, D]`` tensor."""


@dataclasses.dataclass(frozen=True)
class DenseFactor(Factor):
    """Dense factor ``x`` of shape ``[n, T, D]``."""

    x: torch.Tensor

    n = property(lambda self: int(self.x.shape[0]))
    T = property(lambda self: int(self.x.shape[1]))
    size = property(lambda self: int(self.x.shape[2]))
    cost = property(lambda self: int(self.x.shape[2]))

    def to(self, dtype):
        return DenseFactor(self.x.to(dtype))

    def scaled(self, s):
        return DenseFactor(self.x * s)

    def project(self, M):
        return self.x @ M

    def inner(self, Y):
        # One batched dot product per sample instead of x ⊙ Y then a sum: no [n, T, D] temporary.
        n = self.x.shape[0]
        return torch.bmm(self.x.reshape(n, 1, -1), Y.reshape(n, -1, 1)).reshape(n)

    def select(self, rows):
        return DenseFactor(self.x[rows])

    def dense(self):
        return self.x


@dataclasses.dataclass(frozen=True)
class OneHotFactor(Factor):
    """Weighted one-hot factor: f_t = weight_t · e_{index_t} ∈ R^size.

    ``index`` is ``[n, T]`` (long), ``weight`` is ``[n, T]`` or ``None`` (all ones).
    """

    index: torch.Tensor
    depth: int
    weight: torch.Tensor | None = None

    n = property(lambda self: int(self.index.shape[0]))
    T = property(lambda self: int(self.index.shape[1]))
    size = property(lambda self: self.depth)
    cost = property(lambda self: 1)

    def to(self, dtype):
        return OneHotFactor(self.index, self.depth, None if self.weight is None else self.weight.to(dtype))

    def _w(self, dtype):
        return torch.ones(self.index.shape, dtype=dtype, device=self.index.device) if self.weight is None else self.weight

    def scaled(self, s):
        return OneHotFactor(self.index, self.depth, self._w(s.dtype) * s[self.index])

    def project(self, M):
        rows = M[self.index]  # [n, T, E]: a gather instead of a one-hot matmul
        return rows if self.weight is None else rows * self.weight.unsqueeze(-1)

    def inner(self, Y):
        picked = Y.gather(-1, self.index.unsqueeze(-1)).squeeze(-1)
        return (picked if self.weight is None else picked * self.weight).sum(dim=1)

    def select(self, rows):
        return OneHotFactor(self.index[rows], self.depth, None if self.weight is None else self.weight[rows])

    def dense(self):
        dtype = torch.get_default_dtype() if self.weight is None else self.weight.dtype
        out = torch.zeros(*self.index.shape, self.depth, dtype=dtype, device=self.index.device)
        return out.scatter_(-1, self.index.unsqueeze(-1), self._w(dtype).unsqueeze(-1))


def gram(a: Factor, b: Factor) -> torch.Tensor:
    """G[z, v, t, s] = a_{z,t} · b_{v,s}: shape ``[n_a, n_b, T_a, T_b]``."""
    if isinstance(a, OneHotFactor) and isinstance(b, OneHotFactor):
        eq = (a.index[:, None, :, None] == b.index[None, :, None, :])
        dtype = a.weight.dtype if a.weight is not None else (b.weight.dtype if b.weight is not None else torch.get_default_dtype())
        g = eq.to(dtype)
        if a.weight is not None:
            g = g * a.weight[:, None, :, None]
        if b.weight is not None:
            g = g * b.weight[None, :, None, :]
        return g
    if isinstance(a, OneHotFactor):
        return gram(b, a).permute(1, 0, 3, 2)
    if isinstance(b, OneHotFactor):
        # a_{z,t} · e_{j} b_w = a_{z,t}[j]: gather the indexed features of a.
        picked = a.x[:, :, b.index.reshape(-1)].reshape(a.n, a.T, b.n, b.T)  # [n_a, T_a, n_b, T_b]
        if b.weight is not None:
            picked = picked * b.weight[None, None]
        return picked.permute(0, 2, 1, 3)
    return torch.einsum("ntd,msd->nmts", a.x, b.x)


class Term(abc.ABC):
    """The contribution of one layer call to one parameter, for every sample of a pass."""

    @property
    @abc.abstractmethod
    def n(self) -> int:
        """Number of samples."""

    @abc.abstractmethod
    def dense_values(self, P: torch.Tensor) -> torch.Tensor:
        """⟨P, c_z⟩ for each sample, ``[n]``; ``P`` has the parameter's shape."""

    @abc.abstractmethod
    def total(self, shape: torch.Size) -> torch.Tensor:
        """Σ_z c_z, in the parameter's ``shape`` (the gradient this term adds to ``param.grad``)."""

    @abc.abstractmethod
    def to(self, dtype: torch.dtype) -> Term:
        """This term in ``dtype``."""

    @abc.abstractmethod
    def materialize(self, shape: torch.Size) -> torch.Tensor:
        """The per-sample contributions themselves, ``[n, *shape]``."""


@dataclasses.dataclass(frozen=True)
class PerSample(Term):
    """A materialized contribution, ``c`` of shape ``[n, *param.shape]``."""

    c: torch.Tensor

    n = property(lambda self: int(self.c.shape[0]))

    def dense_values(self, P):
        return self.c.reshape(self.n, -1) @ P.reshape(-1)

    def total(self, shape):
        return self.c.sum(0).reshape(shape)

    def to(self, dtype):
        return PerSample(self.c.to(dtype))

    def materialize(self, shape):
        return self.c.reshape(self.n, *shape)


@dataclasses.dataclass(frozen=True)
class Bilinear(Term):
    """c_z(W) = Σ_t u_t v_tᵀ on the matrix view W = ``param.reshape(rows.size, cols.size)``."""

    rows: Factor
    cols: Factor

    def __post_init__(self):
        if (self.rows.n, self.rows.T) != (self.cols.n, self.cols.T):
            raise ValueError(
                f"Bilinear factors disagree: rows cover [n={self.rows.n}, T={self.rows.T}] but columns "
                f"[n={self.cols.n}, T={self.cols.T}]"
            )

    n = property(lambda self: self.rows.n)

    def view(self, P: torch.Tensor) -> torch.Tensor:
        """``P`` (parameter-shaped) as the ``[R, C]`` matrix this term lives on."""
        if P.numel() != self.rows.size * self.cols.size:
            raise ValueError(
                f"a parameter with {P.numel()} entries cannot be viewed as a {self.rows.size}×{self.cols.size} matrix"
            )
        return P.reshape(self.rows.size, self.cols.size)

    def dense_values(self, P):
        M = self.view(P)
        if isinstance(self.rows, OneHotFactor):
            return self.cols.inner(self.rows.project(M))
        if isinstance(self.cols, OneHotFactor) or self.rows.size <= self.cols.size:
            return self.rows.inner(self.cols.project(M.T))
        # Same n·T·R·C multiply-adds either way; projecting the rows (U_z P) gives the narrower
        # [n, T, C] intermediate when C < R (an LM head: R = vocabulary, C = width).
        return self.cols.inner(self.rows.project(M))

    def total(self, shape):
        R, C = self.rows.size, self.cols.size
        if isinstance(self.rows, OneHotFactor) and not isinstance(self.cols, OneHotFactor):
            v = self.cols.dense()
            if self.rows.weight is not None:
                v = v * self.rows.weight.unsqueeze(-1)
            out = torch.zeros(R, C, dtype=v.dtype, device=v.device)
            return out.index_add_(0, self.rows.index.reshape(-1), v.reshape(-1, C)).reshape(shape)
        if isinstance(self.cols, OneHotFactor) and not isinstance(self.rows, OneHotFactor):
            return Bilinear(self.cols, self.rows).total(torch.Size((C, R))).T.reshape(shape)
        return torch.einsum("ntr,ntc->rc", self.rows.dense(), self.cols.dense()).reshape(shape)

    def to(self, dtype):
        return Bilinear(self.rows.to(dtype), self.cols.to(dtype))

    def materialize(self, shape):
        if isinstance(self.rows, OneHotFactor) and not isinstance(self.cols, OneHotFactor):
            v = self.cols.dense()
            if self.rows.weight is not None:
                v = v * self.rows.weight.unsqueeze(-1)
            out = torch.zeros(self.n, self.rows.size, self.cols.size, dtype=v.dtype, device=v.device)
            return out.scatter_add_(1, self.rows.index.unsqueeze(-1).expand_as(v), v).reshape(self.n, *shape)
        return torch.einsum("ntr,ntc->nrc", self.rows.dense(), self.cols.dense()).reshape(self.n, *shape)

    def pairwise_values(self, other: Bilinear) -> torch.Tensor:
        """Σ_v ⟨c_v, c_z⟩ for each training sample z of ``self`` against all samples v of ``other``."""
        per_pair = max(1, self.n * self.rows.T * other.rows.T)
        chunk = max(1, _GRAM_BUDGET // per_pair)
        out = None
        for start in range(0, other.n, chunk):
            sl = slice(start, start + chunk)
            g = gram(self.rows, other.rows.select(sl)) * gram(self.cols, other.cols.select(sl))
            part = g.sum(dim=(1, 2, 3))
            out = part if out is None else out + part
        return out

    def pairwise_cost(self, other: Bilinear) -> int:
        """Approximate flops of :meth:`pairwise_values`: n·T·m·S·(cost_rows + cost_cols)."""
        return self.n * self.rows.T * other.n * other.rows.T * (self.rows.cost + self.cols.cost)

    def dense_cost(self) -> int:
        """Approximate flops of :meth:`dense_values`: n·T·R·C, or n·T·D when one side is one-hot."""
        if isinstance(self.rows, OneHotFactor) or isinstance(self.cols, OneHotFactor):
            return self.n * self.rows.T * max(self.rows.cost, self.cols.cost)
        return self.n * self.rows.T * self.rows.size * self.cols.size

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

Example (a Linear layer's weight, n = 2 samples, T = 3 positions, d_out = 2, d_in = 4):
    >>> gen = torch.Generator().manual_seed(0)
    >>> B = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64)    # output gradients b_t
    >>> A = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)    # inputs a_t
    >>> term = Bilinear(DenseFactor(B), DenseFactor(A))
    >>> c = torch.einsum("ntr,ntc->nrc", B, A)                           # c_z(W) = Σ_t b_t a_tᵀ
    >>> P = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    >>> torch.allclose(term.dense_values(P), (c * P).sum((1, 2)))
    True
"""

from __future__ import annotations

import abc
import dataclasses
import functools

import torch
import torch.nn.functional as F

# Upper bound on the elements of one [n, m, T, S] gram block in the pairwise path; the
# validation samples are processed in chunks to stay under it.
_GRAM_BUDGET = 1 << 24
#: Entries of one chunk's [k, T, D] projection in the dense contraction (1 MiB of float32: in cache).
_PROJECTION_BUDGET = 1 << 18
#: Output entries of one chunk's convolution in :meth:`ConvBilinear.dense_values` (4 MiB of float32).
_CONV_BUDGET = 1 << 20
#: Entries of one chunk's [k, R, C] per-sample contributions in :meth:`Bilinear.dense_values_many` (4 MiB of float32).
_MATERIALIZE_BUDGET = 1 << 20
#: How many times slower per flop a convolution's per-sample route (unfold, then c_z per sample) ran
#: than the convolution itself on the bench CNN's 32- and 64-channel layers (finding 24).
_CONV_PER_SAMPLE_SLOWDOWN = 4


def _sample_chunks(n: int, size: int):
    """Slices ``[start, start + size)`` covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class Factor(abc.ABC):
    """One side (rows or columns) of a bilinear per-sample contribution: [n, T] vectors in R^D.

    Abstract; the two concrete forms are :class:`DenseFactor` and :class:`OneHotFactor`.
    Sample z's vectors f_{z,t} ∈ R^D, t = 1..T, are the rows of the [T, D] matrix the module doc
    calls U_z or V_z.

    Example:
        >>> f = DenseFactor(torch.arange(12.0, dtype=torch.float64).reshape(2, 3, 2))
        >>> f.n, f.T, f.size, f.cost
        (2, 3, 2, 2)
    """

    @property
    @abc.abstractmethod
    def n(self) -> int:
        """Number of samples (the leading axis).

        Example:
            >>> DenseFactor(torch.arange(12.0, dtype=torch.float64).reshape(2, 3, 2)).n
            2
        """

    @property
    @abc.abstractmethod
    def T(self) -> int:
        """Number of positions (tokens, spatial locations, calls) summed per sample.

        Example:
            >>> DenseFactor(torch.arange(12.0, dtype=torch.float64).reshape(2, 3, 2)).T
            3
        """

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Feature dimension D.

        Example:
            >>> DenseFactor(torch.arange(12.0, dtype=torch.float64).reshape(2, 3, 2)).size
            2
        """

    @property
    @abc.abstractmethod
    def cost(self) -> int:
        """Flops per pair of positions in a gram product (D for dense, 1 for one-hot).

        Example:
            >>> OneHotFactor(torch.zeros(2, 3, dtype=torch.long), depth=100).cost
            1
        """

    @abc.abstractmethod
    def to(self, dtype: torch.dtype) -> Factor:
        """This factor in ``dtype`` (indices of a one-hot factor stay ``long``).

        Example:
            >>> DenseFactor(torch.ones(1, 1, 2)).to(torch.float64).dense().dtype
            torch.float64
        """

    @abc.abstractmethod
    def scaled(self, s: torch.Tensor) -> Factor:
        """f_t ⊙ s for a feature-wise scale ``s`` of shape ``[D]`` (the factored path's r or s).

        Example:
            >>> f = DenseFactor(torch.ones(1, 2, 2, dtype=torch.float64))
            >>> f.scaled(torch.tensor([2.0, 3.0], dtype=torch.float64)).dense()[0, 0].tolist()
            [2.0, 3.0]
        """

    @abc.abstractmethod
    def project(self, M: torch.Tensor) -> torch.Tensor:
        """f_tᵀ M for ``M`` of shape ``[D, E]``: returns ``[n, T, E]``.

        Example:
            >>> f = DenseFactor(torch.arange(12.0, dtype=torch.float64).reshape(2, 3, 2))
            >>> torch.equal(f.project(torch.eye(2, dtype=torch.float64)), f.dense())
            True
        """

    @abc.abstractmethod
    def inner(self, Y: torch.Tensor) -> torch.Tensor:
        """Σ_t f_t · Y_t for ``Y`` of shape ``[n, T, D]``: returns ``[n]``.

        Example:
            >>> f = DenseFactor(torch.arange(12.0, dtype=torch.float64).reshape(2, 3, 2))
            >>> torch.allclose(f.inner(f.dense()), (f.dense() ** 2).sum((1, 2)))
            True
        """

    @abc.abstractmethod
    def select(self, rows: slice) -> Factor:
        """The samples ``rows`` (a slice of the leading axis) of this factor.

        Example:
            >>> DenseFactor(torch.arange(12.0, dtype=torch.float64).reshape(2, 3, 2)).select(slice(1, 2)).n
            1
        """

    @abc.abstractmethod
    def dense(self) -> torch.Tensor:
        """The factor as a dense ``[n, T, D]`` tensor (a one-hot factor materializes its one-hots).

        Example:
            >>> OneHotFactor(torch.tensor([[2]]), depth=4).dense().tolist()
            [[[0.0, 0.0, 1.0, 0.0]]]
        """


@dataclasses.dataclass(frozen=True)
class DenseFactor(Factor):
    """Dense factor ``x`` of shape ``[n, T, D]``: f_{z,t} = x[z, t].

    Example (a Linear layer's inputs a_t, T = 1 without a sequence axis):
        >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)   # [n=2, d_in=2]
        >>> f = DenseFactor(a.unsqueeze(1))                                     # [n, T=1, D=2]
        >>> f.project(torch.tensor([[1.0], [1.0]], dtype=torch.float64)).reshape(-1).tolist()
        [3.0, 7.0]
    """

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
        # One dot product per sample instead of x ⊙ Y then a sum: no [n, T, D] temporary. (A batched
        # bmm of [n, 1, TD] × [n, TD, 1] measured 2× slower than vecdot on CPU.)
        n = self.x.shape[0]
        return torch.linalg.vecdot(self.x.reshape(n, -1), Y.reshape(n, -1))

    def select(self, rows):
        return DenseFactor(self.x[rows])

    def dense(self):
        return self.x


@dataclasses.dataclass(frozen=True)
class OneHotFactor(Factor):
    """Weighted one-hot factor: f_t = weight_t · e_{index_t} ∈ R^size.

    ``index`` is ``[n, T]`` (long), ``weight`` is ``[n, T]`` or ``None`` (all ones); ``depth``
    is D (the vocabulary size of an embedding). ``project(M)`` is a row gather M[index], so
    ⟨P, c_z⟩ = Σ_t P[x_t]·b_t for an embedding costs n·T·d, never n·T·vocab.

    Example:
        >>> f = OneHotFactor(torch.tensor([[0, 2]]), depth=3, weight=torch.tensor([[1.0, 0.5]], dtype=torch.float64))
        >>> M = torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
        >>> torch.equal(f.project(M), f.dense() @ M)
        True
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


@dataclasses.dataclass(frozen=True)
class UnfoldFactor(Factor):
    """A convolution's input patches a_t, unfolded only when asked: ``[n, G·L, C_in/G · k]``.

    ``inputs`` is the input as a 2-D convolution sees it, ``[n, C_in, H, W]`` (a 1-D one with
    H = 1), padded already except for ``padding``, a symmetric zero padding (pair) that the
    unfolding and the convolution apply themselves (no padded copy of the input is made);
    ``kernel``, ``stride``, ``dilation`` are pairs and ``groups`` is G. The L output
    locations follow from the geometry, so ``n``, ``T`` and ``size`` are known without
    unfolding; :meth:`dense` (and what needs it) runs ``F.unfold`` once per factor and keeps it.
    With G > 1 group g's patches occupy positions g·L … (g + 1)·L − 1.

    Example:
        >>> f = UnfoldFactor(torch.ones(2, 3, 5, 5), kernel=(3, 3), stride=(2, 2), dilation=(1, 1), groups=1)
        >>> f.n, f.T, f.size, tuple(f.dense().shape)
        (2, 4, 27, (2, 4, 27))
    """

    inputs: torch.Tensor
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int = 1
    padding: tuple[int, int] = (0, 0)

    n = property(lambda self: int(self.inputs.shape[0]))
    T = property(lambda self: self.groups * self.locations[0] * self.locations[1])
    size = property(lambda self: int(self.inputs.shape[1]) // self.groups * self.kernel[0] * self.kernel[1])
    cost = property(lambda self: self.size)

    @property
    def locations(self) -> tuple[int, int]:
        """Output locations ``(H', W')`` of the convolution on the padded input."""
        return tuple(
            (int(self.inputs.shape[2 + i]) + 2 * self.padding[i] - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i] + 1
            for i in range(2)
        )

    def _like(self, inputs):
        return UnfoldFactor(inputs, self.kernel, self.stride, self.dilation, self.groups, self.padding)

    def to(self, dtype):
        return self._like(self.inputs.to(dtype))

    def scaled(self, s):
        return DenseFactor(self.dense() * s)

    def project(self, M):
        return self.dense() @ M

    def inner(self, Y):
        return DenseFactor(self.dense()).inner(Y)

    def select(self, rows):
        return self._like(self.inputs[rows])

    def dense(self):
        return self._patches

    @functools.cached_property
    def _patches(self) -> torch.Tensor:
        patches = F.unfold(self.inputs, self.kernel, dilation=self.dilation, padding=self.padding, stride=self.stride)
        a = patches.transpose(1, 2)  # [n, L, C_in·k]
        G = self.groups
        if G == 1:
            return a
        per_in = a.shape[2] // G
        return torch.cat([a[:, :, g * per_in:(g + 1) * per_in] for g in range(G)], dim=1)


def gram(a: Factor, b: Factor) -> torch.Tensor:
    """G[z, v, t, s] = a_{z,t} · b_{v,s}: shape ``[n_a, n_b, T_a, T_b]``.

    Both factors must have the same feature size D; one-hot factors are never densified.

    Example:
        >>> a = DenseFactor(torch.arange(12.0, dtype=torch.float64).reshape(2, 2, 3))
        >>> b = OneHotFactor(torch.tensor([[0, 2, 1]]), depth=3, weight=torch.ones(1, 3, dtype=torch.float64))
        >>> G = gram(a, b)
        >>> G.shape, torch.equal(G, torch.einsum("ntd,msd->nmts", a.dense(), b.dense()))
        (torch.Size([2, 1, 2, 3]), True)
    """
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
        picked = a.dense()[:, :, b.index.reshape(-1)].reshape(a.n, a.T, b.n, b.T)  # [n_a, T_a, n_b, T_b]
        if b.weight is not None:
            picked = picked * b.weight[None, None]
        return picked.permute(0, 2, 1, 3)
    return torch.einsum("ntd,msd->nmts", a.dense(), b.dense())


class Term(abc.ABC):
    """The contribution of one layer call to one parameter, for every sample of a pass.

    Abstract; concrete terms are :class:`PerSample` (materialized c_z) and :class:`Bilinear`
    (c_z(W) = Σ_t u_t v_tᵀ in factored form). A :class:`LayerRule` returns one per parameter.

    Example:
        >>> t = PerSample(torch.ones(3, 2, dtype=torch.float64))
        >>> t.n, t.total(torch.Size([2])).tolist()
        (3, [3.0, 3.0])
    """

    @property
    @abc.abstractmethod
    def n(self) -> int:
        """Number of samples n.

        Example:
            >>> PerSample(torch.zeros(4, 3)).n
            4
        """

    @abc.abstractmethod
    def dense_values(self, P: torch.Tensor) -> torch.Tensor:
        """⟨P, c_z⟩ for each sample, ``[n]``; ``P`` has the parameter's shape.

        With P = J ⊙ ∇L_val the value of sample z is −dense_values(P)[z].

        Example:
            >>> c = torch.tensor([[1.0, 0.0], [2.0, -1.0]], dtype=torch.float64)
            >>> PerSample(c).dense_values(torch.tensor([3.0, 1.0], dtype=torch.float64)).tolist()
            [3.0, 5.0]
        """

    def dense_values_many(self, Ps: list[torch.Tensor]) -> torch.Tensor:
        """⟨P_k, c_z⟩ for each sample and each of K preconditioned gradients, ``[n, K]``.

        One validation target per ``P_k`` (each of the parameter's shape). The default takes
        :meth:`dense_values` once per target; :class:`Bilinear` shares the work between targets.

        Example:
            >>> c = torch.tensor([[1.0, 0.0], [2.0, -1.0]], dtype=torch.float64)
            >>> PerSample(c).dense_values_many([torch.tensor([3.0, 1.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64)]).tolist()
            [[3.0, 1.0], [5.0, 1.0]]
        """
        return torch.stack([self.dense_values(P) for P in Ps], dim=1)

    @abc.abstractmethod
    def total(self, shape: torch.Size) -> torch.Tensor:
        """Σ_z c_z, in the parameter's ``shape`` (the gradient this term adds to ``param.grad``).

        Example:
            >>> t = Bilinear(DenseFactor(torch.ones(2, 1, 2)), DenseFactor(torch.ones(2, 1, 3)))
            >>> t.total(torch.Size([2, 3])).tolist()
            [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
        """

    @abc.abstractmethod
    def to(self, dtype: torch.dtype) -> Term:
        """This term in ``dtype`` (precision is explicit: callers cast, terms never do it silently).

        Example:
            >>> PerSample(torch.zeros(2, 3)).to(torch.float64).c.dtype
            torch.float64
        """

    @abc.abstractmethod
    def materialize(self, shape: torch.Size) -> torch.Tensor:
        """The per-sample contributions themselves, ``[n, *shape]``.

        Example:
            >>> t = Bilinear(DenseFactor(torch.ones(2, 3, 2)), DenseFactor(torch.ones(2, 3, 4)))
            >>> c = t.materialize(torch.Size([2, 4]))
            >>> c.shape, torch.allclose(c.sum(0), t.total(torch.Size([2, 4])))
            (torch.Size([2, 2, 4]), True)
        """


@dataclasses.dataclass(frozen=True)
class PerSample(Term):
    """A materialized contribution, ``c`` of shape ``[n, *param.shape]``.

    Used for cheap parameters (biases: c_z(b) = Σ_t b_t; norm weights: c_z(w) = Σ_t x̂_t ⊙ b_t)
    and by the ``torch.func`` fallback.

    Example:
        >>> t = PerSample(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
        >>> t.dense_values(torch.ones(2, dtype=torch.float64)).tolist(), t.materialize(torch.Size([2])).shape
        ([3.0, 7.0], torch.Size([2, 2]))
    """

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
    """c_z(W) = Σ_t u_t v_tᵀ on the matrix view W = ``param.reshape(rows.size, cols.size)``.

    ``rows`` and ``cols`` must cover the same ``[n, T]``. Three contractions, all ``[n]``:
    ``dense_values(P)`` = Σ_t u_tᵀ P v_t; ``pairwise_values(other)`` = Σ_v ⟨c_v, c_z⟩ =
    Σ_v sum((U_z U_vᵀ) ∘ (V_z V_vᵀ)); ``materialize`` builds c_z itself.

    Raises:
        ValueError: the two factors disagree on n or T.

    Example (the ghost dot-product equals the materialized one):
        >>> gen = torch.Generator().manual_seed(0)
        >>> def dense(*shape): return DenseFactor(torch.randn(*shape, generator=gen, dtype=torch.float64))
        >>> train, val = Bilinear(dense(3, 2, 4), dense(3, 2, 5)), Bilinear(dense(2, 1, 4), dense(2, 1, 5))
        >>> c_z, c_v = train.materialize(torch.Size([4, 5])), val.materialize(torch.Size([4, 5]))
        >>> torch.allclose(train.pairwise_values(val), torch.einsum("zrc,vrc->z", c_z, c_v))
        True
        >>> Bilinear(dense(3, 2, 4), dense(3, 1, 5))
        Traceback (most recent call last):
        ...
        ValueError: Bilinear factors disagree: rows cover [n=3, T=2] but columns [n=3, T=1]
    """

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
        """``P`` (parameter-shaped) as the ``[R, C]`` matrix this term lives on.

        Raises:
            ValueError: ``P`` does not have R·C entries.
        Example (a conv weight [C_out, C_in, k] viewed as [C_out, C_in·k]):
            >>> t = Bilinear(DenseFactor(torch.ones(1, 1, 4)), DenseFactor(torch.ones(1, 1, 6)))
            >>> t.view(torch.zeros(4, 2, 3)).shape
            torch.Size([4, 6])
        """
        if P.numel() != self.rows.size * self.cols.size:
            raise ValueError(
                f"a parameter with {P.numel()} entries cannot be viewed as a {self.rows.size}×{self.cols.size} matrix"
            )
        return P.reshape(self.rows.size, self.cols.size)

    def dense_values(self, P):
        M = self.view(P)
        if isinstance(self.rows, OneHotFactor):
            outer, projected, M = self.cols, self.rows, M
        elif isinstance(self.cols, OneHotFactor) or self.rows.size <= self.cols.size:
            outer, projected, M = self.rows, self.cols, M.T
        else:
            # Same n·T·R·C multiply-adds either way; projecting the rows (U_z P) gives the narrower
            # [n, T, C] intermediate when C < R (an LM head: R = vocabulary, C = width).
            outer, projected = self.cols, self.rows
        # A few samples at a time, so that the [k, T, D] projection stays in cache while its dot
        # product is taken: the whole [n, T, D] intermediate measured 1.3–2.5× the matmul alone.
        k = max(1, _PROJECTION_BUDGET // max(1, projected.T * int(M.shape[-1])))
        if k >= self.n:
            return outer.inner(projected.project(M))
        return torch.cat([outer.select(sl).inner(projected.select(sl).project(M)) for sl in _sample_chunks(self.n, k)])

    def dense_values_many(self, Ps):
        """⟨P_k, c_z⟩ for K targets, ``[n, K]``: by per-sample contributions when that is cheaper.

        K dense contractions cost K·n·T·R·C multiply-adds; building each sample's c_z = U_zᵀ V_z
        (a few samples at a time, never all n) and taking its K dot products costs
        n·T·R·C + n·R·C·K (:meth:`dense_cost_many`): fewer once K·T > T + K, e.g. a sequence model
        with two or more validation targets. The same numbers up to rounding (sums in another
        order). One-hot factors (embeddings, n·T·D per target) and K = 1 keep :meth:`dense_values`.
        """
        K = len(Ps)
        if not self._materializes(K):
            return super().dense_values_many(Ps)
        R, C = self.rows.size, self.cols.size
        Pm = torch.stack([self.view(P).reshape(R * C) for P in Ps], dim=1)  # [R·C, K]
        k = max(1, _MATERIALIZE_BUDGET // max(1, R * C))
        out = []
        for sl in _sample_chunks(self.n, k):
            U, V = self.rows.select(sl).dense(), self.cols.select(sl).dense()  # [k, T, R], [k, T, C]
            c = torch.bmm(U.transpose(1, 2), V)  # [k, R, C]: the chunk's per-sample contributions
            out.append(c.reshape(len(c), R * C) @ Pm)
        return out[0] if len(out) == 1 else torch.cat(out)

    #: How many times slower per flop the per-sample route runs than :meth:`dense_values` here.
    _per_sample_slowdown = 1

    def _materializes(self, K: int) -> bool:
        """Whether :meth:`dense_values_many` of K targets takes the per-sample route."""
        return K > 1 and self._per_sample_slowdown * self.dense_cost_many(K) < K * self.dense_cost()

    def dense_cost_many(self, K: int) -> int:
        """Approximate flops of :meth:`dense_values_many` for K targets: min(K·n·T·R·C, n·R·C·(T + K)).

        Example:
            >>> t = Bilinear(DenseFactor(torch.ones(2, 8, 4)), DenseFactor(torch.ones(2, 8, 5)))
            >>> t.dense_cost_many(1), t.dense_cost_many(4), 4 * t.dense_cost()
            (320, 480, 1280)
        """
        if isinstance(self.rows, OneHotFactor) or isinstance(self.cols, OneHotFactor):
            return K * self.dense_cost()
        return min(K * self.dense_cost(), self.n * self.rows.size * self.cols.size * (self.rows.T + K))

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

    def select(self, rows) -> Bilinear:
        """The samples ``rows`` (a slice or indices) of this term."""
        return Bilinear(self.rows.select(rows), self.cols.select(rows))

    def materialize(self, shape):
        if isinstance(self.rows, OneHotFactor) and not isinstance(self.cols, OneHotFactor):
            v = self.cols.dense()
            if self.rows.weight is not None:
                v = v * self.rows.weight.unsqueeze(-1)
            out = torch.zeros(self.n, self.rows.size, self.cols.size, dtype=v.dtype, device=v.device)
            return out.scatter_add_(1, self.rows.index.unsqueeze(-1).expand_as(v), v).reshape(self.n, *shape)
        return torch.einsum("ntr,ntc->nrc", self.rows.dense(), self.cols.dense()).reshape(self.n, *shape)

    def pairwise_values(self, other: Bilinear) -> torch.Tensor:
        """Σ_v ⟨c_v, c_z⟩ for each training sample z of ``self`` against all samples v of ``other``.

        = Σ_v sum((U_z U_vᵀ) ∘ (V_z V_vᵀ)), without forming c_z; validation samples are processed
        in chunks that bound the [n, m, T, S] gram block. Returns ``[n]``.

        Example (T = 1: ⟨b_z a_zᵀ, b_v a_vᵀ⟩ = (b_z·b_v)(a_z·a_v)):
            >>> z = Bilinear(DenseFactor(torch.tensor([[[1.0, 2.0]]])), DenseFactor(torch.tensor([[[3.0]]])))
            >>> v = Bilinear(DenseFactor(torch.tensor([[[1.0, 1.0]]])), DenseFactor(torch.tensor([[[2.0]]])))
            >>> z.pairwise_values(v).tolist()
            [18.0]
        """
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
        """Approximate flops of :meth:`pairwise_values`: n·T·m·S·(cost_rows + cost_cols).

        Example:
            >>> t = Bilinear(DenseFactor(torch.ones(2, 3, 4)), DenseFactor(torch.ones(2, 3, 5)))
            >>> t.pairwise_cost(t), 2 * 3 * 2 * 3 * (4 + 5)
            (324, 324)
        """
        return self.n * self.rows.T * other.n * other.rows.T * (self.rows.cost + self.cols.cost)

    def dense_cost(self) -> int:
        """Approximate flops of :meth:`dense_values`: n·T·R·C, or n·T·D when one side is one-hot.

        Example:
            >>> t = Bilinear(DenseFactor(torch.ones(2, 3, 4)), DenseFactor(torch.ones(2, 3, 5)))
            >>> t.dense_cost()
            120
        """
        if isinstance(self.rows, OneHotFactor) or isinstance(self.cols, OneHotFactor):
            return self.n * self.rows.T * max(self.rows.cost, self.cols.cost)
        return self.n * self.rows.T * self.rows.size * self.cols.size


@dataclasses.dataclass(frozen=True)
class ConvBilinear(Bilinear):
    """A convolution weight's term: :class:`Bilinear` on (output gradients, :class:`UnfoldFactor` patches).

    ``dense_values(P)`` = Σ_t b_tᵀ P a_t is computed as ⟨conv(x_z, P), ∂L/∂y_z⟩ per sample: one
    convolution of the input with P as its weight, the arithmetic of the layer's own
    forward, instead of unfolding [n, L, C_in·k] patches and projecting them (docs/performance.md,
    finding 22, has the bench figures). The other contractions (pairwise, materialize,
    total) unfold the patches as :class:`Bilinear` does.

    ``grad_output`` is ``[n, C_out, L]`` (the output gradient over the L = H'·W' locations);
    ``rows`` is its ``[n, G·L, C_out]`` form (masked per group when G > 1).

    Example (the convolution order equals the unfolded one):
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)      # padded input
        >>> b = torch.randn(2, 4, 16, generator=gen, dtype=torch.float64)        # [n, C_out, L = 4·4]
        >>> cols = UnfoldFactor(x, kernel=(3, 3), stride=(1, 1), dilation=(1, 1))
        >>> t = ConvBilinear(DenseFactor(b.transpose(1, 2)), cols, b)
        >>> P = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
        >>> torch.allclose(t.dense_values(P), Bilinear(t.rows, DenseFactor(cols.dense())).dense_values(P))
        True
    """

    grad_output: torch.Tensor = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.cols, UnfoldFactor) or self.grad_output is None:
            raise ValueError("ConvBilinear needs UnfoldFactor columns and the output gradient")

    # Unfolding the patches and building c_z runs about 4× slower per flop than the convolution
    # on the bench CNN's wider layers (``python -m attribution.experiments.conv_many``,
    # docs/performance.md, finding 24): the per-sample route pays off from about K = 5.
    _per_sample_slowdown = _CONV_PER_SAMPLE_SLOWDOWN

    def dense_values(self, P):
        return self._conv_values([P])[:, 0]

    def dense_values_many(self, Ps):
        """⟨P_k, c_z⟩ for K targets, ``[n, K]``: c_z built once (:class:`Bilinear`) for many targets,
        else one convolution with the K weights stacked as output channels (G = 1)."""
        if len(Ps) == 1 or self.cols.groups != 1 or self._materializes(len(Ps)):
            return super().dense_values_many(Ps)
        return self._conv_values(Ps)

    def _conv_values(self, Ps) -> torch.Tensor:
        """⟨conv(x_z, P_k), ∂L/∂y_z⟩ ``[n, K]`` by one convolution whose weight stacks the K
        ``[C_out, C_in/G, kh, kw]`` views as output channels, a few samples at a time."""
        f, b = self.cols, self.grad_output
        K, c_out = len(Ps), int(b.shape[1])
        if K > 1 and f.groups != 1:  # the stacked channels would meet another group's inputs
            raise ValueError(f"a grouped convolution (groups={f.groups}) takes one target at a time, got {K}")
        Ws = [self.view(P).reshape(c_out, -1, *f.kernel) for P in Ps]
        W = Ws[0] if K == 1 else torch.cat(Ws)  # [K·C_out, C_in/G, kh, kw] (one target: no copy)
        k = max(1, _CONV_BUDGET // max(1, K * b[0].numel()))  # samples whose convolution output stays in cache
        out = []
        for sl in _sample_chunks(self.n, k):
            y = F.conv2d(f.inputs[sl], W, None, f.stride, f.padding, f.dilation, f.groups)  # [k, K·C_out, H', W']
            out.append(torch.linalg.vecdot(y.reshape(len(y), K, -1), b[sl].reshape(len(y), 1, -1)))  # [k, K]
        return out[0] if len(out) == 1 else torch.cat(out)

    def to(self, dtype):
        return ConvBilinear(self.rows.to(dtype), self.cols.to(dtype), self.grad_output.to(dtype))

    def select(self, rows):
        return ConvBilinear(self.rows.select(rows), self.cols.select(rows), self.grad_output[rows])

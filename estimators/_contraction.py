"""The one contraction routine: φ_z = −⟨P, c_z⟩ of a parameter from its captured terms.

Both the post-backward contraction (:meth:`GhostEngine.values`) and the in-backward one
(:meth:`GhostEngine.stream`) go through :class:`StepContraction`: it applies the preconditioner
(P = Jᵀ ∇L_val on the dense path; P̃ = j ∇L_val or σ r sᵀ ⊙ ∇L_val for pairwise and factored),
fits each weight's rank-one factors once per step (and measures their error from the same fit),
and contracts every term by the cheaper of the dense and the ghost dot-product orders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from optimizers._preconditioner import Preconditioner, RowDiagonal

from ._config import Factorization, GhostPath
from ._factorize import factored_error, rank_one
from ._sharded import full
from ._factors import Bilinear, OneHotFactor, PerSample, Term


class StepContraction:
    """One step's contractions: rank-one factors (fit once per weight) and preconditioned matrices.

    Args:
        dtype: the computation dtype.
        factorization: the :class:`Factorization` of the factored path.
    Attributes:
        factored_errors: parameter name -> :func:`factored_error` report of its fit.
    """

    def __init__(self, dtype: torch.dtype, factorization: Factorization):
        self.dtype = dtype
        self.factorization = factorization
        self.factored_errors: dict[str, dict[str, float]] = {}
        self._factors: dict[tuple[torch.Tensor, int, int], tuple[float, torch.Tensor, torch.Tensor]] = {}
        self._ptilde: dict[tuple[torch.Tensor, int, int, int], torch.Tensor] = {}

    def factors(self, p: torch.Tensor, name: str, J: Preconditioner, R: int, C: int) -> tuple[float, torch.Tensor, torch.Tensor]:
        """σ, r ``[R]``, s ``[C]`` with J ≈ σ r sᵀ on the ``[R, C]`` view of ``p`` (one fit per step)."""
        key = (p, R, C)
        out = self._factors.get(key)
        if out is None:
            Jm = J.dense_diagonal(p.shape, self.dtype, p.device).reshape(R, C)
            out = self._factors[key] = rank_one(Jm, self.factorization)
            self.factored_errors[name] = factored_error(Jm, self.factorization, factors=out)
        return out

    def preconditioned(
        self, p: torch.Tensor, name: str, k: int, path: GhostPath, J: Preconditioner, G: torch.Tensor, R: int, C: int,
        *, keep: bool = True,
    ) -> torch.Tensor:
        """P̃ ``[R, C]`` of weight ``p`` and target ``k`` for the pairwise (j G) or factored (σ r sᵀ ⊙ G) path.

        ``keep=False`` does not cache it (the streamed path frees it with its layer).
        """
        key = (p, R, C, k)
        out = self._ptilde.get(key)
        if out is None:
            G = G.to(self.dtype).reshape(R, C)
            if path is GhostPath.PAIRWISE:
                out = J.scalar * G
            else:
                sigma, r, s = self.factors(p, name, J, R, C)
                out = sigma * (r.unsqueeze(1) * G * s.unsqueeze(0))
            if keep:
                self._ptilde[key] = out
        return out

    def ghost_dot(
        self, p: torch.Tensor, name: str, t: Term, vs: Sequence[Term], k: int, path: GhostPath, J: Preconditioner,
        G: torch.Tensor | None,
    ) -> torch.Tensor:
        """Σ_v ⟨J̃ ⊙ c_v, c_z⟩ for one training term ``t`` on the pairwise or factored path: ``[n]``.

        J̃ is the scalar J (pairwise) or σ r sᵀ (factored). Two contraction orders give the same
        number; the cheaper one is taken for each term:

        * ghost dot-products, Σ_v sum(((U_z⊙r) U_vᵀ) ∘ ((V_z⊙s) V_vᵀ)): n·T·m·S·(R + C) flops
          (cheap when the validation passes hold few positions, e.g. an MLP);
        * the dense contraction with the preconditioned validation matrix
          P̃ = J̃ ⊙ Σ_v c_v (the validation gradient of this weight): n·T·R·C flops, and no
          [n, m, T, S] position-pair Gram tensor (cheaper for long sequences).

        ``G`` is ∇L_val^k of ``p`` if known; otherwise it is rebuilt from the captured ``vs``.
        """
        R, C = t.rows.size, t.cols.size
        if t.dense_cost() + R * C < sum(t.pairwise_cost(v) for v in vs):
            if G is None:
                G = sum(v.total(torch.Size((R, C))) for v in vs)
            return t.dense_values(self.preconditioned(p, name, k, path, J, G, R, C))
        if path is GhostPath.PAIRWISE:
            return J.scalar * sum(t.pairwise_values(v) for v in vs)
        sigma, r, s = self.factors(p, name, J, R, C)
        scaled = Bilinear(t.rows.scaled(r), t.cols.scaled(s))
        return sigma * sum(scaled.pairwise_values(v) for v in vs)


@dataclasses.dataclass(frozen=True)
class RowSparse:
    """A preconditioned validation gradient that is zero outside a few dim-0 rows (J a :class:`RowDiagonal`).

    An embedding table's P is needed only where its tokens' contributions lie; it is kept on
    those rows, never as a table-sized tensor.

    Attributes:
        rows: sorted ``int64`` row indices ``[r]``.
        values: P on them, ``[r, *shape[1:]]``.
        shape: the parameter's shape.
    Example:
        >>> P = RowSparse(torch.tensor([1]), torch.tensor([[2.0, 3.0]]), torch.Size([3, 2]))
        >>> P.dense().tolist(), P.on_rows(torch.ones(3, 2)).tolist()
        ([[0.0, 0.0], [2.0, 3.0], [0.0, 0.0]], [[1.0, 1.0]])
    """

    rows: torch.Tensor
    values: torch.Tensor
    shape: torch.Size

    def dense(self) -> torch.Tensor:
        """P at the parameter's shape (zeros off the rows)."""
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        return out.index_copy_(0, self.rows, self.values)

    def on_rows(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the parameter's shape) on :attr:`rows`: ``[r, *shape[1:]]``."""
        return t.index_select(0, self.rows)


PLike = torch.Tensor | RowSparse


def dense_of(P: PLike) -> torch.Tensor:
    """P at the parameter's shape (a :class:`RowSparse` P expanded)."""
    return P.dense() if isinstance(P, RowSparse) else P


def check_operands(P: PLike, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, grad)`` restricted to where P can be nonzero, for ⟨P, grad⟩ (the same dot product)."""
    if isinstance(P, RowSparse):
        return P.values, P.on_rows(grad.to_dense() if grad.is_sparse else grad)
    return P, grad


def contract(terms: Sequence[Term], P: PLike) -> torch.Tensor:
    """Σ_terms ⟨P, c_z⟩ for every sample: ``[n]`` (the dense order, exact for any preconditioner).

    Under FSDP2 ``P`` is this rank's shard (a ``DTensor``) and the terms are this rank's samples
    at full width: the layer's whole P is gathered here, used and dropped (one layer at a time).
    A :class:`RowSparse` P is contracted on its rows (an embedding's tokens index them).
    """
    if isinstance(P, RowSparse):
        return sum(_contract_on_rows(t, P) for t in terms)
    P = full(P)
    return sum(t.dense_values(P) for t in terms)


def contract_many(terms: Sequence[Term], Ps: Sequence[PLike]) -> torch.Tensor:
    """Σ_terms ⟨P_k, c_z⟩ for every sample and target: ``[n, K]`` (:func:`contract` of each ``P_k``, work shared).

    K plain tensors go through :meth:`Term.dense_values_many` (a sequence layer's per-sample
    contributions are then built once for all targets); a :class:`RowSparse` or sharded P is
    contracted one target at a time.
    """
    if len(Ps) == 1 or any(type(P) is not torch.Tensor for P in Ps):
        return torch.stack([contract(terms, P) for P in Ps], dim=1)
    return sum(t.dense_values_many(list(Ps)) for t in terms)


def _contract_on_rows(t: Term, P: RowSparse) -> torch.Tensor:
    """⟨P, c_z⟩ of one term with its one-hot row index mapped onto P's rows (the whole P otherwise)."""
    r = P.rows.numel()
    if r and isinstance(t, Bilinear) and isinstance(t.rows, OneHotFactor) and t.rows.size == P.shape[0]:
        index = t.rows.index
        pos = torch.searchsorted(P.rows, index).clamp_(max=r - 1)
        if bool((P.rows[pos] == index).all()):  # every token's row is one of P's (so it is by construction)
            compact = Bilinear(OneHotFactor(pos, r, t.rows.weight), t.cols)
            return compact.dense_values(P.values.reshape(r, -1))
    return t.dense_values(P.dense())


def _precondition(J: Preconditioner, g: torch.Tensor, shape: torch.Size) -> PLike:
    """P = Jᵀ g, the preconditioned validation gradient (shape ``shape``; :class:`RowSparse` for a :class:`RowDiagonal` J)."""
    if g.shape != shape:
        raise ValueError(f"a validation gradient has shape {tuple(g.shape)} but its parameter has shape {tuple(shape)}")
    if isinstance(J, RowDiagonal):
        return RowSparse(J.rows, J.apply_rows(g), torch.Size(shape))
    return J.apply(g)


def _term_magnitude(t: Term) -> float:
    """Σ_z ‖c_z‖_F bounded from the factors: Σ_{z,t} ‖u_zt‖ ‖v_zt‖ (‖c_z‖ itself for materialized terms)."""
    if isinstance(t, PerSample):
        return float(torch.linalg.vector_norm(t.c.reshape(t.c.shape[0], -1).double(), dim=1).sum())

    def row_norms(f) -> torch.Tensor:
        if isinstance(f, OneHotFactor):
            w = f.weight
            return torch.ones(f.index.shape, dtype=torch.float64, device=f.index.device) if w is None else w.double().abs()
        return torch.linalg.vector_norm(f.dense().double(), dim=-1)

    return float((row_norms(t.rows) * row_norms(t.cols)).sum())


def _coarsest_dtype(terms: list[Term]) -> torch.dtype:
    """The least precise dtype among the captured tensors of ``terms`` (autocast captures bf16 factors)."""
    dtypes = set()
    for t in terms:
        for f in (t.c,) if isinstance(t, PerSample) else (t.rows, t.cols):
            x = f if isinstance(f, torch.Tensor) else getattr(f, "x", None)
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                dtypes.add(x.dtype)
    return min(dtypes, key=lambda d: torch.finfo(d).bits - (0.5 if d is torch.bfloat16 else 0), default=torch.float64)

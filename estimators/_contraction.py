"""The one contraction routine: φ_z = −⟨P, c_z⟩ of a parameter from its captured terms.

Both the post-backward contraction (:meth:`GhostEngine.values`) and the in-backward one
(:meth:`GhostEngine.stream`) go through :class:`StepContraction`: it applies the preconditioner
(P = Jᵀ ∇L_val on the dense path; P̃ = j ∇L_val or σ r sᵀ ⊙ ∇L_val for pairwise and factored),
fits each weight's rank-one factors once per step (and measures their error from the same fit),
and contracts every term by the cheaper of the dense and the ghost dot-product orders.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from optimizers._preconditioner import Preconditioner

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


def contract(terms: Sequence[Term], P: torch.Tensor) -> torch.Tensor:
    """Σ_terms ⟨P, c_z⟩ for every sample: ``[n]`` (the dense order, exact for any preconditioner).

    Under FSDP2 ``P`` is this rank's shard (a ``DTensor``) and the terms are this rank's samples
    at full width: the layer's whole P is gathered here, used and dropped (one layer at a time).
    """
    P = full(P)
    return sum(t.dense_values(P) for t in terms)


def _precondition(J: Preconditioner, g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """P = Jᵀ g, the preconditioned validation gradient (shape ``shape``)."""
    if g.shape != shape:
        raise ValueError(f"a validation gradient has shape {tuple(g.shape)} but its parameter has shape {tuple(shape)}")
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

"""Rank-one factorisation of a preconditioning map, J ≈ σ · r sᵀ, and its measured error.

The ``factored`` ghost path needs J on a weight matrix as an outer product so that
⟨J ⊙ c_v, c_z⟩ = σ · sum(((U_z ⊙ r) U_vᵀ) ∘ ((V_z ⊙ s) V_vᵀ)) keeps the pairwise cost.
For the optimizers of interest J ≤ 0 everywhere, so |J| is factored and the sign σ carried;
entries whose sign disagrees with σ are an error of the factorisation and are reported.
"""

from __future__ import annotations

import torch

from ._config import Factorization, parse_enum


def rank_one(J: torch.Tensor, method: Factorization | str = "geometric") -> tuple[float, torch.Tensor, torch.Tensor]:
    """σ, r, s with J ≈ σ · r sᵀ for a matrix ``J`` of shape ``[R, C]``.

    σ is the sign of the majority of J's mass (−1 when Σ J ≤ 0); |J| is factored by ``method``
    (see :class:`Factorization`). All three return r ≥ 0 and s ≥ 0.

    Args:
        J: the preconditioning map on the matrix view of a weight, ``[R, C]``.
        method: ``"geometric"`` (default), ``"adafactor"`` or ``"svd"``.
    Returns:
        (σ, r ``[R]``, s ``[C]``) in J's dtype.
    Raises:
        ValueError: ``J`` is not a 2-D tensor, or ``method`` is not accepted.
    Example:
        >>> sigma, r, s = rank_one(-torch.outer(torch.tensor([1., 2.]), torch.tensor([3., 4.])))
        >>> sigma, torch.allclose(r[:, None] * s, torch.tensor([[3., 4.], [6., 8.]]))
        (-1.0, True)
    """
    method = parse_enum(Factorization, method, "factorization")
    if not isinstance(J, torch.Tensor) or J.dim() != 2:
        raise ValueError(f"rank_one expects a 2-D tensor J of shape [R, C], got {getattr(J, 'shape', type(J).__name__)}")
    sigma = -1.0 if float(J.sum()) <= 0 else 1.0
    A = J.abs()
    if method is Factorization.GEOMETRIC:
        # Least squares in log space: log|J_ij| ≈ a_i + b_j. Zeros are clamped to the smallest
        # normal number so that an all-zero row gives r_i ≈ 0 instead of −inf.
        L = A.clamp_min(torch.finfo(A.dtype).tiny).log()
        row, col, mean = L.mean(1), L.mean(0), L.mean()
        return sigma, (row - 0.5 * mean).exp(), (col - 0.5 * mean).exp()
    if method is Factorization.ADAFACTOR:
        total = A.sum()
        if float(total) == 0.0:
            return sigma, torch.zeros(A.shape[0], dtype=A.dtype), torch.zeros(A.shape[1], dtype=A.dtype)
        return sigma, A.sum(1) / total.sqrt(), A.sum(0) / total.sqrt()
    # Leading singular pair of the non-negative |J|; by Perron-Frobenius it can be taken ≥ 0.
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    u, v = U[:, 0], Vh[0]
    if float(u.sum()) < 0:
        u, v = -u, -v
    root = S[0].sqrt()
    return sigma, u.clamp_min(0) * root, v.clamp_min(0) * root


def factored_error(
    J: torch.Tensor | float,
    method: Factorization | str = "geometric",
    *,
    shape: tuple[int, int] | None = None,
    factors: tuple[float, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """How far the rank-one factorisation of J is from J itself.

    Args:
        J: the preconditioning map of one weight (a float is exact, error 0).
        method: the :class:`Factorization` to assess.
        shape: the ``[R, C]`` matrix view of J (default: J itself if 2-D, else ``[J.shape[0], -1]``).
        factors: (σ, r, s) already fitted by :func:`rank_one` on that view (not fitted again).
    Returns:
        dict with ``rel_frobenius`` = ‖J − Ĵ‖_F / ‖J‖_F, ``max_rel`` = max |J − Ĵ| / max |J|,
        ``sign_mismatch`` = fraction of entries whose sign differs from the carried σ, and
        ``method``.
    Raises:
        ValueError: ``method`` is not accepted, or ``shape`` does not fit J.
    Example:
        >>> factored_error(-torch.ones(3, 4))["rel_frobenius"]
        0.0
    """
    method = parse_enum(Factorization, method, "factorization")
    if not isinstance(J, torch.Tensor):
        return {"rel_frobenius": 0.0, "max_rel": 0.0, "sign_mismatch": 0.0, "method": method.value}
    if shape is None:
        shape = tuple(J.shape) if J.dim() == 2 else (J.shape[0] if J.dim() else 1, -1)
    try:
        M = J.reshape(shape)
    except RuntimeError:
        raise ValueError(f"J of shape {tuple(J.shape)} cannot be viewed as {shape}") from None
    sigma, r, s = rank_one(M, method) if factors is None else factors
    approx = sigma * torch.outer(r, s)
    err = M - approx
    norm = float(M.norm())
    peak = float(M.abs().max())
    return {
        "rel_frobenius": float(err.norm()) / norm if norm > 0 else 0.0,
        "max_rel": float(err.abs().max()) / peak if peak > 0 else 0.0,
        "sign_mismatch": float(((M * sigma) < 0).double().mean()),
        "method": method.value,
    }

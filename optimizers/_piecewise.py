"""The Aumann–Shapley secant of an update with kinks along the path: Gauss–Legendre piece by piece.

:func:`optimizers._autograd.secant_operator` integrates P = ∫₀¹ J(s g)ᵀ v ds with one
Gauss–Legendre rule on [0, 1]; its error falls geometrically only where s ↦ Δ(s g) is smooth.
Where Δ has a kink at known points 0 < s_1 < … < s_K < 1 (Adafactor's update clipping switching
on, a clamp becoming active) or varies sharply near a known point (Muon near a small
‖X(s)‖), :func:`piecewise_secant` integrates each piece [a, b] separately with that same
efficiency-checked rule, through the reparametrised update x ↦ Δ(a g + x) at (b − a) g:

    P = Σ_k (b_k − a_k) ∫₀¹ J((a_k + u (b_k − a_k)) g)ᵀ v du,

so ⟨P, g⟩ = Σ_k ⟨v, Δ(b_k g) − Δ(a_k g)⟩ = ⟨v, Δ(g) − Δ(0)⟩ telescopes, and each piece's own
efficiency check bounds its share of the gap.

The breakpoints come from the linearization (``path_breakpoints``, a classmethod of the classes
through ``OptimizerLinearization.path_breakpoints``): kinks where a branch switches, and points graded geometrically
towards a complex singularity c ± i·h of s ↦ Δ(s g) that lies close to [0, 1] (:func:`graded_points`),
so that every piece is at least its own length away from it and Gauss–Legendre converges
geometrically on each piece again.

Example (|x| has a kink at 0; along s·g from a = −1 it is at s = 1/2):
    >>> import torch
    >>> a = torch.tensor([-1.0], dtype=torch.float64)
    >>> update = lambda x: (a + x).abs()
    >>> op = piecewise_secant(update, torch.tensor([2.0], dtype=torch.float64), [0.5])
    >>> op.apply(torch.ones(1, dtype=torch.float64)).tolist(), op.diagnostics["pieces"]   # ∫₀¹ sign(2s − 1) ds = 0
    ([0.0], 2)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from ._autograd import UpdateJumpError, jump_at_zero, secant_operator
from ._preconditioner import Operator

Update = Callable[[torch.Tensor], torch.Tensor]


def piecewise_secant(
    update: Update,
    g: torch.Tensor,
    breakpoints: Sequence[float] | Callable[[], Sequence[float]],
    *,
    nodes: int = 8,
    max_nodes: int = 64,
    tolerance: float | None = None,
    what: str = "the parameter",
    threshold: float = 1e-2,
    max_pieces: int = 256,
) -> Operator:
    """The secant operator of ``update`` at ``g``, integrated piecewise between ``breakpoints``.

    Args:
        update: Δ as a function of the gradient, ``[*S] -> [*S]``, differentiable in torch.func.
        g: the batch gradient g_B, shape ``S``.
        breakpoints: points of (0, 1) where s ↦ Δ(s g) is not smooth (others are ignored), or a
            callable returning them, called only after the jump test has passed.
        nodes, max_nodes, tolerance, what, threshold: as :func:`~optimizers._autograd.secant_operator`;
            the tolerance bounds the whole path's efficiency gap, each piece gets its share, and the
            jump test (threshold) is made on the whole path, as there.
        max_pieces: a piece whose quadrature does not converge within ``max_nodes`` is bisected
            (each half with half its share of the tolerance) until there are this many pieces.
    Returns:
        An :class:`~optimizers.Operator` of shape ``S``; ``diagnostics`` hold ``pieces`` and
        ``breakpoints`` (after any bisection), ``nodes`` (the Gauss–Legendre nodes of the last
        application, summed over the pieces) and ``efficiency_gap`` (the whole path's).
    Raises:
        UpdateJumpError: Δ jumps at g = 0 (raised at once), or (by ``apply``) a piece's quadrature
            does not converge within ``max_nodes`` and ``max_pieces``.
    """
    tol = tolerance if tolerance is not None else (1e-9 if g.dtype == torch.float64 else 1e-4)
    jump = jump_at_zero(update, g)
    if jump > threshold:
        raise UpdateJumpError(
            f"the update of {what} jumps at g = 0: ‖Δ(1e-6·g_B) − Δ(0)‖ is {jump:.3g} of ‖Δ(g_B) − Δ(0)‖ (a smooth "
            "update gives about 1e-6). The secant path integral along s·g_B misses the jump, so its values would not "
            "add up to the step's change (Muon's and Adafactor's first step, whose update is scale-invariant in g). "
            "Use linearization='tangent' for such steps (the tangent at g_B is defined), or value them with the "
            "exact update of each coalition (validation.step_game / leave_one_out)."
        )
    if callable(breakpoints):  # computed lazily: a step refused as a jump never pays for them
        breakpoints = breakpoints()
    edges = [0.0, *sorted({float(s) for s in breakpoints if 0.0 < float(s) < 1.0}), 1.0]
    with torch.no_grad():
        at = [update(s * g) for s in edges]
    total = at[-1] - at[0]
    total_norm = float(torch.linalg.vector_norm(total.double()))
    piece_norms = [float(torch.linalg.vector_norm((b - a).double())) for a, b in itertools.pairwise(at)]
    # Piece k may miss the identity by ‖v‖·(allowance_k + floor_k), allowance_k = tol·total·(n_k + total/K)/(Σ n + total):
    # the allowances add up to tol·total, a piece over which Δ hardly moves still gets some, and floor_k
    # (16 eps (‖Δ(a g)‖ + ‖Δ(b g)‖)) is what the float64 chord of the piece is known to.
    budget = sum(piece_norms) + total_norm
    # The whole path's P per unit ‖v‖ (‖Δ(g) − Δ(0)‖/‖g‖): the scale each piece's node agreement is judged on.
    g_norm = float(torch.linalg.vector_norm(g.double()))
    path_scale = total_norm / g_norm if g_norm > 0 else 0.0

    def rounding(*deltas: torch.Tensor) -> float:
        return 16 * eps * sum(float(torch.linalg.vector_norm(d.double())) for d in deltas)

    eps = torch.finfo(g.dtype).eps

    def piece(a: float, b: float, allowance: float) -> list:
        with torch.no_grad():
            da, db = update(a * g), update(b * g)
            n_ab = float(torch.linalg.vector_norm((db - da).double()))
            # ⟨v, Δ(b g) − Δ(a g)⟩ is known only to the rounding of the two updates: where the change is
            # that small against Δ itself (a tiny gradient against a large momentum), that is the floor.
            floor = rounding(da, db)
        label = what if (a, b) == (0.0, 1.0) else f"{what} (path piece s in [{a:.6g}, {b:.6g}])"

        def shifted(x: torch.Tensor) -> torch.Tensor:
            return update(a * g + x)

        # The jump test was made on the whole path; on a piece over which Δ hardly moves it would compare
        # two rounding errors, so it is off there (threshold=inf).
        op = secant_operator(
            shifted, (b - a) * g, nodes=nodes, max_nodes=max_nodes, tolerance=(allowance + floor) / n_ab if n_ab > 0 else tol,
            what=label, threshold=float("inf"), reference=path_scale,
        )
        return [a, b, allowance, op, floor]

    pieces = [
        piece(a, b, tol * total_norm * (n_k + total_norm / len(piece_norms)) / budget if budget > 0 else tol)
        for a, b, n_k in zip(edges[:-1], edges[1:], piece_norms)
    ]
    diagnostics: dict = {
        "route": "piecewise gauss-legendre",
        "pieces": len(pieces),
        "breakpoints": edges[1:-1],
        "nodes": None,
        "efficiency_gap": None,
    }

    def apply(v: torch.Tensor) -> torch.Tensor:
        v = v.to(g.dtype)
        out = torch.zeros_like(g)
        used, i = 0, 0
        while i < len(pieces):
            a, b, allowance, op, _ = pieces[i]
            try:
                part = op.apply(v)
            except UpdateJumpError:
                # A feature the breakpoints did not resolve (Muon: a singular value of X(s) passing near 0):
                # bisect the piece, each half with half its allowance, and keep the finer partition.
                if len(pieces) >= max_pieces or (b - a) < 1e-12:
                    raise
                mid = 0.5 * (a + b)
                pieces[i : i + 1] = [piece(a, mid, allowance / 2), piece(mid, b, allowance / 2)]
                continue
            out = out + (b - a) * part
            used += op.diagnostics["nodes"]
            i += 1
        target = float(torch.vdot(v.reshape(-1).double(), total.reshape(-1).double()))
        got = float(torch.vdot(out.reshape(-1).double(), g.reshape(-1).double()))
        scale = float(torch.linalg.vector_norm(v.double())) * total_norm
        gap = abs(got - target) / scale if scale > 0 else 0.0
        diagnostics.update(nodes=used, pieces=len(pieces), breakpoints=[p[0] for p in pieces[1:]], efficiency_gap=gap)
        allowed = 2 * tol + (sum(p[4] for p in pieces) / total_norm if total_norm > 0 else 0.0)
        if gap > allowed:  # the allowances bound it; 2x tol leaves room for the telescoping sum's rounding
            raise UpdateJumpError(
                f"the piecewise secant quadrature of {what} misses the efficiency identity by {gap:.3g} "
                f"(tolerance {tol:.1g}) although every piece converged; use linearization='tangent'."
            )
        return out

    return Operator(apply, g.shape, diagnostics)


def graded_points(center: float, scale: float, *, floor: float = 1e-6, ratio: float = 2.0) -> list[float]:
    """Breakpoints in (0, 1) graded geometrically towards ``center``: center ± scale·ratio^k, k = 0, 1, ...

    For a singularity at center ± i·scale (complex s), each piece between consecutive points is
    then about as far from it as it is long. ``scale`` is floored at ``floor`` (a feature finer
    than that is a jump for the secant's purposes, and the jump test decides); ``center`` is
    clipped to [0, 1].

    Example:
        >>> [round(s, 4) for s in graded_points(0.0, 0.1)]
        [0.1, 0.2, 0.4, 0.8]
        >>> [round(s, 4) for s in graded_points(0.5, 0.2)]
        [0.1, 0.3, 0.5, 0.7, 0.9]
    """
    center = min(max(float(center), 0.0), 1.0)
    step = max(float(scale), floor)
    if not step < 1.0:
        return []
    points = {center} if 0.0 < center < 1.0 else set()
    while step < 1.0:
        points.update(p for p in (center - step, center + step) if floor <= p < 1.0 and 0.0 < p)
        step *= ratio
    return sorted(points)

"""Slopes derived by autograd from an update rule Δ(g): the tangent and the Aumann–Shapley secant.

A linearization that writes only ``update_rule`` (the functional update under a frozen state)
gets its preconditioners from here (``torch.func``):

* elementwise rules -- the tangent diagonal from one JVP along a ones vector
  (:func:`tangent_diagonal`); the secant is the chord (Δ(g) − Δ(0)) ⊘ g, which for a rule acting
  coordinate by coordinate *is* the path integral ∫₀¹ ∂Δ/∂g(s g) ds;
* operator rules (Muon, Adafactor) -- the tangent Jᵀ v by a VJP at g_B (:func:`tangent_operator`);
  the secant P = ∫₀¹ J(s g_B)ᵀ v ds by Gauss–Legendre quadrature (:func:`secant_operator`),
  refined until the efficiency identity ⟨P, g_B⟩ = ⟨v, Δ(g_B) − Δ(0)⟩ holds to a tolerance.

Where Δ jumps at g = 0 (Muon's first step with an empty momentum buffer is scale-invariant in g;
sign-based rules) the path integral misses the jump and the values would add up to about 0
instead of the step's change: :class:`UpdateJumpError` refuses such a secant.

Example (an elementwise rule: the JVP diagonal is the derivative):
    >>> import torch
    >>> g = torch.tensor([1.0, -2.0], dtype=torch.float64)
    >>> tangent_diagonal(lambda x: -0.1 * x ** 3, g).tolist()
    [-0.30000000000000004, -1.2000000000000002]
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from ._base import UnsupportedOptimizerError
from ._preconditioner import Diagonal, Operator

Update = Callable[[torch.Tensor], torch.Tensor]


class UpdateJumpError(UnsupportedOptimizerError):
    """The update Δ(s·g) does not tend to Δ(0) as s → 0, so the secant path integral misses a jump.

    Muon's first step (empty momentum buffer: Δ(s g) = Δ(g) for every s > 0) and sign-based rules
    (Rprop, Lion) are the common cases. The tangent is still defined where Δ is smooth at g_B;
    the exact-update route values such steps with the real update of every coalition.
    """


@functools.lru_cache(maxsize=16)
def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the n-point Gauss–Legendre rule on [0, 1] (float64 arrays ``[n]``).

    Example:
        >>> s, w = gauss_legendre(3)
        >>> round(float((w * s ** 5).sum()), 12)   # exact for polynomials of degree ≤ 2n − 1
        0.166666666667
    """
    x, w = np.polynomial.legendre.leggauss(int(n))
    return (x + 1.0) / 2.0, w / 2.0


def tangent_diagonal(update: Update, g: torch.Tensor) -> torch.Tensor:
    """∂Δ_i/∂g_i at ``g`` for an elementwise rule: one JVP along ones. Shape and dtype of ``g``.

    Where the JVP is not finite -- a removable 0/0 such as d/dg √(v + g²) at v = g = 0, which
    closed forms write out as a limit -- the two one-sided slopes at g ± h (h ≈ √tiny, far below
    any gradient) are averaged, the same limit the conformance check takes in sympy.
    """
    ones = torch.ones_like(g)
    with torch.enable_grad():
        out = torch.func.jvp(update, (g,), (ones,))[1].detach()
        bad = ~torch.isfinite(out)
        if bool(bad.any()):
            h = 4 * torch.finfo(g.dtype).tiny ** 0.5
            hs = torch.where(bad, torch.full_like(g, h), torch.zeros_like(g))
            plus = torch.func.jvp(update, (g + hs,), (ones,))[1].detach()
            minus = torch.func.jvp(update, (g - hs,), (ones,))[1].detach()
            out = torch.where(bad, (plus + minus) / 2, out)
    return out


def secant_diagonal(update: Update, g: torch.Tensor, tangent: Callable[[], torch.Tensor]) -> torch.Tensor:
    """(Δ(g) − Δ(0)) ⊘ g for an elementwise rule, the tangent where g = 0. Shape and dtype of ``g``.

    Its rounding error is about eps·|Δ(0)|/|g| (the chord of two nearly equal updates); closed-form
    linearizations override it with cancellation-free forms where that matters.
    """
    with torch.no_grad():
        chord = update(g) - update(torch.zeros_like(g))
    zero = g == 0
    out = chord / torch.where(zero, torch.ones_like(g), g)
    if bool(zero.any()):
        out = torch.where(zero, tangent(), out)
    return out


def tangent_operator(update: Update, g: torch.Tensor) -> Operator:
    """The applied tangent v ↦ Jᵀ v = VJP of Δ at ``g``; an :class:`Operator` of ``g``'s shape.

    The VJP's graph is built once and reused for every v (every validation target).
    """
    with torch.enable_grad():
        _, vjp_fn = torch.func.vjp(update, g)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return vjp_fn(v.to(g.dtype))[0].detach()

    return Operator(apply, g.shape, {"route": "vjp"})


def jump_at_zero(
    update: Update, g: torch.Tensor, *, ratio: float = 1e-6, d0: torch.Tensor | None = None, dg: torch.Tensor | None = None
) -> float:
    """‖Δ(ratio·g) − Δ(0)‖ / ‖Δ(g) − Δ(0)‖: about ``ratio`` where Δ is smooth at 0, about 1 at a jump.

    ``d0`` = Δ(0) and ``dg`` = Δ(g) may be passed when the caller has them (not evaluated again).
    Returns 0.0 when the step does not change with g (Δ(g) = Δ(0)).
    """
    with torch.no_grad():
        d0 = update(torch.zeros_like(g)) if d0 is None else d0
        dg = update(g) if dg is None else dg
        full = torch.linalg.vector_norm((dg - d0).double())
        if float(full) == 0.0:
            return 0.0
        small = torch.linalg.vector_norm((update(ratio * g) - d0).double())
    out = float(small / full)
    return out if np.isfinite(out) else float("inf")  # Δ(0) undefined (0/0): a jump as well


def secant_operator(
    update: Update,
    g: torch.Tensor,
    *,
    nodes: int = 8,
    max_nodes: int = 64,
    tolerance: float | None = None,
    what: str = "the parameter",
    threshold: float = 1e-2,
    agreement: float | None = None,
    reference: float = 0.0,
) -> Operator:
    """The Aumann–Shapley secant P = ∫₀¹ J(s g)ᵀ v ds, applied by Gauss–Legendre quadrature.

    Each :meth:`Operator.apply` starts at ``nodes`` nodes and doubles them until the efficiency
    gap |⟨P, g⟩ − ⟨v, Δ(g) − Δ(0)⟩| / (‖v‖ ‖Δ(g) − Δ(0)‖) is below ``tolerance`` (default:
    1e-9 in float64, 1e-4 in float32), so the values of the step add up to −⟨v, Δ(g) − Δ(0)⟩,
    AND P's component orthogonal to g agrees with the rule of half as many nodes to 1e-7
    (float32: 1e-3) of ‖P‖: the identity checks only P's component along g. The operator's ``diagnostics`` hold the node
    count, gap and that change of the last application.

    Args:
        update: Δ as a function of the gradient, ``[*S] -> [*S]``, differentiable in torch.func.
        g: the batch gradient g_B, shape ``S``.
        nodes, max_nodes: the first and the largest node count.
        tolerance: the largest accepted efficiency gap.
        what: how messages name the parameter.
        threshold: the largest ‖Δ(1e-6 g) − Δ(0)‖ / ‖Δ(g) − Δ(0)‖ taken as continuous at 0.
        agreement: the largest accepted change of P's component orthogonal to g between the
            rules of n/2 and n nodes, relative to ‖P‖ (default 1e-7 in float64, 1e-3 in float32).
        reference: a floor for ‖P‖ per unit ‖v‖ in that comparison: a piece of a longer path
            (``piecewise_secant``) is judged against the whole path's size ‖Δ(g) − Δ(0)‖/‖g‖, so
            a tiny piece that holds a kink is not held to its own vanishing size.
    Returns:
        An :class:`Operator` of shape ``S``.
    Raises:
        UpdateJumpError: Δ jumps at g = 0 (checked at once), or the gap stays above the
            tolerance at ``max_nodes`` (raised by ``apply``).
    """
    tol = tolerance if tolerance is not None else (1e-9 if g.dtype == torch.float64 else 1e-4)
    if agreement is None:
        agreement = 1e-7 if g.dtype == torch.float64 else 1e-3
    with torch.no_grad():
        d0, dg = update(torch.zeros_like(g)), update(g)
    delta = dg - d0
    # threshold = inf: the caller made the jump test on a longer path (a piece of piecewise_secant).
    jump = jump_at_zero(update, g, d0=d0, dg=dg) if threshold != float("inf") else 0.0
    if jump > threshold:
        raise UpdateJumpError(
            f"the update of {what} jumps at g = 0: ‖Δ(1e-6·g_B) − Δ(0)‖ is {jump:.3g} of ‖Δ(g_B) − Δ(0)‖ (a smooth "
            "update gives about 1e-6). The secant path integral along s·g_B misses the jump, so its values would not "
            "add up to the step's change (this is Muon's first step, whose update is scale-invariant in g, and any "
            "sign-based rule). Use linearization='tangent' for such steps (the tangent at g_B is defined), or value "
            "them with the exact update of each coalition (validation.leave_one_out, validation.shapley_values)."
        )
    delta_norm = float(torch.linalg.vector_norm(delta.double()))
    diagnostics: dict = {"route": "gauss-legendre", "nodes": None, "efficiency_gap": None}

    def integrate(v: torch.Tensor, n: int) -> torch.Tensor:
        s, w = gauss_legendre(n)
        out = torch.zeros_like(g)
        with torch.enable_grad():
            for si, wi in zip(s.tolist(), w.tolist()):
                _, vjp_fn = torch.func.vjp(update, si * g)
                out = out + wi * vjp_fn(v)[0].detach()
        return out

    def apply(v: torch.Tensor) -> torch.Tensor:
        v = v.to(g.dtype)
        target = float(torch.vdot(v.reshape(-1).double(), delta.reshape(-1).double()))
        scale = float(torch.linalg.vector_norm(v.double())) * delta_norm
        # Two criteria: the efficiency identity (the component of P along g_B) and agreement with
        # the rule of half as many nodes (every other component, which the identity cannot see).
        n, previous = nodes, integrate(v, max(1, nodes // 2))
        gflat = g.reshape(-1).double()
        gnorm2 = float(torch.vdot(gflat, gflat))
        while True:
            P = integrate(v, n)
            got = float(torch.vdot(P.reshape(-1).double(), g.reshape(-1).double()))
            gap = abs(got - target) / scale if scale > 0 else 0.0
            size = float(torch.linalg.vector_norm(P.double()))
            diff = (P - previous).double().reshape(-1)
            # only the component orthogonal to g_B: the identity has already checked the rest
            diff = diff - (torch.vdot(diff, gflat) / gnorm2) * gflat if gnorm2 > 0 else diff
            floor = reference * float(torch.linalg.vector_norm(v.double()))
            change = float(torch.linalg.vector_norm(diff)) / max(size, floor) if max(size, floor) > 0 else 0.0
            if (gap <= tol and change <= agreement) or n >= max_nodes:
                break
            n, previous = 2 * n, P
        diagnostics.update(nodes=n, efficiency_gap=gap, node_change=change)
        if gap > tol or change > agreement:
            raise UpdateJumpError(
                f"the secant quadrature of {what} did not converge: with {n} Gauss–Legendre nodes the values add up "
                f"to the step's change only to a relative gap of {gap:.3g} (tolerance {tol:.1g}) and differ from "
                f"{n // 2} nodes' by {change:.3g} (tolerance {agreement:.1g}); the update is not smooth along s·g_B. "
                "Raise max_nodes (class attribute secant_max_nodes), or use linearization='tangent'."
            )
        return P

    return Operator(apply, g.shape, diagnostics)


def as_diagonal(values: torch.Tensor) -> Diagonal:
    """Wrap elementwise slopes (shape ``S``) as a :class:`Diagonal` preconditioner."""
    return Diagonal(values)

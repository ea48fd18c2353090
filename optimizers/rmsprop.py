"""RMSprop (``torch.optim.RMSprop``), added through the public extension point only.

Per coordinate, s = −1 under ``maximize`` (else 1), g̃ = s·g + λθ, α the smoothing constant:

    q' = α q + (1 − α) g̃²                     (``square_avg``)
    a' = α a + (1 − α) g̃                      (``grad_avg``, centered only)
    D  = √(q' − a'²)  centered,  √q'  otherwise
    u  = g̃ / (D + ε)
    Δ  = −η u,   or with momentum μ:  buf' = μ buf + u,  Δ = −η buf'

Tangent of u in g̃ (the g̃² terms cancel in closed form):

    ∂u/∂g̃ = α (q − a a') / (D (D + ε)²) + ε / (D + ε)²      (non-centered: a = a' = 0)

and D = 0 forces q = a = 0 and g̃ = 0 (q ≥ a² for every reachable state), where the first term's
limit is 0. Secant between a = g̃ at g = 0 (λθ under L2 decay) and b = g̃: writing
D(x)² = w + κ (x − ā)² (centered: w = α(q − ā²), κ = α(1 − α), ā = ``grad_avg``; otherwise
w = α q, κ = 1 − α, ā = 0) and y = x − ā,

    (u(b) − u(a))/(b − a) = [ ε + (w + (D(a) D(b) − κ ya yb) − κ ā (ya + yb)) / (D(a) + D(b)) ] / ((D(a) + ε)(D(b) + ε))

with D(a)D(b) − κ ya yb formed without cancellation (``root_product_gap``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch

from ._algebra import root_product_gap, safe_div
from ._base import OptimizerLinearization, ParamState, as_float, state_tensor


@dataclasses.dataclass(frozen=True)
class RMSpropState(ParamState):
    """Frozen state of one parameter under ``torch.optim.RMSprop``.

    Attributes:
        lr, alpha, eps, weight_decay, momentum, centered, maximize: the group's settings.
        square_avg, grad_avg, momentum_buffer: q, a (centered only) and buf, each of shape
            ``param.shape``, or ``None`` before the first step.

    Example:
        >>> RMSpropState(lr=0.01).alpha
        0.99
    """

    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    maximize: bool = False
    square_avg: torch.Tensor | None = None
    grad_avg: torch.Tensor | None = None
    momentum_buffer: torch.Tensor | None = None


def _or_zeros(x, like):
    return torch.zeros_like(like) if x is None else x


class RMSpropLinearization(OptimizerLinearization, optimizer=torch.optim.RMSprop):
    """Linearization of ``torch.optim.RMSprop`` (momentum, centered, L2 decay, maximize).

    Δ = −η u (or −η(μ buf + u)) with u = g̃/(D + ε); the momentum term μ·buf does not depend on g,
    so the slopes are −η s ∂u/∂g̃ (tangent) and the chord of u (secant), module doc.

    Example (centered with momentum: ``update`` is exactly ``step()``; momentum is in Δ(0) only):
        >>> import optimizers
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> opt = torch.optim.RMSprop([w], lr=0.01, momentum=0.9, centered=True)
        >>> w.grad = torch.tensor([0.3, -0.1], dtype=torch.float64); opt.step()
        >>> g = torch.tensor([0.2, 0.4], dtype=torch.float64); w.grad = g
        >>> lin = optimizers.linearize(opt, copy_state=True)
        >>> bool((lin.update(w, 0 * g) != 0).all())            # momentum keeps moving
        True
        >>> torch.allclose(lin.secant(w, g) * g, lin.update(w, g) - lin.update(w, 0 * g))
        True
        >>> expected = w.detach() + lin.update(w, g)
        >>> opt.step(); torch.allclose(w.detach(), expected)
        True
    """

    @classmethod
    def momentum_credit_refusal(cls, state):
        return None if state.momentum == 0 else (
            "RMSprop's momentum buffer accumulates g / (√v + ε), which is not linear in the gradients; "
            "use momentum=0 or credit='step'"
        )

    @classmethod
    def read_state(cls, param, state, group) -> RMSpropState:
        return RMSpropState(
            lr=as_float(group["lr"]),
            alpha=float(group["alpha"]),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            momentum=float(group["momentum"]),
            centered=bool(group["centered"]),
            maximize=bool(group["maximize"]),
            square_avg=state_tensor(state, "square_avg"),
            grad_avg=state_tensor(state, "grad_avg"),
            momentum_buffer=state_tensor(state, "momentum_buffer"),
        )

    @staticmethod
    def _effective_grad(theta, grad, st: RMSpropState):
        g = -grad if st.maximize else grad
        return g + st.weight_decay * theta if st.weight_decay != 0 else g

    @staticmethod
    def _denominator(g, st: RMSpropState):
        """D and the new grad_avg a' (zeros when not centered)."""
        q = _or_zeros(st.square_avg, g)
        q_new = st.alpha * q + (1 - st.alpha) * g * g
        if st.centered:
            a_new = st.alpha * _or_zeros(st.grad_avg, g) + (1 - st.alpha) * g
            return torch.sqrt(q_new - a_new * a_new), a_new
        return torch.sqrt(q_new), torch.zeros_like(g)

    @classmethod
    def update_rule(cls, theta, grad, st: RMSpropState):
        g = cls._effective_grad(theta, grad, st)
        d, _ = cls._denominator(g, st)
        u = g / (d + st.eps)
        if st.momentum > 0:
            u = st.momentum * _or_zeros(st.momentum_buffer, g) + u
        return -st.lr * u

    @classmethod
    def tangent_rule(cls, theta, grad, st: RMSpropState):
        sign = -1.0 if st.maximize else 1.0
        g = cls._effective_grad(theta, grad, st)
        d, a_new = cls._denominator(g, st)
        q = _or_zeros(st.square_avg, g)
        a = _or_zeros(st.grad_avg, g) if st.centered else torch.zeros_like(g)
        du = safe_div(st.alpha * (q - a * a_new), d * (d + st.eps) ** 2) + st.eps / (d + st.eps) ** 2
        return -st.lr * sign * du

    @classmethod
    def secant_rule(cls, theta, grad, st: RMSpropState):
        sign = -1.0 if st.maximize else 1.0
        a = cls._effective_grad(theta, torch.zeros_like(grad), st)
        b = cls._effective_grad(theta, grad, st)
        da, _ = cls._denominator(a, st)
        db, _ = cls._denominator(b, st)
        q = _or_zeros(st.square_avg, b)
        # D(x)² = w + κ (x − ā)²: centered w = α (q − ā²), κ = α(1 − α); else w = α q, κ = 1 − α.
        if st.centered:
            abar = _or_zeros(st.grad_avg, b)
            w, kappa = st.alpha * (q - abar * abar), st.alpha * (1 - st.alpha)
        else:
            abar = torch.zeros_like(b)
            w, kappa = st.alpha * q, 1 - st.alpha
        ya, yb = a - abar, b - abar
        n = w + root_product_gap(w, kappa, ya, yb) - kappa * abar * (ya + yb)
        chord = (st.eps + safe_div(n, da + db)) / ((da + st.eps) * (db + st.eps))
        return torch.where(grad != 0, -st.lr * sign * chord, cls.tangent_rule(theta, grad, st))

    @classmethod
    def symbolic_update(cls, g, theta, st: RMSpropState) -> sympy.Expr:
        # Literal transcription of torch.optim.rmsprop._single_tensor_rmsprop.
        grad = -g if st.maximize else g
        if st.weight_decay != 0:
            grad = grad + st.weight_decay * theta
        q = 0 if st.square_avg is None else st.square_avg
        q = st.alpha * q + (1 - st.alpha) * grad**2
        if st.centered:
            a = 0 if st.grad_avg is None else st.grad_avg
            a = st.alpha * a + (1 - st.alpha) * grad
            avg = sympy.sqrt(q - a**2) + st.eps
        else:
            avg = sympy.sqrt(q) + st.eps
        if st.momentum > 0:
            buf = 0 if st.momentum_buffer is None else st.momentum_buffer
            return -st.lr * (st.momentum * buf + grad / avg)
        return -st.lr * grad / avg

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        return {
            "lr": rng.choice([1e-3, 0.01, 0.1]),
            "alpha": rng.choice([0.5, 0.9, 0.99]),
            "eps": rng.choice([1e-8, 1e-3]),
            "weight_decay": rng.choice([0.0, 0.1]),
            "momentum": rng.choice([0.0, 0.9]),
            "centered": rng.random() < 0.5,
            "maximize": rng.random() < 0.3,
        }

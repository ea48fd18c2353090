"""RAdam (``torch.optim.RAdam``), added through the public extension point only.

Per coordinate, with s = −1 under ``maximize`` (else 1), g̃ = s·g (+ λθ for L2 decay), t = step + 1,
b1 = 1 − β1^t, b2 = 1 − β2^t, and the length of the approximated simple moving average

    ρ_∞ = 2/(1 − β2) − 1        ρ_t = ρ_∞ − 2 t β2^t / b2        r_t = √((ρ_t − 4)(ρ_t − 2) ρ_∞ / ((ρ_∞ − 4)(ρ_∞ − 2) ρ_t))

(ρ_t depends on the step only, so one branch holds for the whole parameter):

    m' = β1 m + (1 − β1) g̃          v' = β2 v + (1 − β2) g̃²
    ρ_t > 5:  Δ = −η r_t √b2 / b1 · m' / (√v' + ε)        (rectified, adaptive)
    ρ_t ≤ 5:  Δ = −η m' / b1                               (un-adapted momentum, no v)
    [ − ηλθ for decoupled decay, in both branches ]

Un-adapted branch: Δ is affine in g̃, so tangent = secant = −s η (1 − β1)/b1 exactly (the plain
chord would lose digits to the momentum term in Δ(0)). Rectified branch: Δ = −K (p + q g̃)/(√(w +
κ g̃²) + ε) with K = η r_t √b2/b1, p = β1 m, q = 1 − β1, w = β2 v, κ = 1 − β2, whose tangent and
cancellation-free secant are ``_algebra.ratio_chord`` (between a = g̃ at g = 0, λθ under L2
decay or 0, and b = g̃); the limit at v = g̃ = 0 is −s K q/ε, finite.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import sympy
import torch

from ._algebra import ratio_chord
from ._base import OptimizerLinearization, ParamState, as_float, first_moment_prediction, state_tensor, zeros_or


@dataclasses.dataclass(frozen=True)
class RAdamState(ParamState):
    """Frozen state of one parameter under ``torch.optim.RAdam``.

    Attributes:
        lr, beta1, beta2, eps, weight_decay: η, β1, β2, ε, λ (Python floats).
        decoupled_weight_decay, maximize: the group's flags.
        step: steps already taken (the update about to happen uses t = step + 1).
        exp_avg, exp_avg_sq: m and v, each of shape ``param.shape``, or ``None`` before the
            first step (torch's zeros).

    Example:
        >>> st = RAdamState(lr=1e-3, step=5)
        >>> RAdamLinearization.rectification(st) > 0      # t = 6: ρ_t > 5, the adaptive branch
        True
        >>> RAdamLinearization.rectification(RAdamState(lr=1e-3)) is None   # t = 1: momentum only
        True
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    maximize: bool = False
    step: int = 0
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None


class RAdamLinearization(OptimizerLinearization, optimizer=torch.optim.RAdam):
    """Linearization of ``torch.optim.RAdam`` (both branches of ρ_t, L2 or decoupled decay, maximize).

    Δ = −η r_t √b2/b1 · m'/(√v' + ε) when ρ_t > 5, else −η m'/b1 (module doc). Tangent and secant
    are closed forms: constant in the un-adapted branch, the cancellation-free ratio chord otherwise.

    Example (steps 1-5 are un-adapted momentum with β2 = 0.999, step 6 is rectified; ``update``
    is exactly ``step()`` in both):
        >>> import optimizers
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> opt = torch.optim.RAdam([w], lr=0.01)
        >>> for k in range(6):
        ...     w.grad = torch.tensor([0.3, -0.1 * k], dtype=torch.float64)
        ...     lin = optimizers.linearize(opt, copy_state=True)
        ...     slope = lin.tangent(w, w.grad)
        ...     expected = w.detach() + lin.update(w, w.grad)
        ...     opt.step()
        ...     assert torch.allclose(w.detach(), expected, rtol=1e-12, atol=0)
        >>> RAdamLinearization.rectification(lin.state(w)) is not None   # the last step was adaptive
        True
        >>> torch.allclose(lin.secant(w, w.grad) * w.grad, lin.update(w, w.grad) - lin.update(w, 0 * w.grad))
        True
    """

    momentum_buffer = "exp_avg"

    def predicted_gradient(self, param):
        return first_moment_prediction(param, self._state_of(param))

    @classmethod
    def momentum_coefficients(cls, state):
        gain = 1.0 - state.beta1
        return state.beta1, -gain if state.maximize else gain

    @classmethod
    def read_state(cls, param, state, group) -> RAdamState:
        return RAdamState(
            lr=as_float(group["lr"]),
            beta1=as_float(group["betas"][0]),
            beta2=as_float(group["betas"][1]),
            eps=float(group["eps"]),
            weight_decay=as_float(group["weight_decay"]),
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            maximize=bool(group["maximize"]),
            step=int(as_float(state.get("step", 0))),
            exp_avg=state_tensor(state, "exp_avg"),
            exp_avg_sq=state_tensor(state, "exp_avg_sq"),
        )

    @staticmethod
    def rectification(st: RAdamState) -> float | None:
        """r_t for the step about to happen, or ``None`` where ρ_t ≤ 5 (un-adapted momentum).

        Computed as torch computes it (Python floats, t = step + 1).

        Example:
            >>> round(RAdamLinearization.rectification(RAdamState(lr=1.0, beta2=0.9, step=5)), 4)  # ρ_6 ≈ 5.39: r_6 is small
            0.2552
        """
        step = float(st.step + 1)
        b2 = 1 - st.beta2**step
        rho_inf = 2 / (1 - st.beta2) - 1
        rho_t = rho_inf - 2 * step * (st.beta2**step) / b2
        if not rho_t > 5.0:
            return None
        return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5

    @staticmethod
    def _effective_grad(theta, grad, st: RAdamState):
        g = -grad if st.maximize else grad
        if st.weight_decay != 0 and not st.decoupled_weight_decay:
            g = g + st.weight_decay * theta
        return g

    @classmethod
    def update_rule(cls, theta, grad, st: RAdamState):
        # torch's order (single-tensor path), out of place so that a stack of gradients broadcasts.
        g = cls._effective_grad(theta, grad, st)
        step = float(st.step + 1)
        b1, b2 = 1 - st.beta1**step, 1 - st.beta2**step
        corrected = torch.lerp(zeros_or(st.exp_avg, g), g, 1 - st.beta1) / b1
        rect = cls.rectification(st)
        if rect is None:
            delta = -(corrected * st.lr)
        else:
            v_new = torch.addcmul(torch.mul(zeros_or(st.exp_avg_sq, g), st.beta2), g, g, value=1 - st.beta2)
            adaptive = (b2**0.5) / v_new.sqrt_().add_(st.eps)
            delta = -(corrected * st.lr * adaptive * rect)
        if st.weight_decay != 0 and st.decoupled_weight_decay:
            delta = delta - st.lr * st.weight_decay * theta
        return delta

    @classmethod
    def _slope(cls, theta, grad, st: RAdamState, a):
        sign = -1.0 if st.maximize else 1.0
        b = cls._effective_grad(theta, grad, st)
        step = float(st.step + 1)
        b1, b2 = 1 - st.beta1**step, 1 - st.beta2**step
        rect = cls.rectification(st)
        if rect is None:
            return torch.full_like(b, -sign * st.lr * (1 - st.beta1) / b1)
        scale = st.lr * rect * math.sqrt(b2) / b1
        p = st.beta1 * zeros_or(st.exp_avg, b)
        w = st.beta2 * zeros_or(st.exp_avg_sq, b)
        return ratio_chord(p, 1 - st.beta1, w, 1 - st.beta2, st.eps, b if a is None else a, b) * (-sign * scale)

    @classmethod
    def tangent_rule(cls, theta, grad, st: RAdamState):
        return cls._slope(theta, grad, st, None)

    @classmethod
    def secant_rule(cls, theta, grad, st: RAdamState):
        if cls.rectification(st) is None:
            return cls.tangent_rule(theta, grad, st)  # affine in g: the chord is the slope
        a = cls._effective_grad(theta, torch.zeros_like(grad), st)
        return torch.where(grad != 0, cls._slope(theta, grad, st, a), cls.tangent_rule(theta, grad, st))

    @classmethod
    def symbolic_update(cls, g, theta, st: RAdamState) -> sympy.Expr:
        # Literal transcription of torch.optim.radam._single_tensor_radam (non-capturable branch).
        grad = -g if st.maximize else g
        decay = 0
        if st.weight_decay != 0:
            if st.decoupled_weight_decay:
                decay = -st.lr * st.weight_decay * theta
            else:
                grad = grad + st.weight_decay * theta
        t = st.step + 1
        m = 0 if st.exp_avg is None else st.exp_avg
        v = 0 if st.exp_avg_sq is None else st.exp_avg_sq
        m = m + (1 - st.beta1) * (grad - m)  # exp_avg.lerp_(grad, 1 - beta1)
        v = st.beta2 * v + (1 - st.beta2) * grad**2
        b1, b2 = 1 - st.beta1**t, 1 - st.beta2**t
        corrected = m / b1
        rho_inf = 2 / (1 - st.beta2) - 1
        rho_t = rho_inf - 2 * t * st.beta2**t / b2
        if rho_t > 5:
            rect = sympy.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            adaptive = sympy.sqrt(b2) / (sympy.sqrt(v) + st.eps)
            return decay - corrected * st.lr * adaptive * rect
        return decay - corrected * st.lr

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        # β2 ≥ 0.9 reaches ρ_t > 5 at t = 6 (5 past steps); β2 = 0.5 never does (ρ_∞ = 3).
        return {
            "lr": rng.choice([1e-3, 0.01, 0.1]),
            "betas": (rng.choice([0.0, 0.5, 0.9]), rng.choice([0.5, 0.9, 0.999])),
            "eps": rng.choice([1e-8, 1e-3]),
            "weight_decay": rng.choice([0.0, 0.1]),
            "decoupled_weight_decay": rng.random() < 0.4,
            "maximize": rng.random() < 0.3,
        }

"""Adamax (``torch.optim.Adamax``), added through the public extension point only.

Per coordinate, with s = −1 under ``maximize`` (else 1), g̃ = s·g + λθ (L2 decay), t = step + 1,
c = β2 u (u = ``exp_inf``), and η_t = η / (1 − β1^t):

    N(g̃) = m' = β1 m + (1 − β1) g̃        U(g̃) = u' = max(c, |g̃| + ε)        Δ = −η_t N / U

Tangent. Where c wins (c ≥ |g̃| + ε, torch's tie-break gives the same value) U does not depend on
g and Δ is linear in g̃; otherwise ∂U/∂g̃ = sign(g̃):

    ∂Δ/∂g̃ = −η_t [ (1 − β1) U − N U' ] / U²,     U' = sign(g̃)·[|g̃| + ε > c]

and where |g̃| + ε wins the (1 − β1)|g̃| terms cancel in closed form (at step 1 they are nearly
all of it): (1 − β1) U − N sign(g̃) = (1 − β1) ε − β1 m sign(g̃). Finite: U ≥ ε > 0. At g̃ = 0
the kink of |g̃| has slope 0 (torch's and sympy's convention).

Secant. Between a = g̃ at g = 0 (λθ under L2 decay, else 0) and b = g̃:

    (Δ(b) − Δ(a))/(b − a) = −η_t [ (1 − β1) U(a) − N(a) ρ ] / (U(a) U(b)),   ρ = (U(b) − U(a))/(b − a)

Where c wins at both ends, ρ = 0 and the chord is −η_t (1 − β1)/c. Where |x| + ε wins at both
and ab ≥ 0, ρ = sign(a + b) and the bracket is (1 − β1) ε − β1 m sign(a + b), exactly as for the
tangent: no subtraction of nearly equal numbers (the plain chord loses ~|Δ(0)|/|Δ(g) − Δ(0)|
digits to the momentum term). Otherwise the ends straddle the kink or 0, b − a is not small
against them, and ρ is formed directly. The secant in g is s times the chord in g̃.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch

from ._base import OptimizerLinearization, ParamState, as_float, first_moment_prediction, state_tensor, zeros_or


@dataclasses.dataclass(frozen=True)
class AdamaxState(ParamState):
    """Frozen state of one parameter under ``torch.optim.Adamax``.

    Attributes:
        lr, beta1, beta2, eps, weight_decay, maximize: η, β1, β2, ε, λ and the flag.
        step: steps already taken (the update about to happen uses t = step + 1).
        exp_avg, exp_inf: m and u (the exponentially weighted infinity norm), each of shape
            ``param.shape``, or ``None`` before the first step (torch's zeros).

    Example:
        >>> st = AdamaxState(lr=2e-3)
        >>> st.step, st.exp_inf is None, (st.beta1, st.beta2)
        (0, True, (0.9, 0.999))
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    maximize: bool = False
    step: int = 0
    exp_avg: torch.Tensor | None = None
    exp_inf: torch.Tensor | None = None


class AdamaxLinearization(OptimizerLinearization, optimizer=torch.optim.Adamax):
    """Linearization of ``torch.optim.Adamax`` (L2 decay, maximize; ``foreach`` either way).

    Δ = −η_t m'/max(β2 u, |g̃| + ε) (module doc). Tangent and secant are the closed forms of the
    module doc; the secant keeps full precision where the momentum term dominates Δ(0).

    Example (``update`` is exactly ``step()``; the secant is the chord):
        >>> import optimizers
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> opt = torch.optim.Adamax([w], lr=0.01, weight_decay=0.1)
        >>> w.grad = torch.tensor([0.3, -0.1], dtype=torch.float64); opt.step()
        >>> g = torch.tensor([0.2, 0.4], dtype=torch.float64); w.grad = g
        >>> lin = optimizers.linearize(opt, copy_state=True)
        >>> torch.allclose(lin.secant(w, g) * g, lin.update(w, g) - lin.update(w, 0 * g))
        True
        >>> expected = w.detach() + lin.update(w, g)
        >>> opt.step(); torch.allclose(w.detach(), expected, rtol=1e-12, atol=0)
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
    def read_state(cls, param, state, group) -> AdamaxState:
        return AdamaxState(
            lr=as_float(group["lr"]),
            beta1=as_float(group["betas"][0]),
            beta2=as_float(group["betas"][1]),
            eps=float(group["eps"]),
            weight_decay=as_float(group["weight_decay"]),
            maximize=bool(group["maximize"]),
            step=int(as_float(state.get("step", 0))),
            exp_avg=state_tensor(state, "exp_avg"),
            exp_inf=state_tensor(state, "exp_inf"),
        )

    @staticmethod
    def _effective_grad(theta, grad, st: AdamaxState):
        g = -grad if st.maximize else grad
        return g + st.weight_decay * theta if st.weight_decay != 0 else g

    @staticmethod
    def _clr(st: AdamaxState) -> float:
        return st.lr / (1 - st.beta1 ** float(st.step + 1))

    @classmethod
    def _pieces(cls, g, st: AdamaxState):
        """N = m', c = β2 u and U = u' for the effective gradient ``g``."""
        m_new = torch.lerp(zeros_or(st.exp_avg, g), g, 1 - st.beta1)
        c = zeros_or(st.exp_inf, g) * st.beta2
        return m_new, c, torch.maximum(c, g.abs() + st.eps)

    @classmethod
    def update_rule(cls, theta, grad, st: AdamaxState):
        # torch's order: exp_avg.lerp_(g, 1 − β1); exp_inf = max(β2 exp_inf, |g| + ε); θ −= clr m/u.
        m_new, _, u_new = cls._pieces(cls._effective_grad(theta, grad, st), st)
        return (m_new / u_new) * (-cls._clr(st))

    @classmethod
    def tangent_rule(cls, theta, grad, st: AdamaxState):
        sign = -1.0 if st.maximize else 1.0
        g = cls._effective_grad(theta, grad, st)
        _, c, u_new = cls._pieces(g, st)
        m = zeros_or(st.exp_avg, g)
        # |g̃| + ε wins: (1 − β1)U − N sign(g̃) = (1 − β1)ε − β1 m sign(g̃), the |g̃| terms cancelled.
        steep = ((1 - st.beta1) * st.eps - st.beta1 * m * torch.sign(g)) / (u_new * u_new)
        slope = torch.where(g.abs() + st.eps > c, steep, (1 - st.beta1) / u_new)
        return slope * (-cls._clr(st) * sign)

    @classmethod
    def secant_rule(cls, theta, grad, st: AdamaxState):
        sign = -1.0 if st.maximize else 1.0
        a = cls._effective_grad(theta, torch.zeros_like(grad), st)
        b = cls._effective_grad(theta, grad, st)
        na, c, ua = cls._pieces(a, st)
        _, _, ub = cls._pieces(b, st)
        m = zeros_or(st.exp_avg, b)
        flat_a, flat_b = c >= a.abs() + st.eps, c >= b.abs() + st.eps
        # Both ends on |x| + ε with ab ≥ 0: ρ = sign(a + b) and the |a| terms cancel exactly.
        same = ((1 - st.beta1) * st.eps - st.beta1 * m * torch.sign(a + b)) / (ua * ub)
        # Otherwise [(1 − β1) U(a) − N(a) ρ] / (U(a) U(b)), ρ formed directly (module doc).
        diff = b - a
        rho = (ub - ua) / torch.where(diff != 0, diff, torch.ones_like(diff))
        direct = ((1 - st.beta1) * ua - na * rho) / (ua * ub)
        chord = torch.where(
            flat_a & flat_b,
            (1 - st.beta1) / ub,
            torch.where(~flat_a & ~flat_b & (a * b >= 0), same, direct),
        )
        return torch.where(grad != 0, chord * (-cls._clr(st) * sign), cls.tangent_rule(theta, grad, st))

    @classmethod
    def symbolic_update(cls, g, theta, st: AdamaxState) -> sympy.Expr:
        # Literal transcription of torch.optim.adamax._single_tensor_adamax.
        grad = -g if st.maximize else g
        if st.weight_decay != 0:
            grad = grad + st.weight_decay * theta
        t = st.step + 1
        m = 0 if st.exp_avg is None else st.exp_avg
        u = 0 if st.exp_inf is None else st.exp_inf
        m = m + (1 - st.beta1) * (grad - m)  # exp_avg.lerp_(grad, 1 - beta1)
        norm = sympy.Abs(grad) + st.eps
        u = sympy.Piecewise((st.beta2 * u, st.beta2 * u >= norm), (norm, True))  # torch.maximum
        clr = st.lr / (1 - st.beta1**t)
        return -clr * m / u

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        return {
            "lr": rng.choice([1e-3, 0.01, 0.1]),
            "betas": (rng.choice([0.0, 0.5, 0.9]), rng.choice([0.5, 0.9, 0.999])),
            "eps": rng.choice([1e-8, 1e-3]),
            "weight_decay": rng.choice([0.0, 0.1]),
            "maximize": rng.random() < 0.3,
        }

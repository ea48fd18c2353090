"""Adadelta (``torch.optim.Adadelta``), added through the public extension point only.

Per coordinate, with s = −1 under ``maximize`` (else 1), g̃ = s·g + λθ (L2 decay), ρ the decay,
q = ``square_avg`` and A = ``acc_delta`` (the running average of squared updates, fixed during
the step: it is updated only after the parameter's delta is formed):

    q' = ρ q + (1 − ρ) g̃²        δ = √(A + ε) / √(q' + ε) · g̃        Δ = −η δ

So Δ = −η √(A + ε) f(g̃) with f(x) = x / √(w + κ x²), w = ρ q + ε > 0, κ = 1 − ρ. Its tangent
has no cancellation at all,

    ∂Δ/∂g̃ = −η √(A + ε) · w / (w + κ g̃²)^{3/2},

and the chord between a = g̃ at g = 0 (λθ under L2 decay, else 0) and b = g̃ is
(w + √((w + κa²)(w + κb²)) − κab) / ((R(a) + R(b)) R(a) R(b)), R(x) = √(w + κx²), formed without
cancellation (``_algebra.ratio_chord`` with p = 0, q = 1 and no ε outside the root). Without L2
decay Δ(0) = 0 and the chord is simply Δ(g)/g = −η √(A + ε)/R(g̃).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch

from ._algebra import ratio_chord
from ._base import OptimizerLinearization, ParamState, as_float, state_tensor, zeros_or


@dataclasses.dataclass(frozen=True)
class AdadeltaState(ParamState):
    """Frozen state of one parameter under ``torch.optim.Adadelta``.

    Attributes:
        lr, rho, eps, weight_decay, maximize: η, ρ, ε, λ and the flag.
        square_avg, acc_delta: q and A, each of shape ``param.shape``, or ``None`` before the
            first step (torch's zeros).

    Example:
        >>> st = AdadeltaState(lr=1.0)
        >>> st.rho, st.eps, st.acc_delta is None
        (0.9, 1e-06, True)
    """

    rho: float = 0.9
    eps: float = 1e-6
    weight_decay: float = 0.0
    maximize: bool = False
    square_avg: torch.Tensor | None = None
    acc_delta: torch.Tensor | None = None


class AdadeltaLinearization(OptimizerLinearization, optimizer=torch.optim.Adadelta):
    """Linearization of ``torch.optim.Adadelta`` (L2 decay, maximize; ``foreach`` either way).

    Δ = −η √(A + ε) g̃ / √(ρ q + (1 − ρ) g̃² + ε) (module doc); closed-form tangent and secant.

    Example (``update`` is exactly ``step()``; the secant is the chord, L2 decay in Δ(0)):
        >>> import optimizers
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> opt = torch.optim.Adadelta([w], lr=1.0, weight_decay=0.1)
        >>> w.grad = torch.tensor([0.3, -0.1], dtype=torch.float64); opt.step()
        >>> g = torch.tensor([0.2, 0.4], dtype=torch.float64); w.grad = g
        >>> lin = optimizers.linearize(opt, copy_state=True)
        >>> torch.allclose(lin.secant(w, g) * g, lin.update(w, g) - lin.update(w, 0 * g))
        True
        >>> expected = w.detach() + lin.update(w, g)
        >>> opt.step(); torch.allclose(w.detach(), expected, rtol=1e-12, atol=0)
        True
    """

    @classmethod
    def momentum_credit_refusal(cls, state):
        return None  # Δ(0) = 0: no state carries earlier gradients

    @classmethod
    def read_state(cls, param, state, group) -> AdadeltaState:
        return AdadeltaState(
            lr=as_float(group["lr"]),
            rho=float(group["rho"]),
            eps=float(group["eps"]),
            weight_decay=as_float(group["weight_decay"]),
            maximize=bool(group["maximize"]),
            square_avg=state_tensor(state, "square_avg"),
            acc_delta=state_tensor(state, "acc_delta"),
        )

    @staticmethod
    def _effective_grad(theta, grad, st: AdadeltaState):
        g = -grad if st.maximize else grad
        return g + st.weight_decay * theta if st.weight_decay != 0 else g

    @classmethod
    def update_rule(cls, theta, grad, st: AdadeltaState):
        # torch's order (single-tensor path), out of place so that a stack of gradients broadcasts.
        g = cls._effective_grad(theta, grad, st)
        q_new = torch.addcmul(torch.mul(zeros_or(st.square_avg, g), st.rho), g, g, value=1 - st.rho)
        std = q_new.add_(st.eps).sqrt_()
        delta = torch.div(torch.add(zeros_or(st.acc_delta, g), st.eps).sqrt_(), std).mul_(g)
        return delta.mul_(-st.lr)

    @classmethod
    def _slope(cls, theta, grad, st: AdadeltaState, a):
        sign = -1.0 if st.maximize else 1.0
        b = cls._effective_grad(theta, grad, st)
        w = zeros_or(st.square_avg, b) * st.rho + st.eps
        scale = torch.add(zeros_or(st.acc_delta, b), st.eps).sqrt_()
        return ratio_chord(0.0, 1.0, w, 1 - st.rho, 0.0, b if a is None else a, b) * scale * (-st.lr * sign)

    @classmethod
    def tangent_rule(cls, theta, grad, st: AdadeltaState):
        return cls._slope(theta, grad, st, None)

    @classmethod
    def secant_rule(cls, theta, grad, st: AdadeltaState):
        a = cls._effective_grad(theta, torch.zeros_like(grad), st)
        return torch.where(grad != 0, cls._slope(theta, grad, st, a), cls.tangent_rule(theta, grad, st))

    @classmethod
    def symbolic_update(cls, g, theta, st: AdadeltaState) -> sympy.Expr:
        # Literal transcription of torch.optim.adadelta._single_tensor_adadelta.
        grad = -g if st.maximize else g
        if st.weight_decay != 0:
            grad = grad + st.weight_decay * theta
        q = 0 if st.square_avg is None else st.square_avg
        acc = 0 if st.acc_delta is None else st.acc_delta
        q = st.rho * q + (1 - st.rho) * grad**2
        std = sympy.sqrt(q + st.eps)
        delta = sympy.sqrt(acc + st.eps) / std * grad
        return -st.lr * delta

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        return {
            "lr": rng.choice([0.01, 0.1, 1.0]),
            "rho": rng.choice([0.5, 0.9, 0.99]),
            "eps": rng.choice([1e-6, 1e-3]),
            "weight_decay": rng.choice([0.0, 0.1]),
            "maximize": rng.random() < 0.3,
        }

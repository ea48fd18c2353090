"""NAdam (``torch.optim.NAdam``), added through the public extension point only.

Per coordinate, with s = −1 under ``maximize`` (else 1), g̃ = s·g (+ λθ for L2 decay), t = step + 1,
ψ = ``momentum_decay`` and the momentum schedule

    μ_t = β1 (1 − ½·0.96^(t ψ))        μ_{t+1} = β1 (1 − ½·0.96^((t+1) ψ))        Π_t = Π_{t−1} μ_t

(Π_t is torch's ``mu_product`` after this step's ``mu_product *= mu``; torch keeps it in its scalar
dtype, float32 by default, and :meth:`NAdamLinearization.read_state` forms it with the same torch
operation so that its rounding is torch's), b2 = 1 − β2^t:

    m' = β1 m + (1 − β1) g̃          v' = β2 v + (1 − β2) g̃²          D = √(v'/b2) + ε
    Δ  = −η (1 − μ_t)/(1 − Π_t) · g̃/D − η μ_{t+1}/(1 − Π_t μ_{t+1}) · m'/D   [ − ηλθ decoupled ]

Collecting the terms, Δ = −(p + q g̃)/(√(w + κ g̃²) + ε) with p = c2 β1 m, q = c1 + c2 (1 − β1),
w = β2 v / b2, κ = (1 − β2)/b2, c1 = η (1 − μ_t)/(1 − Π_t), c2 = η μ_{t+1}/(1 − Π_t μ_{t+1}): the
form of Adam with other coefficients. Tangent and secant are therefore the cancellation-free chord
of ``_algebra.ratio_chord`` (its derivative where the end points coincide), between a = g̃ at
g = 0 (λθ under L2 decay, else 0) and b = g̃; the decoupled decay −ηλθ is in Δ(0) only. The
0/0 limit at v = g̃ = 0 (then m = 0 too) is −s q/ε, finite.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch

from ._algebra import ratio_chord
from ._base import OptimizerLinearization, ParamState, as_float, first_moment_prediction, state_tensor, zeros_or


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps ``step``/``mu_product``/``eta`` in (``optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class NAdamState(ParamState):
    """Frozen state of one parameter under ``torch.optim.NAdam``.

    Attributes:
        lr, beta1, beta2, eps, weight_decay, momentum_decay: η, β1, β2, ε, λ, ψ (Python floats).
        decoupled_weight_decay, maximize: the group's flags.
        step: steps already taken (the update about to happen uses t = step + 1).
        mu_product: Π_t = Π_{t−1} μ_t, the product INCLUDING this step's μ_t, rounded as torch
            rounds it (the optimizer's scalar dtype); ``None`` means Π_t = μ_t.
        exp_avg, exp_avg_sq: m and v, each of shape ``param.shape``, or ``None`` before the
            first step (torch's zeros).

    Example:
        >>> st = NAdamState(lr=2e-3)
        >>> st.step, st.momentum_decay, st.exp_avg is None
        (0, 0.004, True)
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum_decay: float = 4e-3
    decoupled_weight_decay: bool = False
    maximize: bool = False
    step: int = 0
    mu_product: float | None = None
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None


def _mu(beta1: float, step: float, momentum_decay: float) -> float:
    """torch's μ at ``step`` (a float, as ``_get_value(step_t)`` gives it)."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


class NAdamLinearization(OptimizerLinearization, optimizer=torch.optim.NAdam):
    """Linearization of ``torch.optim.NAdam`` (momentum_decay, L2 or decoupled decay, maximize).

    Δ = −η[(1 − μ_t)/(1 − Π_t) g̃ + μ_{t+1}/(1 − Π_t μ_{t+1}) m'] / (√(v'/b2) + ε) (module doc);
    tangent and secant are the closed forms of that Adam-like ratio, finite everywhere.

    Example (``update`` is exactly ``step()``; decoupled decay is in Δ(0), not in the secant):
        >>> import optimizers
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> opt = torch.optim.NAdam([w], lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
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
    def read_state(cls, param, state, group) -> NAdamState:
        beta1, psi = as_float(group["betas"][0]), float(group["momentum_decay"])
        step = int(as_float(state.get("step", 0)))
        mu = _mu(beta1, float(step + 1), psi)
        prod = state.get("mu_product")
        if prod is None:
            prod = torch.ones((), dtype=_scalar_dtype())
        # torch's `mu_product *= mu`, in mu_product's own dtype (float32 by default).
        mu_product = torch.mul(prod.detach(), mu).item() if isinstance(prod, torch.Tensor) else float(prod) * mu
        return NAdamState(
            lr=as_float(group["lr"]),
            beta1=beta1,
            beta2=as_float(group["betas"][1]),
            eps=float(group["eps"]),
            weight_decay=as_float(group["weight_decay"]),
            momentum_decay=psi,
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            maximize=bool(group["maximize"]),
            step=step,
            mu_product=mu_product,
            exp_avg=state_tensor(state, "exp_avg"),
            exp_avg_sq=state_tensor(state, "exp_avg_sq"),
        )

    @staticmethod
    def _effective_grad(theta, grad, st: NAdamState):
        g = -grad if st.maximize else grad
        if st.weight_decay != 0 and not st.decoupled_weight_decay:
            g = g + st.weight_decay * theta
        return g

    @staticmethod
    def _coefficients(st: NAdamState) -> tuple[float, float, float]:
        """c1 = η(1 − μ_t)/(1 − Π_t), c2 = η μ_{t+1}/(1 − Π_t μ_{t+1}) and b2, as torch forms them."""
        t = float(st.step + 1)
        mu = _mu(st.beta1, t, st.momentum_decay)
        mu_next = _mu(st.beta1, t + 1, st.momentum_decay)
        prod = mu if st.mu_product is None else st.mu_product
        c1 = st.lr * (1.0 - mu) / (1.0 - prod)
        c2 = (st.lr * mu_next) / (1.0 - prod * mu_next)
        return c1, c2, 1 - st.beta2**t

    @classmethod
    def update_rule(cls, theta, grad, st: NAdamState):
        # torch's order (single-tensor path), out of place so that a stack of gradients broadcasts.
        g = cls._effective_grad(theta, grad, st)
        c1, c2, b2 = cls._coefficients(st)
        m_new = torch.lerp(zeros_or(st.exp_avg, g), g, 1 - st.beta1)
        v_new = torch.addcmul(torch.mul(zeros_or(st.exp_avg_sq, g), st.beta2), g, g, value=1 - st.beta2)
        denom = torch.div(v_new, b2).sqrt_().add_(st.eps)
        delta = torch.mul(g / denom, -c1).add_(m_new / denom, alpha=-c2)
        if st.weight_decay != 0 and st.decoupled_weight_decay:
            delta = delta - st.lr * st.weight_decay * theta
        return delta

    @classmethod
    def _chord(cls, theta, grad, st: NAdamState, a):
        sign = -1.0 if st.maximize else 1.0
        b = cls._effective_grad(theta, grad, st)
        c1, c2, b2 = cls._coefficients(st)
        p = c2 * st.beta1 * zeros_or(st.exp_avg, b)
        w = zeros_or(st.exp_avg_sq, b) * (st.beta2 / b2)
        q = c1 + c2 * (1 - st.beta1)
        return ratio_chord(p, q, w, (1 - st.beta2) / b2, st.eps, b if a is None else a, b) * (-sign)

    @classmethod
    def tangent_rule(cls, theta, grad, st: NAdamState):
        return cls._chord(theta, grad, st, None)

    @classmethod
    def secant_rule(cls, theta, grad, st: NAdamState):
        a = cls._effective_grad(theta, torch.zeros_like(grad), st)
        return torch.where(grad != 0, cls._chord(theta, grad, st, a), cls.tangent_rule(theta, grad, st))

    @classmethod
    def symbolic_update(cls, g, theta, st: NAdamState) -> sympy.Expr:
        # Literal transcription of torch.optim.nadam._single_tensor_nadam (mu_product: see NAdamState).
        grad = -g if st.maximize else g
        decay = 0
        t = st.step + 1
        b2 = 1 - st.beta2**t
        if st.weight_decay != 0:
            if st.decoupled_weight_decay:
                decay = -st.lr * st.weight_decay * theta
            else:
                grad = grad + st.weight_decay * theta
        c096 = sympy.Rational(0.96)  # the float64 literal of torch's code, exactly
        mu = st.beta1 * (1 - sympy.Rational(1, 2) * c096 ** (t * st.momentum_decay))
        mu_next = st.beta1 * (1 - sympy.Rational(1, 2) * c096 ** ((t + 1) * st.momentum_decay))
        mu_product = mu if st.mu_product is None else st.mu_product
        m = 0 if st.exp_avg is None else st.exp_avg
        v = 0 if st.exp_avg_sq is None else st.exp_avg_sq
        m = m + (1 - st.beta1) * (grad - m)  # exp_avg.lerp_(grad, 1 - beta1)
        v = st.beta2 * v + (1 - st.beta2) * grad**2
        denom = sympy.sqrt(v / b2) + st.eps
        mu_product_next = mu_product * mu_next
        return (
            decay
            - st.lr * (1 - mu) / (1 - mu_product) * grad / denom
            - st.lr * mu_next / (1 - mu_product_next) * m / denom
        )

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        return {
            "lr": rng.choice([1e-3, 0.01, 0.1]),
            "betas": (rng.choice([0.0, 0.5, 0.9]), rng.choice([0.9, 0.999])),
            "eps": rng.choice([1e-8, 1e-3]),
            "weight_decay": rng.choice([0.0, 0.1]),
            "momentum_decay": rng.choice([0.0, 4e-3, 0.5]),
            "decoupled_weight_decay": rng.random() < 0.4,
            "maximize": rng.random() < 0.3,
        }

"""Adagrad (``torch.optim.Adagrad``), added through the public extension point only.

Per coordinate, s = −1 under ``maximize`` (else 1), g̃ = s·g + λθ, k = steps already taken:

    η_k = η / (1 + k·lr_decay)      S' = S + g̃²      D = √S'      Δ = −η_k g̃ / (D + ε)

``S`` starts at ``initial_accumulator_value`` (torch creates the state in the constructor).
Tangent (g̃² cancels in closed form):  ∂Δ/∂g̃ = −η_k (S + ε D) / (D (D + ε)²), written as
−η_k [S/(D (D+ε)²) + ε/(D+ε)²]; D = 0 forces S = 0, where the first term's limit is 0, so the
tangent is −η_k/ε. Secant between a = λθ (g̃ at g = 0) and b = g̃:
−η_k [ ε + (S + D(a) D(b) − a b)/(D(a) + D(b)) ] / ((D(a) + ε)(D(b) + ε)), with D(a)D(b) − ab formed
without cancellation (``root_product_gap``).
Sparse gradients are refused by ``linearize``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch

from ._algebra import root_product_gap, safe_div
from ._base import OptimizerLinearization, ParamState, as_float


@dataclasses.dataclass(frozen=True)
class AdagradState(ParamState):
    """Frozen state of one parameter under ``torch.optim.Adagrad``.

    Attributes:
        lr, lr_decay, eps, weight_decay, maximize, initial_accumulator_value: the group's settings.
        step: steps already taken (k in η_k = η/(1 + k·lr_decay)).
        sum: the accumulator S, shape ``param.shape``, or ``None`` (then S = initial_accumulator_value).

    Example:
        >>> AdagradState(lr=0.1).sum is None
        True
    """

    lr_decay: float = 0.0
    eps: float = 1e-10
    weight_decay: float = 0.0
    maximize: bool = False
    step: int = 0
    initial_accumulator_value: float = 0.0
    sum: torch.Tensor | None = None


class AdagradLinearization(OptimizerLinearization, optimizer=torch.optim.Adagrad):
    """Linearization of ``torch.optim.Adagrad`` (lr decay, L2 decay, maximize; dense gradients).

    Δ = −η_k g̃/(√(S + g̃²) + ε); tangent −η_k (S + ε D)/(D (D + ε)²), secant as in the module doc.

    Example (``update`` is exactly ``step()``; the secant satisfies J ⊙ g = Δ(g) − Δ(0)):
        >>> import optimizers
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> opt = torch.optim.Adagrad([w], lr=0.1, initial_accumulator_value=0.5)
        >>> g = torch.tensor([0.3, -0.1], dtype=torch.float64); w.grad = g
        >>> lin = optimizers.linearize(opt, copy_state=True)
        >>> torch.allclose(lin.secant(w, g) * g, lin.update(w, g) - lin.update(w, 0 * g))
        True
        >>> expected = w.detach() + lin.update(w, g)
        >>> opt.step(); torch.allclose(w.detach(), expected)
        True
    """

    @classmethod
    def momentum_credit_refusal(cls, state):
        return None  # no state carries earlier gradients into Δ(0)

    @classmethod
    def read_state(cls, param, state, group) -> AdagradState:
        step = state.get("step", 0)
        s = state.get("sum")
        return AdagradState(
            lr=as_float(group["lr"]),
            lr_decay=float(group["lr_decay"]),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            maximize=bool(group["maximize"]),
            step=int(as_float(step)),
            initial_accumulator_value=float(group["initial_accumulator_value"]),
            sum=None if s is None else s.detach(),
        )

    @staticmethod
    def _pieces(theta, grad, st: AdagradState):
        g = -grad if st.maximize else grad
        if st.weight_decay != 0:
            g = g + st.weight_decay * theta
        s = torch.full_like(g, st.initial_accumulator_value) if st.sum is None else st.sum
        clr = st.lr / (1 + st.step * st.lr_decay)
        return g, s, torch.sqrt(s + g * g), clr

    @classmethod
    def update_rule(cls, theta, grad, st: AdagradState):
        g, _, d, clr = cls._pieces(theta, grad, st)
        return -clr * g / (d + st.eps)

    @classmethod
    def tangent_rule(cls, theta, grad, st: AdagradState):
        sign = -1.0 if st.maximize else 1.0
        _, s, d, clr = cls._pieces(theta, grad, st)
        return -clr * sign * (safe_div(s, d * (d + st.eps) ** 2) + st.eps / (d + st.eps) ** 2)

    @classmethod
    def secant_rule(cls, theta, grad, st: AdagradState):
        sign = -1.0 if st.maximize else 1.0
        a, s, d0, clr = cls._pieces(theta, torch.zeros_like(grad), st)
        b, _, dg, _ = cls._pieces(theta, grad, st)
        chord = (st.eps + safe_div(s + root_product_gap(s, 1.0, a, b), d0 + dg)) / ((d0 + st.eps) * (dg + st.eps))
        return torch.where(grad != 0, -clr * sign * chord, cls.tangent_rule(theta, grad, st))

    @classmethod
    def symbolic_update(cls, g, theta, st: AdagradState) -> sympy.Expr:
        # Literal transcription of torch.optim.adagrad._single_tensor_adagrad (dense branch).
        grad = -g if st.maximize else g
        if st.weight_decay != 0:
            grad = grad + st.weight_decay * theta
        clr = st.lr / (1 + st.step * st.lr_decay)
        s = st.initial_accumulator_value if st.sum is None else st.sum
        return -clr * grad / (sympy.sqrt(s + grad**2) + st.eps)

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        return {
            "lr": rng.choice([1e-3, 0.01, 0.1]),
            "lr_decay": rng.choice([0.0, 0.1]),
            "weight_decay": rng.choice([0.0, 0.1]),
            "initial_accumulator_value": rng.choice([0.0, 0.5]),
            "eps": rng.choice([1e-10, 1e-3]),
            "maximize": rng.random() < 0.3,
        }

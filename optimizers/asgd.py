"""ASGD (``torch.optim.ASGD``), added through the public extension point only.

Per coordinate, with s = −1 under ``maximize`` (else 1), g̃ = s·g + λ_w θ (L2 decay ``weight_decay``),
η_t = ``eta`` (the step's learning rate, a scalar torch keeps in its scalar dtype: float32 by
default, so it is read as torch holds it) and λ = ``lambd``:

    θ ← θ (1 − λ η_t) − η_t g̃,        so        Δ = −λ η_t θ − η_t g̃.

Δ is affine in g: tangent = secant = −s η_t exactly (the plain chord would lose digits to the
decay terms in Δ(0)). The averaged iterate ``ax`` and the schedules of ``eta``/``mu`` (updated
after θ moves) never change θ's step, so they are not part of Δ. Before the first step torch
starts from η_t = ``lr`` rounded to its scalar dtype, which :meth:`ASGDLinearization.read_state`
reproduces.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch

from ._base import OptimizerLinearization, ParamState, as_float


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps ``eta`` in (``torch.optim.optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class ASGDState(ParamState):
    """Frozen state of one parameter under ``torch.optim.ASGD`` (what moves θ; ``ax`` does not).

    Attributes:
        lr: the group's ``lr`` (the SGD proxy's −η); the step itself uses ``eta``.
        eta: η_t, this step's learning rate as torch holds it (a Python float).
        lambd, weight_decay, maximize: λ (the decay by 1 − λη_t), the L2 coefficient, the flag.
        step: steps already taken.

    Example:
        >>> st = ASGDState(lr=0.01, eta=0.01)
        >>> st.lambd, st.weight_decay
        (0.0001, 0.0)
    """

    eta: float = 0.01
    lambd: float = 1e-4
    weight_decay: float = 0.0
    maximize: bool = False
    step: int = 0


class ASGDLinearization(OptimizerLinearization, optimizer=torch.optim.ASGD):
    """Linearization of ``torch.optim.ASGD`` (lambd decay, L2 decay, maximize): Δ = −λη_tθ − η_t g̃.

    Tangent and secant are the constant −s η_t (module doc); η_t follows torch's schedule
    η_t = lr / (1 + λ lr t)^α, read from the optimizer's state.

    Example (``update`` is exactly ``step()``; the slope is −η_t, not −lr, after a few steps):
        >>> import optimizers
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> opt = torch.optim.ASGD([w], lr=0.1, lambd=0.5, t0=1)
        >>> for _ in range(3):
        ...     w.grad = torch.tensor([0.3, -0.1], dtype=torch.float64); opt.step()
        >>> g = torch.tensor([0.2, 0.4], dtype=torch.float64); w.grad = g
        >>> lin = optimizers.linearize(opt, copy_state=True)
        >>> eta = lin.state(w).eta
        >>> round(eta, 6), torch.equal(lin.tangent(w, g), torch.full_like(g, -eta))
        (0.090049, True)
        >>> expected = w.detach() + lin.update(w, g)
        >>> opt.step(); torch.allclose(w.detach(), expected, rtol=1e-12, atol=0)
        True
    """

    @classmethod
    def momentum_credit_refusal(cls, state):
        return None  # the averaged iterate ax does not enter the update

    @classmethod
    def read_state(cls, param, state, group) -> ASGDState:
        eta = state.get("eta")
        if eta is None:  # torch initializes eta = as_tensor(lr, dtype=scalar dtype) at the first step
            eta = torch.as_tensor(as_float(group["lr"]), dtype=_scalar_dtype())
        return ASGDState(
            lr=as_float(group["lr"]),
            eta=as_float(eta),
            lambd=float(group["lambd"]),
            weight_decay=as_float(group["weight_decay"]),
            maximize=bool(group["maximize"]),
            step=int(as_float(state.get("step", 0))),
        )

    @staticmethod
    def _effective_grad(theta, grad, st: ASGDState):
        g = -grad if st.maximize else grad
        return g + st.weight_decay * theta if st.weight_decay != 0 else g

    @classmethod
    def update_rule(cls, theta, grad, st: ASGDState):
        g = cls._effective_grad(theta, grad, st)
        return torch.mul(g, -st.eta) - (st.lambd * st.eta) * theta

    @classmethod
    def tangent_rule(cls, theta, grad, st: ASGDState):
        return torch.full_like(grad, st.eta if st.maximize else -st.eta)

    @classmethod
    def secant_rule(cls, theta, grad, st: ASGDState):
        return cls.tangent_rule(theta, grad, st)  # affine in g

    @classmethod
    def symbolic_update(cls, g, theta, st: ASGDState) -> sympy.Expr:
        # Literal transcription of torch.optim.asgd._single_tensor_asgd (the parameter update).
        grad = -g if st.maximize else g
        if st.weight_decay != 0:
            grad = grad + st.weight_decay * theta
        new_theta = theta * (1 - st.lambd * st.eta) - st.eta * grad
        return new_theta - theta

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        return {
            "lr": rng.choice([1e-3, 0.01, 0.1]),
            "lambd": rng.choice([0.0, 1e-4, 0.5]),
            "alpha": rng.choice([0.5, 0.75]),
            "t0": rng.choice([0.0, 2.0, 1e6]),
            "weight_decay": rng.choice([0.0, 0.1]),
            "maximize": rng.random() < 0.3,
        }

"""SGD with momentum, dampening, Nesterov, L2 weight decay and ``maximize`` (``torch.optim.SGD``).

With s = −1 under ``maximize`` (else 1) and g̃ = s·g + λθ:

* momentum μ = 0:            Δ = −η g̃
* first step (no buffer):     buf' = g̃                      (torch clones, no dampening)
* later steps:                buf' = μ·buf + (1 − d)·g̃
* plain momentum:             Δ = −η buf'
* Nesterov:                   Δ = −η (g̃ + μ·buf')

Δ is affine in g, so tangent = secant = −η·s·k with k = ∂(direction)/∂g̃ in {1, 1+μ, 1−d,
1+μ(1−d)}; with μ = 0 this is the familiar −η.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch

from ._base import OptimizerLinearization, ParamState, as_float
from ._preconditioner import Preconditioner, Scalar


@dataclasses.dataclass(frozen=True)
class SGDState(ParamState):
    """Frozen state of one parameter under ``torch.optim.SGD``.

    Attributes:
        lr, momentum, dampening, weight_decay, nesterov, maximize: η, μ, d, λ and the flags of
            the parameter's group (Python scalars).
        momentum_buffer: ``buf`` of shape ``param.shape`` (the optimizer's dtype), or ``None``
            before the first step with momentum.

    Example:
        >>> SGDState(lr=0.1, momentum=0.9).momentum_buffer is None
        True
    """

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    momentum_buffer: torch.Tensor | None = None


class SGDLinearization(OptimizerLinearization, optimizer=torch.optim.SGD):
    """Linearization of ``torch.optim.SGD`` (affine in g: tangent and secant coincide).

    Δ(g) = −η·direction(g̃) (module doc); J = ∂Δ/∂g = −η·s·k is a scalar per parameter, with
    k = 1 (no momentum), 1 − d (plain momentum after the first step), 1 + μ(1 − d) (Nesterov),
    so φ_z = −⟨J ∇L_val, c_z⟩ = η·s·k ⟨∇L_val, c_z⟩, the original In-Run Data Shapley form
    scaled by the momentum factor. ``tangent``/``secant`` return J broadcast to ``param.shape``.

    Example (Nesterov momentum after one step: J = −η(1 + μ), and ``update`` matches ``step()``):
        >>> import optimizers
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True)
        >>> w.grad = torch.tensor([0.3, -0.1], dtype=torch.float64); opt.step()
        >>> w.grad = torch.tensor([0.2, 0.4], dtype=torch.float64)
        >>> lin = optimizers.linearize(opt, copy_state=True)
        >>> [round(j, 6) for j in lin.tangent(w, w.grad).tolist()]
        [-0.19, -0.19]
        >>> expected = w.detach() + lin.update(w, w.grad)
        >>> opt.step(); torch.allclose(w.detach(), expected)
        True
    """

    def preconditioner(self, param: torch.Tensor, grad: torch.Tensor, kind: Any = "tangent") -> Preconditioner:
        """J = −η·s·k as a :class:`Scalar` (one number per parameter, so every ghost path is exact).

        Nesterov's first step (the buffer starts as g̃): k = 1 + μ.

        Example:
            >>> w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)); w.grad = torch.ones_like(w)
            >>> import optimizers
            >>> optimizers.linearize(torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True)).preconditioner(w, w.grad, "secant")
            Scalar(-0.19)
        """
        J = super().preconditioner(param, grad, kind)
        value = J.scalar
        return J if value is None or isinstance(J, Scalar) else Scalar(value)

    momentum_buffer = "momentum_buffer"

    @classmethod
    def momentum_coefficients(cls, state):
        # The first step copies the gradient into the buffer (no dampening); maximize steps along −g.
        gain = 1.0 if state.momentum_buffer is None else 1.0 - state.dampening
        return state.momentum, -gain if state.maximize else gain

    @classmethod
    def read_state(cls, param, state, group) -> SGDState:
        buf = state.get("momentum_buffer")
        return SGDState(
            lr=as_float(group["lr"]),
            momentum=float(group["momentum"]),
            dampening=float(group["dampening"]),
            weight_decay=as_float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
            momentum_buffer=None if buf is None else buf.detach(),
        )

    @staticmethod
    def _slope(state: SGDState) -> float:
        """∂Δ/∂g, a scalar."""
        sign = -1.0 if state.maximize else 1.0
        mu = state.momentum
        if mu == 0:
            k = 1.0
        else:
            k_buf = 1.0 if state.momentum_buffer is None else 1.0 - state.dampening
            k = 1.0 + mu * k_buf if state.nesterov else k_buf
        return -state.lr * sign * k

    @classmethod
    def update_rule(cls, theta, grad, state: SGDState):
        g = -grad if state.maximize else grad
        if state.weight_decay != 0:
            g = g + state.weight_decay * theta
        if state.momentum == 0:
            direction = g
        else:
            if state.momentum_buffer is None:
                buf = g
            else:
                buf = state.momentum * state.momentum_buffer + (1 - state.dampening) * g
            direction = g + state.momentum * buf if state.nesterov else buf
        return -state.lr * direction

    @classmethod
    def tangent_rule(cls, theta, grad, state: SGDState):
        return torch.full_like(grad, cls._slope(state))

    @classmethod
    def secant_rule(cls, theta, grad, state: SGDState):
        return cls.tangent_rule(theta, grad, state)

    @classmethod
    def symbolic_update(cls, g, theta, state: SGDState) -> sympy.Expr:
        g = -g if state.maximize else g
        if state.weight_decay != 0:
            g = g + state.weight_decay * theta
        if state.momentum != 0:
            if state.momentum_buffer is None:
                buf = g
            else:
                buf = state.momentum * state.momentum_buffer + (1 - state.dampening) * g
            g = g + state.momentum * buf if state.nesterov else buf
        return -state.lr * g

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        momentum = rng.choice([0.0, 0.5, 0.9])
        nesterov = momentum > 0 and rng.random() < 0.5
        return {
            "lr": rng.choice([1e-3, 0.05, 0.5]),
            "momentum": momentum,
            "dampening": 0.0 if nesterov else rng.choice([0.0, 0.3]),
            "weight_decay": rng.choice([0.0, 1e-2]),
            "nesterov": nesterov,
            "maximize": rng.random() < 0.3,
        }

"""Rprop (``torch.optim.Rprop``), added through the public extension point only.

Per coordinate, with s = −1 under ``maximize`` (else 1), g̃ = s·g, p = ``prev`` (the previous
step's masked gradient), σ = ``step_size``, (η−, η+) = ``etas`` and [σ_min, σ_max] = ``step_sizes``:

    f   = η+ if g̃ p > 0,   η− if g̃ p < 0,   1 if g̃ p = 0
    σ'  = clamp(σ f, σ_min, σ_max)
    g'  = 0 if g̃ p < 0 (a sign change: skip this step), else g̃
    Δ   = −sign(g') σ'

Δ is piecewise CONSTANT in g: it takes the values −σ' sign(g̃) or 0 and jumps where g̃ or g̃ p
changes sign. Hence, exactly, the tangent is 0 wherever it exists (and torch's and sympy's
convention at the jumps), and the chord from g = 0, where sign(0) = 0 gives Δ(0) = 0, is
Δ(g)/g = −σ'/|g| (or 0). Neither is a usable first-order value: the tangent sees no effect of
any sample, and Σ_z J_sec c_z = Δ(g_B) is reached only along the straight line to g_B, not by
removing samples (a coalition's Δ is ±σ' or 0, never proportional to its gradient).
:meth:`RpropLinearization.preconditioner` therefore refuses "tangent" and "secant" with
:class:`~optimizers.UpdateJumpError`; value such steps with the exact update of each coalition
(``validation.leave_one_out`` or the exact Shapley value of ``validation``), or use the SGD
proxy (``linearization="sgd"``, J = −lr). ``update``/``tangent``/``secant`` stay available (and
certified by the conformance check) for code that wants the raw values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch

from ._autograd import UpdateJumpError
from ._base import OptimizerLinearization, ParamState, as_float, state_tensor
from ._preconditioner import Preconditioner


@dataclasses.dataclass(frozen=True)
class RpropState(ParamState):
    """Frozen state of one parameter under ``torch.optim.Rprop``.

    Attributes:
        lr: the group's learning rate (the initial step size; the SGD proxy's −η).
        etaminus, etaplus: the step-size factors on a sign change / on the same sign.
        step_size_min, step_size_max: the clamp of the step sizes.
        maximize: the flag.
        prev, step_size: the previous masked gradient and the per-coordinate step sizes, each of
            shape ``param.shape``, or ``None`` before the first step (torch's zeros and ``lr``).

    Example:
        >>> st = RpropState(lr=0.01)
        >>> (st.etaminus, st.etaplus), (st.step_size_min, st.step_size_max), st.prev is None
        ((0.5, 1.2), (1e-06, 50.0), True)
    """

    etaminus: float = 0.5
    etaplus: float = 1.2
    step_size_min: float = 1e-6
    step_size_max: float = 50.0
    maximize: bool = False
    prev: torch.Tensor | None = None
    step_size: torch.Tensor | None = None


class RpropLinearization(OptimizerLinearization, optimizer=torch.optim.Rprop):
    """Linearization of ``torch.optim.Rprop``: the exact update, and a refusal of first-order values.

    ``update`` is exactly ``step()`` (module doc). Δ is piecewise constant in g, so
    ``preconditioner(..., "tangent" | "secant")`` raises :class:`~optimizers.UpdateJumpError`;
    ``"sgd"`` gives the proxy ``Scalar(-lr)``.

    Example:
        >>> import optimizers
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        >>> opt = torch.optim.Rprop([w], lr=0.01)
        >>> w.grad = torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64); opt.step()
        >>> g = torch.tensor([0.2, 0.4, 0.0], dtype=torch.float64); w.grad = g
        >>> lin = optimizers.linearize(opt, copy_state=True)
        >>> lin.update(w, g).tolist()          # same sign: 1.2 σ; sign change: skipped; g = 0: 0
        [-0.012, -0.0, -0.0]
        >>> lin.tangent(w, g).tolist()
        [0.0, 0.0, 0.0]
        >>> lin.preconditioner(w, g, "sgd")
        Scalar(-0.01)
        >>> lin.preconditioner(w, g, "secant")
        Traceback (most recent call last):
        ...
        optimizers._autograd.UpdateJumpError: Rprop's update is piecewise constant in the gradient ...
        >>> expected = w.detach() + lin.update(w, g)
        >>> opt.step(); torch.equal(w.detach(), expected)
        True
    """

    @classmethod
    def momentum_credit_refusal(cls, state):
        return None  # the step sizes depend on signs, not on a gradient buffer; Δ(0) = 0

    @classmethod
    def read_state(cls, param, state, group) -> RpropState:
        etaminus, etaplus = group["etas"]
        lo, hi = group["step_sizes"]
        return RpropState(
            lr=as_float(group["lr"]),
            etaminus=float(etaminus),
            etaplus=float(etaplus),
            step_size_min=float(lo),
            step_size_max=float(hi),
            maximize=bool(group["maximize"]),
            prev=state_tensor(state, "prev"),
            step_size=state_tensor(state, "step_size"),
        )

    @classmethod
    def update_rule(cls, theta, grad, st: RpropState):
        # torch's single-tensor algorithm, out of place (torch.where instead of masked assignment).
        g = -grad if st.maximize else grad
        prev = torch.zeros_like(g) if st.prev is None else st.prev
        size = torch.full_like(g, st.lr) if st.step_size is None else st.step_size
        sign = torch.sign(g * prev)
        factor = torch.where(sign > 0, st.etaplus, torch.where(sign < 0, st.etaminus, torch.ones_like(g)))
        size = torch.clamp(size * factor, st.step_size_min, st.step_size_max)
        g = torch.where(sign < 0, torch.zeros_like(g), g)
        return -(torch.sign(g) * size)

    @classmethod
    def tangent_rule(cls, theta, grad, st: RpropState):
        return torch.zeros_like(grad)  # piecewise constant (module doc)

    @classmethod
    def secant_rule(cls, theta, grad, st: RpropState):
        # Δ(0) = −sign(0)·σ' = 0, so the chord is Δ(g)/g; the tangent (0) where g = 0.
        zero = grad == 0
        return torch.where(zero, torch.zeros_like(grad), cls.update_rule(theta, grad, st) / torch.where(zero, torch.ones_like(grad), grad))

    def preconditioner(self, param: torch.Tensor, grad: torch.Tensor, kind: Any = "tangent") -> Preconditioner:
        """``"sgd"``: ``Scalar(-lr)``; ``"tangent"`` and ``"secant"`` are refused (module doc).

        Raises:
            UpdateJumpError: ``kind`` is ``"tangent"`` or ``"secant"``.
            ValueError, KeyError, StaleStateError: as the base class.
        Example:
            >>> import optimizers
            >>> w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)); w.grad = torch.ones(2, dtype=torch.float64)
            >>> optimizers.linearize(torch.optim.Rprop([w], lr=0.05)).preconditioner(w, w.grad, "sgd")
            Scalar(-0.05)
        """
        name = str(getattr(kind, "value", kind))
        if name in ("tangent", "secant"):
            self._state_of(param)  # KeyError / StaleStateError first, as for every other kind
            raise UpdateJumpError(
                f"Rprop's update is piecewise constant in the gradient (Δ = −sign(g)·step_size, with step sizes "
                f"adapted by sign(g·prev)), so its {name} is useless as a first-order value: the tangent is 0 "
                "almost everywhere and the secant misses the jump of sign(g) at 0. Value Rprop steps with the "
                "exact update of each coalition (validation.leave_one_out, or the exact Shapley value of "
                "`validation`), or use the SGD proxy (linearization=\"sgd\", J = −lr)."
            )
        return super().preconditioner(param, grad, kind)

    @classmethod
    def symbolic_update(cls, g, theta, st: RpropState) -> sympy.Expr:
        # Literal transcription of torch.optim.rprop._single_tensor_rprop, with sign() written as a
        # Piecewise (sympy's sign' = 2 DiracDelta; torch's and this model's derivative is 0).
        def sign(x):
            return sympy.Piecewise((1, x > 0), (-1, x < 0), (0, True))

        def clamp(x):
            return sympy.Min(sympy.Max(x, st.step_size_min), st.step_size_max)

        grad = -g if st.maximize else g
        prev = 0 if st.prev is None else st.prev
        size = st.lr if st.step_size is None else st.step_size
        product = grad * prev
        return sympy.Piecewise(
            (-sign(grad) * clamp(size * st.etaplus), product > 0),  # same sign: grow the step
            (sympy.Integer(0), product < 0),  # sign change: step size shrinks, grad masked to 0
            (-sign(grad) * clamp(size), True),  # g·prev = 0: factor 1
        )

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        return {
            "lr": rng.choice([1e-3, 0.01, 0.1]),
            "etas": rng.choice([(0.5, 1.2), (0.3, 2.0)]),
            "step_sizes": rng.choice([(1e-6, 50.0), (1e-3, 0.05)]),
            "maximize": rng.random() < 0.3,
        }

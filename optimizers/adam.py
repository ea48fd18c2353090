"""Adam and AdamW (``torch.optim.Adam``, ``torch.optim.AdamW``).

Per coordinate, with s = −1 under ``maximize`` (else 1), g̃ = s·g (+ λθ for L2 decay),
t = step + 1, b1 = 1 − β1^t, b2 = 1 − β2^t:

    m' = β1 m + (1 − β1) g̃          v' = β2 v + (1 − β2) g̃²        (AMSGrad: v' ← max(v_max, v'))
    D  = √(v'/b2)                    Δ  = −(η/b1) · m' / (D + ε)  [ − ηλθ for decoupled decay ]

Tangent. Differentiating and cancelling the g̃² terms exactly (they cancel in closed form, so
the result keeps full precision even at step 1 where the two textbook terms nearly cancel):

    ∂Δ/∂g̃ = −(η/b1) · [ (1 − β1) ε + ((1 − β1) β2 v − (1 − β2) β1 m g̃) / (b2 D) ] / (D + ε)²

Where D = 0 (v = 0 and g̃ = 0: a coordinate whose gradient has always been 0) the fraction is
0/0; its limit along g̃ → 0 with v = m = 0 is 0, so the tangent is −η(1 − β1)/(b1 ε): finite.
Under AMSGrad with v_max > v', D does not depend on g and ∂Δ/∂g̃ = −(η/b1)(1 − β1)/(D + ε).

Secant. Write a = g̃ at g = 0 (λθ under L2 decay, else 0), b = g̃, D0 = D(a), Dg = D(b). Then

    (Δ(b) − Δ(a))/(b − a) = −(η/b1) · [ (1 − β1) ε + N / (b2 (D0 + Dg)) ] / ((D0 + ε)(Dg + ε))
    N = (1 − β1) β2 v − (1 − β2) β1 m (a + b) + (1 − β1) (√(v'(a) v'(b)) − (1 − β2) a b)

and the last bracket is formed without cancellation (``root_product_gap``). At a = b it is the
tangent. Under AMSGrad, where v_max exceeds both second moments the denominator is constant
and the chord is −(η/b1)(1 − β1)/(D + ε); where v_max lies between them the change of
max(v_max, v') is formed directly. The secant in g is s times the chord in g̃.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch

from ._algebra import root_product_gap, safe_div
from ._fused import Kernel
from ._preconditioner import shard_like, shards_of
from ._base import (
    OptimizerLinearization,
    ParamState,
    UnsupportedOptimizerError,
    as_float,
    first_moment_prediction,
    state_tensor,
    zeros_or,
)


# -- fused kernels (optimizers._fused): the two formulas every tracked step evaluates ------------
def adam_secant(b, m, v, c):
    """The secant from zero (:meth:`_AdamFamily._secant_from_zero`) in one pass; ``c`` = [β1, β2, b2, ε, −η/b1]."""
    beta1, beta2, b2, eps, scale = c.unbind()
    u = v * (beta2 / b2)
    da = u.sqrt()
    db = (u + (1 - beta2) / b2 * b * b).sqrt()
    s = da + db
    frac = torch.where(s == 0, 0.0, m * b / s) / (da + eps)
    return ((1 - beta1) - (1 - beta2) * beta1 / b2 * frac) / (db + eps) * scale


def adam_chord_shift(theta, m, v, J, g, c):
    """Δ(0) + s·J ⊙ g in one pass (AdamW or Adam without L2); ``c`` = [β1, β2, b2, ε, −η/b1, −ηλ, s]."""
    return adam_zero_shift(theta, m, v, c[:6]) + c[6] * J * g


def adam_zero_shift(theta, m, v, c):
    """Δ(0) in one pass (AdamW or Adam without L2); ``c`` = [β1, β2, b2, ε, −η/b1, −ηλ]."""
    beta1, beta2, b2, eps, scale, decay = c.unbind()
    return beta1 * m / ((beta2 * v / b2).sqrt() + eps) * scale + decay * theta


def _eager_chord_shift(theta, m, v, J, g, c):
    """:func:`adam_chord_shift` in eager torch: seven passes (``zero_update`` and an ``addcmul`` take ten)."""
    beta1, beta2, b2, eps, scale, decay, s = c
    out = torch.div(m, torch.mul(v, beta2 / b2).sqrt_().add_(eps)).mul_(beta1 * scale)
    if decay != 0:
        out.add_(theta, alpha=decay)
    return out.addcmul_(J, g, value=s)


def _eager_zero_shift(theta, m, v, c):
    """:func:`adam_zero_shift` in eager torch (four passes, two fresh buffers)."""
    beta1, beta2, b2, eps, scale, decay = c
    out = torch.div(m, torch.mul(v, beta2 / b2).sqrt_().add_(eps)).mul_(beta1 * scale)
    return out.add_(theta, alpha=decay) if decay != 0 else out


_SECANT = Kernel(adam_secant)
_CHORD_SHIFT = Kernel(adam_chord_shift)
_ZERO_SHIFT = Kernel(adam_zero_shift)


@dataclasses.dataclass(frozen=True)
class AdamState(ParamState):
    """Frozen state of one parameter under Adam/AdamW; ``step`` counts steps already taken.

    Attributes:
        lr, beta1, beta2, eps, weight_decay: η, β1, β2, ε, λ (Python floats).
        decoupled_weight_decay: True for AdamW (decay −ηλθ outside the moments).
        amsgrad, maximize: the group's flags.
        step: steps already taken (the update about to happen uses t = step + 1).
        exp_avg, exp_avg_sq, max_exp_avg_sq: m, v and AMSGrad's running max of v, each of shape
            ``param.shape``, or ``None`` before the first step (torch's zeros).

    Example:
        >>> st = AdamState(lr=1e-3)
        >>> st.step, st.exp_avg is None, (st.beta1, st.beta2)
        (0, True, (0.9, 0.999))
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    amsgrad: bool = False
    maximize: bool = False
    step: int = 0
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    max_exp_avg_sq: torch.Tensor | None = None


class _AdamFamily(OptimizerLinearization):
    """Shared maths of Adam and AdamW; the two registered classes differ only in ``read_state``."""

    momentum_buffer = "exp_avg"

    @classmethod
    def momentum_coefficients(cls, state):
        gain = 1.0 - state.beta1
        return state.beta1, -gain if state.maximize else gain

    @classmethod
    def read_state(cls, param, state, group) -> AdamState:
        if any(isinstance(b, torch.Tensor) and b.requires_grad for b in group["betas"]):
            raise UnsupportedOptimizerError("betas that require grad (differentiable=True) are not modelled")
        step = state.get("step", 0)

        return AdamState(
            lr=as_float(group["lr"]),
            beta1=as_float(group["betas"][0]),
            beta2=as_float(group["betas"][1]),
            eps=float(group["eps"]),
            weight_decay=as_float(group["weight_decay"]),
            decoupled_weight_decay=cls._decoupled(group),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
            step=int(as_float(step)),
            exp_avg=state_tensor(state, "exp_avg"),
            exp_avg_sq=state_tensor(state, "exp_avg_sq"),
            max_exp_avg_sq=state_tensor(state, "max_exp_avg_sq") if group["amsgrad"] else None,
        )

    @classmethod
    def _decoupled(cls, group) -> bool:
        return bool(group.get("decoupled_weight_decay", False))

    # -- pieces shared by update, tangent and secant -------------------------------------
    @staticmethod
    def _effective_grad(theta, grad, st: AdamState):
        g = -grad if st.maximize else grad
        if st.weight_decay != 0 and not st.decoupled_weight_decay:
            g = g + st.weight_decay * theta
        return g

    @staticmethod
    def _moments(g, st: AdamState):
        """m', v' (before AMSGrad's max) and the bias corrections b1, b2."""
        t = st.step + 1
        m = zeros_or(st.exp_avg, g)
        v = zeros_or(st.exp_avg_sq, g)
        m_new = st.beta1 * m + (1 - st.beta1) * g
        v_new = st.beta2 * v + (1 - st.beta2) * g * g
        return m, v, m_new, v_new, 1 - st.beta1**t, 1 - st.beta2**t

    @classmethod
    def _second_moment(cls, v_new, st: AdamState):
        if st.amsgrad:
            return torch.maximum(zeros_or(st.max_exp_avg_sq, v_new), v_new)
        return v_new

    @classmethod
    def update_rule(cls, theta, grad, st: AdamState):
        # torch's order of operations, in place on fresh buffers (never on the inputs): the
        # look-ahead and midpoint validation points call this once or twice per tracked step.
        g = cls._effective_grad(theta, grad, st)
        t = st.step + 1
        b1, b2 = 1 - st.beta1**t, 1 - st.beta2**t
        # Out of place first, so that a stack of gradients [m, *shape] broadcasts against the state.
        m_new = torch.add(torch.mul(zeros_or(st.exp_avg, g), st.beta1), g, alpha=1 - st.beta1)
        v_new = torch.addcmul(torch.mul(zeros_or(st.exp_avg_sq, g), st.beta2), g, g, value=1 - st.beta2)
        denom = cls._second_moment(v_new, st).div_(b2).sqrt_().add_(st.eps)
        delta = m_new.div_(denom).mul_(-(st.lr / b1))
        if st.weight_decay != 0 and st.decoupled_weight_decay:
            delta = delta - st.lr * st.weight_decay * theta
        return delta

    @staticmethod
    def _zero_is_momentum(st: AdamState) -> bool:
        """Whether Δ(0) is momentum and decoupled decay only (no AMSGrad maximum, no L2 term in g̃(0))."""
        return not st.amsgrad and (st.weight_decay == 0 or st.decoupled_weight_decay)

    @classmethod
    def zero_update_rule(cls, theta, st: AdamState):
        if not cls._zero_is_momentum(st):
            return super().zero_update_rule(theta, st)
        # g = 0 without an L2 term: m' = β1 m and v' = β2 v, the same operations as update_rule
        # (so the same bits) without the passes over a zero gradient.
        t = st.step + 1
        b1, b2 = 1 - st.beta1**t, 1 - st.beta2**t
        if st.exp_avg is None:
            delta = torch.zeros_like(theta)
        else:
            denom = torch.mul(st.exp_avg_sq, st.beta2).div_(b2).sqrt_().add_(st.eps)
            delta = torch.mul(st.exp_avg, st.beta1).div_(denom).mul_(-(st.lr / b1))
        if st.weight_decay != 0:
            delta = delta - st.lr * st.weight_decay * theta
        return delta

    def predicted_gradient(self, param):
        return first_moment_prediction(param, self._state_of(param))

    def chord_shift(self, param, J, grad, scale):
        st = self._state_of(param)
        if J.shape == param.shape:
            inputs = (param.detach(), st.exp_avg, st.exp_avg_sq, J, grad.detach())
            # On an FSDP2 parameter, this rank's shards (the kernel is elementwise), wrapped back.
            fused = self._fused_zero(st, _CHORD_SHIFT, _eager_chord_shift, shards_of(*inputs) or inputs, (scale,))
            if fused is not None:
                return shard_like(fused, param)
        return super().chord_shift(param, J, grad, scale)

    def chord_shift_on_rows(self, param, J, grad, scale):
        st = self._state_of(param)
        if type(param.data) is torch.Tensor:  # (not an FSDP2 shard: rows are global indices)
            zero = self._fused_zero(st, _ZERO_SHIFT, _eager_zero_shift, (param.detach(), st.exp_avg, st.exp_avg_sq))
            if zero is not None:
                return self._add_chord_on_rows(zero, J, grad, scale)
        return super().chord_shift_on_rows(param, J, grad, scale)

    def _fused_zero(self, st: AdamState, kernel, eager, inputs, extra=()):
        """A one-pass formula that starts from Δ(0) (``c`` = [β1, β2, b2, ε, −η/b1, −ηλ, *extra]).

        The compiled ``kernel``, else its ``eager`` form on float32/float64 inputs of one dtype;
        ``None`` where Δ(0) is not momentum and decoupled decay only, before the first step, or in
        half precision (the caller's promoting path).
        """
        if not (self._zero_is_momentum(st) and st.exp_avg is not None and st.exp_avg_sq is not None):
            return None
        t = st.step + 1
        b1, b2 = 1 - st.beta1**t, 1 - st.beta2**t
        c = (st.beta1, st.beta2, b2, st.eps, -(st.lr / b1), -st.lr * st.weight_decay, *extra)
        out = kernel(*inputs, c)
        if out is None and len({x.dtype for x in inputs}) == 1 and inputs[0].dtype in (torch.float32, torch.float64):
            out = eager(*inputs, c)
        return out

    @classmethod
    def tangent_rule(cls, theta, grad, st: AdamState):
        # In place on fresh buffers (never on the inputs): these passes are memory-bound.
        sign = -1.0 if st.maximize else 1.0
        g = cls._effective_grad(theta, grad, st)
        t = st.step + 1
        b1, b2 = 1 - st.beta1**t, 1 - st.beta2**t
        m, v = zeros_or(st.exp_avg, g), zeros_or(st.exp_avg_sq, g)
        v_new = torch.addcmul(torch.mul(v, st.beta2), g, g, value=1 - st.beta2)
        d = torch.div(cls._second_moment(v_new, st), b2).sqrt_()
        numer = torch.addcmul(torch.mul(v, (1 - st.beta1) * st.beta2), m, g, value=-(1 - st.beta2) * st.beta1)
        # D = 0 only where v = 0 and g = 0: the numerator is 0 too and the limit is 0 (module doc).
        den = d * b2
        frac = numer.div_(den).masked_fill_(den == 0, 0.0)
        d_eps = d.add_(st.eps)
        through_v = frac.add_((1 - st.beta1) * st.eps).div_(d_eps * d_eps)
        if st.amsgrad:
            # Where the stored max wins, the denominator does not depend on g.
            vmax = zeros_or(st.max_exp_avg_sq, v_new)
            through_v = torch.where(vmax > v_new, (1 - st.beta1) / d_eps, through_v)
        return through_v.mul_(-(st.lr / b1) * sign)

    @classmethod
    def secant_rule(cls, theta, grad, st: AdamState):
        if not st.amsgrad and (st.weight_decay == 0 or st.decoupled_weight_decay):
            return cls._secant_from_zero(grad, st)
        sign = -1.0 if st.maximize else 1.0
        a = cls._effective_grad(theta, torch.zeros_like(grad), st)  # g̃ at g = 0
        b = cls._effective_grad(theta, grad, st)
        m, v, ma_new, va_new, b1, b2 = cls._moments(a, st)
        _, _, _, vb_new, _, _ = cls._moments(b, st)
        da = torch.sqrt(cls._second_moment(va_new, st) / b2)
        db = torch.sqrt(cls._second_moment(vb_new, st) / b2)
        # Plain Adam: the chord's numerator N over b2 (D0 + Dg), cancellation-free (module doc).
        n = (
            (1 - st.beta1) * st.beta2 * v
            - (1 - st.beta2) * st.beta1 * m * (a + b)
            + (1 - st.beta1) * root_product_gap(st.beta2 * v, 1 - st.beta2, a, b)
        )
        bracket = (1 - st.beta1) * st.eps + safe_div(n, b2 * (da + db))
        if st.amsgrad:
            vmax = zeros_or(st.max_exp_avg_sq, va_new)
            # Stored max above both second moments: the denominator is constant.
            frozen = (1 - st.beta1) * (da + st.eps)
            # Stored max in between: form the change of max(v_max, v') directly (rare).
            dg = b - a
            safe_dg = torch.where(dg != 0, dg, torch.ones_like(dg))
            change = torch.maximum(vmax, vb_new) - torch.maximum(vmax, va_new)
            mixed = (1 - st.beta1) * (da + st.eps) - ma_new * safe_div(change / (b2 * safe_dg), da + db)
            bracket = torch.where(
                vmax <= torch.minimum(va_new, vb_new),
                bracket,
                torch.where(vmax >= torch.maximum(va_new, vb_new), frozen, mixed),
            )
        chord = -(st.lr / b1) * sign * bracket / ((db + st.eps) * (da + st.eps))
        return torch.where(grad != 0, chord, cls.tangent_rule(theta, grad, st))

    @staticmethod
    def _secant_from_zero(grad, st: AdamState):
        """The secant when g̃ at g = 0 is 0 (no L2 term) and without AMSGrad: the common case, fast.

        With a = 0, u = β2 v / b2, D0 = √u and Dg = √(u + (1 − β2) b² / b2), the chord is

            (Δ(b) − Δ(0)) / b = −(η/b1) · [ (1 − β1) − (1 − β2) β1 m b / (b2 (D0 + Dg) (D0 + ε)) ] / (Dg + ε),

        since (Dg − D0) / b = (1 − β2) b / (b2 (D0 + Dg)): no subtraction of nearly equal terms
        remains, and at b = 0 it is the tangent exactly. Fifteen elementwise passes and a mask
        (this runs once per parameter per tracked step).
        """
        # In-place arithmetic on fresh buffers (never on the inputs): these passes are memory-bound.
        b = -grad if st.maximize else grad
        sign = -1.0 if st.maximize else 1.0
        t = st.step + 1
        b1, b2 = 1 - st.beta1**t, 1 - st.beta2**t
        if st.exp_avg is not None and st.exp_avg_sq is not None:
            fused = _SECANT(b, st.exp_avg, st.exp_avg_sq, (st.beta1, st.beta2, b2, st.eps, -(st.lr / b1) * sign))
            if fused is not None:
                return fused
        m = zeros_or(st.exp_avg, b)
        u = torch.mul(zeros_or(st.exp_avg_sq, b), st.beta2 / b2)
        da = torch.sqrt(u)
        db = u.addcmul_(b, b, value=(1 - st.beta2) / b2).sqrt_()
        # m b / (D0 + Dg) is 0/0 where D0 + Dg = 0 (v = 0 and g = 0, or g² underflowing), limit 0.
        # The mask is kept although it costs about 1 ms on a 512 × 512 tensor here: adding the smallest
        # normal number instead would divide a nonzero subnormal m·b by it where g² underflows.
        s = torch.add(da, db)
        frac = torch.mul(m, b).div_(s).masked_fill_(s == 0, 0.0).div_(da.add_(st.eps))
        bracket = frac.mul_(-(1 - st.beta2) * st.beta1 / b2).add_(1 - st.beta1)
        return bracket.div_(db.add_(st.eps)).mul_(-(st.lr / b1) * sign)

    @classmethod
    def symbolic_update(cls, g, theta, st: AdamState) -> sympy.Expr:
        # Literal transcription of torch.optim.adam._single_tensor_adam.
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
        m = st.beta1 * m + (1 - st.beta1) * grad
        v = st.beta2 * v + (1 - st.beta2) * grad**2
        if st.amsgrad:
            vmax = 0 if st.max_exp_avg_sq is None else st.max_exp_avg_sq
            v = sympy.Piecewise((v, v >= vmax), (vmax, True))
        step_size = st.lr / (1 - st.beta1**t)
        denom = sympy.sqrt(v) / sympy.sqrt(1 - st.beta2**t) + st.eps
        return decay - step_size * m / denom

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        return {
            "lr": rng.choice([1e-3, 0.01, 0.1]),
            "betas": (rng.choice([0.0, 0.5, 0.9]), rng.choice([0.9, 0.999])),
            "eps": rng.choice([1e-8, 1e-3]),
            "weight_decay": rng.choice([0.0, 0.1]),
            "amsgrad": rng.random() < 0.4,
            "maximize": rng.random() < 0.3,
        }


class AdamLinearization(_AdamFamily, optimizer=torch.optim.Adam):
    """Linearization of ``torch.optim.Adam`` (L2 weight decay, or decoupled with ``decoupled_weight_decay=True``).

    Δ = −(η/b1) m'/(√(v'/b2) + ε) (module doc), with ``maximize``, AMSGrad and both kinds of
    weight decay. Tangent and secant are the closed forms of the module doc, finite everywhere
    (the 0/0 limit at v = g = 0 is written out). At step 1, Δ ≈ −η sign(g): the tangent
    collapses toward 0 where |g| ≫ ε while the secant stays ≈ −η/|g|.

    Example (step 1: ``update`` is sign descent; tangent ≈ 0, secant ≈ −η/|g|):
        >>> import optimizers
        >>> w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        >>> opt = torch.optim.Adam([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, -2.0], dtype=torch.float64)
        >>> lin = optimizers.linearize(opt)
        >>> [round(x, 6) for x in lin.update(w, w.grad).tolist()]
        [-0.1, 0.1]
        >>> [round(x, 6) for x in lin.tangent(w, w.grad).tolist()]
        [-0.0, -0.0]
        >>> [round(x, 6) for x in lin.secant(w, w.grad).tolist()]
        [-0.2, -0.05]
    """

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        return {**super().sample_hyperparameters(rng), "decoupled_weight_decay": rng.random() < 0.25}


class AdamWLinearization(_AdamFamily, optimizer=torch.optim.AdamW):
    """Linearization of ``torch.optim.AdamW``: Adam plus the decoupled decay −ηλθ (independent of g).

    The decay term is constant in g, so it is in Δ(0) (and in U(∅)) but not in J: tangent and
    secant equal Adam's without weight decay.

    Example (same slopes as Adam; ``update`` differs by exactly −ηλθ):
        >>> import optimizers
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> g = torch.tensor([0.3, -0.1], dtype=torch.float64)
        >>> w.grad = g
        >>> adamw = optimizers.linearize(torch.optim.AdamW([w], lr=0.1, weight_decay=0.01))
        >>> adam = optimizers.linearize(torch.optim.Adam([w], lr=0.1))
        >>> torch.allclose(adamw.tangent(w, g), adam.tangent(w, g))
        True
        >>> torch.allclose(adamw.update(w, g) - adam.update(w, g), -0.1 * 0.01 * w.detach())
        True
    """

    @classmethod
    def _decoupled(cls, group) -> bool:
        return True

"""Muon (``torch.optim.Muon``): orthogonalised momentum, an operator rule (J couples all entries).

For a matrix parameter θ of shape ``[A, B]`` (Muon accepts 2-D parameters only), with the
momentum buffer B_{t-1} (zeros before the first step: torch creates it in ``_init_group``),
momentum μ, coefficients (a, b, c), k = ``ns_steps``, ε = ``eps``, torch's
``_single_tensor_muon`` computes

    B' = lerp(B_{t-1}, g, 1 − μ) = μ B_{t-1} + (1 − μ) g          (``buf.lerp_``)
    X  = lerp(g, B', μ) = (1 − μ) g + μ B'   (Nesterov),   X = B'   otherwise
    O  = NS_k(X):  Y ← X (transposed if A > B),  Y ← Y / max(‖Y‖_F, ε),
                   k times:  G = Y Yᵀ,  Y ← a Y + (b G + c G G) Y;   transposed back
    Δ  = −η λ θ − η' O,   η' = η·√max(1, A/B) (``adjust_lr_fn`` None / "original"),
                          η' = 0.2 η √max(A, B) ("match_rms_adamw")

(torch's docstring writes B_t = μ B_{t−1} + g; the code, modelled here, uses ``lerp``, i.e. the
(1 − μ)-dampened buffer.) O couples every entry of g, so J = ∂Δ/∂g is a dense linear map of the
matrix: ``structure = "operator"``, and estimators get J only through
``lin.preconditioner(param, grad, kind).apply(v)`` (VJPs of :meth:`MuonLinearization.update_rule`).

**The ground truth is an exact-arithmetic twin.** torch runs Newton–Schulz in bfloat16 (its
``_zeropower_via_newtonschulz`` starts with ``grad.bfloat16()``), which is neither smooth nor
differentiable. :meth:`MuonLinearization.update_rule` runs the *same* iteration, operation for
operation, in the input dtype (float64 in the tests), so Δ, its VJP (tangent) and its
Aumann–Shapley path integral (secant) are those of that twin, not of the rounded step.
Against torch's own code path with its Newton–Schulz function replaced by a float64 copy
(``optimizers.conformance.float64_newton_schulz``) the twin agrees to 1e-10 (measured worst
~4e-15). Against the real bf16 ``step()``, over 3000 random states (shapes 1×4 … 8×8, 1 to 5 NS
steps, the default and the cubic coefficients), the relative error ‖Δ_twin − Δ_torch‖_F / ‖η' O‖_F
had median 3.9e-3, 99th percentile 3.3e-2 and worst 0.32. The large gaps are where NS is
ill-conditioned: bfloat16 rounds X to u = 2^-8 of its norm and the quintic has slope ~488 at 0,
so a small singular value of X is rounded into an O(1) one. A rank-deficient gradient, such as a
classifier head's under cross-entropy (its rows sum to 0), is the common case: there the real
step orthogonalises rounding noise and differs from the twin by 20–50 %. The conformance check
therefore divides the error by max(1, κ), κ the relative condition number of the twin's NS at X;
that ratio was at most 6.4·u, and 16·u (``optimizers.conformance.BF16_TOLERANCE``) is accepted.

**Secant.** Along s·g, X(s) = X0 + s D is affine and NS depends on s through X(s)/‖X(s)‖, whose
singularities are the complex roots of ‖X(s)‖² = 0. When the gradient is large against the buffer
they lie close to s = 0, and one Gauss–Legendre rule on [0, 1] needs hundreds of nodes (or does not
converge within 64). ``preconditioner(..., "secant")`` therefore integrates piecewise on points
graded towards them (:meth:`MuonLinearization.path_breakpoints`,
:func:`optimizers._piecewise.piecewise_secant`), each piece efficiency-checked and bisected if it
does not converge. On a small MLP, steps 2 to 6: 1 to 6 pieces, 32 to 184 nodes in all, efficiency
gaps 2e-16 to 4e-10.

**First step.** With an empty buffer X = (1 − μ)(1 + μ) g (Nesterov) or (1 − μ) g, so
NS(X(s g)) = NS(X(g)) for every s > 0 with ‖X(s g)‖ > ε: Δ jumps at g = 0 (Δ(0) = −ηλθ). The
tangent is defined (and used), but the secant path integral would miss the jump, and
``preconditioner(..., "secant")`` raises :class:`~optimizers.UpdateJumpError` (the generic jump
check of the operator secant). The same holds at every step when μ = 0.

Example (the twin's step is the real bf16 step to a few percent here, never exactly):
    >>> import torch, optimizers
    >>> _ = torch.manual_seed(0); w = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    >>> opt = torch.optim.Muon([w], lr=0.02)
    >>> w.grad = torch.randn(3, 4, dtype=torch.float64)
    >>> lin = optimizers.linearize(opt, copy_state=True)
    >>> delta = lin.update(w, w.grad)
    >>> before = w.detach().clone(); opt.step()
    >>> gap = torch.linalg.norm(w.detach() - before - delta) / torch.linalg.norm(delta)
    >>> bool(1e-4 < gap < 0.1)     # about 3e-2 here: bfloat16 rounding, amplified by the iteration
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ._base import (
    OptimizerLinearization,
    ParamState,
    UnsupportedOptimizerError,
    as_float,
)
from ._piecewise import graded_points

_DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@dataclasses.dataclass(frozen=True)
class MuonState(ParamState):
    """Frozen state of one matrix parameter under ``torch.optim.Muon``.

    Attributes:
        lr, weight_decay, momentum: η, λ, μ of the parameter's group (Python floats).
        nesterov: the group's flag.
        ns_coefficients: (a, b, c) of the quintic Newton–Schulz iteration.
        ns_steps: k, the number of iterations.
        eps: ε, the floor of the Frobenius norm the iteration divides by.
        adjust_lr_fn: ``None``, ``"original"`` or ``"match_rms_adamw"`` (η' in the module doc).
        momentum_buffer: B_{t-1}, shape ``[A, B]`` like the parameter, or ``None`` before the
            first step (torch's zeros).

    Example:
        >>> st = MuonState(lr=0.02)
        >>> st.momentum, st.nesterov, st.ns_steps, st.momentum_buffer is None
        (0.95, True, 5, True)
    """

    weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = True
    ns_coefficients: tuple[float, float, float] = _DEFAULT_COEFFICIENTS
    ns_steps: int = 5
    eps: float = 1e-7
    adjust_lr_fn: str | None = None
    momentum_buffer: torch.Tensor | None = None


def newton_schulz(x: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """torch's ``_zeropower_via_newtonschulz`` in the dtype of ``x`` (no bfloat16 cast), out of place.

    Differentiable (``torch.func``) and smooth wherever ‖x‖_F > ε.

    Args:
        x: a matrix ``[A, B]``.
        coefficients: (a, b, c).
        steps: k (torch refuses k ≥ 100).
        eps: the floor of ‖x‖_F.
    Returns:
        NS_k(x), shape ``[A, B]``, dtype of ``x``.
    Raises:
        ValueError: as torch: k ≥ 100, ``x`` not 2-D, or not three coefficients.
    Example (the singular values are pushed towards about 1):
        >>> x = torch.diag(torch.tensor([3.0, 0.5], dtype=torch.float64))
        >>> [round(s, 3) for s in torch.linalg.svdvals(newton_schulz(x, (3.4445, -4.7750, 2.0315), 5, 1e-7)).tolist()]
        [1.042, 0.714]
    """
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if x.dim() != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = coefficients
    tall = x.size(0) > x.size(1)
    y = x.T if tall else x
    y = y / y.norm().clamp(min=eps)
    for _ in range(steps):
        gram = y @ y.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.addmm(y, gram_update, y, beta=a)
    return y.T if tall else y


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size | tuple[int, ...]) -> float:
    """η' of the module doc: torch's ``_adjust_lr`` (any other ``adjust_lr_fn`` gives η, as in torch).

    Example:
        >>> adjusted_lr(0.02, None, (8, 2)), adjusted_lr(0.02, "match_rms_adamw", (4, 9))
        (0.04, 0.012000000000000002)
    """
    A, B = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, A / B))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(A, B))
    else:
        ratio = 1.0
    return lr * ratio


class MuonLinearization(OptimizerLinearization, optimizer=torch.optim.Muon):
    """Linearization of ``torch.optim.Muon`` with an exact-arithmetic Newton–Schulz (module doc).

    ``update`` is Δ(g) of the float twin (shape ``[A, B]``); ``preconditioner(param, g, kind)``
    gives the tangent Jᵀ v (one VJP) and the secant ∫₀¹ J(s g)ᵀ v ds (Gauss–Legendre, efficiency
    checked; :class:`~optimizers.UpdateJumpError` at the first step and whenever μ = 0).
    ``tangent``/``secant`` (elementwise slopes) raise ``TypeError``: J is not diagonal.

    Example (after one step the secant's values add up to the step's change):
        >>> import optimizers
        >>> _ = torch.manual_seed(0); w = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        >>> opt = torch.optim.Muon([w], lr=0.02)
        >>> w.grad = torch.randn(3, 4, dtype=torch.float64); opt.step()
        >>> g = torch.randn(3, 4, dtype=torch.float64); w.grad = g
        >>> lin = optimizers.linearize(opt)
        >>> v = torch.randn(3, 4, dtype=torch.float64)
        >>> P = lin.preconditioner(w, g, "secant")
        >>> change = lin.update(w, g) - lin.update(w, torch.zeros_like(g))
        >>> bool(abs((P.apply(v) * g).sum() - (v * change).sum()) < 1e-9 * v.norm() * change.norm())
        True
        >>> P.diagnostics["efficiency_gap"] < 1e-9, lin.preconditioner(w, g, "tangent").kind
        (True, 'operator')
    """

    structure = "operator"
    # Under fully_shard every operation of update_rule is a DTensor operation: the products and
    # norms of Newton–Schulz gather (or all-reduce) what they couple, so Δ and its VJPs are those
    # of the whole matrix (float64 values equal one process's to ~1e-17, test_fsdp.py).
    dtensor_update = True
    #: Muon has no ``foreach``/``fused``/``capturable``/``differentiable`` paths; a group that sets
    #: one of them (by hand) is refused rather than assumed to behave like the single-tensor path.
    refused_flags = ("capturable", "differentiable", "foreach", "fused")
    #: Parameter shapes the conformance check draws (Muon refuses anything but matrices).
    conformance_shapes = ((3, 5), (5, 3), (4, 4), (2, 7), (1, 4))

    @classmethod
    def momentum_credit_refusal(cls, state):
        return (
            "Muon orthogonalises its momentum buffer (Newton–Schulz), so the carried part of the update is not "
            "linear in the buffer"
        )

    @classmethod
    def read_state(cls, param, state, group) -> MuonState:
        if param.dim() != 2:
            raise UnsupportedOptimizerError(
                f"Muon models 2-D parameters only, got a parameter of shape {tuple(param.shape)} "
                "(torch.optim.Muon refuses others too)"
            )
        buf = state.get("momentum_buffer")
        return MuonState(
            lr=as_float(group["lr"]),
            weight_decay=as_float(group["weight_decay"]),
            momentum=as_float(group["momentum"]),
            nesterov=bool(group["nesterov"]),
            ns_coefficients=tuple(float(c) for c in group["ns_coefficients"]),
            ns_steps=int(group["ns_steps"]),
            eps=float(group["eps"]),
            adjust_lr_fn=group["adjust_lr_fn"],
            momentum_buffer=None if buf is None else buf.detach(),
        )

    @staticmethod
    def _direction(grad: torch.Tensor, st: MuonState) -> torch.Tensor:
        """X, the matrix Newton–Schulz orthogonalises (module doc); affine in g."""
        buf = torch.zeros_like(grad) if st.momentum_buffer is None else st.momentum_buffer
        buf_new = torch.lerp(buf, grad, 1 - st.momentum)
        return torch.lerp(grad, buf_new, st.momentum) if st.nesterov else buf_new

    @classmethod
    def update_rule(cls, theta, grad, st: MuonState):
        """Δ(g) of the exact twin (module doc); ``theta``, ``grad``, the buffer: ``[A, B]``, one dtype.

        Example (first step, μ = 0.95, Nesterov: Δ does not change when g is scaled):
            >>> th = torch.zeros(2, 3, dtype=torch.float64)
            >>> g = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]], dtype=torch.float64)
            >>> st = MuonState(lr=0.1, weight_decay=0.0)
            >>> torch.allclose(MuonLinearization.update_rule(th, g, st), MuonLinearization.update_rule(th, 7 * g, st))
            True
        """
        ortho = newton_schulz(cls._direction(grad, st), st.ns_coefficients, st.ns_steps, st.eps)
        delta = ortho * -adjusted_lr(st.lr, st.adjust_lr_fn, theta.shape)
        if st.weight_decay != 0:
            delta = delta - (st.lr * st.weight_decay) * theta
        return delta

    @classmethod
    def path_breakpoints(cls, theta: torch.Tensor, grad: torch.Tensor, st: MuonState) -> list[float]:
        """Points of (0, 1) where the secant's pieces start (the base class integrates the secant piecewise between them).

        Along s·g the orthogonalised matrix is X(s) = X0 + s D (X is affine in g), and NS depends
        on s through X(s)/‖X(s)‖ (a polynomial of it): its singularities are the complex roots
        s = c ± i h of ‖X(s)‖² = ‖X0‖² + 2s⟨X0, D⟩ + s²‖D‖². Where h is small (the gradient is large
        against the momentum buffer, or X(s) passes near 0) the path is graded towards c
        (:func:`~optimizers._piecewise.graded_points`); the points where ‖X(s)‖ crosses ε (the
        clamp's kinks) are added.

        Returns:
            Sorted points of (0, 1).
        Example (X0 = μ·B ⊥ D = (1 − μ)·g: graded towards c = 0 from h = ‖X0‖/‖D‖ = 0.09):
            >>> st = MuonState(lr=0.02, momentum=0.9, nesterov=False, momentum_buffer=torch.eye(2, dtype=torch.float64))
            >>> g = torch.tensor([[0.0, 100.0], [100.0, 0.0]], dtype=torch.float64)
            >>> [round(s, 4) for s in MuonLinearization.path_breakpoints(torch.zeros(2, 2, dtype=torch.float64), g, st)]
            [0.09, 0.18, 0.36, 0.72]
        """
        with torch.no_grad():
            x0 = cls._direction(torch.zeros_like(grad), st).double()
            dx = cls._direction(grad, st).double() - x0
        a, b, c = float((dx * dx).sum()), float((x0 * dx).sum()), float((x0 * x0).sum())
        if a == 0.0:
            return []
        center = -b / a
        # The distance of the singularity from [0, 1]: ‖X0 + center·D‖/‖D‖ (no cancellation) above the
        # real axis, and how far outside [0, 1] its real part lies.
        height = float(torch.linalg.vector_norm(x0 + center * dx)) / a**0.5
        clipped = min(max(center, 0.0), 1.0)
        points = set(graded_points(clipped, (height**2 + (center - clipped) ** 2) ** 0.5))
        disc = b * b - a * (c - st.eps * st.eps)  # ‖X(s)‖ = ε
        if disc >= 0:
            points.update(r for r in ((-b - disc**0.5) / a, (-b + disc**0.5) / a) if 0.0 < r < 1.0)
        return sorted(points)

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        """Muon keyword arguments covering every modelled setting (the cubic NS iteration included).

        Example:
            >>> import random
            >>> sorted(MuonLinearization.sample_hyperparameters(random.Random(0)))
            ['adjust_lr_fn', 'eps', 'lr', 'momentum', 'nesterov', 'ns_coefficients', 'ns_steps', 'weight_decay']
        """
        return {
            "lr": rng.choice([1e-3, 0.02, 0.1]),
            "weight_decay": rng.choice([0.0, 0.1]),
            "momentum": rng.choice([0.0, 0.5, 0.95]),
            "nesterov": rng.random() < 0.6,
            "ns_coefficients": rng.choice([_DEFAULT_COEFFICIENTS, (1.5, -0.5, 0.0)]),
            "ns_steps": rng.choice([1, 3, 5]),
            "eps": rng.choice([1e-7, 1e-3]),
            "adjust_lr_fn": rng.choice([None, "original", "match_rms_adamw"]),
        }

"""Adafactor (``torch.optim.Adafactor``): a factored second moment and update clipping, an operator rule.

For a parameter θ with N entries, t = step + 1 (steps already taken plus this one), s = −1 under
``maximize`` (else 1), G = s·g, w = t^τ (τ = ``beta2_decay`` ≤ 0; torch's ``one_minus_beta2_t``),
torch's ``_single_tensor_adafactor`` (and, identically, its ``foreach`` path) computes

    ρ = min(η, 1/√t),     α = max(ε2, ‖θ‖/√N)·ρ                    (θ before the decay)
    θ.ndim ≥ 2 (factored over the LAST two dims; R ``[..., n, 1]``, C ``[..., 1, m]``):
        R' = lerp(R, mean_{-1}(G²), w),   C' = lerp(C, mean_{-2}(G²), w)
        V  = R' C' / max(mean_{-2}(R'), ε1)                           (broadcast to θ's shape)
    θ.ndim ≤ 1:   V = lerp(v, G², w)
    U  = G / √max(V, ε1²),    D = max(1, ‖U‖/(√N d))
    Δ  = −ηλθ − (α/D)·U

with ε1 = ``eps[0]`` or, when ``None``, the machine epsilon of the parameter's dtype (torch takes
it from the first parameter with a gradient in the group; a group that mixes dtypes with
ε1 = ``None`` is refused). lerp(a, b, w) = a + w(b − a).

**Operator structure.** For matrices the row and column factors couple every entry of a row
and of a column; for every shape, vectors and scalars included, the clipping factor D couples all
entries once ‖U‖/√N > d. So J = ∂Δ/∂g is not diagonal for any shape, and the class has
``structure = "operator"`` throughout: estimators apply J by VJPs of
:meth:`AdafactorLinearization.update_rule` (``preconditioner(param, grad, kind).apply(v)``).
(Below the clipping threshold a vector's rule is elementwise, but which side of it a step is on
depends on g, so no diagonal shortcut is taken.) ``update_rule`` is computed in the input
dtype with torch's order of operations; it equals the real float64 ``step()`` to 1e-10
(measured: a few ulps).

**Secant.** Δ(s g) is continuous in s but has kinks where the clipping switches on
(‖U(s g)‖/√N = d) or a clamp at ε1 becomes active, and Gauss–Legendre quadrature over a kink
converges only like 1/n². ``preconditioner(..., "secant")`` therefore splits [0, 1] at those
points (found from the closed form of R', C', V along s g) and integrates each piece with the
generic efficiency-checked quadrature (:func:`optimizers._autograd.secant_operator`). At the
first step (R = C = v = 0) V scales like s², so U(s g) = U(g) for every s > ~ε1/|g|: Δ jumps at
g = 0, as Muon's does, and the secant raises :class:`~optimizers.UpdateJumpError` (so does any
step whose factors are 0 along a whole row or column that g now reaches, and ``beta2_decay = 0``).

Example (the update is exactly what ``step()`` does):
    >>> import torch, optimizers
    >>> _ = torch.manual_seed(0); w = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    >>> opt = torch.optim.Adafactor([w], lr=0.01)
    >>> w.grad = torch.randn(3, 4, dtype=torch.float64)
    >>> lin = optimizers.linearize(opt, copy_state=True)
    >>> expected = w.detach() + lin.update(w, w.grad)
    >>> opt.step(); torch.allclose(w.detach(), expected, rtol=1e-12, atol=0)
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ._base import (
    OptimizerLinearization,
    ParamState,
    UnsupportedOptimizerError,
    as_float,
    state_tensor,
)


@dataclasses.dataclass(frozen=True)
class AdafactorState(ParamState):
    """Frozen state of one parameter under ``torch.optim.Adafactor``.

    Attributes:
        lr, beta2_decay, eps1, eps2, d, weight_decay: η, τ, ε1 (resolved: never ``None``), ε2, d, λ.
        maximize: the group's flag.
        step: steps already taken (the update about to happen uses t = step + 1).
        row_var: R, shape ``[*S[:-1], 1]`` (ndim ≥ 2), or ``None`` (before the first step, or a vector).
        col_var: C, shape ``[*S[:-2], 1, S[-1]]`` (ndim ≥ 2), or ``None``.
        variance: v, shape ``S`` (ndim ≤ 1), or ``None``.

    Example:
        >>> st = AdafactorState(lr=0.01, eps1=2.2e-16)
        >>> st.beta2_decay, st.d, st.step, st.row_var is None
        (-0.8, 1.0, 0, True)
    """

    beta2_decay: float = -0.8
    eps1: float = 0.0
    eps2: float = 1e-3
    d: float = 1.0
    weight_decay: float = 0.0
    maximize: bool = False
    step: int = 0
    row_var: torch.Tensor | None = None
    col_var: torch.Tensor | None = None
    variance: torch.Tensor | None = None


def _resolve_eps1(param: torch.Tensor, group) -> float:
    eps1 = group["eps"][0]
    if eps1 is not None:
        return float(eps1)
    dtypes = {p.dtype for p in group["params"]}
    if len(dtypes) > 1:
        raise UnsupportedOptimizerError(
            f"Adafactor param group mixes dtypes {sorted(str(d) for d in dtypes)} with eps=(None, ...): torch then "
            "uses the machine epsilon of whichever parameter it meets first for all of them, which is not modelled. "
            "Give eps1 explicitly (eps=(1e-30, 1e-3), say) or put each dtype in its own group."
        )
    return float(torch.finfo(param.dtype).eps)


class AdafactorLinearization(OptimizerLinearization, optimizer=torch.optim.Adafactor):
    """Linearization of ``torch.optim.Adafactor`` (factored second moment, relative step, clipping).

    ``update`` is Δ(g) (module doc), equal to the real ``step()``; ``preconditioner(param, g,
    kind)`` gives the tangent Jᵀ v (a VJP) and the secant ∫₀¹ J(s g)ᵀ v ds (piecewise
    Gauss–Legendre between the kinks of the clipping and the ε1 clamps, efficiency checked;
    :class:`~optimizers.UpdateJumpError` at the first step). ``tangent``/``secant`` raise
    ``TypeError``: J is not diagonal.

    Example (after one step, the secant's values add up to the step's change):
        >>> import optimizers
        >>> _ = torch.manual_seed(0); w = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        >>> opt = torch.optim.Adafactor([w], lr=0.01)
        >>> w.grad = torch.randn(3, 4, dtype=torch.float64); opt.step()
        >>> g = torch.randn(3, 4, dtype=torch.float64); w.grad = g
        >>> lin = optimizers.linearize(opt)
        >>> v = torch.randn(3, 4, dtype=torch.float64)
        >>> P = lin.preconditioner(w, g, "secant")
        >>> change = lin.update(w, g) - lin.update(w, torch.zeros_like(g))
        >>> bool(abs((P.apply(v) * g).sum() - (v * change).sum()) < 1e-9 * v.norm() * change.norm())
        True
    """

    structure = "operator"
    refused_flags = ("capturable", "differentiable", "fused")
    #: Parameter shapes the conformance check draws: matrices, a 3-D tensor (factored over the
    #: last two dims), a vector and a scalar (full second moment).
    conformance_shapes = ((4, 5), (6, 3), (2, 3, 4), (1, 5), (7,), ())

    @classmethod
    def momentum_credit_refusal(cls, state):
        return None  # no first moment: Δ(0) carries no earlier gradient

    @classmethod
    def read_state(cls, param, state, group) -> AdafactorState:
        if getattr(param, "is_complex", lambda: False)():
            raise UnsupportedOptimizerError("complex parameters are not modelled (torch.optim.Adafactor refuses them too)")

        return AdafactorState(
            lr=as_float(group["lr"]),
            beta2_decay=float(group["beta2_decay"]),
            eps1=_resolve_eps1(param, group),
            eps2=float(group["eps"][1]),
            d=float(group["d"]),
            weight_decay=as_float(group["weight_decay"]),
            maximize=bool(group["maximize"]),
            step=int(as_float(state.get("step", 0))),
            row_var=state_tensor(state, "row_var"),
            col_var=state_tensor(state, "col_var"),
            variance=state_tensor(state, "variance"),
        )

    # -------------------------------------------------------------- the maths
    @staticmethod
    def _coefficients(theta: torch.Tensor, st: AdafactorState) -> tuple[float, torch.Tensor]:
        """w = t^τ and α = max(ε2, RMS(θ))·ρ (a 0-d tensor of θ's dtype); neither depends on g."""
        t = float(st.step + 1)
        w = t**st.beta2_decay
        rho = min(st.lr, 1 / (t**0.5))
        alpha = torch.clamp(torch.linalg.vector_norm(theta) / (theta.numel() ** 0.5), min=st.eps2) * rho
        return w, alpha

    @classmethod
    def _variance(cls, grad: torch.Tensor, st: AdafactorState, w: float) -> torch.Tensor:
        """V of the module doc (before the ε1² clamp), shape of ``grad``."""
        sq = grad * grad
        if grad.dim() > 1:
            row = torch.lerp(cls._zeros(st.row_var, sq.shape[:-1] + (1,), sq), sq.mean(dim=-1, keepdim=True), w)
            col = torch.lerp(cls._zeros(st.col_var, sq.shape[:-2] + (1, sq.shape[-1]), sq), sq.mean(dim=-2, keepdim=True), w)
            return (row @ col) / row.mean(dim=-2, keepdim=True).clamp(min=st.eps1)
        return torch.lerp(cls._zeros(st.variance, sq.shape, sq), sq, w)

    @staticmethod
    def _zeros(x, shape, like):
        return like.new_zeros(shape) if x is None else x

    @classmethod
    def update_rule(cls, theta, grad, st: AdafactorState):
        """Δ(g) (module doc); ``theta`` and ``grad`` of shape ``S``, the factors of their shapes.

        Example (a vector at its first step: U = sign(g), the clipping factor is 1):
            >>> th = torch.tensor([3.0, -4.0], dtype=torch.float64)     # RMS(θ) = √12.5
            >>> g = torch.tensor([0.5, -2.0], dtype=torch.float64)
            >>> st = AdafactorState(lr=0.01, eps1=2.2e-16)
            >>> [round(x, 6) for x in AdafactorLinearization.update_rule(th, g, st).tolist()]
            [-0.035355, 0.035355]
        """
        g = -grad if st.maximize else grad
        w, alpha = cls._coefficients(theta, st)
        u = torch.rsqrt(cls._variance(g, st, w).clamp(min=st.eps1 * st.eps1)) * g
        clip = torch.clamp(torch.linalg.vector_norm(u) / ((u.numel() ** 0.5) * st.d), min=1.0)
        delta = u * (-alpha / clip)
        if st.weight_decay != 0:
            delta = delta - (st.lr * st.weight_decay) * theta
        return delta

    # -------------------------------------------------------------- the secant's path
    @classmethod
    def _path_moments(cls, theta, grad, st: AdafactorState):
        """The second-moment quantities along s·g in the form A + B s² (torch's lerp expanded).

        Returns ``(g, parts)``: G = s·g (``maximize`` applied) and a list of (A, B) tensor pairs:
        rows and columns of the factored moment and, for ndim ≥ 2, mean(R') over the rows
        (shapes ``[..., n, 1]``, ``[..., 1, m]``, ``[..., 1, 1]``), or the vector's entries.
        """
        g = (-grad if st.maximize else grad).detach()
        w, _ = cls._coefficients(theta, st)
        sq = g * g
        if g.dim() > 1:
            row0 = cls._zeros(st.row_var, sq.shape[:-1] + (1,), sq)
            col0 = cls._zeros(st.col_var, sq.shape[:-2] + (1, sq.shape[-1]), sq)
            rows = ((1 - w) * row0, w * sq.mean(dim=-1, keepdim=True))
            cols = ((1 - w) * col0, w * sq.mean(dim=-2, keepdim=True))
            means = (rows[0].mean(dim=-2, keepdim=True), rows[1].mean(dim=-2, keepdim=True))
            return g, [rows, cols, means]
        return g, [((1 - w) * cls._zeros(st.variance, sq.shape, sq), w * sq)]

    @classmethod
    def path_breakpoints(cls, theta: torch.Tensor, grad: torch.Tensor, st: AdafactorState, *, grid: int = 257) -> list[float]:
        """Points of (0, 1) where the secant's pieces start: kinks of Δ(s·g) and a grading towards 0.

        Along s·g every second-moment quantity is A + B s² (A from the state, B from g), so:

        * **grading** -- its square root has branch points at s = ±i√(A/B), on the imaginary axis;
          for the smallest such scale h (a row, a column, an entry of a vector whose moment is small
          against the current gradient), the points h, 2h, 4h, ... keep every piece as far from the
          singularity as it is long (:func:`~optimizers._piecewise.graded_points`);
        * **kinks** -- where a clamp at ε1 becomes active (mean(R') = ε1, or V = ε1², solved per
          entry by bisection) and where the clipping switches (‖U‖/(√N d) = 1, located on a grid of
          s and refined by bisection).

        Args:
            theta, grad, st: as :meth:`update_rule`.
            grid: points of the uniform grid on which the clipping's switch is searched.
        Returns:
            Sorted points of (0, 1); empty when Δ(s·g) is smooth on [0, 1] at every scale.
        Example (a vector after one step with a gradient now 30x larger than before: the moment's
        scale √(A/B) grades the path, and the clipping switches on once, at s ≈ 0.029):
            >>> st = AdafactorState(lr=0.01, eps1=2.2e-16, step=1, variance=torch.tensor([1.0, 1.0], dtype=torch.float64))
            >>> g = torch.tensor([30.0, -40.0], dtype=torch.float64)
            >>> [round(s, 4) for s in AdafactorLinearization.path_breakpoints(torch.ones(2, dtype=torch.float64), g, st)]
            [0.0215, 0.029, 0.043, 0.0861, 0.1722, 0.3443, 0.6887]
        """
        from ._piecewise import graded_points

        g, parts = cls._path_moments(theta, grad, st)
        points: set[float] = set()
        # Grading towards the smallest scale √(A/B) among the quantities the current gradient moves.
        scales = [torch.sqrt(a.expand_as(b)[b > 0] / b[b > 0]) for a, b in parts]
        smallest = min((float(x.min()) for x in scales if x.numel()), default=float("inf"))
        points.update(graded_points(0.0, smallest))

        def moment(s, a, b):
            return a + b * (s * s)

        def variance(s):
            if g.dim() > 1:
                (ra, rb), (ca, cb), (ma, mb) = parts
                return moment(s, ra, rb) * moment(s, ca, cb) / moment(s, ma, mb).clamp(min=st.eps1)
            ((va, vb),) = parts
            return moment(s, va, vb)

        def bisect(f, lo, hi):
            """Entrywise bisection of f(s) = 0 on [lo, hi] (tensors) where f(lo), f(hi) differ in sign."""
            lo_side = f(lo) > 0
            for _ in range(60):
                mid = (lo + hi) / 2
                left = (f(mid) > 0) == lo_side
                lo, hi = torch.where(left, mid, lo), torch.where(left, hi, mid)
            return (lo + hi) / 2

        with torch.no_grad():
            # Clamp kinks, per entry: V = ε1² and (ndim ≥ 2) mean(R') = ε1. Both are increasing in s
            # (A, B ≥ 0), V up to the ratio with mean(R'), so a sign change between s = 0 and 1 is one kink.
            families = [lambda s: variance(s) - st.eps1 * st.eps1]
            if g.dim() > 1:
                families.append(lambda s: moment(s, *parts[2]) - st.eps1)
            for f in families:
                zero = torch.zeros_like(f(torch.zeros((), dtype=g.dtype)))
                one = torch.ones_like(zero)
                crossing = (f(zero) > 0) != (f(one) > 0)
                if bool(crossing.any()):
                    points.update(bisect(f, zero, one)[crossing].tolist())
            # The clipping: ‖U(s g)‖/(√N d) − 1 on a grid (with the graded points), refined by bisection.
            s = torch.cat([torch.linspace(0.0, 1.0, grid, dtype=g.dtype), torch.tensor(sorted(points), dtype=g.dtype)]).unique()

            def clip(sv):
                # In chunks of s values: [chunk, *shape] at a time, never [len(sv), *shape] (a step-1
                # embedding has one clamp kink per entry, thousands of points).
                chunk = max(1, (1 << 22) // max(1, g.numel()))
                out = []
                for part in sv.split(chunk):
                    x = part.reshape(-1, *([1] * g.dim()))
                    u = torch.rsqrt(variance(x).clamp(min=st.eps1 * st.eps1)) * (x * g)
                    out.append(torch.linalg.vector_norm(u.reshape(len(part), -1), dim=1) / ((g.numel() ** 0.5) * st.d) - 1.0)
                return torch.cat(out)

            above = clip(s) > 0
            for i in (above[1:] != above[:-1]).nonzero().reshape(-1).tolist():
                points.update(bisect(clip, s[i : i + 1], s[i + 1 : i + 2]).tolist())
        return sorted(p for p in points if 0.0 < p < 1.0)

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        """Adafactor keyword arguments covering every modelled setting (``foreach`` included).

        Example:
            >>> import random
            >>> sorted(AdafactorLinearization.sample_hyperparameters(random.Random(0)))
            ['beta2_decay', 'd', 'eps', 'foreach', 'lr', 'maximize', 'weight_decay']
        """
        return {
            "lr": rng.choice([1e-3, 0.01, 0.3]),
            "beta2_decay": rng.choice([-0.8, -0.5]),
            "eps": rng.choice([(None, 1e-3), (1e-3, 1e-3), (1e-30, 0.0), (None, 10.0)]),
            "d": rng.choice([1.0, 1.5, 1e3]),
            "weight_decay": rng.choice([0.0, 0.1]),
            "maximize": rng.random() < 0.3,
            "foreach": rng.choice([None, True]),
        }


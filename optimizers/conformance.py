"""Conformance of a linearization with sympy, finite differences and the real torch optimizer.

:func:`check_case` runs one of three sets of checks, by the kind of rule (:func:`checks_for`):

**Elementwise rules with a sympy model** (``symbolic_update``: SGD, the Adam family, ...):

* ``update_vs_torch``   -- ``update`` against what a copy of the real optimizer does in ``step()``;
* ``update_vs_sympy``   -- ``update`` against the subclass's sympy model (50 significant digits);
* ``tangent_vs_sympy``  -- ``tangent`` against sympy's derivative of that model;
* ``secant_vs_sympy``   -- ``secant`` against the model's exact chord (its derivative at g = 0).

**Elementwise rules without a sympy model** (``symbolic_update`` not written):

* ``update_vs_torch``      -- as above;
* ``tangent_vs_torch_fd``  -- ``tangent`` against a central finite difference of the real ``step()``
  (Richardson-extrapolated, steps 1e-2·|g_i|·4^-k, k = 0..6, the most self-consistent one per
  coordinate; coordinates with g_i = 0 are left out);
* ``secant_vs_torch``      -- ``secant ⊙ g`` against the real steps' chord Δ(g) − Δ(0).

**Operator rules** (``structure = "operator"``: Muon, Adafactor; J is applied, v ↦ Jᵀ v):

* ``update_vs_torch``      -- as above (Muon: against torch's own code path with its bfloat16
  Newton–Schulz replaced by a float64 copy, :func:`float64_newton_schulz`);
* ``update_vs_torch_bf16`` -- Muon only: against the real, bfloat16 ``step()``, as the normwise
  relative error divided by max(1, κ), κ the relative condition number of the twin's
  Newton–Schulz at its input (see :data:`BF16_TOLERANCE`);
* ``tangent_vs_fd``        -- ⟨u, Jᵀv⟩ from ``preconditioner(..., "tangent").apply(v)`` against the
  central difference ⟨v, Δ(g + hu) − Δ(g − hu)⟩/2h of the linearization's own ``update``
  (Richardson-extrapolated, h = 1e-2‖g‖/‖u‖·4^-k, k = 0..6, the most self-consistent), for two
  random pairs u, v;
* ``tangent_vs_torch_fd``  -- the same against finite differences of the real ``step()`` (float64:
  Adafactor as it is, Muon under :func:`float64_newton_schulz`);
* ``secant_efficiency``    -- the efficiency identity ⟨P, g⟩ = ⟨v, Δ(g) − Δ(0)⟩ of the secant P =
  ``preconditioner(..., "secant").apply(v)``: the worst of the gap its diagnostics report, the gap
  recomputed with ``update`` and the gap against the real steps' Δ(g) − Δ(0). Where the update
  jumps at g = 0 (Muon's first step) the secant raises :class:`~optimizers.UpdateJumpError`, and
  the check is *skipped*, with the reason recorded in the result's ``skipped``.

Errors are relative. Per coordinate they have a floor of 1e-6·max|reference| over the parameter:
a coordinate whose exact value is itself the small remainder of a cancellation (Adam's tangent
when a gradient repeats the previous one, say) is held to 1e-16 of the parameter's largest
value, which is what float64 can deliver, instead of dividing by ~0. torch reports only the stepped
parameter fl(θ_t + Δ), so ``update_vs_torch`` compares fl(θ_t + update) with it and divides by
max(|Δ|, 2 ulp(θ)/tolerance): a step smaller than float64 can resolve on θ is checked to the ulp.
Finite differences are divided by the larger of the slope's size and their own rounding error
over the tolerance, so what float64 cannot resolve is never counted as disagreement. The sympy
model is a literal transcription of the torch algorithm, independent of the numerically
rearranged closed forms, so agreement certifies both the algebra and the float implementation.

Run ``python -m optimizers.conformance`` for a report over every registered optimizer, or call
:func:`check_linearization` from your own tests on your own subclass.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import random
from collections.abc import Callable, Iterator
from typing import Any

import mpmath
import sympy
import torch

from ._autograd import UpdateJumpError
from ._base import OptimizerLinearization, registered

#: Worst relative error accepted for ``update`` (float64 throughout).
TOLERANCE = 1e-10
#: Worst relative error accepted for ``tangent`` and ``secant``. Looser because the exact slope can
#: be the small remainder of two nearly equal terms built from the (already rounded) state, e.g.
#: Adam with β1 = β2 when the gradient repeats the previous one: float64 evaluation then loses up
#: to ~7 digits there, whatever the formula (measured worst: 5e-10).
SLOPE_TOLERANCE = 1e-8
#: Worst relative error accepted between a slope and a finite difference (Richardson-extrapolated
#: central differences at the most self-consistent of seven steps, see _fd_derivative). Measured
#: worst over 100 random cases each: Muon 1.6e-8, Adafactor 6.4e-8 (operator checks); 1.2e-7 for
#: the elementwise rules checked without their sympy model (coordinates where only rounding is resolved).
FD_TOLERANCE = 1e-6
#: Worst efficiency gap |⟨P, g⟩ − ⟨v, Δ(g) − Δ(0)⟩| / (‖v‖ ‖Δ(g) − Δ(0)‖) accepted for an operator secant
#: (the quadrature is refined to 1e-9; the real steps' Δ(g) − Δ(0) adds their rounding).
EFFICIENCY_TOLERANCE = 2e-9
#: Muon against the real bfloat16 ``step()``: the normwise relative error of Δ (of its
#: orthogonalised part η'·O) divided by max(1, κ), κ = ‖∂NS/∂X‖·‖X‖/‖NS(X)‖ the relative condition
#: number of the float64 Newton–Schulz at its input X. bfloat16 has unit roundoff u = 2^-8; over 3000
#: random states the raw error had median 3.9e-3, 99th percentile 3.3e-2 and worst 0.32 (a nearly
#: singular 4×4 X, κ ≈ 295), and error/max(1, κ) was at most 6.4·u. Accepted: 16·u.
BF16_TOLERANCE = 16 * 2.0**-8
TOLERANCES = {
    "update_vs_torch": TOLERANCE,
    "update_vs_sympy": TOLERANCE,
    "tangent_vs_sympy": SLOPE_TOLERANCE,
    "secant_vs_sympy": SLOPE_TOLERANCE,
    "tangent_vs_torch_fd": FD_TOLERANCE,
    "secant_vs_torch": SLOPE_TOLERANCE,
    "tangent_vs_fd": FD_TOLERANCE,
    "secant_efficiency": EFFICIENCY_TOLERANCE,
    "update_vs_torch_bf16": BF16_TOLERANCE,
}
#: The checks of an elementwise rule with a sympy model.
CHECKS = ("update_vs_torch", "update_vs_sympy", "tangent_vs_sympy", "secant_vs_sympy")
#: The checks of an elementwise rule without one.
FD_CHECKS = ("update_vs_torch", "tangent_vs_torch_fd", "secant_vs_torch")
#: The checks of an operator rule (plus ``update_vs_torch_bf16`` for Muon).
OPERATOR_CHECKS = ("update_vs_torch", "tangent_vs_fd", "tangent_vs_torch_fd", "secant_efficiency")
_DIGITS = 50
_EPS = torch.finfo(torch.float64).eps


class Errors(dict):
    """What :func:`check_case` returns: ``{check: worst relative error}``, plus ``skipped``.

    Attributes:
        skipped: ``{check: reason}`` for checks that do not apply to this case (they are not in the
            dict), e.g. the secant of an update that jumps at g = 0.

    Example:
        >>> e = Errors({"update_vs_torch": 1e-16}, skipped={"secant_efficiency": "jump"})
        >>> dict(e), e.skipped, passes(e)
        ({'update_vs_torch': 1e-16}, {'secant_efficiency': 'jump'}, True)
    """

    def __init__(self, *args, skipped: dict[str, str] | None = None, **kw):
        super().__init__(*args, **kw)
        self.skipped: dict[str, str] = dict(skipped or {})


def _has_sympy_model(cls: type[OptimizerLinearization]) -> bool:
    return getattr(cls.symbolic_update, "__func__", None) is not OptimizerLinearization.symbolic_update.__func__


def checks_for(cls: type[OptimizerLinearization]) -> tuple[str, ...]:
    """The names of the checks :func:`check_case` runs for ``cls`` (see the module doc).

    Example:
        >>> import optimizers
        >>> checks_for(optimizers.AdamLinearization) == CHECKS, checks_for(optimizers.MuonLinearization)[-1]
        (True, 'update_vs_torch_bf16')
    """
    if cls.structure == "operator":
        return OPERATOR_CHECKS + (("update_vs_torch_bf16",) if cls.optimizer_class in _LOW_PRECISION else ())
    return CHECKS if _has_sympy_model(cls) else FD_CHECKS


# ---------------------------------------------------------------------- Muon's bfloat16 Newton–Schulz
def _float64_zeropower_via_newtonschulz(grad, ns_coefficients, ns_steps, eps):
    """torch.optim._muon._zeropower_via_newtonschulz, line for line, with ``grad.bfloat16()`` replaced by a copy."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(grad.shape) != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = ns_coefficients
    ortho_grad = grad.clone()  # torch: grad.bfloat16()
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


@contextlib.contextmanager
def float64_newton_schulz() -> Iterator[None]:
    """Within the block, ``torch.optim.Muon.step()`` runs its Newton–Schulz iteration in the input dtype.

    torch casts the momentum to bfloat16 before the iteration; this swaps
    ``torch.optim._muon._zeropower_via_newtonschulz`` for a copy of it without that cast (and
    restores it on exit), so that the real code path is compared with the exact twin at 1e-10.
    Used by the conformance check only.

    Example:
        >>> w = torch.nn.Parameter(torch.eye(2, 3, dtype=torch.float64)); w.grad = torch.ones(2, 3, dtype=torch.float64)
        >>> opt = torch.optim.Muon([w], lr=0.1, weight_decay=0.0)
        >>> with float64_newton_schulz():
        ...     opt.step()
        >>> import torch.optim._muon as m; m._zeropower_via_newtonschulz.__module__
        'torch.optim._muon'
    """
    import torch.optim._muon as muon

    saved = muon._zeropower_via_newtonschulz
    muon._zeropower_via_newtonschulz = _float64_zeropower_via_newtonschulz
    try:
        yield
    finally:
        muon._zeropower_via_newtonschulz = saved


def _muon_bf16_error(lin, p: torch.Tensor, delta_torch: torch.Tensor) -> float:
    """‖Δ_twin − Δ_torch‖ / ‖η' O_twin‖ / max(1, κ) (see :data:`BF16_TOLERANCE`)."""
    from .muon import adjusted_lr, newton_schulz

    theta, g, st = lin._inputs(p, p.grad)
    x = type(lin)._direction(g, st)

    def ns(y):
        return newton_schulz(y, st.ns_coefficients, st.ns_steps, st.eps)

    ortho = ns(x) * adjusted_lr(st.lr, st.adjust_lr_fn, theta.shape)
    jac = torch.autograd.functional.jacobian(ns, x, vectorize=True).reshape(x.numel(), x.numel())
    kappa = float(torch.linalg.matrix_norm(jac, 2) * x.norm() / ns(x).norm())
    error = float(torch.linalg.vector_norm(lin.update(p, p.grad) - delta_torch) / torch.linalg.vector_norm(ortho))
    return error / max(1.0, kappa)


#: Optimizers whose real step rounds below float64 on purpose: a context manager under which their
#: ``step()`` computes in the input dtype, and the measure of the rounded step's gap to the twin.
_LOW_PRECISION: dict[type, tuple[Callable[[], contextlib.AbstractContextManager], Callable[..., float]]] = {
    torch.optim.Muon: (float64_newton_schulz, _muon_bf16_error),
}


def _exact(cls: type[OptimizerLinearization]) -> contextlib.AbstractContextManager:
    entry = _LOW_PRECISION.get(cls.optimizer_class)
    return entry[0]() if entry else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class Case:
    """One conformance case: hyper-parameters, past gradients (steps already taken), θ_t and g.

    Attributes:
        hyperparameters: keyword arguments of ``cls.optimizer_class``.
        history: gradients of the steps already taken, each float64 of the parameter's shape ``S``.
        theta: θ_t, float64 ``S`` (``[n]`` for elementwise rules, a matrix or tensor for operator rules).
        grad: the gradient g of the step being linearized, float64 ``S``.

    Example:
        >>> from optimizers import SGDLinearization
        >>> case = Case({"lr": 0.1}, (), torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
        >>> passes(check_case(SGDLinearization, case))
        True
    """

    hyperparameters: dict[str, Any]
    history: tuple[torch.Tensor, ...]
    theta: torch.Tensor
    grad: torch.Tensor


def draw_case(cls: type[OptimizerLinearization], rng: random.Random, n: int = 12) -> Case:
    """A random case for ``cls`` covering the corners: step 1, v = 0, eps-dominated v, sign flips.

    Elementwise rules get a vector of ``n`` coordinates of four kinds: always-zero gradients (so
    second moments stay exactly 0), tiny gradients (1e-12: the second moment is dominated by eps),
    ordinary and large ones; the current gradient is zero on some coordinates, including ones
    whose history is not. Operator rules get a parameter of one of the shapes in the class's
    ``conformance_shapes`` (matrices by default), see :func:`_draw_operator_case`.

    Args:
        cls: a registered linearization class (its ``sample_hyperparameters`` is used).
        rng: a ``random.Random``; the case is a deterministic function of its state.
        n: number of coordinates (elementwise rules).
    Returns:
        A :class:`Case` with float64 tensors and 0 to 5 past steps.
    Example:
        >>> import random
        >>> from optimizers import MuonLinearization, SGDLinearization
        >>> case = draw_case(SGDLinearization, random.Random(0), n=4)
        >>> case.theta.shape, case.grad.dtype, len(case.history) <= 5
        (torch.Size([4]), torch.float64, True)
        >>> draw_case(MuonLinearization, random.Random(0)).theta.dim()
        2
    """
    if cls.structure == "operator":
        return _draw_operator_case(cls, rng)
    hp = cls.sample_hyperparameters(rng)
    steps = rng.choice([0, 0, 1, 2, 5])
    scale = torch.tensor([rng.choice([0.0, 1e-12, 1.0, 30.0]) for _ in range(n)], dtype=torch.float64)
    gen = torch.Generator().manual_seed(rng.getrandbits(32))

    def gaussian():
        return torch.randn(n, generator=gen, dtype=torch.float64)

    history = tuple(gaussian() * scale for _ in range(steps))
    theta = gaussian()
    grad_scale = torch.tensor([rng.choice([0.0, 1e-12, 0.3, 1.0, 30.0]) for _ in range(n)], dtype=torch.float64)
    grad = gaussian() * grad_scale
    return Case(hp, history, theta, grad)


#: Shapes drawn for an operator rule whose class has no ``conformance_shapes``.
_OPERATOR_SHAPES = ((3, 4), (4, 3), (2, 5))


def _draw_operator_case(cls: type[OptimizerLinearization], rng: random.Random) -> Case:
    """A random case for an operator rule, on one of ``cls.conformance_shapes``.

    Each past gradient is Gaussian times one scale (0.01, 1 or 30: histories small and large
    against the current gradient); with probability 1/4 one slice along the first dimension (a row
    of a matrix) is 0 in every past gradient (Adafactor's factor of that row stays 0). The current
    gradient is Gaussian times 0.01, 1 or 30, with a zero row now and then where the history of that
    row is not zero. Zero entries where the state is zero too are left out: the rule is not smooth
    there on any scale a finite difference resolves (Adafactor's ε1-clamped V).
    """
    hp = cls.sample_hyperparameters(rng)
    shape = tuple(rng.choice(getattr(cls, "conformance_shapes", None) or _OPERATOR_SHAPES))
    steps = rng.choice([0, 0, 1, 2, 5])
    gen = torch.Generator().manual_seed(rng.getrandbits(32))

    def gaussian():
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    rows = shape[0] if shape else 0
    dead = rng.randrange(rows) if rows > 1 and rng.random() < 0.25 else None
    history = []
    for _ in range(steps):
        h = gaussian() * rng.choice([0.01, 1.0, 30.0])
        if dead is not None:
            h[dead] = 0.0
        history.append(h)
    theta = gaussian()
    grad = gaussian() * rng.choice([0.01, 1.0, 30.0])
    if steps and rows > 1 and rng.random() < 0.25:
        grad[rng.choice([r for r in range(rows) if r != dead])] = 0.0
    return Case(hp, tuple(history), theta, grad)


def _build(cls: type[OptimizerLinearization], case: Case) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    """A real optimizer over one float64 parameter, stepped through the case's history."""
    p = torch.nn.Parameter(case.theta.clone())
    opt = cls.optimizer_class([p], **case.hyperparameters)
    with torch.no_grad(), _exact(cls):
        for g in case.history:
            p.grad = g.clone()
            opt.step()
    # θ_t is the case's θ whatever the history did to it (the state is what matters).
    with torch.no_grad():
        p.copy_(case.theta)
    p.grad = case.grad.clone()
    return p, opt


def _rel_error(actual: torch.Tensor, reference: torch.Tensor, floor: torch.Tensor | None = None) -> float:
    if not torch.isfinite(actual).all():
        return float("inf")
    if reference.numel() == 0:
        return 0.0
    scale = reference.abs().clamp_min(max(1e-6 * reference.abs().max().item(), 1e-300))
    if floor is not None:
        scale = torch.maximum(scale, floor)
    return ((actual - reference).abs() / scale).max().item()


class _SympyModel:
    """The subclass's sympy model of one parameter state, evaluated per coordinate with mpmath."""

    def __init__(self, cls: type[OptimizerLinearization], state):
        self.g, self.theta = sympy.symbols("g theta", real=True)
        self.fields = sorted(state.tensors())
        symbols = {name: sympy.Symbol(name, real=True) for name in self.fields}
        # Hyper-parameters enter as exact rationals of their float64 values: a sympy Float would be
        # printed for mpmath with 17 digits, an error that cancellations then amplify.
        exact = {
            f.name: sympy.Rational(getattr(state, f.name))
            for f in dataclasses.fields(state)
            if type(getattr(state, f.name)) is float
        }
        expr = cls.symbolic_update(self.g, self.theta, dataclasses.replace(state, **symbols, **exact))
        args = [self.g, self.theta, *symbols.values()]
        self._f = sympy.lambdify(args, expr, modules="mpmath")
        self._df = sympy.lambdify(args, sympy.diff(expr, self.g), modules="mpmath")

    def _call(self, fn, g, rest):
        with mpmath.workdps(_DIGITS):
            return fn(mpmath.mpf(g), *[mpmath.mpf(x) for x in rest])

    def _derivative(self, g, rest):
        with mpmath.workdps(_DIGITS):
            try:
                value = self._call(self._df, g, rest)
                ok = mpmath.isfinite(value)
            except (ZeroDivisionError, ValueError):
                ok = False
            if ok:
                return value
            # A removable 0/0 (e.g. √v at v = g = 0): average the two one-sided limits.
            h = mpmath.mpf(10) ** -30
            return (self._call(self._df, g + h, rest) + self._call(self._df, g - h, rest)) / 2

    def evaluate(self, theta, grad, state) -> dict[str, torch.Tensor]:
        """Exact Δ(g), ∂Δ/∂g and the chord per coordinate, rounded to float64."""
        tensors = state.tensors()
        out = {"update": [], "tangent": [], "secant": []}
        for i in range(grad.numel()):
            rest = [float(theta[i])] + [float(tensors[k].reshape(-1)[i]) for k in self.fields]
            g = float(grad[i])
            with mpmath.workdps(_DIGITS):
                delta = self._call(self._f, g, rest)
                tangent = self._derivative(g, rest)
                chord = tangent if g == 0 else (delta - self._call(self._f, 0.0, rest)) / mpmath.mpf(g)
            out["update"].append(float(delta))
            out["tangent"].append(float(tangent))
            out["secant"].append(float(chord))
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def _torch_step(cls: type[OptimizerLinearization], opt: torch.optim.Optimizer, grad: torch.Tensor, *, exact: bool = True):
    """(θ before, θ after) for one real ``step()`` of a copy of ``opt`` with gradient ``grad``.

    ``exact``: under :func:`float64_newton_schulz` for Muon (no effect for other optimizers).
    """
    twin = copy.deepcopy(opt)  # deepcopy keeps the param <-> state mapping consistent
    q = twin.param_groups[0]["params"][0]
    q.grad = grad.clone()
    before = q.detach().clone()
    with _exact(cls) if exact else contextlib.nullcontext():
        twin.step()
    return before, q.detach()


def _update_vs_torch(ours: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> float:
    # torch only gives θ_t + Δ rounded to float64, so compare in parameter space: the error is
    # relative to |Δ|, but never to less than 2 ulps of θ expressed at the 1e-10 tolerance.
    ulp_floor = 2 * _EPS * torch.maximum(before.abs(), after.abs()) / TOLERANCE
    return _rel_error(before + ours, after, ulp_floor)


def _richardson(f: Callable[[float], Any], h: float) -> Any:
    """The derivative at 0 of f by central differences at h and h/2, Richardson-extrapolated (O(h⁴))."""
    d1 = (f(h) - f(-h)) / (2 * h)
    d2 = (f(h / 2) - f(-h / 2)) / h
    return (4 * d2 - d1) / 3


#: Finite-difference steps tried, relative to the first (each a quarter of the one before).
_FD_STEPS = 7


def _fd_derivative(f: Callable[[float], float], h0: float, rounding: float) -> tuple[float, float]:
    """(f'(0), the step used): of the Richardson estimates at h0, h0/4, ..., the most trustworthy.

    The largest steps leave the Taylor regime where the rule varies on a small scale (a row of
    Adafactor whose second moment is tiny), the smallest drown in rounding (``rounding``/h, with
    ``rounding`` the error of one evaluation of f). Each estimate is scored by its disagreement with
    the one before plus its rounding error, and the best is taken: chosen by the estimates alone,
    never by the value they are checked against.
    """
    hs = [h0 * 4.0**-k for k in range(_FD_STEPS)]
    estimates = [_richardson(f, h) for h in hs]
    k = min(range(1, len(hs)), key=lambda i: abs(estimates[i] - estimates[i - 1]) + rounding / hs[i])
    return estimates[k], hs[k]


def check_case(cls: type[OptimizerLinearization], case: Case) -> Errors:
    """Worst relative error of each check of :func:`checks_for` ``(cls)`` for one case (module doc).

    Builds the real optimizer in float64, steps it through ``case.history``, linearizes it and
    compares ``update`` and the slopes with real ``step()``s, with the sympy model or with finite
    differences.

    Args:
        cls: the linearization class under test.
        case: see :class:`Case`.
    Returns:
        An :class:`Errors` dict ``{check: worst relative error}`` (Python floats; ``inf`` for a
        non-finite output) and its ``skipped`` reasons. Never raises on a large error: see :func:`passes`.
    Example:
        >>> import random
        >>> from optimizers import AdamLinearization
        >>> errors = check_case(AdamLinearization, draw_case(AdamLinearization, random.Random(0)))
        >>> sorted(errors) == sorted(CHECKS), passes(errors)
        (True, True)
    """
    p, opt = _build(cls, case)
    lin = cls.from_optimizer(opt)
    if cls.structure == "operator":
        return _check_operator(cls, case, p, opt, lin)
    ours = {"update": lin.update(p, p.grad), "tangent": lin.tangent(p, p.grad), "secant": lin.secant(p, p.grad)}
    before, after = _torch_step(cls, opt, case.grad)
    errors = Errors({"update_vs_torch": _update_vs_torch(ours["update"], before, after)})
    if not _has_sympy_model(cls):
        errors.update(_check_elementwise_fd(cls, case, opt, ours))
        return errors
    exact = _SympyModel(cls, lin.state(p)).evaluate(case.theta, case.grad, lin.state(p))
    errors.update(
        update_vs_sympy=_rel_error(ours["update"], exact["update"]),
        tangent_vs_sympy=_rel_error(ours["tangent"], exact["tangent"]),
        secant_vs_sympy=_rel_error(ours["secant"], exact["secant"]),
    )
    return errors


def _check_elementwise_fd(cls, case: Case, opt, ours: dict[str, torch.Tensor]) -> dict[str, float]:
    """``tangent_vs_torch_fd`` and ``secant_vs_torch`` for an elementwise rule without a sympy model."""
    g = case.grad
    moving = g != 0
    safe = torch.where(moving, g.abs(), torch.ones_like(g))

    def step(x):
        before, after = _torch_step(cls, opt, x)
        return after - before, before

    at_g, before = step(g)
    # Per coordinate (the rule is elementwise, so one perturbation of every coordinate at once gives
    # each its own difference quotient): Richardson estimates at steps 1e-2·|g_i|·4^-k, and for each
    # coordinate the one agreeing best with its predecessor (see _fd_derivative).
    estimates, steps = [], []
    for k in range(_FD_STEPS):
        h = 1e-2 * 4.0**-k * safe
        estimates.append(_richardson(lambda t, h=h: step(g + t * h)[0], 1.0) / h)
        steps.append(h)
    rounding = 16 * _EPS * (before.abs() + at_g.abs())  # each real step is known to a few ulps of θ
    score = torch.stack([(estimates[k] - estimates[k - 1]).abs() + rounding / steps[k] for k in range(1, _FD_STEPS)])
    best = score.argmin(dim=0, keepdim=True) + 1
    fd = torch.stack(estimates).gather(0, best)[0]
    h = torch.stack(steps).gather(0, best)[0]
    noise = rounding / h  # the difference quotient's rounding error
    tangent = _rel_error(ours["tangent"][moving], fd[moving], noise[moving] / FD_TOLERANCE)
    at_zero, _ = step(torch.zeros_like(g))
    chord = at_g - at_zero
    floor = 4 * _EPS * (before.abs() + at_g.abs() + at_zero.abs()) / SLOPE_TOLERANCE
    secant = _rel_error(ours["secant"] * g, chord, floor)
    return {"tangent_vs_torch_fd": tangent, "secant_vs_torch": secant}


def _check_operator(cls, case: Case, p, opt, lin) -> Errors:
    """The operator checks (module doc) on one built case."""
    g = p.grad
    ours = lin.update(p, g)
    before, after = _torch_step(cls, opt, g)
    errors = Errors({"update_vs_torch": _update_vs_torch(ours, before, after)})
    if cls.optimizer_class in _LOW_PRECISION:
        real_before, real_after = _torch_step(cls, opt, g, exact=False)
        errors["update_vs_torch_bf16"] = _LOW_PRECISION[cls.optimizer_class][1](lin, p, real_after - real_before)
    gen = torch.Generator().manual_seed(len(case.history) * 7919 + g.numel())
    directions = [(torch.randn(g.shape, generator=gen, dtype=g.dtype), torch.randn(g.shape, generator=gen, dtype=g.dtype)) for _ in range(2)]
    tangent = lin.preconditioner(p, g, "tangent")
    g_norm = float(torch.linalg.vector_norm(g))
    worst_own, worst_torch = 0.0, 0.0
    for u, v in directions:
        jv = tangent.apply(v)
        exact = float((u * jv).sum())
        h0 = 1e-2 * max(g_norm, 1e-8) / float(torch.linalg.vector_norm(u))
        size = float(torch.linalg.vector_norm(u) * torch.linalg.vector_norm(jv))
        # Rounding of each evaluation: a few ulps of ⟨|v|, |Δ|⟩ (own), of ⟨|v|, |θ|⟩ (torch's θ + Δ).
        own_rounding = 16 * _EPS * float((v.abs() * ours.abs()).sum())
        torch_rounding = 16 * _EPS * float((v.abs() * (before.abs() + ours.abs())).sum())
        own, h = _fd_derivative(lambda t, u=u, v=v: float((v * lin.update(p, g + t * u)).sum()), h0, own_rounding)
        own_noise = own_rounding / h
        worst_own = max(worst_own, abs(exact - own) / max(size, own_noise / FD_TOLERANCE, 1e-300))

        def real(t, u=u, v=v):
            b, a = _torch_step(cls, opt, g + t * u)
            return float((v * (a - b)).sum())

        torch_fd, h = _fd_derivative(real, h0, torch_rounding)
        torch_noise = torch_rounding / h
        worst_torch = max(worst_torch, abs(exact - torch_fd) / max(size, torch_noise / FD_TOLERANCE, 1e-300))
    errors.update(tangent_vs_fd=worst_own, tangent_vs_torch_fd=worst_torch)
    try:
        secant = lin.preconditioner(p, g, "secant")
        change = ours - lin.update(p, torch.zeros_like(g))
        b0, a0 = _torch_step(cls, opt, torch.zeros_like(g))
        change_torch = (after - before) - (a0 - b0)
        worst = 0.0
        for _, v in directions:
            P = secant.apply(v)
            got = float((P * g).sum())
            v_norm = float(torch.linalg.vector_norm(v))
            scale = v_norm * float(torch.linalg.vector_norm(change))
            own = abs(got - float((v * change).sum())) / scale if scale > 0 else abs(got)
            # The real steps' chord carries their rounding: ~1 ulp of θ per entry.
            torch_floor = v_norm * 4 * _EPS * float(torch.linalg.vector_norm(before.abs() + ours.abs())) / EFFICIENCY_TOLERANCE
            real = abs(got - float((v * change_torch).sum())) / max(scale, torch_floor, 1e-300)
            worst = max(worst, float(secant.diagnostics["efficiency_gap"]), own, real)
        errors["secant_efficiency"] = worst
    except UpdateJumpError as err:
        errors.skipped["secant_efficiency"] = f"UpdateJumpError: {str(err).split('. ')[0]}"
    return errors


def passes(errors: dict[str, float]) -> bool:
    """True if every error of :func:`check_case` is within its tolerance (:data:`TOLERANCES`).

    Skipped checks (``errors.skipped``) are not in the dict and do not count.

    Example:
        >>> passes({"update_vs_torch": 1e-16, "tangent_vs_sympy": 1e-9}), passes({"update_vs_sympy": 1e-6})
        (True, False)
    """
    return all(err <= TOLERANCES[name] for name, err in errors.items())


def check_linearization(cls: type[OptimizerLinearization], *, cases: int = 20, seed: int = 0) -> Errors:
    """Run :func:`check_case` on ``cases`` random cases; raise if any error exceeds its tolerance.

    Call it from your own tests after subclassing :class:`OptimizerLinearization`.

    Returns:
        The worst error of each check over all cases (an :class:`Errors`; ``skipped`` counts the
        cases that skipped a check, by check, with the first reason).
    Raises:
        AssertionError: naming the check, its error, and the case (hyper-parameters, steps).

    Example:
        >>> from optimizers import SGDLinearization
        >>> worst = check_linearization(SGDLinearization, cases=2)
        >>> passes(worst)
        True
    """
    rng = random.Random(seed)
    worst = Errors(dict.fromkeys(checks_for(cls), 0.0))
    skipped: dict[str, list] = {}
    for _ in range(cases):
        case = draw_case(cls, rng)
        errors = check_case(cls, case)
        for name, err in errors.items():
            if not err <= TOLERANCES[name]:
                raise AssertionError(
                    f"{cls.__name__}: {name} error {err:.3e} > {TOLERANCES[name]:g} for hyper-parameters "
                    f"{case.hyperparameters} after {len(case.history)} steps, shape {tuple(case.grad.shape)} (seed {seed})"
                )
            worst[name] = max(worst[name], err)
        for name, reason in errors.skipped.items():
            skipped.setdefault(name, [0, reason])[0] += 1
    worst.skipped = {name: f"{n}/{cases} cases: {reason}" for name, (n, reason) in skipped.items()}
    return worst


def report(cases: int = 30, seed: int = 0) -> list[tuple[str, str, float, bool, str]]:
    """Rows (optimizer, check, worst error, passed, note) for every registered linearization.

    ``note`` says how many cases skipped the check and why (e.g. Muon's first-step secant);
    a check skipped by every case has worst error ``nan`` and counts as passed.

    Args:
        cases: random cases per optimizer.
        seed: seed of each optimizer's ``random.Random``.
    Returns:
        One row per (registered optimizer, check of :func:`checks_for`), sorted by optimizer name.
    Example:
        >>> rows = report(cases=1)
        >>> sorted({r[0] for r in rows}) == sorted(c.__name__ for c in registered()), all(r[3] for r in rows)
        (True, True)
    """
    rows = []
    for opt_cls, lin_cls in sorted(registered().items(), key=lambda kv: kv[0].__name__):
        rng = random.Random(seed)
        worst: dict[str, float | None] = dict.fromkeys(checks_for(lin_cls))
        skipped: dict[str, list] = {}
        for _ in range(cases):
            errors = check_case(lin_cls, draw_case(lin_cls, rng))
            for name, err in errors.items():
                worst[name] = err if worst.get(name) is None else max(worst[name], err)
            for name, reason in errors.skipped.items():
                skipped.setdefault(name, [0, reason])[0] += 1
        for name, err in worst.items():
            note = f"skipped in {skipped[name][0]}/{cases}: {skipped[name][1]}" if name in skipped else ""
            value = float("nan") if err is None else err
            rows.append((opt_cls.__name__, name, value, err is None or err <= TOLERANCES[name], note))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the conformance report; exit status 1 if any check fails.

    Args:
        argv: command-line arguments (``--cases``, ``--seed``); ``None`` reads ``sys.argv``.
    Returns:
        0 if every check passes, else 1.
    Example:
        >>> main(["--cases", "1"])
        Conformance of every registered linearization (1 random cases each, float64)
        optimizer  check ...
        ... passed, 0 failed...
        0
    """
    parser = argparse.ArgumentParser(prog="python -m optimizers.conformance", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=30, help="random cases per optimizer (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = report(args.cases, args.seed)
    print(f"Conformance of every registered linearization ({args.cases} random cases each, float64)")
    print(f"{'optimizer':<10} {'check':<21} {'worst rel. error':>16} {'tolerance':>10}  result")
    for opt, check, err, ok, note in rows:
        print(f"{opt:<10} {check:<21} {err:>16.3e} {TOLERANCES[check]:>10.1e}  {'pass' if ok else 'FAIL'}" + (f"  ({note})" if note else ""))
    failed = sum(not ok for *_, ok, _ in rows)
    skipped = sum(bool(note) for *_, note in rows)
    print(f"{len(rows) - failed} passed, {failed} failed" + (f" ({skipped} with skipped cases, noted)" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

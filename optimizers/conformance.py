"""Conformance of a linearization with sympy and with the real torch optimizer.

For one optimizer configuration and state, :func:`check_case` measures four worst errors:

* ``update_vs_torch``   -- ``update`` against what a copy of the real optimizer does in ``step()``;
* ``update_vs_sympy``   -- ``update`` against the subclass's sympy model (50 significant digits);
* ``tangent_vs_sympy``  -- ``tangent`` against sympy's derivative of that model;
* ``secant_vs_sympy``   -- ``secant`` against the model's exact chord (its derivative at g = 0).

Errors are relative, per coordinate, with a floor of 1e-6·max|reference| over the parameter:
a coordinate whose exact value is itself the small remainder of a cancellation (Adam's tangent
when a gradient repeats the previous one, say) is held to 1e-16 of the parameter's largest
value, which is what float64 can deliver, instead of dividing by ~0. torch reports only the stepped
parameter fl(θ_t + Δ), so ``update_vs_torch`` compares fl(θ_t + update) with it and divides by
max(|Δ|, 2 ulp(θ)/tolerance): a step smaller than float64 can resolve on θ is checked to the ulp. The sympy model is a literal
transcription of the torch algorithm, independent of the numerically rearranged closed forms,
so agreement certifies both the algebra and the float implementation.

Run ``python -m optimizers.conformance`` for a report over every registered optimizer, or call
:func:`check_linearization` from your own tests on your own subclass.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
from typing import Any

import mpmath
import sympy
import torch

from ._base import OptimizerLinearization, registered

#: Worst relative error accepted for ``update`` (float64 throughout).
TOLERANCE = 1e-10
#: Worst relative error accepted for ``tangent`` and ``secant``. Looser because the exact slope can
#: be the small remainder of two nearly equal terms built from the (already rounded) state, e.g.
#: Adam with β1 = β2 when the gradient repeats the previous one: float64 evaluation then loses up
#: to ~7 digits there, whatever the formula (measured worst: 5e-10).
SLOPE_TOLERANCE = 1e-8
TOLERANCES = {
    "update_vs_torch": TOLERANCE,
    "update_vs_sympy": TOLERANCE,
    "tangent_vs_sympy": SLOPE_TOLERANCE,
    "secant_vs_sympy": SLOPE_TOLERANCE,
}
CHECKS = ("update_vs_torch", "update_vs_sympy", "tangent_vs_sympy", "secant_vs_sympy")
_DIGITS = 50


@dataclasses.dataclass(frozen=True)
class Case:
    """One conformance case: hyper-parameters, past gradients (steps already taken), θ_t and g.

    Attributes:
        hyperparameters: keyword arguments of ``cls.optimizer_class``.
        history: gradients of the steps already taken, each float64 ``[n]``.
        theta: θ_t, float64 ``[n]``.
        grad: the gradient g of the step being linearized, float64 ``[n]``.

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

    Coordinates are of four kinds: always-zero gradients (so second moments stay exactly 0),
    tiny gradients (1e-12: the second moment is dominated by eps), ordinary and large ones.
    The current gradient is zero on some coordinates, including ones whose history is not.

    Args:
        cls: a registered linearization class (its ``sample_hyperparameters`` is used).
        rng: a ``random.Random``; the case is a deterministic function of its state.
        n: number of coordinates.
    Returns:
        A :class:`Case` with float64 tensors of shape ``[n]`` and 0 to 5 past steps.
    Example:
        >>> import random
        >>> from optimizers import SGDLinearization
        >>> case = draw_case(SGDLinearization, random.Random(0), n=4)
        >>> case.theta.shape, case.grad.dtype, len(case.history) <= 5
        (torch.Size([4]), torch.float64, True)
    """
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


def _build(cls: type[OptimizerLinearization], case: Case) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    """A real optimizer over one float64 parameter, stepped through the case's history."""
    p = torch.nn.Parameter(case.theta.clone())
    opt = cls.optimizer_class([p], **case.hyperparameters)
    with torch.no_grad():
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


def check_case(cls: type[OptimizerLinearization], case: Case) -> dict[str, float]:
    """Worst relative error of each check (see module doc) for one case.

    Builds the real optimizer in float64, steps it through ``case.history``, linearizes it and
    compares ``update``/``tangent``/``secant`` with a real ``step()`` and with the sympy model.

    Args:
        cls: the linearization class under test.
        case: see :class:`Case`.
    Returns:
        ``{check: worst relative error}`` for the four names in :data:`CHECKS` (Python floats;
        ``inf`` for a non-finite output). Never raises on a large error: see :func:`passes`.
    Example:
        >>> import random
        >>> from optimizers import AdamLinearization
        >>> errors = check_case(AdamLinearization, draw_case(AdamLinearization, random.Random(0)))
        >>> sorted(errors) == sorted(CHECKS), passes(errors)
        (True, True)
    """
    p, opt = _build(cls, case)
    lin = cls.from_optimizer(opt)
    ours = {"update": lin.update(p, p.grad), "tangent": lin.tangent(p, p.grad), "secant": lin.secant(p, p.grad)}

    twin = copy.deepcopy(opt)  # deepcopy keeps the param <-> state mapping consistent
    q = twin.param_groups[0]["params"][0]
    q.grad = case.grad.clone()
    before = q.detach().clone()
    twin.step()
    # torch only gives θ_t + Δ rounded to float64, so compare in parameter space: the error is
    # relative to |Δ|, but never to less than 2 ulps of θ expressed at the 1e-10 tolerance.
    stepped_torch = q.detach()
    stepped_ours = before + ours["update"]
    ulp_floor = 2 * torch.finfo(torch.float64).eps * torch.maximum(before.abs(), stepped_torch.abs()) / TOLERANCE

    exact = _SympyModel(cls, lin.state(p)).evaluate(case.theta, case.grad, lin.state(p))
    return {
        "update_vs_torch": _rel_error(stepped_ours, stepped_torch, ulp_floor),
        "update_vs_sympy": _rel_error(ours["update"], exact["update"]),
        "tangent_vs_sympy": _rel_error(ours["tangent"], exact["tangent"]),
        "secant_vs_sympy": _rel_error(ours["secant"], exact["secant"]),
    }


def passes(errors: dict[str, float]) -> bool:
    """True if every error of :func:`check_case` is within its tolerance (:data:`TOLERANCES`).

    Example:
        >>> passes({"update_vs_torch": 1e-16, "tangent_vs_sympy": 1e-9}), passes({"update_vs_sympy": 1e-6})
        (True, False)
    """
    return all(err <= TOLERANCES[name] for name, err in errors.items())


def check_linearization(cls: type[OptimizerLinearization], *, cases: int = 20, seed: int = 0) -> dict[str, float]:
    """Run :func:`check_case` on ``cases`` random cases; raise if any error exceeds its tolerance.

    Call it from your own tests after subclassing :class:`OptimizerLinearization`.

    Returns:
        The worst error of each check over all cases.
    Raises:
        AssertionError: naming the check, its error, and the case (hyper-parameters, steps).

    Example:
        >>> from optimizers import SGDLinearization
        >>> worst = check_linearization(SGDLinearization, cases=2)
        >>> passes(worst)
        True
    """
    rng = random.Random(seed)
    worst = dict.fromkeys(CHECKS, 0.0)
    for _ in range(cases):
        case = draw_case(cls, rng)
        errors = check_case(cls, case)
        for name, err in errors.items():
            if not err <= TOLERANCES[name]:
                raise AssertionError(
                    f"{cls.__name__}: {name} error {err:.3e} > {TOLERANCES[name]:g} for hyper-parameters "
                    f"{case.hyperparameters} after {len(case.history)} steps (seed {seed})"
                )
            worst[name] = max(worst[name], err)
    return worst


def report(cases: int = 30, seed: int = 0) -> list[tuple[str, str, float, bool]]:
    """Rows (optimizer, check, worst error, passed) for every registered linearization.

    Args:
        cases: random cases per optimizer.
        seed: seed of each optimizer's ``random.Random``.
    Returns:
        One row per (registered optimizer, check), sorted by optimizer name.
    Example:
        >>> rows = report(cases=1)
        >>> rows[0][:2], all(ok for *_, ok in rows)
        (('Adagrad', 'update_vs_torch'), True)
    """
    rows = []
    for opt_cls, lin_cls in sorted(registered().items(), key=lambda kv: kv[0].__name__):
        rng = random.Random(seed)
        worst = dict.fromkeys(CHECKS, 0.0)
        for _ in range(cases):
            for name, err in check_case(lin_cls, draw_case(lin_cls, rng)).items():
                worst[name] = max(worst[name], err)
        rows += [(opt_cls.__name__, name, err, err <= TOLERANCES[name]) for name, err in worst.items()]
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
        20 passed, 0 failed
        0
    """
    parser = argparse.ArgumentParser(prog="python -m optimizers.conformance", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=30, help="random cases per optimizer (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = report(args.cases, args.seed)
    print(f"Conformance of every registered linearization ({args.cases} random cases each, float64)")
    print(f"{'optimizer':<10} {'check':<18} {'worst rel. error':>16} {'tolerance':>10}  result")
    for opt, check, err, ok in rows:
        print(f"{opt:<10} {check:<18} {err:>16.3e} {TOLERANCES[check]:>10.0e}  {'pass' if ok else 'FAIL'}")
    failed = sum(not ok for *_, ok in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

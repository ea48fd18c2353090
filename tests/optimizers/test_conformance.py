"""Every registered linearization against sympy, finite differences and the real torch step (hypothesis-drawn states)."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optimizers
from optimizers import _base
from optimizers.conformance import (
    CHECKS,
    FD_CHECKS,
    OPERATOR_CHECKS,
    TOLERANCES,
    Case,
    check_case,
    check_linearization,
    checks_for,
    draw_case,
    float64_newton_schulz,
    main,
    passes,
    report,
)
from tests._helpers import one_torch_thread  # noqa: F401  (autouse fixture)

REGISTERED = sorted(optimizers.registered().values(), key=lambda c: c.__name__)
ELEMENTWISE = [c for c in REGISTERED if c.structure == "elementwise"]
OPERATORS = [c for c in REGISTERED if c.structure == "operator"]


def test_every_registered_class_has_a_route():
    """Each registered class is checked by exactly one of the three check sets (none silently unchecked)."""
    for cls in REGISTERED:
        assert checks_for(cls) in (CHECKS, FD_CHECKS) or checks_for(cls)[:4] == OPERATOR_CHECKS, cls.__name__
    assert {c.optimizer_class for c in OPERATORS} >= {torch.optim.Muon, torch.optim.Adafactor}


@pytest.mark.parametrize("cls", ELEMENTWISE, ids=lambda c: c.__name__)
@given(rng=st.randoms(use_true_random=False))
def test_random_states_conform(cls, rng):
    case = draw_case(cls, rng)
    errors = check_case(cls, case)
    assert set(errors) == set(checks_for(cls)) and not errors.skipped
    assert passes(errors), (case.hyperparameters, len(case.history), errors)


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
@given(rng=st.randoms(use_true_random=False))
@settings(max_examples=20, deadline=None)
def test_random_operator_states_conform(cls, rng):
    case = draw_case(cls, rng)
    errors = check_case(cls, case)
    # Every check ran, except a secant that was refused for a jump (and then said so).
    assert set(errors) | set(errors.skipped) == set(checks_for(cls)), (errors, errors.skipped)
    assert set(errors.skipped) <= {"secant_efficiency"}
    assert all("UpdateJumpError" in r for r in errors.skipped.values())
    assert passes(errors), (case.hyperparameters, len(case.history), tuple(case.grad.shape), errors)


def _corner_cases():
    """Named corners: step 1, v == 0 coordinates, eps-dominated v, maximize, amsgrad."""
    n = 6
    theta = torch.linspace(-1.5, 2.0, n, dtype=torch.float64)
    grad = torch.tensor([0.0, 1e-12, -0.3, 2.0, 0.0, -40.0], dtype=torch.float64)
    never = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # first coords: v stays 0
    tiny = torch.full((n,), 1e-13, dtype=torch.float64)
    history = tuple(never * torch.randn(n, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in range(3))
    out = []
    for cls in ELEMENTWISE:
        base = {"lr": 0.05}
        out.append((cls, "step 1", Case(base, (), theta, grad)))
        out.append((cls, "v == 0 coordinates", Case(base, history, theta, grad)))
        out.append((cls, "eps-dominated v", Case(base, (tiny, -tiny), theta, grad * 1e-11)))
        out.append((cls, "maximize", Case({**base, "maximize": True}, history, theta, grad)))
    adam_like = [c for c in REGISTERED if c.optimizer_class in (torch.optim.Adam, torch.optim.AdamW)]
    for cls in adam_like:
        out.append((cls, "amsgrad", Case({"lr": 0.05, "amsgrad": True}, history, theta, grad)))
        out.append((cls, "amsgrad, max wins", Case({"lr": 0.05, "amsgrad": True}, (10 * history[0],), theta, grad * 1e-3)))
        out.append((cls, "L2 decay, step 1", Case({"lr": 0.05, "weight_decay": 0.1}, (), theta, grad)))
    return out


def _matrices(shape, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(k)]


def _operator_corner_cases():
    """Muon and Adafactor corners: first step (the secant is refused), after steps, every shape they take."""
    muon, ada = optimizers.MuonLinearization, optimizers.AdafactorLinearization
    th, g, *hist = _matrices((3, 5), 5)
    out = [
        (muon, "step 1", Case({"lr": 0.02}, (), th, g), True),
        (muon, "after 3 steps, Nesterov", Case({"lr": 0.02}, tuple(hist[:3]), th, g), False),
        (muon, "plain momentum, wide", Case({"lr": 0.02, "nesterov": False}, tuple(hist[:3]), th, g), False),
        (muon, "tall, match_rms_adamw", Case({"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"}, tuple(h.T for h in hist[:2]), th.T, g.T), False),
        (muon, "momentum 0 (every step jumps)", Case({"lr": 0.02, "momentum": 0.0}, tuple(hist[:2]), th, g), True),
        (muon, "cubic NS, 3 steps", Case({"lr": 0.02, "ns_coefficients": (1.5, -0.5, 0.0), "ns_steps": 3}, tuple(hist[:2]), th, g), False),
    ]
    for shape in [(3, 5), (2, 3, 4), (7,), ()]:
        th, g, *hist = _matrices(shape, 5, seed=1)
        out.append((ada, f"step 1, shape {shape}", Case({"lr": 0.01}, (), th, g), True))
        out.append((ada, f"after 3 steps, shape {shape}", Case({"lr": 0.01}, tuple(hist[:3]), th, g), False))
        out.append((ada, f"clipping on, maximize, foreach, shape {shape}",
                    Case({"lr": 0.01, "maximize": True, "foreach": True, "d": 1.0}, tuple(hist[:2]), th, 5 * g), False))
        out.append((ada, f"eps1 given, decay, shape {shape}",
                    Case({"lr": 0.3, "eps": (1e-3, 1e-3), "weight_decay": 0.1, "beta2_decay": -0.5}, tuple(hist[:3]), th, g), False))
    return out


@pytest.mark.parametrize("cls,label,case", _corner_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_corner_cases_conform(cls, label, case):
    errors = check_case(cls, case)
    assert passes(errors), (cls.__name__, label, errors)


@pytest.mark.parametrize("cls,label,case,jumps", _operator_corner_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_operator_corner_cases_conform(cls, label, case, jumps):
    errors = check_case(cls, case)
    assert passes(errors), (cls.__name__, label, errors)
    # The secant is refused exactly where the update jumps at g = 0, and checked everywhere else.
    assert ("secant_efficiency" in errors.skipped) == jumps, (label, errors, errors.skipped)
    if jumps:
        assert "jumps at g = 0" in errors.skipped["secant_efficiency"]


def test_check_linearization_reports_a_wrong_tangent():
    """The conformance check must be able to fail: a subclass with a deliberately wrong tangent."""

    class BrokenSGD(optimizers.SGDLinearization, optimizer=torch.optim.SGD, replace=True):
        @classmethod
        def tangent_rule(cls, theta, grad, state):
            return 1.001 * super().tangent_rule(theta, grad, state)

    try:
        with pytest.raises(AssertionError, match="tangent_vs_sympy"):
            check_linearization(BrokenSGD, cases=3)
    finally:
        optimizers._base._REGISTRY[torch.optim.SGD] = optimizers.SGDLinearization  # undo the replacement


def _without_sympy(cls):
    """``cls`` with its sympy model removed (not registered): the finite-difference route checks it."""
    return type(f"NoSympy{cls.__name__}", (cls,), {"symbolic_update": classmethod(_base.OptimizerLinearization.symbolic_update.__func__)})


@pytest.mark.parametrize("cls", [optimizers.AdamLinearization, optimizers.RMSpropLinearization, optimizers.SGDLinearization], ids=lambda c: c.__name__)
def test_the_finite_difference_route_certifies_a_rule_without_sympy(cls):
    plain = _without_sympy(cls)
    assert checks_for(plain) == FD_CHECKS
    worst = check_linearization(plain, cases=12, seed=2)
    assert set(worst) == set(FD_CHECKS) and passes(worst)


def test_the_finite_difference_route_reports_a_wrong_tangent_and_secant():
    class BrokenTangent(_without_sympy(optimizers.AdamLinearization)):
        @classmethod
        def tangent_rule(cls, theta, grad, state):
            return 1.0001 * super().tangent_rule(theta, grad, state)

    class BrokenSecant(_without_sympy(optimizers.AdamLinearization)):
        @classmethod
        def secant_rule(cls, theta, grad, state):
            return 1.0001 * super().secant_rule(theta, grad, state)

    with pytest.raises(AssertionError, match="tangent_vs_torch_fd"):
        check_linearization(BrokenTangent, cases=6)
    with pytest.raises(AssertionError, match="secant_vs_torch"):
        check_linearization(BrokenSecant, cases=6)


def test_the_operator_checks_report_a_wrong_tangent_secant_and_update():
    """Each operator check fails on the mistake it is there for."""

    class ScaledTangent(optimizers.AdafactorLinearization):  # no optimizer=: not registered
        def preconditioner(self, param, grad, kind="tangent"):
            P = super().preconditioner(param, grad, kind)
            return optimizers.Operator(lambda v: 1.0001 * P.apply(v), P.shape) if kind == "tangent" else P

    class ScaledSecant(optimizers.AdafactorLinearization):
        def preconditioner(self, param, grad, kind="tangent"):
            P = super().preconditioner(param, grad, kind)
            if kind != "secant":
                return P
            op = optimizers.Operator(lambda v: 1.0001 * P.apply(v), P.shape)
            op.diagnostics = {"efficiency_gap": 0.0}  # hide the real gap: the recomputed identities still fail
            return op

    class UndampedMuon(optimizers.MuonLinearization):
        """B' = μB + g (torch's docstring) instead of the code's lerp, μB + (1 − μ)g."""

        @staticmethod
        def _direction(grad, st):
            buf = torch.zeros_like(grad) if st.momentum_buffer is None else st.momentum_buffer
            new = st.momentum * buf + grad
            return grad + st.momentum * new if st.nesterov else new

    th, g, *hist = _matrices((3, 4), 4, seed=3)
    case = Case({"lr": 0.01}, tuple(hist), th, g)
    assert check_case(ScaledTangent, case)["tangent_vs_fd"] > 1e-5
    assert check_case(ScaledTangent, case)["tangent_vs_torch_fd"] > 1e-5
    assert check_case(ScaledSecant, case)["secant_efficiency"] > 1e-5
    errors = check_case(UndampedMuon, Case({"lr": 0.02}, tuple(hist), th, g))
    assert errors["update_vs_torch"] > 1e-3 and errors["update_vs_torch_bf16"] > TOLERANCES["update_vs_torch_bf16"]
    assert not passes(errors)


def test_float64_newton_schulz_restores_torch_and_matches_the_twin_only_inside():
    import torch.optim._muon as m

    original = m._zeropower_via_newtonschulz
    th, g, *hist = _matrices((3, 5), 4, seed=4)
    case = Case({"lr": 0.02}, tuple(hist), th, g)
    with float64_newton_schulz():
        assert m._zeropower_via_newtonschulz is not original
    assert m._zeropower_via_newtonschulz is original
    with pytest.raises(RuntimeError), float64_newton_schulz():
        raise RuntimeError("restored on errors too")
    assert m._zeropower_via_newtonschulz is original
    errors = check_case(optimizers.MuonLinearization, case)
    assert errors["update_vs_torch"] < 1e-10  # float64 Newton–Schulz: torch's code path is the twin
    assert errors["update_vs_torch_bf16"] > 1e-6  # bfloat16: it is not


def test_report_command_prints_every_optimizer(capsys):
    assert main(["--cases", "2"]) == 0
    out = capsys.readouterr().out
    for cls in REGISTERED:
        assert cls.optimizer_class.__name__ in out
    total = sum(len(checks_for(c)) for c in REGISTERED)
    assert f"{total} passed, 0 failed" in out
    assert "secant_efficiency" in out and "update_vs_torch_bf16" in out


def test_report_notes_the_skipped_first_step_secant():
    rows = {(opt, check): note for opt, check, _, ok, note in report(cases=6, seed=0) if opt in ("Muon", "Adafactor")}
    assert any("jumps at g = 0" in note for (opt, check), note in rows.items() if opt == "Muon" and check == "secant_efficiency")


def test_draw_case_is_reproducible():
    a = draw_case(optimizers.AdamLinearization, random.Random(3))
    b = draw_case(optimizers.AdamLinearization, random.Random(3))
    assert a.hyperparameters == b.hyperparameters and torch.equal(a.grad, b.grad)
    for cls in OPERATORS:
        a, b = draw_case(cls, random.Random(3)), draw_case(cls, random.Random(3))
        assert torch.equal(a.grad, b.grad) and tuple(a.grad.shape) in cls.conformance_shapes


def test_muon_cases_are_matrices():
    rng = random.Random(0)
    assert all(draw_case(optimizers.MuonLinearization, rng).theta.dim() == 2 for _ in range(20))

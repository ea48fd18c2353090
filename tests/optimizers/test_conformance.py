"""Every registered linearization against sympy and the real torch step (hypothesis-drawn states)."""

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import optimizers
from optimizers.conformance import Case, check_case, check_linearization, draw_case, main, passes

REGISTERED = sorted(optimizers.registered().values(), key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", REGISTERED, ids=lambda c: c.__name__)
@given(rng=st.randoms(use_true_random=False))
def test_random_states_conform(cls, rng):
    case = draw_case(cls, rng)
    errors = check_case(cls, case)
    assert passes(errors), (case.hyperparameters, len(case.history), errors)


def _corner_cases():
    """Named corners: step 1, v == 0 coordinates, eps-dominated v, maximize, amsgrad."""
    n = 6
    theta = torch.linspace(-1.5, 2.0, n, dtype=torch.float64)
    grad = torch.tensor([0.0, 1e-12, -0.3, 2.0, 0.0, -40.0], dtype=torch.float64)
    never = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # first coords: v stays 0
    tiny = torch.full((n,), 1e-13, dtype=torch.float64)
    history = tuple(never * torch.randn(n, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in range(3))
    out = []
    for cls in REGISTERED:
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


@pytest.mark.parametrize("cls,label,case", _corner_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_corner_cases_conform(cls, label, case):
    errors = check_case(cls, case)
    assert passes(errors), (cls.__name__, label, errors)


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


def test_report_command_prints_every_optimizer(capsys):
    assert main(["--cases", "2"]) == 0
    out = capsys.readouterr().out
    for cls in REGISTERED:
        assert cls.optimizer_class.__name__ in out
    assert f"{4 * len(REGISTERED)} passed, 0 failed" in out


def test_draw_case_is_reproducible():
    a = draw_case(optimizers.AdamLinearization, random.Random(3))
    b = draw_case(optimizers.AdamLinearization, random.Random(3))
    assert a.hyperparameters == b.hyperparameters and torch.equal(a.grad, b.grad)

"""Replay leave-one-out (the trajectory truth): K = 1 is the per-step LOO, a closed form, no mutation, errors."""

from __future__ import annotations

import copy
import doctest
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import validation._replay
from tests._helpers import assert_close, one_torch_thread  # noqa: F401  (autouse fixture)
from tests.validation._models import DT, assert_unchanged, loss_for, make_batch, make_model, seeds, snapshot, warm_up
from validation import leave_one_out, replay_leave_one_out

DOC = Path(__file__).resolve().parents[2] / "docs" / "validation.md"

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "adam": (torch.optim.Adam, dict(lr=0.01)),
}


def recorded_run(opt_name: str, *, steps: int = 4, n: int = 5, seed: int = 0, warm: int = 2):
    """A float64 MLP and its optimizer after ``warm`` steps (``.grad`` of the next batch left in
    place, as just before ``step()``), the recorded batches of the next ``steps`` steps, a validation batch."""
    model = make_model("mlp", seed)
    cls, kw = OPTIMIZERS[opt_name]
    opt = cls(model.parameters(), **kw)
    loss_fn = loss_for("mlp")
    batches = [make_batch("mlp", n, seed + 10 + k) for k in range(steps)]
    warm_up(model, opt, loss_fn, batches[0], warm)
    return model, opt, loss_fn, batches, make_batch("mlp", 7, seed + 1)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_one_step_horizon_is_the_per_step_leave_one_out(opt_name):
    model, opt, loss_fn, batches, val = recorded_run(opt_name)
    r = replay_leave_one_out(model, opt, loss_fn, batches, val, horizons=(1, 4))
    assert r.shape == (5, 2) and r.dtype == torch.float64
    loo = leave_one_out(model, opt, loss_fn, batches[0], val)
    assert_close(r[:, 0], loo, rtol=0, atol=1e-10, name=f"{opt_name}: R(1) vs LOO")
    assert loo.abs().max() > 1e-6  # a real check, not 0 == 0
    # A later valued step: step_index picks the batch, the state is the caller's.
    r2 = replay_leave_one_out(model, opt, loss_fn, batches, val, horizons=(1, 2), step_index=2, samples=[4, 0])
    assert_close(r2[:, 0], leave_one_out(model, opt, loss_fn, batches[2], val)[[4, 0]], rtol=0, atol=1e-10)


def test_several_validation_batches_and_optimizers_and_sample_subsets():
    model, opt, loss_fn, batches, val = recorded_run("adam")
    val2 = make_batch("mlp", 3, 99)
    r = replay_leave_one_out(model, opt, loss_fn, batches, [val, val2], horizons=(1, 3))
    assert r.shape == (5, 2, 2)
    assert_close(r[..., 0], replay_leave_one_out(model, opt, loss_fn, batches, val, horizons=(1, 3)), rtol=0, atol=0)
    assert_close(r[[3, 1], :, 1], replay_leave_one_out(model, opt, loss_fn, batches, val2, horizons=(1, 3), samples=torch.tensor([3, 1])))
    # A list of optimizers (each parameter held by one), as leave_one_out takes it.
    model = make_model("mlp", 0)
    params = list(model.parameters())
    opts = [torch.optim.Adam(params[:2], lr=0.01), torch.optim.SGD(params[2:], lr=0.1, momentum=0.9)]
    r = replay_leave_one_out(model, opts, loss_fn, batches, val, horizons=(1, 2))
    assert_close(r[:, 0], leave_one_out(model, opts, loss_fn, batches[0], val), rtol=0, atol=1e-10)


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_matches_a_brute_force_replay_that_drops_z_from_the_loss(opt_name):
    # Independent of c_z: without z, step 0's loss is the sum over the others divided by the full
    # n (the same normalisation); every later step is the ordinary training step.
    model, opt, loss_fn, batches, val = recorded_run(opt_name, n=5)
    horizons = (1, 2, 4)

    def run(z):
        model2, opt2 = copy.deepcopy((model, opt))
        out = []
        for k, (x, y) in enumerate(batches):
            opt2.zero_grad()
            keep = torch.arange(len(y)) != z
            loss = F.cross_entropy(model2(x[keep]), y[keep], reduction="sum") / len(y) if k == 0 else loss_fn(model2(x), y)
            loss.backward()
            opt2.step()
            if k + 1 in horizons:
                with torch.no_grad():
                    out.append(loss_fn(model2(val[0]), val[1]).double())
        return torch.stack(out)

    recorded = run(-1)
    expected = torch.stack([run(z) - recorded for z in range(5)])
    assert_close(replay_leave_one_out(model, opt, loss_fn, batches, val, horizons=horizons), expected, rtol=0, atol=1e-12)


def closed_form(w0, batches, val, z, lr, horizons):
    """R_z(K) for a bias-free linear model, MSE (mean), plain SGD, by hand.

    With L_k(w) = (1/n) ‖X_k w − y_k‖² the gradient is affine, g_k(w) = A_k w − b_k with
    A_k = (2/n) X_kᵀ X_k, b_k = (2/n) X_kᵀ y_k, and z's share at step 0 is
    c_z = (2/n) (x_zᵀ w_0 − y_z) x_z. Recorded: w_{k+1} = w_k − lr g_k(w_k). Without z:
    w'_1 = w_1 + lr c_z; later steps use their full batches, so δ_k = w'_k − w_k obeys
    δ_{k+1} = (I − lr A_k) δ_k. With L_val(w) = (1/m) ‖X_v w − y_v‖² and r_K = X_v w_K − y_v:
    R_z(K) = L_val(w_K + δ_K) − L_val(w_K) = (2/m) r_Kᵀ X_v δ_K + (1/m) ‖X_v δ_K‖².
    """
    xs = [x for x, _ in batches]
    ys = [y[:, 0] for _, y in batches]
    n, d = xs[0].shape
    A = [2 / n * x.T @ x for x in xs]
    b = [2 / n * x.T @ y for x, y in zip(xs, ys)]
    c_z = 2 / n * (xs[0][z] @ w0 - ys[0][z]) * xs[0][z]
    xv, yv = val[0], val[1][:, 0]
    m = len(yv)
    w, delta, out = w0.clone(), None, []
    for k in range(max(horizons)):
        if k == 0:
            delta = lr * c_z
        else:
            delta = (torch.eye(d, dtype=DT) - lr * A[k]) @ delta
        w = w - lr * (A[k] @ w - b[k])
        if k + 1 in horizons:
            r = xv @ w - yv
            out.append(2 / m * r @ (xv @ delta) + 1 / m * (xv @ delta) @ (xv @ delta))
    return torch.stack(out)


@given(seed=seeds(), lr=st.sampled_from([0.01, 0.1, 0.3]), z=st.integers(0, 3))
def test_linear_regression_under_plain_sgd_matches_the_closed_form(seed, lr, z):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=DT)  # noqa: E731
    model = nn.Linear(3, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(randn(1, 3))
    batches = [(randn(4, 3), randn(4, 1)) for _ in range(3)]
    val = (randn(6, 3), randn(6, 1))
    expected = closed_form(model.weight.detach()[0].clone(), batches, val, z, lr, (1, 2, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    r = replay_leave_one_out(model, opt, F.mse_loss, batches, val, horizons=(1, 2, 3))
    assert_close(r[z], expected, rtol=1e-9, atol=1e-13, name="R_z(K), K = 1, 2, 3")


@pytest.mark.parametrize("opt_name", ["adam", "sgd_momentum"])
def test_a_sample_with_zero_contribution_changes_nothing(opt_name):
    # Bias-free linear model, MSE: x_z = 0 and y_z = 0 give c_z = (2/n)(w·0 − 0)·0 = 0 exactly,
    # so g_B − c_z is g_B bit for bit and both replays are the same trajectory.
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).to(DT)
    cls, kw = OPTIMIZERS[opt_name]
    opt = cls(model.parameters(), **kw)
    batches = [(torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)) for _ in range(5)]
    batches[0][0][2], batches[0][1][2] = 0.0, 0.0
    val = (torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT))
    r = replay_leave_one_out(model, opt, F.mse_loss, batches, val, horizons=(1, 2, 5))
    assert torch.equal(r[2], torch.zeros(3, dtype=torch.float64))
    assert (r[[0, 1, 3]].abs() > 0).all()


def test_the_caller_model_optimizer_and_rng_are_left_bit_identical():
    model, opt, loss_fn, batches, val = recorded_run("adam")
    before = snapshot(model, opt)
    rng = torch.get_rng_state()
    first = replay_leave_one_out(model, opt, loss_fn, batches, val, horizons=(1, 2, 4))
    assert_unchanged(before, snapshot(model, opt), "replay_leave_one_out: ")
    assert torch.equal(torch.get_rng_state(), rng)
    # Deterministic: a second call gives the same bits.
    assert torch.equal(first, replay_leave_one_out(model, opt, loss_fn, batches, val, horizons=(1, 2, 4)))


def test_a_random_forward_at_the_valued_step_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).to(DT).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [make_batch("mlp", 4, k) for k in range(2)]
    with pytest.raises(ValueError, match="forward pass is random"):
        replay_leave_one_out(model, opt, loss_for("mlp"), batches, make_batch("mlp", 3, 9), horizons=(1, 2))


@pytest.fixture
def small():
    model, opt, loss_fn, batches, val = recorded_run("sgd", steps=3, n=4, warm=0)
    return lambda **kw: replay_leave_one_out(model, opt, loss_fn, kw.pop("batches", batches), val, **kw)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(horizons=(3, 1)), ValueError, r"horizons must be positive and strictly increasing, got \(3, 1\)\. Fix: "),
        (dict(horizons=(0, 1)), ValueError, r"positive and strictly increasing, got \(0, 1\)"),
        (dict(horizons=()), ValueError, r"strictly increasing, got \(\)"),
        (dict(horizons=(1, 1)), ValueError, r"strictly increasing, got \(1, 1\)"),
        (dict(horizons=(1, 2.5)), TypeError, r"horizons must hold ints .* got 2\.5"),
        (dict(horizons=3), TypeError, r"horizons must be a sequence of ints, got int 3"),
        (dict(horizons=(1, 4)), ValueError,
         r"horizons go up to 4 steps, but batches records only 3 step\(s\) from step_index=0 .*Fix: record at least 4 batches"),
        (dict(horizons=(1, 2), step_index=2), ValueError, r"only 1 step\(s\) from step_index=2 \(batches\[2:\]\)"),
        (dict(step_index=3, horizons=(1,)), ValueError, r"step_index=3 is outside batches, which records 3 step\(s\)\. Fix: 0 <= step_index < 3"),
        (dict(step_index=-1, horizons=(1,)), ValueError, r"step_index=-1 is outside batches"),
        (dict(step_index=1.0, horizons=(1,)), TypeError, r"step_index must be an int"),
        (dict(samples=[0, 4], horizons=(1,)), ValueError, r"samples holds 4, outside batches\[0\], which has n = 4 samples\. Fix: indices 0 <= i < 4"),
        (dict(samples=[-1], horizons=(1,)), ValueError, r"samples holds -1"),
        (dict(samples=[], horizons=(1,)), ValueError, r"samples is empty"),
        (dict(samples=[0.5], horizons=(1,)), TypeError, r"samples must hold ints, got 0\.5"),
        (dict(samples=torch.tensor([True]), horizons=(1,)), TypeError, r"samples must be a 1-D integer tensor"),
        (dict(val_train_mode=1, horizons=(1,)), TypeError, r"val_train_mode must be a bool, got 1"),
        (dict(batches=make_batch("mlp", 4, 0), horizons=(1,)), TypeError, r"batches must be a list of \(inputs, targets\) pairs, one per optimizer step"),
        (dict(batches=[make_batch("mlp", 4, 0), (torch.zeros(4, 4, dtype=DT),)], horizons=(1, 2)), TypeError,
         r"batches\[1\] must be a pair \(inputs, targets\), got tuple of length 1"),
    ],
)
def test_errors_name_the_argument_and_the_fix(small, kwargs, error, message):
    with pytest.raises(error, match=message):
        small(**kwargs)


def test_the_docstring_example_passes():
    result = doctest.testmod(validation._replay, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_the_docs_example_runs_and_says_what_the_page_claims():
    text = DOC.read_text()
    section = text[text.index("## Trajectory truth: replay leave-one-out"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    r, loo = namespace["r"], namespace["loo"]
    assert r.shape == (8, 3)
    assert_close(r[:, 0], loo, rtol=0, atol=1e-10)

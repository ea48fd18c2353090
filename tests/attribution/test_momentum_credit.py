"""``credit="momentum"``: the update carried by the momentum buffer, credited back to the samples that put it there."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import optimizers
import validation
from attribution import InRunShapley
from tests._helpers import assert_close

LOSS = nn.functional.cross_entropy
GEN = torch.Generator().manual_seed(1)
X = torch.randn(64, 5, generator=GEN, dtype=torch.float64)
Y = torch.randint(0, 3, (64,), generator=GEN)
VAL = (X[56:], Y[56:])

MOMENTUM = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd-dampening": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "adam-maximize": lambda p: torch.optim.Adam(p, lr=1e-2, maximize=True),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(s: int) -> list[int]:
    return [(7 * s + j) % 56 for j in range(7)]


# ------------------------------------------------------------------ the optimizer side
@given(name=st.sampled_from(sorted(MOMENTUM)), warm=st.integers(0, 3), seed=st.integers(0, 10**6))
def test_the_carried_update_is_linear_in_the_buffer_and_the_buffer_follows_decay_and_gain(name, warm, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64))
    opt = MOMENTUM[name]([w])
    for _ in range(warm):
        w.grad = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        opt.step()
    g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    w.grad = g
    lin = optimizers.linearize(opt, copy_state=True)
    cls, key = type(lin), type(lin).momentum_buffer
    carry = lin.momentum_carry(w)
    zero = torch.zeros_like(w)
    if carry.slope is None:
        assert warm == 0 and key not in opt.state[w]
    else:
        # Δ(0) is affine in the buffer with slope K: Δ(0; b) − Δ(0; 0) = K ⊙ b for any b.
        theta, _, state = lin._inputs(w, zero)
        b = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        import dataclasses

        at = lambda buf: cls.update_rule(theta, zero, dataclasses.replace(state, **{key: buf}))  # noqa: E731
        assert_close(at(b) - at(torch.zeros_like(b)), carry.slope * b, rtol=1e-10, atol=1e-16)
        before = opt.state[w][key].clone()
    opt.step()
    after = opt.state[w][key]
    expected = carry.gain * g + (carry.decay * before if carry.slope is not None else 0.0)
    assert_close(after, expected, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: torch.optim.Muon(p), "Newton–Schulz"),
        (lambda p: torch.optim.RMSprop(p, momentum=0.9), "not linear in the gradients"),
    ],
)
def test_rules_whose_carried_update_is_not_linear_are_refused_up_front(make, match):
    model = nn.Sequential(nn.Linear(5, 3, bias=False)).double()
    with pytest.raises(optimizers.UnsupportedOptimizerError, match=match):
        InRunShapley(model, make(model.parameters()), LOSS, VAL, credit="momentum")


def test_rules_without_momentum_pass_through_and_stream_is_refused():
    model = _model()
    for opt in (torch.optim.Adagrad(model.parameters()), torch.optim.RMSprop(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1)):
        InRunShapley(model, opt, LOSS, VAL, credit="momentum").close()
    with pytest.raises(ValueError, match="credit='momentum' keeps each step's captured factors"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), LOSS, VAL, credit="momentum", stream=True, val_point="current")
    with pytest.raises(ValueError, match="credit='credit' is not accepted"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), LOSS, VAL, credit="credit")
    with pytest.raises(ValueError, match="momentum_window=0 must be at least 1"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), LOSS, VAL, credit="momentum", momentum_window=0)


# ------------------------------------------------------------------ the tracker
def _run(name: str, steps: int, **kw):
    model = _model()
    opt = MOMENTUM[name](model.parameters())
    tracker = InRunShapley(model, opt, LOSS, VAL, record_steps=True, **kw)
    first_order = 0.0
    for s in range(steps):
        ids = _batch(s)
        opt.zero_grad()
        with tracker.batch(ids):
            LOSS(model(X[ids]), Y[ids]).backward()
        before = [p.detach().clone() for p in model.parameters()]
        v = torch.autograd.grad(LOSS(model(VAL[0]), VAL[1]), list(model.parameters()))
        opt.step()
        first_order -= sum(float((g * (p.detach() - b)).sum()) for g, p, b in zip(v, model.parameters(), before))
    return model, opt, tracker, first_order


@pytest.mark.parametrize("name", ["sgd-momentum", "sgd-dampening", "sgd-nesterov", "adam", "adam-maximize", "nadam", "radam", "adamax"])
def test_a_run_s_values_add_up_to_its_first_order_change(name):
    """Within the window the credit is exact: Σ values = Σ_s −⟨∇L_val(θ_s), θ_{s+1} − θ_s⟩ (no weight decay)."""
    steps = 6
    _, _, step_tracker, first_order = _run(name, steps, val_point="current", route="linear")
    _, _, tracker, again = _run(name, steps, val_point="current", route="linear", credit="momentum", momentum_window=steps)
    assert again == first_order  # attaching either tracker changes nothing
    total = float(tracker.values()["value"].sum())
    assert total == pytest.approx(first_order, rel=1e-9)
    share = float(step_tracker.values()["value"].sum()) / first_order
    assert share < 0.9  # the per-step game leaves the carried part to nobody
    for t in (step_tracker, tracker):
        t.close()


def test_each_carried_credit_is_the_samples_gradient_in_the_buffer_times_the_later_slope():
    """SGD momentum: step s credits a sample z of step r with η μ^{s−r} ⟨∇L_val(θ_s), c_z⟩ (oracle per-sample gradients)."""
    model = _model()
    lr, mu = 0.05, 0.9
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mu)
    tracker = InRunShapley(model, opt, LOSS, VAL, record_steps=True, val_point="current", credit="momentum", momentum_window=4)
    contributions = {}
    expected = {}
    for s in range(3):
        ids = _batch(s)
        contributions[s] = validation.per_sample_grads(model, LOSS, (X[ids], Y[ids]))
        v = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(LOSS(model(VAL[0]), VAL[1]), list(model.parameters()))))
        for r in range(s):
            expected[(s, r)] = lr * mu ** (s - r) * sum((contributions[r][n] * v[n]).reshape(7, -1).sum(1) for n in v)
        opt.zero_grad()
        with tracker.batch(ids):
            LOSS(model(X[ids]), Y[ids]).backward()
        opt.step()
    hist = tracker.history()
    carried = hist[hist.route == "carry"]
    assert set(zip(carried.step, carried.origin)) == set(expected)
    for (s, r), want in expected.items():
        got = carried[(carried.step == s) & (carried.origin == r)].sort_values("position")["value"].to_numpy()
        assert_close(torch.tensor(got), want, rtol=1e-9, atol=1e-15)
    assert_close(torch.tensor(hist.groupby("id")["value"].sum().to_numpy()), torch.tensor(tracker.values()["value"].to_numpy()), rtol=1e-12)
    assert tracker.momentum_bytes > 0
    tracker.close()


def test_the_window_closes_with_the_geometric_tail():
    """window=1: the credit of step r arrives at step r + 1, with the rest of its tail a / (1 − μ)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = InRunShapley(model, opt, LOSS, VAL, record_steps=True, val_point="current", credit="momentum", momentum_window=1)
    c0 = validation.per_sample_grads(model, LOSS, (X[_batch(0)], Y[_batch(0)]))
    for s in range(2):
        ids = _batch(s)
        if s == 1:
            v = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(LOSS(model(VAL[0]), VAL[1]), list(model.parameters()))))
            want = 0.05 * 0.9 / (1 - 0.9) * sum((c0[n] * v[n]).reshape(7, -1).sum(1) for n in v)
        opt.zero_grad()
        with tracker.batch(ids):
            LOSS(model(X[ids]), Y[ids]).backward()
        opt.step()
    hist = tracker.history()
    got = hist[(hist.route == "carry") & (hist.origin == 0)].sort_values("position")["value"].to_numpy()
    assert_close(torch.tensor(got), want, rtol=1e-9, atol=1e-15)
    assert len(tracker._momentum.open) == 1  # step 1's own samples wait for step 2
    tracker.close()


def test_training_is_bit_identical_with_momentum_credit():
    a_model = _model()
    a_opt = torch.optim.AdamW(a_model.parameters(), lr=1e-2)
    b_model, b_opt = copy.deepcopy((a_model, a_opt))
    tracker = InRunShapley(a_model, a_opt, LOSS, VAL, credit="momentum")
    for s in range(4):
        ids = _batch(s)
        for model, opt, t in ((a_model, a_opt, tracker), (b_model, b_opt, None)):
            opt.zero_grad()
            if t is not None:
                with t.batch(ids):
                    LOSS(model(X[ids]), Y[ids]).backward()
            else:
                LOSS(model(X[ids]), Y[ids]).backward()
            opt.step()
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(p, q)
    for key in ("exp_avg", "exp_avg_sq"):
        for p, q in zip(a_model.parameters(), b_model.parameters()):
            assert torch.equal(a_opt.state[p][key], b_opt.state[q][key])
    tracker.close()


def test_save_closes_the_open_window_in_the_file_only(tmp_path):
    """No value is lost on resume: the file holds the open steps' tail estimate; the live tracker keeps its window."""
    model, opt, tracker, _ = _run("sgd-momentum", 4, credit="momentum", momentum_window=3)
    live = tracker.values()["value"].copy()
    path = tmp_path / "values.pt"
    tracker.save(path)
    assert tracker.values()["value"].equals(live) and len(tracker._momentum.open) == 3
    tails = sum(float(v.sum()) for _, _, v in tracker._momentum.tails())
    resumed = InRunShapley.load(path, model, opt, LOSS, VAL)
    assert resumed.options["credit"] == "momentum" and resumed.options["momentum_window"] == 3
    assert float(resumed.values()["value"].sum()) == pytest.approx(float(live.sum()) + tails, rel=1e-12)
    assert abs(tails) > 0
    for t in (tracker, resumed):
        t.close()


def test_per_step_values_are_those_of_credit_step():
    """Momentum credit adds carried rows; each step's own values are unchanged."""
    _, _, step_tracker, _ = _run("adam", 4)
    _, _, tracker, _ = _run("adam", 4, credit="momentum")
    own = tracker.history().query("route != 'carry'").reset_index(drop=True)
    base = step_tracker.history()
    assert own[["step", "position", "id", "route"]].equals(base[["step", "position", "id", "route"]])
    assert_close(torch.tensor(own["value"].to_numpy()), torch.tensor(base["value"].to_numpy()), rtol=1e-12)
    for t in (step_tracker, tracker):
        t.close()


def test_a_skipped_step_that_the_optimizer_took_closes_the_window(monkeypatch):
    """Values skipped (non-finite) but the step taken: the buffer moved on without the window, so it is closed, not followed."""
    import warnings

    from attribution import NonFiniteStepWarning

    model = _model()
    opt = MOMENTUM["sgd-momentum"](model.parameters())
    tracker = InRunShapley(model, opt, LOSS, VAL, record_steps=True, credit="momentum", momentum_window=8)
    computer = tracker._computer
    real = computer.step_values

    def nan_at_step_2(*args, **kwargs):
        values = real(*args, **kwargs)
        return values * float("nan") if tracker.steps == 2 else values

    monkeypatch.setattr(computer, "step_values", nan_at_step_2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteStepWarning)
        for s in range(4):
            ids = _batch(s)
            opt.zero_grad()
            with tracker.batch(ids):
                LOSS(model(X[ids]), Y[ids]).backward()
            opt.step()
            if s == 2:
                assert tracker._momentum.open == [] and tracker.skipped_steps == [(2, tracker.skipped_steps[0][1])]
    hist = tracker.history()
    closed = hist[(hist.route == "carry") & (hist.step == 2)]  # credited when step 2 was skipped
    assert set(closed["origin"]) == {0, 1}
    assert not ((hist.route == "carry") & (hist.origin < 2) & (hist.step > 2)).any()  # nothing follows the stale window
    assert torch.isfinite(torch.tensor(tracker.values()["value"].to_numpy())).all()
    tracker.close()


def test_a_replaced_optimizer_state_closes_the_window_and_says_so():
    """load_state_dict gives the optimizer new buffer tensors: the window cannot follow its samples any more."""
    import copy as _copy

    model = _model()
    opt = MOMENTUM["adam"](model.parameters())
    tracker = InRunShapley(model, opt, LOSS, VAL, record_steps=True, credit="momentum", momentum_window=8)
    for s in range(5):
        if s == 3:
            opt.load_state_dict(_copy.deepcopy(opt.state_dict()))  # the same numbers in new tensors
        ids = _batch(s)
        opt.zero_grad()
        with tracker.batch(ids):
            LOSS(model(X[ids]), Y[ids]).backward()
        if s == 3:
            with pytest.warns(UserWarning, match="momentum buffer was replaced"):
                opt.step()
            assert [o.step for o in tracker._momentum.open] == [3]  # the window restarts at this step
        else:
            opt.step()
    hist = tracker.history()
    carried = hist[hist.route == "carry"]
    assert not ((carried.step > 3) & (carried.origin < 3)).any()  # nothing follows the replaced buffer
    assert set(carried[carried.step == 3]["origin"]) == {0, 1, 2}  # closed by their tails there
    tracker.close()

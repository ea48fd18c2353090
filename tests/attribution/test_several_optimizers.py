"""Several optimizers per run: each parameter valued under the optimizer that holds it."""

import copy
import warnings

import pytest
import torch
from torch import nn

import attribution
import optimizers
import validation
from attribution import InRunShapley, TrackerUsageError, UnsteppedParameterWarning
from tests._helpers import assert_close

loss_fn = nn.functional.mse_loss


def _setup(seed=0, steps=2):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    adam = torch.optim.Adam(model[0].parameters(), lr=1e-2)
    sgd = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(20, 3, generator=g, dtype=torch.float64)
    for _ in range(steps):
        for o in (adam, sgd):
            o.zero_grad()
        loss_fn(model(x[:8]), y[:8]).backward()
        adam.step()
        sgd.step()
    for o in (adam, sgd):
        o.zero_grad()
    return model, [adam, sgd], x, y


def _real_directional_values(model, opts, batch, val, eps=1e-6):
    """−⟨∇L_val, ∂Δ/∂(−c_z)⟩ from the REAL optimizers: (Δ(g_B) − Δ(g_B − ε c_z))/ε, by deep copies."""
    params = [p for p in model.parameters()]
    c = validation.per_sample_grads(model, loss_fn, batch)
    val_grad = torch.autograd.grad(loss_fn(model(val[0]), val[1]), params)

    def delta(scale_z, z):
        m2, o2 = copy.deepcopy((model, opts))
        for (name, p2) in m2.named_parameters():
            p2.grad = c[name].sum(0) - scale_z * c[name][z]
        before = [p.detach().clone() for p in m2.parameters()]
        for o in o2:
            o.step()
        return [p.detach() - b for p, b in zip(m2.parameters(), before)]

    n = next(iter(c.values())).shape[0]
    out = []
    for z in range(n):
        full, without = delta(0.0, z), delta(eps, z)
        out.append(-sum(float((gv * (f - w)).sum()) for gv, f, w in zip(val_grad, full, without)) / eps)
    return torch.tensor(out, dtype=torch.float64)


def test_step_values_with_two_optimizers_equal_the_real_optimizers_directional_derivative():
    model, opts, x, y = _setup()
    batch, val = (x[:6], y[:6]), (x[12:], y[12:])
    phi = attribution.step_values(model, opts, loss_fn, batch, val, linearization="tangent", val_point="current")
    ref = _real_directional_values(model, opts, batch, val)
    assert_close(phi, ref, rtol=1e-4, atol=1e-9)


def test_values_split_into_the_shares_of_each_optimizer():
    """φ([adam, sgd]) = φ(adam alone) + φ(sgd alone): each parameter under its own optimizer."""
    model, opts, x, y = _setup()
    batch, val = (x[:6], y[:6]), (x[12:], y[12:])
    both = attribution.step_values(model, opts, loss_fn, batch, val, linearization="secant", val_point="current")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsteppedParameterWarning)
        parts = [attribution.step_values(model, [o], loss_fn, batch, val, linearization="secant", val_point="current") for o in opts]
    assert_close(both, parts[0] + parts[1], rtol=1e-10, atol=1e-15)
    assert float(parts[0].abs().max()) > 0 and float(parts[1].abs().max()) > 0


@pytest.mark.parametrize("order", ["adam first", "sgd first"])
def test_tracker_with_two_optimizers_equals_step_values_whatever_the_step_order(order):
    model, opts, x, y = _setup()
    twin_model, twin_opts = copy.deepcopy((model, opts))
    val = (x[16:], y[16:])
    expected = []
    with InRunShapley(model, opts, loss_fn, val, record_steps=True) as tracker:
        for s in range(3):
            idx = slice(4 * s, 4 * s + 4)
            expected.append(attribution.step_values(twin_model, twin_opts, loss_fn, (x[idx], y[idx]), val, route="auto", seed=s))
            with tracker.batch(list(range(4 * s, 4 * s + 4))):
                loss_fn(model(x[idx]), y[idx]).backward()
            for o in opts if order == "adam first" else opts[::-1]:
                o.step()
            for o in opts:
                o.zero_grad()
            # the twin takes the same step, untracked
            for o in twin_opts:
                o.zero_grad()
            loss_fn(twin_model(x[idx]), y[idx]).backward()
            for o in twin_opts:
                o.step()
        assert tracker.steps == 3
        history = tracker.history()
    got = torch.tensor(history.sort_values(["step", "id"])["value"].to_numpy())
    assert_close(got, torch.cat(expected), rtol=1e-9, atol=1e-15)


def test_attaching_the_tracker_to_two_optimizers_changes_nothing_in_training():
    runs = []
    for tracked in (False, True):
        model, opts, x, y = _setup()
        tracker = InRunShapley(model, opts, loss_fn, (x[16:], y[16:])) if tracked else None
        for s in range(3):
            idx = slice(4 * s, 4 * s + 4)
            ctx = tracker.batch(list(range(4 * s, 4 * s + 4))) if tracked else torch.enable_grad()
            with ctx:
                loss_fn(model(x[idx]), y[idx]).backward()
            for o in opts:
                o.step()
                o.zero_grad()
        runs.append(([p.detach().clone() for p in model.parameters()], [copy.deepcopy(o.state_dict()) for o in opts]))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    for sa, sb in zip(runs[0][1], runs[1][1]):
        for k in sa["state"]:
            for name, v in sa["state"][k].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][k][name]))


def test_a_parameter_held_by_two_optimizers_is_refused_everywhere():
    model, opts, x, y = _setup()
    overlap = [opts[0], torch.optim.SGD(model.parameters(), lr=0.1)]
    for call in (
        lambda: optimizers.linearize(overlap),
        lambda: attribution.step_values(model, overlap, loss_fn, (x[:4], y[:4]), (x[8:], y[8:])),
        lambda: InRunShapley(model, overlap, loss_fn, (x[8:], y[8:])),
    ):
        with pytest.raises(ValueError, match="held by two optimizers"):
            call()


def test_a_trainable_parameter_no_optimizer_holds_is_named_in_a_warning():
    model, opts, x, y = _setup()
    with pytest.warns(UnsteppedParameterWarning, match=r"'2\.weight', '2\.bias'.*pass that optimizer too"):
        InRunShapley(model, opts[:1], loss_fn, (x[8:], y[8:])).close()
    with pytest.warns(UnsteppedParameterWarning, match=r"'2\.weight'"):
        attribution.step_values(model, opts[:1], loss_fn, (x[:4], y[:4]), (x[8:], y[8:]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsteppedParameterWarning)
        InRunShapley(model, opts, loss_fn, (x[8:], y[8:])).close()  # both given: no warning


def test_the_other_optimizer_stepping_behind_the_trackers_back_is_refused():
    model, opts, x, y = _setup()
    with pytest.warns(UnsteppedParameterWarning):
        tracker = InRunShapley(model, opts[:1], loss_fn, (x[16:], y[16:]))
    for s in range(2):
        idx = slice(4 * s, 4 * s + 4)
        if s == 1:
            with pytest.raises(TrackerUsageError, match=r"InRunShapley\(model, \[muon, adamw\]"):
                with tracker.batch(list(range(4))):
                    pass
            break
        with tracker.batch(list(range(4))):
            loss_fn(model(x[idx]), y[idx]).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    tracker.close()


def test_step_with_a_closure_is_refused_with_several_optimizers():
    model, opts, x, y = _setup()
    tracker = InRunShapley(model, opts, loss_fn, (x[16:], y[16:]))

    def closure():
        with tracker.batch([0, 1, 2, 3]):
            loss = loss_fn(model(x[:4]), y[:4])
            loss.backward()
        return loss

    with pytest.raises(TrackerUsageError, match="several tracked optimizers"):
        opts[0].step(closure)
    tracker.close()


def test_linearize_a_list_answers_per_parameter_with_its_owner():
    model, opts, x, y = _setup()
    loss_fn(model(x[:4]), y[:4]).backward()
    group = optimizers.linearize(opts)
    assert isinstance(group, optimizers.LinearizationGroup) and len(group) == 4
    for p in model[0].parameters():
        assert type(group.owner(p)).__name__ == "AdamLinearization"
        assert group.preconditioner(p, p.grad, "tangent").kind == "diagonal"
    for p in model[2].parameters():
        J = group.preconditioner(p, p.grad, "tangent")
        assert J.scalar == pytest.approx(-0.1 * 1.0)  # SGD with momentum after steps: −η(1 − d), d = 0
    only = optimizers.linearize(opts, params=list(model[2].parameters()))
    assert len(only) == 2 and model[0].weight not in only


# ------------------------------------------------------------------ fuzzed: several optimizers per model
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.reliability._fuzz_models import OPTIMIZER_CLASS, fuzz_cases, group_hyperparameters  # noqa: E402

SPLIT_KINDS = ["muon", "adam", "nadam", "sgd-momentum", "adafactor", "radam", "adamax", "rmsprop"]


@st.composite
def split_cases(draw):
    """A fuzzed model whose 2-D weights are stepped by one optimizer (Muon or another) and the rest by a second."""
    case = draw(fuzz_cases(optimizer_kinds=["sgd"], max_groups=1))
    trainable = [p for p in case.model.parameters() if p.requires_grad]
    first = draw(st.sampled_from(SPLIT_KINDS))
    second = draw(st.sampled_from([k for k in SPLIT_KINDS if k != "muon"]))
    matrices = [p for p in trainable if p.ndim == 2]
    rest = [p for p in trainable if p.ndim != 2]
    if not matrices or not rest:
        matrices, rest = trainable[: len(trainable) // 2 or 1], trainable[len(trainable) // 2 or 1 :]
        first = second if first == "muon" else first
    opts = []
    if first == "muon":
        opts.append(torch.optim.Muon(matrices, lr=draw(st.sampled_from([1e-3, 2e-2])), momentum=draw(st.sampled_from([0.0, 0.95]))))
    else:
        opts.append(OPTIMIZER_CLASS[first](matrices, **draw(group_hyperparameters(first))))
    if rest:
        opts.append(OPTIMIZER_CLASS[second](rest, **draw(group_hyperparameters(second))))
    warm = draw(st.integers(1, 3))  # Muon's first step is a jump: secant values start at step 2
    for _ in range(warm):
        for o in opts:
            o.zero_grad()
        x, y = case.make_batch(3, case.generator)
        case.loss_fn(case.model(x), y).backward()
        for o in opts:
            o.step()
    for o in opts:
        o.zero_grad(set_to_none=True)
    return case, opts


@given(pair=split_cases(), linearization=st.sampled_from(["tangent", "secant", "sgd"]), val_point=st.sampled_from(["current", "midpoint"]))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_fuzzed_models_with_two_optimizers_ghost_equals_materialized_and_each_share_adds_up(pair, linearization, val_point):
    case, opts = pair
    kw = dict(linearization=linearization, val_point=val_point)
    val = list(case.val_batches)
    try:
        ghost = attribution.step_values(case.model, opts, case.loss_fn, case.batch, val, estimator="ghost", **kw)
    except optimizers.UpdateJumpError:
        # Muon without momentum orthogonalises g itself: Δ(s g) = Δ(g) at every step, a jump at 0.
        assert linearization == "secant" and any(isinstance(o, torch.optim.Muon) and o.defaults["momentum"] == 0.0 for o in opts)
        return
    mat = attribution.step_values(case.model, opts, case.loss_fn, case.batch, val, estimator="materialized", **kw)
    scale = float(mat.abs().max()) + 1e-300
    assert_close(ghost, mat, rtol=1e-8, atol=1e-10 * scale)
    if val_point == "current":  # each optimizer's share of the values is valued under its own rule
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnsteppedParameterWarning)
            parts = [attribution.step_values(case.model, [o], case.loss_fn, case.batch, val, estimator="ghost", **kw) for o in opts]
        assert_close(ghost, sum(parts), rtol=1e-8, atol=1e-10 * scale)


def test_a_step_that_only_one_of_two_optimizers_takes_is_not_counted():
    """The values were taken for both optimizers' parameters; if one does not step they are wrong: dropped, named."""
    from attribution import SkippedStepWarning

    model, opts, x, y = _setup()
    tracker = InRunShapley(model, opts, loss_fn, (x[16:], y[16:]))
    with tracker.batch([0, 1, 2, 3]):
        loss_fn(model(x[:4]), y[:4]).backward()
    opts[0].step()  # the SGD half never steps
    assert tracker.steps == 0  # not committed before the last optimizer has stepped
    for o in opts:
        o.zero_grad()
    with pytest.warns(SkippedStepWarning, match="SGD did not step"):
        with tracker.batch([4, 5, 6, 7]):
            loss_fn(model(x[4:8]), y[4:8]).backward()
    for o in opts:
        o.step()
    assert tracker.steps == 1 and list(tracker.values().index) == [4, 5, 6, 7]
    tracker.close()

"""InRunShapley: totals equal summed step_values; accumulation, clipping, groups, I/O, errors."""

import copy

import pandas as pd
import pytest
import torch
from torch import nn

from attribution import InRunShapley, LedgerFileError, NonFiniteStepWarning, TrackerUsageError, step_values
from tests._helpers import assert_close

LOSS = nn.functional.cross_entropy


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3)).double()


def _data(seed=0, n=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


X, Y = _data()
VAL = (X[-8:], Y[-8:])


def _batches(steps, size=6):
    return [torch.arange(s * size, (s + 1) * size) for s in range(steps)]


@pytest.mark.parametrize("linearization,val_point", [("tangent", "lookahead"), ("secant", "midpoint"), ("sgd", "current")])
def test_totals_equal_the_sum_of_step_values(linearization, val_point):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    twin_sched = torch.optim.lr_scheduler.StepLR(twin_opt, 1, gamma=0.7)
    kw = dict(linearization=linearization, val_point=val_point)
    tracker = InRunShapley(model, opt, LOSS, VAL, record_steps=True, **kw)
    expected = {}
    for step, idx in enumerate(_batches(4) + [torch.arange(0, 6)]):  # ids 0..5 appear twice
        # The tracker's default route is "auto" (the exact-update game at sign-like steps), its
        # orders drawn from a generator seeded by the step: step_values(route="auto", seed=step).
        phi = step_values(twin_model, twin_opt, LOSS, (X[idx], Y[idx]), VAL, route="auto", seed=step, **kw)
        for i, v in zip(idx.tolist(), phi.tolist()):
            expected[i] = expected.get(i, 0.0) + v
        twin_opt.zero_grad()
        LOSS(twin_model(X[idx]), Y[idx]).backward()
        twin_opt.step()
        twin_sched.step()

        opt.zero_grad()
        with tracker.batch(idx):
            LOSS(model(X[idx]), Y[idx]).backward()
        opt.step()
        sched.step()
    got = tracker.values()
    assert got.loc[0, "steps_seen"] == 2 and got.loc[10, "steps_seen"] == 1
    want = torch.tensor([expected[i] for i in sorted(expected)])
    # values are sums of per-layer terms that partly cancel: compare at float64 precision of the terms
    assert_close(torch.tensor(got["value"].sort_index().to_numpy()), want, rtol=1e-7, atol=1e-10 * want.abs().max().item())
    hist = tracker.history()
    assert len(hist) == 30 and set(hist.columns) == {"step", "position", "id", "value", "route", "origin"}
    assert_close(torch.tensor(hist.groupby("id")["value"].sum().to_numpy()), torch.tensor(got["value"].sort_index().to_numpy()))
    tracker.close()


def test_gradient_accumulation_equals_one_big_batch():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    big = torch.arange(12)
    expected = step_values(twin_model, twin_opt, LOSS, (X[big], Y[big]), VAL, route="auto")
    tracker = InRunShapley(model, opt, LOSS, VAL)
    for half in (big[:6], big[6:]):
        with tracker.batch(half):
            (LOSS(model(X[half]), Y[half]) / 2).backward()  # mean over the full 12
    opt.step()
    got = tracker.values()["value"]
    assert_close(torch.tensor(got.loc[big.tolist()].to_numpy()), expected, rtol=1e-8)


def test_clip_grad_norm_equals_training_on_the_rescaled_loss():
    """Clipping by c is, with c fixed, the same step as training on c·loss: the values must agree."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    idx = torch.arange(8)
    tracker = InRunShapley(model, opt, LOSS, VAL)
    with tracker.batch(idx):
        LOSS(model(X[idx]), Y[idx]).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
    c = min(1.0, 0.05 / (float(norm) + 1e-6))
    assert c < 0.5  # the test really clips
    opt.step()
    twin = InRunShapley(twin_model, twin_opt, LOSS, VAL)
    with twin.batch(idx):
        (c * LOSS(twin_model(X[idx]), Y[idx])).backward()
    twin_opt.step()
    assert_close(torch.tensor(tracker.values()["value"].to_numpy()), torch.tensor(twin.values()["value"].to_numpy()), rtol=1e-6)


def test_param_groups_and_frozen_parameters():
    model = _model()
    model[0].bias.requires_grad_(False)
    opt = torch.optim.Adam(
        [{"params": [model[0].weight], "lr": 1e-2}, {"params": model[2].parameters(), "lr": 1e-3, "betas": (0.5, 0.9)}]
    )
    twin_model, twin_opt = copy.deepcopy((model, opt))
    tracker = InRunShapley(model, opt, LOSS, VAL, estimator="ghost")
    total = torch.zeros(6)
    for idx in _batches(3):
        total += step_values(twin_model, twin_opt, LOSS, (X[idx], Y[idx]), VAL, estimator="materialized", route="auto") if idx[0] == 0 else 0
        twin_opt.zero_grad()
        LOSS(twin_model(X[idx]), Y[idx]).backward()
        twin_opt.step()
        opt.zero_grad()
        with tracker.batch(idx):
            LOSS(model(X[idx]), Y[idx]).backward()
        opt.step()
    assert_close(torch.tensor(tracker.values()["value"].loc[list(range(6))].to_numpy()), total, rtol=1e-7, atol=1e-10 * total.abs().max().item())


def test_several_validation_targets():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    tracker = InRunShapley(model, opt, LOSS, [VAL, (X[:4], Y[:4])])
    with tracker.batch(list("abcdef")):
        LOSS(model(X[:6]), Y[:6]).backward()
    opt.step()
    frame = tracker.values()
    assert list(frame.columns) == ["value_0", "value_1", "steps_seen"] and list(frame.index) == list("abcdef")


# ---------------------------------------------------------------------- persistence
def _train(tracker, model, opt, batches):
    for idx in batches:
        opt.zero_grad()
        with tracker.batch(idx):
            LOSS(model(X[idx]), Y[idx]).backward()
        opt.step()


def test_save_load_resume_continues_the_same_totals(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    batches = _batches(4)
    straight = InRunShapley(twin_model, twin_opt, LOSS, VAL, record_steps=True)
    _train(straight, twin_model, twin_opt, batches)

    first = InRunShapley(model, opt, LOSS, VAL, record_steps=True, linearization="secant")
    first.close()
    first = InRunShapley(model, opt, LOSS, VAL, record_steps=True)
    _train(first, model, opt, batches[:2])
    first.save(tmp_path / "run.pt")
    first.close()
    resumed = InRunShapley.load(tmp_path / "run.pt", model, opt, LOSS, VAL)
    assert resumed.config == first.config and resumed.steps == 2
    _train(resumed, model, opt, batches[2:])
    pd.testing.assert_frame_equal(resumed.values(), straight.values(), rtol=1e-10)
    assert len(resumed.history()) == len(straight.history())


def test_a_crash_during_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    tracker = InRunShapley(model, opt, LOSS, VAL)
    _train(tracker, model, opt, _batches(1))
    path = tmp_path / "run.pt"
    tracker.save(path)
    before = path.read_bytes()
    _train(tracker, model, opt, _batches(2)[1:])

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        tracker.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary file left behind


def test_corrupted_and_foreign_files_are_refused(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a ledger")
    with pytest.raises(LedgerFileError, match="not a readable ledger file"):
        InRunShapley.load(bad, model, opt, LOSS, VAL)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(LedgerFileError, match="format marker missing"):
        InRunShapley.load(foreign, model, opt, LOSS, VAL)
    tracker = InRunShapley(model, opt, LOSS, VAL)
    tracker.save(tmp_path / "ok.pt")
    state = torch.load(tmp_path / "ok.pt", weights_only=True)
    state["version"] = 99
    torch.save(state, tmp_path / "future.pt")
    with pytest.raises(LedgerFileError, match="format version 99"):
        InRunShapley.load(tmp_path / "future.pt", model, opt, LOSS, VAL)
    with pytest.raises(FileNotFoundError):
        InRunShapley.load(tmp_path / "missing.pt", model, opt, LOSS, VAL)


# ---------------------------------------------------------------------- errors
def test_step_without_batch_context():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    tracker = InRunShapley(model, opt, LOSS, VAL)
    LOSS(model(X[:4]), Y[:4]).backward()
    with pytest.raises(TrackerUsageError, match=r"no `with tracker.batch\(ids\):` block captured a batch"):
        opt.step()
    tracker.close()
    opt.step()  # a closed tracker no longer intercepts steps


def test_ids_of_the_wrong_length():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    tracker = InRunShapley(model, opt, LOSS, VAL)
    with tracker.batch([1, 2, 3]):
        LOSS(model(X[:4]), Y[:4]).backward()
    with pytest.raises(ValueError, match="hold 4 samples but 3 ids were given"):
        opt.step()


def test_bad_ids_type():
    model = _model()
    tracker = InRunShapley(model, torch.optim.Adam(model.parameters()), LOSS, VAL)
    with pytest.raises(TypeError, match="1-D integers"):
        with tracker.batch(torch.zeros(3)):
            pass
    with pytest.raises(TypeError, match="one id per sample"):
        with tracker.batch("abc"):
            pass


def test_nested_batch_contexts():
    model = _model()
    tracker = InRunShapley(model, torch.optim.Adam(model.parameters()), LOSS, VAL)
    with pytest.raises(TrackerUsageError, match="cannot be nested"):
        with tracker.batch([0]):
            with tracker.batch([1]):
                pass


def test_non_uniform_gradient_edits_are_refused():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    tracker = InRunShapley(model, opt, LOSS, VAL)
    with tracker.batch(range(6)):
        LOSS(model(X[:6]), Y[:6]).backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), 1e-4)
    with pytest.raises(TrackerUsageError, match="clip_grad_value_"):
        opt.step()


def test_optimizer_of_another_model_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="not a parameter of the model"):
        InRunShapley(model, torch.optim.Adam(_model().parameters()), LOSS, VAL)


def test_history_needs_record_steps():
    model = _model()
    tracker = InRunShapley(model, torch.optim.Adam(model.parameters()), LOSS, VAL)
    with pytest.raises(TrackerUsageError, match="record_steps=True"):
        tracker.history()


def test_non_finite_step_is_skipped_with_a_warning():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = InRunShapley(model, opt, LOSS, VAL, linearization="sgd")
    _train(tracker, model, opt, _batches(1))
    before = tracker.values().copy()
    with tracker.batch(range(6, 12)):
        (LOSS(model(X[6:12]), Y[6:12]) * float("nan")).backward()
    with pytest.warns(NonFiniteStepWarning, match="skipped"):
        opt.step()
    assert tracker.skipped_steps == [(1, "non-finite gradients (NaN/inf)")]
    pd.testing.assert_frame_equal(tracker.values(), before)


def test_a_non_finite_validation_batch_is_refused_at_construction():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    bad_val = (torch.full_like(VAL[0], float("inf")), VAL[1])
    with pytest.raises(ValueError, match="validation loss on validation batch 0 is .*inputs hold NaN/inf"):
        InRunShapley(model, opt, LOSS, bad_val)


def test_a_validation_loss_that_overflows_at_the_validation_point_is_skipped_naming_it():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e300)  # the midpoint θ_t − ½ lr g_B overflows
    tracker = InRunShapley(model, opt, LOSS, VAL)
    with tracker.batch(range(6)):
        LOSS(model(X[:6]), Y[:6]).backward()
    with pytest.warns(NonFiniteStepWarning, match="validation"):
        opt.step()
    assert tracker.steps == 1 and len(tracker.values()) == 0


def test_duplicate_ids_within_a_batch_are_two_occurrences():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    twin_model, twin_opt = copy.deepcopy((model, opt))
    idx = torch.arange(6)
    phi = step_values(twin_model, twin_opt, LOSS, (X[idx], Y[idx]), VAL, route="auto")
    tracker = InRunShapley(model, opt, LOSS, VAL)
    with tracker.batch([7, 7, 8, 9, 9, 9]):
        LOSS(model(X[idx]), Y[idx]).backward()
    opt.step()
    frame = tracker.values()
    assert list(frame["steps_seen"]) == [2, 1, 3]
    assert_close(torch.tensor(frame["value"].to_numpy()), torch.stack([phi[:2].sum(), phi[2], phi[3:].sum()]), rtol=1e-8)


def test_replaced_optimizer_is_detected():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    tracker = InRunShapley(model, opt, LOSS, VAL)
    _train(tracker, model, opt, _batches(1))
    new_opt = torch.optim.Adam(model.parameters())  # the tracker's hook is on the old one
    _train(tracker, model, new_opt, _batches(1))  # this step is not seen by the tracker...
    with pytest.raises(TrackerUsageError, match="optimizer was replaced"):
        _train(tracker, model, new_opt, _batches(1))  # ...and the next batch says so


def test_a_later_step_pre_hook_is_refused():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    tracker = InRunShapley(model, opt, LOSS, VAL)
    opt.register_step_pre_hook(lambda optimizer, args, kwargs: None)  # e.g. another library
    with tracker.batch(range(6)):
        LOSS(model(X[:6]), Y[:6]).backward()
    with pytest.raises(TrackerUsageError, match="registered after InRunShapley's"):
        opt.step()


def test_validation_batch_that_does_not_fit_the_model():
    model = _model()
    with pytest.raises(ValueError, match="validation batch 0 does not fit the model or loss_fn: RuntimeError"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), LOSS, (torch.zeros(4, 7, dtype=torch.float64), Y[:4]))
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), lambda out, y: out, VAL)

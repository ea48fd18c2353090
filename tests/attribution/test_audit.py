"""The online audit: the real optimizer's leave-one-out of k samples against the tracker's values, every N steps."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import validation
from attribution import AuditWarning, InRunShapley
from attribution._audit import real_leave_one_out
from attribution._config import AttributionConfig
from attribution._step import StepComputer
from tests._helpers import assert_close

LOSS = nn.functional.cross_entropy
GEN = torch.Generator().manual_seed(2)
X = torch.randn(64, 5, generator=GEN, dtype=torch.float64)
Y = torch.randint(0, 3, (64,), generator=GEN)
VAL = (X[56:], Y[56:])


def _model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(dropout), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("make", [lambda p: torch.optim.Adam(p, lr=1e-2), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_the_audits_leave_one_out_is_the_oracles(make, scale):
    """real_leave_one_out = validation.leave_one_out (the same real game), with a rescaled gradient too."""
    model = _model()
    opt = make(model.parameters())
    for s in range(2):  # some optimizer state
        opt.zero_grad()
        LOSS(model(X[8 * s : 8 * s + 8]), Y[8 * s : 8 * s + 8]).backward()
        opt.step()
    batch = (X[16:24], Y[16:24])
    # The oracle's loss_fn is also its validation loss: scaled by c, it measures c × the LOO of L_val.
    oracle = validation.leave_one_out(model, opt, lambda out, y: scale * LOSS(out, y), batch, VAL) / scale
    computer = StepComputer(model, LOSS, [VAL], AttributionConfig())
    for p in model.parameters():
        p.grad = None
    with computer.capture():
        LOSS(model(batch[0]), batch[1]).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.grad.mul_(scale)  # a clip: param.grad = c Σ_z c_z
    computer.step_values(opt)
    assert computer.grad_scale == pytest.approx(scale, rel=1e-9)
    before = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()), torch.get_rng_state()
    got = real_leave_one_out(computer, [opt], [1, 4, 6])
    assert_close(got[:, 0], oracle[[1, 4, 6]], rtol=1e-8, atol=1e-14)
    for p, q in zip(model.parameters(), before[0]):
        assert torch.equal(p, q)
    assert torch.equal(torch.get_rng_state(), before[2])
    computer.reset()


def _train(model, opt, steps, **kw):
    tracker = InRunShapley(model, opt, LOSS, VAL, **kw)
    for s in range(steps):
        ids = list(range(8 * s, 8 * s + 8))
        opt.zero_grad()
        with tracker.batch(ids):
            LOSS(model(X[ids]), Y[ids]).backward()
        opt.step()
    return tracker


def test_audit_records_every_nth_step_and_warns_when_values_are_far():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = _train(model, opt, 5, audit_every=2, audit_samples=6)
    audit = tracker.audit()
    assert list(audit["step"]) == [0, 2, 4] and (audit["samples"] == 6).all() and (audit["route"] == "linear").all()
    assert (audit["pearson"] > 0.99).all() and (audit["relative_error"] < 0.05).all() and (audit["seconds"] > 0).all()
    tracker.close()
    # The SGD proxy at Adam's sign-like first step is far from the step's real leave-one-out.
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.warns(AuditWarning, match="step 0: the audit's real-optimizer leave-one-out of 8 samples"):
        tracker = _train(model, opt, 1, audit_every=1, audit_samples=8, linearization="sgd", audit_threshold=0.99)
    assert tracker.audit()["pearson"][0] < 0.99
    tracker.close()


def test_the_audit_changes_nothing_in_training():
    a_model = _model(dropout=0.2)
    a_opt = torch.optim.AdamW(a_model.parameters(), lr=1e-2)
    b_model, b_opt = copy.deepcopy((a_model, a_opt))
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AuditWarning)
        tracker = _train(a_model, a_opt, 3, audit_every=1, audit_samples=4)
    rng_a = torch.get_rng_state()
    torch.manual_seed(7)
    for s in range(3):
        b_opt.zero_grad()
        LOSS(b_model(X[8 * s : 8 * s + 8]), Y[8 * s : 8 * s + 8]).backward()
        b_opt.step()
    assert torch.equal(rng_a, torch.get_rng_state())
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(p, q)
    assert len(tracker.audit()) == 3
    tracker.close()


def test_audits_are_saved_with_the_values(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = _train(model, opt, 2, audit_every=1, audit_samples=4)
    tracker.save(tmp_path / "v.pt")
    resumed = InRunShapley.load(tmp_path / "v.pt", model, opt, LOSS, VAL)
    assert resumed.audit().equals(tracker.audit())
    for t in (tracker, resumed):
        t.close()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(audit_every=0), "audit_every=0 must be a number of steps >= 1"),
        (dict(audit_every=1, audit_samples=1), "audit_samples=1 must be at least 2"),
        (dict(audit_every=1, stream=True, val_point="current"), "the audit needs the captured per-sample factors"),
    ],
)
def test_bad_audit_options_are_refused(kw, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        InRunShapley(model, torch.optim.SGD(model.parameters(), lr=0.1), LOSS, VAL, **kw)


def test_a_float32_model_is_audited_in_float64():
    """One sample's effect on the validation loss is below float32's resolution of it: the copy steps in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = X.float(), Y
    tracker = InRunShapley(model, opt, LOSS, (x[56:], y[56:]), audit_every=1, audit_samples=8)
    ids = list(range(48))
    with tracker.batch(ids):
        LOSS(model(x[:48]), y[:48]).backward()
    opt.step()
    row = tracker.audit().iloc[0]
    assert row.pearson > 0.99 and row.relative_error < 0.05, row
    tracker.close()


def test_selected_rows_across_micro_batches_come_back_in_the_order_asked():
    from estimators import GhostEngine

    model = _model()
    engine = GhostEngine(model)
    with engine.capture_train():
        LOSS(model(X[:5]), Y[:5]).backward()
        engine.mark_boundary()
        LOSS(model(X[5:9]), Y[5:9]).backward()
    full = dict(engine.per_sample_contributions())
    picked = dict(engine.per_sample_contributions(rows=[7, 1, 5]))
    for p in model.parameters():
        assert torch.equal(picked[p], full[p][[7, 1, 5]])

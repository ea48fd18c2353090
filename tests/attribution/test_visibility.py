"""What the tracker shows and lets users choose: paths_taken, the fallback warning, strict, check_model, modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attribution import FallbackWarning, InRunShapley, check_model
from estimators import UncoveredParameterError
from tests._helpers import assert_close

LOSS = nn.functional.cross_entropy
GEN = torch.Generator().manual_seed(0)
X = torch.randn(40, 5, generator=GEN, dtype=torch.float64)
Y = torch.randint(0, 3, (40,), generator=GEN)
VAL = (X[32:], Y[32:])


def _mlp(act=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), act or nn.Tanh(), nn.Linear(8, 3)).double()


def _step(model, opt, trackers, ids):
    opt.zero_grad()
    blocks = [t.batch(ids) for t in trackers]
    for b in blocks:
        b.__enter__()
    LOSS(model(X[ids]), Y[ids]).backward()
    for b in reversed(blocks):
        b.__exit__(None, None, None)
    opt.step()


def test_paths_taken_names_every_parameter_and_the_fallback():
    model = _mlp(nn.PReLU().double())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.warns(FallbackWarning, match=r"module\(s\) \('1'; types PReLU\) have no ghost rule"):
        tracker = InRunShapley(model, opt, LOSS, VAL)
    assert tracker.fallback_modules == ["1"]
    _step(model, opt, [tracker], list(range(8)))
    assert tracker.paths_taken == {"0.weight": "dense", "0.bias": "dense", "1.weight": "fallback", "2.weight": "dense", "2.bias": "dense"}
    tracker.close()


def test_strict_refuses_the_fallback():
    model = _mlp(nn.PReLU().double())
    with pytest.raises(UncoveredParameterError, match="parameter '1.weight'"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), LOSS, VAL, strict=True)


def test_modules_give_partial_values_that_add_up_to_the_full_value():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    full = InRunShapley(model, opt, LOSS, VAL, val_point="current")
    first = InRunShapley(model, opt, LOSS, VAL, val_point="current", modules=["0"])
    last = InRunShapley(model, opt, LOSS, VAL, val_point="current", modules=["2"])
    for step in range(3):
        _step(model, opt, [full, first, last], list(range(8 * step, 8 * step + 8)))
    parts = torch.tensor(first.values()["value"].to_numpy()) + torch.tensor(last.values()["value"].to_numpy())
    assert_close(parts, torch.tensor(full.values()["value"].to_numpy()), rtol=1e-10, atol=1e-16)
    assert set(last.paths_taken) == {"2.weight", "2.bias"}
    assert not torch.allclose(torch.tensor(last.values()["value"].to_numpy()), torch.tensor(full.values()["value"].to_numpy()))
    for t in (full, first, last):
        t.close()


def test_modules_must_name_modules_of_the_model():
    model = _mlp()
    with pytest.raises(ValueError, match=r"\['decoder'\] names no module"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), LOSS, VAL, modules=["decoder"])


def test_check_model_lists_every_problem_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.PReLU(), nn.Linear(8, 3)).double()
    opt = torch.optim.LBFGS(model[0].parameters())

    def in_batch_negatives(out, y):  # couples samples through the batch softmax
        return nn.functional.cross_entropy(out @ out.T, torch.arange(out.shape[0]))

    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    report = check_model(model, opt, in_batch_negatives, VAL)
    assert not report.ok
    text = "\n".join(report.refused)
    assert "BatchNorm1d" in text and "LBFGS" in text and "couples" in text.lower()
    assert report.fallback == ["1", "2"] and report.not_stepped == ["1.weight", "1.bias", "2.weight", "3.weight", "3.bias"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    assert "problem(s) stop tracking" in str(report)


def test_check_model_passes_a_supported_set_up_and_reports_its_paths():
    model = _mlp()
    report = check_model(model, torch.optim.AdamW(model.parameters()), LOSS, VAL)
    assert report.ok and not report.fallback and not report.not_stepped
    assert set(report.paths) == {"0.weight", "0.bias", "2.weight", "2.bias"}

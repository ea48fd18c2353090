"""The bench's lean reference computes the toolkit's streamed values (so the two modes time the same work)."""

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from attribution import InRunShapley
from attribution.experiments.lean import LeanStreamed
from attribution.experiments.models import mlp


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10**6), wd=st.sampled_from([0.0, 0.01]), lr=st.sampled_from([1e-3, 1e-2]))
def test_lean_values_equal_the_streamed_tracker(seed, wd, lr):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    models = [mlp(6, 8, 3, seed=seed % 1000) for _ in range(2)]
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd) for m in models]
    val = (x[32:], y[32:])
    tracker = InRunShapley(models[0], opts[0], nn.functional.cross_entropy, val, val_point="current", stream=True, record_steps=True)
    lean = LeanStreamed(models[1], opts[1], nn.functional.cross_entropy, val)
    lean_steps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the first steps' PoorLinearizationWarning
        for step in range(4):
            ids = list(range(8 * step, 8 * step + 8))
            for model, opt, ctx in ((models[0], opts[0], tracker.batch(ids)), (models[1], opts[1], lean.batch())):
                opt.zero_grad()
                with ctx:
                    nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
                opt.step()
            lean_steps.append(lean.last_values.double())
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)  # the same trajectory
    ours = torch.tensor(tracker.history().sort_values(["step", "position"])["value"].to_numpy())
    theirs = torch.cat(lean_steps)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6 * float(theirs.abs().max())), (ours - theirs).abs().max()
    assert lean.total == pytest.approx(float(theirs.sum()), rel=1e-6, abs=1e-12)


def test_lean_refuses_other_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    with pytest.raises(TypeError, match="nn.Linear"):
        LeanStreamed(model, torch.optim.AdamW(model.parameters()), nn.functional.mse_loss, (torch.ones(1, 3), torch.ones(1, 4)))

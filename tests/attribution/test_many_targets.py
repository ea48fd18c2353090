"""K validation targets in one run: each value column equals a run with that target alone.

The dense contraction shares the per-sample work between targets (``Bilinear.dense_values_many``
builds a sequence layer's c_z once for K ≥ 2); these tests check the values it gives through the
tracker, streamed and after the step, on a tied decoder whose T > 1 takes that route.
"""

import copy

import pytest
import torch

from attribution import InRunShapley
from attribution.experiments.models import TinyLM
from tests._helpers import assert_close

from .test_tracker import LOSS


def _lm_loss(logits, y):
    return LOSS(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _run(model, opt, batches, val, **kw):
    with InRunShapley(model, opt, _lm_loss, val, record_steps=True, **kw) as tracker:
        for ids, (x, y) in batches:
            opt.zero_grad()
            with tracker.batch(ids):
                _lm_loss(model(x), y).backward()
            opt.step()
        return tracker.history()


@pytest.mark.parametrize("stream", [False, True])
def test_each_value_column_of_three_targets_equals_its_own_run(stream):
    from estimators import _factors

    torch.manual_seed(0)
    model = TinyLM(vocab=40, width=16, depth=2, heads=2, max_len=8, tied=True).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 40, (24, 9), generator=g)
    batches = [(list(range(4 * s, 4 * s + 4)), (tokens[4 * s:4 * s + 4, :-1], tokens[4 * s:4 * s + 4, 1:])) for s in range(3)]
    vals = [(tokens[12 + 4 * k:16 + 4 * k, :-1], tokens[12 + 4 * k:16 + 4 * k, 1:]) for k in range(3)]
    kw = dict(route="linear", val_point="current", stream=True) if stream else dict(route="linear")
    taken = []
    original = _factors.Bilinear._materializes

    def spy(self, K):
        out = original(self, K)
        taken.append(out)
        return out

    twins = [copy.deepcopy((model, opt)) for _ in vals]
    _factors.Bilinear._materializes = spy
    try:
        together = _run(model, opt, batches, vals, **kw)
    finally:
        _factors.Bilinear._materializes = original
    assert any(taken), "no layer took the shared per-sample route"
    columns = [c for c in together.columns if c.startswith("value")]
    assert len(columns) == 3
    for k, ((m, o), val) in enumerate(zip(twins, vals)):
        alone = _run(m, o, batches, val, **kw)
        assert_close(torch.tensor(together[columns[k]].to_numpy()), torch.tensor(alone["value"].to_numpy()), rtol=1e-9, atol=1e-13)
        assert float(alone["value"].abs().max()) > 1e-6
        for p, q in zip(model.parameters(), m.parameters()):
            assert torch.equal(p, q)  # the same training in every run

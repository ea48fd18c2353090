"""An embedding's slope J computed on the rows the step's tokens hit only: values equal the dense computation."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import optimizers
from attribution import InRunShapley
from estimators import IncompleteGradientError
from tests._helpers import assert_close

DT = torch.float64
VOCAB = 3000


class Bag(nn.Module):
    """Token embedding (a large table, few rows touched per step) -> mean over positions -> linear head."""

    def __init__(self, tied: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, 3)
        self.out = nn.Linear(8, VOCAB, bias=False) if tied else None
        if tied:
            self.out.weight = self.emb.weight  # a tied head: every row takes a dense term

    def forward(self, x):
        h = self.emb(x).mean(1)
        logits = self.head(h)
        return logits if self.out is None else logits + self.out(h)[:, :3]


def _batches(steps, n=6, T=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    # tokens from a few hundred rows of the table
    return [(torch.randint(0, 300, (n, T), generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(steps)]


def _run(row_restriction: bool, *, tied=False, opt="adamw", route="auto", steps=4, stream=False):
    model = Bag(tied).double()
    make = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
            "adam-l2-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
            "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5)}[opt]
    optimizer = make(model.parameters())
    val = _batches(1, n=4, seed=7)[0]
    kw = dict(val_point="current", stream=True) if stream else {}
    tracker = InRunShapley(model, optimizer, nn.functional.cross_entropy, val, route=route, record_steps=True, **kw)
    tracker._computer.row_restriction = row_restriction
    for step, (x, y) in enumerate(_batches(steps)):
        optimizer.zero_grad()
        with tracker.batch(torch.arange(step * len(y), (step + 1) * len(y))):
            nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return tracker, model


@pytest.mark.parametrize("opt, route, stream", [
    (opt, route, False) for opt in ("adamw", "adam-l2-amsgrad", "rmsprop") for route in ("auto", "linear")
] + [("adamw", "linear", True), ("rmsprop", "linear", True)])
def test_row_restricted_slopes_give_the_dense_values(opt, route, stream, monkeypatch):
    calls = []
    original = optimizers.OptimizerLinearization.preconditioner_on_rows

    def spy(self, param, grad, kind, rows):
        calls.append(len(rows))
        return original(self, param, grad, kind, rows)

    monkeypatch.setattr(optimizers.OptimizerLinearization, "preconditioner_on_rows", spy)
    sparse, m1 = _run(True, opt=opt, route=route, stream=stream)
    assert calls and max(calls) < 300, "the embedding's J was not restricted to its rows"
    n_sparse = len(calls)
    dense, m2 = _run(False, opt=opt, route=route, stream=stream)
    assert len(calls) == n_sparse  # the dense run never restricts
    a, b = sparse.history(), dense.history()
    assert len(a) == 4 * 6
    assert_close(torch.tensor(a["value"].to_numpy()), torch.tensor(b["value"].to_numpy()), rtol=1e-10, atol=1e-16)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)  # training untouched


def test_a_tied_table_stays_dense(monkeypatch):
    calls = []
    monkeypatch.setattr(optimizers.OptimizerLinearization, "preconditioner_on_rows", lambda *a: calls.append(1))
    _run(True, tied=True, steps=2, route="linear")
    assert not calls  # the tied head's dense term touches every row


def test_a_gradient_outside_the_rows_is_refused_as_with_dense_slopes():
    """A part of the gradient no sample's tokens explain (added by hand) is caught by the completeness check."""
    model = Bag().double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    val = _batches(1, n=4, seed=7)[0]
    tracker = InRunShapley(model, opt, nn.functional.cross_entropy, val, route="linear")
    x, y = _batches(1)[0]
    opt.zero_grad()
    with tracker.batch(torch.arange(len(y))):
        nn.functional.cross_entropy(model(x), y).backward()
    # rows the validation loss sees but no training token hit
    rows = sorted(set(val[0].reshape(-1).tolist()) - set(x.reshape(-1).tolist()))
    assert rows
    model.emb.weight.grad[rows] += 1.0
    with pytest.raises(Exception, match="'emb.weight' is not the sum of the per-sample contributions") as err:
        opt.step()
    assert isinstance(err.value.__cause__, IncompleteGradientError)


@pytest.mark.parametrize("stream", [False, True])
def test_no_table_sized_slope_or_preconditioned_gradient_is_built(stream, monkeypatch):
    """The table's J stays on its rows (a RowDiagonal), and so do P, the shift's chord and the check's dot product."""
    from estimators._contraction import RowSparse

    built = []
    monkeypatch.setattr(optimizers.RowDiagonal, "apply", lambda self, v: built.append("J.apply"))
    monkeypatch.setattr(optimizers.RowDiagonal, "diagonal", property(lambda self: built.append("J.diagonal")))
    monkeypatch.setattr(RowSparse, "dense", lambda self: built.append("P.dense"))
    seen = []
    original = optimizers.OptimizerLinearization.preconditioner_on_rows

    def spy(self, param, grad, kind, rows):
        out = original(self, param, grad, kind, rows)
        seen.append(type(out).__name__)
        return out

    monkeypatch.setattr(optimizers.OptimizerLinearization, "preconditioner_on_rows", spy)
    tracker, _ = _run(True, route="linear", stream=stream)  # default val_point (midpoint) unless streamed
    assert seen and set(seen) == {"RowDiagonal"}
    assert not built, f"a table-sized form was built: {sorted(set(built))}"
    assert len(tracker.history()) == 4 * 6

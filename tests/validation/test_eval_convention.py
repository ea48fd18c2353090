"""The oracle measures L_val in eval mode (the tracker's convention) and c_z in the model's own mode.

A model whose forward depends deterministically on ``self.training`` tells the two conventions
apart; a model that draws random numbers and counts calls outside autograd (as a logging probe
would) shows that the oracle never consumes the global RNG or changes a buffer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from tests._helpers import assert_close
from tests.validation._models import DT, assert_unchanged, snapshot
from validation import leave_one_out, shapley_values, utility


class ModeScaled(nn.Module):
    """Linear -> tanh -> (×2 in train mode, ×1 in eval) -> Linear: deterministic in both modes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) * (2.0 if self.training else 1.0))


class Probe(nn.Module):
    """Outside autograd (a validation pass) counts calls in a buffer and draws a random number.

    With ``stateful`` its output also depends on the count (``x · (1 + calls / 10)``), so an
    evaluation that does not start from the caller's buffers gives a different ``L_val``.
    """

    def __init__(self, draw: bool = True, stateful: bool = False) -> None:
        super().__init__()
        self.draw, self.stateful = draw, stateful
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        out = x * (1 + self.calls / 10) if self.stateful else x
        if not torch.is_grad_enabled():
            self.calls += 1
            if self.draw:
                torch.rand(1)
        return out


OPTIMIZERS = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.3, momentum=0.9)),
    "adam": (torch.optim.Adam, dict(lr=0.05)),
}


def setup(seed: int, opt_name: str, n: int = 4):
    torch.manual_seed(seed)
    model = ModeScaled().to(DT).train()
    cls, kw = OPTIMIZERS[opt_name]
    opt = cls(model.parameters(), **kw)
    g = torch.Generator().manual_seed(seed + 1)
    batch = torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)
    val = torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 2, (6,), generator=g)
    for _ in range(2):  # fill the optimizer state
        opt.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
    return model, opt, F.cross_entropy, batch, val


def by_hand_utility(model, opt, loss_fn, batch, val, masks, val_training: bool):
    """U(S) from first principles: c_z = ∇ℓ_z / n in the model's own (train) mode, a real step of a
    copied optimizer, L_val with every module's training flag set to ``val_training``."""
    x, y = batch
    n = x.shape[0]
    params = list(model.parameters())
    contribs = [torch.autograd.grad(loss_fn(model(x[z : z + 1]), y[z : z + 1]) / n, params) for z in range(n)]

    def val_loss(m):
        m.train(val_training)
        with torch.no_grad():
            return loss_fn(m(val[0]), val[1]).item()

    base = val_loss(copy.deepcopy(model))
    out = []
    for mask in masks:
        model2, opt2 = copy.deepcopy((model, opt))
        for i, p in enumerate(model2.parameters()):
            p.grad = sum((contribs[z][i] for z in range(n) if mask[z]), torch.zeros_like(p))
        opt2.step()
        out.append(base - val_loss(model2))
    return torch.tensor(out, dtype=DT)


def loo_masks(n: int) -> torch.Tensor:
    masks = torch.ones(n + 1, n, dtype=torch.bool)
    masks[1:].fill_diagonal_(False)
    return masks


@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), opt_name=st.sampled_from(sorted(OPTIMIZERS)), path=st.sampled_from(["stacked", "loop"]))
def test_leave_one_out_takes_the_validation_loss_in_eval_mode(seed, opt_name, path):
    model, opt, loss_fn, batch, val = setup(seed, opt_name)
    u = by_hand_utility(model, opt, loss_fn, batch, val, loo_masks(4), val_training=False)
    u_train = by_hand_utility(model, opt, loss_fn, batch, val, loo_masks(4), val_training=True)
    expected, other = u[0] - u[1:], u_train[0] - u_train[1:]
    assert (expected - other).abs().max() > 1e-6 * expected.abs().max()  # the two conventions differ here
    loo = leave_one_out(model, opt, loss_fn, batch, val, path=path)
    assert_close(loo, expected, rtol=1e-9, atol=1e-14, name="leave_one_out (eval-mode L_val)")
    assert model.training  # the caller's mode is untouched


@pytest.mark.parametrize("path", ["stacked", "loop"])
def test_utility_and_shapley_use_eval_mode_and_val_train_mode_opts_out(path):
    model, opt, loss_fn, batch, val = setup(0, "adam")
    masks = torch.tensor([[False] * 4, [True] * 4, [True, False, True, False], [False, True, True, True]])
    for val_training in (False, True):
        expected = by_hand_utility(model, opt, loss_fn, batch, val, masks, val_training=val_training)
        got = utility(model, opt, loss_fn, batch, val, masks, path=path, val_train_mode=val_training)
        assert_close(got, expected, rtol=1e-9, atol=1e-14, name=f"utility(val_train_mode={val_training})")
        est = shapley_values(model, opt, loss_fn, batch, val, path=path, val_train_mode=val_training)
        assert_close(est.utility_empty, expected[0], rtol=1e-9, atol=1e-14, name="U(∅)")
        assert_close(est.utility_full, expected[1], rtol=1e-9, atol=1e-14, name="U(B)")


@pytest.mark.parametrize("val_train_mode", [False, True])
def test_oracle_leaves_the_global_rng_and_buffers_unchanged(val_train_mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Probe(), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(4, 3, generator=g, dtype=DT), torch.randint(0, 2, (4,), generator=g)
    val = torch.randn(5, 3, generator=g, dtype=DT), torch.randint(0, 2, (5,), generator=g)
    before = snapshot(model, opt)
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    loo = leave_one_out(model, opt, F.cross_entropy, batch, val, path="loop", val_train_mode=val_train_mode)
    shapley_values(model, opt, F.cross_entropy, batch, val, path="loop", seed=0, samples=3, val_train_mode=val_train_mode)
    assert torch.equal(torch.rand(1), expected)
    assert_unchanged(before, snapshot(model, opt), "oracle: ")
    assert loo.shape == (4,)


def test_every_stacked_evaluation_starts_from_the_callers_buffers():
    torch.manual_seed(0)
    probe = Probe(draw=False, stateful=True)
    model = nn.Sequential(nn.Linear(3, 4), probe, nn.Tanh(), nn.Linear(4, 2)).to(DT)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    batch = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    val = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    calls = probe.calls
    masks = loo_masks(4)
    stacked = utility(model, opt, F.cross_entropy, batch, val, masks, path="stacked", chunk_size=2)
    loop = utility(model, opt, F.cross_entropy, batch, val, masks, path="loop")  # a fresh copy per coalition
    assert_close(stacked, loop, rtol=1e-9, atol=1e-14, name="stacked vs loop, stateful forward")
    assert probe.calls is calls and int(calls) == 0


def test_random_validation_pass_on_the_stacked_path_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(3, 4), Probe(), nn.Linear(4, 2)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    val = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match=r"val_train_mode=True: the validation forward pass draws random.*path='loop'"):
        leave_one_out(model, opt, F.cross_entropy, batch, val, path="stacked", val_train_mode=True)


def test_val_train_mode_must_be_a_bool():
    model, opt, loss_fn, batch, val = setup(0, "adam")
    with pytest.raises(TypeError, match=r"val_train_mode must be a bool, got 'train'\. Fix: False"):
        leave_one_out(model, opt, loss_fn, batch, val, val_train_mode="train")

"""Shapley values of the per-step game: efficiency, symmetry, null player, sampling vs exact."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from tests._helpers import assert_close
from tests.validation._models import OPT, config_id, loss_for, make_batch, make_model, seeds, warm_up
from validation import ShapleyEstimate, shapley_values, utility

GAME_CONFIGS = [
    OPT[k]
    for k in ("sgd_momentum", "sgd_nesterov_wd_foreach", "adam_amsgrad_wd", "adamw", "rmsprop_momentum_centered_wd", "adagrad")
]


def setup(cfg, n, seed, warm_steps=2, kind="mlp"):
    model = make_model(kind, seed)
    loss_fn = loss_for(kind)
    batch = make_batch(kind, n, seed + 1)
    val = make_batch(kind, 6, seed + 2)
    opt = cfg[0](model.parameters(), **cfg[1])
    warm_up(model, opt, loss_fn, batch, warm_steps)
    return model, opt, loss_fn, batch, val


def brute_force_shapley(model, opt, loss_fn, batch, val, n):
    """Average of marginals over all n! orderings (the definition itself), for tiny n."""
    masks = torch.tensor(list(itertools.product([False, True], repeat=n)))
    u = {tuple(m.tolist()): v for m, v in zip(masks, utility(model, opt, loss_fn, batch, val, masks, path="loop"))}
    phi = torch.zeros(n, dtype=torch.float64)
    for order in itertools.permutations(range(n)):
        s = [False] * n
        for z in order:
            before = u[tuple(s)]
            s[z] = True
            phi[z] += u[tuple(s)] - before
    return phi / math.factorial(n)


@pytest.mark.parametrize("cfg", GAME_CONFIGS[:3], ids=config_id)
def test_exact_matches_the_permutation_definition(cfg):
    model, opt, loss_fn, batch, val = setup(cfg, 4, 0)
    est = shapley_values(model, opt, loss_fn, batch, val)
    assert isinstance(est, ShapleyEstimate) and est.exact and est.num_permutations is None
    assert_close(est.values, brute_force_shapley(model, opt, loss_fn, batch, val, 4), rtol=1e-10, atol=1e-15)
    assert torch.equal(est.std_errors, torch.zeros(4, dtype=torch.float64))


@example(cfg=OPT["adam_amsgrad_wd"], n=1, seed=0, warm=0)  # batch of one at step 1 (v == 0)
@example(cfg=OPT["sgd_momentum"], n=5, seed=0, warm=0)  # first step: no momentum buffer yet
@given(cfg=st.sampled_from(GAME_CONFIGS), n=st.integers(1, 7), seed=seeds(), warm=st.integers(0, 2))
def test_efficiency(cfg, n, seed, warm):
    model, opt, loss_fn, batch, val = setup(cfg, n, seed, warm)
    est = shapley_values(model, opt, loss_fn, batch, val)
    empty_and_full = torch.stack([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    u = utility(model, opt, loss_fn, batch, val, empty_and_full)
    assert_close(est.utility_empty, u[0], rtol=1e-12, atol=1e-16)
    assert_close(est.utility_full, u[1], rtol=1e-12, atol=1e-16)
    assert_close(est.values.sum(), est.efficiency_target, rtol=1e-9, atol=1e-14)


@given(cfg=st.sampled_from(GAME_CONFIGS), seed=seeds())
@settings(max_examples=10)
def test_symmetry_duplicate_samples_get_equal_values(cfg, seed):
    model = make_model("mlp", seed)
    loss_fn = loss_for("mlp")
    x, y = make_batch("mlp", 4, seed + 1)
    x, y = torch.cat([x, x[:1]]), torch.cat([y, y[:1]])  # sample 4 duplicates sample 0
    opt = cfg[0](model.parameters(), **cfg[1])
    warm_up(model, opt, loss_fn, (x, y), 1)
    est = shapley_values(model, opt, loss_fn, (x, y), make_batch("mlp", 6, seed + 2))
    assert_close(est.values[4], est.values[0], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("cfg", GAME_CONFIGS, ids=config_id)
def test_null_player_zero_gradient_sample_gets_zero(cfg):
    # x = 0, y = 0 through bias-free layers: output 0, loss 0, gradient exactly 0. Its marginal is
    # exactly 0 under any optimizer, because g_{S∪z} = g_S bit for bit.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False)).double()
    loss_fn = nn.functional.mse_loss
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    x[2], y[2] = 0.0, 0.0
    opt = cfg[0](model.parameters(), **cfg[1])
    warm_up(model, opt, loss_fn, (x, y), 2)
    val = (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    est = shapley_values(model, opt, loss_fn, (x, y), val)
    assert abs(est.values[2].item()) <= 1e-16
    assert est.values.abs().max() > 1e-8


@pytest.mark.parametrize("cfg", GAME_CONFIGS[1:3], ids=config_id)
def test_sampling_agrees_with_exact_within_standard_error(cfg):
    model, opt, loss_fn, batch, val = setup(cfg, 6, 3)
    vals = [val, make_batch("mlp", 4, 11)]
    exact = shapley_values(model, opt, loss_fn, batch, vals)
    est = shapley_values(model, opt, loss_fn, batch, vals, samples=300, seed=0)
    assert est.values.shape == est.std_errors.shape == (6, 2) and est.num_permutations == 300 and not est.exact
    assert (est.std_errors > 0).all()
    assert ((est.values - exact.values).abs() <= 4 * est.std_errors + 1e-12).all()
    # Every permutation telescopes to U(B) − U(∅): the sampled estimate is efficient too.
    assert_close(est.values.sum(0), exact.efficiency_target, rtol=1e-9, atol=1e-14)
    # Standard error shrinks like 1/sqrt(k).
    small = shapley_values(model, opt, loss_fn, batch, vals, samples=75, seed=1)
    ratio = (small.std_errors / est.std_errors).median()
    assert 1.3 < ratio < 3.0


def test_sampling_is_reproducible_with_a_seed():
    model, opt, loss_fn, batch, val = setup(GAME_CONFIGS[2], 5, 0)
    a = shapley_values(model, opt, loss_fn, batch, val, samples=20, seed=7)
    b = shapley_values(model, opt, loss_fn, batch, val, samples=20, seed=7)
    assert torch.equal(a.values, b.values) and torch.equal(a.std_errors, b.std_errors)


def test_batch_of_one():
    model, opt, loss_fn, batch, val = setup(GAME_CONFIGS[2], 1, 0)
    est = shapley_values(model, opt, loss_fn, batch, val)
    assert_close(est.values, est.efficiency_target.reshape(1), rtol=1e-15)
    est = shapley_values(model, opt, loss_fn, batch, val, samples=2, seed=0)
    assert_close(est.values, est.efficiency_target.reshape(1), rtol=1e-15)
    assert est.std_errors.item() == 0.0


def test_sixteen_players_exact_is_fast_enough():
    model, opt, loss_fn, batch, val = setup(GAME_CONFIGS[2], 16, 0, kind="mlp")
    est = shapley_values(model, opt, loss_fn, batch, val, progress=False)
    assert_close(est.values.sum(), est.efficiency_target, rtol=1e-8, atol=1e-14)

"""The per-step game with the real optimizer: stacked path vs deep-copy loop, LOO, no mutation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from tests._helpers import assert_close
from tests.validation._models import (
    OPT, OPTIMIZER_CONFIGS, assert_unchanged, config_id, loss_for, make_batch, make_model, snapshot, warm_up,
)
from validation import STACKABLE_OPTIMIZERS, StepPath, leave_one_out, per_sample_grads, shapley_values, utility


def random_masks(n: int, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(m, n, generator=g) < 0.5
    masks[0] = False  # ∅
    masks[1] = True  # B
    return masks


def setup(kind, cfg, warm_steps, n=5, seed=0):
    model = make_model(kind, seed)
    loss_fn = loss_for(kind)
    batch = make_batch(kind, n, seed + 1)
    val = make_batch(kind, 6, seed + 2)
    cls, kw = cfg
    opt = cls(model.parameters(), **kw)
    warm_up(model, opt, loss_fn, batch, warm_steps)
    return model, opt, loss_fn, batch, val


def test_allow_list_is_covered_by_the_configs():
    assert {cls for cls, _ in OPTIMIZER_CONFIGS} == set(STACKABLE_OPTIMIZERS)


@pytest.mark.parametrize("warm_steps", [0, 3], ids=["first-step", "warm-state"])
@pytest.mark.parametrize("cfg", OPTIMIZER_CONFIGS, ids=config_id)
def test_stacked_path_equals_deepcopy_loop(cfg, warm_steps):
    model, opt, loss_fn, batch, val = setup("mlp", cfg, warm_steps)
    masks = random_masks(5, 12, 0)
    fast = utility(model, opt, loss_fn, batch, val, masks, path="stacked")
    slow = utility(model, opt, loss_fn, batch, val, masks, path="loop")
    assert fast.shape == (12,) and fast.dtype == torch.float64
    assert_close(fast, slow, rtol=1e-9, atol=1e-13, name=config_id(cfg))


@pytest.mark.parametrize("kind", ["cnn", "seq", "buffers"])
@pytest.mark.parametrize("cfg", [OPT["sgd_nesterov_wd_foreach"], OPT["adam_amsgrad_wd"], OPT["adamw"]], ids=config_id)
def test_stacked_path_equals_loop_on_other_models_and_several_val_batches(kind, cfg):
    model, opt, loss_fn, batch, val = setup(kind, cfg, 2, n=4)
    vals = [val, make_batch(kind, 3, 9)]
    masks = random_masks(4, 7, 1)
    fast = utility(model, opt, loss_fn, batch, vals, masks, path="stacked", chunk_size=3)
    slow = utility(model, opt, loss_fn, batch, vals, masks, path="loop")
    assert fast.shape == (7, 2)
    assert_close(fast, slow, rtol=1e-9, atol=1e-13)


def test_full_batch_utility_matches_an_ordinary_training_step():
    # U(B) must be what `loss.backward(); optimizer.step()` does to the validation loss.
    for cfg in (OPT["sgd_nesterov_wd_foreach"], OPT["adam_amsgrad_wd"], OPT["rmsprop_momentum_centered_wd"]):
        model, opt, loss_fn, batch, val = setup("mlp", cfg, 3)
        u = utility(model, opt, loss_fn, batch, val, torch.ones(1, 5, dtype=torch.bool))
        m2, o2 = copy.deepcopy((model, opt))
        for p2, p in zip(m2.parameters(), model.parameters()):
            p2.grad = p.grad.clone()  # Parameter.__deepcopy__ drops .grad
        with torch.no_grad():
            before = loss_fn(m2(val[0]), val[1])
        o2.step()  # .grad holds the batch gradient left by warm_up
        with torch.no_grad():
            after = loss_fn(m2(val[0]), val[1])
        assert_close(u, (before - after).reshape(1), rtol=1e-8, name=config_id(cfg))


def test_empty_coalition_moves_under_momentum():
    model, opt, loss_fn, batch, val = setup("mlp", OPT["sgd_momentum"], 3)
    u_empty = utility(model, opt, loss_fn, batch, val, torch.zeros(1, 5, dtype=torch.bool))
    assert u_empty.abs().item() > 1e-6


def test_non_allow_listed_optimizer_falls_back_to_loop():
    class MySGD(torch.optim.SGD):  # a subclass may override step(), so it is not stacked
        pass

    model, opt, loss_fn, batch, val = setup("mlp", (MySGD, dict(lr=0.1, momentum=0.9)), 2)
    masks = random_masks(5, 6, 2)
    auto = utility(model, opt, loss_fn, batch, val, masks)
    ref = utility(model, opt, loss_fn, batch, val, masks, path=StepPath.LOOP)
    assert_close(auto, ref, rtol=0.0)


def test_loo_is_u_full_minus_u_without_each_sample():
    model, opt, loss_fn, batch, val = setup("mlp", OPT["adam_amsgrad_wd"], 2)
    loo = leave_one_out(model, opt, loss_fn, batch, val)
    masks = torch.ones(6, 5, dtype=torch.bool)
    masks[1:].fill_diagonal_(False)
    u = utility(model, opt, loss_fn, batch, val, masks)
    assert_close(loo, u[0] - u[1:], rtol=1e-12, atol=1e-16)
    loo_k = leave_one_out(model, opt, loss_fn, batch, [val, val])
    assert loo_k.shape == (5, 2)
    assert_close(loo_k[:, 1], loo, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_sgd_loo_converges_to_first_order_with_quadratic_error(kind):
    # LOO_z = L(θ − η(g_B − c_z)) − L(θ − η g_B) = η⟨∇L_val, c_z⟩ + O(η²): halving η quarters the error.
    model = make_model(kind, 4)
    loss_fn = loss_for(kind)
    batch, val = make_batch(kind, 4, 5), make_batch(kind, 6, 6)
    c = per_sample_grads(model, loss_fn, batch)
    m2 = copy.deepcopy(model)
    loss_fn(m2(val[0]), val[1]).backward()
    dot = sum((c[k].flatten(1) @ p.grad.flatten()) for k, p in m2.named_parameters())

    def error(lr):
        loo = leave_one_out(model, torch.optim.SGD(model.parameters(), lr=lr), loss_fn, batch, val)
        return (loo - lr * dot).abs()

    e1, e2, e3 = error(1e-2), error(5e-3), error(2.5e-3)
    assert (e1 < 1e-2 * 1e-2 * 10).all()
    ratios = torch.cat([e1 / e2, e2 / e3])
    assert ((ratios > 3.5) & (ratios < 4.5)).all(), ratios


@pytest.mark.parametrize("path", ["stacked", "loop"])
@pytest.mark.parametrize("warm_steps", [0, 2])
def test_nothing_the_caller_owns_is_changed(path, warm_steps):
    for cfg in (OPT["sgd_dampening_maximize"], OPT["adam_amsgrad_wd"], OPT["adagrad"]):
        model, opt, loss_fn, batch, val = setup("buffers", cfg, warm_steps, n=3)
        if warm_steps == 0:
            opt.zero_grad()  # no .grad at all, and (except Adagrad) an empty state
        before = snapshot(model, opt)
        per_sample_grads(model, loss_fn, batch)
        utility(model, opt, loss_fn, batch, val, random_masks(3, 4, 0), path=path)
        leave_one_out(model, opt, loss_fn, batch, [val, val], path=path)
        shapley_values(model, opt, loss_fn, batch, val, path=path)
        shapley_values(model, opt, loss_fn, batch, val, samples=3, seed=0, path=path)
        assert_unchanged(before, snapshot(model, opt), where=f"{config_id(cfg)}: ")


def test_progress_bar_and_chunking_do_not_change_values(capsys):
    model, opt, loss_fn, batch, val = setup("mlp", OPT["adam_amsgrad_wd"], 1)
    masks = random_masks(5, 20, 3)
    a = utility(model, opt, loss_fn, batch, val, masks, progress=True, chunk_size=3)
    b = utility(model, opt, loss_fn, batch, val, masks, progress=False)
    assert_close(a, b, rtol=1e-12, atol=1e-16)
    assert utility(model, opt, loss_fn, batch, val, masks[:0]).shape == (0,)


def test_mse_regression_with_sum_loss():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    loss_fn = lambda out, t: F.mse_loss(out, t, reduction="sum")  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    masks = random_masks(4, 6, 0)
    assert_close(
        utility(model, opt, loss_fn, (x, y), (x, y), masks, path="stacked"),
        utility(model, opt, loss_fn, (x, y), (x, y), masks, path="loop"),
        rtol=1e-9, atol=1e-13,
    )


def test_partial_optimizer_groups_and_foreign_params():
    # Only the last layer is optimised, in two groups with their own lr; the optimizer also holds a
    # parameter that is not part of the model. The first layer must stay put in both paths.
    model = make_model("mlp", 0)
    loss_fn = loss_for("mlp")
    batch, val = make_batch("mlp", 4, 1), make_batch("mlp", 5, 2)
    foreign = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = torch.optim.Adam(
        [{"params": [model[2].weight], "lr": 0.02}, {"params": [model[2].bias, foreign], "lr": torch.tensor(0.05)}],
        lr=0.01,
    )
    foreign.grad = torch.ones(3, dtype=torch.float64)
    warm_up(model, opt, loss_fn, batch, 2)
    masks = random_masks(4, 8, 5)
    fast = utility(model, opt, loss_fn, batch, val, masks, path="stacked")
    assert_close(fast, utility(model, opt, loss_fn, batch, val, masks, path="loop"), rtol=1e-9, atol=1e-13)
    assert fast.abs().max() > 0


def test_float32_model_returns_float64_close_to_loop():
    model = make_model("mlp", 0).float()
    loss_fn = loss_for("mlp")
    x, y = make_batch("mlp", 5, 1)
    xv, yv = make_batch("mlp", 6, 2)
    batch, val = (x.float(), y), (xv.float(), yv)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    warm_up(model, opt, loss_fn, batch, 2)
    c = per_sample_grads(model, loss_fn, batch)
    assert all(v.dtype == torch.float32 for v in c.values())
    fast = leave_one_out(model, opt, loss_fn, batch, val, path="stacked")
    slow = leave_one_out(model, opt, loss_fn, batch, val, path="loop")
    assert fast.dtype == torch.float64
    assert_close(fast, slow, rtol=1e-3, atol=1e-6)

"""Every user-facing error of the validation package, with its message."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from estimators import LossCouplingError, SampleInteractionError
from tests._helpers import assert_close
from tests.validation._models import loss_for, make_batch, make_model
from validation import fidelity, leave_one_out, per_sample_grads, shapley_values, utility

LOSS = loss_for("mlp")


@pytest.fixture
def game():
    model = make_model("mlp", 0)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), make_batch("mlp", 4, 1), make_batch("mlp", 3, 2)


def test_exact_shapley_refuses_more_than_16_samples(game):
    model, opt, _, val = game
    with pytest.raises(ValueError, match=r"n = 17 > 16 .*samples=500"):
        shapley_values(model, opt, LOSS, make_batch("mlp", 17, 0), val)


def test_batchnorm_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    with pytest.raises(SampleInteractionError, match="train mode.*model.eval|eval mode"):
        per_sample_grads(model, LOSS, make_batch("mlp", 4, 0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SampleInteractionError, match="normalises with batch statistics"):
        leave_one_out(model, opt, LOSS, make_batch("mlp", 4, 0), make_batch("mlp", 3, 0))


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda out, y: F.cross_entropy(out, y, reduction="sum") / (len(y) + 1),  # odd normaliser
        lambda out, y: (F.cross_entropy(out, y, reduction="none") * torch.arange(1.0, 1.0 + len(y))).mean(),
        lambda out, y: F.cross_entropy(out, y, reduction="none").max(),
    ],
    ids=["sum-over-n+1", "position-weighted", "max"],
)
def test_loss_that_is_neither_mean_nor_sum_is_valued_with_its_normaliser_held_fixed(loss_fn):
    # Formerly refused ("neither a mean nor a sum"): these losses have no cross-sample output
    # terms, so c_z = sample z's share of g_B with the normaliser (weights, argmax) held fixed.
    model, batch = make_model("mlp", 0), make_batch("mlp", 4, 0)
    c = per_sample_grads(model, loss_fn, batch)
    model.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()
    assert_close({k: v.sum(0) for k, v in c.items()}, {k: p.grad for k, p in model.named_parameters()}, atol=1e-15)


def test_loss_that_couples_samples_is_refused():
    in_batch_negatives = lambda out, y: F.cross_entropy(out @ out.T, torch.arange(len(out)))  # noqa: E731
    with pytest.raises(LossCouplingError, match="couples the samples of the batch.*per-sample loss"):
        per_sample_grads(make_model("mlp", 0), in_batch_negatives, make_batch("mlp", 4, 0))


def test_non_scalar_loss():
    with pytest.raises(ValueError, match=r"must return a scalar tensor .*got \(4,\)"):
        per_sample_grads(make_model("mlp", 0), lambda o, y: F.cross_entropy(o, y, reduction="none"), make_batch("mlp", 4, 0))


def test_empty_batch(game):
    model, opt, _, val = game
    empty = make_batch("mlp", 0, 0)
    with pytest.raises(ValueError, match="empty"):
        per_sample_grads(model, LOSS, empty)
    with pytest.raises(ValueError, match="empty"):
        leave_one_out(model, opt, LOSS, empty, val)
    with pytest.raises(ValueError, match=r"val_batch is empty"):
        leave_one_out(model, opt, LOSS, make_batch("mlp", 3, 0), empty)
    with pytest.raises(ValueError, match="empty list"):
        leave_one_out(model, opt, LOSS, make_batch("mlp", 3, 0), [])


def test_bad_batch_structure(game):
    model, opt, batch, val = game
    with pytest.raises(TypeError, match=r"pair \(inputs, targets\).*length 3"):
        per_sample_grads(model, LOSS, (*batch, batch[1]))
    with pytest.raises(ValueError, match="same batch dimension"):
        per_sample_grads(model, LOSS, (batch[0], batch[1][:2]))
    with pytest.raises(TypeError, match="list of 2 tensors"):
        leave_one_out(model, opt, LOSS, batch, list(val))
    with pytest.raises(TypeError, match="val_batch must be a tuple"):
        leave_one_out(model, opt, LOSS, batch, {"x": val[0]})


def test_random_forward_is_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"random \(e.g. Dropout in train mode\).*model.eval\(\)"):
        per_sample_grads(model, LOSS, make_batch("mlp", 4, 0))


def test_no_trainable_parameter():
    model = make_model("mlp", 0).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        per_sample_grads(model, LOSS, make_batch("mlp", 4, 0))


def test_bad_chunk_size(game):
    model, opt, batch, val = game
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        per_sample_grads(model, LOSS, batch, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        leave_one_out(model, opt, LOSS, batch, val, chunk_size=-2)


def test_bad_subsets(game):
    model, opt, batch, val = game
    with pytest.raises(ValueError, match=r"bool tensor \[m, n\] with n = 4.*torch.ones\(1, 4"):
        utility(model, opt, LOSS, batch, val, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"n = 4"):
        utility(model, opt, LOSS, batch, val, torch.ones(2, 3, dtype=torch.bool))


def test_bad_path_and_non_stackable_optimizer(game):
    model, _, batch, val = game

    class MySGD(torch.optim.SGD):
        pass

    opt = MySGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"MySGD is not in the allow-list \[.*'SGD', 'Adam'.*path='auto' or 'loop'"):
        leave_one_out(model, opt, LOSS, batch, val, path="stacked")
    with pytest.raises(ValueError, match=r"path must be one of \['auto', 'stacked', 'loop'\], got 'fast'"):
        leave_one_out(model, opt, LOSS, batch, val, path="fast")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        leave_one_out(model, object(), LOSS, batch, val)


def test_stacked_path_refuses_unknown_state_layout(game):
    model, opt, batch, val = game
    opt.state[model[0].weight]["mystery"] = torch.zeros(2)
    with pytest.raises(ValueError, match="cannot represent this SGD: unknown state entry 'mystery'"):
        leave_one_out(model, opt, LOSS, batch, val, path="stacked")


def test_shapley_mode_arguments(game):
    model, opt, batch, val = game
    with pytest.raises(ValueError, match="not both"):
        shapley_values(model, opt, LOSS, batch, val, exact=True, samples=10)
    with pytest.raises(ValueError, match="exact=False needs `samples=k`"):
        shapley_values(model, opt, LOSS, batch, val, exact=False)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="samples must be an int >= 2"):
            shapley_values(model, opt, LOSS, batch, val, samples=bad)


def test_fidelity_rejects_nan_and_inf():
    with pytest.raises(ValueError, match=r"estimate has 1 non-finite entries .*index 1: nan"):
        fidelity(torch.tensor([0.0, float("nan"), 1.0]), torch.zeros(3))
    with pytest.raises(ValueError, match=r"truth has 2 non-finite entries .*index 0: inf"):
        fidelity([1.0, 2.0, 3.0], [float("inf"), 1.0, -float("inf")])
    with pytest.raises(ValueError, match="efficiency_target must be finite"):
        fidelity([1.0, 2.0], [1.0, 2.0], efficiency_target=float("nan"))


def test_fidelity_shape_and_k_errors():
    with pytest.raises(ValueError, match=r"same shape, got \(3,\) and \(2,\)"):
        fidelity([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"shape \[n\], got shape \(3, 2\).*values\[:, k\]"):
        fidelity(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="estimate is empty"):
        fidelity([], [])
    for bad in (0, 4, 1.5):
        with pytest.raises(ValueError, match=r"1 <= k <= n = 3"):
            fidelity([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], k=bad)
    with pytest.raises(ValueError, match="efficiency_target must be a scalar"):
        fidelity([1.0, 2.0], [1.0, 2.0], efficiency_target=torch.zeros(2))

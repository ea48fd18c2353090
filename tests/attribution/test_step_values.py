"""attribution.step_values: estimator agreement, oracle agreement, no mutation, errors."""

import copy

import pytest
import torch
from torch import nn

import validation
from attribution import step_values
from tests._helpers import assert_close

LOSS = nn.functional.cross_entropy


def _setup(opt_name="adam", steps=2, seed=0, n=6, k_val=None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    opts = {
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3),
        "momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    }
    opt = opts[opt_name](model.parameters())
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x, y = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
        opt.zero_grad()
        LOSS(model(x), y).backward()
        opt.step()
    batch = (torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
    if k_val is None:
        val = (torch.randn(10, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
    else:
        val = [(torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)) for _ in range(k_val)]
    return model, opt, batch, val


@pytest.mark.parametrize("linearization", ["tangent", "secant", "sgd"])
@pytest.mark.parametrize("val_point", ["current", "lookahead", "midpoint"])
def test_ghost_equals_materialized(linearization, val_point):
    model, opt, batch, val = _setup("adamw")
    kw = dict(linearization=linearization, val_point=val_point)
    ghost = step_values(model, opt, LOSS, batch, val, estimator="ghost", **kw)
    ref = step_values(model, opt, LOSS, batch, val, estimator="materialized", **kw)
    assert_close(ghost, ref, rtol=1e-8, atol=1e-14 * ref.abs().max().item())


def test_several_validation_targets_give_columns():
    model, opt, batch, val = _setup("adam", k_val=3)
    phi = step_values(model, opt, LOSS, batch, val)
    assert phi.shape == (6, 3) and phi.dtype == torch.float64
    for k in range(3):
        assert_close(phi[:, k], step_values(model, opt, LOSS, batch, val[k]), rtol=1e-10)


def test_tangent_lookahead_tracks_leave_one_out_under_adam():
    """The first-order leave-one-out approximation: the tangent with the lookahead gradient."""
    model, opt, batch, val = _setup("adam", steps=3, n=12)
    truth = validation.leave_one_out(model, opt, LOSS, batch, val)
    est = step_values(model, opt, LOSS, batch, val, linearization="tangent", val_point="lookahead")
    assert validation.fidelity(est, truth)["pearson"] > 0.99


@pytest.mark.parametrize("val_point,order", [("current", 2), ("lookahead", 2)])
def test_sgd_proxy_error_against_leave_one_out_is_second_order(val_point, order):
    """Plain SGD: the proxy is the exact J, so |φ − LOO| = O(lr²) and halving lr quarters it."""
    errors = []
    for lr in (2e-2, 1e-2):
        model, opt, batch, val = _setup("sgd", n=12, steps=0)
        opt.param_groups[0]["lr"] = lr
        truth = validation.leave_one_out(model, opt, LOSS, batch, val)
        est = step_values(model, opt, LOSS, batch, val, linearization="sgd", val_point=val_point)
        errors.append((est - truth).abs().max().item())
    assert 2 ** order * 0.7 < errors[0] / errors[1] < 2 ** order * 1.3, errors


def test_secant_values_sum_to_the_first_order_batch_effect():
    """Efficiency of the secant: Σφ = −⟨∇L_val(θ), Δ(g_B) − Δ(0)⟩ (val_point current)."""
    import optimizers

    model, opt, batch, val = _setup("adam")
    phi = step_values(model, opt, LOSS, batch, val, linearization="secant", val_point="current")
    model.zero_grad()
    LOSS(model(val[0]), val[1]).backward()
    val_grads = {p: p.grad.clone() for p in model.parameters()}
    model.zero_grad()
    LOSS(model(batch[0]), batch[1]).backward()
    lin = optimizers.linearize(opt)
    expected = -sum(
        (val_grads[p] * (lin.update(p, p.grad) - lin.update(p, torch.zeros_like(p)))).sum() for p in model.parameters()
    )
    model.zero_grad()
    assert_close(phi.sum(), expected, rtol=1e-9)


@pytest.mark.parametrize("opt_name", ["adam", "momentum"])
def test_nothing_is_mutated(opt_name):
    model, opt, batch, val = _setup(opt_name)
    # leave stale gradients in place: they must survive untouched
    LOSS(model(batch[0][:2]), batch[1][:2]).backward()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    for est in ("ghost", "ghost-factored", "materialized"):
        step_values(model, opt, LOSS, batch, val, val_point="midpoint", estimator=est)
    for p, before, g in zip(model.parameters(), params, grads):
        assert torch.equal(p.detach(), before) and torch.equal(p.grad, g)
    after = opt.state_dict()
    for k, st in state["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][k][name]), torch.as_tensor(v)), name
    assert after["param_groups"] == state["param_groups"]


def test_batch_of_one():
    model, opt, batch, val = _setup("adam")
    one = (batch[0][:1], batch[1][:1])
    assert_close(
        step_values(model, opt, LOSS, one, val), step_values(model, opt, LOSS, one, val, estimator="materialized"), rtol=1e-8
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"linearization": "newton"}, r"linearization='newton' is not accepted; use one of 'tangent', 'secant', 'sgd'"),
        ({"val_point": "end"}, r"val_point='end' is not accepted; use one of 'current', 'lookahead', 'midpoint', 'predicted'"),
        ({"estimator": "exact"}, r"estimator='exact' is not accepted; use one of 'ghost', 'ghost-factored', 'materialized'"),
    ],
)
def test_bad_options_list_the_accepted_values(kwargs, match):
    model, opt, batch, val = _setup("adam", steps=0)
    with pytest.raises(ValueError, match=match):
        step_values(model, opt, LOSS, batch, val, **kwargs)


def test_empty_validation_batches_are_refused():
    model, opt, batch, val = _setup("adam", steps=0)
    with pytest.raises(ValueError, match="non-empty list"):
        step_values(model, opt, LOSS, batch, [])
    with pytest.raises(ValueError, match="validation batch 0 is empty"):
        step_values(model, opt, LOSS, batch, (val[0][:0], val[1][:0]))


def test_batchnorm_in_train_mode_is_refused():
    from estimators import SampleInteractionError

    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    opt = torch.optim.Adam(model.parameters())
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(SampleInteractionError, match="BatchNorm1d"):
        step_values(model, opt, LOSS, (x, y), (x, y))
    model.eval()  # running statistics: samples no longer interact
    assert step_values(model, opt, LOSS, (x, y), (x, y)).shape == (6,)

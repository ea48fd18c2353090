"""The fidelity study (`python -m attribution fidelity`): its quick grid, configuration and diagnostic."""

import json

import pandas as pd
import pytest
import torch
from torch import nn

import validation
from attribution.__main__ import main as cli
from attribution.experiments import fidelity
from attribution.experiments.fidelity import QUICK, FidelityConfig, exact_in_g_values


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One run of the reduced grid through the command line, shared by the tests below."""
    out = tmp_path_factory.mktemp("fidelity-quick")
    assert cli(["fidelity", "--quick", "--out", str(out)]) == 0
    return out, pd.read_csv(out / "cells.csv")


def test_quick_grid_writes_every_output(quick):
    out, cells = quick
    for name in ("cells.csv", "values.csv", "results.md", "r_by_phase_loo.png", "scatter_headline.png", "config.json", "run.json"):
        assert (out / name).stat().st_size > 0, name
    assert FidelityConfig.from_json((out / "config.json").read_text()) == QUICK
    info = json.loads((out / "run.json").read_text())
    assert info["command"].startswith("python -m attribution fidelity --quick") and info["machine"]["nproc"] >= 1
    variants = len(QUICK.estimators) * len(QUICK.val_points)
    cells_per_run = len(QUICK.phases) * len(QUICK.truths)
    assert len(cells) == len(QUICK.seeds) * len(QUICK.models) * len(QUICK.optimizers) * cells_per_run * variants
    assert set(cells.optimizer) == set(QUICK.optimizers) and set(cells.phase) == {p for p, _ in QUICK.phases}
    assert cells[["pearson", "spearman", "kendall"]].abs().max().max() <= 1 + 1e-12
    assert cells.pearson.notna().all()
    values = pd.read_csv(out / "values.csv")
    assert len(values) == len(QUICK.optimizers) * len(QUICK.phases) * QUICK.loo_batch
    assert "## Every cell: Pearson R against leave-one-out" in (out / "results.md").read_text()


def test_quick_grid_sgd_cells_all_linearizations_coincide(quick):
    # Under plain SGD the tangent, the secant and the proxy are all J = −lr: the same numbers.
    _, cells = quick
    sgd = cells[(cells.optimizer == "sgd") & cells.estimator.isin(["sgd", "tangent", "secant"])]
    assert (sgd.pearson_vs_tangent > 1 - 1e-9).all()


def test_quick_grid_adam_aware_values_beat_the_sgd_proxy_after_the_first_steps(quick):
    _, cells = quick
    r = cells[cells.optimizer == "adam"].set_index(["phase", "variant"])["pearson"]
    # After 30 Adam steps the tangent with the lookahead gradient is first-order exact up to
    # per-sample curvature: R = 0.997 on this MLP (seed 0), the SGD proxy 0.965. Bounds leave
    # room for BLAS differences; the ordering is the study's headline claim.
    assert r["mid", "tangent/lookahead"] > 0.98
    assert r["mid", "tangent/lookahead"] > r["mid", "sgd/current"]
    # Step 1 is the documented weakness (docs/results.md): Adam is sign descent, the tangent
    # slope collapses (R = 0.13-0.15 here) while the secant does not (0.80). The diagnostic that
    # keeps Adam's exact update in g but is first order in θ matches leave-one-out (R = 1.000),
    # so the loss is all in linearizing the update, none in the validation curvature.
    assert r["step 1", "secant/current"] > r["step 1", "tangent/current"] + 0.3
    assert r["step 1", "exact-g/current"] > 0.99


def test_exact_in_g_diagnostic_matches_the_oracles_when_the_step_is_small():
    # With a tiny lr the real game is first order in θ, so the diagnostic must equal the oracles
    # (relative error O(lr)); exercises the stacked update rule and the Shapley weights.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    val = (torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,)))
    loss = nn.functional.cross_entropy
    for cls, kw in [(torch.optim.Adam, {"lr": 1e-2}), (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1})]:
        opt = cls(model.parameters(), **kw)
        for _ in range(2):
            opt.zero_grad()
            loss(model(x), y).backward()
            opt.step()
        for group in opt.param_groups:
            group["lr"] *= 1e-4
        loo = validation.leave_one_out(model, opt, loss, (x, y), val)
        shapley = validation.shapley_values(model, opt, loss, (x, y), val).values
        diag_loo = exact_in_g_values(model, opt, loss, (x, y), val, "loo", ["current"])["current"]
        diag_shapley = exact_in_g_values(model, opt, loss, (x, y), val, "shapley", ["current"])["current"]
        assert (diag_loo - loo).abs().max() < 1e-4 * loo.abs().max(), cls.__name__
        assert (diag_shapley - shapley).abs().max() < 1e-4 * shapley.abs().max(), cls.__name__


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_lm_chunks_are_unpadded_so_the_token_mean_is_a_mean_over_samples():
    config = FidelityConfig(models=("lm-tied",))
    task = fidelity.make_task("lm-tied", 0, config)
    assert (task.train.inputs > 0).all() and (task.train.targets > 0).all()
    assert task.train.inputs.shape[1] == config.lm_length
    model = task.build()
    batch = (task.train.inputs[:4], task.train.targets[:4])
    c = validation.per_sample_grads(model, task.loss_fn, batch)  # refuses anything but a mean or sum
    model.zero_grad()
    task.loss_fn(model(batch[0]), batch[1]).backward()
    assert torch.allclose(c["tok.weight"].sum(0), model.tok.weight.grad, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"models": ("resnet",)}, "accepted values: 'mlp', 'cnn', 'lm', 'lm-tied'"),
        ({"optimizers": ()}, "optimizers=(): empty"),
        ({"phases": (("a", 5), ("b", 5))}, "strictly increasing"),
        ({"shapley_batch": 17}, "exact Shapley cells need 2 <= n <= min(16"),
        ({"seeds": ()}, "give at least one seed"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FidelityConfig(**kwargs)


def test_cli_lists_the_fidelity_command(capsys):
    assert cli([]) == 0 and "fidelity" in capsys.readouterr().out


def test_docstring_examples():
    import doctest

    result = doctest.testmod(fidelity, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0

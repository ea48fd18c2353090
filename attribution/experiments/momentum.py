"""``python -m attribution momentum``: do a run's values add up to the run's improvement?

Trains the digits MLP (float64, batches of 32) for ``--steps`` steps under each optimizer with
one tracker per credit definition attached at once (trackers only read; training is the same):
``credit="step"`` and ``credit="momentum"`` with each ``--windows`` value. Along the way it
measures the run's first-order validation-loss change

    F = Σ_t −⟨∇L_val(θ_t + ½ Δ_t), Δ_t⟩,   Δ_t = θ_{t+1} − θ_t (the real step),

which equals the actual drop L_val(θ_0) − L_val(θ_T) to second order, and reports Σ_z value_z / F
per tracker (as the live tracker reads and as saved, the open window closed by its tail), the
memory momentum credit keeps (bytes of captured factors) and the time, over ``--seeds``.

Outputs in ``--out`` (default ``results/momentum``): ``runs.csv`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from attribution import InRunShapley
from attribution.experiments.data import load_digits
from attribution.experiments.models import mlp

#: name -> (class, kwargs): the fidelity study's settings.
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.05}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 1e-2}),
}


def run_one(optimizer: str, seed: int, steps: int, windows: tuple[int, ...], batch: int = 32, val_size: int = 300) -> list[dict]:
    """One training run with a ``credit="step"`` tracker and one ``credit="momentum"`` tracker per window."""
    train, val, _ = load_digits(seed=seed, dtype=torch.float64, image=False)
    val_batch = (val.inputs[:val_size], val.targets[:val_size])
    loss_fn = nn.functional.cross_entropy
    model = mlp(seed=seed).double()
    cls, kwargs = OPTIMIZERS[optimizer]
    opt = cls(model.parameters(), **kwargs)
    variants = {"step": {}} | {f"momentum W={w}": {"credit": "momentum", "momentum_window": w} for w in windows}
    trackers = {name: InRunShapley(model, opt, loss_fn, val_batch, **kw) for name, kw in variants.items()}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        start = float(loss_fn(model(val_batch[0]), val_batch[1]))
    first_order, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch,), generator=gen)
        opt.zero_grad()
        with contexts(trackers, train.ids[idx].tolist()):
            loss_fn(model(train.inputs[idx]), train.targets[idx]).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        delta = [p.detach() - b for p, b in zip(model.parameters(), before)]
        first_order += _first_order(model, loss_fn, val_batch, before, delta)
    with torch.no_grad():
        end = float(loss_fn(model(val_batch[0]), val_batch[1]))
    seconds = time.perf_counter() - t0
    rows = []
    for name, tracker in trackers.items():
        live = float(tracker.values()["value"].sum())
        saved = float(tracker._gathered(closed=True).totals.sum())
        rows.append({
            "optimizer": optimizer, "seed": seed, "credit": name, "steps": steps, "sum_values": live,
            "sum_values_saved": saved, "first_order_change": first_order, "actual_drop": start - end,
            "ratio": live / first_order, "ratio_saved": saved / first_order, "momentum_bytes": tracker.momentum_bytes,
            "exact_steps": int((tracker.step_info()["route"] != "linear").sum()), "run_seconds": seconds,
        })
        tracker.close()
    return rows


class contexts:
    """Enter ``tracker.batch(ids)`` of every tracker (they all capture the same pass)."""

    def __init__(self, trackers: dict, ids: list):
        self.managers = [t.batch(ids) for t in trackers.values()]

    def __enter__(self):
        for m in self.managers:
            m.__enter__()

    def __exit__(self, *exc):
        for m in reversed(self.managers):
            m.__exit__(*exc)
        return False


def _first_order(model, loss_fn, val_batch, before, delta) -> float:
    """−⟨∇L_val(θ + ½Δ), Δ⟩ at the step's own midpoint (parameters restored bit-exactly)."""
    params = list(model.parameters())
    after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b, d in zip(params, before, delta):
            p.copy_(b + 0.5 * d)
    grads = torch.autograd.grad(loss_fn(model(val_batch[0]), val_batch[1]), params)
    with torch.no_grad():
        for p, a in zip(params, after):
            p.copy_(a)
    return -sum(float((g * d).sum()) for g, d in zip(grads, delta))


def markdown(runs: pd.DataFrame, info: dict) -> str:
    """Ratio Σ values / first-order change, mean ± std over seeds, per optimizer × credit."""
    def mean_std(s: pd.Series) -> str:
        return f"{s.mean():.3f} ± {s.std(ddof=0):.3f}" if len(s) > 1 else f"{s.mean():.3f}"

    table = runs.groupby(["optimizer", "credit"], sort=False).agg(
        ratio=("ratio", mean_std), saved=("ratio_saved", mean_std), kib=("momentum_bytes", lambda b: f"{b.mean() / 1024:.0f}"),
        exact=("exact_steps", "mean"), seconds=("run_seconds", "mean"),
    ).reset_index()
    lines = [
        f"Command: `{info['command']}` ({info['seconds']:.0f} s wall; {info['machine']})", "",
        "| optimizer | credit | Σ values / first-order change | as saved (window closed) | kept factors KiB | exact steps | run s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        lines.append(f"| {r.optimizer} | {r.credit} | {r.ratio} | {r.saved} | {r.kib} | {r.exact:.0f} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m attribution momentum", description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated from {', '.join(OPTIMIZERS)} (default: {','.join(OPTIMIZERS)})")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (default: 150)")
    parser.add_argument("--windows", default="4,16", help="momentum_window values to compare (default: 4,16)")
    parser.add_argument("--quick", action="store_true", help="smoke run: SGD-momentum and Adam, one seed, 12 steps, window 4 (default: off)")
    parser.add_argument("--out", default="results/momentum", help="output folder (default: results/momentum)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    opts = [o for o in args.optimizers.split(",") if o]
    unknown = [o for o in opts if o not in OPTIMIZERS]
    if unknown:
        raise SystemExit(f"unknown optimizer(s) {unknown}; accepted: {', '.join(OPTIMIZERS)}")
    seeds, steps, windows = [int(s) for s in args.seeds.split(",")], args.steps, tuple(int(w) for w in args.windows.split(","))
    if args.quick:
        opts, seeds, steps, windows = ["sgd-momentum", "adam"], [0], 12, (4,)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, rows = time.perf_counter(), []
    with warnings.catch_warnings(), tqdm(total=len(opts) * len(seeds), desc="momentum credit", unit="run") as bar:
        warnings.simplefilter("ignore", UserWarning)
        for o in opts:
            for s in seeds:
                rows += run_one(o, s, steps, windows)
                bar.update(1)
    runs = pd.DataFrame(rows)
    runs.to_csv(out / "runs.csv", index=False)
    import platform

    info = {"command": "python -m attribution momentum " + " ".join(argv if argv is not None else []),
            "seconds": time.perf_counter() - t0, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, torch {torch.__version__}"}
    text = markdown(runs, info)
    (out / "results.md").write_text(text)
    (out / "run.json").write_text(json.dumps(info, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fidelity of the streamable second-order validation point ``val_point="predicted"`` against the midpoint.

``python -m attribution.experiments.predicted_point [--model mlp|gpt|cnn] [--steps S] [--quick] [--json PATH]``

Trains the benchmark's model (``attribution.experiments.bench``: AdamW, its batches and
validation batch) for S steps. Before each real step it values the batch three times with
:func:`attribution.step_values` (secant slopes, ``route="linear"``, which leaves the model and the
optimizer untouched), at the validation points

* ``midpoint``  θ_t + ½(Δ(g_B) + Δ(0)), the default (needs g_B, so it cannot stream),
* ``predicted`` θ_t + ½(Δ(ĝ) + Δ(0)), ĝ = AdamW's bias-corrected first moment (streams),
* ``current``   θ_t (streams; first order),

and compares each with the midpoint's values (Pearson R and relative L2 distance over the batch's
samples) and with the truth of the whole batch: Σ_z φ_z against the validation loss the batch's
gradient removed in the real step, L_val(θ_t + Δ(0)) − L_val(θ_{t+1}) (the grand coalition's utility
U(B) − U(∅); momentum and decay move θ by Δ(0) with or without the batch). Prints per point the mean
and the worst step, after ``--skip`` early steps (Adam's first steps, which the tracker's automatic
route values exactly rather than by any slope). A step whose game value is within 64 roundings of
L_val in the model's dtype is left out of the totals' column (it cannot judge them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings

import torch

import estimators
import optimizers
from attribution import step_values
from attribution.experiments.bench import DEFAULTS, BenchConfig, Workload, _settings

POINTS = ("midpoint", "predicted", "current")

_QUICK = {
    "mlp": dict(width=32, d_in=16, batch=16, val_batch=8),
    "gpt": dict(width=32, depth=1, heads=2, seq_len=16, batch=4, val_batch=2, vocab=64),
    "cnn": dict(batch=8, val_batch=4),
}


def _config(model: str, quick: bool) -> BenchConfig:
    sizes = {k: v for k, v in DEFAULTS[model].items() if k in BenchConfig.__dataclass_fields__}
    if quick:
        sizes.update(_QUICK[model])
    return BenchConfig(model=model, threads=1, modes=("ghost",), **sizes)


def _val_loss(w: Workload) -> float:
    """L_val at the current parameters, in eval mode as the tracker's validation passes (no RNG used)."""
    x, y = w.val_batches[0]
    was = w.model.training
    w.model.eval()
    try:
        with torch.no_grad():
            return float(w.loss_fn(w.model(x), y))
    finally:
        w.model.train(was)


def run(cfg: BenchConfig, steps: int) -> list[dict]:
    """One row per (step, point): Pearson R and relative L2 to the midpoint's values, Σφ and the real ΔL_val."""
    w = Workload(cfg, "plain")
    rows = []
    for step in range(steps):
        x, y = w.batches[step % len(w.batches)]
        values = {
            vp: step_values(w.model, w.opt, w.loss_fn, (x, y), w.val_batches[0], linearization="secant", val_point=vp, route="linear")
            for vp in POINTS
        }
        # The batch's game U(B) − U(∅): what the step with g_B removes beyond the step with g = 0
        # (momentum and decay carry Δ(0) either way), L_val(θ_t + Δ(0)) − L_val(θ_t + Δ(g_B)).
        lin = optimizers.linearize(w.opt, params=[p for p in w.model.parameters() if p.requires_grad])
        with estimators.shifted_parameters({p: lin.zero_update(p) for p in lin.params}):
            carried = _val_loss(w)
        w.train_step()  # the real step (no tracker attached): θ_t + Δ(g_B)
        removed = carried - _val_loss(w)
        dtype = next(w.model.parameters()).dtype
        # A game value within a few roundings of L_val (a model whose validation loss has gone to
        # ~0) cannot judge the totals: such steps are left out of that column.
        resolved = abs(removed) > 64 * torch.finfo(dtype).eps * abs(carried)
        mid = values["midpoint"]
        for vp, phi in values.items():
            pearson = float(torch.corrcoef(torch.stack([phi, mid]))[0, 1]) if vp != "midpoint" else 1.0
            rows.append({
                "step": step, "val_point": vp, "pearson_vs_midpoint": pearson,
                "rel_l2_vs_midpoint": float((phi - mid).norm() / mid.norm().clamp_min(1e-300)),
                "total": float(phi.sum()), "game_value": removed,
                "total_rel_error": abs(float(phi.sum()) - removed) / abs(removed) if resolved else None,
            })
    return rows


def report(rows: list[dict], skip: int) -> str:
    kept = [r for r in rows if r["step"] >= skip]
    lines = [
        f"Steps {skip}–{max(r['step'] for r in rows)} (mean, worst step)",
        "",
        "| val_point | Pearson R vs midpoint | relative L2 vs midpoint | relative error of Σφ vs U(B) − U(∅) |",
        "|---|---|---|---|",
    ]
    for vp in POINTS:
        rs = [r for r in kept if r["val_point"] == vp]
        if not rs:
            continue
        p = [r["pearson_vs_midpoint"] for r in rs]
        l2 = [r["rel_l2_vs_midpoint"] for r in rs]
        tot = [r["total_rel_error"] for r in rs if r["total_rel_error"] is not None]
        total = f"{statistics.mean(tot):.4f} ({max(tot):.4f}), {len(tot)} of {len(rs)} steps" if tot else "– (no step resolves it)"
        lines.append(f"| {vp} | {statistics.mean(p):.5f} ({min(p):.5f}) | {statistics.mean(l2):.4f} ({max(l2):.4f}) | {total} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m attribution.experiments.predicted_point", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(_QUICK), default="mlp", help="the bench model (default: mlp)")
    parser.add_argument("--steps", type=int, default=30, help="training steps valued (default: 30)")
    parser.add_argument("--skip", type=int, default=10, help="early steps left out of the summary (default: 10)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (default: off)")
    parser.add_argument("--json", default=None, help="write the per-step rows here (default: none)")
    args = parser.parse_args(argv)
    if args.steps < 1 or not 0 <= args.skip < args.steps:
        parser.error(f"need --steps ≥ 1 and 0 ≤ --skip < --steps (got {args.steps}, {args.skip})")
    cfg = _config(args.model, args.quick)
    with warnings.catch_warnings(), _settings(cfg):
        warnings.simplefilter("ignore")  # the first steps' poor-linearization warnings are expected
        rows = run(cfg, args.steps)
    print(report(rows, args.skip))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()

"""K validation targets on a convolution: which contraction is cheaper, timed per layer.

``python -m attribution.experiments.conv_many [--samples 128] [--reps 5]`` times, on the three
``nn.Conv2d`` layers of the bench CNN (3→32 at 32 × 32, 32→64 at 32 × 32, 64→64 at 16 × 16,
3 × 3 kernels, one thread), the K = 2, 4 and 8 dense contraction ⟨P_k, c_z⟩ three ways:

* ``per target``: one convolution per target (``ConvBilinear.dense_values`` K times);
* ``stacked``: ``ConvBilinear.dense_values_many`` (the K weights stacked as output channels of
  one convolution, or the per-sample route where the cost model says so: ``taken``);
* ``per-sample``: the generic route of :class:`estimators._factors.Bilinear` (unfold the
  patches, build c_z = Σ_t u_t v_tᵀ per sample, multiply by the [R·C, K] stack).

Each time is the best of ``--reps`` calls after a warm-up; the ratio is per target / route (above
1: the route is faster). It also prints the largest difference between the routes' values, which
must be float32 rounding. These are the numbers behind ``ConvBilinear._per_sample_slowdown``
(docs/performance.md, finding 24).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

LAYERS = ((3, 32, 32), (32, 64, 32), (64, 64, 16))  # (C_in, C_out, H = W) of the bench CNN


def _best(f, reps: int) -> float:
    f()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(samples: int = 128, reps: int = 5, layers=LAYERS, Ks=(2, 4, 8)) -> list[dict]:
    """One row per (layer, K): ms of each route, the ratios and the largest value difference."""
    from estimators._factors import Bilinear
    from estimators._rules.conv import Conv2dRule

    torch.manual_seed(0)
    rows = []
    for c_in, c_out, hw in layers:
        conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        x = torch.randn(samples, c_in, hw, hw)
        with torch.no_grad():
            b = torch.randn(conv(x).shape)
        term = Conv2dRule.terms(conv, x, b)["weight"]
        generic = Bilinear(term.rows, term.cols)  # the per-sample route, whatever the cost model says
        for K in Ks:
            Ps = [torch.randn(conv.weight.shape) for _ in range(K)]
            per_target = lambda: torch.stack([term.dense_values(P) for P in Ps], 1)  # noqa: E731
            stacked = lambda: term.dense_values_many(Ps)  # noqa: E731
            per_sample = lambda: generic.dense_values_many(Ps)  # noqa: E731
            ref = per_target()
            diff = max(float((stacked() - ref).abs().max()), float((per_sample() - ref).abs().max()))
            t = {name: _best(f, reps) for name, f in
                 (("per_target", per_target), ("stacked", stacked), ("per_sample", per_sample))}
            rows.append({
                "layer": f"{c_in}->{c_out} {hw}x{hw}", "K": K,
                "ms_per_target": 1e3 * t["per_target"], "ms_stacked": 1e3 * t["stacked"],
                "ms_per_sample": 1e3 * t["per_sample"],
                "ratio_stacked": t["per_target"] / t["stacked"],
                "ratio_per_sample": t["per_target"] / t["per_sample"],
                "taken": "per-sample" if term._materializes(K) else "stacked",
                "max_abs_diff": diff, "scale": float(ref.abs().max()),
            })
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| layer | K | per target ms | dense_values_many ms (route) | ratio | per-sample route ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    rows = measure(args.samples, args.reps)
    for r in rows:
        print(f"| {r['layer']} | {r['K']} | {r['ms_per_target']:.2f} | {r['ms_stacked']:.2f} ({r['taken']}) "
              f"| {r['ratio_stacked']:.2f} | {r['ms_per_sample']:.2f} | {r['ratio_per_sample']:.2f} |")
    rel = max(r["max_abs_diff"] / r["scale"] for r in rows)
    print(f"largest |difference| between routes, relative to the largest value: {rel:.1e} (float32 rounding)")


if __name__ == "__main__":
    main()

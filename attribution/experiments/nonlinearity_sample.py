"""How close the tracker's sampled nonlinearity ν_p is to each parameter's whole ν_p, step by step.

``python -m attribution.experiments.nonlinearity_sample [--model gpt|mlp|minilm] [--steps N] [--quick]``

Trains the benchmark's model (``attribution.experiments.bench``, AdamW, the tracker's defaults)
and, at every step, recomputes each parameter's ν_p on every coordinate
(``estimators.update_nonlinearity(..., max_coordinates=10**9)``) beside the sample the tracker
took (at most 4,096 coordinates, strided, or on a table's touched rows). Prints the parameters
where either side exceeds the route threshold (0.9), with both values and whether the two
route decisions agree: a disagreement sends a parameter to the exact-update route for nothing,
or keeps its slope where the update is far from linear.
"""

from __future__ import annotations

import argparse
import warnings

import estimators
from attribution.experiments.bench import Workload, _settings
from attribution.experiments.step_cost import _config


def compare(model: str, steps: int, quick: bool) -> list[dict]:
    """One row per (step, parameter) where the sampled or the whole ν_p is above the threshold."""
    import attribution._step as step_mod

    cfg = _config(model, quick)
    out: list[dict] = []
    inner = step_mod.StepComputer._update_nonlinearity
    state = {"step": 0}

    def watched(self, lin, batch_grads, val_grads, *, per_parameter=False, rows=None):
        supports = rows
        parts = inner(self, lin, batch_grads, val_grads, per_parameter=True, rows=supports)
        den = sum(b for _, b in parts.values())
        thr = self.nonlinearity_threshold
        for p, (a, b) in parts.items():
            (wa, wb), = estimators.update_nonlinearity(lin, {p: batch_grads[p]}, val_grads, per_parameter=True, max_coordinates=10**9).values()
            sampled, whole = (a / b if b > 0 else 0.0), (wa / wb if wb > 0 else 0.0)
            # the tracker's own test: a share of the step above 1e-6 and ν_p above the threshold
            s_exact, w_exact = b > 1e-6 * den and a > thr * b, wb > 1e-6 * den and wa > thr * wb
            if s_exact or w_exact:
                out.append({"step": state["step"], "param": names[p], "numel": p.numel(), "sampled": sampled,
                             "whole": whole, "agree": s_exact == w_exact, "rows": supports is not None and p in supports})
        state["step"] += 1
        if per_parameter:
            return parts
        num = sum(a for a, _ in parts.values())
        return num / den if den > 0 else 0.0

    step_mod.StepComputer._update_nonlinearity = watched
    try:
        with warnings.catch_warnings(), _settings(cfg):
            warnings.simplefilter("ignore")
            w = Workload(cfg, "ghost")
            names = {p: n for n, p in w.model.named_parameters()}
            for _ in range(steps):
                w.train_step()
            w.tracker.close()
    finally:
        step_mod.StepComputer._update_nonlinearity = inner
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m attribution.experiments.nonlinearity_sample", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gpt", "mlp", "minilm"), default="gpt", help="the bench model (default: gpt)")
    parser.add_argument("--steps", type=int, default=12, help="tracked steps (default: 12)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (default: off)")
    args = parser.parse_args(argv)
    rows = compare(args.model, 3 if args.quick else args.steps, args.quick)
    print("| step | parameter | elements | sampled ν_p | whole ν_p | same route | sampled on rows |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['param']} | {r['numel']} | {r['sampled']:.3f} | {r['whole']:.3f} | {'yes' if r['agree'] else 'NO'} | {'yes' if r['rows'] else 'no'} |")
    print(f"\n{sum(not r['agree'] for r in rows)} of {len(rows)} rows disagree on the route")
    return rows


if __name__ == "__main__":
    main()

"""Where a tracked step's time goes, phase by phase, and the cost of the step's inner kernels.

``python -m attribution.experiments.step_cost [--model mlp|gpt|minilm] [--quick] [--repeats R]``

1. **Phases.** Trains the benchmark's model (``attribution.experiments.bench``, AdamW, the
   tracker's defaults) past its exact-update start, then times R rounds of steps, with each
   phase of ``step_values`` wrapped in a timer: the slopes J, the validation point's shift,
   the validation pass, the contraction with its completeness check (``engine.values``), the
   nonlinearity diagnostic ν and the exact-update part (steps whose route is ``mixed``). Prints
   per phase the median milliseconds per step and the min–max over rounds, beside a plain
   AdamW step of the same model timed in the same rounds, and the minor page faults per plain
   and per tracked step and phase (a tensor above glibc's 32 MB mmap threshold is mapped anew, and each
   of its pages faulted, at every allocation).
2. **Kernels.** Times, on the same model's state, (a) ν with one rule call per parameter
   against the batched call (``estimators.update_nonlinearity``), and (b) the exact route's
   coalition prefix sums as a loop (``estimators._exact._prefix_sums``) against the
   ``cumsum`` it replaces, on the shapes of one 512-wide parameter (the two agree bit for bit).

Machines here are shared: read ratios measured in the same run, and treat differences inside
the spread as noise.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time
import warnings

import torch

from attribution.experiments.bench import DEFAULTS, BenchConfig, Workload, _settings

PHASES = {  # (object path, method) -> label
    "preconditioning": "J (slopes)",
    "val_point_shift": "shift to the validation point",
    "validation_gradients": "validation pass",
    "_checked_values": "contraction + completeness check",
    "_update_nonlinearity": "nonlinearity ν",
    "_exact_part": "exact-update part",
}


def _config(model: str, quick: bool) -> BenchConfig:
    sizes = {k: v for k, v in DEFAULTS[model].items() if k in BenchConfig.__dataclass_fields__}
    if quick:
        sizes.update({
            "mlp": dict(width=64, d_in=32, batch=32, val_batch=8),
            "gpt": dict(width=32, depth=1, heads=2, seq_len=16, batch=4, val_batch=2, vocab=64),
            "minilm": dict(seq_len=16, batch=4, val_batch=2),
        }[model])
    return BenchConfig(model=model, threads=1, modes=("ghost",), **sizes)


@contextlib.contextmanager
def _timed(step_cls, estimators_mod, totals, faults=None):
    """Wrap each phase of ``step_cls.step_values`` in a timer adding to ``totals[label]`` (and its page faults to ``faults[label]``)."""
    undo = []
    faults = collections.defaultdict(float) if faults is None else faults

    def wrap(owner, name, label):
        inner = getattr(owner, name)

        def timed(*a, **kw):
            t, f = time.perf_counter(), _minor_faults()
            try:
                return inner(*a, **kw)
            finally:
                totals[label] += time.perf_counter() - t
                faults[label] += _minor_faults() - f

        setattr(owner, name, timed)
        undo.append((owner, name, inner))

    for name, label in PHASES.items():
        wrap(estimators_mod if hasattr(estimators_mod, name) and not hasattr(step_cls, name) else step_cls, name, label)
    try:
        yield
    finally:
        for owner, name, inner in reversed(undo):
            setattr(owner, name, inner)


def phases(cfg: BenchConfig, repeats: int, steps: int, warmup: int, faults: dict | None = None) -> dict[str, list[float]]:
    """Milliseconds per step, one entry per round: ``"plain step"``, ``"tracked step"`` and each phase.

    ``faults``: a dict that receives the minor page faults per plain step, per tracked step and
    per phase, per round.
    """
    faults = collections.defaultdict(list) if faults is None else faults
    import attribution._step as step_mod

    plain, tracked = Workload(cfg, "plain"), Workload(cfg, "ghost")
    for _ in range(warmup):
        plain.train_step()
        tracked.train_step()
    out: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(repeats):
        t, f = time.perf_counter(), _minor_faults()
        for _ in range(steps):
            plain.train_step()
        out["plain step"].append((time.perf_counter() - t) / steps * 1e3)
        faults["plain step"].append((_minor_faults() - f) / steps)
        totals: dict[str, float] = collections.defaultdict(float)
        phase_faults: dict[str, float] = collections.defaultdict(float)
        with _timed(step_mod.StepComputer, step_mod.estimators, totals, phase_faults):
            t, f = time.perf_counter(), _minor_faults()
            for _ in range(steps):
                tracked.train_step()
            out["tracked step"].append((time.perf_counter() - t) / steps * 1e3)
            faults["tracked step"].append((_minor_faults() - f) / steps)
        for label in PHASES.values():
            out[label].append(totals[label] / steps * 1e3)
            faults[label].append(phase_faults[label] / steps)
    tracked.tracker.close()
    return dict(out)


def _minor_faults() -> int:
    """Minor page faults of this process so far (first touches of freshly mapped memory)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _repeat(fn, repeats: int, inner: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner * 1e3)
    return times


def kernels(cfg: BenchConfig, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of ν (per parameter / batched) and of the prefix sums (cumsum / loop)."""
    import estimators
    import optimizers
    from estimators._exact import _orders, _prefix_sums, _sampled_nonlinearity_sums

    w = Workload(cfg, "plain")
    for _ in range(3):
        w.train_step()
    x, y = w.batches[0]
    w.opt.zero_grad()
    w.loss_fn(w.model(x), y).backward()
    lin = optimizers.linearize(w.opt)
    grads = {p: p.grad for p in w.model.parameters() if p.grad is not None}  # (MiniLM's pooler gets none)
    gen = torch.Generator().manual_seed(0)
    val = [{p: torch.randn(p.shape, generator=gen) for p in grads}]

    def per_parameter():
        for p, g in grads.items():
            a, b, s = _sampled_nonlinearity_sums(lin, p, g, [val[0][p]], 4096)
            float(a), float(b)

    n, d = (256, 512) if cfg.batch >= 64 else (32, 64)
    cs, orders = torch.randn(n, d, generator=gen), _orders(n, 32, gen)
    cumsum = lambda: torch.cat([torch.zeros(len(orders), 1, d), cs[orders].cumsum(1)], dim=1)  # noqa: E731
    if not torch.equal(cumsum(), _prefix_sums(cs, orders)):
        raise AssertionError("the prefix-sum loop and cumsum disagree")
    return {
        "ν, one rule call per parameter": _repeat(per_parameter, repeats, 10),
        "ν, batched (update_nonlinearity)": _repeat(lambda: estimators.update_nonlinearity(lin, grads, val, per_parameter=True), repeats, 10),
        f"prefix sums [32, {n + 1}, {d}], cumsum": _repeat(cumsum, repeats, 2),
        f"prefix sums [32, {n + 1}, {d}], loop": _repeat(lambda: _prefix_sums(cs, orders), repeats, 2),
    }


def report(rows: dict[str, list[float]], title: str, unit: str = "ms") -> str:
    lines = [f"\n{title}\n", f"| | median {unit} | min–max {unit} |", "|---|---|---|"]
    for label, ts in rows.items():
        lines.append(f"| {label} | {statistics.median(ts):.2f} | {min(ts):.2f}–{max(ts):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m attribution.experiments.step_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "gpt", "minilm"), default="mlp", help="the bench model (default: mlp)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--steps", type=int, default=10, help="steps per round (default: 10)")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps first, past the exact-update start (default: 15)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (default: off)")
    args = parser.parse_args(argv)
    cfg = _config(args.model, args.quick)
    if args.quick:
        args.repeats, args.steps, args.warmup = min(args.repeats, 2), 2, 3
    with warnings.catch_warnings(), _settings(cfg):
        warnings.simplefilter("ignore")  # the start's poor-linearization warnings are expected here
        faults = collections.defaultdict(list)
        out = {"phases": phases(cfg, args.repeats, args.steps, args.warmup, faults), "kernels": kernels(cfg, args.repeats)}
        out["page_faults"] = dict(faults)
    print(report(out["phases"], f"Phases of a tracked step ({cfg.model}, AdamW, tracker defaults), ms per step over {args.repeats} rounds"))
    print(report(out["page_faults"], "Minor page faults per step (first touches of freshly mapped memory)", unit="faults"))
    print(report(out["kernels"], "Inner kernels on the same model, ms per call"))
    return out


if __name__ == "__main__":
    main()

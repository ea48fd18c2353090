"""Where a tracked FSDP2 step's memory goes: resident size at each phase of the step, per rank.

``python -m attribution.experiments.fsdp_memory_phases --width 2048 --depth 7`` spawns W gloo
processes on the CPU with the MLP of :mod:`attribution.experiments.bench_distributed` (sharded
per layer with ``fully_shard``, AdamW) and, for the default tracker (secant + midpoint) and for
``val_point="current", stream=True``, trains ``--steps`` steps. For the last step it prints, per
phase, the resident size when the phase starts and its peak, both in MiB above the resident
size before the step's forward:

* ``forward+backward``: the training forward and backward inside ``tracker.batch`` (with
  ``stream=True`` it holds the streamed contraction);
* ``validation pass``: ∇L_val (at the shifted point for the midpoint);
* ``contraction + check``: the per-sample contraction and the completeness check;
* ``whole valuation``: everything the tracker does inside ``optimizer.step()`` before the update.

As in the bench, the workers run with glibc's mmap threshold at 64 KiB, so the resident size
follows the live tensors, and the peak mark (``VmHWM``) is reset at the start of each phase.
S, the sharded parameters on the rank, is the size of one model-sized vector the tracker holds.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
from torch import nn

#: (label, StepComputer method) of the phases timed inside the valuation
_PHASES = (("validation pass", "validation_gradients"), ("contraction + check", "_checked_values"), ("whole valuation", "step_values"))


def _rss_mib() -> float:
    from attribution.experiments.bench import _proc_status_mb

    return _proc_status_mb("VmRSS")


def _peak_mib() -> float:
    from attribution.experiments.bench import _proc_status_mb

    return _proc_status_mb("VmHWM")


class _Recorder:
    """(start, peak) of nested phases in MiB above ``base``; each phase resets the peak mark, so a
    phase's peak is the larger of its own mark and its inner phases' peaks."""

    def __init__(self):
        self.base = 0.0
        self.log: dict[str, tuple[float, float]] = {}
        self._open: list[list] = []  # [label, start, max peak of the inner phases]

    def enter(self, label: str) -> None:
        from attribution.experiments.bench import _reset_peak_rss

        if not _reset_peak_rss():  # without a fresh mark every peak would be the process's whole-life peak
            raise RuntimeError("fsdp_memory_phases needs Linux's /proc/self/clear_refs and VmHWM to reset the peak mark")
        self._open.append([label, _rss_mib() - self.base, float("-inf")])

    def exit(self) -> None:
        from attribution.experiments.bench import _reset_peak_rss

        label, start, inner = self._open.pop()
        peak = max(_peak_mib() - self.base, inner)
        self.log[label] = (start, peak)
        if self._open:
            self._open[-1][2] = max(self._open[-1][2], peak)
        _reset_peak_rss()  # the outer phase's own mark restarts here: its inner peak is carried above

    def watch(self, computer, method: str, label: str) -> None:
        """Wrap ``computer.method`` (on the instance) as the phase ``label``."""
        inner = getattr(computer, method)

        def watched(*args, **kwargs):
            self.enter(label)
            try:
                return inner(*args, **kwargs)
            finally:
                self.exit()

        setattr(computer, method, watched)


def _worker(rank: int, init_file: str, out_file: str, world_size: int, width: int, depth: int, steps: int) -> None:
    import gc

    import torch.distributed as dist

    from attribution import InRunShapley, PoorLinearizationWarning
    from attribution.experiments.bench_distributed import DistributedBenchConfig, _batch, _data, _local_bytes, _sharded

    warnings.simplefilter("ignore", PoorLinearizationWarning)  # AdamW's first steps: expected, not the subject
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        cfg = DistributedBenchConfig(world_size=world_size, width=width, depth=depth)
        x, y, val = _data(cfg, steps)
        loss_fn = nn.functional.cross_entropy
        row: dict = {"rank": rank}
        for name, options in (("midpoint", {}), ("current, stream=True", {"val_point": "current", "stream": True})):
            model = _sharded(cfg)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            tracker = InRunShapley(model, opt, loss_fn, val, linearization="secant", **options)
            rec = _Recorder()
            for label, method in _PHASES:
                rec.watch(tracker._computer, method, label)
            for step in range(steps):
                idx = _batch(cfg, rank, step)
                opt.zero_grad(set_to_none=True)
                gc.collect()
                dist.barrier()
                rec.base = _rss_mib()
                rec.enter("forward+backward")
                with tracker.batch(idx):
                    loss_fn(model(x[idx]), y[idx]).backward()
                rec.exit()
                opt.step()
            log = rec.log
            row[name] = {label: log[label] for label in ("forward+backward", *(label for label, _ in _PHASES)) if label in log}
            row["sharded_params_mib"] = _local_bytes(model.parameters()) / 2**20
            row["largest_unsharded_layer_mib"] = max(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            tracker.close()
            del tracker, model, opt
        rows: list = [None] * world_size
        dist.all_gather_object(rows, row)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(rows, f)
        gc.collect()
        dist.barrier()  # no rank tears gloo down while another may still hold work in flight
    finally:
        dist.destroy_process_group()


def run_memory_phases(world_size: int = 2, width: int = 2048, depth: int = 4, steps: int = 3) -> list[dict]:
    """Spawn the ranks and return one row per rank: ``{tracker: {phase: (start MiB, peak MiB)}}``, plus S and L in MiB."""
    from attribution.experiments.bench_distributed import spawn_ranks

    return spawn_ranks(_worker, (world_size, width, depth, steps), world_size, lean_malloc=True)


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of :func:`run_memory_phases`'s rows (MiB above the resident size before the step)."""
    lines = ["rank | tracker | phase | start MiB | peak MiB | peak / S"]
    for r in rows:
        S = r["sharded_params_mib"]
        for name in ("midpoint", "current, stream=True"):
            for phase, (start, peak) in r[name].items():
                lines.append(f"{r['rank']} | {name} | {phase} | {start:.1f} | {peak:.1f} | {peak / S:.2f}")
    lines.append(f"S (sharded parameters on a rank) = {rows[0]['sharded_params_mib']:.2f} MiB; "
                 f"largest unsharded layer = {rows[0]['largest_unsharded_layer_mib']:.2f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m attribution.experiments.fsdp_memory_phases", description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=2, help="gloo processes (default: %(default)s)")
    parser.add_argument("--width", type=int, default=2048, help="hidden width of the MLP (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=4, help="linear layers of the MLP (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="steps per tracker; the last is reported (default: %(default)s)")
    args = parser.parse_args(argv)
    rows = run_memory_phases(args.world_size, args.width, args.depth, args.steps)
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()

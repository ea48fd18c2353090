"""Bench of in-run values under FSDP2 (``fully_shard``): per-rank throughput and memory against plain FSDP training.

``python -m attribution.experiments.bench_distributed --world-size 2`` spawns W gloo processes on
the CPU. Every rank shards two identical MLPs with ``fully_shard`` (one per layer, then the root)
and trains them on the same batches with AdamW, interleaved step by step: the plain one, then
the tracked one (``InRunShapley``, secant, ``val_point="midpoint"``), then a third tracked with
``val_point="current", stream=True`` (each parameter contracted in the backward, when
``fully_shard``'s reduce-scatter has given it its averaged shard), so all see the same load of
the machine. Per rank it reports samples per second of each and their ratio, and the peak
resident memory a step adds above the memory before it (sampled every millisecond from
``/proc/self/statm``; the allocator returns large blocks to the system, so this follows the
tensors a step allocates) and that ratio. For reference it also prints the bytes of the
largest unsharded layer (the one P the contraction gathers at a time) and of the sharded
parameters + gradients + AdamW state on the rank.

The lead wires it into ``python -m attribution bench --world-size 2`` with :func:`run_distributed_bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import threading
import time

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class DistributedBenchConfig:
    """Sizes of the distributed bench (defaults: well under a minute on 2 CPU cores)."""

    world_size: int = 2
    steps: int = 8
    warmup: int = 2
    batch_per_rank: int = 64
    width: int = 512
    depth: int = 4
    val_size: int = 64
    seed: int = 0


class _PeakRSS:
    """Peak resident set size (bytes) while the context is open, sampled by a thread every millisecond."""

    _page = os.sysconf("SC_PAGE_SIZE")

    def __init__(self):
        self.peak = self.start = 0

    @classmethod
    def now(cls) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * cls._page

    def __enter__(self):
        self.start = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())

    @property
    def added(self) -> int:
        return max(0, self.peak - self.start)


def _mlp(cfg: DistributedBenchConfig) -> nn.Sequential:
    torch.manual_seed(cfg.seed)
    layers: list[nn.Module] = []
    for i in range(cfg.depth):
        layers += [nn.Linear(32 if i == 0 else cfg.width, cfg.width if i < cfg.depth - 1 else 10)]
        if i < cfg.depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _sharded(cfg: DistributedBenchConfig) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    model = _mlp(cfg)
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    return fully_shard(model)


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors if isinstance(t, torch.Tensor))


def _worker(rank: int, init_file: str, out_file: str, cfg: DistributedBenchConfig) -> None:
    import torch.distributed as dist

    from attribution import InRunShapley

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=cfg.world_size)
    try:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        n = cfg.batch_per_rank * cfg.world_size
        x = torch.randn((cfg.steps + cfg.warmup) * n + cfg.val_size, 32, generator=g)
        y = torch.randint(0, 10, (len(x),), generator=g)
        val = (x[-cfg.val_size :], y[-cfg.val_size :])
        loss_fn = nn.functional.cross_entropy
        kinds = ("plain", "tracked", "streamed")
        models = {kind: _sharded(cfg) for kind in kinds}
        opts = {kind: torch.optim.AdamW(m.parameters(), lr=1e-3) for kind, m in models.items()}
        trackers = {
            "tracked": InRunShapley(models["tracked"], opts["tracked"], loss_fn, val, linearization="secant"),
            "streamed": InRunShapley(
                models["streamed"], opts["streamed"], loss_fn, val, linearization="secant", val_point="current", stream=True
            ),
        }
        seconds = dict.fromkeys(kinds, 0.0)
        peak = dict.fromkeys(kinds, 0)
        for step in range(cfg.warmup + cfg.steps):
            start = step * n + rank * cfg.batch_per_rank
            idx = torch.arange(start, start + cfg.batch_per_rank)
            for kind in kinds:  # interleaved: all see the same load of the machine
                model, o = models[kind], opts[kind]
                dist.barrier()
                with _PeakRSS() as mem:
                    t0 = time.perf_counter()
                    o.zero_grad(set_to_none=True)
                    if kind == "plain":
                        loss_fn(model(x[idx]), y[idx]).backward()
                    else:
                        with trackers[kind].batch(idx):
                            loss_fn(model(x[idx]), y[idx]).backward()
                    o.step()
                    elapsed = time.perf_counter() - t0
                if step >= cfg.warmup:
                    seconds[kind] += elapsed
                    peak[kind] = max(peak[kind], mem.added)
        for tracker in trackers.values():
            tracker.values()  # collective: every rank gathers every id (not timed)
        tracked, opt = models["tracked"], opts["tracked"]
        largest = max(p.numel() * p.element_size() for p in tracked.parameters())
        state = _local_bytes(tracked.parameters()) + _local_bytes(p.grad for p in tracked.parameters())
        state += _local_bytes(v for s in opt.state.values() for v in s.values())
        samples = cfg.steps * cfg.batch_per_rank
        row = {
            "rank": rank,
            "plain_samples_per_s": samples / seconds["plain"],
            "tracked_samples_per_s": samples / seconds["tracked"],
            "throughput_ratio": seconds["plain"] / seconds["tracked"],
            "plain_step_peak_mib": peak["plain"] / 2**20,
            "tracked_step_peak_mib": peak["tracked"] / 2**20,
            "memory_ratio": peak["tracked"] / max(peak["plain"], 1),
            "streamed_samples_per_s": samples / seconds["streamed"],
            "streamed_throughput_ratio": seconds["plain"] / seconds["streamed"],
            "streamed_step_peak_mib": peak["streamed"] / 2**20,
            "streamed_memory_ratio": peak["streamed"] / max(peak["plain"], 1),
            "largest_unsharded_layer_mib": largest / 2**20,
            "sharded_state_mib": state / 2**20,
        }
        rows: list = [None] * cfg.world_size
        dist.all_gather_object(rows, row)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def run_distributed_bench(cfg: DistributedBenchConfig | None = None) -> list[dict]:
    """Spawn ``cfg.world_size`` gloo ranks on the CPU and return one result row per rank (see the module doc)."""
    import torch.multiprocessing as mp

    cfg = cfg or DistributedBenchConfig()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), out, cfg), nprocs=cfg.world_size, join=True)
        with open(out) as f:
            return json.load(f)


def format_rows(rows: list[dict], cfg: DistributedBenchConfig) -> str:
    """A plain-text table of :func:`run_distributed_bench`'s rows."""
    head = (
        f"FSDP2 (fully_shard), gloo on CPU, world size {cfg.world_size}: MLP 32-{cfg.width}x{cfg.depth - 1}-10, "
        f"AdamW, {cfg.batch_per_rank} samples per rank, {cfg.steps} timed steps after {cfg.warmup} warm-up, plain and "
        "tracked interleaved"
    )
    cols = ["rank", "tracker", "plain samples/s", "tracked samples/s", "throughput ratio", "plain step peak MiB",
            "tracked step peak MiB", "memory ratio", "largest layer MiB", "sharded state MiB"]
    lines = [head, " | ".join(cols)]
    for r in rows:
        # (label, prefix of its samples/s and peak, prefix of its ratios): the row keys of _worker
        for name, own, ratio in (("midpoint", "tracked_", ""), ("current, stream=True", "streamed_", "streamed_")):
            lines.append(
                f"{r['rank']} | {name} | {r['plain_samples_per_s']:.0f} | {r[f'{own}samples_per_s']:.0f} | "
                f"{r[f'{ratio}throughput_ratio']:.3f} | {r['plain_step_peak_mib']:.2f} | {r[f'{own}step_peak_mib']:.2f} | "
                f"{r[f'{ratio}memory_ratio']:.2f} | {r['largest_unsharded_layer_mib']:.2f} | {r['sharded_state_mib']:.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m attribution.experiments.bench_distributed", description=__doc__.split("\n")[0])
    defaults = DistributedBenchConfig()
    for field in dataclasses.fields(DistributedBenchConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=getattr(defaults, field.name),
                            help="(default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH (default: none written)")
    args = parser.parse_args(argv)
    cfg = DistributedBenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DistributedBenchConfig)})
    rows = run_distributed_bench(cfg)
    print(format_rows(rows, cfg))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()

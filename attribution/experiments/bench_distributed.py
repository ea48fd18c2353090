"""Bench of in-run values under FSDP2 (``fully_shard``): per-rank throughput and memory against plain FSDP training.

``python -m attribution.experiments.bench_distributed --world-size 2`` spawns W gloo processes on
the CPU. Every rank shards two identical MLPs with ``fully_shard`` (one per layer, then the root)
and trains them on the same batches with AdamW, interleaved step by step: the plain one, then
the tracked one (``InRunShapley``, secant, ``val_point="midpoint"``), then a third tracked with
``val_point="current", stream=True`` (each parameter contracted in the backward, when
``fully_shard``'s reduce-scatter has given it its averaged shard), so all see the same load of
the machine. Per rank it reports samples per second of each and their ratio.

Memory is measured in a second spawn of the world, one life per kind from building the sharded
model to the end of ``memory_steps`` steps: the peak resident size (``VmHWM``, reset before the
life) above the resident size before it. Those workers start with glibc's mmap threshold fixed
at 64 KiB, so each tensor above it is its own mapping, returned to the system when freed and
the resident size follows the live tensors; that slows allocation, hence the separate spawn for
timing. The peak holds the sharded parameters, gradients and AdamW state, the activations, the
gathered layers and whatever the tracker keeps. For reference it also prints the bytes of the
largest unsharded layer (the one P the contraction gathers at a time), of the sharded
parameters on the rank (the size of each model-sized vector the tracker holds: J, the
validation point's shift, the saved parameters, ∇L_val) and of parameters + gradients + AdamW
state on the rank.

The lead wires it into ``python -m attribution bench --world-size 2`` with :func:`run_distributed_bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import tempfile
import time
import warnings

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
    memory_steps: int = 3
    seed: int = 0


def _life_peak(run) -> float:
    """Peak resident bytes above the start while ``run()`` runs: a fresh ``VmHWM`` mark, read after.

    The workers start with glibc's mmap threshold fixed at 64 KiB (:func:`spawn_ranks`,
    ``lean_malloc=True``), so every tensor above it is its own mapping, returned to the system
    when freed: the resident size then follows the live tensors, and an earlier life's freed
    memory is not resident in the next one.
    """
    from attribution.experiments.bench import _proc_status_mb, _reset_peak_rss

    gc.collect()
    start = _proc_status_mb("VmRSS")
    if start is None or not _reset_peak_rss():
        run()
        return float("nan")  # no /proc (not Linux): not measured, and printed as such
    run()
    return (_proc_status_mb("VmHWM") - start) * 2**20


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


def _data(cfg: DistributedBenchConfig, steps: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """``(x [N, 32], y [N], validation batch)``: ``steps`` global batches, then ``cfg.val_size`` validation samples."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(steps * cfg.batch_per_rank * cfg.world_size + cfg.val_size, 32, generator=g)
    y = torch.randint(0, 10, (len(x),), generator=g)
    return x, y, (x[-cfg.val_size :], y[-cfg.val_size :])


def _batch(cfg: DistributedBenchConfig, rank: int, step: int) -> torch.Tensor:
    """Indices of rank ``rank``'s samples at ``step`` (the global batch is the ranks' slices in order)."""
    start = (step * cfg.world_size + rank) * cfg.batch_per_rank
    return torch.arange(start, start + cfg.batch_per_rank)


def spawn_ranks(worker, args: tuple, world_size: int, *, lean_malloc: bool = False):
    """Run ``worker(rank, init_file, out_file, *args)`` on ``world_size`` spawned processes; return what rank 0 wrote to ``out_file`` (JSON).

    ``lean_malloc``: the workers start with glibc's mmap threshold fixed at 64 KiB
    (``MALLOC_MMAP_THRESHOLD_``, read when each process starts), so that every tensor above it is
    its own mapping, returned to the system when freed: the resident size follows the live
    tensors. It slows allocation; time nothing under it.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        if lean_malloc:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        try:
            mp.spawn(worker, args=(os.path.join(tmp, "init"), out, *args), nprocs=world_size, join=True)
        finally:
            if saved is None:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
        with open(out) as f:
            return json.load(f)


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors if isinstance(t, torch.Tensor))


def _worker(rank: int, init_file: str, out_file: str, cfg: DistributedBenchConfig, phase: str) -> None:
    """One rank of the timing run (``phase="time"``) or of the memory run (``"memory"``)."""
    import torch.distributed as dist

    from attribution import InRunShapley, PoorLinearizationWarning

    # AdamW's first steps are far from linear (expected, and marked in step_info): this bench
    # measures cost, not values, so the warning would only bury the table
    warnings.simplefilter("ignore", PoorLinearizationWarning)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=cfg.world_size)
    try:
        x, y, val = _data(cfg, max(cfg.steps + cfg.warmup, cfg.memory_steps))
        loss_fn = nn.functional.cross_entropy
        kinds = ("plain", "tracked", "streamed")
        def build(kind):
            model = _sharded(cfg)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            tracker = None
            if kind == "tracked":
                tracker = InRunShapley(model, opt, loss_fn, val, linearization="secant")
            elif kind == "streamed":
                tracker = InRunShapley(model, opt, loss_fn, val, linearization="secant", val_point="current", stream=True)
            return model, opt, tracker

        def train_step(model, opt, tracker, step):
            idx = _batch(cfg, rank, step)
            opt.zero_grad(set_to_none=True)
            if tracker is None:
                loss_fn(model(x[idx]), y[idx]).backward()
            else:
                with tracker.batch(idx):
                    loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()

        if phase == "memory":
            # One fresh life per kind, from building the sharded model to the end of its last
            # step, so the peak holds the parameters, gradients, optimizer state, activations and
            # whatever the tracker keeps between steps.
            # A first, unmeasured life of each kind pays the one-time costs (lazy imports, caches).
            row: dict = {"rank": rank}
            for measured in (False, True):
                for kind in kinds:
                    dist.barrier()

                    def life(kind=kind):
                        parts = build(kind)
                        for step in range(cfg.memory_steps):
                            train_step(*parts, step)

                    if measured:
                        row[f"{kind}_peak_mib"] = _life_peak(life) / 2**20
                    else:
                        life()
            for kind in ("tracked", "streamed"):
                row[f"{'' if kind == 'tracked' else 'streamed_'}memory_ratio"] = row[f"{kind}_peak_mib"] / max(row["plain_peak_mib"], 1e-9)
        else:
            built = {kind: build(kind) for kind in kinds}
            seconds = dict.fromkeys(kinds, 0.0)
            for step in range(cfg.warmup + cfg.steps):
                for kind in kinds:  # interleaved: all see the same load of the machine
                    dist.barrier()
                    t0 = time.perf_counter()
                    train_step(*built[kind], step)
                    elapsed = time.perf_counter() - t0
                    if step >= cfg.warmup:
                        seconds[kind] += elapsed
            for _, _, tracker in built.values():
                if tracker is not None:
                    tracker.values()  # collective: every rank gathers every id (not timed)
            tracked, opt, _ = built["tracked"]
            largest = max(p.numel() * p.element_size() for p in tracked.parameters())
            state = _local_bytes(tracked.parameters()) + _local_bytes(p.grad for p in tracked.parameters())
            state += _local_bytes(v for s in opt.state.values() for v in s.values())
            samples = cfg.steps * cfg.batch_per_rank
            row = {
                "rank": rank,
                "plain_samples_per_s": samples / seconds["plain"],
                "tracked_samples_per_s": samples / seconds["tracked"],
                "throughput_ratio": seconds["plain"] / seconds["tracked"],
                "streamed_samples_per_s": samples / seconds["streamed"],
                "streamed_throughput_ratio": seconds["plain"] / seconds["streamed"],
                "largest_unsharded_layer_mib": largest / 2**20,
                "sharded_params_mib": _local_bytes(tracked.parameters()) / 2**20,
                "sharded_state_mib": state / 2**20,
            }
        rows: list = [None] * cfg.world_size
        dist.all_gather_object(rows, row)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(rows, f)
        # No rank tears gloo down while the other may still hold work in flight (teardown
        # otherwise aborts now and then: "terminate called without an active exception").
        built = tracked = opt = None  # the models and trackers, freed before the barrier
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed_bench(cfg: DistributedBenchConfig | None = None) -> list[dict]:
    """Spawn ``cfg.world_size`` gloo ranks on the CPU (twice: timing, then memory) and return one row per rank.

    Each row (a dict) holds the rank, ``{plain,tracked,streamed}_samples_per_s``,
    ``throughput_ratio`` / ``streamed_throughput_ratio`` (plain seconds over tracked seconds),
    ``{plain,tracked,streamed}_peak_mib``, ``memory_ratio`` / ``streamed_memory_ratio`` (tracked
    peak over plain peak), ``largest_unsharded_layer_mib``, ``sharded_params_mib`` and
    ``sharded_state_mib`` (see the module doc).
    """
    cfg = cfg or DistributedBenchConfig()
    timed = spawn_ranks(_worker, (cfg, "time"), cfg.world_size)
    memory = spawn_ranks(_worker, (cfg, "memory"), cfg.world_size, lean_malloc=True)  # see _life_peak
    return [{**t, **m} for t, m in zip(timed, memory)]


def format_rows(rows: list[dict], cfg: DistributedBenchConfig) -> str:
    """A plain-text table of :func:`run_distributed_bench`'s rows."""
    head = (
        f"FSDP2 (fully_shard), gloo on CPU, world size {cfg.world_size}: MLP 32-{cfg.width}x{cfg.depth - 1}-10, "
        f"AdamW, {cfg.batch_per_rank} samples per rank, {cfg.steps} timed steps after {cfg.warmup} warm-up, plain and "
        "tracked interleaved"
    )
    cols = ["rank", "tracker", "plain samples/s", "tracked samples/s", "throughput ratio", "plain peak MiB",
            "tracked peak MiB", "memory ratio", "extra MiB", "extra / largest layer", "largest layer MiB",
            "sharded params MiB", "sharded state MiB"]
    lines = [head, " | ".join(cols)]
    for r in rows:
        # (label, prefix of its samples/s and peak, prefix of its ratios): the row keys of _worker
        for name, own, ratio in (("midpoint", "tracked_", ""), ("current, stream=True", "streamed_", "streamed_")):
            extra = r[f"{own}peak_mib"] - r["plain_peak_mib"]
            lines.append(
                f"{r['rank']} | {name} | {r['plain_samples_per_s']:.0f} | {r[f'{own}samples_per_s']:.0f} | "
                f"{r[f'{ratio}throughput_ratio']:.3f} | {r['plain_peak_mib']:.2f} | {r[f'{own}peak_mib']:.2f} | "
                f"{r[f'{ratio}memory_ratio']:.3f} | {extra:.2f} | {extra / r['largest_unsharded_layer_mib']:.2f} | "
                f"{r['largest_unsharded_layer_mib']:.2f} | {r['sharded_params_mib']:.2f} | {r['sharded_state_mib']:.2f}"
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

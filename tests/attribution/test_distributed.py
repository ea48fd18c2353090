"""DistributedDataParallel: 2 gloo processes on CPU give the totals of one process on the whole batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from attribution import InRunShapley

LOSS = nn.functional.cross_entropy
STEPS, PER_RANK, WORLD = 3, 4, 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * PER_RANK * WORLD + 8, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (len(x),), generator=g)


def _global_batches():
    return [torch.arange(s * PER_RANK * WORLD, (s + 1) * PER_RANK * WORLD) for s in range(STEPS)]


def _options(linearization: str) -> dict:
    """``"secant+momentum"``: the secant with credit="momentum" (carried credit across ranks)."""
    if linearization == "secant+momentum":
        return {"linearization": "secant", "credit": "momentum"}
    return {"linearization": linearization}


def _worker(rank, init_file, out_file, linearization):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y = _data()
        val = (x[-8:], y[-8:])
        model = nn.parallel.DistributedDataParallel(_model())
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        tracker = InRunShapley(model, opt, LOSS, val, **_options(linearization))
        for idx in _global_batches():
            mine = idx[rank * PER_RANK : (rank + 1) * PER_RANK]
            opt.zero_grad()
            with tracker.batch(mine):
                LOSS(model(x[mine]), y[mine]).backward()
            opt.step()
        values = tracker.values()  # collective: every rank calls it
        tracker.save(out_file + ".ledger")  # collective too: every rank's values in one file by rank 0
        if rank == 0:
            values.to_pickle(out_file)
        dist.barrier()  # no rank tears gloo down while the other may still hold work in flight
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("linearization", ["tangent", "secant", "secant+momentum"])
def test_ddp_totals_equal_a_single_process_run(tmp_path, linearization):
    out = tmp_path / "values.pkl"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out), linearization), nprocs=WORLD, join=True)
    import pandas as pd

    ddp_values = pd.read_pickle(out).sort_index()
    from attribution._ledger import Ledger, load_checked

    saved = Ledger.from_state_dict(load_checked(str(out) + ".ledger")).values_frame().sort_index()
    assert list(saved.index) == list(ddp_values.index)  # no rank's ids lost (before: about half)
    if "momentum" not in linearization:  # momentum credit: the file also holds the open window's tails
        pd.testing.assert_series_equal(saved["value"], ddp_values["value"])

    x, y = _data()
    val = (x[-8:], y[-8:])
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # Under DDP the default route="auto" cannot switch to the exact-update route (each rank holds
    # only its own samples' factors; it warns instead): the reference is the slope route.
    tracker = InRunShapley(model, opt, LOSS, val, **_options(linearization), route="linear")
    for idx in _global_batches():
        opt.zero_grad()
        with tracker.batch(idx):
            LOSS(model(x[idx]), y[idx]).backward()
        opt.step()
    single = tracker.values().sort_index()
    single_saved = tracker._gathered(closed=True).values_frame().sort_index()
    pd.testing.assert_series_equal(saved["value"], single_saved["value"], rtol=1e-9, atol=1e-14)
    assert list(ddp_values.index) == list(single.index)
    assert (ddp_values["steps_seen"] == 1).all()
    pd.testing.assert_series_equal(ddp_values["value"], single["value"], rtol=1e-9, atol=1e-14)


def _join_worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y = _data()
        model = nn.parallel.DistributedDataParallel(_model())
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        tracker = InRunShapley(model, opt, LOSS, (x[-8:], y[-8:]))
        seen = "no error"
        # Uneven inputs: rank 0 has two batches, rank 1 one.
        with model.join():
            try:
                for step in range(2 - rank):
                    mine = torch.arange(step * 8 + rank * PER_RANK, step * 8 + (rank + 1) * PER_RANK)
                    opt.zero_grad()
                    with tracker.batch(mine):
                        LOSS(model(x[mine]), y[mine]).backward()
                    opt.step()
            except ValueError as err:
                seen = str(err)
        torch.save(seen, f"{out_file}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_join_is_refused_on_every_rank_at_the_first_batch(tmp_path):
    """Under join() a finished rank shadows DDP's all-reduces, not the tracker's: refused, no hang."""
    out = tmp_path / "seen"
    mp.spawn(_join_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        seen = torch.load(f"{out}.{rank}")
        assert "join()" in seen and "drop_last=True" in seen, (rank, seen)

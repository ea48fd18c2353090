"""FSDP2 (``fully_shard``) and DDP (both also with ``stream=True``): 2 gloo processes on CPU equal one process on the whole batch.

Each test spawns two ranks (file:// rendezvous, as tests/attribution/test_distributed.py), runs
the tracked loop, and compares values, totals and history in float64 with the single-process
run on the concatenated global batches (rtol 1e-9, atol 1e-14; measured: about 2e-16 absolute,
``FSDP_REPORT=1 python -m pytest tests/attribution/test_fsdp.py -k single_process -s`` prints it).
"""

import functools
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from attribution import InRunShapley, TrackerUsageError

LOSS = nn.functional.cross_entropy
PER_RANK, WORLD = 4, 2
RTOL, ATOL = 1e-9, 1e-14


# ---------------------------------------------------------------------- models and data
def _mlp():
    torch.manual_seed(0)
    # 3 output rows: the last layer is sharded unevenly over 2 ranks (2 + 1 rows).
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        x = self.norm1(h)
        att = (self.q(x) @ self.k(x).transpose(1, 2)) / x.shape[-1] ** 0.5
        mask = torch.ones(att.shape[-2:], dtype=torch.bool).tril()
        h = h + self.o(att.masked_fill(~mask, float("-inf")).softmax(-1) @ self.v(x))
        return h + self.down(torch.tanh(self.up(self.norm2(h))))


class _TinyLM(nn.Module):
    """A one-block causal transformer whose output head is tied to the token embedding."""

    def __init__(self, vocab: int = 11, d: int = 8, T: int = 5):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.block = _Block(d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, ids):
        pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        return self.head(self.norm(self.block(self.tok(ids) + self.pos(pos))))


def _lm_loss(logits, targets):
    return LOSS(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _model(kind):
    if kind == "mlp":
        return _mlp()
    torch.manual_seed(0)
    return _TinyLM().double()


def _data(kind, steps):
    g = torch.Generator().manual_seed(1)
    n = steps * PER_RANK * WORLD + 8
    if kind == "mlp":
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        return x, torch.randint(0, 3, (n,), generator=g)
    tokens = torch.randint(0, 11, (n, 6), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _loss(kind):
    return LOSS if kind == "mlp" else _lm_loss


def _global_batches(steps):
    return [torch.arange(s * PER_RANK * WORLD, (s + 1) * PER_RANK * WORLD) for s in range(steps)]


def _shard(model, kind, engine):
    if engine.startswith("ddp"):
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for m in ([model[0], model[2]] if kind == "mlp" else [model.block]):
        fully_shard(m)
    return fully_shard(model)  # the tied embedding and head stay in the root's group


def _attempt(seen, name, fn):
    """Run ``fn()`` and record in ``seen[name]`` what it raised on this rank (``None``: nothing)."""
    try:
        fn()
        seen[name] = None
    except Exception as err:  # noqa: BLE001 - the test records what each rank raised
        seen[name] = f"{type(err).__name__}: {err}"


def _spawn(fn, tmp_path, *args):
    mp.spawn(fn, args=(str(tmp_path / "init"), str(tmp_path), *args), nprocs=WORLD, join=True)


# ---------------------------------------------------------------------- values, history, resume
STEPS = 3


def _train(rank, model, opt, tracker, x, y, loss_fn, batches, *, world=WORLD):
    for idx in batches:
        mine = idx[rank * PER_RANK : (rank + 1) * PER_RANK] if world > 1 else idx
        opt.zero_grad()
        if tracker is None:
            loss_fn(model(x[mine]), y[mine]).backward()
        else:
            with tracker.batch(mine):
                loss_fn(model(x[mine]), y[mine]).backward()
        opt.step()


def _local(p):
    return p.to_local() if hasattr(p, "to_local") else p


def _values_worker(rank, init_file, out_dir, engine, kind, linearization):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y = _data(kind, STEPS)
        val, loss_fn = (x[-8:], y[-8:]), _loss(kind)
        batches = _global_batches(STEPS)
        model = _shard(_model(kind), kind, engine)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        stream = "-stream" in engine
        tracker = InRunShapley(model, opt, loss_fn, val, linearization=linearization, record_steps=True, **_stream_options(engine))
        _train(rank, model, opt, tracker, x, y, loss_fn, batches[:2])
        path = f"{out_dir}/run.ledger"
        tracker.save(path)  # collective: rank 0 writes one file with every rank's values
        tracker.close()
        # Resume on every rank from the one file; rank 0 continues the totals, the others the step count.
        # (ddp-stream: the closed tracker's communication hook stays on the DDP model; the new one reuses it.)
        tracker = InRunShapley.load(path, model, opt, loss_fn, val, stream=stream)
        _train(rank, model, opt, tracker, x, y, loss_fn, batches[2:])
        values, history, info = tracker.values(), tracker.history(), tracker.step_info()  # collectives

        # The same run without the tracker: training is bit-identical.
        plain = _shard(_model(kind), kind, engine)
        plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
        _train(rank, plain, plain_opt, None, x, y, loss_fn, batches)
        same = all(torch.equal(_local(a), _local(b)) for a, b in zip(model.parameters(), plain.parameters()))
        same &= all(
            torch.equal(_local(sa[key]), _local(sb[key]))
            for sa, sb in zip(opt.state.values(), plain_opt.state.values())
            for key in sa
        )
        torch.save({"values": values, "history": history, "info": info, "same": same}, f"{out_dir}/rank{rank}.pt")
        # No rank tears gloo down while the other may still hold work in flight (a CI run once
        # aborted in teardown with "terminate called without an active exception").
        del tracker, model, plain
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _stream_options(engine):
    """``ddp-stream`` / ``fsdp-stream``: the contraction streamed in the backward (at val_point='current' or 'predicted').

    Under DDP each bucket is contracted in the tracker's communication hook; under FSDP2 each
    parameter in its post-accumulate-grad hook, which ``fully_shard`` calls after the reduce-scatter.
    """
    return {"stream": True, "val_point": _point(engine)} if "-stream" in engine else {}


def _point(engine):
    """``…-stream-predicted``: streamed at the second-order predicted point (Adam's first moment as ĝ)."""
    return "predicted" if engine.endswith("-predicted") else "current"


def _single_process(kind, linearization, engine):
    x, y = _data(kind, STEPS)
    val, loss_fn = (x[-8:], y[-8:]), _loss(kind)
    model = _model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # Multi-process runs cannot take the exact-update route (each rank holds its own samples only):
    # the reference is the slope route, with ν computed (an infinite threshold never switches).
    # The streamed DDP run is compared with stream=False at the same validation point.
    options = {"val_point": _point(engine)} if "-stream" in engine else {}
    tracker = InRunShapley(
        model, opt, loss_fn, val, linearization=linearization, record_steps=True, nonlinearity_threshold=float("inf"),
        **options,
    )
    _train(0, model, opt, tracker, x, y, loss_fn, _global_batches(STEPS), world=1)
    return tracker


@pytest.mark.parametrize(
    "engine,kind,linearization",
    [
        ("fsdp", "mlp", "secant"), ("fsdp", "mlp", "tangent"), ("fsdp", "lm", "secant"), ("ddp", "mlp", "secant"),
        ("ddp-stream", "lm", "secant"), ("fsdp-stream", "mlp", "secant"), ("fsdp-stream", "lm", "tangent"),
        ("ddp-stream-predicted", "lm", "secant"), ("fsdp-stream-predicted", "mlp", "secant"),
    ],
)
def test_values_history_and_resume_equal_a_single_process_run(tmp_path, engine, kind, linearization):
    import pandas as pd

    _spawn(_values_worker, tmp_path, engine, kind, linearization)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert all(r["same"] for r in ranks), "attaching the tracker changed training"
    single = _single_process(kind, linearization, engine)
    reference, ref_history = single.values().sort_index(), single.history()
    for r in ranks:  # every rank gathers every id
        got = r["values"].sort_index()
        assert list(got.index) == list(reference.index)
        assert (got["steps_seen"] == reference["steps_seen"]).all()
        pd.testing.assert_series_equal(got["value"], reference["value"], rtol=RTOL, atol=ATOL)
        if os.environ.get("FSDP_REPORT"):  # FSDP_REPORT=1 python -m pytest ... -s: the measured differences
            diff = (got["value"] - reference["value"]).abs()
            print(f"\n{engine}-{kind}-{linearization}: max|diff| {diff.max():.3g}, max rel {(diff / reference['value'].abs()).max():.3g}")
        h = r["history"].sort_values(["step", "id"]).reset_index(drop=True)
        ref = ref_history.sort_values(["step", "id"]).reset_index(drop=True)
        assert h[["step", "id"]].equals(ref[["step", "id"]])
        pd.testing.assert_series_equal(h["value"], ref["value"], rtol=RTOL, atol=ATOL)
        assert list(r["info"]["step"]) == list(range(STEPS))
    # The ν diagnostic on shards equals the single-process one (all coordinates of these small layers).
    nu = ranks[0]["info"]["nonlinearity"].to_numpy()
    assert nu == pytest.approx(single.step_info()["nonlinearity"].to_numpy(), rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------- refusals on every rank alike
def _refusal_worker(rank, init_file, out_dir, engine):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    seen = {}
    try:
        x, y = _data("mlp", 2)
        val = (x[-8:], y[-8:])
        model = _shard(_mlp(), "mlp", engine)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for name, kwargs in [
            ("stream", {"stream": True, "val_point": "current"}),
            ("factored", {"estimator": "ghost-factored"}),
            ("momentum", {"credit": "momentum"}),
        ]:
            try:
                InRunShapley(model, opt, LOSS, val, **kwargs).close()
                seen[name] = None
            except (ValueError, TypeError) as err:
                seen[name] = f"{type(err).__name__}: {err}"
        try:  # an operator rule not certified on DTensor shards (Adafactor's factored moments)
            weights = [p for p in model.parameters() if p.dim() == 2]
            others = [p for p in model.parameters() if p.dim() != 2]
            InRunShapley(model, [torch.optim.Adafactor(weights, lr=1e-2), torch.optim.AdamW(others)], LOSS, val).close()
            seen["operator"] = None
        except Exception as err:  # noqa: BLE001
            seen["operator"] = f"{type(err).__name__}: {err}"
        tracker = InRunShapley(model, opt, LOSS, val, linearization="secant")
        before = [_local(p).clone() for p in model.parameters()]
        mine = torch.arange(rank * PER_RANK, (rank + 1) * PER_RANK)
        # Rank 1 gives one id too few: both ranks refuse the step, neither waits on the other.
        opt.zero_grad()
        with tracker.batch(mine.tolist()[: PER_RANK - rank]):
            LOSS(model(x[mine]), y[mine]).backward()
        try:
            opt.step()
            seen["ids"] = None
        except Exception as err:  # noqa: BLE001 - the test records what each rank raised
            seen["ids"] = type(err).__name__
        seen["ids_moved"] = any(not torch.equal(a, _local(b)) for a, b in zip(before, model.parameters()))
        # A non-uniform edit of the gradient on every rank: the reduced completeness check refuses it everywhere.
        opt.zero_grad()
        with tracker.batch(mine.tolist()):
            LOSS(model(x[mine]), y[mine]).backward()
        nn.utils.clip_grad_value_(model.parameters(), 1e-3)
        try:
            opt.step()
            seen["clip"] = None
        except TrackerUsageError as err:
            seen["clip"] = str(err)
        # The tracker goes on: a clean step is valued on both ranks.
        opt.zero_grad()
        with tracker.batch(mine.tolist()):
            LOSS(model(x[mine]), y[mine]).backward()
        opt.step()
        seen["values"] = len(tracker.values())
        # No rank tears gloo down while the other may still hold work in flight (as in _values_worker:
        # a CI run aborted here in teardown with "terminate called without an active exception").
        del tracker, model
        gc.collect()
        dist.barrier()
    finally:
        torch.save(seen, f"{out_dir}/refusal{rank}.pt")
        dist.destroy_process_group()


@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
def test_every_rank_refuses_the_same_bad_step(tmp_path, engine):
    _spawn(_refusal_worker, tmp_path, engine)
    seen = [torch.load(tmp_path / f"refusal{r}.pt", weights_only=False) for r in range(WORLD)]
    # Rank 1's own error; rank 0 refuses because rank 1 did; the step is taken by neither.
    assert seen[1]["ids"] == "ValueError" and seen[0]["ids"] == "RankRefusedError"
    assert not seen[0]["ids_moved"] and not seen[1]["ids_moved"]
    for s in seen:
        assert s["clip"] is not None and "is not the sum of the per-sample contributions" in s["clip"]
        assert s["values"] == WORLD * PER_RANK
        # Both engines stream (test_ddp_stream_refusals_..., test_fsdp_stream_refusals_...).
        assert s["stream"] is None
    if engine == "fsdp":
        assert "estimator='ghost-factored' is not available under fully_shard" in seen[0]["factored"]
        assert "credit='momentum' is not available under fully_shard" in seen[0]["momentum"]
        assert seen[0]["operator"].startswith("UnsupportedOptimizerError: Adafactor has an operator preconditioner")
        assert "AdafactorLinearization is not certified on fully_shard's DTensor shards" in seen[0]["operator"]
    else:
        assert seen[0]["factored"] is None and seen[0]["momentum"] is None


# ---------------------------------------------------------------------- stream=True under DDP: refusals
def _ddp_stream_refusal_worker(rank, init_file, out_dir):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    seen = {}
    streamed = {"stream": True, "val_point": "current"}

    attempt = functools.partial(_attempt, seen)

    def step(tracker, forward):
        """One step whose backward is ``forward()``; records whether the parameters moved."""
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        with tracker.batch(mine.tolist()):
            forward()
        opt.step()
        return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    try:
        x, y = _data("mlp", 2)
        val = (x[-8:], y[-8:])
        mine = torch.arange(rank * PER_RANK, (rank + 1) * PER_RANK)
        # The user's own communication hook: DDP takes one, so the tracker's cannot be added.
        hooked = nn.parallel.DistributedDataParallel(_mlp())
        hooked.register_comm_hook(None, allreduce_hook)
        attempt("user_hook", lambda: InRunShapley(hooked, torch.optim.SGD(hooked.parameters(), lr=0.1), LOSS, val, **streamed))
        builtin = nn.parallel.DistributedDataParallel(_mlp())
        builtin._register_builtin_comm_hook(dist.BuiltinCommHookType.ALLREDUCE)  # not listed in DDP's _comm_hooks
        attempt("builtin_hook", lambda: InRunShapley(builtin, torch.optim.SGD(builtin.parameters(), lr=0.1), LOSS, val, **streamed))
        # A hook the look-up misses: DDP's own refusal to take a second hook is turned into the same advice.
        import attribution._distributed as D

        found, D._user_comm_hook = D._user_comm_hook, lambda ddp: None
        try:
            attempt("unseen_hook", lambda: InRunShapley(hooked, torch.optim.SGD(hooked.parameters(), lr=0.1), LOSS, val, **streamed))
        finally:
            D._user_comm_hook = found

        model = nn.parallel.DistributedDataParallel(_mlp())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tracker = InRunShapley(model, opt, LOSS, val, **streamed)
        attempt("second", lambda: InRunShapley(model, opt, LOSS, val, **streamed))

        def under_no_sync():
            opt.zero_grad()
            with model.no_sync(), tracker.batch(mine.tolist()):
                LOSS(model(x[mine]), y[mine]).backward()

        attempt("no_sync", under_no_sync)

        def accumulated():  # one micro-batch under no_sync, the last one synced, in one batch context
            with model.no_sync():
                (LOSS(model(x[mine[:2]]), y[mine[:2]]) / 2).backward()
            (LOSS(model(x[mine[2:]]), y[mine[2:]]) / 2).backward()

        before = [p.detach().clone() for p in model.parameters()]
        attempt("accumulate", lambda: step(tracker, accumulated))
        seen["accumulate_moved"] = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

        def rank_one_calls_twice():  # rank 1's samples go through two model calls: only its hooks refuse
            if rank == 0:
                LOSS(model(x[mine]), y[mine]).backward()
            else:
                (LOSS(model(x[mine[:2]]), y[mine[:2]]) + LOSS(model.module(x[mine[2:]]), y[mine[2:]])).div(2).backward()

        before = [p.detach().clone() for p in model.parameters()]
        attempt("rank_only", lambda: step(tracker, rank_one_calls_twice))
        seen["rank_only_moved"] = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        # The tracker goes on: a clean step is valued on both ranks.
        seen["clean_moved"] = step(tracker, lambda: LOSS(model(x[mine]), y[mine]).backward())
        seen["values"] = len(tracker.values())
        tracker.close()  # the hook stays on the DDP model; a new streamed tracker takes it over
        attempt("after_close", lambda: InRunShapley(model, opt, LOSS, val, **streamed).close())
        tracker = model = None  # the teardown guard of _values_worker (closures above hold these names)
        gc.collect()
        dist.barrier()
    finally:
        torch.save(seen, f"{out_dir}/stream_refusal{rank}.pt")
        dist.destroy_process_group()


def test_ddp_stream_refusals_are_the_same_on_every_rank(tmp_path):
    _spawn(_ddp_stream_refusal_worker, tmp_path)
    seen = [torch.load(tmp_path / f"stream_refusal{r}.pt", weights_only=False) for r in range(WORLD)]
    for s in seen:
        assert s["user_hook"].startswith("ValueError: the DistributedDataParallel model already has a communication hook (allreduce_hook)")
        assert "already has a communication hook (BuiltinCommHookType.ALLREDUCE)" in s["builtin_hook"]
        assert s["unseen_hook"].startswith("ValueError: stream=True could not register its communication hook")
        assert "can only be called once" in s["unseen_hook"]
        assert s["second"].startswith("ValueError: another InRunShapley(stream=True) is open on this DistributedDataParallel")
        assert s["no_sync"].startswith("ValueError: the backward of this tracker.batch() ran under DistributedDataParallel.no_sync()")
        assert "gradient accumulation under no_sync cannot be streamed" in s["no_sync"]
        assert s["accumulate"].startswith("GhostEngineError: 2 model calls were captured in one step")
        assert not s["accumulate_moved"]
        assert not s["rank_only_moved"]
        assert s["clean_moved"] and s["values"] == WORLD * PER_RANK
        assert s["after_close"] is None
    # Rank 1's hooks found the error; rank 0 refuses because rank 1 did, and neither waits on the other.
    assert seen[1]["rank_only"].startswith("GhostEngineError: 2 model calls were captured in one step")
    assert seen[0]["rank_only"].startswith("RankRefusedError: rank 1 refused this step (GhostEngineError: 2 model calls")


# ---------------------------------------------------------------------- stream=True under FSDP2: refusals
def _fsdp_stream_refusal_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    seen = {}

    attempt = functools.partial(_attempt, seen)

    def moved(before):
        return any(not torch.equal(a, _local(b)) for a, b in zip(before, model.parameters()))

    try:
        x, y = _data("mlp", 2)
        val = (x[-8:], y[-8:])
        mine = torch.arange(rank * PER_RANK, (rank + 1) * PER_RANK)
        model = _shard(_mlp(), "mlp", "fsdp-stream")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        # A plain gradient of the global shape next to a sharded parameter (rank 1 holds one of the
        # last layer's 3 rows): DTensor refuses the mix; a rule run on the shards would broadcast it.
        import optimizers

        last = model[2].weight
        lin = optimizers.linearize(opt, params=[last])
        attempt("plain_grad", lambda: lin.update(last, torch.ones(last.shape, dtype=last.dtype)))
        tracker = InRunShapley(model, opt, LOSS, val, stream=True, val_point="current")
        engine = tracker._computer.engine

        # Every parameter is contracted in the backward, in fully_shard's post-reduce-scatter hooks.
        opt.zero_grad()
        with tracker.batch(mine.tolist()):
            LOSS(model(x[mine]), y[mine]).backward()
        seen["streamed"] = len(engine.streamed_params)
        seen["released"] = all(c.streamed for pas in engine._train for c in pas.calls)
        opt.step()
        # The rule at strided coordinates of this rank's shard (what ν samples under FSDP2, with
        # no communication) is the whole update's value there.
        first = model[0].weight
        lin0 = optimizers.linearize(opt, params=[first])
        flat = _local(first.grad).reshape(-1)
        G = torch.stack([0.5 * flat[::3], flat[::3]])
        sampled = lin0.update_coordinates(first, G, 0, flat.numel(), 3, shard=True)
        whole = [_local(lin0.update(first, s * first.grad)).reshape(-1)[::3] for s in (0.5, 1.0)]
        seen["sampled_shard"] = (tuple(sampled.shape), float(max((a - b).abs().max() for a, b in zip(sampled, whole))))

        def unsynced():  # FSDP2's no_sync: the reduce-scatter (and with it every hook) is skipped
            model.set_requires_gradient_sync(False)
            try:
                opt.zero_grad()
                with tracker.batch(mine.tolist()):
                    LOSS(model(x[mine]), y[mine]).backward()
            finally:
                model.set_requires_gradient_sync(True)

        attempt("unsynced", unsynced)
        opt.zero_grad()

        def step(forward, after=lambda: None):
            before = [_local(p).detach().clone() for p in model.parameters()]
            opt.zero_grad()
            with tracker.batch(mine.tolist()):
                forward()
            after()
            try:
                opt.step()
            finally:
                seen[f"{name}_moved"] = moved(before)

        def accumulated():  # one micro-batch without sync, the last one synced, in one batch context
            model.set_requires_gradient_sync(False)
            (LOSS(model(x[mine[:2]]), y[mine[:2]]) / 2).backward()
            model.set_requires_gradient_sync(True)
            (LOSS(model(x[mine[2:]]), y[mine[2:]]) / 2).backward()

        name = "accumulate"
        attempt(name, lambda: step(accumulated))

        def rank_one_edits():  # after the backward, rank 1 halves its shard of one gradient
            if rank == 1:
                next(model.parameters()).grad.mul_(0.5)

        name = "rank_edit"
        attempt(name, lambda: step(lambda: LOSS(model(x[mine]), y[mine]).backward(), rank_one_edits))

        def rank_one_fails():  # a slope that raises inside the hooks of rank 1 only
            if rank == 1:
                def broken(p, g):
                    raise RuntimeError("injected failure")
                engine._stream.slope = broken
            LOSS(model(x[mine]), y[mine]).backward()

        name = "rank_fail"
        attempt(name, lambda: step(rank_one_fails))
        # The tracker goes on: a clean step is valued on both ranks.
        name = "clean"
        attempt(name, lambda: step(lambda: LOSS(model(x[mine]), y[mine]).backward()))
        seen["values"] = len(tracker.values())
        tracker.close()
        gc.collect()
        dist.barrier()
    finally:
        torch.save(seen, f"{out_dir}/fsdp_stream_refusal{rank}.pt")
        dist.destroy_process_group()


def test_fsdp_stream_refusals_are_the_same_on_every_rank(tmp_path):
    _spawn(_fsdp_stream_refusal_worker, tmp_path)
    seen = [torch.load(tmp_path / f"fsdp_stream_refusal{r}.pt", weights_only=False) for r in range(WORLD)]
    for s in seen:
        assert s["plain_grad"] is not None and "DTensor" in s["plain_grad"], s["plain_grad"]
        assert s["streamed"] == 4 and s["released"]  # two Linear layers' weights and biases
        shape, gap = s["sampled_shard"]
        assert shape[0] == 2 and shape[1] > 1 and gap <= 1e-15, s["sampled_shard"]
        assert s["unsynced"].startswith("ValueError: the backward of this tracker.batch() did not reduce-scatter")
        assert s["accumulate"].startswith("GhostEngineError: 2 model calls were captured in one step")
        assert not s["accumulate_moved"] and not s["rank_edit_moved"] and not s["rank_fail_moved"]
        assert s["clean"] is None and s["clean_moved"]
        assert s["values"] == WORLD * PER_RANK
    # Rank 1 found the error; rank 0 refuses because rank 1 did, and neither waits on the other.
    assert seen[1]["rank_edit"].startswith("TrackerUsageError: step 1: the gradient of parameter '0.weight' changed")
    assert seen[0]["rank_edit"].startswith("RankRefusedError: rank 1 refused this step (TrackerUsageError")
    assert seen[1]["rank_fail"] == "RuntimeError: injected failure"
    assert seen[0]["rank_fail"].startswith("RankRefusedError: rank 1 refused this step (RuntimeError: injected failure)")


# ---------------------------------------------------------------------- Muon (an operator rule) under FSDP2
def _muon_and_adamw(model):
    """Muon on the weight matrices, AdamW on the biases (Muon takes 2-D parameters only)."""
    weights = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    return [torch.optim.Muon(weights, lr=1e-2), torch.optim.AdamW(others, lr=1e-2)]


def _muon_run(model, rank, world, options):
    """3 tracked steps of Muon + AdamW, Newton–Schulz in float64 (torch's runs in bfloat16).

    Under fully_shard torch's bfloat16 Newton–Schulz sums the shards' norms in another order than
    one process does, and the trajectories part by ~1e-3 within a step; with the iteration in
    float64 (optimizers.conformance.float64_newton_schulz, the real step's code path otherwise)
    both runs train alike to ~1e-16, so their values can be compared step by step.
    """
    from optimizers.conformance import float64_newton_schulz

    x, y = _data("mlp", STEPS)
    opts = _muon_and_adamw(model)
    with float64_newton_schulz():
        # Muon's first step jumps at g = 0 (no secant): the tangent values it.
        tracker = InRunShapley(
            model, opts, LOSS, (x[-8:], y[-8:]), linearization="tangent", record_steps=True,
            nonlinearity_threshold=float("inf"), **options,
        )
        for idx in _global_batches(STEPS):
            mine = idx[rank * PER_RANK : (rank + 1) * PER_RANK] if world > 1 else idx
            for o in opts:
                o.zero_grad()
            with tracker.batch(mine):
                LOSS(model(x[mine]), y[mine]).backward()
            for o in opts:
                o.step()
    return tracker


def _muon_worker(rank, init_file, out_dir, stream):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        options = {"stream": True, "val_point": "current"} if stream else {}
        tracker = _muon_run(_shard(_mlp(), "mlp", "fsdp"), rank, WORLD, options)
        torch.save({"history": tracker.history()}, f"{out_dir}/muon{rank}.pt")
        del tracker
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stream", [False, True], ids=["midpoint", "current-stream"])
def test_muon_under_fsdp_equals_a_single_process_run(tmp_path, stream):
    _spawn(_muon_worker, tmp_path, stream)
    options = {"val_point": "current"} if stream else {}
    ref = _muon_run(_mlp(), 0, 1, options).history().sort_values(["step", "id"]).reset_index(drop=True)
    assert ref["value"].abs().max() > 1e-4  # the steps move the validation loss
    for r in range(WORLD):
        got = torch.load(tmp_path / f"muon{r}.pt", weights_only=False)["history"]
        got = got.sort_values(["step", "id"]).reset_index(drop=True)
        assert got[["step", "id"]].equals(ref[["step", "id"]])
        diff = (got["value"] - ref["value"]).abs()
        if os.environ.get("FSDP_REPORT"):
            print(f"\nmuon-{'stream' if stream else 'midpoint'}: max|diff| {diff.max():.3g}, max|value| {ref['value'].abs().max():.3g}")
        assert (diff <= ATOL + RTOL * ref["value"].abs()).all(), diff.max()

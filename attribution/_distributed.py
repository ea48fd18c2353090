"""The data-parallel engines the tracker values: DistributedDataParallel and FSDP2 (``fully_shard``).

Both average the gradient over the W ranks, each rank holding its own samples: rank r's sample
z enters ``param.grad`` as c_z / W, so its value is −⟨J ⊙ ∇L_val, c_z⟩ / W, with the J and
∇L_val of the averaged step (the same on every rank). The difference is where the tensors live:

* **DDP**: every rank holds the whole model, ``param.grad`` (all-reduced) and the optimizer
  state; J and ∇L_val are computed in full on every rank, identically.
* **FSDP2**: every parameter, gradient and optimizer state is a ``DTensor`` shard; J and
  P = J ⊙ ∇L_val are computed on the shard (elementwise optimizer rules only) and P is gathered
  one layer at a time inside the contraction (``estimators._sharded``).

With ``stream=True`` under DDP the contraction runs in a DDP communication hook
(:func:`attach_stream_hook`), after each bucket's all-reduce, at the averaged gradient.

A step is refused on every rank alike: a refusal that depends on one rank's data (its ids, its
captured batch, non-finite gradient shards) is agreed with :meth:`DataParallel.agree` before the
step's collectives start, and the completeness identity is reduced over ranks.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from estimators._sharded import is_sharded, local, sharded_mesh


class RankRefusedError(RuntimeError):
    """Another rank refused the step; this rank refuses it too (so that no rank waits on a collective)."""


@dataclasses.dataclass
class DataParallel:
    """How the tracked model is spread over processes.

    Attributes:
        kind: ``"single"``, ``"ddp"`` or ``"fsdp"``.
        module: the module the hooks and the validation passes use (DDP's ``.module``; the
            ``fully_shard`` ed model itself).
        world_size: W, the number of ranks the gradient is averaged over.
        group: the process group (``None`` for a single process).
    """

    kind: str
    module: nn.Module
    world_size: int = 1
    group: Any = None
    #: the device collectives run on (CPU under gloo)
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    #: the DistributedDataParallel wrapper itself (``None`` otherwise): its join state is read
    wrapper: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def sharded(self) -> bool:
        """Parameters, gradients and optimizer state are FSDP2 shards."""
        return self.kind == "fsdp"

    @property
    def rank(self) -> int:
        if self.world_size == 1:
            return 0
        import torch.distributed as dist

        return dist.get_rank(self.group)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a small float64 tensor over the ranks (returned on the CPU)."""
        import torch.distributed as dist

        out = t.to(self.device).clone()
        dist.all_reduce(out, group=self.group)
        return out.cpu()

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (a collective; ``flag`` itself for one process)."""
        if self.world_size == 1:
            return bool(flag)
        return bool(self.all_reduce(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)).item() > 0)

    def agree(self, error: BaseException | None) -> None:
        """Make every rank refuse the step if one does (a collective; a no-op for one process).

        Each rank passes the exception it raised while checking its own part of the step, or
        ``None``. The rank that failed re-raises its own exception; the others raise
        :class:`RankRefusedError` naming the rank and its message.
        """
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        messages: list = [None] * self.world_size
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=self.group)
        if error is not None:
            raise error
        bad = [(r, m) for r, m in enumerate(messages) if m is not None]
        if bad:
            rank, message = bad[0]
            raise RankRefusedError(
                f"rank {rank} refused this step ({message}); every rank refuses it so that none waits on the others. "
                "Fix the cause that rank names"
            )

    def refuse_join(self) -> None:
        """Refuse a batch under DDP's ``join()`` (uneven inputs), on every rank alike.

        A rank that has run out of batches shadows DDP's own all-reduces with zeros, not the
        tracker's collectives (ids, values, checks), which would then pair with the wrong
        all-reduces. ``Join(...)`` sets the configuration on every rank when it is built, so
        all ranks refuse the first batch together and none waits on another.
        """
        config = getattr(self.wrapper, "_join_config", None)
        if config is not None and config.enable:
            raise ValueError(
                "the DistributedDataParallel model is (or was) inside a join() context for uneven inputs: a rank "
                "that has run out of batches shadows DDP's all-reduces with zeros but not the tracker's collectives "
                "(ids, values, checks), which would pair with the wrong all-reduces. Give every rank the same number "
                "of batches (DistributedSampler(..., drop_last=True), or stop at the shortest rank's loader) and "
                "train without model.join(); DDP keeps the join configuration after the context ends, so wrap a "
                "new DistributedDataParallel(model.module) to track after one"
            )

    def all_finite(self, grads: list[torch.Tensor | None], check: Callable[[list], bool]) -> bool:
        """Whether every rank's gradients are finite: under FSDP2 each rank sees only its shards."""
        if not self.sharded:
            return check(grads)  # DDP's all-reduced gradients are the same on every rank
        return not self.any_rank(not check([None if g is None else local(g) for g in grads]))


def data_parallel(model: nn.Module) -> DataParallel:
    """Recognise a DDP-wrapped model, an FSDP2 (``fully_shard``) model, or a single-process one.

    Raises:
        ValueError: an FSDP2 model sharded over several meshes or a mesh of more than one
            dimension (HSDP, tensor parallelism), or the legacy ``FullyShardedDataParallel``
            wrapper (FSDP1), whose flat parameters hide the layers' own.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        import torch.distributed as dist

        group = model.process_group
        device = next(model.parameters()).device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        return DataParallel("ddp", model.module, dist.get_world_size(group), group, device, wrapper=model)
    _refuse_fsdp1(model)
    mesh = sharded_mesh(model)
    if mesh is not None:
        import torch.distributed as dist

        group = mesh.get_group()
        device = torch.device(mesh.device_type) if dist.get_backend(group) == "nccl" else torch.device("cpu")
        return DataParallel("fsdp", model, dist.get_world_size(group), group, device)
    return DataParallel("single", model)


def _refuse_fsdp1(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "the model is wrapped in FullyShardedDataParallel (FSDP1): its flat parameters hide the layers' own, so "
            "no per-layer contraction is possible. Use FSDP2 (torch.distributed.fsdp.fully_shard), which keeps each "
            "parameter as a sharded DTensor, or DistributedDataParallel"
        )


def refuse_under_fsdp(*, estimator: str, stream: bool, credit: str, optimizers_, engine) -> None:
    """Refuse, at construction, what the FSDP2 path does not value exactly (each error names the fix)."""
    import optimizers

    if estimator != "ghost":
        raise ValueError(
            f"estimator={estimator!r} is not available under fully_shard: the factored path factorizes the whole J of "
            "a layer and the materialized path builds full per-sample gradients on every rank. Use estimator='ghost' "
            "(exact: the dense contraction with the layer's gathered P)"
        )
    if credit != "step":
        raise ValueError(
            "credit='momentum' is not available under fully_shard (the carried credit follows sharded momentum buffers "
            "through later steps, which is not implemented); use credit='step', or DistributedDataParallel"
        )
    for opt in optimizers_:
        cls = optimizers.linearization_class(type(opt))
        if cls.structure != "elementwise" and not cls.dtensor_update:
            raise optimizers.UnsupportedOptimizerError(
                f"{type(opt).__name__} has an operator preconditioner (structure={cls.structure!r}: its J couples the "
                f"entries of a whole matrix), and {cls.__name__} is not certified on fully_shard's DTensor shards "
                "(dtensor_update=False: its update_rule was not checked to gather what it couples). Value it with "
                "DistributedDataParallel (full matrices on every rank) or a single process; elementwise rules (SGD, "
                "Adam, AdamW, ...) and Muon are supported under fully_shard. A linearization whose update_rule runs "
                "on DTensors can set dtensor_update = True (docs/extending.md)"
            )
    if engine.fallback_modules:
        raise ValueError(
            f"module(s) {engine.fallback_modules[:5]} have no ghost rule; the torch.func fallback runs a module with "
            "its full parameters, which fully_shard holds only as shards. Register a LayerRule for them "
            "(docs/extending.md), or train them outside the tracked modules (modules=...)"
        )


def sharded_update_nonlinearity(lin, batch_grads, val_grads, all_reduce, *, per_parameter: bool = False, max_coordinates: int = 4096):
    """ν of :func:`estimators.update_nonlinearity` on FSDP2 shards (a collective).

    The update of an elementwise rule is evaluated on a strided subset of at most
    ``max_coordinates`` coordinates of each rank's shard (no communication; the sums scaled up
    by the stride, as one process samples its whole parameter), an operator rule (Muon) on the
    whole DTensor. The per-parameter sums

        num_p = Σ_i w_i |Δ_i(½ g) − ½ (Δ_i(g) + Δ_i(0))|,   den_p = Σ_i w_i |½ (Δ_i(g) − Δ_i(0))|,

    w = Σ_k |∇L_val^k|, are added over ranks, so every rank gets the
    same ν. Evaluating every coordinate of the shard instead cost three updates of the whole
    shard per step (``bench_distributed --width 2048 --depth 4``: throughput 0.305 then, 0.358 now).
    """
    from estimators._exact import _elementwise, _nonlinearity_sums, _sampled_nonlinearity_sums

    keys, rows = [], []
    for p, g in batch_grads.items():
        if p not in lin:
            continue
        gs = [G[p] for G in val_grads if p in G]
        if not gs:
            continue
        if _elementwise(lin, p) and is_sharded(g) and all(is_sharded(G) for G in gs):
            if local(g).numel():
                num, den, stride = _sampled_nonlinearity_sums(lin, p, g, gs, max_coordinates, shard=True)
            else:  # an empty shard (fewer rows than ranks): nothing on this rank, but the row is summed
                num, den, stride = torch.zeros(()), torch.zeros(()), 1
        else:  # an operator rule (Muon): its DTensor operations gather what they couple; results laid out as p
            upd = torch.stack([local(lin.update(p, s * g).detach()).reshape(-1) for s in (0.0, 0.5, 1.0)])
            (num, den), stride = _nonlinearity_sums(upd, local(sum(G.detach().abs() for G in gs)).reshape(-1)), 1
        keys.append(p)
        rows.append(torch.stack([num.to(torch.float64), den.to(torch.float64)]).cpu() * stride)
    total = all_reduce(torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64))
    parts = {p: (float(a), float(b)) for p, (a, b) in zip(keys, total.tolist())}
    if per_parameter:
        return parts
    num, den = sum(a for a, _ in parts.values()), sum(b for _, b in parts.values())
    return num / den if den > 0 else 0.0


# ---------------------------------------------------------------------- stream=True under DDP
class StreamHook:
    """The tracker's side of the DDP communication hook that streams the contraction (see :func:`attach_stream_hook`).

    Attributes:
        engine: the ``GhostEngine`` whose streamed step the hook feeds (held weakly; ``None``
            once detached: the hook then only all-reduces, as DDP's default does).
        error: the first exception raised while contracting a bucket this step (agreed over the
            ranks at the step, never raised inside DDP's backward).
        fired: buckets all-reduced since :meth:`reset` (0 after a backward under ``no_sync``).
    """

    def __init__(self, group, world_size: int):
        self.group, self.world_size = group, int(world_size)
        self._engine = None
        self.error: BaseException | None = None
        self.fired = 0
        self._lock = threading.Lock()

    @property
    def engine(self):
        return None if self._engine is None else self._engine()

    def reset(self) -> None:
        """A new step: forget the last one's error and count."""
        with self._lock:
            self.error, self.fired = None, 0

    def attach(self, engine) -> None:
        with self._lock:
            self._engine = weakref.ref(engine)
            self.error, self.fired = None, 0

    def detach(self, engine=None) -> None:
        """Stop contracting for ``engine`` (its tracker closed); DDP keeps the hook, which then only averages."""
        with self._lock:
            if engine is None or self.engine is engine:
                self._engine = None
                self.error, self.fired = None, 0

    def contract(self, params, grads) -> None:
        """Hand a bucket's parameters and averaged gradients to the engine; store, never raise, an error."""
        with self._lock:
            self.fired += 1
            engine = self.engine
            if engine is None or self.error is not None or not engine.streaming:
                return
            try:
                engine.contract_streamed(params, grads)
            except BaseException as err:  # noqa: BLE001 - raised at the step, on every rank alike
                self.error = err


#: DDP model -> its StreamHook (a comm hook cannot be removed: a later tracker reuses it)
_STREAM_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stream_comm_hook(state: StreamHook, bucket):
    """DDP's default all-reduce (the bucket pre-scaled by 1/W, then summed), then the streamed contraction.

    The average is computed as DDP's reducer computes it without a hook (``grad * (1/W)`` into
    the bucket, then a sum all-reduce), so training is bitwise the same with and without the
    tracker. When the all-reduce completes, the bucket's views hold the averaged gradient the
    optimizer will use, and J of each of its parameters is evaluated there.
    """
    import torch.distributed as dist

    buffer = bucket.buffer()
    buffer.mul_(1.0 / state.world_size)
    params, grads = bucket.parameters(), bucket.gradients()  # gradients(): views of the buffer

    def contract(fut):
        reduced = fut.value()[0]
        if state.engine is not None:
            state.contract(params, grads)
        return reduced

    return dist.all_reduce(buffer, group=state.group, async_op=True).get_future().then(contract)


def _user_comm_hook(ddp) -> str | None:
    """The name of a communication hook already registered on ``ddp`` that is not the tracker's, if any."""
    hooks = [h for h, _ in getattr(ddp, "_comm_hooks", []) if h is not _stream_comm_hook]
    if hooks:
        return getattr(hooks[0], "__qualname__", repr(hooks[0]))
    try:  # built-in (C++) hooks are not listed in _comm_hooks; DDP's logging data names them
        name = ddp._get_ddp_logging_data().get("comm_hook")
    except Exception:  # noqa: BLE001 - private API: absent in some versions
        name = None
    return name or None


def attach_stream_hook(ddp, engine) -> StreamHook:
    """Make ``stream=True`` work under DistributedDataParallel: contract each bucket at its averaged gradient.

    DDP all-reduces a bucket of gradients once all of them are accumulated, after the
    parameters' post-accumulate-grad hooks have run; J must be evaluated at the averaged
    gradient the optimizer uses. A communication hook (``ddp.register_comm_hook``) that does
    DDP's default average and then calls ``engine.contract_streamed(bucket.parameters(),
    bucket.gradients())`` does that; the engine's stream is set up with ``own_hooks=False``.

    Raises:
        ValueError: ``ddp`` already has a communication hook of its own (its reduction would
            be replaced), another open ``stream=True`` tracker is attached to it, or it uses
            ``gradient_as_bucket_view=True`` with a world size that is not a power of two (its
            average would round differently from DDP's).
    """
    hook = _STREAM_HOOKS.get(ddp)
    if hook is not None:
        if hook.engine is not None:
            raise ValueError(
                "another InRunShapley(stream=True) is open on this DistributedDataParallel model; its communication "
                "hook streams that tracker's contraction and DDP takes one hook only. close() the other tracker "
                "first, or pass stream=False to this one"
            )
    else:
        name = _user_comm_hook(ddp)
        if name is not None:
            raise ValueError(
                f"the DistributedDataParallel model already has a communication hook ({name}); stream=True contracts "
                "each bucket in a communication hook of its own, after DDP's default average, and DDP takes one hook "
                "only. Use stream=False (values after the all-reduce, with any hook), or drop your hook"
            )
        import torch.distributed as dist

        world = dist.get_world_size(ddp.process_group)
        if getattr(ddp, "gradient_as_bucket_view", False) and world & (world - 1):
            # From the second step DDP's reducer divides the bucket view by W in place, where the hook
            # (as the reducer's first step) multiplies by 1/W: the same bits only when 1/W is exact.
            raise ValueError(
                f"stream=True under DistributedDataParallel(gradient_as_bucket_view=True) with {world} processes: "
                "DDP averages a bucket view by dividing by the world size, the stream's communication hook by "
                f"multiplying by 1/{world}, which rounds differently unless the world size is a power of two, so "
                "training would not be bit-identical with the tracker. Use gradient_as_bucket_view=False, a "
                "power-of-two world size, or stream=False"
            )
        hook = StreamHook(ddp.process_group, world)
        try:
            ddp.register_comm_hook(hook, _stream_comm_hook)
        except RuntimeError as err:
            raise ValueError(
                f"stream=True could not register its communication hook on the DistributedDataParallel model ({err}); "
                "it has a hook of its own. Use stream=False"
            ) from err
        _STREAM_HOOKS[ddp] = hook
    hook.attach(engine)
    return hook


__all__ = [
    "DataParallel", "RankRefusedError", "StreamHook", "attach_stream_hook", "data_parallel", "refuse_under_fsdp", "is_sharded",
]

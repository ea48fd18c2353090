"""The data-parallel engines the tracker values: DistributedDataParallel and FSDP2 (``fully_shard``).

Both average the gradient over the W ranks, each rank holding its own samples: rank r's sample
z enters ``param.grad`` as c_z / W, so its value is −⟨J ⊙ ∇L_val, c_z⟩ / W, with the J and
∇L_val of the averaged step (the same on every rank). The difference is where the tensors live:

* **DDP**: every rank holds the whole model, ``param.grad`` (all-reduced) and the optimizer
  state; J and ∇L_val are computed in full on every rank, identically.
* **FSDP2**: every parameter, gradient and optimizer state is a ``DTensor`` shard; J and
  P = J ⊙ ∇L_val are computed on the shard (elementwise optimizer rules only) and P is gathered
  one layer at a time inside the contraction (``estimators._sharded``).

A step is refused on every rank alike: a refusal that depends on one rank's data (its ids, its
captured batch, non-finite gradient shards) is agreed with :meth:`DataParallel.agree` before the
step's collectives start, and the completeness identity is reduced over ranks.
"""

from __future__ import annotations

import dataclasses
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
                "Fix the cause on that rank (each rank's tracker.batch(ids) must hold one id per sample of its batch)"
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
        return DataParallel("ddp", model.module, dist.get_world_size(group), group, device)
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
        if cls.structure != "elementwise":
            raise optimizers.UnsupportedOptimizerError(
                f"{type(opt).__name__} has an operator preconditioner (structure={cls.structure!r}: its J couples the "
                "entries of a whole matrix), which cannot be applied to one rank's shard of the matrix under "
                "fully_shard. Value it with DistributedDataParallel (full matrices on every rank), or a single "
                "process; elementwise rules (SGD, Adam, AdamW, ...) are supported under fully_shard"
            )
    if engine.fallback_modules:
        raise ValueError(
            f"module(s) {engine.fallback_modules[:5]} have no ghost rule; the torch.func fallback runs a module with "
            "its full parameters, which fully_shard holds only as shards. Register a LayerRule for them "
            "(docs/extending.md), or train them outside the tracked modules (modules=...)"
        )


def sharded_update_nonlinearity(lin, batch_grads, val_grads, all_reduce, *, per_parameter: bool = False):
    """ν of :func:`estimators.update_nonlinearity` on FSDP2 shards (a collective).

    The update of an elementwise rule is computed on each rank's shard of every coordinate (no
    strided subset: the sums are split over ranks instead), and the per-parameter sums

        num_p = Σ_i w_i |Δ_i(½ g) − ½ (Δ_i(g) + Δ_i(0))|,   den_p = Σ_i w_i |½ (Δ_i(g) − Δ_i(0))|,

    w = Σ_k |∇L_val^k|, are added over ranks: every rank gets the single-process ν (up to the
    order of summation; that one samples at most 4096 coordinates per parameter).
    """
    keys, rows = [], []
    for p, g in batch_grads.items():
        if p not in lin:
            continue
        gs = [G[p] for G in val_grads if p in G]
        if not gs:
            continue
        w = local(sum(G.detach().abs() for G in gs))
        u0, uh, u1 = (local(lin.update(p, s * g).detach()) for s in (0.0, 0.5, 1.0))
        w = w.to(u0.dtype)
        num = (w * (uh - 0.5 * (u0 + u1)).abs()).sum()
        den = (w * (0.5 * (u1 - u0)).abs()).sum()
        keys.append(p)
        rows.append(torch.stack([num, den]).to(torch.float64).cpu())
    total = all_reduce(torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64))
    parts = {p: (float(a), float(b)) for p, (a, b) in zip(keys, total.tolist())}
    if per_parameter:
        return parts
    num, den = sum(a for a, _ in parts.values()), sum(b for _, b in parts.values())
    return num / den if den > 0 else 0.0


__all__ = ["DataParallel", "RankRefusedError", "data_parallel", "refuse_under_fsdp", "is_sharded"]

"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): one shard per rank.

Under ``fully_shard`` every parameter, its ``.grad``, the optimizer's state and hence J and
P = Jᵀ ∇L_val are ``DTensor`` s placed ``Shard(0)`` over the ranks; inside a module's forward
the layer runs with the gathered (unsharded) weight, so the captured inputs A ``[n, ..., d_in]``
and output gradients B ``[n, ..., d_out]`` are full-width, for this rank's own n samples. The
per-sample contraction ⟨P, c_z⟩ therefore needs the layer's whole P on every rank: it is
gathered by :func:`full` one layer at a time, inside the contraction, and dropped right after,
so peak memory is one unsharded P above the sharded state (as FSDP gathers one layer's
parameters at a time). The completeness identity's ⟨P, param.grad⟩ is taken on the shard
(:func:`local`) and summed over ranks (``CompletenessCheck.reduce``).

Nothing here imports ``torch.distributed`` at module import: a single-process run never pays it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from optimizers._preconditioner import is_dtensor, local_part


# One test for "is this an FSDP2 shard" and one local view, shared with the optimizer rules
# (which run elementwise updates on the shards): optimizers._preconditioner holds them.
is_sharded = is_dtensor
local = local_part


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather of a ``DTensor``; ``t`` itself otherwise).

    A collective: every rank must call it for the same tensors in the same order.

    Example:
        >>> full(torch.ones(2)).tolist()     # a plain tensor is returned as is
        [1.0, 1.0]
    """
    return t.full_tensor() if is_sharded(t) else t


def original_type(cls: type) -> type:
    """The layer class ``fully_shard`` wrapped: ``FSDPLinear`` -> ``nn.Linear`` (``cls`` otherwise).

    ``fully_shard(module)`` swaps the module's class for ``type("FSDP" + name, (FSDPModule, cls))``;
    its forward is the original one, so the original's layer rule applies.

    Example:
        >>> original_type(nn.Linear) is nn.Linear
        True
    """
    if not isinstance(cls, type) or not cls.__name__.startswith("FSDP"):
        return cls
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return cls
    bases = [b for b in cls.__bases__ if b is not FSDPModule]
    if issubclass(cls, FSDPModule) and len(bases) == 1 and cls.__bases__[0] is FSDPModule:
        return bases[0]
    return cls


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back on its sharded parameters (a no-op when they are).

    A forward without backward (under ``no_grad``, or the root, which FSDP2 does not reshard after
    its forward) leaves the gathered copies registered as the module's parameters; the engine's
    model scan and the optimizer's parameters are the sharded ones.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def sharded_mesh(model: nn.Module):
    """The device mesh of ``model``'s sharded parameters, or ``None`` when none is a ``DTensor``.

    Raises:
        ValueError: parameters on several meshes, or a mesh of more than one dimension (HSDP):
            only one flat data-parallel mesh is valued.
    """
    # fully_shard without a mesh makes a new (equal) default mesh per call: compare them by their ranks
    meshes = {(p.device_mesh.device_type, tuple(p.device_mesh.mesh.reshape(-1).tolist()), p.device_mesh.ndim): p.device_mesh
              for p in model.parameters() if is_sharded(p)}
    if not meshes:
        return None
    if len(meshes) > 1:
        raise ValueError(
            f"the model's parameters are sharded over {len(meshes)} device meshes; in-run values need one data-parallel "
            "mesh (fully_shard every module with the same mesh)"
        )
    mesh = next(iter(meshes.values()))
    if mesh.ndim != 1:
        raise ValueError(
            f"the model is sharded over a {mesh.ndim}-D device mesh {tuple(mesh.shape)} (HSDP or tensor parallelism); "
            "in-run values are implemented for a 1-D FSDP mesh only. Use fully_shard(module, mesh=init_device_mesh(..., (world,)))"
        )
    return mesh


def sharded_validation_gradients(
    model: nn.Module,
    loss_fn,
    val_batches: Sequence[Any],
    *,
    params: Iterable[torch.Tensor],
    shift=None,
    losses: list[float] | None = None,
    release_shift: bool = False,
) -> list[dict[torch.Tensor, torch.Tensor]]:
    """∇L_val for each of K validation targets on an FSDP2 model: each rank's shard, ``DTensor`` s.

    ``torch.autograd.grad`` cannot reach FSDP2's sharded parameters (the forward runs on gathered
    copies outside autograd), so each target is one ``backward()`` of the FSDP model, whose
    reduce-scatter writes the shard into ``param.grad``; the training gradients are set aside
    and put back afterwards (the same tensor objects). Every rank evaluates the same validation
    batch, so the reduce-scatter's average over ranks is the single-process gradient. A
    collective: every rank must call it.

    Args:
        model: the ``fully_shard`` ed model (in the caller's isolated pass).
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``.
        val_batches: K ``(inputs, targets)`` batches, the same on every rank.
        params: the parameters whose gradients are returned (sharded ``DTensor`` s).
        shift: parameter -> shift of the validation point (``DTensor`` s), or ``None``.
        losses: a list to which each target's loss is appended.
        release_shift: empty ``shift`` as it is applied (see ``shifted_parameters``).
    Returns:
        K dicts parameter -> ∇L_val^k (shape of the parameter; zeros where the loss does not reach it).
    """
    from ._first_order import batch_loss, shifted_parameters

    params = list(params)
    every = [p for p in model.parameters()]
    saved = {p: p.grad for p in every}
    out: list[dict[torch.Tensor, torch.Tensor]] = []
    try:
        with shifted_parameters(shift, release=release_shift):
            for batch in val_batches:
                for p in every:
                    p.grad = None
                with torch.enable_grad():
                    loss = batch_loss(model, loss_fn, batch)
                    loss.backward()
                if losses is not None:
                    losses.append(float(loss.detach()))
                out.append({p: torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params})
    finally:
        reshard(model)
        for p, g in saved.items():
            p.grad = g
    return out


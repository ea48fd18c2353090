"""The exact per-module fallback: per-sample gradients of parameters no layer rule covers, by torch.func.

Also the forward pre-hooks that give batch-1 embedding lookups (BERT's default position ids) a
batch axis, so that their rule sees one row per sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._capture import _Call, _Tracked
from ._errors import GhostEngineError

if TYPE_CHECKING:
    from ._engine import GhostEngine


#: Keyword arguments shared by every sample even when their first axis happens to equal n.
_SHARED_KWARGS = frozenset({"attn_mask", "is_causal", "need_weights", "average_attn_weights"})


def _broadcast_index_hooks(engine: GhostEngine, tracked: Mapping[nn.Module, _Tracked]) -> list[Any]:
    """Forward pre-hooks giving batch-1 embedding lookups (BERT's default ``[1, T]`` position ids) a batch axis.

    A lookup of indices ``[1, T]`` whose output ``[1, T, d]`` is broadcast over the batch
    downstream has no per-sample output gradient (autograd sums it over the batch). Since
    ``embedding(ids.expand(n, T)) == embedding(ids).expand(n, T, d)`` and the downstream
    broadcast gives the same result for either, the indices are expanded to the batch size n of
    the top-level model call (the root model, or the submodule a ``Trainer`` calls); the rule
    then sees one row per sample. Only trainable ``nn.Embedding`` weights covered by their rule,
    only a leading dimension of 1 with at least 2 dims, and only when the call's tensor inputs
    agree on one batch size n > 1; every other batch-size mismatch is still refused
    (``GhostEngine`` values: "disagree on the batch size").
    """
    embeddings = [m for m, t in tracked.items() if isinstance(m, nn.Embedding) and "weight" in t.covered]

    def expand_index(module, args):
        n, x = engine._call_batch, args[0] if args else None
        if n is None or not torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != 1:
            return None
        return (x.expand(n, *x.shape[1:]), *args[1:])

    return [m.register_forward_pre_hook(expand_index) for m in embeddings]


def _fallback_grads(call: _Call, tracked: _Tracked, n: int) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the module's uncovered parameters by torch.func (vmap of grad).

    For sample z: c_z(p) = ∂/∂p ⟨module(x_z), ∂L/∂y_z⟩, the vector-Jacobian product of the
    module's own forward with the captured output gradient, evaluated at the captured input.
    """
    module = call.module
    fixed = {k: v.detach() for k, v in module.named_parameters()}
    fixed.update(dict(module.named_buffers()))
    train = {a: p.detach() for a, p in tracked.uncovered.items()}
    batched = [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n for a in call.args]
    # Keyword tensors with the batch first (a key_padding_mask [n, S]) are split per sample too;
    # an attention mask [T, S] is shared by every sample.
    kw_batched = {
        k: isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n and k not in _SHARED_KWARGS for k, v in call.kwargs.items()
    }
    if isinstance(module, nn.MultiheadAttention) and isinstance(call.kwargs.get("attn_mask"), torch.Tensor) and call.kwargs["attn_mask"].dim() == 3:
        raise GhostEngineError(
            f"module {tracked.name!r} (MultiheadAttention) got a 3-D attn_mask (one per sample and head); the "
            "per-sample recomputation needs a shared [T, S] mask, or key_padding_mask [n, S] for per-sample padding"
        )
    kw_names = [k for k, b in kw_batched.items() if b]
    leaf = call.leaf_grads
    from torch.utils import _pytree

    def contribution(train_params, go, *bargs):
        it = iter(bargs)
        args = tuple(next(it).unsqueeze(0) if b else a for a, b in zip(call.args, batched))
        kwargs = {**call.kwargs, **{k: next(it).unsqueeze(0) for k in kw_names}}
        out = torch.func.functional_call(module, {**fixed, **train_params}, args, kwargs)
        if leaf is None:
            return (out * go.unsqueeze(0)).sum()
        leaves = _pytree.tree_leaves(out)
        return sum((leaves[i] * g.unsqueeze(leaf[i][0])).sum() for i, g in zip(sorted(leaf), go))

    if leaf is None:
        go, go_dims = call.grad, 0
    else:
        go = [leaf[i][1] for i in sorted(leaf)]
        go_dims = [leaf[i][0] for i in sorted(leaf)]
    extra = [call.kwargs[k] for k in kw_names]
    in_dims = (None, go_dims, *([0] * (sum(batched) + len(extra))))
    # Recompute under the autocast the training forward ran in (bf16 matmuls see bf16 operands).
    autocast = torch.autocast(*call.autocast) if call.autocast is not None else contextlib.nullcontext()
    try:
        with autocast:
            return torch.func.vmap(torch.func.grad(contribution), in_dims=in_dims, randomness="error")(
                train, go, *[a for a, b in zip(call.args, batched) if b], *extra
            )
    except RuntimeError as err:
        if "randomness" in str(err):
            raise GhostEngineError(
                f"the fallback for module {tracked.name!r} recomputes its forward, which uses random operations "
                "(e.g. dropout in train mode) and cannot be reproduced per sample; register a rule for "
                f"{type(module).__name__} or put its random layers in eval mode"
            ) from err
        if not isinstance(module, nn.RNNBase):
            raise
    # vmap has no batching rule for the fused RNN kernels: the same gradient, one sample at a time.
    grad_fn = torch.func.grad(contribution)
    inputs = [a for a, b in zip(call.args, batched) if b] + extra
    rows = []
    with autocast:
        for z in range(n):
            go_z = go[z] if leaf is None else [g.select(axis, z) for g, axis in zip(go, go_dims)]
            rows.append(grad_fn(train, go_z, *[a[z] for a in inputs]))
    return {a: torch.stack([r[a] for r in rows]) for a in train}

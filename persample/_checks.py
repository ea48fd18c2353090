"""Checks that a model and a loss satisfy the assumptions of per-sample attribution.

In-run values φ_z = −⟨J ⊙ ∇L_val, c_z⟩ need each sample's contribution ``c_z`` to be defined by
the sample alone. Two things break that, and both are refused here rather than valued wrongly:

* the forward pass mixes samples (normalisation with batch statistics):
  :func:`check_samples_independent`;
* the loss couples samples (in-batch negatives, normalising outputs over the batch):
  :func:`check_loss_additive`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree


class SampleInteractionError(ValueError):
    """Samples of a batch interact (e.g. BatchNorm in train mode), so no value is computed.

    Then c_z (sample z's share of g_B) is not defined by z alone.

    Example:
        >>> check_samples_independent(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        Traceback (most recent call last):
        ...
        persample._checks.SampleInteractionError: module '1' (BatchNorm1d) normalises with batch statistics: ...
    """


class LossCouplingError(SampleInteractionError):
    """``loss_fn`` couples the samples of a batch: it is not a sum of per-sample terms.

    Raised by :func:`check_loss_additive` when the Hessian of the loss with respect to the model
    outputs has a cross-sample block (InfoNCE with in-batch negatives, a loss on
    ``outputs - outputs.mean(0)``, a softmax over the batch). A subclass of
    :class:`SampleInteractionError`, so ``except SampleInteractionError`` catches both kinds.

    Example:
        >>> out = torch.randn(3, 2, dtype=torch.float64)
        >>> check_loss_additive(lambda o, t: (o - o.mean(0)).pow(2).sum(), out, None)
        Traceback (most recent call last):
        ...
        persample._checks.LossCouplingError: loss_fn couples the samples of the validation batch: ...
    """


def _uses_batch_statistics(module: nn.Module) -> bool:
    # torch's own rule (nn.modules.batchnorm._BatchNorm.forward): batch statistics in train mode,
    # and in eval mode too when there are no running statistics to use.
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    return module.training or (module.running_mean is None and module.running_var is None)


def check_samples_independent(model: nn.Module) -> None:
    """Raise :class:`SampleInteractionError` if ``model`` normalises with batch statistics.

    Then one sample's output depends on every other sample of the batch and the per-sample
    contribution ``c_z`` is undefined. The normalisation layers torch ships:

    * mix samples: ``BatchNorm1d/2d/3d``, ``LazyBatchNorm1d/2d/3d`` and ``SyncBatchNorm`` in train
      mode, and in eval mode too when built with ``track_running_stats=False`` (torch then uses
      batch statistics in every mode: ``module.training or running_mean is None``);
    * act on each sample alone (accepted): the same layers in eval mode with running statistics;
      ``InstanceNorm1d/2d/3d`` and ``LazyInstanceNorm*`` in every mode, with or without running
      statistics (they normalise each sample over its own spatial axes; running statistics are
      only written in train mode, never read); ``GroupNorm``, ``LayerNorm``, ``RMSNorm``,
      ``LocalResponseNorm`` and ``CrossMapLRN2d``.

    Args:
        model: any ``nn.Module``; only its modules' types, ``training`` flags and running-statistics
            buffers are read.
    Returns:
        ``None`` (the model is fine).
    Raises:
        SampleInteractionError: naming the first offending module, why it mixes samples, and the
            fixes (``track_running_stats=True`` and ``module.eval()``, or GroupNorm/LayerNorm).

    Example:
        >>> check_samples_independent(nn.Sequential(nn.Linear(2, 2)))
        >>> check_samples_independent(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval())  # running stats: fine
        >>> check_samples_independent(nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)).eval())
        Traceback (most recent call last):
        ...
        persample._checks.SampleInteractionError: module '0' (BatchNorm1d) normalises with batch statistics: ...
    """
    for name, module in model.named_modules():
        if not _uses_batch_statistics(module):
            continue
        why = (
            "is in train mode, so it"
            if module.training
            else "has no running statistics (track_running_stats=False), so even in eval mode it"
        )
        raise SampleInteractionError(
            f"module {name or type(module).__name__!r} ({type(module).__name__}) normalises with batch statistics: "
            f"it {why} normalises each sample with the mean and variance of the whole batch. Samples of a "
            "batch then interact and per-sample contributions are undefined. Fix: build it with "
            "track_running_stats=True and put it in eval mode (`module.eval()`, using the running "
            "statistics), or replace it with GroupNorm or LayerNorm, which act on each sample alone."
        )


def _batch_size(outputs: Any, targets: Any) -> int | None:
    """The batch size n: the leading dim of the targets (batch first), else of the first float output."""
    for leaf in pytree.tree_leaves(targets):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    for leaf in pytree.tree_leaves(outputs):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def check_loss_additive(loss_fn: Callable[[Any, Any], torch.Tensor], outputs: Any, targets: Any, *, what: str = "the validation batch") -> None:
    """Raise :class:`LossCouplingError` if ``loss_fn`` couples the samples of a batch.

    A loss is additive over samples, L(o) = Σ_z ℓ_z(o_z) with the normaliser held fixed, exactly
    when its Hessian with respect to the outputs has no cross-sample block: ∂²L/∂o_w∂o_z = 0 for
    w ≠ z. This is probed with Hessian-vector products H v, v a random direction supported on
    one sample z's outputs (two probes, z = 0 and one other sample): the rows w ≠ z of H v must
    vanish up to a dtype-aware tolerance (1000 ε, relative to row z). A loss without a double
    backward (``@once_differentiable``, fused kernels, a custom backward) is probed with a
    central difference of its gradient instead (tolerance √ε).

    Supported (no cross-sample output terms): mean or sum reductions, class weights, label
    smoothing, token-level cross-entropy over ``[n, T, V]`` logits with ``ignore_index`` and a
    token mean. Their normaliser (n, Σ class weights, the batch's count of counted tokens) is a
    constant of the batch, and the toolkit values the game with it held fixed: with a token
    mean, sample z's value is its share of the batch loss with the batch's token count held
    fixed (its tokens' loss divided by the batch's token count), so removing z does not
    re-normalise the others. A loss whose output Hessian is zero (linear) passes. Refused: a
    contrastive loss with in-batch negatives (InfoNCE), a loss on ``outputs - outputs.mean(0)``,
    a softmax over samples.

    The probe directions come from a private ``torch.Generator``: the global RNG is not touched,
    so training is bit-identical with and without this check. Half-precision outputs (and
    floating targets) are probed in float32 so that the tolerance can see weak couplings.

    Args:
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``.
        outputs: what ``model(inputs)`` returned: a tensor ``[n, ...]`` or a pytree (tuple, dict, HF
            ``ModelOutput``) of them; only floating leaves whose leading dim is n are probed (n is
            the leading dim of the targets, else of the first floating output). Detached here.
        targets: passed to ``loss_fn`` unchanged (floating leaves upcast with half outputs).
        what: names the batch in the message, e.g. ``"the training batch"``.
    Returns:
        ``None``: the loss is additive over samples (n = 1 passes trivially).
    Raises:
        LossCouplingError: naming ``what``, the coupled samples (z, w), the size of the cross
            term against the sample's own, the likely causes and the fix (a per-sample loss).
        ValueError: ``loss_fn`` does not return a scalar tensor.

    Example:
        >>> logits, labels = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 0])
        >>> check_loss_additive(torch.nn.CrossEntropyLoss(weight=torch.rand(3, dtype=torch.float64), label_smoothing=0.1), logits, labels)
        >>> def info_nce(z, _):   # in-batch negatives: every sample is the others' negative
        ...     return torch.nn.functional.cross_entropy(z @ z.T, torch.arange(len(z)))
        >>> check_loss_additive(info_nce, logits, labels, what="the training batch")
        Traceback (most recent call last):
        ...
        persample._checks.LossCouplingError: loss_fn couples the samples of the training batch: ...
    """
    n = _batch_size(outputs, targets)
    if n is None or n < 2:
        return  # one sample (or no batch axis): nothing to couple
    leaves, spec = pytree.tree_flatten(outputs)
    probed = [
        i for i, t in enumerate(leaves)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0 and t.shape[0] == n
    ]
    if not probed:
        return
    # Half precision cannot resolve a weak coupling (ε_bf16 ≈ 8e-3); the structure of the loss
    # does not depend on the precision it is evaluated in.
    upcast = any(leaves[i].dtype in (torch.float16, torch.bfloat16) for i in probed)

    def prepare(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach()
        return t.float() if upcast and t.dtype in (torch.float16, torch.bfloat16) else t

    base = [prepare(t) for t in leaves]
    probe_targets = pytree.tree_map(prepare, targets) if upcast else targets

    def loss_at(shift: dict[int, torch.Tensor], create_graph: bool) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """The probed leaves at ``base + shift`` and the loss gradient with respect to them."""
        values = list(base)
        for i in probed:
            values[i] = (base[i] + shift[i] if i in shift else base[i]).detach().requires_grad_()
        loss = loss_fn(pytree.tree_unflatten(values, spec), probe_targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar tensor (the reduced loss of {what}), got {shape}. "
                "Fix: use a mean or sum reduction, e.g. `nn.CrossEntropyLoss(reduction='mean')`."
            )
        if not loss.requires_grad:
            return values, {}  # the loss does not depend on the outputs at all
        grads = torch.autograd.grad(loss, [values[i] for i in probed], allow_unused=True, create_graph=create_graph)
        return values, {i: g for i, g in zip(probed, grads) if g is not None}

    gen = torch.Generator().manual_seed(0x5A3)
    samples = [0, 1 + int(torch.randint(n - 1, (1,), generator=gen))]
    with torch.enable_grad():
        values, grads = loss_at({}, create_graph=True)
        if not grads:
            return
        for z in samples:
            probes = {}
            for i, g in grads.items():
                v = torch.zeros(g.shape, dtype=g.dtype)
                v[z] = torch.randn(g.shape[1:], generator=gen, dtype=g.dtype)
                probes[i] = v.to(g.device)
            hv, exact = None, all(g.requires_grad for g in grads.values())
            if exact:
                try:
                    directional = sum((g * probes[i]).sum() for i, g in grads.items())
                    hv = torch.autograd.grad(directional, [values[i] for i in grads], retain_graph=True, allow_unused=True)
                except RuntimeError:  # no double backward (@once_differentiable, fused kernels)
                    exact = False
            if not exact:
                # A gradient without a graph may still depend on the outputs (a custom backward):
                # never assume linear; take a central difference of the gradient instead.
                hv = _finite_difference_hvp(loss_at, base, probes, z)
            _refuse_cross_terms(hv, z, n, what, exact)


def _finite_difference_hvp(loss_at, base, probes, z):
    """(∇L(o + δv) − ∇L(o − δv)) / 2δ: the Hessian-vector product from first derivatives only.

    Rows w ≠ z of an additive loss's gradient do not depend on o_z, so they cancel exactly.
    """
    dtype = next(iter(probes.values())).dtype
    scale = 1.0 + max(float(base[i][z].abs().max()) for i in probes)
    delta = torch.finfo(dtype).eps ** (1 / 3) * scale  # balances truncation against rounding
    _, plus = loss_at({i: delta * v for i, v in probes.items()}, create_graph=False)
    _, minus = loss_at({i: -delta * v for i, v in probes.items()}, create_graph=False)
    return tuple((plus[i] - minus[i]) / (2 * delta) if i in plus and i in minus else None for i in probes)


def _refuse_cross_terms(hv: tuple[torch.Tensor | None, ...], z: int, n: int, what: str, exact: bool = True) -> None:
    """Raise unless the rows w ≠ z of the Hessian-vector product vanish against row z.

    Tolerance 1000 ε of an autograd product, √ε of a finite difference (rounding over 2δ).
    """
    rows = [h.detach().reshape(n, -1).abs().amax(1) for h in hv if h is not None]
    if not rows:
        return
    per_sample = torch.stack(rows).amax(0)  # [n]: largest |H v| entry of each sample
    own = float(per_sample[z])
    others = per_sample.clone()
    others[z] = 0
    w = int(others.argmax())
    cross = float(others[w])
    eps = torch.finfo(per_sample.dtype).eps
    tol = 1000 * eps if exact else eps ** 0.5
    if cross > tol * own:
        raise LossCouplingError(
            f"loss_fn couples the samples of {what}: its Hessian with respect to the model outputs has a "
            f"cross-sample block, so moving sample {z}'s outputs changes the loss gradient of sample {w} "
            f"(largest cross term |∂²L/∂o_{w}∂o_{z} · v| = {cross:.3g} against {own:.3g} for sample {z} itself; "
            f"tolerance {tol:.1g} relative). The loss is then not a sum of per-sample terms (in-batch negatives "
            "as in InfoNCE / contrastive losses, a normalisation of the outputs over the batch, a softmax "
            "across samples, ...), so each sample's contribution c_z and every in-run value are undefined. "
            "Fix: use a per-sample loss, a sum or mean of terms each depending on one sample's outputs "
            "(class weights, label smoothing and token means with ignore_index are fine), e.g. negatives "
            "from a fixed memory bank instead of the batch."
        )

"""Per-sample contributions to the batch gradient, computed with ``torch.func``.

This module is the oracle's own, deliberately plain, route to ``c_z``: it shares no code with
the hook-based (ghost) estimators, so that it can certify them. Only the mapping of a
per-sample ``torch.func.grad`` over the batch (``vmap``, or a plain loop for models vmap
cannot trace) is shared with the materialized estimator, ``estimators.per_sample_map``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value
from torch.utils._pytree import tree_flatten, tree_map

from estimators import PerSampleGrads, PerSampleMethod, check_samples_independent, parse_enum, per_sample_map

LossFn = Callable[[Any, Any], Tensor]


def _unpack_batch(batch: Any, what: str) -> tuple[Any, Any]:
    """Split ``(inputs, targets)``, refusing anything else with a message that shows it."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"{what} must be a pair (inputs, targets), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + ". Fix: pass `(inputs, targets)` exactly as given to `loss_fn(model(inputs), targets)`."
        )
    return batch[0], batch[1]


def _batch_size(inputs: Any, targets: Any, what: str) -> int:
    """Common leading dimension of every tensor in ``inputs`` and ``targets``."""
    leaves = [t for t in tree_flatten((inputs, targets))[0] if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError(f"{what} holds no tensors; expected (inputs, targets) with a batch dimension first.")
    sizes = {tuple(t.shape[:1]) for t in leaves}
    if any(t.dim() == 0 for t in leaves) or len(sizes) != 1:
        raise ValueError(
            f"{what}: every tensor must have the same batch dimension first; got shapes "
            f"{[tuple(t.shape) for t in leaves]}. Fix: stack samples along dimension 0."
        )
    n = leaves[0].shape[0]
    if n == 0:
        raise ValueError(f"{what} is empty (batch size 0); there are no samples to value. Pass at least one sample.")
    return n


def _trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """Detached views of the trainable parameters: the oracle never touches the live ones."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"model {type(model).__name__} has no parameter with requires_grad=True, so no sample can "
            "change it. Fix: unfreeze the parameters being trained."
        )
    return params


def _frozen_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Buffers and frozen parameters, cloned so that a forward pass that writes to them cannot
    reach the caller's model."""
    frozen = {name: b.detach().clone() for name, b in model.named_buffers()}
    frozen.update({name: p.detach() for name, p in model.named_parameters() if not p.requires_grad})
    return frozen


def _scalar_loss(loss: Any, what: str) -> Tensor:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor (the reduced {what} loss), got {shape}. "
            "Fix: use a mean or sum reduction, e.g. `nn.CrossEntropyLoss(reduction='mean')`."
        )
    return loss


def _vmap_error(err: RuntimeError) -> Exception:
    """Turn torch.func's randomness error into advice; leave every other error alone."""
    if "randomness" in str(err):
        return ValueError(
            "the model's forward pass is random (e.g. Dropout in train mode), so per-sample "
            "gradients and the per-step game are not reproducible. Fix: call `model.eval()` for "
            "the random layers (or set their p=0) before running the validation oracle."
        )
    return err


def _per_sample_losses_and_grads(
    model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, params: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor], chunk_size: int | None, method: PerSampleMethod = PerSampleMethod.AUTO,
) -> tuple[Tensor, dict[str, Tensor], PerSampleMethod, str | None]:
    """``ℓ_z`` and ``∇ℓ_z`` where ``ℓ_z = loss_fn`` applied to the batch of one ``{z}``, the
    method that ran and, after an automatic fallback to the loop, vmap's error."""

    def one_sample(p: dict[str, Tensor], x: Any, y: Any) -> Tensor:
        x1 = tree_map(lambda t: t.unsqueeze(0), x)
        y1 = tree_map(lambda t: t.unsqueeze(0), y)
        out = functional_call(model, (p, dict(frozen)), (x1,))
        return _scalar_loss(loss_fn(out, y1), "training")

    try:
        (grads, losses), ran, reason = per_sample_map(
            grad_and_value(one_sample), dict(params), (inputs, targets), method=method, chunk_size=chunk_size,
            stacklevel=4,  # the caller of per_sample_grads
        )
    except RuntimeError as err:
        converted = _vmap_error(err)
        if converted is err and method is PerSampleMethod.VMAP:
            converted = RuntimeError(
                f"torch.func.vmap failed on the per-sample gradients: {err}. If the model has data-dependent "
                "control flow (e.g. transformers' attention-mask code), use method='loop' (exact, one "
                "forward and backward per sample) or method='auto'."
            )
        if converted is err:
            raise
        raise converted from err
    return losses, grads, ran, reason


def _reduction_factor(
    n: int, batch_loss: Tensor, batch_grad: Mapping[str, Tensor], losses: Tensor, grads: Mapping[str, Tensor]
) -> float:
    """The factor f with ``L_B = f Σ_z ℓ_z`` and ``g_B = f Σ_z ∇ℓ_z``: 1/n for a mean, 1 for a sum.

    Both the losses and the gradients must agree, so a loss that is neither (a mean over
    tokens of unequal length, a weighted loss, a regulariser added to the batch loss) is refused
    instead of silently rescaled.
    """
    if n == 1:
        return 1.0
    eps = torch.finfo(batch_loss.dtype).eps
    tol = eps ** 0.5  # generous enough for float32 summation order, tight enough to tell 1 from 1/n

    def fits(f: float) -> bool:
        pred_loss = f * losses.sum()
        if (pred_loss - batch_loss).abs() > tol * (batch_loss.abs() + losses.abs().sum() * f + eps):
            return False
        # One scale over all parameters: a parameter whose gradient is zero up to rounding (an
        # attention key bias, which softmax ignores) must not be judged against its own noise.
        scale = max(float(g.abs().max() + f * grads[name].abs().sum(0).max()) for name, g in batch_grad.items()) + eps
        return all(float((f * grads[name].sum(0) - g).abs().max()) <= tol * scale for name, g in batch_grad.items())

    # Mean first: when both fit (all losses and gradients summing to zero) mean is the common case.
    for factor in (1.0 / n, 1.0):
        if fits(factor):
            return factor
    raise ValueError(
        f"loss_fn is neither a mean nor a sum over the {n} samples of the batch: full-batch loss "
        f"{batch_loss.item():.6g}, mean of per-sample losses {losses.mean().item():.6g}, sum "
        f"{losses.sum().item():.6g}. The oracle needs the batch loss to be the mean or the sum of "
        "`loss_fn` applied to each sample alone, so that each sample's share of the gradient is defined. "
        "Fix: use reduction='mean' or 'sum' with equally sized samples (no per-token masks or "
        "weights across the batch, no extra regularisation terms inside loss_fn)."
    )


def _contributions(
    model: nn.Module, loss_fn: LossFn, batch: Sequence[Any], chunk_size: int | None = None,
    method: PerSampleMethod | str = PerSampleMethod.AUTO,
) -> tuple[PerSampleGrads, Tensor]:
    """``c_z`` per parameter (batch dimension first) and the full-batch loss."""
    method = parse_enum(PerSampleMethod, method, "method")
    check_samples_independent(model)
    inputs, targets = _unpack_batch(batch, "batch")
    n = _batch_size(inputs, targets, "batch")
    params = _trainable_params(model)
    frozen = _frozen_tensors(model)

    def batch_loss_fn(p: dict[str, Tensor]) -> Tensor:
        out = functional_call(model, (p, dict(frozen)), (inputs,))
        return _scalar_loss(loss_fn(out, targets), "training")

    batch_grad, batch_loss = grad_and_value(batch_loss_fn)(dict(params))
    losses, grads, ran, reason = _per_sample_losses_and_grads(
        model, loss_fn, inputs, targets, params, frozen, chunk_size, method
    )
    factor = _reduction_factor(n, batch_loss, batch_grad, losses, grads)
    if factor != 1.0:
        grads = {name: g * factor for name, g in grads.items()}
    return PerSampleGrads(grads, ran, reason), batch_loss


def per_sample_grads(
    model: nn.Module, loss_fn: LossFn, batch: Sequence[Any], *, chunk_size: int | None = None,
    method: PerSampleMethod | str = "auto",
) -> PerSampleGrads:
    """Each sample's share ``c_z`` of the batch gradient, by ``torch.func`` (vmap of grad).

    ``c_z = f · ∇_θ loss_fn(model(x_z[None]), y_z[None])`` with ``f = 1/n`` when ``loss_fn``
    is a mean over the batch and ``f = 1`` when it is a sum, so that ``Σ_z c_z = g_B``, the
    gradient ``loss_fn(model(inputs), targets).backward()`` would store in ``param.grad``.
    The reduction is detected by comparing the full-batch loss and gradient with the
    per-sample ones; anything else is refused.

    ``torch.func.vmap`` cannot trace every model (transformers' BERT branches on the attention
    mask's values). ``method="auto"`` then runs the same ``grad`` once per sample (exact, one
    forward and backward each) and warns with :class:`estimators.PerSampleFallbackWarning`;
    the returned dict's ``method`` attribute says which path ran.

    Args:
        model: the network; parameters with ``requires_grad`` are differentiated, buffers
            and frozen parameters are held fixed. Never modified.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar, a mean or sum over samples.
        batch: ``(inputs, targets)``, batch dimension first (``n`` samples); either may be a
            tensor or a nested tuple/dict of tensors.
        chunk_size: samples per vmap chunk, to bound memory (``None``: all at once).
        method: ``"auto"`` (vmap, else the per-sample loop with a warning), ``"vmap"`` (no
            fallback) or ``"loop"`` (see :class:`estimators.PerSampleMethod`).

    Returns:
        :class:`estimators.PerSampleGrads`, a dict ``{name: Tensor [n, *param.shape]}`` for
        every trainable parameter, in ``model.named_parameters()`` order and the model's dtype,
        with ``.method`` (``PerSampleMethod.VMAP`` or ``LOOP``) and ``.fallback_reason``.

    Raises:
        SampleInteractionError: a BatchNorm layer is in train mode (samples interact).
        ValueError: empty batch, inconsistent batch dimensions, a non-scalar loss, a loss that
            is neither a mean nor a sum, a random forward pass, no trainable parameter, or an
            unknown ``method``.
        TypeError: ``batch`` is not a pair.
        RuntimeError: ``method="vmap"`` on a model vmap cannot trace (the message suggests
            ``method="loop"``), or the model's own error on a single sample.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> x, y = torch.randn(4, 3), torch.randn(4, 1)
        >>> c = per_sample_grads(model, nn.functional.mse_loss, (x, y))
        >>> c["weight"].shape, c.method.value
        (torch.Size([4, 1, 3]), 'vmap')
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    return _contributions(model, loss_fn, batch, chunk_size, method)[0]

"""Per-sample contributions to the batch gradient, computed with ``torch.func``.

This module is the oracle's deliberately plain route to ``c_z``: it shares no code with the
hook-based (ghost) estimators, so that it can certify them. The per-sample rule itself (one
vector-Jacobian product per sample with the batch loss's output gradient, see
``persample.sample_contributions``) and its mapping over the batch (``vmap``, or a
plain loop for models vmap cannot trace) are shared with the materialized estimator,
``estimators.per_sample_grads``: one implementation, one rule, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch  # noqa: F401 - the doctests use it
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from persample import PerSampleGrads, PerSampleMethod, check_samples_independent, parse_enum, sample_contributions

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


def _contributions(
    model: nn.Module, loss_fn: LossFn, batch: Sequence[Any], chunk_size: int | None = None,
    method: PerSampleMethod | str = PerSampleMethod.AUTO,
) -> tuple[PerSampleGrads, Tensor]:
    """``c_z`` per parameter name (batch dimension first) and the full-batch loss ``L_B``."""
    method = parse_enum(PerSampleMethod, method, "method")
    check_samples_independent(model)
    inputs, targets = _unpack_batch(batch, "batch")
    _batch_size(inputs, targets, "batch")
    params = _trainable_params(model)
    # stacklevel 3: the caller of per_sample_grads (through _contributions).
    return sample_contributions(
        model, loss_fn, inputs, targets, params, method=method, chunk_size=chunk_size, what="the batch", stacklevel=3
    )


def per_sample_grads(
    model: nn.Module, loss_fn: LossFn, batch: Sequence[Any], *, chunk_size: int | None = None,
    method: PerSampleMethod | str = "auto",
) -> PerSampleGrads:
    """Each sample's share ``c_z`` of the batch gradient, by ``torch.func`` (vmap of a VJP).

        c_z = ∂/∂θ ⟨model(x_z), G_z⟩,   G = stopgrad(∂L_B/∂outputs),  L_B = loss_fn(model(inputs), targets):

    sample z's share of the batch gradient through its own outputs with every normaliser of
    the loss held fixed, so that ``Σ_z c_z = g_B``, the gradient
    ``loss_fn(model(inputs), targets).backward()`` stores in ``param.grad``. For a mean this is
    ``∇ℓ_z / n`` (ℓ_z = ``loss_fn`` on the batch of one ``{z}``), for a sum ``∇ℓ_z``. Class
    weights, label smoothing and token means with ``ignore_index`` are additive over samples
    and supported; their normaliser is a constant of the batch and is held fixed (the game the
    toolkit values): with a token mean, sample z's contribution is the gradient of its counted
    tokens' loss divided by the batch's token count, not by its own. A loss that couples samples
    (in-batch negatives, normalising outputs over the batch) is refused. The rule is shared with
    the materialized estimator ``estimators.per_sample_grads`` (one implementation).

    ``torch.func.vmap`` cannot trace every model (transformers' BERT branches on the attention
    mask's values). ``method="auto"`` then runs the same computation once per sample (exact,
    one forward and backward each) and warns with :class:`estimators.PerSampleFallbackWarning`;
    the returned dict's ``method`` attribute says which path ran.

    Args:
        model: the network; parameters with ``requires_grad`` are differentiated, buffers
            and frozen parameters are held fixed. Never modified.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar, additive over samples (a mean, a sum,
            weighted, label-smoothed, a token mean with ``ignore_index``, ...).
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
        SampleInteractionError: a normalisation layer uses batch statistics (BatchNorm in train
            mode, or without running statistics); ``loss_fn`` uses an output with no batch
            dimension; or Σ_z c_z ≠ g_B (the forward pass mixes samples, or ``loss_fn`` depends on
            the parameters other than through the outputs, e.g. a weight penalty).
        LossCouplingError: ``loss_fn`` couples samples (see ``estimators.check_loss_additive``).
        ValueError: empty batch, inconsistent batch dimensions, a non-scalar loss, a random
            forward pass, no trainable parameter, or an unknown ``method``.
        TypeError: ``batch`` is not a pair.
        RuntimeError: ``method="vmap"`` on a model vmap cannot trace (the message suggests
            ``method="loop"``), or the model's own error on a single sample.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> x, y = torch.randn(4, 3), torch.randn(4, 1)
        >>> c = per_sample_grads(model, nn.functional.mse_loss, (x, y))
        >>> c["weight"].shape, c.method.value
        (torch.Size([4, 1, 3]), 'vmap')
        >>> tokens = nn.Linear(3, 5)                                     # [n, T, 3] -> [n, T, 5] logits
        >>> x, y = torch.randn(2, 4, 3), torch.tensor([[1, 2, -100, -100], [0, 1, 2, 3]])
        >>> token_mean = lambda out, t: nn.functional.cross_entropy(out.flatten(0, 1), t.flatten(), ignore_index=-100)
        >>> c = per_sample_grads(tokens, token_mean, (x, y))            # shares of the 6 counted tokens' mean
        >>> tokens.zero_grad(); token_mean(tokens(x), y).backward()
        >>> torch.allclose(c["weight"].sum(0), tokens.weight.grad, atol=1e-6)
        True
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    return _contributions(model, loss_fn, batch, chunk_size, method)[0]

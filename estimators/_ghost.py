"""One-call ghost estimate for a single step: capture, linearize-by-callback, value."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._engine import GhostEngine
from ._first_order import LossFn, batch_loss, validation_gradients

JSource = float | Mapping[torch.Tensor, "torch.Tensor | float"] | Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | float"]


def ghost_values(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    val_batches: Sequence[Any],
    J: JSource,
    *,
    val_loss_fn: LossFn | None = None,
    shift: Mapping[torch.Tensor, torch.Tensor] | None = None,
    engine: GhostEngine | None = None,
    **engine_options: Any,
) -> torch.Tensor:
    """φ[z, k] = −⟨J ⊙ ∇L_val^k, c_z⟩ for one training batch, by the ghost engine, in one call.

    Runs the training forward/backward with ``torch.autograd.grad`` (``param.grad`` is left
    untouched), then each validation target at the parameters shifted by ``shift``, captured
    for the pairwise/factored paths, and contracts.

    Args:
        model: the model.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar`` training loss.
        batch: the training batch ``(inputs, targets)``, batch-first.
        val_batches: K ``(inputs, targets)`` validation batches.
        J: a float, a mapping parameter -> J, or a callable ``J(param, batch_grad)`` (e.g.
            ``lambda p, g: preconditioning(lin, p, g, "tangent")``).
        val_loss_fn: loss for the validation batches (default ``loss_fn``).
        shift: parameter shift for the validation point (:func:`val_point_shift`), or ``None``.
        engine: an existing :class:`GhostEngine` to use (its ``paths_taken`` stay inspectable);
            otherwise one is built with ``engine_options`` (``path``, ``strict``, ``dtype``, ...).
    Returns:
        Tensor ``[n, K]``.
    Raises:
        ValueError: both ``engine`` and ``engine_options`` given; as :meth:`GhostEngine.values`.
        UncoveredParameterError, SampleInteractionError: as :class:`GhostEngine`.
    Example (SGD, J = −η: agrees with φ_z = η ⟨∇L_val, c_z⟩ from materialized gradients):
        >>> from estimators import per_sample_grads, first_order_values
        >>> gen = torch.Generator().manual_seed(0)
        >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
        >>> model = nn.Linear(3, 2).double()
        >>> x, y, xv, yv = randn(4, 3), randn(4, 2), randn(5, 3), randn(5, 2)
        >>> loss_fn = nn.functional.mse_loss
        >>> phi = ghost_values(model, loss_fn, (x, y), [(xv, yv)], -0.1)
        >>> phi.shape, phi.dtype
        (torch.Size([4, 1]), torch.float64)
        >>> params = list(model.parameters())
        >>> val_grad = dict(zip(params, torch.autograd.grad(loss_fn(model(xv), yv), params)))
        >>> c = per_sample_grads(model, loss_fn, (x, y))
        >>> ref = first_order_values(c, [{p: -0.1 * g for p, g in val_grad.items()}])
        >>> torch.allclose(phi, ref)
        True
    """
    if engine is not None and engine_options:
        raise ValueError(f"pass either engine= or engine options ({', '.join(engine_options)}), not both")
    engine = GhostEngine(model, **engine_options) if engine is None else engine
    engine.clear()
    params = [p for p in model.parameters() if p.requires_grad]
    with engine.capture_train():
        grads = torch.autograd.grad(batch_loss(model, loss_fn, batch), params, allow_unused=True)
    batch_grads = {p: g for p, g in zip(params, grads) if g is not None}
    if callable(J) and not isinstance(J, Mapping):
        J = {p: J(p, g) for p, g in batch_grads.items()}
    val_grads = validation_gradients(model, val_loss_fn or loss_fn, val_batches, shift=shift, params=params, engine=engine)
    try:
        return engine.values(J, val_grads)
    finally:
        engine.clear()

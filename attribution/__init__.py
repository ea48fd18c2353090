"""What researchers import: per-step values and the in-run tracker.

* :func:`step_values` -- values of one batch's samples for the step the optimizer is about to take;
* :class:`InRunShapley` -- accumulates values by dataset id inside an unchanged training loop;
* :func:`check_model` -- every problem a model, optimizer, loss and validation batch would hit, up front.

Both compute φ_z = −⟨J ⊙ ∇L_val(θ*), c_z⟩ (see docs/theory.md). With the secant J and the
materialized estimator the values of a step sum to −⟨∇L_val, Δ(g_B) − Δ(0)⟩ exactly:

Example:
    >>> import torch, optimizers
    >>> from attribution import step_values
    >>> gen = torch.Generator().manual_seed(0)
    >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1).double()
    >>> opt = torch.optim.Adam(model.parameters(), lr=0.01)
    >>> loss_fn = torch.nn.functional.mse_loss
    >>> (x, y), (xv, yv) = (randn(6, 3), randn(6, 1)), (randn(4, 3), randn(4, 1))
    >>> phi = step_values(model, opt, loss_fn, (x, y), (xv, yv), val_point="current", estimator="materialized")
    >>> phi.shape, phi.dtype
    (torch.Size([6]), torch.float64)
    >>> params = list(model.parameters())
    >>> grads = torch.autograd.grad(loss_fn(model(x), y), params)
    >>> val_grads = torch.autograd.grad(loss_fn(model(xv), yv), params)
    >>> for p, g in zip(params, grads):
    ...     p.grad = g
    >>> lin = optimizers.linearize(opt)
    >>> target = -sum((vg * (lin.update(p, g) - lin.update(p, torch.zeros_like(g)))).sum()
    ...               for p, g, vg in zip(params, grads, val_grads))
    >>> torch.allclose(phi.sum(), target)
    True
"""

from ._config import AttributionConfig, EstimatorKind
from ._distributed import RankRefusedError
from ._ledger import LedgerFileError
from ._step import step_values
from ._check import ModelReport, check_model
from ._step import UnsteppedParameterWarning
from ._tracker import (
    AuditWarning,
    FallbackWarning,
    InRunShapley,
    NonFiniteStepWarning,
    PoorLinearizationWarning,
    SkippedStepWarning,
    TrackerUsageError,
)

__all__ = [
    "AttributionConfig",
    "AuditWarning",
    "EstimatorKind",
    "FallbackWarning",
    "InRunShapley",
    "LedgerFileError",
    "ModelReport",
    "NonFiniteStepWarning",
    "PoorLinearizationWarning",
    "RankRefusedError",
    "SkippedStepWarning",
    "UnsteppedParameterWarning",
    "TrackerUsageError",
    "check_model",
    "step_values",
]

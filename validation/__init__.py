"""Ground truth for per-step data values, independent of the library's closed forms.

Everything here runs the REAL torch optimizer (a copy of it and of its state) on real
per-sample gradients from ``torch.func``; nothing uses the linearizations in ``optimizers``.
The library never imports this package; tests and experiments use it to certify estimators.
It imports neither ``estimators`` nor ``optimizers`` (only the neutral ``persample`` package, which
holds the per-sample plumbing both use), so the oracle does not import what it certifies.

* :func:`per_sample_grads` — each sample's share ``c_z`` of the batch gradient (``torch.func``
  vmap, or an exact per-sample loop for models vmap cannot trace; see :class:`PerSampleMethod`).
* :func:`utility` — the per-step game ``U(S) = L_val(θ_t) − L_val(θ_t + Δ(g_S))``.
* :func:`leave_one_out` — ``U(B) − U(B∖z)``.
* :func:`replay_leave_one_out` — the trajectory truth: ``L_val`` K real steps after removing z
  from its step only, minus ``L_val`` of the recorded replay (``K = 1`` is :func:`leave_one_out`).
* :func:`shapley_values` — exact (n ≤ 16) or permutation-sampled Shapley values of ``U``.
* :func:`fidelity` — correlations, top-k, sign agreement and efficiency gap of an estimate.

See ``docs/validation.md``.

Example (the ground truth of a tiny step, and an estimate scored against it):
    >>> import torch, validation
    >>> gen = torch.Generator().manual_seed(0)
    >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1).double()
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(randn(1, 3)), model.bias.zero_()
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
    >>> batch, val = (randn(5, 3), randn(5, 1)), (randn(8, 3), randn(8, 1))
    >>> loss_fn = torch.nn.functional.mse_loss
    >>> loo = validation.leave_one_out(model, opt, loss_fn, batch, val)
    >>> est = validation.shapley_values(model, opt, loss_fn, batch, val)
    >>> round(validation.fidelity(loo, est.values)["spearman"], 6)    # a small SGD step is almost additive
    1.0
"""

from persample import PerSampleFallbackWarning, PerSampleGrads, PerSampleMethod

from ._fidelity import fidelity
from ._game import STACKABLE_OPTIMIZERS, StepPath, leave_one_out, utility
from ._per_sample import per_sample_grads
from ._replay import replay_leave_one_out
from ._shapley import MAX_EXACT_PLAYERS, ShapleyEstimate, shapley_values

__all__ = [
    "MAX_EXACT_PLAYERS",
    "PerSampleFallbackWarning",
    "PerSampleGrads",
    "PerSampleMethod",
    "STACKABLE_OPTIMIZERS",
    "ShapleyEstimate",
    "StepPath",
    "fidelity",
    "leave_one_out",
    "per_sample_grads",
    "replay_leave_one_out",
    "shapley_values",
    "utility",
]

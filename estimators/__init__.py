"""First-order in-run Shapley estimators and the ghost engine.

φ_z = −⟨J ⊙ ∇L_val, c_z⟩ = −⟨P, c_z⟩ for every sample z of a training step, where J is the
optimizer's preconditioning map (tangent, secant or the SGD proxy −η), ∇L_val the validation
gradient (at the current, lookahead or midpoint parameters) and c_z the sample's contribution to
the batch gradient. Two sources of c_z:

* materialized: :func:`per_sample_grads` + :func:`first_order_values` (the reference path);
* ghost: :class:`GhostEngine`, from the activations and output gradients of the ordinary
  backward pass, per layer by a registered :class:`LayerRule`.

Example (the materialized reference path under SGD, J = −η = −0.1):
    >>> import torch, estimators
    >>> model = torch.nn.Linear(2, 1, bias=False).double()
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> y = torch.zeros(2, 1, dtype=torch.float64)
    >>> loss_fn = lambda out, t: ((out - t) ** 2).sum(1).mean()
    >>> c = estimators.per_sample_grads(model, loss_fn, (x, y))          # c_z = ∇ℓ_z / 2
    >>> P = estimators.preconditioned_val_grad(-0.1, torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    >>> estimators.first_order_values(c, [{model.weight: P}]).reshape(-1).tolist()
    [0.1, -0.1]
"""

from persample import (
    LossCouplingError,
    PerSampleFallbackWarning,
    PerSampleGrads,
    SampleInteractionError,
    check_loss_additive,
    check_samples_independent,
    isolated_pass,
    per_sample_map,
)

from ._completeness import CompletenessCheck, IncompleteGradientError
from ._config import Factorization, GhostPath, LinearizationKind, PerSampleMethod, Reduction, ValPoint, parse_enum
from ._exact import ExactValues, exact_update_values, update_nonlinearity
from ._engine import GhostEngine, GhostEngineError, ParameterUseError, UncoveredParameterError
from ._errors import NoGradientPredictionError
from ._factorize import factored_error, rank_one
from ._factors import Bilinear, DenseFactor, Factor, OneHotFactor, PerSample, Term
from ._first_order import (
    first_order_values,
    per_sample_grads,
    preconditioned_val_grad,
    preconditioning,
    shifted_parameters,
    val_point_shift,
    validation_gradients,
)
from ._ghost import ghost_values
from ._rules import LayerRule, registered_rules, rule_for

__all__ = [
    "Bilinear",
    "CompletenessCheck",
    "DenseFactor",
    "ExactValues",
    "Factor",
    "Factorization",
    "GhostEngine",
    "GhostEngineError",
    "GhostPath",
    "IncompleteGradientError",
    "LayerRule",
    "LinearizationKind",
    "LossCouplingError",
    "OneHotFactor",
    "ParameterUseError",
    "PerSampleFallbackWarning",
    "PerSampleGrads",
    "PerSampleMethod",
    "PerSample",
    "Reduction",
    "SampleInteractionError",
    "Term",
    "UncoveredParameterError",
    "NoGradientPredictionError",
    "ValPoint",
    "check_loss_additive",
    "check_samples_independent",
    "exact_update_values",
    "factored_error",
    "first_order_values",
    "ghost_values",
    "isolated_pass",
    "parse_enum",
    "per_sample_grads",
    "per_sample_map",
    "preconditioned_val_grad",
    "preconditioning",
    "rank_one",
    "registered_rules",
    "rule_for",
    "update_nonlinearity",
    "shifted_parameters",
    "val_point_shift",
    "validation_gradients",
]

"""Optimizer linearizations: each torch optimizer's update under its real, fixed state.

``linearize(optimizer)`` reads the state just before ``step()`` and returns an
:class:`OptimizerLinearization` with per-parameter ``update`` (Δ(g)), ``tangent`` (∂Δ/∂g) and
``secant`` ((Δ(g) − Δ(0)) ⊘ g). Add an optimizer by subclassing with
``optimizer=YourTorchOptimizer`` (see docs/extending.md) and run :mod:`optimizers.conformance`.
"""

from ._base import (
    OptimizerLinearization,
    ParamState,
    StaleStateError,
    UnsupportedOptimizerError,
    linearization_class,
    linearize,
    registered,
)
from .adagrad import AdagradLinearization, AdagradState
from .adam import AdamLinearization, AdamState, AdamWLinearization
from .rmsprop import RMSpropLinearization, RMSpropState
from .sgd import SGDLinearization, SGDState

__all__ = [
    "AdagradLinearization",
    "AdagradState",
    "AdamLinearization",
    "AdamState",
    "AdamWLinearization",
    "OptimizerLinearization",
    "ParamState",
    "RMSpropLinearization",
    "RMSpropState",
    "SGDLinearization",
    "SGDState",
    "StaleStateError",
    "UnsupportedOptimizerError",
    "linearization_class",
    "linearize",
    "registered",
]

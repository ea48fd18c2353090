"""Optimizer linearizations: each torch optimizer's update under its real, fixed state.

``linearize(optimizer)`` reads the state just before ``step()`` and returns an
:class:`OptimizerLinearization` with per-parameter ``update`` (Δ(g)), ``tangent`` (∂Δ/∂g) and
``secant`` ((Δ(g) − Δ(0)) ⊘ g). Add an optimizer by subclassing with
``optimizer=YourTorchOptimizer`` (see docs/extending.md) and run :mod:`optimizers.conformance`.

Example (for SGD every slope is −η, the original In-Run Data Shapley preconditioning):
    >>> import torch, optimizers
    >>> w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    >>> w.grad = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    >>> lin = optimizers.linearize(torch.optim.SGD([w], lr=0.1))
    >>> torch.allclose(lin.tangent(w, w.grad), torch.full_like(w, -0.1))
    True
"""

from ._autograd import UpdateJumpError, gauss_legendre
from ._fused import FusedKernelWarning, fused_kernels
from ._base import (
    MomentumCarry,
    OptimizerLinearization,
    ParamState,
    StaleStateError,
    UnsupportedOptimizerError,
    linearization_class,
    linearize,
    registered,
)
from ._group import LinearizationGroup, as_optimizer_list
from ._preconditioner import (
    Diagonal,
    RowDiagonal,
    Operator,
    Preconditioner,
    Scalar,
    as_preconditioner,
)
from .adadelta import AdadeltaLinearization, AdadeltaState
from .adafactor import AdafactorLinearization, AdafactorState
from .adagrad import AdagradLinearization, AdagradState
from .adam import AdamLinearization, AdamState, AdamWLinearization
from .adamax import AdamaxLinearization, AdamaxState
from .asgd import ASGDLinearization, ASGDState
from .muon import MuonLinearization, MuonState
from .nadam import NAdamLinearization, NAdamState
from .radam import RAdamLinearization, RAdamState
from .rmsprop import RMSpropLinearization, RMSpropState
from .rprop import RpropLinearization, RpropState
from .sgd import SGDLinearization, SGDState

__all__ = [
    "ASGDLinearization",
    "ASGDState",
    "AdadeltaLinearization",
    "AdadeltaState",
    "AdafactorLinearization",
    "AdafactorState",
    "AdagradLinearization",
    "AdagradState",
    "AdamLinearization",
    "AdamState",
    "AdamWLinearization",
    "AdamaxLinearization",
    "AdamaxState",
    "Diagonal",
    "RowDiagonal",
    "LinearizationGroup",
    "MuonLinearization",
    "MuonState",
    "NAdamLinearization",
    "NAdamState",
    "Operator",
    "OptimizerLinearization",
    "ParamState",
    "Preconditioner",
    "RAdamLinearization",
    "RAdamState",
    "RMSpropLinearization",
    "RMSpropState",
    "RpropLinearization",
    "RpropState",
    "SGDLinearization",
    "SGDState",
    "Scalar",
    "StaleStateError",
    "UnsupportedOptimizerError",
    "UpdateJumpError",
    "MomentumCarry",
    "as_optimizer_list",
    "as_preconditioner",
    "gauss_legendre",
    "FusedKernelWarning",
    "fused_kernels",
    "linearization_class",
    "linearize",
    "registered",
]

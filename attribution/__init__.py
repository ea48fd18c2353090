"""What researchers import: per-step values and the in-run tracker.

* :func:`step_values` -- values of one batch's samples for the step the optimizer is about to take;
* :class:`InRunShapley` -- accumulates values by dataset id inside an unchanged training loop.
"""

from ._config import AttributionConfig, EstimatorKind
from ._ledger import LedgerFileError
from ._step import step_values
from ._tracker import InRunShapley, NonFiniteStepWarning, TrackerUsageError

__all__ = [
    "AttributionConfig",
    "EstimatorKind",
    "InRunShapley",
    "LedgerFileError",
    "NonFiniteStepWarning",
    "TrackerUsageError",
    "step_values",
]

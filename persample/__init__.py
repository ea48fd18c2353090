"""Per-sample plumbing shared by the library (``estimators``) and its oracle (``validation``).

Neither certifies the other through this package: it holds only what both need and neither
computes a value with -- each sample's share c_z of the batch gradient (``torch.func``), the
checks that samples do not interact (batch statistics, losses that couple samples), the isolated
pass that leaves a model bit-identical after extra forwards, and the option enums.

Example:
    >>> import torch, persample
    >>> model = torch.nn.Linear(2, 1)
    >>> persample.check_samples_independent(model)            # no batch statistics: fine
    >>> with persample.isolated_pass(model) as m:
    ...     m.training
    False
"""

from ._checks import LossCouplingError, SampleInteractionError, check_loss_additive, check_samples_independent
from ._config import PerSampleMethod, parse_enum
from ._contributions import PerSampleFallbackWarning, PerSampleGrads, per_sample_map, sample_contributions
from ._isolation import isolated_pass

__all__ = [
    "LossCouplingError",
    "PerSampleFallbackWarning",
    "PerSampleGrads",
    "PerSampleMethod",
    "SampleInteractionError",
    "check_loss_additive",
    "check_samples_independent",
    "isolated_pass",
    "parse_enum",
    "per_sample_map",
    "sample_contributions",
]

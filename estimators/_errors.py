"""The ghost engine's errors (raised by capture, path choice and contraction alike)."""

from __future__ import annotations


class UncoveredParameterError(ValueError):
    """A trainable parameter belongs to a layer no rule covers, and the fallback is not allowed."""


class ParameterUseError(RuntimeError):
    """A parameter was used in the forward outside the module(s) that own it, so hooks miss that use."""


class GhostEngineError(RuntimeError):
    """The captured passes cannot produce values (nothing captured, inconsistent batch sizes, ...)."""


class NoGradientPredictionError(ValueError):
    """``val_point="predicted"`` with an optimizer that keeps no prediction of the coming gradient (no first moment)."""

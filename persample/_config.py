"""Enums shared by the library and its oracle: how per-sample gradients are computed, and parsing of option strings."""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


class PerSampleMethod(str, enum.Enum):
    """How per-sample gradients are computed by ``per_sample_grads`` (estimators and validation).

    * ``AUTO`` -- ``VMAP``; if ``torch.func.vmap`` cannot trace the model (data-dependent control
      flow, ``.item()``, an op without a batching rule) and one sample runs fine on its own,
      ``LOOP`` instead, with a :class:`PerSampleFallbackWarning` saying why;
    * ``VMAP`` -- ``torch.func.vmap`` over the samples (fast; refuses untraceable models);
    * ``LOOP`` -- one ``torch.func.grad`` (forward + backward) per sample: exact, slower.

    Example:
        >>> PerSampleMethod.AUTO.value
        'auto'
    """

    AUTO = "auto"
    VMAP = "vmap"
    LOOP = "loop"


def parse_enum(enum_cls: type[E], value: object, argument: str) -> E:
    """``value`` as a member of ``enum_cls``, accepting the member or its string value.

    Args:
        enum_cls: the enum (its members' values are the accepted strings).
        value: a member of ``enum_cls`` or one of its string values.
        argument: the user-facing argument name, for the error message.
    Returns:
        The member of ``enum_cls``.
    Raises:
        ValueError: naming ``argument``, the offending value and the accepted values.

    Example:
        >>> parse_enum(PerSampleMethod, "loop", "method")
        <PerSampleMethod.LOOP: 'loop'>
        >>> parse_enum(PerSampleMethod, "fast", "method")
        Traceback (most recent call last):
        ...
        ValueError: method='fast' is not accepted; use one of 'auto', 'vmap', 'loop'
    """
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{argument}={value!r} is not accepted; use one of {accepted}") from None

"""The :class:`LayerRule` extension point and its exact-type registry."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

from .._factors import Term

_REGISTRY: dict[type[nn.Module], type["LayerRule"]] = {}


class LayerRule(abc.ABC):
    """Per-sample contributions of one layer type from its input and output gradient.

    Subclass once per layer type; the class keyword ``layer=`` registers the rule for exactly
    that type (registering a type twice is an error unless ``replace=True``)::

        class MyRule(LayerRule, layer=MyLayer):
            @classmethod
            def terms(cls, module, x, grad_output):
                return {"weight": Bilinear(DenseFactor(...), DenseFactor(...))}

    A rule is pure: it reads the module's configuration (stride, eps, ...) and the captured
    tensors, never optimizer state, and it must not modify anything.
    """

    layer_type: ClassVar[type[nn.Module]]

    def __init_subclass__(cls, layer: type[nn.Module] | None = None, replace: bool = False, **kw):
        super().__init_subclass__(**kw)
        if layer is None:
            return
        if not (isinstance(layer, type) and issubclass(layer, nn.Module)):
            raise TypeError(f"{cls.__name__}: the class keyword layer= must be an nn.Module subclass, got {layer!r}")
        if layer in _REGISTRY and not replace:
            raise ValueError(
                f"{layer.__module__}.{layer.__qualname__} already has the rule {_REGISTRY[layer].__qualname__}; "
                f"pass replace=True in the class statement (class {cls.__name__}(LayerRule, layer=..., replace=True)) "
                "to override it"
            )
        cls.layer_type = layer
        _REGISTRY[layer] = cls

    @classmethod
    def params(cls, module: nn.Module) -> tuple[str, ...]:
        """Names of the module's own parameters this rule covers (default ``weight`` and ``bias``)."""
        return ("weight", "bias")

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        """Why this module instance cannot be handled by the rule (it then takes the fallback), or ``None``.

        Raise instead (e.g. :class:`SampleInteractionError`) for configurations that no path,
        the fallback included, can value correctly.
        """
        return None

    @classmethod
    @abc.abstractmethod
    def terms(cls, module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor) -> dict[str, Term]:
        """Parameter name -> :class:`Term` for every sample of one call.

        Args:
            module: the layer (read its configuration only).
            x: the call's first positional input, batch-first ``[n, ...]``.
            grad_output: ∂L/∂output of the call, the output's shape.
        """


def registered_rules() -> dict[type[nn.Module], type[LayerRule]]:
    """A copy of the registry: layer type -> rule class."""
    return dict(_REGISTRY)


def rule_for(layer_type: type[nn.Module]) -> type[LayerRule] | None:
    """The rule registered for exactly ``layer_type``, or ``None``."""
    return _REGISTRY.get(layer_type)


def batch_first(module_name: str, x: torch.Tensor, min_dim: int) -> None:
    """Refuse inputs without a batch axis (the rules need [n, ...])."""
    if x.dim() < min_dim:
        raise ValueError(
            f"{module_name} received an input of shape {tuple(x.shape)} without a batch axis; the ghost "
            f"engine needs batch-first inputs with at least {min_dim} dims"
        )

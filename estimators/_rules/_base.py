"""The :class:`LayerRule` extension point and its exact-type registry."""

from __future__ import annotations

import abc
import importlib
import weakref
from typing import ClassVar

import torch
from torch import nn

from .._factors import Term

_REGISTRY: dict[type[nn.Module], type["LayerRule"]] = {}

#: Rules for layer types of optional libraries, registered on the first lookup of such a type so
#: that importing ``estimators`` never imports the library (transformers takes seconds): a module
#: prefix -> the rule module whose ``provide(layer_type)`` registers and returns a rule, or ``None``.
_PROVIDERS: dict[str, str] = {"transformers.": "estimators._rules.hf"}
#: Types a provider declined, so that it is asked once per type.
_DECLINED: "weakref.WeakSet[type]" = weakref.WeakSet()


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

    Raises:
        TypeError: ``layer=`` is not an ``nn.Module`` subclass.
        ValueError: ``layer`` already has a rule and ``replace=True`` was not given.

    Example (a per-feature gain y = x ⊙ w: c_z(w) = Σ_t x_t ⊙ b_t; registered only inside the
    ``with`` block so that this example leaves the registry as it found it):
        >>> from unittest import mock
        >>> from estimators import PerSample
        >>> class Gain(nn.Module):
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(d))
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> with mock.patch.dict(_REGISTRY):
        ...     class GainRule(LayerRule, layer=Gain):
        ...         @classmethod
        ...         def params(cls, module):
        ...             return ("weight",)
        ...         @classmethod
        ...         def terms(cls, module, x, grad_output):
        ...             n = x.shape[0]
        ...             return {"weight": PerSample((x * grad_output).reshape(n, -1, x.shape[-1]).sum(1))}
        ...     print(rule_for(Gain) is GainRule)
        True
        >>> rule_for(Gain) is None
        True
        >>> class Again(LayerRule, layer=nn.Linear):
        ...     pass
        Traceback (most recent call last):
        ...
        ValueError: torch.nn.modules.linear.Linear already has the rule LinearRule; pass replace=True ...
    """

    layer_type: ClassVar[type[nn.Module]]

    def __init_subclass__(cls, layer: type[nn.Module] | None = None, replace: bool = False, **kw):
        super().__init_subclass__(**kw)
        if layer is None:
            return
        register(cls, layer, replace=replace)

    @classmethod
    def params(cls, module: nn.Module) -> tuple[str, ...]:
        """Names of the module's own parameters this rule covers (default ``weight`` and ``bias``).

        A name whose parameter is ``None`` on the module (``bias=False``) is simply skipped.

        Example:
            >>> rule_for(nn.Linear).params(nn.Linear(2, 2)), rule_for(nn.Embedding).params(nn.Embedding(3, 2))
            (('weight', 'bias'), ('weight',))
        """
        return ("weight", "bias")

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        """Why this module instance cannot be handled by the rule (it then takes the fallback), or ``None``.

        Raise instead (e.g. :class:`SampleInteractionError`) for configurations that no path,
        the fallback included, can value correctly.

        Example:
            >>> rule_for(nn.Linear).unsupported(nn.Linear(2, 2)) is None
            True
            >>> rule_for(nn.Embedding).unsupported(nn.Embedding(5, 2, scale_grad_by_freq=True))
            Traceback (most recent call last):
            ...
            persample._checks.SampleInteractionError: nn.Embedding with scale_grad_by_freq=True ...
        """
        return None

    #: The layer returns several tensors (``nn.MultiheadAttention``: output and attention weights);
    #: the rule reads the gradient of the first, and any gradient reaching the others is refused.
    multi_output: ClassVar[bool] = False

    @classmethod
    def call_terms(cls, module: nn.Module, args: tuple, kwargs: dict, grad_output: torch.Tensor) -> dict[str, Term]:
        """Terms of one call from all its inputs; default :meth:`terms` of the first positional input.

        Override for layers with several inputs (attention: query, key, value and masks).

        Example:
            >>> lin = nn.Linear(3, 2)
            >>> sorted(rule_for(nn.Linear).call_terms(lin, (torch.ones(4, 3),), {}, torch.ones(4, 2)))
            ['bias', 'weight']
        """
        return cls.terms(module, args[0], grad_output)

    @classmethod
    @abc.abstractmethod
    def terms(cls, module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor) -> dict[str, Term]:
        """Parameter name -> :class:`Term` for every sample of one call.

        Args:
            module: the layer (read its configuration only).
            x: the call's first positional input, batch-first ``[n, ...]``.
            grad_output: ∂L/∂output of the call, the output's shape.
        Returns:
            ``{name: Term}`` for the names of :meth:`params` the module has; summing each term
            over samples (``Term.total``) gives that call's share of ``param.grad``.
        Raises:
            ValueError: ``x`` has no batch axis.

        Example (the Linear rule reproduces autograd's gradient):
            >>> gen = torch.Generator().manual_seed(0)
            >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
            >>> lin = nn.Linear(3, 2).double()
            >>> x, b = randn(4, 3), randn(4, 2)
            >>> terms = rule_for(nn.Linear).terms(lin, x, b)
            >>> grad_w, = torch.autograd.grad(lin(x), lin.weight, b)
            >>> sorted(terms), torch.allclose(terms["weight"].total(lin.weight.shape), grad_w)
            (['bias', 'weight'], True)
        """


def register(rule: type[LayerRule], layer: type[nn.Module], *, replace: bool = False) -> type[LayerRule]:
    """Register ``rule`` for exactly ``layer`` (what the class keyword ``layer=`` does); returns ``rule``.

    For a rule defined before its layer type can be imported (the lazy rules of optional libraries).

    Raises:
        TypeError: ``layer`` is not an ``nn.Module`` subclass.
        ValueError: ``layer`` already has a rule and ``replace=True`` was not given.

    Example:
        >>> register(rule_for(nn.Linear), nn.Linear)
        Traceback (most recent call last):
        ...
        ValueError: torch.nn.modules.linear.Linear already has the rule LinearRule; pass replace=True ...
    """
    if not (isinstance(layer, type) and issubclass(layer, nn.Module)):
        raise TypeError(f"{rule.__name__}: the class keyword layer= must be an nn.Module subclass, got {layer!r}")
    if layer in _REGISTRY and not replace:
        raise ValueError(
            f"{layer.__module__}.{layer.__qualname__} already has the rule {_REGISTRY[layer].__qualname__}; "
            f"pass replace=True in the class statement (class {rule.__name__}(LayerRule, layer=..., replace=True)) "
            "to override it"
        )
    rule.layer_type = layer
    _REGISTRY[layer] = rule
    return rule


def registered_rules() -> dict[type[nn.Module], type[LayerRule]]:
    """A copy of the registry: layer type -> rule class.

    Example:
        >>> stock = {'Conv1d', 'Conv2d', 'Embedding', 'LayerNorm', 'Linear', 'RMSNorm'}
        >>> stock <= {t.__name__ for t in registered_rules()}   # plus any rules users registered
        True
    """
    return dict(_REGISTRY)


def rule_for(layer_type: type[nn.Module]) -> type[LayerRule] | None:
    """The rule registered for exactly ``layer_type``, or ``None``.

    Subclasses of a registered type are not matched (their forward may differ). A type from an
    optional library with rules in this package (``transformers``: ``Conv1D`` and the RMSNorm
    family, see ``estimators/_rules/hf.py``) is looked up in that rule module on first use; a
    type it cannot classify gets ``None`` (the fallback), never a guessed rule.

    Example:
        >>> class MyLinear(nn.Linear):
        ...     pass
        >>> rule_for(nn.Linear).__name__, rule_for(MyLinear)
        ('LinearRule', None)
    """
    from .._sharded import original_type

    layer_type = original_type(layer_type)  # fully_shard's FSDPLinear runs nn.Linear's forward
    rule = _REGISTRY.get(layer_type)
    if rule is None and isinstance(layer_type, type) and layer_type not in _DECLINED:
        module = getattr(layer_type, "__module__", None) or ""
        provider = next((m for prefix, m in _PROVIDERS.items() if module.startswith(prefix)), None)
        if provider is not None:
            rule = importlib.import_module(provider).provide(layer_type)
            if rule is None:
                _DECLINED.add(layer_type)
    return rule


def batch_first(module_name: str, x: torch.Tensor, min_dim: int) -> None:
    """Refuse inputs without a batch axis (the rules need [n, ...]).

    Raises:
        ValueError: ``x.dim() < min_dim``, naming the module and the shape.
    Example:
        >>> batch_first("nn.Linear", torch.zeros(3), 2)
        Traceback (most recent call last):
        ...
        ValueError: nn.Linear received an input of shape (3,) without a batch axis; ...
    """
    if x.dim() < min_dim:
        raise ValueError(
            f"{module_name} received an input of shape {tuple(x.shape)} without a batch axis; the ghost "
            f"engine needs batch-first inputs with at least {min_dim} dims"
        )

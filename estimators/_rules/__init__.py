"""Layer rules of the ghost engine: the extension point, its registry and the built-in rules.

One small module per layer type; each defines a final :class:`LayerRule` subclass registered
for exactly that type (subclasses of the layer type are NOT matched: their forward may differ).
Rules for transformers' layers (``hf.py``) are registered on the first lookup of such a class,
so that importing this package does not import transformers.

Example:
    >>> from torch import nn
    >>> from estimators._rules import rule_for
    >>> rule_for(nn.Conv2d).__name__, rule_for(nn.BatchNorm1d)
    ('Conv2dRule', None)
"""

from ._base import LayerRule, registered_rules, rule_for
from . import attention, conv, embedding, groupnorm, layernorm, linear, rmsnorm  # noqa: F401  (registers the built-in rules)

__all__ = ["LayerRule", "registered_rules", "rule_for"]

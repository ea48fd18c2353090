"""Checks that a model satisfies the assumptions of per-sample attribution."""

from __future__ import annotations

from torch import nn

# Layers that mix samples of a batch in train mode: per-sample gradients are then not defined
# by the sample alone, so every value derived from them would be silently wrong.
_BATCH_MIXING_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.SyncBatchNorm,
)


class SampleInteractionError(ValueError):
    """The model lets samples of a batch interact in the forward pass (e.g. BatchNorm in train mode).

    Then c_z (sample z's share of g_B) is not defined by z alone, so no value is computed.

    Example:
        >>> check_samples_independent(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        Traceback (most recent call last):
        ...
        estimators._checks.SampleInteractionError: module '1' (BatchNorm1d) is in train mode ...
    """


def check_samples_independent(model: nn.Module) -> None:
    """Raise :class:`SampleInteractionError` if ``model`` mixes samples within a batch.

    BatchNorm layers in train mode normalise with batch statistics, so one sample's output
    depends on every other sample and the per-sample contribution ``c_z`` is undefined.

    Raises:
        SampleInteractionError: naming the first offending module and the fixes
            (``model.eval()`` for those layers, or GroupNorm/LayerNorm instead).

    Args:
        model: any ``nn.Module``; only its modules' types and ``training`` flags are read.
    Returns:
        ``None`` (the model is fine).

    Example:
        >>> check_samples_independent(nn.Sequential(nn.Linear(2, 2)))
        >>> check_samples_independent(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval())  # running stats: fine
    """
    for name, module in model.named_modules():
        if isinstance(module, _BATCH_MIXING_LAYERS) and module.training:
            raise SampleInteractionError(
                f"module {name or type(module).__name__!r} ({type(module).__name__}) is in train mode and "
                "normalises with batch statistics, so samples of a batch interact and per-sample "
                "contributions are undefined. Fix: put those layers in eval mode "
                "(e.g. `module.eval()`, using running statistics), or replace them with GroupNorm or "
                "LayerNorm, which act on each sample alone."
            )


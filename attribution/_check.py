"""``check_model``: every problem a training set-up would hit, listed before training starts.

Like Opacus's ``ModuleValidator``, it collects instead of stopping at the first error: layers
that are refused (samples that interact, reparametrized weights, sequence-first modules),
layers that take the exact but slower torch.func fallback, a loss that couples samples, an
optimizer with no linearization, and trainable parameters no optimizer holds (they get no value).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

import estimators
import optimizers

from ._step import as_val_batches


@dataclasses.dataclass
class ModelReport:
    """What :func:`check_model` found.

    Attributes:
        refused: messages of problems that stop tracking (each names the module or parameter,
            the cause and the fix).
        fallback: modules whose parameters use the torch.func fallback (exact, slower).
        not_stepped: trainable parameters no optimizer param group holds (valued as J = 0).
        paths: parameter name -> contraction path of a ghost step on the validation batch
            (``"dense"``, ``"pairwise"``, ``"factored"``, ``"fallback"``...), when it ran.
    """

    refused: list[str] = dataclasses.field(default_factory=list)
    fallback: list[str] = dataclasses.field(default_factory=list)
    not_stepped: list[str] = dataclasses.field(default_factory=list)
    paths: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No refused problem (fallback layers and unstepped parameters are allowed)."""
        return not self.refused

    def __str__(self) -> str:
        lines = ["check_model: " + ("ok" if self.ok else f"{len(self.refused)} problem(s) stop tracking")]
        lines += [f"  refused: {m}" for m in self.refused]
        if self.fallback:
            lines.append(f"  torch.func fallback (exact, slower): {', '.join(self.fallback)}")
        if self.not_stepped:
            lines.append(f"  trainable but in no optimizer param group (no value): {', '.join(self.not_stepped)}")
        return "\n".join(lines)


def check_model(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, val_batch) -> ModelReport:
    """List every problem ``InRunShapley(model, optimizer, loss_fn, val_batch)`` would hit, without training.

    Runs one ghost capture of the validation batch as if it were a training batch (forward and
    backward on a copy of the model, so nothing of the user's model, gradients, optimizer or RNG
    changes) to find the contraction path of every parameter.

    Args:
        model, optimizer, loss_fn, val_batch: as for :class:`InRunShapley`.
    Returns:
        :class:`ModelReport` (``print(report)`` for a summary, ``report.ok``).
    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        >>> opt = torch.optim.Adam(model[0].parameters())
        >>> report = check_model(model, opt, nn.functional.cross_entropy, (torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])))
        >>> report.ok, report.not_stepped
        (False, ['1.weight', '1.bias', '2.weight', '2.bias'])
        >>> print(report.refused[0][:54])
        module '1' (BatchNorm1d) normalises with batch statist
    """
    import copy

    report = ModelReport()
    try:
        val_batches, _ = as_val_batches(val_batch)
    except ValueError as err:
        report.refused.append(str(err))
        return report
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    report.not_stepped = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in stepped]
    try:
        optimizers.linearize(optimizer)
    except Exception as err:  # noqa: BLE001 - every refusal is reported, not raised
        report.refused.append(f"optimizer: {err}")
    twin = copy.deepcopy(model)
    try:
        estimators.check_samples_independent(twin)
    except estimators.SampleInteractionError as err:
        report.refused.append(str(err))
        twin.eval()  # go on with running statistics to find the other problems
    try:
        engine = estimators.GhostEngine(twin)
    except Exception as err:  # noqa: BLE001
        report.refused.append(str(err))
        return report
    report.fallback = engine.fallback_modules
    inputs, targets = val_batches[0]
    with estimators.isolated_pass(twin, train_mode=True):
        try:
            with engine.capture_train():
                outputs = twin(inputs)
                estimators.check_loss_additive(loss_fn, outputs, targets, what="validation batch 0")
                loss_fn(outputs, targets).backward()
            params = [p for p in twin.parameters() if p.requires_grad and p.grad is not None]
            engine.values({p: 1.0 for p in params}, [{p: torch.ones_like(p) for p in params}])
            report.paths = dict(engine.paths_taken)
        except Exception as err:  # noqa: BLE001
            report.refused.append(f"{type(err).__name__}: {err}")
        finally:
            engine.clear()
    return report

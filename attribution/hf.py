"""In-run values inside ``transformers.Trainer`` (install the ``hf`` extra).

Usage::

    callback = InRunShapleyCallback(val_batch={"input_ids": ..., "attention_mask": ..., "labels": ...})
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[callback])   # ds rows carry "sample_id"
    trainer.train()
    callback.values()            # pandas DataFrame indexed by sample_id

Requirements and behaviour:

* Every training row carries its dataset id under ``id_key`` (default ``"sample_id"``) and
  ``TrainingArguments(remove_unused_columns=False)`` keeps it in the batch. A forward pre-hook
  removes the id from the model's keyword arguments, so the model never sees it.
* The loss is the model's own ``outputs.loss`` (the validation batch includes ``labels``).
* Gradient clipping: Trainer clips before the optimizer callbacks, after the last micro-batch,
  where the tracker could not see the unclipped gradient. The callback therefore performs the
  same ``clip_grad_norm_(max_grad_norm)`` itself in ``on_pre_optimizer_step`` and sets
  ``args.max_grad_norm`` to 0 for the duration of training (restored at the end).
* ``fp16`` loss scaling is refused (the scaled gradient is not the gradient the update uses).
* BERT-style models need no extra columns: the ghost engine expands the default ``[1, T]``
  position ids (an ``nn.Embedding`` lookup broadcast over the batch) to one row per sample, so
  the position embedding gets per-sample values. Padded positions (``attention_mask == 0``)
  contribute nothing. Any other layer applied once to a batch-1 input and broadcast over the
  batch is refused (``GhostEngineError: ... disagree on the batch size``); give such an input
  a batch axis. See ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("attribution.hf needs transformers: pip install 'inrun-shapley[hf]'") from exc

from ._tracker import InRunShapley, TrackerUsageError


class KwargsModel(nn.Module):
    """Adapter so that ``model(inputs)`` with a dict of inputs calls ``model(**inputs)``.

    Hugging Face models take keyword arguments; the toolkit's convention is
    ``loss_fn(model(inputs), targets)``. With ``model_loss`` as ``loss_fn`` the model's own loss is used.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: Mapping[str, torch.Tensor]):
        return self.model(**inputs)


def model_loss(outputs, targets=None) -> torch.Tensor:
    """The loss a Hugging Face model computed from the ``labels`` in its inputs."""
    if getattr(outputs, "loss", None) is None:
        raise ValueError("the model returned no loss: include 'labels' in the validation batch")
    return outputs.loss


class InRunShapleyCallback(TrainerCallback):
    """A ``TrainerCallback`` that runs :class:`~attribution.InRunShapley` inside ``Trainer.train()``.

    Args:
        val_batch: a dict of model inputs including ``labels``, or a list of such dicts (K targets).
        id_key: the batch key holding each row's dataset id.
        linearization, val_point, estimator, record_steps: as for :class:`InRunShapley`.
    """

    def __init__(self, val_batch, *, id_key: str = "sample_id", linearization="secant", val_point="midpoint",
                 estimator="ghost", record_steps: bool = False):
        batches = val_batch if isinstance(val_batch, list) else [val_batch]
        for k, b in enumerate(batches):
            if not isinstance(b, Mapping) or "labels" not in b:
                raise ValueError(f"validation batch {k} must be a dict of model inputs including 'labels'")
        self._val = [(dict(b), None) for b in batches] if isinstance(val_batch, list) else (dict(val_batch), None)
        self.id_key = id_key
        self._options = dict(linearization=linearization, val_point=val_point, estimator=estimator, record_steps=record_steps)
        self.tracker: InRunShapley | None = None
        self._open: contextlib.ExitStack | None = None
        self._hook = None
        self._captured = False
        self._max_grad_norm = 0.0
        self._args = None
        self._model = None

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "fp16", False):
            raise TrackerUsageError(
                "InRunShapleyCallback does not support fp16 loss scaling (the scaled gradient is not the one the "
                "update uses); train in float32 or bf16"
            )
        inner = optimizer
        while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            inner = inner.optimizer  # accelerate wraps the torch optimizer (the wrapper is an Optimizer too)
        self._args, self._model = args, model
        self._max_grad_norm, args.max_grad_norm = args.max_grad_norm, 0.0
        self.tracker = InRunShapley(KwargsModel(model), inner, model_loss, self._val, **self._options)
        self._hook = model.register_forward_pre_hook(self._enter_batch, with_kwargs=True)

    def _enter_batch(self, module, args, kwargs):
        if self.id_key not in kwargs:
            return None  # an evaluation call, or the tracker's own validation pass
        ids = kwargs.pop(self.id_key)
        if module.training and torch.is_grad_enabled():
            self._exit_batch()  # the previous micro-batch's backward has finished
            self._open = contextlib.ExitStack()
            self._open.enter_context(self.tracker.batch(ids))
            self._captured = True
        return args, kwargs

    def _exit_batch(self):
        if self._open is not None:
            stack, self._open = self._open, None
            stack.close()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._exit_batch()
        if not self._captured:
            raise TrackerUsageError(
                f"the training batches of this step had no {self.id_key!r} column: add one id per row to the "
                "dataset and pass TrainingArguments(remove_unused_columns=False)"
            )
        self._captured = False
        if self._max_grad_norm and self._max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._model.parameters(), self._max_grad_norm)

    def on_train_end(self, args, state, control, **kwargs):
        self._exit_batch()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._args is not None:
            self._args.max_grad_norm = self._max_grad_norm
        if self.tracker is not None:
            self.tracker.close()

    # ------------------------------------------------------------------ results
    def values(self):
        """Totals by id (see :meth:`InRunShapley.values`)."""
        if self.tracker is None:
            raise TrackerUsageError("no training has run with this callback yet")
        return self.tracker.values()

    def history(self):
        """The per-step long table (needs ``record_steps=True``)."""
        if self.tracker is None:
            raise TrackerUsageError("no training has run with this callback yet")
        return self.tracker.history()

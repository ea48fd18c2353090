"""In-run values inside ``transformers.Trainer`` (install the ``hf`` extra).

Usage::

    callback = InRunShapleyCallback(val_batch={"input_ids": ..., "attention_mask": ..., "labels": ...})
    trainer = Trainer(model, args, train_dataset=with_ids(ds), callbacks=[callback])
    trainer.train()
    callback.values()            # pandas DataFrame indexed by sample_id

Requirements and behaviour:

* Every training row carries its dataset id under ``id_key`` (default ``"sample_id"``):
  :func:`with_ids` adds the row's index to a dataset that has none. With a ``datasets.Dataset``,
  ``TrainingArguments(remove_unused_columns=False)`` keeps the column in the batch. A forward
  pre-hook removes the id from the model's keyword arguments, so the model never sees it.
* The model is tracked itself: the ``Trainer`` calls it directly, each micro-batch of gradient
  accumulation is one ``tracker.batch`` block, and BERT/GPT-2's default ``[1, T]`` position ids
  are expanded to the batch inside the capture (no ``position_ids`` column needed). The
  validation pass calls it with the validation dict as keyword arguments (:class:`KwargsModel`).
* The loss is the model's own ``outputs.loss`` (the validation batch includes ``labels``).
* Gradient clipping (``max_grad_norm``, on by default) and loss scaling are the Trainer's own:
  the tracker's completeness check measures the uniform rescale they apply and values the step
  as taken; ``TrainingArguments`` are never modified.
* Checkpoints: the tracker's ledger is saved as ``inrun_shapley.pt`` in every checkpoint folder
  the Trainer writes, and ``trainer.train(resume_from_checkpoint=...)`` continues from the file
  of the checkpoint it resumes (found as ``<output_dir>/checkpoint-<global_step>``, or given
  with ``resume_from``), so the totals equal an uninterrupted run.
* Any layer applied once to a batch-1 input and broadcast over the batch other than an
  ``nn.Embedding`` lookup is refused (``GhostEngineError: ... disagree on the batch size``); see
  ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import os
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

    Args:
        model: the wrapped module, called as ``model(**inputs)``; its parameters are this
            module's parameters (nothing is copied).

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(2, 1)
        ...     def forward(self, x, scale=1.0):
        ...         return self.lin(x) * scale
        >>> net = Net()
        >>> wrapped = KwargsModel(net)
        >>> x = torch.ones(3, 2)
        >>> torch.equal(wrapped({"x": x, "scale": 2.0}), net(x, scale=2.0)), wrapped.model is net
        (True, True)
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: Mapping[str, torch.Tensor]):
        return self.model(**inputs)


def model_loss(outputs, targets=None) -> torch.Tensor:
    """The loss a Hugging Face model computed from the ``labels`` in its inputs.

    Args:
        outputs: the model's output object (anything with a ``loss`` attribute).
        targets: ignored (the labels travel inside the inputs).
    Returns:
        ``outputs.loss``, a scalar tensor.
    Raises:
        ValueError: ``outputs.loss`` is missing or ``None`` (no ``labels`` in the batch).
    Example:
        >>> from types import SimpleNamespace
        >>> model_loss(SimpleNamespace(loss=torch.tensor(0.5))).item()
        0.5
        >>> model_loss(SimpleNamespace(loss=None))
        Traceback (most recent call last):
        ...
        ValueError: the model returned no loss: include 'labels' in the validation batch
    """
    if getattr(outputs, "loss", None) is None:
        raise ValueError("the model returned no loss: include 'labels' in the validation batch")
    return outputs.loss


LEDGER_FILE = "inrun_shapley.pt"


class IndexedRows(torch.utils.data.Dataset):
    """A map-style dataset of dict rows with each row's index added under ``id_key`` (see :func:`with_ids`)."""

    def __init__(self, dataset, id_key: str = "sample_id"):
        self.dataset, self.id_key = dataset, id_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        row = self.dataset[i]
        if not isinstance(row, Mapping):
            raise TypeError(f"with_ids needs dict rows, but row {i} is a {type(row).__name__}")
        if self.id_key in row:
            raise KeyError(f"row {i} already has a {self.id_key!r} column; use it directly (no with_ids)")
        return {**row, self.id_key: int(i)}


def with_ids(dataset, id_key: str = "sample_id") -> IndexedRows:
    """``dataset`` with each row's index added under ``id_key``, the ids the callback reads.

    Args:
        dataset: any dataset with ``len`` and integer indexing whose rows are dicts.
        id_key: the key to add (the callback's ``id_key``).
    Raises:
        KeyError: a row already has ``id_key``.
        TypeError: a row is not a dict.
    Example:
        >>> rows = with_ids([{"x": 1.0}, {"x": 2.0}])
        >>> len(rows), rows[1]
        (2, {'x': 2.0, 'sample_id': 1})
    """
    return IndexedRows(dataset, id_key)


class InRunShapleyCallback(TrainerCallback):
    """A ``TrainerCallback`` that runs :class:`~attribution.InRunShapley` inside ``Trainer.train()``.

    Each optimizer step of ``Trainer.train()`` adds, for every training row z of the step,
    φ_z = −⟨J ⊙ ∇L_val, c_z⟩ (J the optimizer's secant or tangent, ∇L_val the gradient of the
    model's own loss on ``val_batch``) to the total of the row's ``id_key``.

    Args:
        val_batch: a dict of model inputs including ``labels``, or a list of such dicts (K targets).
        id_key: the batch key holding each row's dataset id (see :func:`with_ids`).
        linearization, val_point, estimator, record_steps: as for :class:`InRunShapley`.
        resume_from: a saved ledger to continue (default: the one in the checkpoint the Trainer
            resumes from).
        stream, val_mode: as for :class:`InRunShapley` (``stream=True`` needs
            ``val_point="current"`` or ``"predicted"``, ``gradient_accumulation_steps=1`` and a ``max_grad_norm`` that
            does not clip, e.g. 0: a clipped step is refused).
        route, nonlinearity_threshold, exact_permutations, seed, credit, momentum_window: as for
            :class:`InRunShapley` (the exact-update route of sign-like first steps; momentum credit).
    Raises:
        ValueError: a validation batch is not a dict with ``labels``.
        TrackerUsageError: during training, for batches without ``id_key``.

    Example (a tiny model through a real ``Trainer``; needs ``accelerate`` as Trainer does):
        >>> import tempfile, transformers
        >>> class Tiny(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(3, 2)
        ...     def forward(self, x, labels=None):
        ...         logits = self.lin(x)
        ...         loss = nn.functional.cross_entropy(logits, labels)
        ...         return transformers.modeling_outputs.SequenceClassifierOutput(loss=loss, logits=logits)
        >>> gen = torch.Generator().manual_seed(0)
        >>> rows = [{"x": torch.randn(3, generator=gen), "labels": i % 2, "sample_id": 100 + i} for i in range(8)]
        >>> val = {"x": torch.randn(4, 3, generator=gen), "labels": torch.tensor([0, 1, 0, 1])}
        >>> tmp = tempfile.TemporaryDirectory()
        >>> args = transformers.TrainingArguments(
        ...     output_dir=tmp.name, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        ...     remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
        ...     logging_strategy="no", disable_tqdm=True)
        >>> callback = InRunShapleyCallback(val)
        >>> trainer = transformers.Trainer(model=Tiny(), args=args, train_dataset=rows, callbacks=[callback])
        >>> trainer.remove_callback(transformers.PrinterCallback)      # keep the example's output quiet
        >>> _ = trainer.train()
        >>> values = callback.values()
        >>> len(values), list(values.columns), int(values["steps_seen"].sum())
        (8, ['value', 'steps_seen'], 8)
        >>> tmp.cleanup()
        >>> InRunShapleyCallback({"x": torch.ones(1, 3)})
        Traceback (most recent call last):
        ...
        ValueError: validation batch 0 must be a dict of model inputs including 'labels'
    """

    def __init__(self, val_batch, *, id_key: str = "sample_id", linearization="secant", val_point="midpoint",
                 estimator="ghost", record_steps: bool = False, resume_from: str | None = None, stream: bool = False,
                 val_mode: str = "eval", route: str = "auto", nonlinearity_threshold: float | None = None,
                 exact_permutations: int = 32, seed: int = 0, credit: str = "step", momentum_window: int = 16):
        batches = val_batch if isinstance(val_batch, list) else [val_batch]
        for k, b in enumerate(batches):
            if not isinstance(b, Mapping) or "labels" not in b:
                raise ValueError(f"validation batch {k} must be a dict of model inputs including 'labels'")
        self._val = [(dict(b), None) for b in batches] if isinstance(val_batch, list) else (dict(val_batch), None)
        self.id_key = id_key
        self._options = dict(
            linearization=linearization, val_point=val_point, estimator=estimator, record_steps=record_steps, stream=stream,
            val_mode=val_mode, route=route, nonlinearity_threshold=nonlinearity_threshold,
            exact_permutations=exact_permutations, seed=seed, credit=credit, momentum_window=momentum_window,
        )
        self.tracker: InRunShapley | None = None
        self._open: contextlib.ExitStack | None = None
        self._hook = None
        self._captured = False
        self._resume_from = resume_from
        self._model = None

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Trainer event: build the tracker on the real torch optimizer (continuing a checkpoint's values on resume).

        Raises:
            FileNotFoundError: training resumes at a step > 0 but no saved ledger was found.
        """
        self.close()  # a previous train() that crashed left its hook and tracker behind
        inner = optimizer
        while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            inner = inner.optimizer  # accelerate wraps the torch optimizer (the wrapper is an Optimizer too)
        self._model = model
        wrapped = KwargsModel(model)
        resume = self._checkpoint_file(args, state)
        if resume is not None:
            self.tracker = InRunShapley.load(resume, wrapped, inner, model_loss, self._val, stream=self._options["stream"])
        else:
            self.tracker = InRunShapley(wrapped, inner, model_loss, self._val, **self._options)
        self._hook = model.register_forward_pre_hook(self._enter_batch, with_kwargs=True)

    def _checkpoint_file(self, args, state) -> str | None:
        """The ledger to continue: ``resume_from``, or the one saved with checkpoint ``global_step``."""
        if self._resume_from is not None:
            return self._resume_from
        if not state.global_step:
            return None
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", LEDGER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"training resumes at step {state.global_step} but {path!r} does not exist, so the values of the first "
                f"{state.global_step} steps would be lost. Pass InRunShapleyCallback(..., resume_from=<the {LEDGER_FILE} "
                "saved with that checkpoint>), or start from step 0"
            )
        return path

    def on_save(self, args, state, control, **kwargs):
        """Trainer event: save the tracker's ledger into the checkpoint folder the Trainer just wrote."""
        if self.tracker is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            self.tracker.save(os.path.join(folder, LEDGER_FILE))

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
        """Trainer event: close the last micro-batch; the tracker values the step in ``optimizer.step()``.

        Raises:
            TrackerUsageError: the step's batches carried no ``id_key`` column.
        """
        self._exit_batch()
        if not self._captured:
            raise TrackerUsageError(
                f"the training batches of this step had no {self.id_key!r} column: wrap the dataset in "
                "attribution.hf.with_ids(dataset) (one id per row: its index), or add one id per row yourself; with a "
                "datasets.Dataset also pass TrainingArguments(remove_unused_columns=False)"
            )
        self._captured = False

    def on_train_end(self, args, state, control, **kwargs):
        """Trainer event: remove the hook and close the tracker (it keeps its values)."""
        self.close()

    def close(self) -> None:
        """Remove the forward pre-hook and close the tracker; safe to call twice (also after a crash)."""
        self._exit_batch()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.tracker is not None:
            self.tracker.close()

    # ------------------------------------------------------------------ results
    def values(self):
        """Totals by id (see :meth:`InRunShapley.values`): a DataFrame indexed by id.

        Raises:
            TrackerUsageError: no training has run with this callback.
        Example:
            >>> InRunShapleyCallback({"labels": torch.zeros(1)}).values()
            Traceback (most recent call last):
            ...
            attribution._tracker.TrackerUsageError: no training has run with this callback yet
        """
        if self.tracker is None:
            raise TrackerUsageError("no training has run with this callback yet")
        return self.tracker.values()

    def history(self):
        """The per-step long table (needs ``record_steps=True``): step, position, id, values.

        Raises:
            TrackerUsageError: no training has run with this callback (or as
                :meth:`InRunShapley.history`).
        Example:
            >>> InRunShapleyCallback({"labels": torch.zeros(1)}, record_steps=True).history()
            Traceback (most recent call last):
            ...
            attribution._tracker.TrackerUsageError: no training has run with this callback yet
        """
        if self.tracker is None:
            raise TrackerUsageError("no training has run with this callback yet")
        return self.tracker.history()

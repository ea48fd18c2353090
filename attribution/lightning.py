"""In-run values inside ``lightning.Trainer.fit()`` (install the ``lightning`` extra).

Usage::

    callback = InRunShapleyCallback((x_val, y_val), nn.functional.cross_entropy)
    trainer = lightning.Trainer(max_steps=100, callbacks=[callback])
    trainer.fit(module, train_loader)
    callback.values()            # pandas DataFrame indexed by sample id

How each training batch is wrapped in ``tracker.batch(ids)``:

* **Automatic optimization.** Lightning calls ``optimizer.step(closure)``; the closure runs
  ``training_step`` (the forward), ``zero_grad``, the backward, ``on_before_optimizer_step`` and
  the gradient clipping. The callback registers a step pre-hook *before* the tracker's, which
  wraps the closure so that its forward and backward run inside the ``batch`` block; the
  tracker then values the step when the closure returns, after clipping (a uniform rescale,
  valued exactly). Micro-batches of ``accumulate_grad_batches`` that do not step run their
  closure directly: for them the block is opened in ``on_train_batch_start`` and closed in
  ``on_train_batch_end``. Lightning divides each micro-batch's loss by
  ``accumulate_grad_batches``; the captured contributions carry that factor, so the values are
  those of the step as taken.
* **Manual optimization** (``self.automatic_optimization = False``): the block is opened in
  ``on_train_batch_start`` and closed when ``training_step`` calls ``opt.step()`` (or at
  ``on_train_batch_end`` when it does not step: gradient accumulation). Use
  ``self.manual_backward(loss)``; one ``opt.step()`` per ``training_step``.

Ids, in this order: ``ids_fn(batch, batch_idx)`` if given; else ``batch[id_key]`` for dict
batches that hold it; else the rows' positions in the dataset, when they can be known (a
map-style dataset read in order: ``DataLoader(..., shuffle=False)`` with its default sampler,
fit started from scratch); otherwise a :class:`TrackerUsageError` says how to give ids. The
source chosen at the first batch is kept for the whole run.

Refused with a clear error: several optimizers, more than one device or process,
``gradient_clip_algorithm="value"`` (it is not a uniform rescale), a ``training_step`` that
returns ``None`` for every micro-batch of a step, two ``opt.step()`` calls in one manual
``training_step``, and a callback reused for a second ``fit()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch  # noqa: F401 - the doctests use it
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

try:
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from lightning_fabric.utilities.apply_func import move_data_to_device
        from pytorch_lightning import Callback
    except ImportError as exc:
        raise ImportError("attribution.lightning needs Lightning: pip install 'inrun-shapley[lightning]'") from exc

from ._config import AttributionConfig
from ._tracker import InRunShapley, TrackerUsageError

__all__ = ["InRunShapleyCallback"]


class _Abandon(Exception):
    """Thrown into a ``tracker.batch`` block to drop what it captured (the block saw no backward)."""


class _ModelFn(nn.Module):
    """``model_fn(module, inputs)`` as a module, so that the tracker can call ``model(inputs)``.

    The LightningModule is a submodule (nothing is copied): its parameters are this module's.
    """

    def __init__(self, module: nn.Module, fn: Callable):
        super().__init__()
        self.module = module
        self._fn = fn

    def forward(self, inputs):
        return self._fn(self.module, inputs)


class InRunShapleyCallback(Callback):
    """A Lightning ``Callback`` that runs :class:`~attribution.InRunShapley` inside ``Trainer.fit()``.

    Each optimizer step adds, for every training row z of the step (all its micro-batches),

        φ_z = −⟨J ⊙ ∇L_val(θ*), c_z⟩

    to the total of z's id (J the optimizer's secant or tangent under its real state, ∇L_val the
    gradient of ``loss_fn(model(inputs), targets)`` on ``val_batch``, c_z row z's share of the
    gradient the optimizer uses, clipping included). See the module docstring for how the
    batches are wrapped.

    Args:
        val_batch: ``(inputs, targets)`` or a list of K such batches (K value columns); moved to
            the module's device and converted by the precision plugin (as training batches are)
            when training starts.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar, with the reduction of training (a mean).
        model_fn: ``model_fn(module, inputs) -> outputs`` for the validation forward; default
            ``module(inputs)`` (the LightningModule's ``forward``).
        id_key: the key of dict batches that holds one id per row ``[n]``.
        ids_fn: ``ids_fn(batch, batch_idx) -> ids`` (``[n]`` ints or strs); takes precedence.
        linearization, val_point, estimator, record_steps, stream, val_mode: as for :class:`InRunShapley`.
        route, nonlinearity_threshold, exact_permutations, seed, credit, momentum_window: as for
            :class:`InRunShapley` (the exact-update route of sign-like first steps; momentum credit).

    Checkpoints: the tracker's ledger is the callback's ``state_dict()``, which Lightning saves in
    every checkpoint; ``trainer.fit(..., ckpt_path=...)`` restores it, so the values continue (ids
    must then come from ``id_key`` or ``ids_fn``: dataset positions are refused on resume).
    Raises:
        ValueError: an unknown option value (when the callback is created).
        TrackerUsageError: during ``fit()``, for the set-ups listed in the module docstring and
            for batches whose ids cannot be known.

    Example:
        >>> import lightning, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class Net(lightning.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(3, 2)
        ...     def forward(self, x):
        ...         return self.lin(x)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return nn.functional.cross_entropy(self(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.AdamW(self.parameters(), lr=1e-2)
        >>> gen = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(12, 3, generator=gen), torch.randint(0, 2, (12,), generator=gen)
        >>> callback = InRunShapleyCallback((x[:4], y[:4]), nn.functional.cross_entropy)
        >>> trainer = lightning.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False,
        ...     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...     callbacks=[callback])
        >>> trainer.fit(Net(), DataLoader(TensorDataset(x[4:], y[4:]), batch_size=4))
        >>> values = callback.values()                       # ids: positions in the dataset (no shuffle)
        >>> list(values.index), int(values["steps_seen"].sum())
        ([0, 1, 2, 3, 4, 5, 6, 7], 8)
        >>> InRunShapleyCallback((x, y), nn.functional.cross_entropy, val_point="later")
        Traceback (most recent call last):
        ...
        ValueError: ...'later'...
    """

    def __init__(
        self,
        val_batch,
        loss_fn: Callable,
        *,
        model_fn: Callable | None = None,
        id_key: str = "sample_id",
        ids_fn: Callable | None = None,
        linearization="secant",
        val_point="midpoint",
        estimator="ghost",
        record_steps: bool = False,
        stream: bool = False,
        val_mode: str = "eval",
        route: str = "auto",
        nonlinearity_threshold: float | None = None,
        exact_permutations: int = 32,
        seed: int = 0,
        credit: str = "step",
        momentum_window: int = 16,
    ):
        AttributionConfig(linearization, val_point, estimator)  # refuse a bad option now, not at fit()
        self.val_batch = val_batch
        self.loss_fn = loss_fn
        self.model_fn = model_fn
        self.id_key = id_key
        self.ids_fn = ids_fn
        self._options = dict(
            linearization=linearization, val_point=val_point, estimator=estimator, record_steps=record_steps, stream=stream,
            val_mode=val_mode, route=route, nonlinearity_threshold=nonlinearity_threshold,
            exact_permutations=exact_permutations, seed=seed, credit=credit, momentum_window=momentum_window,
        )
        #: The ledger of a checkpoint this fit resumes from (set by Lightning through load_state_dict).
        self._resume_state: dict | None = None
        self.tracker: InRunShapley | None = None
        self._hook = None
        self._automatic = True
        self._id_source: str | None = None
        # The entered `tracker.batch(ids)` context of the current training batch (None between blocks).
        self._open: contextlib.AbstractContextManager | None = None
        self._ids = None
        self._batch_idx = -1
        self._backward_seen = False
        self._stepped = False
        self._blocks_this_step = 0

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer, pl_module) -> None:
        """Lightning hook: check the set-up and build the tracker on the real torch optimizer.

        Raises:
            TrackerUsageError: a second ``fit()``, several optimizers or devices, or value clipping.
        """
        if self.tracker is not None:
            raise TrackerUsageError(
                "this InRunShapleyCallback already ran a fit(); its values stay available, but create a new "
                "InRunShapleyCallback for another fit()"
            )
        if trainer.world_size > 1:
            raise TrackerUsageError(
                f"InRunShapleyCallback runs on one device in one process (this Trainer has world_size="
                f"{trainer.world_size}); use devices=1, or a plain loop with InRunShapley on a DDP model"
            )
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise TrackerUsageError(
                f"InRunShapleyCallback tracks one optimizer, but configure_optimizers() returned {len(optimizers)}; "
                "return a single optimizer (param groups may differ), or use InRunShapley in a plain loop"
            )
        algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm)
        if trainer.gradient_clip_val and str(algorithm) == "value":
            raise TrackerUsageError(
                f"gradient_clip_algorithm='value' (gradient_clip_val={trainer.gradient_clip_val}) clips each "
                "coordinate separately, which is not a uniform rescale of the gradient, so the per-sample "
                "contributions no longer add up to it; use gradient_clip_algorithm='norm'"
            )
        self._automatic = bool(pl_module.automatic_optimization)
        optimizer = optimizers[0]
        # Registered before the tracker's own hook so that it runs first (the tracker requires being last).
        self._hook = optimizer.register_step_pre_hook(self._before_step)
        model = pl_module if self.model_fn is None else _ModelFn(pl_module, self.model_fn)
        # As Lightning prepares training batches: on the module's device, cast by the precision plugin ("64-true").
        val = trainer.strategy.precision_plugin.convert_input(move_data_to_device(self.val_batch, pl_module.device))
        try:
            self.tracker = InRunShapley(model, optimizer, self.loss_fn, val, **self._options)
            if self._resume_state is not None:
                self.tracker.restore(self._resume_state)
        except BaseException:
            self._hook.remove()
            self._hook = None
            if self.tracker is not None:
                self.tracker.close()
                self.tracker = None
            raise

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Lightning saves this in every checkpoint: the tracker's ledger (totals, counts, history, config)."""
        return {} if self.tracker is None else {"ledger": self.tracker.state()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Lightning calls this when ``fit(ckpt_path=...)`` resumes: the values continue from the checkpoint's."""
        self._resume_state = state_dict.get("ledger")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Lightning hook: find the batch's ids and open its ``tracker.batch`` block.

        Raises:
            TrackerUsageError: the ids of the batch cannot be known (the message says how to give them).
        """
        self._exit()  # a block left open (another callback skipped the rest of an epoch) ends here
        self._ids = self._batch_ids(trainer, batch, batch_idx)
        self._batch_idx, self._stepped = batch_idx, False
        # Under automatic optimization a stepping batch runs its forward inside optimizer.step(closure):
        # this block is then dropped (still empty) and reopened inside the closure by _before_step.
        self._enter()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        """Lightning hook: note that the open block's batch reached a backward."""
        self._backward_seen = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Lightning hook: close the block of a batch that did not step (gradient accumulation)."""
        self._exit()

    def on_fit_end(self, trainer, pl_module) -> None:
        """Lightning hook: remove the optimizer hook and close the tracker (its values stay)."""
        self._teardown()

    def on_exception(self, trainer, pl_module, exception) -> None:
        """Lightning hook: drop the open block, remove the hook and close the tracker."""
        self._teardown()

    # ------------------------------------------------------------------ the batch block
    def _enter(self) -> None:
        self._open = self.tracker.batch(self._ids)
        self._open.__enter__()
        self._backward_seen = False

    def _exit(self) -> None:
        """End the open block: kept if its batch reached a backward, dropped otherwise."""
        if self._open is None:
            return
        block, self._open = self._open, None
        if self._backward_seen:
            block.__exit__(None, None, None)
            self._blocks_this_step += 1
        else:
            # No backward (training_step returned None, or the forward runs later in the closure):
            # these rows contributed no gradient, so dropping them is exact.
            block.__exit__(_Abandon, _Abandon(), None)

    def _before_step(self, optimizer, args, kwargs):
        """Optimizer step pre-hook (runs before the tracker's): put the batch's forward and backward in its block."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if not self._automatic:
            if self._stepped:
                raise TrackerUsageError(
                    f"training_step called optimizer.step() twice for batch {self._batch_idx}; InRunShapleyCallback "
                    "values one optimizer step per training batch (the ids belong to the batch). Step once per "
                    "training_step, or use InRunShapley directly with one tracker.batch(ids) per sub-batch"
                )
            self._stepped = True
            self._exit()
            self._check_step_has_samples()
            return None
        if self._open is None or self._backward_seen or not callable(closure):
            # The closure already ran (a precision plugin with a GradScaler calls it before step()), or there is
            # no closure: the batch's block is complete.
            self._exit()
            self._check_step_has_samples()
            return None
        self._exit()  # empty: training_step has not run yet

        def closure_in_block():
            self._enter()
            try:
                result = closure()
            except BaseException:
                block, self._open = self._open, None
                if block is not None:
                    block.__exit__(_Abandon, _Abandon(), None)
                raise
            self._exit()
            self._check_step_has_samples()
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_in_block}
        return (args[0], closure_in_block, *args[2:]), kwargs

    def _check_step_has_samples(self) -> None:
        blocks, self._blocks_this_step = self._blocks_this_step, 0
        if blocks == 0:
            raise TrackerUsageError(
                f"optimizer step {self.tracker.steps} has no samples: no training batch of the step reached a backward "
                "(training_step returned None for every micro-batch, or a manual training_step did not call "
                "self.manual_backward(loss)). Return a loss (manual optimization: use self.manual_backward), or skip "
                "the step itself"
            )

    def _teardown(self) -> None:
        block, self._open = self._open, None
        if block is not None:
            block.__exit__(_Abandon, _Abandon(), None)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.tracker is not None:
            self.tracker.close()

    # ------------------------------------------------------------------ results
    def values(self):
        """Totals by id (see :meth:`InRunShapley.values`): ``value`` (or ``value_0`` …) and ``steps_seen``.

        Raises:
            TrackerUsageError: no ``fit()`` has run with this callback.
        Example:
            >>> InRunShapleyCallback((torch.ones(1, 2), torch.zeros(1)), nn.functional.mse_loss).values()
            Traceback (most recent call last):
            ...
            attribution._tracker.TrackerUsageError: no fit() has run with this callback yet
        """
        return self._fitted().values()

    def history(self):
        """The per-step long table (``step``, ``position``, ``id``, values); needs ``record_steps=True``.

        Raises:
            TrackerUsageError: no ``fit()`` has run with this callback (or as :meth:`InRunShapley.history`).
        Example:
            >>> InRunShapleyCallback((torch.ones(1, 2), torch.zeros(1)), nn.functional.mse_loss).history()
            Traceback (most recent call last):
            ...
            attribution._tracker.TrackerUsageError: no fit() has run with this callback yet
        """
        return self._fitted().history()

    @property
    def skipped_steps(self) -> list[tuple[int, str]]:
        """``(step, reason)`` for every step whose values were not added (see :class:`InRunShapley`)."""
        return self._fitted().skipped_steps

    def _fitted(self) -> InRunShapley:
        if self.tracker is None:
            raise TrackerUsageError("no fit() has run with this callback yet")
        return self.tracker

    # ------------------------------------------------------------------ ids
    def _batch_ids(self, trainer, batch, batch_idx):
        """The batch's ids from the source chosen at the first batch (``ids_fn``, ``batch[id_key]``, positions)."""
        if self._id_source is None:
            if self.ids_fn is not None:
                self._id_source = "fn"
            elif isinstance(batch, Mapping) and self.id_key in batch:
                self._id_source = "key"
            else:
                self._id_source = "position"
        if self._id_source == "fn":
            return self.ids_fn(batch, batch_idx)
        if self._id_source == "key":
            if not isinstance(batch, Mapping) or self.id_key not in batch:
                keys = sorted(map(str, batch)) if isinstance(batch, Mapping) else type(batch).__name__
                raise TrackerUsageError(
                    f"training batch {batch_idx} has no {self.id_key!r} entry (it has {keys}), but the first batch "
                    f"did: every batch must carry its rows' ids under {self.id_key!r}"
                )
            return batch[self.id_key]
        # Checked at every batch: a dataloader reloaded mid-fit may shuffle.
        batch_size, length = _dataset_positions(trainer, self.id_key, batch)
        return list(range(batch_idx * batch_size, min((batch_idx + 1) * batch_size, length)))


def _dataset_positions(trainer, id_key: str, batch) -> tuple[int, int]:
    """``(batch_size, len(dataset))`` when a batch's rows are dataset positions ``[k·bs, (k+1)·bs)``.

    Raises:
        TrackerUsageError: the positions cannot be known (shuffling, a custom sampler, an iterable
            dataset, several loaders, a resumed fit); the message says how to give ids instead.
    """
    how = (
        f"Give each row an id: return a dict with a {id_key!r} entry (the row's index) from the dataset's "
        "__getitem__, or pass InRunShapleyCallback(..., id_key=<that key>) or ids_fn=lambda batch, batch_idx: ids"
    )
    keys = f" (the batch is a dict with keys {sorted(map(str, batch))}, none of them {id_key!r})" if isinstance(batch, Mapping) else ""
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        reason = f"the training data is a {type(loader).__name__}, not one DataLoader"
    elif isinstance(loader.dataset, IterableDataset):
        reason = f"the DataLoader reads an IterableDataset ({type(loader.dataset).__name__}), which has no positions"
    elif type(loader.sampler) is not SequentialSampler or type(loader.batch_sampler) is not BatchSampler:
        sampler = type(loader.sampler).__name__ if type(loader.sampler) is not SequentialSampler else type(loader.batch_sampler).__name__
        reason = (
            f"the DataLoader draws rows with a {sampler}"
            + (" (shuffle=True)" if sampler == "RandomSampler" else "")
            + ", so which dataset rows a batch holds is not known"
        )
    elif trainer.ckpt_path is not None:
        reason = "the fit resumes from a checkpoint, where batch numbers no longer match dataset positions"
    else:
        return loader.batch_size, len(loader.dataset)
    raise TrackerUsageError(f"InRunShapleyCallback cannot tell the ids of the training rows{keys}: {reason}. {how}")

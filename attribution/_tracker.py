"""``InRunShapley``: in-run values for an unchanged training loop."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from collections.abc import Callable, Hashable

import pandas as pd
import torch
from torch import nn

from estimators import ValPoint

from ._config import AttributionConfig, EstimatorKind
from ._ledger import Ledger, atomic_save, load_checked, normalize_ids
from ._step import StepComputer, as_val_batches


#: optimizer -> ids of the step pre-hooks that belong to trackers (several trackers may share one
#: optimizer; their hooks only read). Weak keys: nothing is stored on the user's optimizer.
_TRACKER_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TrackerUsageError(RuntimeError):
    """The tracker was used in a way that would give silently wrong values."""


class NonFiniteStepWarning(UserWarning):
    """A step's gradients, validation loss or values were not finite; its values were skipped."""


class InRunShapley:
    """Accumulate per-sample in-run Shapley values over a training run, by dataset id.

    Wrap each forward+backward in ``with tracker.batch(ids):`` and call ``optimizer.step()`` as
    usual. Just before the update (an optimizer step pre-hook) the tracker linearizes the
    optimizer's real state, takes the validation gradient, and adds

        φ_z = −⟨J ⊙ ∇L_val, c_z⟩      (one column per validation batch)

    to the total of each sample's id. Values are float64 reductions of validation loss
    (positive = the sample helped).

    Args:
        model: the model being trained (samples must not interact: BatchNorm in train mode is refused).
        optimizer: its ``torch.optim`` optimizer (a registered linearization must exist).
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar, the same reduction as training;
            used for the validation loss (and for per-sample gradients when ``estimator="materialized"``).
        val_batch: ``(inputs, targets)`` or a list of K such batches (K value columns).
        linearization, val_point, estimator: see :class:`AttributionConfig`.
        record_steps: keep every step's per-sample values (``history()``).
        stream: contract each layer during the backward pass, as soon as its gradient is final,
            and release its captured activations there: peak memory as in plain training. The
            values are the same as without it. Needs ``val_point="current"`` (∇L_val(θ_t) is
            taken when ``batch()`` is entered, before the forward), one ``batch`` context per
            step (no gradient accumulation), no gradient clipping, a single process, and an
            estimator other than ``"materialized"``; each is checked with a clear error.

    Gradient accumulation: several ``batch`` contexts before one ``step()`` are one step; their
    samples are valued together. Gradient clipping: ``clip_grad_norm_`` between backward and
    ``step()`` scales the whole gradient by c ≤ 1; the tracker measures c (gradient norm at step
    time over the norm at the end of the last ``batch`` context) and values samples under the
    clipped step, φ_z = −c ⟨J(c g_B) ⊙ ∇L_val, c_z⟩, i.e. with c held fixed. A non-uniform change
    of the gradient (``clip_grad_value_``, manual edits) is refused.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0) and None
        >>> model = nn.Linear(3, 2); opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        >>> loss_fn = nn.functional.cross_entropy
        >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
        >>> tracker = InRunShapley(model, opt, loss_fn, (x[:2], y[:2]))
        >>> with tracker.batch([10, 11, 12, 13]):
        ...     loss_fn(model(x[2:]), y[2:]).backward()
        >>> opt.step()
        >>> tracker.values().shape
        (4, 2)
        >>> tracker.close()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable,
        val_batch,
        *,
        linearization="secant",
        val_point="midpoint",
        estimator="ghost",
        record_steps: bool = False,
        stream: bool = False,
    ):
        self.config = AttributionConfig(linearization, val_point, estimator)
        self.stream = bool(stream)
        if self.stream and self.config.val_point is not ValPoint.CURRENT:
            raise ValueError(
                f"stream=True contracts during the backward pass, before the step's update is known, so it needs "
                f"val_point='current' (got {self.config.val_point.value!r}); pass val_point='current' or stream=False"
            )
        if self.stream and self.config.estimator is EstimatorKind.MATERIALIZED:
            raise ValueError("stream=True needs estimator='ghost' or 'ghost-factored'; 'materialized' builds per-sample gradients after the backward")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.val_batches, self._single_target = as_val_batches(val_batch)
        _check_optimizer_owns_model(model, optimizer)
        module, self._world_size = _unwrap_distributed(model)
        if self.stream and self._world_size > 1:
            raise ValueError(
                "stream=True is not available under DistributedDataParallel: the gradient is averaged over ranks "
                "after the layer hooks run, so J cannot be evaluated there; use stream=False"
            )
        self._computer = StepComputer(module, loss_fn, self.val_batches, self.config)
        _check_val_batches_fit(module, loss_fn, self.val_batches)
        self._ledger = Ledger(len(self.val_batches), record_steps)
        self._pending_ids: list[Hashable] = []
        self._grad_norms_at_exit: dict[torch.Tensor, float] | None = None
        self._in_batch = False
        self._hook = optimizer.register_step_pre_hook(self._before_step)
        _TRACKER_HOOKS.setdefault(optimizer, set()).add(self._hook.id)
        self._closed = False

    # ------------------------------------------------------------------ the training-loop API
    @contextlib.contextmanager
    def batch(self, ids):
        """Capture the forward and backward of one (micro-)batch whose samples have ``ids``.

        Args:
            ids: one hashable id per sample, in batch order (a list, or a 1-D integer tensor).
        Raises:
            TrackerUsageError: nested contexts, or a closed tracker.
            ValueError: the captured batch size differs from ``len(ids)``.
        """
        if self._closed:
            raise TrackerUsageError("this InRunShapley was closed; create a new tracker")
        if self._in_batch:
            raise TrackerUsageError("tracker.batch() contexts cannot be nested")
        ids = normalize_ids(ids)
        self._check_no_missed_step()
        if self.stream:
            if self._pending_ids:
                raise TrackerUsageError(
                    "stream=True values one batch context per optimizer step, but this step already has "
                    f"{len(self._pending_ids)} samples (gradient accumulation); use stream=False to accumulate"
                )
            self._computer.begin_stream(self.optimizer)
        self._in_batch = True
        try:
            with self._computer.capture():
                yield self
        except BaseException:
            if self.stream:
                self._computer.reset()
            raise
        finally:
            self._in_batch = False
        self._pending_ids.extend(ids)
        self._grad_norms_at_exit = {
            p: _grad_norm(p) for p in self._computer.params() if p.grad is not None
        }

    def _check_no_missed_step(self) -> None:
        """Refuse a new batch when the previous one's gradients were discarded without a tracked step.

        Between two ``batch`` contexts of one gradient-accumulation step the gradients stay as they
        were. If they changed (typically ``zero_grad()``) while ids are still pending, a step happened
        without this tracker's hook: the optimizer was replaced, or ``step()`` was skipped.
        """
        if not self._pending_ids or self._grad_norms_at_exit is None:
            return
        for p, before in self._grad_norms_at_exit.items():
            now = None if p.grad is None else _grad_norm(p)
            if now != before:
                raise TrackerUsageError(
                    f"{len(self._pending_ids)} samples of earlier tracker.batch() contexts were never valued: their "
                    "gradients were discarded without a step of the tracked optimizer. Either the optimizer was "
                    "replaced (create a new InRunShapley for it, or InRunShapley.load(path, model, new_optimizer, ...)) "
                    "or step() was skipped; call optimizer.step() after the batch contexts of each step."
                )

    def _check_hook_is_last(self, optimizer) -> None:
        """Refuse step pre-hooks registered after ours: they could change the gradient after valuation."""
        ours = _TRACKER_HOOKS.get(optimizer, set())
        later = [k for k in optimizer._optimizer_step_pre_hooks if k > self._hook.id and k not in ours]
        if later:
            raise TrackerUsageError(
                f"{len(later)} optimizer step pre-hook(s) were registered after InRunShapley's; they run after it "
                "and may change the gradients or state that the values were computed from. Register other "
                "libraries' step pre-hooks before creating the tracker (or close and re-create the tracker "
                "after registering them)."
            )

    def _before_step(self, optimizer, args, kwargs):
        if optimizer is not self.optimizer:  # pragma: no cover - torch calls the hook of its own optimizer
            return
        self._check_hook_is_last(optimizer)
        if not self._pending_ids:
            raise TrackerUsageError(
                "optimizer.step() was called without a `with tracker.batch(ids):` context around the "
                "forward and backward of its batch, so the step's samples are unknown. Wrap every "
                "forward+backward in tracker.batch(ids), or call tracker.close() to stop tracking."
            )
        ids, self._pending_ids = self._pending_ids, []
        if not all(torch.isfinite(p.grad).all() for p in self._computer.params() if p.grad is not None):
            self._computer.reset()
            self._skip("non-finite gradients (NaN/inf)")
            return
        scale = self._clip_factor()
        if self.stream and scale != 1.0:
            self._computer.reset()
            raise TrackerUsageError(
                f"the gradients were rescaled by {scale:.6g} between the end of tracker.batch() and optimizer.step() "
                "(clip_grad_norm_ clipped them); stream=True evaluated J during the backward at the unclipped "
                "gradient. Use stream=False to value clipped steps"
            )
        try:
            values = self._computer.step_values(optimizer, grad_scale=scale)
        finally:
            self._computer.reset()
        if values.shape[0] != len(ids):
            raise ValueError(
                f"the step's captured batches hold {values.shape[0]} samples but {len(ids)} ids were given; "
                "pass exactly one id per sample to tracker.batch(ids)"
            )
        if self._world_size > 1:
            # DDP averages gradients over ranks: this rank's samples contribute c_z / world_size.
            values = values / self._world_size
        if not torch.isfinite(values).all():
            self._skip("non-finite values (NaN/inf in the validation loss or its gradient)")
            return
        self._ledger.add(ids, values)

    def _skip(self, reason: str) -> None:
        warnings.warn(f"step {self._ledger.steps}: {reason}; this step's values were skipped", NonFiniteStepWarning)
        self._ledger.skip(reason)

    def _clip_factor(self) -> float:
        """c such that param.grad = c · (gradient at the end of the last batch context)."""
        ratios = []
        for p, before in (self._grad_norms_at_exit or {}).items():
            if p.grad is None:
                continue
            now = _grad_norm(p)
            if before == 0.0:
                if now != 0.0:
                    ratios.append(math.inf)
                continue
            ratios.append(now / before)
        if not ratios:
            return 1.0
        c = ratios[0]
        if any(not math.isclose(r, c, rel_tol=1e-5, abs_tol=1e-12) for r in ratios):
            raise TrackerUsageError(
                "the gradients were changed non-uniformly between the end of tracker.batch() and "
                f"optimizer.step() (per-parameter scale factors from {min(ratios):.4g} to {max(ratios):.4g}). "
                "Only a global rescaling such as clip_grad_norm_ can be attributed; do gradient edits "
                "inside the batch context or use clip_grad_norm_ instead of clip_grad_value_."
            )
        return c

    # ------------------------------------------------------------------ results
    def _gathered(self) -> Ledger:
        """This rank's ledger, or under DistributedDataParallel every rank's merged (a collective call)."""
        if self._world_size == 1:
            return self._ledger
        import torch.distributed as dist

        states = [None] * self._world_size
        dist.all_gather_object(states, self._ledger.state_dict(self.config.as_dict()))
        merged = Ledger(self._ledger.num_targets, self._ledger.record_steps)
        for state in states:
            merged.merge(Ledger.from_state_dict(state))
        merged.steps = self._ledger.steps
        return merged

    def values(self) -> pd.DataFrame:
        """Totals by id: ``value`` (or ``value_0`` … ``value_{K-1}``) and ``steps_seen``.

        value(z) = Σ_t φ_z^(t) over the steps t whose batches held id z (float64); the frame is
        indexed by id, one row per id seen, in order of first appearance. Under
        DistributedDataParallel every rank must call it (it gathers all ranks' values).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> torch.manual_seed(0) and None
            >>> model = nn.Linear(3, 2); opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
            >>> tracker = InRunShapley(model, opt, nn.functional.cross_entropy, (x[:1], y[:1]))
            >>> for ids in ([1, 2], [2, 3]):       # id 2 is seen twice
            ...     opt.zero_grad()
            ...     with tracker.batch(ids):
            ...         nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
            ...     opt.step()
            >>> frame = tracker.values()
            >>> list(frame.index), list(frame["steps_seen"])
            ([1, 2, 3], [1, 2, 1])
        """
        return self._gathered().values_frame()

    def history(self) -> pd.DataFrame:
        """The per-step long table (``step``, ``position``, ``id``, value columns); needs ``record_steps=True``.

        One row per (step, sample): φ_z^(t) before summation, so that
        ``history().groupby("id")["value"].sum()`` equals ``values()["value"]``.

        Raises:
            TrackerUsageError: the tracker was created without ``record_steps=True``.
        Example:
            >>> import torch
            >>> from torch import nn
            >>> model = nn.Linear(3, 2); opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> x, y = torch.ones(4, 3), torch.tensor([0, 1, 0, 1])
            >>> tracker = InRunShapley(model, opt, nn.functional.cross_entropy, (x[:1], y[:1]), record_steps=True)
            >>> for _ in range(2):
            ...     opt.zero_grad()
            ...     with tracker.batch([7, 8, 9]):
            ...         nn.functional.cross_entropy(model(x[1:]), y[1:]).backward()
            ...     opt.step()
            >>> h = tracker.history()
            >>> len(h), bool((h.groupby("id")["value"].sum() - tracker.values()["value"]).abs().max() < 1e-12)
            (6, True)
        """
        if not self._ledger.record_steps:
            raise TrackerUsageError("history() needs InRunShapley(..., record_steps=True)")
        return self._gathered().history_frame()

    @property
    def steps(self) -> int:
        """Optimizer steps seen so far (including skipped ones)."""
        return self._ledger.steps

    @property
    def skipped_steps(self) -> list[tuple[int, str]]:
        """``(step, reason)`` for every step whose values were not added."""
        return list(self._ledger.skipped)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write totals, counts, history and configuration atomically to ``path``.

        The file is written to a temporary name and renamed over ``path``, so an interruption
        leaves the previous save intact. Resume with :meth:`load`.

        Example:
            >>> import tempfile, os, torch
            >>> from torch import nn
            >>> model = nn.Linear(3, 2); opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            >>> x, y = torch.ones(4, 3), torch.tensor([0, 1, 0, 1])
            >>> tracker = InRunShapley(model, opt, nn.functional.cross_entropy, (x[:1], y[:1]))
            >>> with tracker.batch([1, 2, 3]):
            ...     nn.functional.cross_entropy(model(x[1:]), y[1:]).backward()
            >>> opt.step()
            >>> path = os.path.join(tempfile.mkdtemp(), "values.pt")
            >>> tracker.save(path); tracker.close()
            >>> resumed = InRunShapley.load(path, model, opt, nn.functional.cross_entropy, (x[:1], y[:1]))
            >>> resumed.steps, resumed.values().equals(tracker.values())
            (1, True)
            >>> resumed.close()
        """
        atomic_save(self._ledger.state_dict(self.config.as_dict()), path)

    @classmethod
    def load(cls, path: str | os.PathLike, model, optimizer, loss_fn, val_batch, *, stream: bool = False) -> InRunShapley:
        """A tracker for ``model``/``optimizer`` that continues the totals saved at ``path``.

        The configuration (linearization, val_point, estimator, record_steps) is the saved one;
        ``stream`` (which does not change the values) is chosen anew.

        Raises:
            FileNotFoundError: nothing at ``path``.
            LedgerFileError: a corrupted file, another format, or another format version.
            ValueError: ``val_batch`` has a different number of targets than the saved run.
        """
        state = load_checked(path)
        tracker = cls(model, optimizer, loss_fn, val_batch, **state["config"], record_steps=state["record_steps"], stream=stream)
        if state["num_targets"] is not None and state["num_targets"] != len(tracker.val_batches):
            tracker.close()
            raise ValueError(
                f"the saved run has {state['num_targets']} validation targets but val_batch has "
                f"{len(tracker.val_batches)}; pass the same validation batches to resume"
            )
        tracker._ledger = Ledger.from_state_dict(state)
        return tracker

    def close(self) -> None:
        """Remove the optimizer hook; the tracker keeps its values but records nothing more."""
        if not self._closed:
            _TRACKER_HOOKS.get(self.optimizer, set()).discard(self._hook.id)
            self._hook.remove()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _grad_norm(p: torch.Tensor) -> float:
    """‖p.grad‖ in float64 (the clip-factor and missed-step checks compare these)."""
    return float(p.grad.detach().double().norm())


def _unwrap_distributed(model: nn.Module) -> tuple[nn.Module, int]:
    """The module DDP wraps (hooks and the validation pass use it) and the world size (1 without DDP)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        import torch.distributed as dist

        return model.module, dist.get_world_size(model.process_group)
    return model, 1


def _check_val_batches_fit(model: nn.Module, loss_fn: Callable, val_batches: list[tuple]) -> None:
    """Evaluate each validation batch once (no grad) so that a batch the model cannot take fails now, clearly."""
    with torch.no_grad():
        for k, (inputs, targets) in enumerate(val_batches):
            try:
                loss = loss_fn(model(inputs), targets)
            except Exception as exc:
                raise ValueError(
                    f"validation batch {k} does not fit the model or loss_fn: {type(exc).__name__}: {exc}. "
                    "Pass (inputs, targets) exactly as used for training, with loss_fn(model(inputs), targets)"
                ) from exc
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise ValueError(
                    f"loss_fn on validation batch {k} returned {type(loss).__name__}"
                    f"{'' if not isinstance(loss, torch.Tensor) else ' of shape ' + str(tuple(loss.shape))}; "
                    "it must return a scalar tensor (use a mean or sum reduction)"
                )


def _check_optimizer_owns_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_params = {id(p) for p in model.parameters()}
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in model_params:
                raise ValueError(
                    f"optimizer param group {i} holds a parameter of shape {tuple(p.shape)} that is not a "
                    "parameter of the model; pass the optimizer that trains this model"
                )

"""``InRunShapley``: in-run values for an unchanged training loop."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
import weakref
from collections.abc import Callable, Hashable

import pandas as pd
import torch
from torch import nn

import estimators
import optimizers
from estimators import IncompleteGradientError

from estimators._sharded import reshard
from optimizers._fused import fused_kernels
from optimizers._fused import resolve as resolve_compile

from ._config import AttributionConfig, EstimatorKind
from ._distributed import attach_stream_hook, data_parallel, refuse_under_fsdp
from ._audit import timed_audit
from ._momentum import MomentumCredit
from ._ledger import Ledger, atomic_save, check_same_validation, load_checked, normalize_ids, val_fingerprint
from ._step import _STREAMABLE_POINTS, DEFAULT_NONLINEARITY_THRESHOLD, StepComputer, as_val_batches, warn_unstepped


#: optimizer -> ids of the step pre-hooks that belong to trackers (several trackers may share one
#: optimizer; their hooks only read). Weak keys: nothing is stored on the user's optimizer.
_TRACKER_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TrackerUsageError(RuntimeError):
    """The tracker was used in a way that would give silently wrong values."""


class NonFiniteStepWarning(UserWarning):
    """A step's gradients, validation loss or values were not finite; its values were skipped."""


class AuditWarning(UserWarning):
    """The online audit found values far from the real optimizer's leave-one-out (see ``InRunShapley.audit``)."""


class PoorLinearizationWarning(UserWarning):
    """A step's update is far from linear in g and the exact-update route could not be taken."""


class SkippedStepWarning(UserWarning):
    """A step's captured samples were discarded because the optimizer did not take the step."""


class InRunShapley:
    """Accumulate per-sample in-run Shapley values over a training run, by dataset id.

    Wrap each forward+backward in ``with tracker.batch(ids):`` and call ``optimizer.step()`` as
    usual. Just before the update (an optimizer step pre-hook) the tracker linearizes the
    optimizer's real state, takes the validation gradient, and computes

        φ_z = −⟨J ⊙ ∇L_val, c_z⟩      (one column per validation batch)

    for each sample of the step; once the optimizer has stepped (a step post-hook) the values
    are added to the total of each sample's id. Values are float64 reductions of validation
    loss (positive = the sample helped).

    Every step is checked: the captured per-sample contributions must add up to the gradient
    the optimizer uses (``⟨P, param.grad⟩ = c · Σ_z ⟨P, c_z⟩`` for every parameter, P = J ⊙
    ∇L_val). A ratio c common to all parameters is a uniform rescale (``clip_grad_norm_``,
    ``GradScaler.unscale_``, inside or after the block) and is valued exactly as part of the
    step, φ_z = −c ⟨J(c g_B) ⊙ ∇L_val, c_z⟩ with c held fixed; anything else (``clip_grad_value_``,
    gradient hooks, a backward outside the block, gradient penalties) is refused with a
    :class:`TrackerUsageError` naming the parameter.

    Attaching the tracker leaves training bit-identical: its validation passes run in eval mode
    (``val_mode``) with the global RNG, buffers and ``max_norm`` embedding rows restored after
    them.

    Args:
        model: the model being trained (samples must not interact: BatchNorm with batch
            statistics is refused).
        optimizer: its ``torch.optim`` optimizer (a registered linearization must exist), or a
            list of optimizers that each hold part of the parameters (Muon on the matrices and
            AdamW on the rest); the first of them to step values the whole step, before any of
            them has moved. A trainable parameter none holds counts as not moving
            (:class:`UnsteppedParameterWarning` at construction).
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar, the same reduction as training;
            used for the validation loss (and for per-sample gradients when ``estimator="materialized"``).
            It must be additive over samples (checked on the validation batch: a loss with
            in-batch negatives is refused); normalisers such as a token count are held fixed.
        val_batch: ``(inputs, targets)`` or a list of K such batches (K value columns).
        linearization, val_point, estimator: see :class:`AttributionConfig`.
        record_steps: keep every step's per-sample values (``history()``).
        stream: contract each layer during the backward pass, as soon as its gradient is final,
            and release its captured activations there: peak memory as in plain training. The
            values are the same as without it. Needs ``val_point="current"`` or ``"predicted"``
            (∇L_val is taken when ``batch()`` is entered, before the forward), one ``batch`` context per
            step (no gradient accumulation), no change of the gradient after the backward (no
            clipping that clips, no loss-scale unscaling), a single process,
            DistributedDataParallel (each bucket is contracted in a DDP communication hook at
            its averaged gradient; not a DDP model with a hook of its own, no backward under
            ``no_sync()``) or FSDP2 (each parameter is contracted when ``fully_shard``'s
            reduce-scatter has given it its averaged shard, with the layer's P gathered there),
            and an estimator other than ``"materialized"``; each is checked with a clear error.
        compile: evaluate the optimizer's per-step formulas (Adam's secant J and the shift to
            the validation point) as fused kernels compiled with ``torch.compile`` (one pass over
            each parameter instead of one per operation; :mod:`optimizers._fused`), for tensors
            of at least 32,768 elements. The values agree with the eager formulas to rounding.
            ``"auto"`` (default) compiles on a GPU, and on a CPU for models of at least 2**22
            trainable elements, where it pays for the compiler's fixed cost (seconds for the
            first compilation, cached on disk after; about 115 MB of resident memory);
            ``True``/``False`` force it. Where compiling fails (no C++ compiler), the eager
            formulas run, with a warning.
        val_mode: ``"eval"`` (default): validation passes run with every module in eval mode
            (dropout off, running statistics), the loss users measure; ``"train"`` keeps the
            modules' own modes (the RNG is restored after each pass either way).
        strict: refuse parameters of layers no ghost rule covers (``UncoveredParameterError``)
            instead of the per-module ``torch.func`` fallback (which warns once, with a
            :class:`FallbackWarning`, naming the modules).
        modules: qualified module names (``model.named_modules()``) whose parameters are
            attributed, each with its subtree; the values are then the *partial* values
            −Σ_{p in modules} ⟨J ⊙ ∇L_val, c_z⟩ (other parameters still move and still set the
            validation point; they get no hooks, so tracking is cheaper). ``None``: every
            trainable parameter.
        route: ``"auto"`` (default): a step whose update is far from linear in g — the update's
            nonlinearity ν (:func:`estimators.update_nonlinearity`: 0 for an affine update, 1 for
            a sign-like one such as Adam's first step) above ``nonlinearity_threshold``, or an
            update that jumps at g = 0 (Muon's first step) — is valued by the exact-update game
            instead of a slope (``linearization="exact"``, or ``"exact-loo"`` when the
            linearization is the tangent); ``"linear"``: always the slope. Only the tangent and
            the secant are switched (the SGD proxy is kept as asked). Each step's route and ν are
            in :meth:`step_info`. Under DistributedDataParallel or ``stream=True`` the route cannot
            switch (per-sample factors are not all at hand) and a :class:`PoorLinearizationWarning`
            names the steps the slope fits poorly.
        nonlinearity_threshold: ν above which ``route="auto"`` takes the exact route (default
            0.9: only the sign-like first steps; see docs/results.md, "Early steps", for how it was
            chosen).
        exact_permutations: sampled orders of the exact route's Shapley values (antithetic
            pairs; their standard errors are in :meth:`step_info`). Cost per exact step: this
            many times n + 1 update evaluations of every parameter.
        seed: seed of the tracker's own random source (the exact route's orders); the global RNG
            is never used.
        credit: ``"step"`` (default): each step's game, whose empty coalition keeps the update
            carried by momentum from earlier steps (Δ(0)) and credits it to nobody; under
            SGD-momentum or Adam a run's values then add up to a fraction (about 1 − β1) of its
            improvement. ``"momentum"``: that carried part of every later update is credited, to
            first order, to the samples whose gradients are in the buffer (see docs/theory.md),
            so a run's values add up to its first-order improvement; per-step values are
            unchanged, the carried credits arrive at later steps (rows with ``origin < step`` in
            :meth:`history`). Needs a linearization that declares its momentum buffer (SGD, Adam,
            AdamW, NAdam, RAdam, Adamax; rules without momentum pass through) and ``stream=False``.
        audit_every, audit_samples, audit_threshold: every ``audit_every`` steps (``None``: never),
            the real optimizer's leave-one-out of ``audit_samples`` random samples of the step (the
            oracle: a copy of the model and optimizers stepped with g_B − c_z, the validation loss
            measured after; no linearization) is compared with their values; :meth:`audit` returns
            the records (step, route, Pearson R, relative error, seconds) and an
            :class:`AuditWarning` is raised when R falls below ``audit_threshold``. Cost per
            audited step: ``audit_samples`` + 1 optimizer steps and validation forwards on a copy
            of the model, plus the copy itself. Single process, ``stream=False``.
        momentum_window: steps after its own during which a sample's carried credit is exact;
            the captured factors of that many steps are kept (:attr:`momentum_bytes`), and the
            remaining geometric tail is credited when the window closes, assuming later steps
            look like the last one of the window.

    Gradient accumulation: several ``batch`` contexts before one ``step()`` are one step; their
    samples are valued together. ``optimizer.step(closure)`` is supported when the closure
    holds the ``with tracker.batch(ids):`` block. A step that the optimizer does not take
    (``GradScaler`` skips steps with non-finite gradients) is detected at the next ``batch``
    and discarded with a :class:`SkippedStepWarning`; :meth:`discard` drops a step on purpose.

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
        compile: bool | str = "auto",
        val_mode: str = "eval",
        strict: bool = False,
        modules=None,
        route: str = "auto",
        nonlinearity_threshold: float | None = None,
        exact_permutations: int = 32,
        seed: int = 0,
        credit: str = "step",
        momentum_window: int = 16,
        audit_every: int | None = None,
        audit_samples: int = 8,
        audit_threshold: float = 0.9,
    ):
        self.config = AttributionConfig(linearization, val_point, estimator)
        self.stream = bool(stream)
        #: whether the fused kernels are compiled (``compile`` resolved for this model)
        self.compile = resolve_compile(compile, [p for p in model.parameters() if p.requires_grad])
        if route not in ("auto", "linear"):
            raise ValueError(f"route={route!r} is not accepted; use 'auto' (default) or 'linear'")
        if nonlinearity_threshold is None:
            nonlinearity_threshold = DEFAULT_NONLINEARITY_THRESHOLD
        if not float(nonlinearity_threshold) >= 0:
            raise ValueError(f"nonlinearity_threshold={nonlinearity_threshold!r} must be a number >= 0")
        if int(exact_permutations) < 1:
            raise ValueError(f"exact_permutations={exact_permutations!r} must be at least 1")
        if self.stream and self.config.linearization.is_exact:
            raise ValueError(
                f"stream=True contracts during the backward pass and releases the per-sample factors that "
                f"linearization={self.config.linearization.value!r} needs; use stream=False"
            )
        if credit not in ("step", "momentum"):
            raise ValueError(f"credit={credit!r} is not accepted; use 'step' (default) or 'momentum'")
        if credit == "momentum" and self.stream:
            raise ValueError(
                "credit='momentum' keeps each step's captured factors for later steps, which stream=True releases "
                "during the backward pass; use stream=False"
            )
        if int(momentum_window) < 1:
            raise ValueError(f"momentum_window={momentum_window!r} must be at least 1")
        if audit_every is not None:
            if int(audit_every) < 1:
                raise ValueError(f"audit_every={audit_every!r} must be a number of steps >= 1 (or None: no audit)")
            if int(audit_samples) < 2:
                raise ValueError(f"audit_samples={audit_samples!r} must be at least 2 (a correlation needs two samples)")
            if self.stream:
                raise ValueError("the audit needs the captured per-sample factors, which stream=True releases; use stream=False")
        #: the tracker's options beyond the configuration, saved with the values (see :meth:`save`)
        self.options = {
            "route": route, "nonlinearity_threshold": float(nonlinearity_threshold),
            "exact_permutations": int(exact_permutations), "seed": int(seed),
            "credit": credit, "momentum_window": int(momentum_window),
        }
        self._audit = None if audit_every is None else (int(audit_every), int(audit_samples), float(audit_threshold))
        self._staged_audit = None
        if val_mode not in ("eval", "train"):
            raise ValueError(f"val_mode={val_mode!r} is not accepted; use 'eval' (default) or 'train'")
        self.val_mode = val_mode
        if self.stream and self.config.val_point not in _STREAMABLE_POINTS:
            raise ValueError(
                f"stream=True contracts during the backward pass, before the step's update is known, so it needs "
                f"val_point='current' or 'predicted' (got {self.config.val_point.value!r}); pass one of them or stream=False"
            )
        if self.stream and self.config.estimator is EstimatorKind.MATERIALIZED:
            raise ValueError("stream=True needs estimator='ghost' or 'ghost-factored'; 'materialized' builds per-sample gradients after the backward")
        self.model = model
        #: the optimizer as given (one, or a list); ``optimizers`` is always a list
        self.optimizer = optimizer
        self.optimizers = optimizers.as_optimizer_list(optimizer)
        self.loss_fn = loss_fn
        self.val_batches, self._single_target = as_val_batches(val_batch)
        for opt in self.optimizers:
            _check_optimizer_owns_model(model, opt)
        #: DDP, FSDP2 (fully_shard) or a single process (see attribution/_distributed.py)
        self._parallel = data_parallel(model)
        module, self._world_size = self._parallel.module, self._parallel.world_size
        self._computer = StepComputer(
            module, loss_fn, self.val_batches, self.config, val_train_mode=val_mode == "train", strict=strict, modules=modules
        )
        if self._parallel.sharded:
            refuse_under_fsdp(
                estimator=self.config.estimator.value, stream=self.stream, credit=credit, optimizers_=self.optimizers,
                engine=self._computer.engine,
            )
            self._computer.sharded = True
        self._computer.route = route
        self._computer.nonlinearity_threshold = float(nonlinearity_threshold)
        self._computer.exact_permutations = int(exact_permutations)
        self._warned_poor = False
        self._momentum = None
        if credit == "momentum":
            _check_momentum_credit(self.optimizers)
            self._momentum = MomentumCredit(int(momentum_window), self._computer.compute_dtype)
            self._computer.keep_zero_updates = True
        self._staged_credit = None
        _warn_fallback(self._computer.engine)
        warn_unstepped(module, self.optimizers)
        if self._world_size > 1:
            if self._audit is not None:
                raise ValueError(
                    "the audit needs every sample's contribution in one process; under DistributedDataParallel each "
                    "rank holds only its own. Audit a single-process run, or leave audit_every=None"
                )
            self._computer.all_reduce, self._computer.world_size = self._parallel.all_reduce, self._world_size
        _check_val_batches_fit(self._computer)
        if self._parallel.sharded:
            reshard(module)  # the forward above left FSDP2's root unsharded
        self._ledger = Ledger(len(self.val_batches), record_steps)
        self._pending_ids: list[Hashable] = []
        #: (number of ids, first captured pass, end of its passes) of each batch context of this step
        self._blocks: list[tuple[int, int, int]] = []
        self._grad_marks: dict[torch.Tensor, tuple[int, int]] = {}
        self._pending_nonfinite = False
        self._in_batch = False
        #: values of a step computed before the update, added to the ledger once the step was taken
        self._staged: tuple[list[Hashable], torch.Tensor | None, str | None] | None = None
        #: version counters of trainable parameters the optimizer does not hold (see _check_outside_params)
        self._outside_marks: dict[torch.Tensor, int] = {}
        #: optimizers of a valued step that have not stepped yet (several optimizers per run)
        self._awaiting: list[torch.optim.Optimizer] = []
        # The optimizers' hooks hold the tracker weakly: a tracker nobody references any more (a
        # notebook cell run twice) detaches itself instead of refusing every later step.
        self._hooks, self._finalizers = {}, []
        #: under DDP with stream=True: the communication hook that contracts each bucket at its average
        self._stream_hook = None
        if self.stream and self._parallel.kind == "ddp":
            engine = self._computer.engine
            self._stream_hook = attach_stream_hook(model, engine)
            self._finalizers.append(weakref.finalize(self, self._stream_hook.detach, engine))
        for opt in self.optimizers:
            pre = opt.register_step_pre_hook(_weak_hook(self, "_before_step"))
            post = opt.register_step_post_hook(_weak_hook(self, "_after_step"))
            _TRACKER_HOOKS.setdefault(opt, set()).add(pre.id)
            self._hooks[opt] = pre
            self._finalizers.append(weakref.finalize(self, _detach, weakref.ref(opt), pre, post))
        self._closed = False

    # ------------------------------------------------------------------ the training-loop API
    @contextlib.contextmanager
    def batch(self, ids):
        """Capture the forward and backward of one (micro-)batch whose samples have ``ids``.

        Args:
            ids: one hashable id per sample, in batch order (a list, or a 1-D integer tensor).
        Raises:
            TrackerUsageError: nested contexts, a closed tracker, or samples of an earlier
                block whose gradients were discarded without a step.
            ValueError: no ids, or a DistributedDataParallel model under ``join()`` (uneven
                inputs; refused on every rank alike).
            TypeError: ids of an unsupported type (see ``normalize_ids``).

        An exception inside the block discards what the block captured (its ids are not
        added), so a loop that catches it can go on.
        """
        if self._closed:
            raise TrackerUsageError("this InRunShapley was closed; create a new tracker")
        if self._in_batch:
            raise TrackerUsageError("tracker.batch() contexts cannot be nested")
        ids = normalize_ids(ids)
        self._ledger.check_ids(ids, pending=self._pending_ids)
        if not ids:
            raise ValueError("tracker.batch(ids) got no ids: give one id per sample of the batch (an empty batch has nothing to value)")
        self._parallel.refuse_join()
        self._drop_untaken_step()
        self._check_no_missed_step()
        self._awaiting = []
        self._check_outside_params()
        if self.stream:
            if self._pending_ids:
                raise TrackerUsageError(
                    "stream=True values one batch context per optimizer step, but this step already has "
                    f"{len(self._pending_ids)} samples (gradient accumulation); use stream=False to accumulate"
                )
            if self._stream_hook is not None:
                self._stream_hook.reset()
            self._computer.begin_stream(self._optimizer_arg, own_hooks=self._stream_hook is None)
        start = self._computer.passes_captured()
        self._in_batch = True
        try:
            with self._computer.capture(), fused_kernels(self.compile):
                yield self
            if self._stream_hook is not None:
                _check_synced(self._stream_hook, self._computer.params())
            elif self.stream and self._parallel.sharded:
                _check_reduce_scattered(self._computer, start)
        except BaseException:
            # Forget this block's capture; earlier blocks of the step stay pending.
            self._computer.drop_passes(start)
            if self.stream:
                self._computer.reset()
            raise
        finally:
            self._in_batch = False
        self._blocks.append((len(ids), start, self._computer.passes_captured()))
        self._pending_ids.extend(ids)
        params = [p for p in self._computer.params() if p.grad is not None]
        self._grad_marks = {p: _grad_mark(p) for p in params}
        # Under FSDP2 each rank sees its shards only: the ranks agree (a collective).
        self._pending_nonfinite = not self._parallel.all_finite([p.grad for p in params], _all_finite)

    def discard(self) -> None:
        """Drop the samples captured since the last step without valuing them (a step skipped on purpose).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> model = nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> x, y = torch.ones(3, 2), torch.zeros(3, 1)
            >>> tracker = InRunShapley(model, opt, nn.functional.mse_loss, (x[:1], y[:1]))
            >>> with tracker.batch([1, 2]):
            ...     nn.functional.mse_loss(model(x[1:]), y[1:]).backward()
            >>> tracker.discard(); opt.zero_grad()      # this step is not taken
            >>> tracker.steps, len(tracker.values())
            (0, 0)
            >>> tracker.close()
        """
        self._clear_pending()
        self._staged = None

    def _clear_pending(self) -> None:
        self._pending_ids, self._blocks, self._grad_marks = [], [], {}
        self._pending_nonfinite = False
        self._computer.reset()

    def _drop_untaken_step(self) -> None:
        """Values staged before a step whose update never ran (a later step pre-hook raised) are not counted."""
        if self._staged is not None:
            self._staged = None
            if self._awaiting:
                names = ", ".join(type(o).__name__ for o in self._awaiting)
                cause = (
                    f"the tracked optimizer(s) {names} did not step although the step was valued for all of them (call "
                    "every optimizer's step(), or tracker.discard() before skipping the step)"
                )
            else:
                cause = "optimizer.step() did not complete after this tracker valued it (another step pre-hook or the optimizer raised)"
            warnings.warn(
                f"step {self._ledger.steps}: {cause}; its values were not counted",
                SkippedStepWarning,
                stacklevel=3,
            )

    def _check_no_missed_step(self) -> None:
        """Handle a new batch when the previous one's gradients were discarded without a tracked step.

        Between two ``batch`` contexts of one gradient-accumulation step the gradients stay as they
        were. If they changed (typically ``zero_grad()``) while ids are still pending, a step happened
        without this tracker's hook: with non-finite gradients that is a step ``GradScaler`` skipped
        (discarded with a warning); otherwise the optimizer was replaced or ``step()`` skipped.
        """
        if not self._pending_ids or all(_grad_mark(p) == mark for p, mark in self._grad_marks.items()):
            return
        n = len(self._pending_ids)
        if self._pending_nonfinite:
            warnings.warn(
                f"step {self._ledger.steps}: the optimizer did not step (its gradients were not finite, so GradScaler "
                f"skipped it); the {n} samples captured for it were discarded",
                SkippedStepWarning,
                stacklevel=3,
            )
            self._ledger.skip("the optimizer did not step (non-finite gradients, e.g. a GradScaler overflow)")
            self._clear_pending()
            return
        self._clear_pending()
        raise TrackerUsageError(
            f"{n} samples of earlier tracker.batch() contexts were never valued: their gradients were discarded "
            "without a step of the tracked optimizer. Either the optimizer was replaced (create a new InRunShapley "
            "for it, or InRunShapley.load(path, model, new_optimizer, ...)), or step() was skipped on purpose: call "
            "tracker.discard() when you skip a step. (The pending samples were dropped; tracking goes on.)"
        )

    def _check_hook_is_last(self, optimizer) -> None:
        """Refuse step pre-hooks registered after ours: they could change the gradient after valuation."""
        ours = _TRACKER_HOOKS.get(optimizer, set())
        later = [k for k in optimizer._optimizer_step_pre_hooks if k > self._hooks[optimizer].id and k not in ours]
        if later:
            raise TrackerUsageError(
                f"{len(later)} optimizer step pre-hook(s) were registered after InRunShapley's; they run after it "
                "and may change the gradients or state that the values were computed from. Register other "
                "libraries' step pre-hooks before creating the tracker (or close and re-create the tracker "
                "after registering them)."
            )

    def _before_step(self, optimizer, args, kwargs):
        if optimizer not in self._hooks:  # pragma: no cover - torch calls the hook of its own optimizer
            return None
        # torch passes the optimizer itself as args[0]; a positional closure is args[1].
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if self._in_batch:
            raise TrackerUsageError(
                "optimizer.step() was called inside `with tracker.batch(ids):`; the block must end (its backward "
                "complete) before the step. Call step() after the block"
                + ("; with a closure, put the `with tracker.batch(ids):` block inside the closure" if callable(closure) else "")
            )
        if any(o is optimizer for o in self._awaiting) and not self._pending_ids:
            # Another optimizer of this tracker valued the step before any of them moved.
            self._awaiting = [o for o in self._awaiting if o is not optimizer]
            self._check_hook_is_last(optimizer)
            return None
        self._drop_untaken_step()
        if callable(closure) and len(self.optimizers) > 1:
            raise TrackerUsageError(
                "optimizer.step(closure) with several tracked optimizers: each step() would rerun the closure's "
                "forward and backward. Run the `with tracker.batch(ids):` block and backward first, then call each "
                "optimizer's step() without a closure"
            )
        if callable(closure):
            # The closure runs the forward and backward inside step(), before the update: value the
            # step when it returns.
            def valued_closure():
                loss = closure()
                self._value_step(optimizer)
                return loss

            if "closure" in kwargs:
                return args, {**kwargs, "closure": valued_closure}
            return (args[0], valued_closure, *args[2:]), kwargs
        self._value_step(optimizer)
        return None

    def _outside_params(self) -> list[torch.Tensor]:
        """Trainable parameters of the model that the tracked optimizer does not hold (valued as not moving)."""
        held = {id(p) for opt in self.optimizers for group in opt.param_groups for p in group["params"]}
        return [p for p in self._computer.params() if id(p) not in held]

    def _check_outside_params(self) -> None:
        """Refuse a parameter the tracked optimizer does not hold that changed since the last check.

        Such a parameter is valued as not moving (J = 0); if it changed, another optimizer steps it
        (Muon on the matrices and AdamW on the rest), and the values would silently leave its
        share of the step out.
        """
        marks = _version_marks(self._outside_params())
        moved = [p for p, v in self._outside_marks.items() if p in marks and marks[p] != v]
        self._outside_marks = marks
        if moved:
            names = {p: n for n, p in self.model.named_parameters()}
            shown = ", ".join(repr(names.get(p, "?")) for p in moved[:4]) + (f" and {len(moved) - 4} more" if len(moved) > 4 else "")
            raise TrackerUsageError(
                f"parameter(s) {shown} changed between steps although the tracked optimizer "
                f"({', '.join(type(o).__name__ for o in self.optimizers)}) does not hold them: another optimizer steps "
                "them (e.g. Muon on the weight matrices and AdamW on the rest). The tracker would value them as not "
                "moving and leave their share of every step out. Pass every optimizer of the run "
                "(InRunShapley(model, [muon, adamw], ...)), or freeze the others (requires_grad_(False)) while tracking"
            )

    @property
    def _optimizer_arg(self):
        """What the step computer is given: the optimizer, or the list of them."""
        return self.optimizers[0] if len(self.optimizers) == 1 else self.optimizers

    def _value_step(self, optimizer) -> None:
        with fused_kernels(self.compile):
            self._value_step_inner(optimizer)

    def _value_step_inner(self, optimizer) -> None:
        for opt in self.optimizers:  # every optimizer's later hooks run after the values are taken
            self._check_hook_is_last(opt)
        self._check_outside_params()
        if not self._pending_ids:
            others = len(_TRACKER_HOOKS.get(optimizer, ())) - 1
            raise TrackerUsageError(
                "optimizer.step() was called but no `with tracker.batch(ids):` block captured a batch since the last "
                "step, so the step's samples are unknown. Wrap every forward+backward in tracker.batch(ids) before "
                "step(), or call tracker.close() to stop tracking"
                + (
                    f". {others} other InRunShapley tracker(s) are attached to this optimizer: a batch wrapped in another "
                    "tracker's batch() is not seen by this one; close() trackers you no longer use"
                    if others > 0
                    else ""
                )
            )
        ids, blocks, marks = self._pending_ids, self._blocks, self._grad_marks
        self._pending_ids, self._blocks, self._grad_marks = [], [], {}
        self._awaiting = [o for o in self.optimizers if o is not optimizer]
        try:
            error = None
            try:
                self._check_blocks(blocks)
            except (TrackerUsageError, ValueError) as err:
                error = err
            if error is None and self.stream and self._world_size > 1:
                error = self._stream_refusal()
            # A refusal on one rank's data is every rank's, before the step's collectives start.
            self._parallel.agree(error)
            params = [p for p in self._computer.params() if p.grad is not None]
            # The gradients the last block left were checked at its end; only edited ones are read again
            # (no in-place edit turns finite values into inf/NaN without showing in the version counter,
            # save an overflow in GradScaler's unscale, which the values' own finiteness check catches).
            unchanged = len(marks) == len(params) and all(marks.get(p) == _grad_mark(p) for p in params)
            finite = not self._pending_nonfinite if unchanged else self._parallel.all_finite([p.grad for p in params], _all_finite)
            if not finite:
                self._staged = (ids, None, "non-finite gradients (NaN/inf)", None)
                return
            try:
                generator = torch.Generator().manual_seed(self.options["seed"] * 1_000_003 + self._ledger.steps)
                values = self._computer.step_values(self._optimizer_arg, generator=generator)
            except IncompleteGradientError as err:
                raise TrackerUsageError(f"step {self._ledger.steps}: {err}") from err
            self._staged_credit = self._staged_audit = None
            if self._audit is not None and self._ledger.steps % self._audit[0] == 0 and torch.isfinite(values).all():
                generator = torch.Generator().manual_seed(self.options["seed"] * 1_000_003 + self._ledger.steps + 500_009)
                self._staged_audit = timed_audit(
                    self._computer, self.optimizers, values, self._audit[1], generator, self._ledger.steps,
                    self._computer.last_route,
                )
            if self._momentum is not None and torch.isfinite(values).all():
                c = self._computer
                self._staged_credit = self._momentum.stage(
                    c.last_lin, c.last_moved, c.carry_validation_gradients(), c.grad_scale, c.engine.captured_terms(), ids,
                    self._ledger.steps, dtype=c.compute_dtype, buffers=_momentum_buffers(self.optimizers),
                )
        finally:
            self._computer.reset()
        if self._world_size > 1:
            # DDP averages gradients over ranks: this rank's samples contribute c_z / world_size.
            values = values / self._world_size
        if self._parallel.any_rank(not bool(torch.isfinite(values).all())):  # the ranks skip the step alike
            cause = getattr(self._computer, "nonfinite_cause", None) or "non-finite values"
            self._staged = (ids, None, f"non-finite values: {cause}", None)
            return
        info = self._step_info()
        self._staged = (ids, values, None, info)

    def _stream_refusal(self) -> BaseException | None:
        """Under DDP or FSDP2 with stream=True: what went wrong in this rank's hooks, or in the streamed step's conditions."""
        if self._stream_hook is not None and self._stream_hook.error is not None:
            return self._stream_hook.error
        try:
            self._computer.engine.check_stream()
        except IncompleteGradientError as err:
            return TrackerUsageError(f"step {self._ledger.steps}: {err}")
        except Exception as err:  # noqa: BLE001 - refused on every rank alike by agree()
            return err
        return None

    def _step_info(self) -> tuple[str, float | None, float | None]:
        """(route, ν, largest standard error) of the step just valued; warns once where the slope fits poorly."""
        c = self._computer
        nu = c.last_nonlinearity
        if c.last_route == "linear" and nu is not None and nu > c.nonlinearity_threshold and not self._warned_poor:
            self._warned_poor = True
            why = "stream=True released the per-sample factors" if self.stream else f"under {_ENGINE_NAME[self._parallel.kind]}"
            warnings.warn(
                f"step {self._ledger.steps}: the optimizer's update is far from linear in the gradient (nonlinearity "
                f"{nu:.3f} > {c.nonlinearity_threshold}), so the slope values of this step are unreliable, and the "
                f"exact-update route cannot be taken ({why}). Steps like it are marked in step_info(); use "
                "stream=False in a single process to value them exactly, or leave them out of the totals",
                PoorLinearizationWarning,
                stacklevel=4,
            )
        err = None if c.last_stderr is None else float(c.last_stderr.abs().max()) if c.last_stderr.numel() else 0.0
        return c.last_route, nu, err

    def _check_blocks(self, blocks) -> None:
        """Each batch context captured exactly one sample per id (else say what its model calls held)."""
        for b, (n_ids, start, end) in enumerate(blocks):
            sizes = self._computer.pass_sizes(start, end)
            if None in sizes or not sizes:
                raise TrackerUsageError(
                    f"tracker.batch() block {b + 1} of this step captured {len(sizes)} model call(s) but no backward "
                    "reached them; call loss.backward() inside the block (or before optimizer.step())"
                    if sizes
                    else f"tracker.batch() block {b + 1} of this step ran no forward pass of the tracked model; run the "
                    "model's forward and backward inside `with tracker.batch(ids):`"
                )
            if sum(sizes) != n_ids:
                calls = " + ".join(str(s) for s in sizes)
                hint = ""
                if len(sizes) > 1:
                    hint = (
                        f" The block called the model {len(sizes)} times; each call inside tracker.batch is a micro-batch "
                        "of its own, so pass one id per sample of every call (or call the model once per block)."
                    )
                elif sizes[0] % n_ids == 0 or n_ids % sizes[0] == 0:
                    hint = (
                        f" The tracked layers saw a leading dimension of {sizes[0]} for {n_ids} ids: the model may "
                        "flatten positions into the batch axis ([n*T, d]) or take sequence-first input ([T, n, d]); "
                        "the per-sample split needs batch-first tensors with one row per sample ([n, T, d])."
                    )
                raise ValueError(
                    f"the step's captured batches hold {sum(sizes)} samples but {n_ids} ids were given (block {b + 1}: "
                    f"model call(s) of {calls} samples); pass exactly one id per sample to tracker.batch(ids).{hint}"
                )

    def _after_step(self, optimizer, args, kwargs) -> None:
        if optimizer not in self._hooks or self._staged is None:  # pragma: no cover
            return
        if self._awaiting:  # several optimizers: the step is taken once the last of them has stepped
            return
        ids, values, reason, info = self._staged
        staged_credit, self._staged, self._staged_credit = self._staged_credit, None, None
        staged_audit, self._staged_audit = self._staged_audit, None
        if values is None:
            self._skip(reason)
            if self._momentum is not None and self._momentum.open:
                # The optimizer took the step, so its buffer decayed and took a gradient the window's
                # factors do not follow: the open steps are closed now with their tail estimate.
                for origin, origin_ids, credit in self._momentum.close():
                    self._ledger.credit(origin_ids, credit / self._world_size, origin=origin)
        else:
            self._ledger.add(ids, values, info=info)
            if staged_audit is not None:
                self._ledger.audits.append(dataclasses.astuple(staged_audit))
                if not staged_audit.pearson >= self._audit[2]:
                    warnings.warn(
                        f"step {staged_audit.step}: the audit's real-optimizer leave-one-out of {staged_audit.samples} "
                        f"samples correlates with their values at R = {staged_audit.pearson:.3f} < {self._audit[2]} "
                        f"(relative error {staged_audit.relative_error:.3f}, route {staged_audit.route!r}); see "
                        "tracker.audit(). "
                        + (
                            "The step took the exact-update route: its game is far from additive, where Shapley values "
                            "and leave-one-out differ by nature (linearization='exact-loo' values the marginals)"
                            if staged_audit.route != "linear"
                            else "Values of steps like it are unreliable: at sign-like steps use route='auto' (or "
                            "linearization='exact'), at large steps val_point='midpoint'"
                        ),
                        AuditWarning,
                        stacklevel=3,
                    )
            if staged_credit is not None:
                if staged_credit.replaced:
                    warnings.warn(
                        f"step {self._ledger.steps - 1}: the optimizer's momentum buffer was replaced since the last "
                        "step (optimizer.load_state_dict or a reset state), so credit='momentum' cannot follow the "
                        "samples in it: the steps still open in its window were credited their tail estimate now, "
                        "and the window restarts at this step",
                        UserWarning,
                        stacklevel=3,
                    )
                for origin, origin_ids, credit in self._momentum.commit(staged_credit):
                    # DDP averages gradients over ranks: this rank's samples are in the buffer as c_z / world_size.
                    self._ledger.credit(origin_ids, credit / self._world_size, origin=origin)
        self._outside_marks = _version_marks(self._outside_params())

    def _skip(self, reason: str) -> None:
        warnings.warn(f"step {self._ledger.steps}: {reason}; this step's values were skipped", NonFiniteStepWarning)
        self._ledger.skip(reason)

    @property
    def paths_taken(self) -> dict[str, str]:
        """Parameter name -> how its last step was contracted: ``"dense"``, ``"pairwise"``,
        ``"factored"``, ``"materialized"`` or ``"fallback"`` (the torch.func per-module path)."""
        return dict(self._computer.engine.paths_taken)

    @property
    def fallback_modules(self) -> list[str]:
        """Modules whose parameters use the torch.func fallback (no ghost rule covers them)."""
        return self._computer.engine.fallback_modules

    @property
    def momentum_bytes(self) -> int:
        """Bytes of captured factors ``credit="momentum"`` keeps for its open window (0 otherwise)."""
        return 0 if self._momentum is None else self._momentum.nbytes

    @property
    def last_grad_scale(self) -> float:
        """c of the last valued step: param.grad = c · Σ_z c_z (the clip factor, 1/loss scale; 1.0 if untouched)."""
        return self._computer.grad_scale

    # ------------------------------------------------------------------ results
    def _gathered(self, closed: bool = False) -> Ledger:
        """This rank's ledger, or under DistributedDataParallel every rank's merged (a collective call).

        ``closed``: with ``credit="momentum"``, a copy in which the steps still open in the window
        are credited their tail estimate (what :meth:`save` writes, so that a resumed run loses
        nothing); the live tracker keeps its window.
        """
        ledger = self._ledger
        if closed and self._momentum is not None and self._momentum.open:
            ledger = Ledger.from_state_dict(ledger.state_dict({}))
            for origin, ids, credit in self._momentum.tails():
                ledger.credit(ids, credit / self._world_size, origin=origin, step=ledger.steps - 1)
        if self._world_size == 1:
            return ledger
        import torch.distributed as dist

        states = [None] * self._world_size
        dist.all_gather_object(states, ledger.state_dict(self.config.as_dict()))
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

    def audit(self) -> pd.DataFrame:
        """The online audit's records: ``step``, ``route``, ``samples``, ``pearson``, ``relative_error``, ``seconds``.

        One row per audited step (``audit_every``): the values of ``samples`` random samples of
        the step against the real optimizer's leave-one-out of each (Pearson R, relative L2
        error ‖φ − LOO‖ / ‖LOO‖ of the first target), and the audit's cost in seconds.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> torch.manual_seed(0) and None
            >>> model = nn.Linear(3, 2).double(); opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.tensor([0, 1] * 5)
            >>> tracker = InRunShapley(model, opt, nn.functional.cross_entropy, (x[:4], y[:4]), audit_every=1, audit_samples=6)
            >>> with tracker.batch(list(range(6))):
            ...     nn.functional.cross_entropy(model(x[4:]), y[4:]).backward()
            >>> opt.step()
            >>> row = tracker.audit().iloc[0]
            >>> int(row.step), row.route, int(row.samples), bool(row.pearson > 0.99)
            (0, 'linear', 6, True)
            >>> tracker.close()
        """
        rows = self._gathered().audits
        return pd.DataFrame(rows, columns=["step", "route", "samples", "pearson", "relative_error", "seconds"])

    def step_info(self) -> pd.DataFrame:
        """How each valued step was valued: ``step``, ``route``, ``nonlinearity`` (ν), ``stderr``.

        ``route`` is ``"linear"`` (φ_z = −⟨P, c_z⟩), ``"exact"`` (Shapley values of the
        exact-update game, permutation sampled; ``stderr`` is their largest standard error),
        ``"exact-loo"``, or ``"mixed"`` / ``"mixed-loo"`` (the exact route for some parameters,
        the slope for the rest); ν is the update's nonlinearity along g_B (over the parameters
        that kept the slope; ``route="auto"`` compares each parameter's ν_p with
        ``nonlinearity_threshold``; NaN where not computed).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> torch.manual_seed(0) and None
            >>> model = nn.Linear(3, 2); opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
            >>> tracker = InRunShapley(model, opt, nn.functional.cross_entropy, (x[:2], y[:2]))
            >>> for _ in range(2):
            ...     opt.zero_grad()
            ...     with tracker.batch([1, 2, 3, 4]):
            ...         nn.functional.cross_entropy(model(x[2:]), y[2:]).backward()
            ...     opt.step()
            >>> list(tracker.step_info()["route"])          # Adam's first step is sign-like
            ['exact', 'linear']
            >>> tracker.close()
        """
        return self._gathered().step_info_frame()

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
        leaves the previous save intact; it carries a SHA-256 checksum and a fingerprint of the
        validation batches. Resume with :meth:`load`. Under DistributedDataParallel every rank
        must call it: the ranks' values are gathered and rank 0 writes one file.

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
        # Under DDP every rank calls save(): the ranks' values are gathered and rank 0 writes the file.
        ledger = self._gathered(closed=True)
        if self._world_size > 1:
            import torch.distributed as dist

            if dist.get_rank() != 0:
                dist.barrier()
                return
        fingerprint = val_fingerprint(self.val_batches)
        atomic_save(ledger.state_dict(self._saved_config(), val_fingerprint=fingerprint), path)
        if self._world_size > 1:
            dist.barrier()

    @classmethod
    def load(
        cls, path: str | os.PathLike, model, optimizer, loss_fn, val_batch, *, stream: bool = False, compile: bool | str = "auto"
    ) -> InRunShapley:
        """A tracker for ``model``/``optimizer`` that continues the totals saved at ``path``.

        The configuration (linearization, val_point, estimator, record_steps) is the saved one;
        ``stream`` and ``compile`` (which do not change the values) are chosen anew.

        Raises:
            FileNotFoundError: nothing at ``path``.
            LedgerFileError: a corrupted file, another format, or another format version.
            ValueError: ``val_batch`` has a different number of targets than the saved run, or is
                a different validation set (its fingerprint differs from the saved one).
        """
        state = load_checked(path)
        tracker = cls(model, optimizer, loss_fn, val_batch, **state["config"], record_steps=state["record_steps"], stream=stream, compile=compile)
        if state["num_targets"] is not None and state["num_targets"] != len(tracker.val_batches):
            tracker.close()
            raise ValueError(
                f"the saved run has {state['num_targets']} validation targets but val_batch has "
                f"{len(tracker.val_batches)}; pass the same validation batches to resume"
            )
        try:
            check_same_validation(state, val_fingerprint(tracker.val_batches), path)
        except ValueError:
            tracker.close()
            raise
        tracker._ledger = tracker._rank_ledger(state)
        return tracker

    def state(self) -> dict:
        """The ledger's state (what :meth:`save` writes, without the file): for a framework's checkpoint.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> model = nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> x, y = torch.ones(3, 2), torch.zeros(3, 1)
            >>> tracker = InRunShapley(model, opt, nn.functional.mse_loss, (x[:1], y[:1]))
            >>> with tracker.batch([1, 2]):
            ...     nn.functional.mse_loss(model(x[1:]), y[1:]).backward()
            >>> opt.step()
            >>> other = InRunShapley(model, opt, nn.functional.mse_loss, (x[:1], y[:1]))
            >>> other.restore(tracker.state()); other.values().equals(tracker.values())
            True
            >>> tracker.close(); other.close()
        """
        return self._gathered(closed=True).state_dict(self._saved_config(), val_fingerprint=val_fingerprint(self.val_batches))

    def _saved_config(self) -> dict:
        """The configuration and the options that change values: what a resumed tracker must share."""
        return {**self.config.as_dict(), **self.options}

    def restore(self, state: dict) -> None:
        """Continue the values of :meth:`state` (same configuration and validation set, else ``ValueError``)."""
        saved, mine = state.get("config") or {}, self._saved_config()
        # A state written before an option existed was made with its default.
        defaults = InRunShapley._option_defaults()
        if {**defaults, **saved} != {**defaults, **mine}:
            raise ValueError(f"the saved run used {saved!r}, this tracker {mine!r}; pass the same options to resume")
        check_same_validation(state, val_fingerprint(self.val_batches), "the checkpoint")
        self._ledger = self._rank_ledger(state)

    def _rank_ledger(self, state: dict) -> Ledger:
        """The saved ledger for this rank: every rank loads the same file, and values() adds the ranks'
        ledgers, so under DDP / FSDP2 rank 0 continues the saved totals and the others only the step count."""
        ledger = Ledger.from_state_dict(state)
        if self._world_size > 1 and self._parallel.rank != 0:
            empty = Ledger(ledger.num_targets, ledger.record_steps)
            empty.steps = ledger.steps
            return empty
        return ledger

    @staticmethod
    def _option_defaults() -> dict:
        return {
            "route": "auto", "nonlinearity_threshold": DEFAULT_NONLINEARITY_THRESHOLD, "exact_permutations": 32, "seed": 0,
            "credit": "step", "momentum_window": 16,
        }

    def close(self) -> None:
        """Remove the optimizer hooks; the tracker keeps its values but records nothing more."""
        if not self._closed:
            for opt, pre in self._hooks.items():
                _TRACKER_HOOKS.get(opt, set()).discard(pre.id)
            for fin in self._finalizers:
                fin()
            self._clear_pending()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FallbackWarning(UserWarning):
    """Some parameters have no ghost rule and use the slower per-module torch.func fallback (exact)."""


def _momentum_buffers(opts) -> dict[torch.Tensor, torch.Tensor]:
    """param -> the optimizer's own momentum-buffer tensor, for the rules that declare one."""
    out = {}
    for opt in opts:
        name = optimizers.linearization_class(type(opt)).momentum_buffer
        if name is not None:
            out.update({p: st[name] for p, st in opt.state.items() if isinstance(st.get(name), torch.Tensor)})
    return out


def _check_momentum_credit(opts) -> None:
    """Refuse ``credit="momentum"`` up front for an optimizer whose carried update cannot be credited."""
    for opt in opts:
        cls = optimizers.linearization_class(type(opt))
        for index, group in enumerate(opt.param_groups):
            for p in group["params"]:
                state = cls.read_state(p, opt.state.get(p, {}), group)
                reason = cls.momentum_credit_refusal(state)
                if reason is not None:
                    raise optimizers.UnsupportedOptimizerError(
                        f"credit='momentum' with {type(opt).__name__} (param group {index}): {reason}. Use credit='step'"
                    )


def _warn_fallback(engine) -> None:
    modules = engine.fallback_modules
    if modules:
        shown = ", ".join(repr(m) for m in modules[:5]) + (f" and {len(modules) - 5} more" if len(modules) > 5 else "")
        kinds = sorted({type(m).__name__ for m, t in engine._tracked.items() if t.uncovered})
        warnings.warn(
            f"{len(modules)} module(s) ({shown}; types {', '.join(kinds)}) have no ghost rule: their per-sample "
            "contributions are exact but computed by torch.func, one vmapped forward and backward of the module per "
            "step and memory of n copies of their parameters. Register a LayerRule for these types "
            "(docs/extending.md), or pass strict=True to refuse them",
            FallbackWarning,
            stacklevel=3,
        )


_ENGINE_NAME = {"ddp": "DistributedDataParallel", "fsdp": "fully_shard (FSDP2)", "single": "one process"}

def _check_synced(hook, params) -> None:
    """Refuse a streamed batch whose backward DDP did not all-reduce (it ran under ``ddp.no_sync()``)."""
    if hook.fired == 0 and any(p.grad is not None for p in params):
        raise ValueError(
            "the backward of this tracker.batch() ran under DistributedDataParallel.no_sync(), so DDP did not "
            "all-reduce it and the communication hook that values each layer at the averaged gradient never ran. "
            "stream=True values one batch context per optimizer step, each all-reduced: gradient accumulation "
            "under no_sync cannot be streamed. Use stream=False to accumulate, or run the backward outside no_sync"
        )


def _check_reduce_scattered(computer, start: int) -> None:
    """Refuse a streamed FSDP2 batch whose backward reached the model but contracted no parameter.

    ``fully_shard`` calls each sharded parameter's post-accumulate-grad hook once the
    reduce-scatter has given it its averaged gradient; under ``set_requires_gradient_sync(False)``
    it reduces nothing, so no hook ran and the step's gradient is not the one the hooks would see.
    """
    sizes = computer.pass_sizes(start, computer.passes_captured())
    if sizes and None not in sizes and not computer.engine.stream_hooks_fired:
        raise ValueError(
            "the backward of this tracker.batch() did not reduce-scatter the gradients of the fully_shard (FSDP2) "
            "model (set_requires_gradient_sync(False)), so the hooks that value each parameter at its averaged "
            "gradient shard never ran. stream=True values one batch context per optimizer step, each reduce-scattered: "
            "gradient accumulation without sync cannot be streamed. Use stream=False to accumulate, or keep gradient "
            "sync on (a torch whose fully_shard does not call post-accumulate-grad hooks also ends here: use stream=False)"
        )


def _weak_hook(tracker: InRunShapley, method: str) -> Callable:
    """An optimizer hook calling ``tracker.<method>`` while the tracker is alive, a no-op after."""
    ref = weakref.ref(tracker)

    def hook(optimizer, args, kwargs):
        alive = ref()
        return None if alive is None else getattr(alive, method)(optimizer, args, kwargs)

    return hook


def _detach(optimizer_ref, pre_hook, post_hook) -> None:
    """Remove a tracker's optimizer hooks (on close(), or when the tracker is garbage collected)."""
    optimizer = optimizer_ref()
    if optimizer is not None:
        _TRACKER_HOOKS.get(optimizer, set()).discard(pre_hook.id)
    pre_hook.remove()
    post_hook.remove()


def _version_marks(params: list[torch.Tensor]) -> dict[torch.Tensor, int]:
    """Version counters of parameters: an optimizer's in-place update changes them."""
    return {p: p._version for p in params}


def _grad_mark(p: torch.Tensor) -> tuple[int, int]:
    """Identity and version counter of ``p.grad``: they change when the gradient is zeroed, replaced or edited."""
    return (0, 0) if p.grad is None else (id(p.grad), p.grad._version)


def _all_finite(grads: list[torch.Tensor]) -> bool:
    """Whether every gradient is finite.

    A finite 2-norm proves a tensor finite, and ``torch._foreach_norm`` (the kernel
    ``clip_grad_norm_`` uses) takes all of them in one fused call; only a tensor whose norm
    overflowed (huge but finite entries, as under a large GradScaler scale) is checked entry by entry.
    """
    dense = [g.to_dense() if g.is_sparse else g for g in grads if g is not None]
    if not dense:
        return True
    foreach_norm = getattr(torch, "_foreach_norm", None)
    norms = foreach_norm(dense) if foreach_norm is not None else [torch.linalg.vector_norm(g) for g in dense]
    finite = torch.isfinite(torch.stack([n.reshape(()).to(torch.float32) for n in norms])).tolist()
    return all(ok or bool(torch.isfinite(g).all()) for ok, g in zip(finite, dense))


def _check_val_batches_fit(computer: StepComputer) -> None:
    """Evaluate each validation batch once (no grad, in an isolated pass) so that a bad batch fails now, clearly.

    Refuses a batch the model or ``loss_fn`` cannot take, a non-scalar loss, a non-finite
    validation loss (NaN inputs would otherwise skip every step), and a loss that couples the
    samples of a batch (``estimators.check_loss_additive``).
    """
    model, loss_fn = computer.model, computer.loss_fn
    for k, (inputs, targets) in enumerate(computer.val_batches):
        try:
            with torch.no_grad(), computer.isolated():
                outputs = model(inputs)
                loss = loss_fn(outputs, targets)
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
        if not torch.isfinite(loss).all():
            from torch.utils import _pytree

            bad = [
                what
                for what, tree in (("inputs", inputs), ("targets", targets))
                if any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all() for t in _pytree.tree_leaves(tree))
            ]
            where = f"its {' and '.join(bad)} hold NaN/inf" if bad else "the model's output on it is not finite"
            raise ValueError(
                f"the validation loss on validation batch {k} is {float(loss):g} ({where}); every step would be "
                "skipped. Pass a validation batch with finite values"
            )
        check = getattr(estimators, "check_loss_additive", None)
        if check is not None:
            check(loss_fn, outputs, targets, what=f"validation batch {k}")


def _check_optimizer_owns_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_params = {id(p) for p in model.parameters()}
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in model_params:
                raise ValueError(
                    f"optimizer param group {i} holds a parameter of shape {tuple(p.shape)} that is not a "
                    "parameter of the model; pass the optimizer that trains this model"
                )

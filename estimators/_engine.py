"""The ghost engine: per-sample values from the activations and output gradients of one backward.

Workflow (the caller owns the forward/backward passes; the engine only listens)::

    engine = GhostEngine(model)
    with engine.capture_train():            # one or more micro-batches, one model call each
        loss_fn(model, batch).backward()
    # later, e.g. in an optimizer step pre-hook, with param.grad = g_B available:
    J = {p: preconditioning(lin, p, p.grad, "tangent") for p in lin.params}
    val_grads = validation_gradients(model, val_loss_fn, val_batches, engine=engine)  # K targets
    phi = engine.values(J, val_grads)       # [n, K]
    engine.paths_taken                      # {"fc.weight": "dense", ...}
    engine.clear()

``validation_gradients(..., engine=engine)`` runs each target inside ``engine.capture_val()``,
which the ``pairwise`` and ``factored`` paths need (each captured model call = one target).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from optimizers._preconditioner import Preconditioner, as_preconditioner
from persample import check_samples_independent

from ._capture import (
    _COMPOSITE,
    _Call,
    _Capture,
    _changed_since,
    _fingerprint,
    _in_backward,
    _leading_batch,
    _ParamUseMode,
    _Pass,
    _refuse_reparametrized,
    _Stream,
    _Tracked,
)
from ._completeness import CompletenessCheck, IncompleteGradientError
from ._completeness import tolerance as _TOLERANCE_OF
from ._config import Factorization, GhostPath, parse_enum
from ._contraction import (
    RowSparse,
    StepContraction,
    _coarsest_dtype,
    _precondition,
    _term_magnitude,
    check_operands,
    contract,
    contract_many,
    dense_of,
)
from ._errors import GhostEngineError, ParameterUseError, UncoveredParameterError
from ._factors import Bilinear, OneHotFactor, PerSample, Term
from ._fallback import _broadcast_index_hooks, _fallback_grads
from ._paths import choose_path
from ._sharded import full, is_sharded
from ._rules import registered_rules, rule_for

__all__ = ["GhostEngine", "GhostEngineError", "JLike", "ParameterUseError", "UncoveredParameterError"]


#: What ``values`` accepts as J: one float for every parameter, or a mapping parameter -> applied
#: preconditioner (``optimizers.Preconditioner``), elementwise slopes (tensor) or float.
JLike = float | Mapping[torch.Tensor, "Preconditioner | torch.Tensor | float"]


def _select_samples(term: Term, rows: torch.Tensor) -> Term:
    """The samples ``rows`` (indices) of a per-pass term."""
    if isinstance(term, PerSample):
        return PerSample(term.c[rows])
    return term.select(rows)


class GhostEngine:
    """Per-sample first-order values φ[z, k] = −⟨J ⊙ ∇L_val^k, c_z⟩ without per-sample gradients.

    Hooks, installed only inside :meth:`capture_train` / :meth:`capture_val`, record each tracked
    layer's input and output gradient; a :class:`LayerRule` turns them into factored per-sample
    contributions (see ``docs/estimators.md``), and :meth:`values` contracts them:

    * ``dense``    ⟨P, c_z(W)⟩ = sum((A_z Pᵀ) ∘ B_z), P = J ⊙ ∇L_val: exact for any diagonal J;
    * ``pairwise`` J Σ_v sum((A_z A_vᵀ) ∘ (B_z B_vᵀ)) over the captured validation samples:
      exact for a scalar J;
    * ``factored`` σ Σ_v sum(((A_z⊙s) A_vᵀ) ∘ ((B_z⊙r) B_vᵀ)) with |J| ≈ r sᵀ: approximate;
    * ``materialized`` c_z built explicitly from the captured factors ([n, *param.shape] per
      parameter), then −⟨P, c_z⟩: the reference path, memory n × #params.

    Biases, norm weights and fallback parameters are materialized per sample (cheap) and always
    use the exact J. Parameters of layers no rule covers use a ``torch.func`` per-sample fallback
    on the module that owns them, unless ``strict=True``.

    Args:
        model: the model; samples must not interact (no BatchNorm in train mode).
        path: ``"auto"``, ``"dense"``, ``"pairwise"``, ``"factored"`` or ``"materialized"`` for
            every weight matrix.
        strict: refuse parameters no rule covers instead of using the fallback.
        dtype: computation dtype; default the parameters' own dtype (which must then agree).
        layer_paths: per-module or per-parameter override of ``path``, by qualified name.
        factorization: rank-one method of the factored path (see :class:`Factorization`).
        modules: qualified names of the modules whose parameters are attributed (each with its
            subtree); ``None`` attributes every trainable parameter. Parameters outside get no
            hooks and no value: the values are then the partial values of those modules.
    Raises:
        SampleInteractionError: BatchNorm in train mode, or a layer that mixes samples.
        UncoveredParameterError: ``strict=True`` and a parameter has no rule.
        ValueError: an unknown path, factorization, dtype, or a ``layer_paths`` key that names
            no module or parameter.
    Example:
        >>> model = nn.Linear(3, 2)
        >>> engine = GhostEngine(model)
        >>> with engine.capture_train():
        ...     nn.functional.mse_loss(model(torch.ones(4, 3)), torch.zeros(4, 2)).backward()
        >>> val_grad = {p: torch.ones_like(p) for p in model.parameters()}
        >>> engine.values(-0.1, [val_grad]).shape   # SGD proxy J = −lr, one target
        torch.Size([4, 1])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        path: GhostPath | str = "auto",
        strict: bool = False,
        dtype: torch.dtype | None = None,
        layer_paths: Mapping[str, GhostPath | str] | None = None,
        factorization: Factorization | str = "geometric",
        modules: Sequence[str] | None = None,
    ):
        check_samples_independent(model)
        self.model = model
        self.path = parse_enum(GhostPath, path, "path")
        self.strict = bool(strict)
        self.factorization = parse_enum(Factorization, factorization, "factorization")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype={dtype!r} is not a floating torch.dtype; pass e.g. torch.float64, or None for the parameters' dtype")
        self.dtype = dtype
        self._signature: tuple = ()
        self.modules = None if modules is None else tuple(modules)
        if self.modules is not None:
            names = {n for n, _ in model.named_modules()}
            unknown = [m for m in self.modules if m not in names]
            if unknown or not self.modules:
                raise ValueError(
                    f"modules={list(self.modules)!r}: {unknown or 'empty'} names no module of the model; use names from "
                    "model.named_modules() (e.g. 'encoder.layer.0'), each module's subtree is attributed"
                )
        self._scan()
        self.layer_paths: dict[str, GhostPath] = {}
        for key, value in (layer_paths or {}).items():
            if key not in self._module_names.values() and key not in self._names.values():
                raise ValueError(
                    f"layer_paths key {key!r} names no module or trainable parameter of the model; use a name "
                    "from model.named_modules() or model.named_parameters()"
                )
            self.layer_paths[key] = parse_enum(GhostPath, value, f"layer_paths[{key!r}]")
        self._train: list[_Pass] = []
        self._val: list[_Pass] = []
        self._active: str | None = None
        self._handles: list[Any] = []
        self._stack: list[nn.Module] = []
        self._mode: _ParamUseMode | None = None
        self._stream: _Stream | None = None
        #: contract_streamed() may run on a thread of the process group (a DDP communication hook)
        self._stream_lock = threading.Lock()
        self._boundary = False
        self._call_batch: int | None = None
        #: Errors found by hooks on outputs a rule does not read (raised by values()).
        self._stray: list[str] = []
        #: parameter name -> path ("dense", "pairwise", "factored", "materialized", "fallback"),
        #: set by values().
        self.paths_taken: dict[str, str] = {}
        #: parameter name -> factored_error(...) report, for parameters that took the factored path.
        self.factored_errors: dict[str, dict[str, float]] = {}
        #: c of the last :meth:`values` call with ``grads``: param.grad = c · Σ_z c_z (1.0 without a rescale).
        self.grad_scale: float = 1.0
        #: Seconds spent on the completeness check so far (the bench reports it per step).
        self.check_seconds: float = 0.0

    def _model_signature(self) -> tuple:
        """Which modules exist and which of their parameters are trainable (changes on unfreezing or new modules)."""
        return tuple((id(m), tuple((id(p), p.requires_grad) for p in m.parameters(recurse=False))) for m in self.model.modules())

    def _scan(self) -> None:
        """Map trainable parameters to their modules and rules (at construction and after the model changed)."""
        model = self.model
        check_samples_independent(model)
        inside = self._in_attributed
        self._names: dict[torch.Tensor, str] = {p: n for n, p in model.named_parameters() if p.requires_grad and inside(n.rpartition(".")[0])}
        self._module_names = {m: n for n, m in model.named_modules()}
        tracked: dict[nn.Module, _Tracked] = {}
        owners: dict[torch.Tensor, set[nn.Module]] = {}
        composites: list[str] = []  # modules whose forward uses their children's parameters directly
        for mname, module in model.named_modules():
            if not inside(mname) or any(mname.startswith(c + ".") for c in composites):
                continue
            composite = isinstance(module, _COMPOSITE)
            if composite:
                composites.append(mname)
            own = {a: p for a, p in module.named_parameters(recurse=composite) if p.requires_grad}
            if not own:
                continue
            _refuse_reparametrized(mname, module)
            if getattr(module, "batch_first", None) is False:
                raise GhostEngineError(
                    f"module {mname or type(module).__name__!r} ({type(module).__name__}) takes sequence-first input "
                    "(batch_first=False, shape [T, n, ...]); per-sample contributions are read along the first axis, so "
                    f"the samples would be confused with positions. Create it with batch_first=True and feed [n, T, ...]"
                )
            rule = rule_for(type(module))
            reason = None if rule is None else rule.unsupported(module)
            covered = {} if rule is None or reason else {a: p for a, p in own.items() if a in rule.params(module)}
            uncovered = {a: p for a, p in own.items() if a not in covered}
            if uncovered and self.strict:
                raise UncoveredParameterError(self._uncovered_message(mname, module, next(iter(uncovered)), reason))
            tracked[module] = _Tracked(mname or type(module).__name__, None if reason else rule, covered, uncovered)
            for p in own.values():
                owners.setdefault(p, set()).add(module)
        self._tracked, self._owners = tracked, owners
        self._signature = self._model_signature()

    def _in_attributed(self, module_name: str) -> bool:
        """Whether a module (by qualified name) is inside one of the attributed ``modules`` (all without it)."""
        if self.modules is None:
            return True
        return any(module_name == m or module_name.startswith(m + ".") or m == "" for m in self.modules)

    def refresh(self) -> bool:
        """Re-scan the model if a parameter was (un)frozen or a module added since the last scan.

        Called at the start of every :meth:`capture_train`, so a layer unfrozen mid-run is
        captured from its next step on. Returns whether anything changed.
        """
        if self._active is not None or self._model_signature() == self._signature:
            return False
        self._scan()
        return True

    # ------------------------------------------------------------------ introspection
    @property
    def fallback_modules(self) -> list[str]:
        """Names of the modules whose parameters (some or all) use the torch.func fallback."""
        return [t.name for t in self._tracked.values() if t.uncovered]

    @property
    def needs_val_capture(self) -> bool:
        """Whether :meth:`values` can use a captured validation pass (``capture_val``).

        True when some weight may take the pairwise or factored path (``auto`` picks pairwise
        for a scalar J when it is cheaper); the dense and materialized paths need only
        ``val_grads``.
        """
        chosen = {self.path, *self.layer_paths.values()}
        return bool(chosen & {GhostPath.AUTO, GhostPath.PAIRWISE, GhostPath.FACTORED})

    @property
    def n_samples(self) -> int:
        """Training samples captured so far (rows of :meth:`values`)."""
        return sum(self._pass_n(p) for p in self._train if p.has_grad)

    def _uncovered_message(self, mname: str, module: nn.Module, attr: str, reason: str | None) -> str:
        types = ", ".join(sorted(t.__name__ for t in registered_rules()))
        tname = type(module).__name__
        why = f"its rule refuses this instance: {reason}" if reason else f"no rule is registered for {tname}"
        full = f"{mname}.{attr}" if mname else attr
        return (
            f"parameter {full!r} of module {mname or '<root>'!r} ({tname}) is not covered by a layer rule ({why}; "
            f"registered layer types: {types}). Fix: register a rule for {tname} "
            f"(class {tname}Rule(estimators.LayerRule, layer={tname}): ...), or allow the per-parameter "
            "torch.func fallback with strict=False."
        )

    # ------------------------------------------------------------------ capture
    def capture_train(self) -> _Capture:
        """Context manager recording training passes; each model call inside is one micro-batch.

        Enter it around the forward and backward of the training batch (or of each micro-batch
        of a gradient-accumulation step); the recorded passes add up until :meth:`clear`.

        Raises:
            GhostEngineError: another capture of this engine is active.
        """
        return _Capture(self, "train")

    def capture_val(self) -> _Capture:
        """Context manager recording validation passes; each model call inside is one target k."""
        return _Capture(self, "val")

    def clear_val(self) -> None:
        """Forget the captured validation passes only (before capturing the K targets again)."""
        self._val.clear()

    def clear(self) -> None:
        """Forget every captured pass and any :meth:`stream` set-up (call it after each optimizer step)."""
        self._train.clear()
        self._val.clear()
        self._stray.clear()
        self._stream = None

    # ------------------------------------------------------------------ streaming
    def stream(
        self,
        val_grads: Sequence[Mapping[torch.Tensor, torch.Tensor]],
        slope: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | float],
        *,
        own_hooks: bool = True,
    ) -> None:
        """Contract each weight during the next training backward, as soon as its gradient is final.

        :meth:`values` normally contracts after the backward pass, so every layer's input A and
        output gradient B stay in memory until then. When ∇L_val is known before the backward
        (validation point ``current``) and J of a parameter depends only on that parameter's own
        gradient (every diagonal optimizer), the contraction −⟨J ⊙ ∇L_val, c_z⟩ of a parameter
        can run the moment autograd has accumulated its gradient (a post-accumulate-grad hook);
        a layer's A and B are released once all its parameters are done. Peak memory is then
        that of plain training. Weights use the dense order (P = J ⊙ ∇L_val), or P̃ = σ r sᵀ ⊙
        ∇L_val on the ``factored`` path; parameters forced to ``materialized`` and fallback
        parameters are left to :meth:`values`, which adds both parts.

        Conditions, checked by :meth:`values`: one micro-batch (one backward) per step, and
        ``param.grad`` not replaced after the backward. A rescaling after the backward (gradient
        clipping) changes J and cannot be checked here: the caller must refuse it
        (``InRunShapley(stream=True)`` does).

        Under DistributedDataParallel the gradient the optimizer uses is the all-reduced average,
        which exists only once DDP's bucket all-reduce has completed, after the post-accumulate-grad
        hooks. With ``own_hooks=False`` the engine registers no hook of its own; the caller hands
        each parameter's final gradient to :meth:`contract_streamed` (the tracker's DDP
        communication hook does, per bucket, see ``attribution._distributed.attach_stream_hook``).

        Args:
            val_grads: K dicts parameter -> ∇L_val^k (from :func:`validation_gradients`, taken
                before the training forward).
            slope: ``slope(param, grad)`` -> J of ``param`` at its final gradient ``grad`` (a
                tensor broadcastable to the parameter, or a float; exactly ``0.0`` skips the
                parameter). ``grad`` is ``param.grad`` in the engine's own hooks, the averaged
                gradient under DDP.
            own_hooks: register the post-accumulate-grad hooks (default); ``False``: the caller
                calls :meth:`contract_streamed` with each parameter's final gradient.
        Raises:
            GhostEngineError: a capture is active, or training passes were already captured.
            ValueError: ``val_grads`` is not a non-empty list.
        Example:
            Streaming gives the same values as contracting after the backward:

            >>> torch.manual_seed(0) and None
            >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
            >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
            >>> G = [{p: torch.randn_like(p) for p in model.parameters()}]
            >>> J = {p: torch.rand_like(p) for p in model.parameters()}
            >>> engine = GhostEngine(model)
            >>> engine.stream(G, lambda p, g: J[p])
            >>> with engine.capture_train():
            ...     ((model(x) - y) ** 2).sum().backward()
            >>> len(engine.streamed_params)
            4
            >>> streamed = engine.values({}); engine.clear()
            >>> with engine.capture_train():
            ...     ((model(x) - y) ** 2).sum().backward()
            >>> torch.allclose(streamed, engine.values(J, G))
            True
        """
        if self._active is not None:
            raise GhostEngineError(f"stream() was called inside a {self._active} capture; call it before capture_train()")
        if any(p.calls for p in self._train):
            raise GhostEngineError("stream() must be called before the step's training capture; call clear() after each step")
        if not isinstance(val_grads, (list, tuple)) or not val_grads:
            raise ValueError("val_grads must be a non-empty list of K dicts parameter -> validation gradient")
        dtype = self._compute_dtype(list(self._names))
        self._stream = _Stream(list(val_grads), slope, dtype, StepContraction(dtype, self.factorization), own_hooks=bool(own_hooks))
        self.paths_taken = {}
        self.factored_errors = self._stream.contraction.factored_errors

    @property
    def streaming(self) -> bool:
        """A :meth:`stream` with ``own_hooks=False`` is set up: :meth:`contract_streamed` is expected."""
        return self._stream is not None and not self._stream.own_hooks

    @property
    def stream_hooks_fired(self) -> int:
        """Post-accumulate-grad hooks of sharded (FSDP2) parameters run in this step's backward (see :meth:`stream`)."""
        return 0 if self._stream is None else self._stream.fired

    @property
    def streamed_params(self) -> set[torch.Tensor]:
        """Parameters already contracted during the backward pass of this step (see :meth:`stream`)."""
        return set() if self._stream is None else set(self._stream.done)

    def _streamable(self) -> list[torch.Tensor]:
        """Parameters every owner of which covers them with a rule, on a path other than materialized."""
        out = []
        for p, owners in self._owners.items():
            if self._forced_path(self._names[p]) is GhostPath.MATERIALIZED:
                continue
            if all(any(q is p for q in self._tracked[m].covered.values()) and not self._tracked[m].uncovered for m in owners):
                out.append(p)
        return out

    def _contract_in_backward(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook of ``p``: −⟨J ⊙ ∇L_val, c_z⟩ of ``p`` at ``p.grad`` now; release finished layers.

        Under FSDP2 the hook is registered on the sharded parameter, and ``fully_shard`` calls it
        once the reduce-scatter has given ``p.grad`` its averaged shard. An error is then stored,
        not raised: raising inside FSDP's post-backward on one rank would leave the others waiting
        in the next collective; the tracker refuses the step on every rank alike instead.
        """
        if not is_sharded(p):
            self._contract(p, p.grad)
            return
        s = self._stream
        if s is None:
            return
        before, s.fired = s.gathers, s.fired + 1
        try:
            self._contract(p, p.grad)
        except Exception as err:  # noqa: BLE001 - raised by check_stream(), agreed over the ranks
            if s.failure is None:
                s.failure = err
        # Every rank gathers a streamed parameter's P once per validation target, whatever failed
        # (or was skipped) on this one: an all-gather left out here would leave the others waiting.
        for G in [G for G in s.val_grads if p in G][s.gathers - before :]:
            full(G[p])

    def contract_streamed(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """Contract ``params`` at their final gradients ``grads`` (a :meth:`stream` set up with ``own_hooks=False``).

        Called by a DDP communication hook once a bucket's all-reduce has completed, with the
        bucket's parameters and their averaged gradients (``GradBucket.parameters()`` /
        ``gradients()``). Parameters the engine does not stream (fallback, forced
        ``materialized``, outside the attributed modules) are left to :meth:`values`. Thread-safe:
        communication hooks may complete on a thread of the process group.

        Raises:
            GhostEngineError: no :meth:`stream` set up with ``own_hooks=False``.
        """
        with self._stream_lock:
            s = self._stream
            if s is None or s.own_hooks:
                raise GhostEngineError("contract_streamed() needs a stream(..., own_hooks=False) set up for this step")
            if s.streamable is None:
                return  # no training capture of this step started: nothing was captured to contract
            for p, g in zip(params, grads):
                if p in s.streamable:
                    self._contract(p, g)

    def check_stream(self) -> None:
        """Refuse a streamed step whose conditions failed (what :meth:`values` checks first; a no-op once passed).

        Raises:
            GhostEngineError: an error found in the backward (a second gradient, several model
                calls), or a ``.grad`` replaced after the backward.
            IncompleteGradientError: a gradient changed after the backward (clipping, unscaling).
        """
        stream = self._stream
        if stream is None or stream.checked:
            return
        if stream.failure is not None:
            raise stream.failure
        if stream.error is not None:
            raise GhostEngineError(stream.error)
        t0 = time.perf_counter()
        changed = _changed_since(stream.fingerprints)
        self.check_seconds += time.perf_counter() - t0
        for p, g in stream.done.items():
            if g is not None and p.grad is not g:
                raise GhostEngineError(
                    f"the gradient of parameter {self._names[p]!r} was replaced after the backward pass; the streamed "
                    "contraction evaluated J at the gradient of the backward pass. Edit gradients in place before "
                    "the backward ends, or contract after the step (InRunShapley(stream=False))"
                )
            if p in changed:
                raise IncompleteGradientError(
                    f"the gradient of parameter {self._names[p]!r} changed after the backward pass (gradient clipping "
                    "that clips, GradScaler.unscale_, manual edits); the streamed contraction evaluated J at the "
                    "gradient of the backward pass, and J of the changed gradient is another slope. Use "
                    "InRunShapley(stream=False), which values rescaled steps exactly"
                )
        stream.checked = True

    def _contract(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """−⟨J ⊙ ∇L_val, c_z⟩ of ``p`` with J evaluated at its final gradient ``grad``; release finished layers."""
        s = self._stream
        if s is None or s.error is not None or s.failure is not None:
            return
        name = self._names[p]
        if p in s.done:
            s.error = (
                f"parameter {name!r} received a second gradient in one step (gradient accumulation over several "
                "backward passes, or retain_graph); the streamed contraction needs its final gradient from one "
                "backward pass. Contract after the step instead (InRunShapley(stream=False))"
            )
            return
        passes = [q for q in self._train if q.calls]
        if len(passes) != 1:
            s.error = (
                f"{len(passes)} model calls were captured in one step; the streamed contraction values one "
                "micro-batch per step. Contract after the step instead (InRunShapley(stream=False))"
            )
            return
        pas = passes[0]
        # No parameter-use checks here (nothing is differentiated): skip the capture's
        # TorchFunctionMode, whose Python dispatch would otherwise wrap every elementwise op of J.
        with torch.no_grad(), torch._C.DisableTorchFunction():
            J = as_preconditioner(s.slope(p, grad))
            # The .grad tensor whose identity values() checks (under DDP it receives the average in
            # place after the hooks; None where this rank did not use p, DDP then creates it)
            s.done[p] = p.grad
            if J.is_zero:
                return  # the step does not move p: no contribution
            # Every owner of a streamed parameter covers it (see _streamable).
            calls = [c for c in pas.calls if c.grad is not None and c.module in self._owners[p]]
            raw = []
            for c in calls:
                tracked = self._tracked[c.module]
                if c.terms is None:
                    c.terms = tracked.rule.call_terms(c.module, c.args, c.kwargs, c.grad)
                raw.extend(c.terms[a] for a, q in tracked.covered.items() if q is p)
            terms = [t.to(s.dtype) for t in raw]
            sharded = is_sharded(grad)
            if not terms and (not s.own_hooks or sharded):
                # Under DDP and FSDP2 every rank must record the same completeness entries (they are
                # summed over ranks): a parameter this rank's samples did not reach still has ⟨P, grad⟩.
                for k, G in enumerate(s.val_grads):
                    if p in G:
                        P = _precondition(J.to(s.dtype), G[p].to(s.dtype), p.shape)
                        if sharded:
                            full(P)  # the other ranks gather this layer's P now: take part in the collective
                            s.gathers += 1
                        s.check.add_grad(name, k, *check_operands(P, grad), keep=False)
                if p not in s.fingerprints:
                    s.fingerprints[p] = _fingerprint(grad)
            if terms:
                n = self._pass_n(pas)
                if s.out is None:
                    s.out = torch.zeros(n, len(s.val_grads), dtype=s.dtype, device=p.device)
                J = J.to(s.dtype)
                factored = (
                    self._forced_path(name) is GhostPath.FACTORED
                    and J.diagonal is not None
                    and all(isinstance(t, Bilinear) for t in terms)
                )
                R, C = (terms[0].rows.size, terms[0].cols.size) if factored else (0, 0)
                Ps = []
                for k, G in enumerate(s.val_grads):
                    if p not in G:
                        raise ValueError(
                            f"val_grads[{k}] has no gradient for parameter {name!r}; give every trained parameter a "
                            "validation gradient (zeros if the validation loss does not use it)"
                        )
                    g = G[p].to(s.dtype)
                    if factored:  # P̃ = σ r sᵀ ⊙ ∇L_val, not kept: it is freed with this layer
                        Ps.append(s.contraction.preconditioned(p, name, k, GhostPath.FACTORED, J, g, R, C, keep=False))
                    else:
                        Ps.append(_precondition(J, g, p.shape))
                # Every target at once (shared per-sample work); FSDP2 gathers one P at a time.
                values = None if sharded else contract_many(terms, Ps)
                for k, P in enumerate(Ps):
                    if sharded:  # FSDP2: the layer's whole P for this rank's samples (the shard stays for the check)
                        v = contract(terms, full(P))
                        s.gathers += 1
                    else:
                        v = values[:, k]
                    s.out[:, k] -= v
                    t0 = time.perf_counter()
                    s.check.add_samples(name, k, v, captured_dtype=_coarsest_dtype(raw))
                    # P is freed with this layer: its rounding scale is taken now (no synchronisation;
                    # the check runs in values()).
                    if p not in s.fingerprints:
                        s.fingerprints[p] = _fingerprint(grad)
                    s.check.add_grad(name, k, *check_operands(P, grad), keep=False, grad_norm=s.fingerprints[p][1])
                    self.check_seconds += time.perf_counter() - t0
                self.paths_taken[name] = "factored" if factored else "dense"
                if p not in s.fingerprints:
                    t0 = time.perf_counter()
                    s.fingerprints[p] = _fingerprint(grad)
                    self.check_seconds += time.perf_counter() - t0
            for c in calls:
                tracked = self._tracked[c.module]
                if all(q in s.done for q in tracked.covered.values()):
                    # Every parameter of this call is contracted: drop its input and output gradient.
                    c.streamed, c.terms, c.args, c.kwargs = True, None, (), {}
                    c.grad = c.grad.new_zeros(()).expand(c.grad.shape)

    def _start(self, kind: str) -> None:
        if self._active is not None:
            raise GhostEngineError(f"a {self._active} capture of this engine is already active; exit it before starting a {kind} capture")
        if kind == "train" and not self._train:
            self.refresh()
        self._active = kind
        self._stack.clear()
        try:
            for module in self._module_names:
                self._handles.append(module.register_forward_pre_hook(self._push, with_kwargs=True, prepend=True))
                self._handles.append(module.register_forward_hook(self._pop, always_call=True))
                if module in self._tracked:
                    # prepend: record the module's own output, before forward hooks of the user replace it
                    # (the output gradient of the module is then the one its parameters' gradient uses).
                    self._handles.append(module.register_forward_hook(self._record, with_kwargs=True, prepend=True))
            self._handles.extend(_broadcast_index_hooks(self, self._tracked))
            if kind == "train" and self._stream is not None:
                self._stream.streamable = set(self._streamable())
                if self._stream.own_hooks:
                    for p in self._stream.streamable:
                        self._handles.append(p.register_post_accumulate_grad_hook(self._contract_in_backward))
            self._mode = _ParamUseMode(self)
            self._mode.__enter__()
        except BaseException:
            self._stop()
            raise

    def _stop(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        self._active = None

    def _passes(self) -> list[_Pass]:
        return self._train if self._active == "train" else self._val

    def mark_boundary(self) -> None:
        """The next top-level model call starts a new pass (a new micro-batch: ``tracker.batch`` calls it)."""
        self._boundary = True

    def _push(self, module, args, kwargs):
        if not self._stack:
            passes = self._passes()
            current = passes[-1] if passes else None
            if current is None or (current.calls and (module is self.model or module in current.top or self._boundary)):
                current = _Pass()
                passes.append(current)
            current.top.add(module)
            self._boundary = False
            # The batch size of this top-level call, for batch-1 embedding lookups inside it.
            self._call_batch = _leading_batch(args, kwargs)
        self._stack.append(module)
        return None

    def _pop(self, module, args, output):
        if self._stack and self._stack[-1] is module:
            self._stack.pop()

    def _record(self, module, args, kwargs, output):
        if not torch.is_grad_enabled():
            return
        if _in_backward():
            raise GhostEngineError(
                f"module {self._tracked[module].name!r} ran forward during a backward pass (activation "
                "checkpointing recomputes layers); the ghost engine needs each layer to run once per pass, "
                "disable checkpointing inside the capture"
            )
        tracked = self._tracked[module]
        if not isinstance(output, torch.Tensor):
            self._record_leaves(module, tracked, args, kwargs, output)
            return
        if not output.requires_grad:
            return
        if isinstance(module, nn.EmbeddingBag) and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 1:
            raise GhostEngineError(
                f"module {self._tracked[module].name!r} (EmbeddingBag) was called with 1-D input and offsets: the bags "
                "are concatenated along one axis, so the engine cannot tell which entries belong to which sample. Pass "
                "a 2-D input [n, bag_size] (one bag per sample, padded with padding_idx) without offsets"
            )
        call = _Call(module, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs))
        device = output.device.type
        if torch.is_autocast_enabled(device):
            call.autocast = (device, torch.get_autocast_dtype(device))
        if tracked.rule is not None and not tracked.uncovered and all(p.dim() <= 1 for p in tracked.covered.values()):
            call.eager = tracked.rule
        passes = self._passes()
        if not passes:
            passes.append(_Pass())
        passes[-1].calls.append(call)
        output.register_hook(call.add_grad)

    def _record_leaves(self, module, tracked: _Tracked, args, kwargs, output) -> None:
        """Record a module that returns several tensors (``nn.MultiheadAttention``, ``nn.LSTM``/``nn.GRU``).

        Only the torch.func fallback can use it: the rules read one output gradient. Each tensor
        leaf of the output gets its own gradient hook; the fallback contracts all of them.
        """
        from torch.nn.utils.rnn import PackedSequence
        from torch.utils import _pytree

        name, tname = tracked.name, type(module).__name__
        if tracked.covered and getattr(tracked.rule, "multi_output", False) and not tracked.uncovered:
            self._record_first_leaf(module, tracked, args, kwargs, output)
            return
        if tracked.covered:
            raise GhostEngineError(
                f"module {name!r} ({tname}) returned {type(output).__name__}, but its layer rule needs a single tensor "
                "output to read its output gradient; wrap the parameters in a module returning one tensor"
            )
        if any(isinstance(a, PackedSequence) for a in (*args, *kwargs.values())) or isinstance(output, PackedSequence):
            raise GhostEngineError(
                f"module {name!r} ({tname}) was called with a PackedSequence; the per-sample recomputation needs padded "
                "batch-first tensors [n, T, d]. Pass the padded batch (and mask the padded positions in the loss)"
            )
        rnn = isinstance(module, nn.RNNBase)
        if rnn and (len(args) > 1 and args[1] is not None or kwargs.get("hx") is not None):
            raise GhostEngineError(
                f"module {name!r} ({tname}) was given an initial state hx; its batch axis is not the first, so the "
                "per-sample recomputation cannot split it. Start from the default zero state (call it with the input only)"
            )
        leaves = _pytree.tree_leaves(output)
        grads = [(i, t) for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not grads:
            return
        call = _Call(module, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs))
        call.leaf_grads = {}
        device = grads[0][1].device.type
        if torch.is_autocast_enabled(device):
            call.autocast = (device, torch.get_autocast_dtype(device))
        # The batch size of the call: its batch-first tensor input; RNN hidden states have it on axis 1.
        n = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), None)
        for i, t in grads:
            axis = 1 if rnn and i > 0 else 0
            if n is None or t.dim() <= axis or t.shape[axis] != n:
                raise GhostEngineError(
                    f"output {i} of module {name!r} ({tname}) has shape {tuple(t.shape)}, with no batch axis of size {n} "
                    f"where one is expected (axis {axis}); the per-sample recomputation cannot split it"
                )
            t.register_hook(functools.partial(call.add_leaf_grad, i, axis))
        passes = self._passes()
        if not passes:
            passes.append(_Pass())
        passes[-1].calls.append(call)

    def _record_first_leaf(self, module, tracked: _Tracked, args, kwargs, output) -> None:
        """A multi-output layer with a rule (attention): the rule reads the first output's gradient."""
        from torch.utils import _pytree

        leaves = [t for t in _pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
        first = leaves[0]
        if not first.requires_grad:
            return
        call = _Call(module, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs))
        name = tracked.name

        def refuse(g):
            self._stray.append(
                f"an output other than the first of module {name!r} ({type(module).__name__}), e.g. its attention "
                "weights, reached the loss; its rule reads the first output's gradient only. Call it with "
                "need_weights=False, or keep the weights out of the loss"
            )

        for t in leaves[1:]:
            if t.requires_grad:
                t.register_hook(refuse)
        passes = self._passes()
        if not passes:
            passes.append(_Pass())
        passes[-1].calls.append(call)
        first.register_hook(call.add_grad)

    def _check_use(self, param: torch.Tensor) -> None:
        current = self._stack[-1] if self._stack else None
        if current is not None and current in self._owners[param]:
            return
        where = "outside any module of the model" if current is None else f"inside module {self._module_names.get(current) or '<root>'!r} ({type(current).__name__})"
        owners = ", ".join(repr(self._tracked[m].name) for m in self._owners[param])
        raise ParameterUseError(
            f"parameter {self._names.get(param, '?')!r} (owned by module {owners}) was used {where}; hooks on "
            "its owner do not see this use, so its per-sample contribution would be wrong. Fix: call a module "
            "that owns the parameter instead (for tied weights share the Parameter between two modules, e.g. "
            "`head.weight = embedding.weight` with an nn.Linear head), and put weight penalties in the "
            "optimizer's weight_decay rather than in the loss."
        )

    def _refuse_double_backward(self, passes: list[_Pass]) -> None:
        if self._stray:
            raise GhostEngineError(self._stray[0])
        for pas in passes:
            for call in pas.calls:
                if call.create_graph:
                    raise GhostEngineError(
                        f"the output of module {self._tracked[call.module].name!r} received a gradient in a backward "
                        "with create_graph=True (torch.autograd.grad(..., create_graph=True) or backward(create_graph="
                        "True), e.g. a gradient penalty); the gradient of such a term has second-order parts that are "
                        "not per-sample products of a layer's input and output gradient, so the step cannot be "
                        "valued. Compute the penalty outside the tracked batch, or track a loss without it"
                    )

    # ------------------------------------------------------------------ per-pass terms
    def train_passes(self) -> int:
        """Number of training passes (model calls) recorded so far; a mark for :meth:`drop_train_passes`."""
        return len(self._train)

    def drop_train_passes(self, start: int) -> None:
        """Forget the training passes recorded after mark ``start`` (a batch whose code raised)."""
        del self._train[start:]

    def pass_sizes(self, start: int = 0, end: int | None = None) -> list[int | None]:
        """Samples of each training pass in ``[start, end)`` that tracked a layer; ``None`` for a pass no backward reached."""
        return [self._pass_n(p) if p.has_grad else None for p in self._train[start:end] if p.calls]

    def _pass_n(self, pas: _Pass) -> int:
        ns = {int(c.grad.shape[0]) for c in pas.calls if c.grad is not None and c.grad.dim() > 0}
        if len(ns) != 1:
            detail = ", ".join(f"{self._tracked[c.module].name}: {tuple(c.grad.shape)}" for c in pas.calls if c.grad is not None)
            small, large = (min(ns), max(ns)) if ns else (0, 0)
            flat = (
                f" A leading dimension of {large} = {large // small} × {small} suggests that the model flattens positions "
                "into the batch axis ([n*T, d], e.g. x.view(-1, d)) or transposes to sequence-first [T, n, d]; keep "
                "batch-first [n, T, d] tensors (nn.Linear acts on the last axis)."
                if small > 1 and large % small == 0
                else ""
            )
            raise GhostEngineError(
                f"the layers of one pass disagree on the batch size (output gradient shapes {detail}); every "
                f"tracked layer must see batch-first inputs of the same batch, one model call per micro-batch.{flat} "
                "A layer applied once to a batch-1 input whose output is broadcast over the batch has no "
                "per-sample gradient (only nn.Embedding lookups of batch-1 indices, such as BERT's default "
                "[1, T] position ids, are expanded to the batch automatically): give that input a batch axis, "
                "e.g. x.expand(n, *x.shape[1:]) before the layer"
            )
        return ns.pop()

    def _pass_terms(self, pas: _Pass) -> tuple[int, dict[torch.Tensor, list[Term]], set[torch.Tensor]]:
        n = self._pass_n(pas)
        terms: dict[torch.Tensor, list[Term]] = {}
        fallback: set[torch.Tensor] = set()
        streamed = self.streamed_params
        for call in pas.calls:
            if call.grad is None or call.streamed:
                continue  # output did not reach the loss (zero contribution), or contracted in the backward
            tracked = self._tracked[call.module]
            if tracked.covered and not all(q in streamed for q in tracked.covered.values()):
                computed = call.terms if call.terms is not None else tracked.rule.call_terms(call.module, call.args, call.kwargs, call.grad)
                for attr, term in computed.items():
                    if attr in tracked.covered and tracked.covered[attr] not in streamed:
                        terms.setdefault(tracked.covered[attr], []).append(term)
            if tracked.uncovered:
                for attr, c in _fallback_grads(call, tracked, n).items():
                    p = tracked.uncovered[attr]
                    terms.setdefault(p, []).append(PerSample(c))
                    fallback.add(p)
        for p, ts in terms.items():
            bad = [t.n for t in ts if t.n != n]
            if bad:
                raise GhostEngineError(f"parameter {self._names[p]!r}: a term covers {bad[0]} samples in a pass of {n}")
        return n, terms, fallback

    # ------------------------------------------------------------------ values
    def captured_grads(self, which: str = "train") -> list[dict[torch.Tensor, torch.Tensor]]:
        """Σ_z c_z per parameter rebuilt from the captured passes (a check against ``param.grad``).

        Args:
            which: ``"train"`` (one dict, summed over micro-batches) or ``"val"`` (one per target).
        Returns:
            A list of dicts parameter -> gradient, in the parameters' dtype.
        Raises:
            ValueError: ``which`` is neither ``"train"`` nor ``"val"``.
        Example:
            >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
            >>> engine = GhostEngine(model)
            >>> with engine.capture_train():
            ...     model(torch.randn(5, 3)).pow(2).sum().backward()
            >>> rebuilt = engine.captured_grads()[0]
            >>> all(torch.allclose(rebuilt[p], p.grad, atol=1e-6) for p in model.parameters())
            True
        """
        if which not in ("train", "val"):
            raise ValueError(f"which={which!r} is not accepted; use 'train' or 'val'")
        passes = [p for p in (self._train if which == "train" else self._val) if p.has_grad]
        out = []
        for pas in passes:
            _, terms, _ = self._pass_terms(pas)
            out.append({p: sum(t.total(p.shape) for t in ts) for p, ts in terms.items()})
        if which == "train":
            total: dict[torch.Tensor, torch.Tensor] = {}
            for d in out:
                for p, g in d.items():
                    total[p] = total[p] + g if p in total else g
            return [total]
        return out

    def captured_terms(self) -> list[tuple[int, dict[torch.Tensor, list[Term]]]]:
        """The captured training passes as ``(n, {param: [Term]})`` per micro-batch (capture order).

        The terms hold the captured factors; they stay valid after :meth:`clear` (``credit="momentum"``
        keeps them for the steps its window spans).
        """
        return [(n, terms) for n, terms, _ in (self._pass_terms(p) for p in self._train if p.has_grad)]

    def row_supports(self, min_rows: int = 1024, only: torch.Tensor | None = None) -> dict[torch.Tensor, torch.Tensor]:
        """The rows a step's per-sample contributions can touch, for parameters where that is known.

        A parameter (``[R, ...]`` with R ≥ ``min_rows``) every captured term of which is a one-hot
        row factor (an embedding's weight: c_z = Σ_t e_{x_t} ⊗ b_t) has c_z = 0 outside the rows
        its tokens hit, for every sample z; the slope J is then needed only there. A parameter
        also reached by a dense term (a tied LM head) is not listed.

        Returns:
            ``{param: rows}``, rows a sorted ``int64`` tensor of dim-0 indices (union over samples
            and micro-batches); with ``only``, at most that parameter.
        """
        found: dict[torch.Tensor, list[torch.Tensor]] = {}
        dense: set[torch.Tensor] = set()
        streamed = self.streamed_params
        for pas in self._train:
            if not pas.has_grad and self._stream is None:  # (in a streamed backward the pass is still running)
                continue
            for call in pas.calls:
                if call.grad is None or call.streamed:
                    continue
                tracked = self._tracked[call.module]
                wanted = {
                    a: q for a, q in tracked.covered.items()
                    if q.dim() >= 1 and q.shape[0] >= min_rows and q not in streamed and (only is None or q is only)
                }
                if not wanted:
                    continue
                computed = call.terms if call.terms is not None else tracked.rule.call_terms(call.module, call.args, call.kwargs, call.grad)
                for attr, q in wanted.items():
                    term = computed.get(attr)
                    if isinstance(term, Bilinear) and isinstance(term.rows, OneHotFactor) and term.rows.size == q.shape[0]:
                        found.setdefault(q, []).append(term.rows.index.reshape(-1))
                    elif term is not None:
                        dense.add(q)
                for q in tracked.uncovered.values():
                    dense.add(q)
        return {q: torch.unique(torch.cat(idx)) for q, idx in found.items() if q not in dense}

    def per_sample_contributions(
        self, params: Sequence[torch.Tensor] | None = None, dtype: torch.dtype | None = None, rows: Sequence[int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each captured sample's contribution c_z to the batch gradient, one parameter at a time.

        Materialized from the captured factors (the exact-update route and the online audit
        need them for a few steps); micro-batches are concatenated in capture order.

        Args:
            params: parameters to yield (default: every parameter a captured term covers).
            dtype: dtype of the contributions (default: the captured one).
            rows: only these samples (indices into the step's ``n_total`` samples, in this order;
                the others are never materialized). Default: all.
        Yields:
            ``(param, c)`` with ``c`` of shape ``[n_total, *param.shape]`` (``[len(rows), ...]``); a
            parameter a pass did not reach gets zeros for that pass's samples.
        Raises:
            GhostEngineError: no training backward was captured, or the step was contracted
                during the backward (``stream``), which released the factors.
        Example:
            >>> model = nn.Linear(3, 2).double()
            >>> engine = GhostEngine(model)
            >>> with engine.capture_train():
            ...     model(torch.randn(4, 3, dtype=torch.float64)).pow(2).sum().backward()
            >>> c = dict(engine.per_sample_contributions())
            >>> c[model.weight].shape, torch.allclose(c[model.weight].sum(0), model.weight.grad)
            (torch.Size([4, 2, 3]), True)
        """
        if self.streamed_params:
            raise GhostEngineError(
                "the step was contracted during the backward pass (stream=True), which released the captured "
                "factors, so per-sample contributions cannot be rebuilt; use stream=False"
            )
        train = [p for p in self._train if p.has_grad]
        if not train:
            raise GhostEngineError("no training backward pass was captured; run forward and backward inside capture_train()")
        passes = [self._pass_terms(p) for p in train]
        wanted = params if params is not None else [p for p in self._names if any(p in t for _, t, _ in passes)]
        # Per pass: the positions (in the output) and local indices of the requested samples.
        starts, picks, offset = [], [], 0
        for n, _, _ in passes:
            if rows is None:
                picks.append(None)
            else:
                picks.append([(out, r - offset) for out, r in enumerate(rows) if offset <= r < offset + n])
            starts.append(offset)
            offset += n
        for p in wanted:
            target = p.dtype if dtype is None else dtype
            blocks = []
            for (n, terms, _), pick in zip(passes, picks):
                ts = terms.get(p)
                if pick is not None:
                    local = torch.tensor([r for _, r in pick], dtype=torch.long)
                    ts = [_select_samples(t, local) for t in ts] if ts else ts
                    n = len(local)
                if ts:  # factors of a half-precision layer may mix dtypes: materialize in the target one
                    c = sum(t.to(target).materialize(p.shape) for t in ts)
                else:
                    c = torch.zeros(n, *p.shape, dtype=target, device=p.device)
                blocks.append(c)
            c = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
            if rows is not None:  # concatenated pass by pass: back to the order of ``rows``
                order = torch.tensor([out for pick in picks for out, _ in pick], dtype=torch.long)
                c = c[torch.argsort(order)]
            yield p, c

    def values(
        self,
        J: JLike,
        val_grads: Sequence[Mapping[torch.Tensor, torch.Tensor]] | None = None,
        *,
        grads: Mapping[torch.Tensor, torch.Tensor] | None = None,
        val_losses: Sequence[float] | None = None,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        world_size: int = 1,
    ) -> torch.Tensor:
        """φ[z, k] = −⟨J ⊙ ∇L_val^k, c_z⟩ for every captured training sample z and target k.

        With ``grads`` (the gradient the optimizer will use, normally ``param.grad``) the
        completeness identity ⟨P, grads[p]⟩ = c · Σ_z ⟨P, c_z⟩ is checked for every parameter
        and target (see :class:`CompletenessCheck`); a uniform ratio c (clipping, loss-scale
        unscaling) is the step's rescale, stored in :attr:`grad_scale`, and the values are those
        of the rescaled step, c · φ. J must then be evaluated at ``grads``.

        Args:
            J: the preconditioning map: a float for every parameter (the SGD proxy −lr), or a
                mapping parameter -> tensor broadcastable to the parameter, or float.
            val_grads: K dicts parameter -> ∇L_val^k (from :func:`validation_gradients`). May be
                omitted when the K targets were captured with :meth:`capture_val`; the dense path
                then rebuilds ∇L_val from the captured pass.
            grads: parameter -> gradient ``[*param.shape]`` for every parameter the step moves
                (J ≠ 0); ``None`` skips the check (c = 1).
            val_losses: the K validation losses, if known: a mismatch far below the resolution
                of L_val in the computation dtype is rounding, not an uncaptured gradient.
            all_reduce, world_size: under data parallelism (``grads`` averaged over W ranks), a
                function summing a float64 tensor over ranks; the captured side is then summed
                over ranks and divided by W before the check (a collective call on every rank).
        Returns:
            Tensor ``[n_total, K]``: micro-batches in capture order, samples in batch order.
        Raises:
            GhostEngineError: called during a capture; no training backward captured; neither
                ``val_grads`` nor a validation capture; K mismatch; a backward with
                ``create_graph=True`` ran through a tracked layer.
            IncompleteGradientError: ``grads`` is not a uniform multiple of the captured
                contributions (the message names the parameter and the likely causes).
            ValueError: J misses a parameter, does not broadcast, is not a scalar on a forced
                ``pairwise`` path; ``val_grads`` misses a parameter; mixed parameter dtypes.
        Example:
            The ghost values equal −⟨J ⊙ ∇L_val, c_z⟩ with per-sample gradients c_z built by hand:

            >>> torch.manual_seed(0) and None
            >>> model = nn.Linear(3, 2).double()
            >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
            >>> engine = GhostEngine(model)
            >>> with engine.capture_train():
            ...     ((model(x) - y) ** 2).sum().backward()
            >>> J = {p: torch.rand_like(p) for p in model.parameters()}      # any elementwise J
            >>> G = {p: torch.randn_like(p) for p in model.parameters()}     # a validation gradient
            >>> phi = engine.values(J, [G])[:, 0]
            >>> r = 2 * (model(x) - y).detach()                              # ∂loss_z/∂output
            >>> c_w, c_b = r[:, :, None] * x[:, None, :], r                  # per-sample c_z
            >>> w, b = model.weight, model.bias
            >>> ref = -((J[w] * G[w] * c_w).sum((1, 2)) + (J[b] * G[b] * c_b).sum(1))
            >>> torch.allclose(phi, ref), engine.paths_taken
            (True, {'weight': 'dense', 'bias': 'dense'})
        """
        if self._active is not None:
            raise GhostEngineError(f"values() was called inside a {self._active} capture; exit the capture first")
        stream = self._stream
        if stream is not None:
            self.check_stream()
            if val_grads is None:
                val_grads = stream.val_grads
        train = [p for p in self._train if p.has_grad]
        if not train:
            raise GhostEngineError(
                "no training backward pass was captured; run the model's forward and backward inside "
                "`with engine.capture_train():` before values()"
            )
        val_passes = [p for p in self._val if p.has_grad]
        if val_grads is not None:
            if not isinstance(val_grads, (list, tuple)):
                raise ValueError(f"val_grads must be a list of K dicts (one per validation target), got {type(val_grads).__name__}")
            K = len(val_grads)
            if val_passes and len(val_passes) != K:
                raise GhostEngineError(f"val_grads has {K} targets but {len(val_passes)} validation passes were captured; they must agree")
        elif val_passes:
            K = len(val_passes)
        else:
            raise GhostEngineError(
                "no validation gradient: pass val_grads=[...] (K dicts from validation_gradients) or capture "
                "the K validation passes with `with engine.capture_val():`"
            )
        if K == 0:
            raise ValueError("val_grads is empty; pass at least one validation target")

        self._refuse_double_backward(train)
        check = CompletenessCheck() if grads is not None else None
        if check is not None and stream is not None:
            check.entries.update(stream.check.entries)
        train_terms = [self._pass_terms(p) for p in train]
        # Dense-only engines given val_grads never read the validation factors (and so never run
        # the fallback on them).
        use_val = val_grads is None or self.needs_val_capture
        val_terms = [self._pass_terms(p)[1] if use_val else {} for p in val_passes]
        params = [p for p in self._names if any(p in t for _, t, _ in train_terms)]
        fallback = set().union(*(f for _, _, f in train_terms))
        dtype = stream.dtype if stream is not None else self._compute_dtype(params or list(self._names))
        Js = {p: self._J_of(J, p, dtype) for p in params}
        # J = 0 exactly (a trainable parameter the optimizer does not step): no contribution.
        params = [p for p in params if not Js[p].is_zero]
        device = params[0].device if params else next(iter(self._names)).device

        paths: dict[torch.Tensor, GhostPath | str] = {}
        for p in params:
            all_terms = [t for _, ts, _ in train_terms for t in ts.get(p, [])]
            vts = [vt.get(p, []) for vt in val_terms]
            paths[p] = choose_path(self._names[p], self._forced_path(self._names[p]), p, Js[p], all_terms, vts, bool(val_passes))
        contraction = stream.contraction if stream is not None else StepContraction(dtype, self.factorization)
        if stream is None:
            self.paths_taken = {}
            self.factored_errors = contraction.factored_errors
        self.paths_taken.update({self._names[p]: ("fallback" if p in fallback else str(paths[p].value)) for p in params})

        # Exact paths need P = J ⊙ ∇L_val; rebuild ∇L_val from the capture when not given.
        dense_params = [p for p in params if paths[p] in (GhostPath.DENSE, GhostPath.MATERIALIZED)]
        P: list[dict[torch.Tensor, torch.Tensor]] = [{} for _ in range(K)]
        for k in range(K):
            for p in dense_params:
                if val_grads is not None:
                    if p not in val_grads[k]:
                        raise ValueError(
                            f"val_grads[{k}] has no gradient for parameter {self._names[p]!r}; give every trained "
                            "parameter a validation gradient (zeros if the validation loss does not use it)"
                        )
                    g = val_grads[k][p]
                else:
                    g = sum((t.total(p.shape) for t in val_terms[k].get(p, [])), torch.zeros_like(p))
                P[k][p] = _precondition(Js[p], g.to(dtype), p.shape)

        blocks = []
        for n, terms, _ in train_terms:
            materialized: dict[torch.Tensor, torch.Tensor] = {}
            out = torch.zeros(n, K, dtype=dtype, device=device)
            for p, ts in terms.items():
                if p not in paths:
                    continue
                captured_dtype = _coarsest_dtype(ts) if check is not None else None
                ts = [t.to(dtype) for t in ts]
                path = paths[p]
                # Every target's dense values at once (shared per-sample work: contract_many).
                dense = contract_many(ts, [P[k][p] for k in range(K)]) if path is GhostPath.DENSE else None
                for k in range(K):
                    if path is GhostPath.DENSE:
                        v = dense[:, k]
                    elif path is GhostPath.MATERIALIZED:
                        c = materialized.get(p)
                        if c is None:
                            c = materialized[p] = sum(t.materialize(p.shape) for t in ts)
                        v = c.reshape(n, -1) @ dense_of(P[k][p]).reshape(-1)
                    else:
                        vs = [v.to(dtype) for v in val_terms[k].get(p, [])]
                        if not vs:
                            continue  # the validation loss does not reach this layer: ∇L_val = 0
                        G = None if val_grads is None else val_grads[k][p]
                        name = self._names[p]
                        v = sum(contraction.ghost_dot(p, name, t, vs, k, path, Js[p], G) for t in ts)
                    out[:, k] -= v
                    if check is not None:
                        t0 = time.perf_counter()
                        check.add_samples(self._names[p], k, v, captured_dtype=captured_dtype)
                        self.check_seconds += time.perf_counter() - t0
            blocks.append(out)
        out = torch.cat(blocks, dim=0)
        if check is not None:
            t0 = time.perf_counter()
            self._add_used_grads(check, J, grads, Js, paths, P, val_grads, val_terms, dtype, contraction, K)
            by_name = {self._names[p]: p for p in params}

            def magnitude(name: str, k: int) -> float:
                p = by_name.get(name)
                if p is None or p not in paths:
                    return 0.0
                ts = [t for _, terms, _ in train_terms for t in terms.get(p, [])]
                Pk = P[k].get(p) if paths[p] in (GhostPath.DENSE, GhostPath.MATERIALIZED) else None
                if Pk is None:
                    vs = [v.to(dtype) for v in val_terms[k].get(p, [])]
                    if not vs:
                        return 0.0
                    Pk = self._ptilde(contraction, p, k, paths[p], Js[p], val_grads, vs)
                if isinstance(Pk, RowSparse):
                    Pk = Pk.values  # its rows: P is zero elsewhere
                return float(torch.linalg.vector_norm(Pk, dtype=torch.float64)) * sum(_term_magnitude(t) for t in ts)

            if all_reduce is not None:
                check.reduce(all_reduce, world_size)
                magnitude = None  # a refinement asked by one rank only would deadlock the others
            floor = None
            if val_losses is not None:
                eps = torch.finfo(dtype).eps
                floor = {k: 64 * eps * abs(float(loss)) / _TOLERANCE_OF(dtype) for k, loss in enumerate(val_losses)}
            self.last_check = check
            try:
                self.grad_scale = check.grad_scale(fixed=1.0 if stream is not None else None, magnitude=magnitude, noise_floor=floor)
            finally:
                self.check_seconds += time.perf_counter() - t0
            if self.grad_scale != 1.0:
                out = out * self.grad_scale
        else:
            self.grad_scale = 1.0
        if stream is not None and stream.out is not None:
            if stream.out.shape != out.shape:
                raise GhostEngineError(f"streamed values have shape {tuple(stream.out.shape)} but the step captured {tuple(out.shape)}")
            out = out + stream.out
        return out

    def _add_used_grads(self, check, J, grads, Js, paths, P, val_grads, val_terms, dtype, contraction, K) -> None:
        """⟨P, grads[p]⟩ for the completeness check, with the same P each path contracted with.

        A parameter with a gradient but no captured term (it was unfrozen after the engine was
        built, or its gradient came from a backward outside the capture) is checked against
        Σ_z ⟨P, c_z⟩ = 0, so that its uncaptured gradient is refused, not ignored.
        """
        streamed = self.streamed_params
        for p, g in grads.items():
            if p in streamed or g is None:
                continue
            name = self._names.get(p)
            if name is None:
                raise IncompleteGradientError(
                    f"a parameter of shape {tuple(p.shape)} has a gradient and is stepped by the optimizer, but it is "
                    "not a trainable parameter the tracker saw in the model, so no contribution to it is captured. "
                    "Pass the optimizer of this model only (modules added later must be part of the model)"
                )
            path = paths.get(p)
            for k in range(K):
                if path in (GhostPath.PAIRWISE, GhostPath.FACTORED):
                    vs = [v.to(dtype) for v in val_terms[k].get(p, [])]
                    if not vs:
                        continue  # ∇L_val = 0 on this layer: P = 0
                    Pk = self._ptilde(contraction, p, k, path, Js[p], val_grads, vs).reshape(p.shape)
                elif path is not None:
                    Pk = P[k][p]
                else:
                    Jp = self._J_of(J, p, dtype) if not isinstance(J, Mapping) or p in J else as_preconditioner(0.0)
                    if Jp.is_zero:
                        break  # the step does not move p
                    if val_grads is not None and p in val_grads[k]:
                        G = val_grads[k][p].to(dtype)
                    else:
                        G = sum((t.total(p.shape) for t in val_terms[k].get(p, [])), torch.zeros_like(p, dtype=dtype))
                    Pk = _precondition(Jp, G, p.shape)
                check.add_grad(name, k, *check_operands(Pk, g))

    def _ptilde(self, contraction: StepContraction, p, k, path, Jp, val_grads, vs) -> torch.Tensor:
        """P̃ of weight ``p`` for target ``k`` on the pairwise/factored path (``[R, C]``), built once per step."""
        R, C = vs[0].rows.size, vs[0].cols.size
        # ∇L_val^k of p: given, or Σ_v c_v over every captured validation term of p.
        G = val_grads[k][p] if val_grads is not None else sum(v.total(torch.Size((R, C))) for v in vs)
        return contraction.preconditioned(p, self._names[p], k, path, Jp, G, R, C)

    def _compute_dtype(self, params: list[torch.Tensor]) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(
                f"the trained parameters have several dtypes {sorted(str(d) for d in dtypes)}; pass "
                "GhostEngine(..., dtype=...) to choose the computation dtype explicitly"
            )
        return dtypes.pop()

    def _J_of(self, J: JLike, p: torch.Tensor, dtype: torch.dtype) -> Preconditioner:
        """J of ``p`` as an applied preconditioner computing in ``dtype`` (floats and tensors are wrapped)."""
        if isinstance(J, (int, float)) and not isinstance(J, bool):
            return as_preconditioner(float(J))
        if isinstance(J, Mapping):
            if p not in J:
                raise ValueError(
                    f"J has no entry for parameter {self._names[p]!r}; give J for every parameter that received "
                    "a gradient (e.g. {p: preconditioning(lin, p, p.grad, kind) for p in lin.params}), or a float"
                )
            value = J[p]
            if isinstance(value, torch.Tensor):
                try:
                    ok = torch.broadcast_shapes(value.shape, p.shape) == p.shape
                except RuntimeError:
                    ok = False
                if not ok:
                    raise ValueError(
                        f"J for parameter {self._names[p]!r} has shape {tuple(value.shape)}, which does not broadcast "
                        f"to the parameter's shape {tuple(p.shape)}"
                    )
            try:
                return as_preconditioner(value).to(dtype)
            except TypeError as e:
                raise TypeError(f"J for parameter {self._names[p]!r}: {e}") from None
        raise TypeError(f"J must be a float or a mapping parameter -> preconditioner/tensor/float, got {type(J).__name__}")

    def _forced_path(self, name: str) -> GhostPath:
        """The path asked for parameter ``name``: its own ``layer_paths`` entry, its module's, or ``path``."""
        return self.layer_paths.get(name, self.layer_paths.get(name.rpartition(".")[0], self.path))




"""One step's values: linearize the optimizer, take the validation gradient, run the estimator."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import nn

import estimators
import optimizers
from estimators import LinearizationKind, ValPoint

from estimators._sharded import reshard, sharded_validation_gradients

from ._config import AttributionConfig, EstimatorKind

#: ν above which ``route="auto"`` values a step by the exact-update game (see docs/theory.md).
DEFAULT_NONLINEARITY_THRESHOLD = 0.9

# The slopes the automatic route stands in for (the SGD proxy is optimizer-agnostic on purpose).
_AUTO_KINDS = (LinearizationKind.SECANT, LinearizationKind.TANGENT)

_PATH_OF = {
    EstimatorKind.GHOST: "auto",
    EstimatorKind.GHOST_FACTORED: "factored",
    EstimatorKind.MATERIALIZED: "materialized",
}


def as_val_batches(val_batch) -> tuple[list[tuple], bool]:
    """``(list of K (inputs, targets) batches, whether a single batch was given)``.

    Raises:
        ValueError: an empty list, a batch that is not an ``(inputs, targets)`` pair, or a
            batch with no samples.
    """
    single = isinstance(val_batch, tuple)
    batches = [val_batch] if single else list(val_batch) if isinstance(val_batch, list) else None
    if not batches:
        raise ValueError(
            "val_batch must be an (inputs, targets) tuple or a non-empty list of such tuples, "
            f"got {type(val_batch).__name__}{' (empty)' if batches == [] else ''}"
        )
    for k, b in enumerate(batches):
        if not (isinstance(b, tuple) and len(b) == 2):
            raise ValueError(f"validation batch {k} must be an (inputs, targets) tuple, got {type(b).__name__}")
        first = b[0] if isinstance(b[0], torch.Tensor) else next(iter(b[0].values()), None) if isinstance(b[0], dict) else None
        if isinstance(first, torch.Tensor) and (first.dim() == 0 or first.shape[0] == 0):
            raise ValueError(f"validation batch {k} is empty (inputs of shape {tuple(first.shape)}); give at least one sample")
    return batches, single


def _refuse_compiled(model: nn.Module) -> None:
    """torch.compile'd modules run a captured graph in which the capture hooks do not fire reliably."""
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    if compiled is not None and isinstance(model, compiled.OptimizedModule):
        raise TypeError(
            "the model is a torch.compile'd module; in-run attribution needs the layer hooks of eager "
            "execution. Pass the original module (compiled._orig_mod) and train it uncompiled while tracking."
        )


class StepComputer:
    """Owns the capture engine for one model and turns captured batches into one step's values."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        val_batches: list[tuple],
        config: AttributionConfig,
        *,
        val_train_mode: bool = False,
        strict: bool = False,
        modules=None,
    ):
        _refuse_compiled(model)
        self.model = model
        self.loss_fn = loss_fn
        self.val_batches = val_batches
        self.config = config
        #: Validation passes run with the model in train mode (default: eval mode, a deterministic loss).
        self.val_train_mode = bool(val_train_mode)
        self.engine = estimators.GhostEngine(
            model, path=_PATH_OF[config.estimator], dtype=compute_dtype(model), strict=strict, modules=modules
        )
        #: c of the last step: param.grad = c · Σ_z c_z (clipping, loss-scale unscaling), 1.0 otherwise.
        self.grad_scale = 1.0
        #: Under DDP (set by the tracker): sums a float64 tensor over ranks, and the world size.
        self.all_reduce: Callable | None = None
        self.world_size = 1
        #: Under FSDP2 (set by the tracker): parameters, gradients and optimizer state are DTensor shards.
        self.sharded = False
        #: ``"auto"``: take the exact-update route at steps whose nonlinearity ν exceeds
        #: ``nonlinearity_threshold`` (or whose update jumps at g = 0); ``"linear"``: never.
        self.route = "linear"
        self.nonlinearity_threshold = DEFAULT_NONLINEARITY_THRESHOLD
        #: sampled orders of the exact route's Shapley values
        self.exact_permutations = 32
        self.last_route: str = "linear"
        self.last_nonlinearity: float | None = None
        self.last_stderr: torch.Tensor | None = None
        self._zero_updates: dict[torch.Tensor, torch.Tensor] = {}
        #: Compute an embedding's J on the rows the step touches only (values unchanged; False: whole tables).
        self.row_restriction = True
        #: Keep each step's Δ(0) for carry_validation_gradients (set by the tracker for credit="momentum").
        self.keep_zero_updates = False
        # Set by begin_stream() for one step: J of a parameter at its .grad, and ∇L_val(θ_t).
        self._stream_slope: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | float] | None = None
        self._stream_val_grads: list[dict[torch.Tensor, torch.Tensor]] | None = None

    def params(self) -> list[torch.Tensor]:
        """Trainable parameters of the model."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype slopes and contractions are computed in (see :func:`compute_dtype`)."""
        return self.engine.dtype

    def isolated(self):
        """Context for an extra pass on the model: eval mode (unless ``val_train_mode``), RNG and buffers restored."""
        return estimators.isolated_pass(self.model, train_mode=self.val_train_mode)

    def validation_gradients(self, params, shift=None):
        """∇L_val for each validation batch (K dicts), in an isolated pass; the K losses go to ``val_losses``.

        ``shift`` (a dict the caller hands over) is emptied as it is applied: the saved originals
        and the shifts then take one model's size at a time, not two.
        """
        self.val_losses: list[float] = []
        if self.sharded:  # FSDP2: a backward of the sharded model; each rank gets its shard of ∇L_val
            with self.isolated():
                return sharded_validation_gradients(
                    self.model, self.loss_fn, self.val_batches, params=params, shift=shift, losses=self.val_losses,
                    release_shift=True,
                )
        with self.isolated():
            return estimators.validation_gradients(
                self.model, self.loss_fn, self.val_batches, params=params, shift=shift, losses=self.val_losses,
                release_shift=True,
            )

    @contextlib.contextmanager
    def capture(self):
        """Capture one (micro-)batch's forward and backward."""
        estimators.check_samples_independent(self.model)
        if self.sharded:
            reshard(self.model)  # an earlier forward without backward left FSDP2's gathered copies registered
        if self.engine.refresh():  # a layer was unfrozen or added: it is captured from this step on
            self.engine.dtype = compute_dtype(self.model)
        self.engine.mark_boundary()  # each batch context is a micro-batch of its own
        with self.engine.capture_train():
            yield

    def passes_captured(self) -> int:
        """A mark of the training passes captured so far (see :meth:`drop_passes`)."""
        return self.engine.train_passes()

    def drop_passes(self, start: int) -> None:
        """Forget the passes captured after mark ``start``."""
        self.engine.drop_train_passes(start)

    def pass_sizes(self, start: int, end: int) -> list[int | None]:
        """Samples per model call captured between two marks (``None``: no backward reached it)."""
        return self.engine.pass_sizes(start, end)

    def reset(self) -> None:
        """Drop captured tensors and the streaming set-up (after the step, successful or not)."""
        self.engine.clear()
        self._stream_slope = self._stream_val_grads = None
        self.last_lin = self.last_val_grads = self.last_moved = None
        self._zero_updates = {}

    def begin_stream(self, optimizer, *, own_hooks: bool = True) -> None:
        """Prepare the coming step's in-backward contraction (``val_point="current"`` only).

        Before the training forward, θ_t and the optimizer's state are those of the step, so
        ∇L_val(θ_t) (or at the predicted midpoint, ``val_point="predicted"``) is taken now and J of each parameter is evaluated by the engine's
        post-accumulate-grad hook at the parameter's final gradient (see ``GhostEngine.stream``).
        ``own_hooks=False`` (DistributedDataParallel): the tracker's communication hook hands
        the engine each bucket's averaged gradients instead (``GhostEngine.contract_streamed``).
        """
        if self.config.val_point not in _STREAMABLE_POINTS:
            raise ValueError(f"streaming needs val_point='current' or 'predicted', not {self.config.val_point.value!r}")
        stepped = _stepped(optimizer)
        params = [p for p in self.params() if p in stepped]
        lin = optimizers.linearize(optimizer, params=params)
        kind = self.config.linearization
        # The predicted point needs the optimizer's state only, which is the step's until step()
        shift = estimators.val_point_shift(lin, params, None, self.config.val_point)
        val_grads = self.validation_gradients(params, shift)

        def slope(p: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | float:
            # Trainable parameters outside the optimizer do not move: J = 0 (the engine then
            # needs no validation gradient for them).
            if p not in lin or grad is None:
                return 0.0
            rows = self._row_supports({p: grad}, only=p).get(p) if p.dim() and p.shape[0] >= _MIN_ROWS else None
            return estimators.preconditioning(lin, p, self._in_compute_dtype(grad), kind, rows=rows)

        self.engine.stream(val_grads, slope, own_hooks=own_hooks)
        self._stream_slope, self._stream_val_grads = slope, val_grads

    def step_values(self, optimizer, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Values ``[n, K]`` (float64) of the captured samples for the step ``optimizer`` is about to take.

        ``optimizer`` is one optimizer or a list of them (each parameter held by one).

        ``param.grad`` must hold the gradient the optimizer will use. The completeness identity
        (``GhostEngine.values(..., grads=...)``) is checked for every stepped parameter: a
        uniform rescale c (param.grad = c · Σ_z c_z: clipping, loss-scale unscaling, wherever it
        happened) is valued as part of the step, φ_z = −c ⟨J(param.grad) ⊙ ∇L_val, c_z⟩, and
        stored in :attr:`grad_scale`; anything else raises ``IncompleteGradientError``.

        The step's route is stored in :attr:`last_route`: ``"linear"`` (φ_z = −⟨P, c_z⟩),
        ``"exact"`` / ``"exact-loo"`` (the exact-update game, :func:`estimators.exact_update_values`,
        for every parameter) or ``"mixed"`` / ``"mixed-loo"`` (for some: the game is a sum over
        parameters, so each parameter's part is valued by its own route). A parameter takes the
        exact route when the configured linearization asks for it or, with :attr:`route`
        ``"auto"``, when its update's nonlinearity ν_p (:func:`estimators.update_nonlinearity`)
        exceeds :attr:`nonlinearity_threshold` or its update jumps at g = 0 (no secant exists);
        the step's ν is in :attr:`last_nonlinearity`. ``generator`` draws the permutations.
        """
        self.nonfinite_cause = None
        self.last_route, self.last_nonlinearity, self.last_stderr = "linear", None, None
        self.last_lin = self.last_val_grads = self.last_moved = None
        stepped = _stepped(optimizer)
        attributed = self.engine._names  # every trainable parameter, or those of the attributed modules
        grads = {p: p.grad for p in stepped if p.grad is not None and (p in attributed or self.engine.modules is None)}
        if self._stream_slope is not None:
            # Parameters the backward hooks did not contract (fallback, materialized path, unused).
            streamed = self.engine.streamed_params
            slopes = {p: self._stream_slope(p, p.grad) for p in self.params() if p not in streamed}
            values = self._checked_values(slopes, self._stream_val_grads, grads)
            if self.route == "auto" and self.config.linearization in _AUTO_KINDS:
                lin = optimizers.linearize(optimizer)
                bg = {p: self._batch_grad(p) for p in self.params() if p in lin}
                self.last_nonlinearity = self._update_nonlinearity(lin, bg, self._stream_val_grads)
            return values
        lin = optimizers.linearize(optimizer)
        params = [p for p in self.params() if p in lin]
        batch_grads = {p: self._batch_grad(p) for p in params}
        kind = self.config.linearization
        watch = self.route == "auto" and kind in _AUTO_KINDS  # the diagnostic is computed
        auto = watch and self.exact_available()  # and the route may switch
        # Parameters valued by the exact-update game: all of them for the exact kinds; with the
        # automatic route those whose update jumps at g = 0 (no secant) or, below, is far from linear.
        exact: set[torch.Tensor] = set(params) if kind.is_exact else set()
        slopes = {}
        supports = self._row_supports(grads)
        for p in params:
            if p in exact:
                continue
            try:
                slopes[p] = estimators.preconditioning(lin, p, batch_grads[p], kind, rows=supports.get(p))
            except optimizers.UpdateJumpError:
                if not auto:
                    raise
                exact.add(p)  # no secant across the jump
        # An exact parameter still needs a slope for the completeness check (and the rescale c):
        # the SGD proxy is the cheapest; its linear part is replaced below.
        slopes.update({p: estimators.preconditioning(lin, p, batch_grads[p], "sgd") for p in exact})
        sgd_slope = set(exact)  # parameters valued by the SGD proxy in the engine's pass
        # The secant already holds Δ(g_B) − Δ(0): the shift then needs only Δ(0).
        secant = {p: j for p, j in slopes.items() if p not in exact} if kind is LinearizationKind.SECANT else None
        # Δ(0) of each parameter, reused by carry_validation_gradients (credit="momentum" only: a
        # model-sized buffer otherwise held through the contraction for nothing)
        self._zero_updates = {}
        shift = estimators.val_point_shift(
            lin, params, batch_grads, self.config.val_point, secant=secant,
            zero_updates=self._zero_updates if self.keep_zero_updates else None,
        )
        # A trainable parameter the optimizer does not step (or that got no gradient) does not move: J = 0.
        slopes.update({p: 0.0 for p in self.params() if p not in slopes})
        if self.engine.modules is not None:  # partial values: only the attributed modules' parameters
            slopes = {p: (j if p in attributed else 0.0) for p, j in slopes.items()}
        self.engine.clear_val()  # a repeated call on one capture takes the validation passes anew
        with self.engine.capture_val() if self._val_capture_used(slopes) else contextlib.nullcontext():
            val_grads = self.validation_gradients(params, shift)
        del shift  # model-sized: not held through the contraction
        values = self._checked_values(slopes, val_grads, grads)
        moved = [p for p in params if p in grads and not optimizers.as_preconditioner(slopes[p]).is_zero]
        self.last_lin, self.last_val_grads, self.last_moved = lin, val_grads, moved
        if watch:
            parts = self._update_nonlinearity(
                lin, {p: batch_grads[p] for p in moved if p not in exact}, val_grads, per_parameter=True, rows=supports
            )
            num, den = sum(a for a, _ in parts.values()), sum(b for _, b in parts.values())
            self.last_nonlinearity = num / den if den > 0 else 0.0
            if auto:
                # A parameter whose share of the step is negligible keeps its slope (its ν is noise).
                exact |= {p for p, (a, b) in parts.items() if b > 1e-6 * den and a > self.nonlinearity_threshold * b}
        switched = [p for p in moved if p in exact and p not in sgd_slope]
        exact = [p for p in moved if p in exact]
        if switched and self.config.estimator is EstimatorKind.GHOST_FACTORED:
            # The factored path valued the switched parameters with a rank-one J, which the exact
            # part cannot subtract; value them again with the SGD proxy (exact on that path).
            slopes.update({p: estimators.preconditioning(lin, p, batch_grads[p], "sgd") for p in switched})
            values = self._checked_values(slopes, val_grads, grads)
        if exact:
            if not self.exact_available():
                raise ValueError(_no_exact_reason(self))
            values = values + self._exact_part(lin, exact, slopes, val_grads, kind, generator)
            self.last_route = _route_name(kind, len(exact) == len(moved))
        if not torch.isfinite(values).all():
            self.nonfinite_cause = _nonfinite_cause(slopes, val_grads, self.engine)
        return values

    def _exact_part(self, lin, exact, slopes, val_grads, kind, generator) -> torch.Tensor:
        """``[n, K]``: the exact-update game's values of the parameters ``exact`` minus their linear values.

        Ū is a sum over parameters and Shapley values are additive over games, so the exact
        parameters' game replaces their slope values −c ⟨J ⊙ ∇L_val, c_z⟩ in the engine's values.
        """
        K, n = len(val_grads), self.engine.n_samples
        linear = torch.zeros(n, K, dtype=torch.float64)

        def contributions():
            for p, c in self.engine.per_sample_contributions(exact, dtype=self.compute_dtype):
                J = optimizers.as_preconditioner(slopes[p])
                flat = c.reshape(n, -1)
                for k in range(K):
                    linear[:, k] -= (flat @ J.apply(val_grads[k][p].to(flat.dtype)).reshape(-1)).to(torch.float64)
                yield p, c

        game = "loo" if kind in (LinearizationKind.EXACT_LOO, LinearizationKind.TANGENT) else "shapley"
        result = estimators.exact_update_values(
            lin, contributions(), val_grads, game=game, permutations=self.exact_permutations,
            generator=generator, scale=self.grad_scale,
        )
        self.last_stderr = result.stderr
        return result.values - self.grad_scale * linear

    def carry_validation_gradients(self) -> list[dict[torch.Tensor, torch.Tensor]]:
        """∇L_val where the carried update Δ(0) of the step just valued is credited (``credit="momentum"``).

        The carried part of the step, U(∅) = L_val(θ_t) − L_val(θ_t + Δ(0)), is valued to second
        order at its own midpoint θ_t + ½ Δ(0) (at θ_t with ``val_point="current"``); the step's
        game U(B) − U(∅) keeps its own point. One more validation pass.
        """
        lin, params = self.last_lin, self.last_moved
        if self.config.val_point is ValPoint.CURRENT:
            shift = None
        else:
            zero = self._zero_updates  # Δ(0) as the step's own shift computed it, where it did
            shift = {
                p: 0.5 * (zero[p] if p in zero else lin.zero_update(p).detach())
                for p in params
            }
        losses = getattr(self, "val_losses", None)
        try:
            return self.validation_gradients(params, shift)
        finally:
            self.val_losses = losses

    def _update_nonlinearity(self, lin, batch_grads, val_grads, *, per_parameter: bool = False, rows=None):
        """:func:`estimators.update_nonlinearity`; under FSDP2 on each rank's shards, summed over ranks.

        ``rows``: the row supports of :meth:`_row_supports` (ν of a table sampled on its touched rows).
        """
        if not self.sharded:
            return estimators.update_nonlinearity(lin, batch_grads, val_grads, per_parameter=per_parameter, rows=rows)
        from ._distributed import sharded_update_nonlinearity

        return sharded_update_nonlinearity(lin, batch_grads, val_grads, self.all_reduce, per_parameter=per_parameter)

    def exact_available(self) -> bool:
        """Whether the exact-update route can value this tracker's steps (per-sample contributions exist)."""
        return self.world_size == 1 and self._stream_slope is None

    def _checked_values(self, slopes, val_grads, grads) -> torch.Tensor:
        """The engine's values ``[n, K]`` (float64) with the completeness check against ``grads``; sets :attr:`grad_scale`."""
        values = self.engine.values(
            slopes, val_grads, grads=grads, val_losses=self.val_losses, all_reduce=self.all_reduce, world_size=self.world_size
        )
        self.grad_scale = self.engine.grad_scale
        return values.to(torch.float64)

    def _row_supports(self, grads, only: torch.Tensor | None = None) -> dict[torch.Tensor, torch.Tensor]:
        """Rows of large, sparsely touched parameters (embeddings) where the step's J is needed.

        Every sample's contribution to such a parameter lies on the rows its tokens hit
        (``GhostEngine.row_supports``), so the slope is computed there only
        (:func:`estimators.preconditioning` with ``rows``) and every value is unchanged. Taken only
        when the gradient itself is zero outside those rows: otherwise a part of it was not
        captured, and the dense J lets the completeness check see that part. Dense estimators only
        (the factored path fits J as a whole). ``only``: this parameter's support alone (the streamed
        contraction asks in its backward hook, when the parameter's gradient is final).
        """
        if not self.row_restriction or self.sharded or self.config.estimator not in (EstimatorKind.GHOST, EstimatorKind.MATERIALIZED):
            return {}  # (FSDP2: each rank holds a shard of the table's rows; not implemented there)
        out = {}
        for p, rows in self.engine.row_supports(_MIN_ROWS, only=only).items():
            g = grads.get(p)
            if g is None or 2 * len(rows) > p.shape[0]:
                continue
            # Exact and one pass: every nonzero entry of the gradient lies on the rows.
            if int(torch.count_nonzero(g)) == int(torch.count_nonzero(g.index_select(0, rows))):
                out[p] = rows
        return out

    def _batch_grad(self, p: torch.Tensor) -> torch.Tensor:
        """``p.grad`` in the computation dtype (float32 for half-precision parameters)."""
        return self._in_compute_dtype(p.grad)

    def _in_compute_dtype(self, grad: torch.Tensor) -> torch.Tensor:
        return grad if self.compute_dtype is None else grad.to(self.compute_dtype)

    def _val_capture_used(self, slopes) -> bool:
        """Whether the engine may read a captured validation pass for these slopes.

        ``ghost`` (path ``auto``) takes the pairwise path only for a weight whose J is one number
        (SGD, the SGD proxy); with a diagonal or operator J everywhere (Adam, Muon) every weight
        is dense, so the validation activations and output gradients need not be kept.
        """
        if not self.engine.needs_val_capture or self.sharded:  # FSDP2: the dense path, with P gathered per layer
            return False
        if self.config.estimator is not EstimatorKind.GHOST:
            return True
        return any((J := optimizers.as_preconditioner(j)).scalar is not None and not J.is_zero for j in slopes.values())


class UnsteppedParameterWarning(UserWarning):
    """A trainable parameter that gets a gradient is held by none of the given optimizers.

    It is valued as not moving (J = 0). If another optimizer steps it (Muon on the matrices and
    AdamW on the rest), pass that optimizer too: ``InRunShapley(model, [muon, adamw], ...)``.
    """


def warn_unstepped(model: nn.Module, optimizer, params=None, *, stacklevel: int = 3) -> None:
    """Warn, naming them, about trainable parameters (or ``params``) that no given optimizer holds."""
    stepped = {id(p) for p in _stepped(optimizer)}
    candidates = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    wanted = {id(p) for p in candidates}
    names = [n for n, p in model.named_parameters() if id(p) in wanted and id(p) not in stepped]
    if names:
        shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(
            f"trainable parameter(s) {shown} are held by none of the given optimizers: they count as not moving "
            "(no sample is credited for them). If another optimizer steps them, pass that optimizer too "
            "(a list: [muon, adamw]); if they are meant to stay fixed, freeze them with requires_grad_(False)",
            UnsteppedParameterWarning,
            stacklevel=stacklevel,
        )


def _stepped(optimizer) -> set[torch.Tensor]:
    """The parameters held by ``optimizer`` (one optimizer or a list of them)."""
    opts = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    return {p for opt in opts for group in opt.param_groups for p in group["params"]}


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of slopes and contractions: the widest of the trainable parameters' dtypes, at least float32.

    Half-precision parameters (fp16/bf16) are valued in float32, never in half; a model mixing
    float32 and float64 parameters is valued in float64.

    Example:
        >>> compute_dtype(nn.Linear(2, 2).bfloat16()), compute_dtype(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double()))
        (torch.float32, torch.float64)
    """
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()}
    return torch.float64 if torch.float64 in dtypes else torch.float32


#: Validation points known before the backward pass (so the contraction can stream).
_STREAMABLE_POINTS = (ValPoint.CURRENT, ValPoint.PREDICTED)

#: Parameters with fewer rows keep their whole J (a restriction would save little).
_MIN_ROWS = 1024


def _route_name(kind: LinearizationKind, every: bool) -> str:
    """``"exact"`` / ``"exact-loo"`` when every moved parameter took the exact route, ``"mixed"`` / ``"mixed-loo"`` otherwise."""
    loo = kind in (LinearizationKind.EXACT_LOO, LinearizationKind.TANGENT)
    return ("exact" if every else "mixed") + ("-loo" if loo else "")


def _no_exact_reason(computer: StepComputer) -> str:
    if computer.world_size > 1:
        return (
            "the exact-update route needs every sample's contribution in one process; under "
            "DistributedDataParallel or fully_shard each rank holds only its own. Use linearization='secant' (or 'tangent')"
        )
    return (
        "the exact-update route needs the captured per-sample factors, which stream=True releases during the "
        "backward pass; use stream=False"
    )


def _nonfinite_cause(slopes, val_grads, engine) -> str:
    """Which input of φ = −⟨J ⊙ ∇L_val, c_z⟩ is not finite, for the skipped-step warning."""
    names = engine._names
    for p, j in slopes.items():
        d = optimizers.as_preconditioner(j).diagonal
        if isinstance(d, torch.Tensor) and not torch.isfinite(d).all():
            return f"the optimizer's slope J of parameter {names.get(p, '?')!r} is not finite (NaN/inf in its state)"
    for k, grads in enumerate(val_grads):
        for p, g in grads.items():
            if not torch.isfinite(g).all():
                return (
                    f"the validation gradient of target {k} is not finite at parameter {names.get(p, '?')!r} "
                    "(NaN/inf in the validation loss at the step's validation point)"
                )
    return "the captured activations or output gradients of the training batch are not finite"


def step_values(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    loss_fn: Callable,
    batch: tuple,
    val_batch,
    *,
    linearization: LinearizationKind | str = "secant",
    val_point: ValPoint | str = "midpoint",
    estimator: str = "ghost",
    permutations: int = 32,
    seed: int = 0,
    route: str = "linear",
    nonlinearity_threshold: float | None = None,
) -> torch.Tensor:
    """Per-sample values of ``batch`` for the step ``optimizer`` is about to take.

        φ_z = −⟨J ⊙ ∇L_val(θ*), c_z⟩,   J = tangent, secant or −lr of the update under the
        optimizer's current state, θ* = θ_t (current), θ_t + Δ(g_B) (lookahead),
        θ_t + ½(Δ(g_B) + Δ(0)) (midpoint) or θ_t + ½(Δ(ĝ) + Δ(0)) (predicted), c_z = sample z's
        share of ∇loss_fn on ``batch``.

    The model's parameters, their ``.grad`` and the optimizer's state are left exactly as found.

    Args:
        model, optimizer, loss_fn: as in training; ``loss_fn(model(inputs), targets)`` -> scalar.
            ``optimizer`` may be a list (Muon on the matrices and AdamW on the rest): each
            parameter must be held by exactly one; a parameter with a gradient that none holds
            counts as not moving, with an :class:`UnsteppedParameterWarning`.
        batch: ``(inputs, targets)`` with n samples.
        val_batch: ``(inputs, targets)``, or a list of K such batches.
        linearization: ``"tangent"``, ``"secant"`` or ``"sgd"`` (the SGD proxy −lr); or
            ``"exact"`` / ``"exact-loo"``: no slope, the Shapley values (permutation sampled) or
            leave-one-out marginals of the exact-update game Ū(S) = −⟨∇L_val(θ*), Δ(g_S)⟩, the
            optimizer's real update under its frozen state for each coalition (for steps no
            single J fits: Adam's first steps, Muon's first step; cost n + 1 updates per order).
        val_point: ``"current"``, ``"lookahead"``, ``"midpoint"`` or ``"predicted"`` (θ_t + ½(Δ(ĝ) + Δ(0)),
            ĝ the optimizer's prediction of the batch gradient: the bias-corrected first moment of Adam, AdamW, NAdam, RAdam, Adamax).
        estimator: ``"ghost"``, ``"ghost-factored"`` or ``"materialized"``.
        permutations, seed: sampled orders of ``"exact"`` and the seed of their own generator
            (the global RNG is not used).
        route, nonlinearity_threshold: ``"linear"`` (default here): the slope asked for;
            ``"auto"``: what :class:`InRunShapley` does by default, the exact-update game for each
            parameter whose update's nonlinearity ν_p exceeds the threshold (default
            :data:`DEFAULT_NONLINEARITY_THRESHOLD`) or jumps at g = 0.
    Returns:
        float64 tensor ``[n]`` (one validation batch) or ``[n, K]``; positive = the sample
        reduces validation loss.
    Raises:
        ValueError: unknown option values (the message lists the accepted ones), empty batches.
        SampleInteractionError: BatchNorm with batch statistics; a loss that couples samples
            (``LossCouplingError``, e.g. in-batch negatives).
        UnsupportedOptimizerError: an optimizer or flag with no linearization.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0) and None
        >>> model = nn.Linear(4, 3); opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> phi = step_values(model, opt, nn.functional.cross_entropy, (x[:5], y[:5]), (x[5:], y[5:]))
        >>> phi.shape, phi.dtype
        (torch.Size([5]), torch.float64)
    """
    config = AttributionConfig(linearization, val_point, estimator)
    if permutations < 1:
        raise ValueError(f"permutations={permutations} must be at least 1")
    if route not in ("auto", "linear"):
        raise ValueError(f"route={route!r} is not accepted; use 'linear' (default) or 'auto'")
    optimizers.as_optimizer_list(optimizer)  # each parameter held by exactly one optimizer
    val_batches, single = as_val_batches(val_batch)
    inputs, targets = batch
    saved_grads = {p: None if p.grad is None else p.grad.detach().clone() for p in model.parameters()}
    computer = StepComputer(model, loss_fn, val_batches, config)
    computer.exact_permutations = permutations
    computer.route = route
    if nonlinearity_threshold is not None:
        computer.nonlinearity_threshold = float(nonlinearity_threshold)
    try:
        for p in model.parameters():
            p.grad = None
        with computer.capture():
            outputs = model(inputs)
            estimators.check_loss_additive(loss_fn, outputs, targets, what="the training batch")
            loss_fn(outputs, targets).backward()
        warn_unstepped(model, optimizer, [p for p in model.parameters() if p.grad is not None])
        values = computer.step_values(optimizer, generator=torch.Generator().manual_seed(seed))
    finally:
        computer.reset()
        for p, g in saved_grads.items():
            p.grad = g
    return values[:, 0] if single else values

"""One step's values: linearize the optimizer, take the validation gradient, run the estimator."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

import estimators
import optimizers
from estimators import LinearizationKind, ValPoint

from ._config import AttributionConfig, EstimatorKind

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

    def __init__(self, model: nn.Module, loss_fn: Callable, val_batches: list[tuple], config: AttributionConfig):
        _refuse_compiled(model)
        self.model = model
        self.loss_fn = loss_fn
        self.val_batches = val_batches
        self.config = config
        # Half-precision parameters (fp16/bf16): values are computed in float32, never in half.
        half = {p.dtype for p in model.parameters() if p.requires_grad} & {torch.float16, torch.bfloat16}
        self.compute_dtype = torch.float32 if half else None
        self.engine = estimators.GhostEngine(model, path=_PATH_OF[config.estimator], dtype=self.compute_dtype)
        # Set by begin_stream() for one step: J of a parameter at its .grad, and ∇L_val(θ_t).
        self._stream_slope: Callable[[torch.Tensor], torch.Tensor | float] | None = None
        self._stream_val_grads: list[dict[torch.Tensor, torch.Tensor]] | None = None

    def params(self) -> list[torch.Tensor]:
        """Trainable parameters of the model."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def capture(self):
        """Capture one (micro-)batch's forward and backward."""
        estimators.check_samples_independent(self.model)
        with self.engine.capture_train():
            yield

    def reset(self) -> None:
        """Drop captured tensors and the streaming set-up (after the step, successful or not)."""
        self.engine.clear()
        self._stream_slope = self._stream_val_grads = None

    def begin_stream(self, optimizer: torch.optim.Optimizer) -> None:
        """Prepare the coming step's in-backward contraction (``val_point="current"`` only).

        Before the training forward, θ_t and the optimizer's state are those of the step, so
        ∇L_val(θ_t) is taken now and J of each parameter is evaluated by the engine's
        post-accumulate-grad hook at the parameter's final gradient (see ``GhostEngine.stream``).
        """
        if self.config.val_point is not ValPoint.CURRENT:
            raise ValueError(f"streaming needs val_point='current', not {self.config.val_point.value!r}")
        stepped = {p for group in optimizer.param_groups for p in group["params"]}
        params = [p for p in self.params() if p in stepped]
        lin = optimizers.linearize(optimizer, params=params)
        kind = self.config.linearization
        val_grads = estimators.validation_gradients(self.model, self.loss_fn, self.val_batches, params=params)

        def slope(p: torch.Tensor) -> torch.Tensor | float:
            # Trainable parameters outside the optimizer do not move: J = 0 (the engine then
            # needs no validation gradient for them).
            if p not in lin or p.grad is None:
                return 0.0
            return estimators.preconditioning(lin, p, self._batch_grad(p), kind)

        self.engine.stream(val_grads, slope)
        self._stream_slope, self._stream_val_grads = slope, val_grads

    def step_values(self, optimizer: torch.optim.Optimizer, *, grad_scale: float = 1.0) -> torch.Tensor:
        """Values ``[n, K]`` (float64) of the captured samples for the step ``optimizer`` is about to take.

        ``param.grad`` must hold the gradient the optimizer will use; ``grad_scale`` is c in
        param.grad = c · Σ_z c_z (1 for no clipping).
        """
        if self._stream_slope is not None:
            if grad_scale != 1.0:
                raise ValueError(f"a streamed step cannot be rescaled after the backward pass (grad_scale={grad_scale})")
            # Parameters the backward hooks did not contract (fallback, materialized path, unused).
            streamed = self.engine.streamed_params
            slopes = {p: self._stream_slope(p) for p in self.params() if p not in streamed}
            return self.engine.values(slopes, self._stream_val_grads).to(torch.float64)
        lin = optimizers.linearize(optimizer)
        params = [p for p in self.params() if p in lin]
        grads = {p: self._batch_grad(p) for p in params}
        kind = self.config.linearization
        slopes = {p: estimators.preconditioning(lin, p, grads[p], kind) for p in params}
        # The secant already holds Δ(g_B) − Δ(0): the shift then needs only Δ(0).
        shift = estimators.val_point_shift(
            lin, params, grads, self.config.val_point, secant=slopes if kind is LinearizationKind.SECANT else None
        )
        if grad_scale != 1.0:
            slopes = {p: j * grad_scale for p, j in slopes.items()}
        # A trainable parameter the optimizer does not step (or that got no gradient) does not move: J = 0.
        slopes.update({p: 0.0 for p in self.params() if p not in slopes})
        with self.engine.capture_val() if self._val_capture_used(slopes) else contextlib.nullcontext():
            val_grads = estimators.validation_gradients(self.model, self.loss_fn, self.val_batches, params=params, shift=shift)
        return self.engine.values(slopes, val_grads).to(torch.float64)

    def _batch_grad(self, p: torch.Tensor) -> torch.Tensor:
        """``p.grad`` in the computation dtype (float32 for half-precision parameters)."""
        return p.grad if self.compute_dtype is None else p.grad.to(self.compute_dtype)

    def _val_capture_used(self, slopes) -> bool:
        """Whether the engine may read a captured validation pass for these slopes.

        ``ghost`` (path ``auto``) takes the pairwise path only for a weight whose J is one number
        (the SGD proxy); with an elementwise J everywhere (Adam) every weight is dense, so the
        validation activations and output gradients need not be kept.
        """
        if not self.engine.needs_val_capture:
            return False
        if self.config.estimator is not EstimatorKind.GHOST:
            return True
        return any(
            (not isinstance(j, torch.Tensor) and j != 0.0) or (isinstance(j, torch.Tensor) and (j.numel() <= 1 or bool((j == j.reshape(-1)[0]).all())))
            for j in slopes.values()
        )


def step_values(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    batch: tuple,
    val_batch,
    *,
    linearization: LinearizationKind | str = "secant",
    val_point: ValPoint | str = "midpoint",
    estimator: str = "ghost",
) -> torch.Tensor:
    """Per-sample values of ``batch`` for the step ``optimizer`` is about to take.

        φ_z = −⟨J ⊙ ∇L_val(θ*), c_z⟩,   J = tangent, secant or −lr of the update under the
        optimizer's current state, θ* = θ_t (current), θ_t + Δ(g_B) (lookahead) or
        θ_t + ½(Δ(g_B) + Δ(0)) (midpoint), c_z = sample z's share of ∇loss_fn on ``batch``.

    The model's parameters, their ``.grad`` and the optimizer's state are left exactly as found.

    Args:
        model, optimizer, loss_fn: as in training; ``loss_fn(model(inputs), targets)`` -> scalar.
        batch: ``(inputs, targets)`` with n samples.
        val_batch: ``(inputs, targets)``, or a list of K such batches.
        linearization: ``"tangent"``, ``"secant"`` or ``"sgd"`` (the SGD proxy −lr).
        val_point: ``"current"``, ``"lookahead"`` or ``"midpoint"``.
        estimator: ``"ghost"``, ``"ghost-factored"`` or ``"materialized"``.
    Returns:
        float64 tensor ``[n]`` (one validation batch) or ``[n, K]``; positive = the sample
        reduces validation loss.
    Raises:
        ValueError: unknown option values (the message lists the accepted ones), empty batches.
        SampleInteractionError: BatchNorm in train mode.
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
    val_batches, single = as_val_batches(val_batch)
    inputs, targets = batch
    saved_grads = {p: None if p.grad is None else p.grad.detach().clone() for p in model.parameters()}
    computer = StepComputer(model, loss_fn, val_batches, config)
    try:
        for p in model.parameters():
            p.grad = None
        with computer.capture():
            loss_fn(model(inputs), targets).backward()
        values = computer.step_values(optimizer)
    finally:
        computer.reset()
        for p, g in saved_grads.items():
            p.grad = g
    return values[:, 0] if single else values

"""The generic first-order estimator: φ_z = −⟨J ⊙ ∇L_val, c_z⟩ from any per-sample source.

Everything here is optimizer-agnostic: J comes from a linearization (anything with the
``tangent``/``secant``/``update``/``learning_rate`` methods of ``optimizers.linearize``), and
the per-sample contributions c_z come either from :func:`per_sample_grads` (materialized, the
reference path) or from the ghost engine.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from optimizers._preconditioner import Preconditioner, RowDiagonal, alone_on_storage, as_preconditioner

from ._config import LinearizationKind, PerSampleMethod, Reduction, ValPoint, parse_enum
from ._errors import NoGradientPredictionError
from persample import PerSampleGrads, check_samples_independent, sample_contributions

# The project's loss convention (as in a training loop): loss_fn(model(inputs), targets) -> scalar,
# with batches given as (inputs, targets); inputs may be any pytree the model accepts.
LossFn = Callable[[Any, Any], torch.Tensor]


def batch_loss(model: nn.Module, loss_fn: LossFn, batch: Any) -> torch.Tensor:
    """``loss_fn(model(inputs), targets)`` for ``batch = (inputs, targets)``.

    Raises:
        ValueError: ``batch`` is not an ``(inputs, targets)`` pair.
    """
    _check_pair(batch)
    inputs, targets = batch
    return loss_fn(model(inputs), targets)


def _check_pair(batch: Any) -> None:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            f"a batch must be an (inputs, targets) pair, got {type(batch).__name__}"
            f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}; the loss is "
            "loss_fn(model(inputs), targets)"
        )


def preconditioning(
    lin: Any, param: torch.Tensor, batch_grad: torch.Tensor, kind: LinearizationKind | str, rows: torch.Tensor | None = None
) -> Preconditioner:
    """The applied preconditioner Jᵀ of ``param`` for one step (what every estimator consumes).

    * tangent: J = ∂Δ/∂g at g_B;  * secant: J = ∫₀¹ ∂Δ/∂g(s g_B) ds, for elementwise rules the
      chord (Δ(g_B) − Δ(0)) ⊘ g_B;  * sgd: J = −η.

    Args:
        lin: a linearization (``optimizers.linearize(optimizer)``) read before ``step()``.
        param: a parameter covered by ``lin``, shape ``S``.
        batch_grad: the batch gradient g_B of ``param`` (what ``param.grad`` holds), shape ``S``.
        kind: a :class:`LinearizationKind` or its string value.
        rows: optional ``int64`` dim-0 rows outside which every vector J meets is zero (the rows an
            embedding's tokens hit): J is computed there only and is 0 elsewhere
            (``lin.preconditioner_on_rows``), exact for those vectors.
    Returns:
        An ``optimizers.Preconditioner``: ``Scalar`` (sgd), ``Diagonal`` (elementwise rules) or
        ``Operator`` (Muon, Adafactor); ``.apply(v)`` gives Jᵀ v, shape ``S``.
    Raises:
        ValueError: ``kind`` is not one of the accepted values.
    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> opt = torch.optim.Adam([w], lr=0.1); w.grad = torch.tensor([0.3, -0.1], dtype=torch.float64)
        >>> import optimizers
        >>> J = preconditioning(optimizers.linearize(opt), w, w.grad, "secant")
        >>> J.kind, J.apply(torch.ones(2, dtype=torch.float64)).shape
        ('diagonal', torch.Size([2]))
    """
    kind = parse_enum(LinearizationKind, kind, "kind")
    if kind.is_exact:
        raise ValueError(
            f"kind={kind.value!r} values the exact-update game and has no slope J to precondition with; use "
            "estimators.exact_update_values (or step_values / InRunShapley with linearization='exact')"
        )
    if rows is not None and hasattr(lin, "preconditioner_on_rows"):
        return lin.preconditioner_on_rows(param, batch_grad, kind.value, rows)
    if hasattr(lin, "preconditioner"):
        return lin.preconditioner(param, batch_grad, kind.value)
    # A duck-typed linearization with tensor slopes only (tangent/secant/learning_rate).
    if kind is LinearizationKind.TANGENT:
        return as_preconditioner(lin.tangent(param, batch_grad))
    if kind is LinearizationKind.SECANT:
        return as_preconditioner(lin.secant(param, batch_grad))
    return as_preconditioner(-float(lin.learning_rate(param)))


def val_point_shift(
    lin: Any,
    params: Iterable[torch.Tensor],
    batch_grads: Mapping[torch.Tensor, torch.Tensor] | None,
    val_point: ValPoint | str,
    *,
    secant: Mapping[torch.Tensor, torch.Tensor | float] | None = None,
    zero_updates: dict[torch.Tensor, torch.Tensor] | None = None,
) -> dict[torch.Tensor, torch.Tensor] | None:
    """The parameter shift at which the validation gradient is taken (DESIGN section 2).

    * current: no shift (``None``);  * lookahead: Δ(g_B);  * midpoint: ½(Δ(g_B) + Δ(0));
    * predicted: ½(Δ(ĝ) + Δ(0)), ĝ = ``lin.predicted_gradient(p)`` (``batch_grads`` unused).

    When the step's secant slopes are already known, Δ(g_B) − Δ(0) = J_sec ⊙ g_B by definition,
    so the shift is Δ(0) + J_sec ⊙ g_B (lookahead) or Δ(0) + ½ J_sec ⊙ g_B (midpoint): one
    evaluation of the update per parameter instead of two (equal up to rounding).

    Args:
        lin: a linearization read before ``step()``.
        params: the parameters to shift (those covered by ``lin``; others do not move in a step).
        batch_grads: g_B per parameter; ``None`` reads ``param.grad``.
        val_point: a :class:`ValPoint` or its string value.
        secant: optional secant preconditioners per parameter (``preconditioning(lin, p, g_B, "secant")``
            at the same g_B, before any rescaling); parameters missing from it, and operator
            secants (whose J g_B is a quadrature, not Δ(g_B) − Δ(0) to the last digit), use two updates.
        zero_updates: a dict to receive Δ(0) of each parameter where the shift computed it (midpoint,
            or lookahead with a secant), for callers that need it again.
    Returns:
        ``None`` for ``current``, else a dict parameter -> shift (shape of the parameter).
    Raises:
        ValueError: ``val_point`` is not accepted, or a parameter has no gradient.
    Example:
        >>> shift = val_point_shift(lin, lin.params, None, "lookahead")  # doctest: +SKIP
    """
    val_point = parse_enum(ValPoint, val_point, "val_point")
    if val_point is ValPoint.CURRENT:
        return None
    shift: dict[torch.Tensor, torch.Tensor] = {}

    def zero_update(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Δ(0), by the rule's shortcut where the linearization has one (a duck-typed one may not)."""
        return lin.zero_update(q) if hasattr(lin, "zero_update") else lin.update(q, torch.zeros_like(g))

    params = list(params)
    if val_point is ValPoint.PREDICTED:
        # The midpoint with g_B replaced by ĝ; the secant slopes (at g_B) do not apply at ĝ
        batch_grads, secant, val_point = {p: _predicted_gradient(lin, p) for p in params}, None, ValPoint.MIDPOINT
    for p in params:
        g = p.grad if batch_grads is None else batch_grads.get(p)
        if g is None:
            raise ValueError(
                f"parameter of shape {tuple(p.shape)} has no batch gradient; pass it in batch_grads "
                "or run backward() first, or leave it out of params"
            )
        J = None if secant is None or p not in secant else as_preconditioner(secant[p])
        scale = 0.5 if val_point is ValPoint.MIDPOINT else 1.0
        if isinstance(J, RowDiagonal) and zero_updates is None and hasattr(lin, "chord_shift_on_rows"):
            # J is zero off the touched rows (so is g_B): Δ(0), with the chord added on the rows only
            shift[p] = lin.chord_shift_on_rows(p, J, g, scale).detach()
            continue
        diagonal = None if J is None else J.diagonal
        if diagonal is not None and zero_updates is None and isinstance(diagonal, torch.Tensor) and hasattr(lin, "chord_shift"):
            # Δ(0) + s·(J_sec ⊙ g_B) in the rule's own (possibly fused, one-pass) form: nobody needs Δ(0) alone
            step, zero = lin.chord_shift(p, diagonal, g, scale), None
        elif diagonal is not None:
            zero = zero_update(p, g)
            # Δ(0) + s·(J_sec ⊙ g_B), s = ½ or 1 (exact scalings: the same bits as adding the chord);
            # one addcmul for a tensor J, a scalar secant (SGD) scales g
            if isinstance(diagonal, torch.Tensor):
                step = torch.addcmul(zero, diagonal, g.to(zero.dtype), value=scale)
            else:
                step = torch.add(zero, diagonal * g, alpha=scale)
        else:
            step, zero = lin.update(p, g), None
            if val_point is ValPoint.MIDPOINT:
                zero = zero_update(p, g)
                step = torch.add(step, zero).mul_(0.5)
        if zero_updates is not None and zero is not None:
            zero_updates[p] = zero.detach()
        shift[p] = step.detach()
    return shift


def _predicted_gradient(lin: Any, p: torch.Tensor) -> torch.Tensor:
    """ĝ = ``lin.predicted_gradient(p)``, the optimizer's prediction of p's coming gradient.

    Raises:
        NoGradientPredictionError: the optimizer of ``p`` keeps no prediction of its gradient.
    """
    predict = getattr(lin, "predicted_gradient", None)
    g_hat = predict(p) if predict is not None else None
    if g_hat is None:
        owner = lin.owner(p) if hasattr(lin, "owner") else lin
        name = getattr(getattr(owner, "optimizer_class", None), "__name__", type(owner).__name__)
        raise NoGradientPredictionError(
            f"val_point='predicted' needs the optimizer's prediction of the coming gradient (its first moment), "
            f"which {name} does not keep for a parameter of shape {tuple(p.shape)}; use val_point='midpoint' "
            "(stream=False) or 'current', or an optimizer that keeps one (Adam, AdamW, NAdam, RAdam, Adamax)"
        )
    return g_hat


@contextlib.contextmanager
def shifted_parameters(shift: Mapping[torch.Tensor, torch.Tensor] | None, *, release: bool = False) -> Iterator[None]:
    """Temporarily move parameters by ``shift``; restore them bit-exactly on exit.

    Subtracting the shift again would not restore θ exactly in floating point. Each plain
    parameter is pointed at a new tensor θ + shift (``param.data``) and back at its own
    untouched storage on exit: one pass over the parameter, where saving a copy, adding in place
    and copying back take three. When any parameter shares its storage (two ``Parameter``
    objects viewing one buffer, which the optimizer moves by both updates, or a view of it
    that a module keeps) or is a sharded ``DTensor``, all are moved in place and copied back.

    Args:
        shift: parameter -> its shift (the parameter's shape), or ``None`` / empty for none.
        release: pop each shift out of ``shift`` (a dict) once it is applied, so that a caller
            that holds no other reference frees it then: the saved originals and the shifts
            together take one model's size at a time instead of two.

    Raises:
        ValueError: a shift's shape differs from its parameter's.
    Example:
        >>> with shifted_parameters({w: torch.ones_like(w)}):  # doctest: +SKIP
        ...     loss = model(x).sum()
    """
    if not shift:
        yield
        return
    for p, s in shift.items():
        if s.shape != p.shape:
            raise ValueError(f"shift of shape {tuple(s.shape)} for a parameter of shape {tuple(p.shape)}; shapes must match")
    swap = _storage_swappable(list(shift))
    saved, swapped = {}, {}
    try:
        with torch.no_grad():
            for p in list(shift):
                s = (shift.pop(p) if release else shift[p]).to(p.dtype)
                if swap:
                    # The same bits as p.add_(s) (IEEE addition commutes), into a tensor of p's
                    # layout; p's own storage is kept. A handed-over shift nothing else sees
                    # takes the sum itself: no fresh allocation (a large one is mapped anew and
                    # page-faulted on every step).
                    if release and _sole_owner(s, p):
                        moved = s.add_(p.detach())
                    else:
                        moved = torch.add(p.detach(), s, out=torch.empty_like(p.detach()))
                    swapped[p], p.data = p.data, moved
                else:
                    saved[p] = p.detach().clone()
                    p.add_(s)
                del s
        yield
    finally:
        with torch.no_grad():
            for p, original in swapped.items():
                p.data = original
            # Last moved, first restored: a copy saved after an overlapping view was moved holds
            # that move, which the earlier view's restore then undoes.
            for p, original in reversed(saved.items()):
                p.copy_(original)


def _sole_owner(s: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether ``s`` may be overwritten and become ``p``'s data: p's layout, and no other reference to it or its memory.

    No other Python name for the tensor (the caller's variable, this argument and
    ``getrefcount``'s own make three) and no other tensor on its storage (a view, a detached
    alias: the storage's use count is this tensor's and the temporary storage object's).
    """
    return (
        type(s) is torch.Tensor
        and not s.requires_grad
        and not s._is_view()
        and s.storage_offset() == 0
        and s.shape == p.shape
        and s.stride() == p.stride()
        and s.dtype == p.dtype
        and s.device == p.device
        and sys.getrefcount(s) <= 3
        and alone_on_storage(s)
    )


def _storage_swappable(params: list[torch.Tensor]) -> bool:
    """Whether every parameter is a plain dense tensor alone on its storage (see :func:`shifted_parameters`).

    Alone: no other parameter and no other tensor views its memory (a view a module cached,
    a flat buffer the parameters are carved from). Such a view would keep reading θ after
    ``param.data`` points elsewhere; moved in place, it reads the shifted point as training would.
    """
    for p in params:
        if type(p.data) is not torch.Tensor or p.layout is not torch.strided:
            return False  # a DTensor shard, a sparse or other subclass tensor
        if not alone_on_storage(p):
            return False
    return True


def validation_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    val_batches: Sequence[Any],
    *,
    shift: Mapping[torch.Tensor, torch.Tensor] | None = None,
    params: Iterable[torch.Tensor] | None = None,
    engine: Any = None,
    losses: list[float] | None = None,
    release_shift: bool = False,
) -> list[dict[torch.Tensor, torch.Tensor]]:
    """∇L_val for each of K validation targets, optionally at shifted parameters.

    Each target k is one forward/backward of ``loss_fn(model(inputs_k), targets_k)`` (its own
    graph, so targets never mix). Parameters are shifted in place for the evaluation and restored
    exactly (see :func:`shifted_parameters`).

    Args:
        model: the model.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar`` validation loss.
        val_batches: K ``(inputs, targets)`` batches (a list; wrap a single batch in a list).
        shift: parameter -> shift (from :func:`val_point_shift`), or ``None``.
        params: parameters to differentiate; default every parameter with ``requires_grad``.
        engine: a :class:`GhostEngine`; when given, each target runs inside
            ``engine.capture_val()`` so the pairwise and factored paths see it.
        losses: a list to which each target's validation loss (a float) is appended.
        release_shift: empty ``shift`` (a dict the caller no longer needs) as it is applied, so
            the shifts are freed while the originals are saved (see :func:`shifted_parameters`).
    Returns:
        A list of K dicts parameter -> gradient (zeros for parameters the loss does not use).
    Raises:
        TypeError: ``val_batches`` is not a list.
    Example:
        >>> model = nn.Linear(2, 1)
        >>> [g] = validation_gradients(model, nn.functional.mse_loss, [(torch.ones(3, 2), torch.zeros(3, 1))])
        >>> g[model.weight].shape
        torch.Size([1, 2])
    """
    # A tuple is what one (inputs, targets) batch looks like, so only a list means "K targets".
    if not isinstance(val_batches, list):
        raise TypeError(
            f"val_batches must be a list of K validation batches, got {type(val_batches).__name__}; "
            "wrap a single batch as [val_batch]"
        )
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    out: list[dict[torch.Tensor, torch.Tensor]] = []
    with shifted_parameters(shift, release=release_shift):
        for batch in val_batches:
            ctx = engine.capture_val() if engine is not None else contextlib.nullcontext()
            with ctx, torch.enable_grad():
                loss = batch_loss(model, loss_fn, batch)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            if losses is not None:
                losses.append(float(loss.detach()))
            out.append({p: torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)})
    return out


def preconditioned_val_grad(J: Preconditioner | torch.Tensor | float, val_grad: torch.Tensor) -> torch.Tensor:
    """P = Jᵀ ∇L_val, the preconditioned validation gradient of one parameter.

    Args:
        J: an applied preconditioner, or elementwise slopes (a tensor broadcastable to
            ``val_grad``) or a float.
        val_grad: ∇L_val of the parameter, shape ``S``.
    Returns:
        P, shape ``S``, in ``val_grad``'s dtype.
    Raises:
        ValueError: ``J`` does not broadcast to ``val_grad``'s shape.
    Example:
        >>> preconditioned_val_grad(-0.1, torch.ones(2))
        tensor([-0.1000, -0.1000])
    """
    if isinstance(J, torch.Tensor):
        try:
            shape = torch.broadcast_shapes(J.shape, val_grad.shape)
        except RuntimeError:
            shape = None
        if shape != val_grad.shape:
            raise ValueError(
                f"J of shape {tuple(J.shape)} does not broadcast to the validation gradient's shape "
                f"{tuple(val_grad.shape)}; pass J with the parameter's shape or a float"
            )
        return J.to(val_grad.dtype) * val_grad
    return as_preconditioner(J).apply(val_grad)


def first_order_values(
    per_sample: Mapping[Hashable, torch.Tensor],
    precond_val_grads: Sequence[Mapping[Hashable, torch.Tensor]],
) -> torch.Tensor:
    """φ[z, k] = −Σ_params ⟨P_k, c_z⟩ from materialized per-sample contributions (reference path).

    Args:
        per_sample: key (parameter or name) -> c, shape ``[n, *S]``.
        precond_val_grads: K dicts key -> P_k, shape ``S`` (from :func:`preconditioned_val_grad`).
            Keys of a P_k missing from ``per_sample`` contribute nothing.
    Returns:
        Tensor ``[n, K]``.
    Raises:
        ValueError: empty ``per_sample``; inconsistent n; a per-sample key missing from some
            P_k; or shapes that do not match.
    Example:
        >>> first_order_values({"w": torch.tensor([[1.0, 0.0], [0.0, 2.0]])}, [{"w": torch.tensor([1.0, -1.0])}])
        tensor([[-1.],
                [ 2.]])
    """
    if not per_sample:
        raise ValueError("per_sample is empty; pass at least one parameter's per-sample contributions")
    ns = {int(c.shape[0]) for c in per_sample.values()}
    if len(ns) != 1:
        raise ValueError(f"per-sample tensors disagree on the number of samples n (leading dims {sorted(ns)})")
    n = ns.pop()
    first = next(iter(per_sample.values()))
    out = torch.zeros(n, len(precond_val_grads), dtype=first.dtype, device=first.device)
    for k, P in enumerate(precond_val_grads):
        for key, c in per_sample.items():
            if key not in P:
                raise ValueError(
                    f"precond_val_grads[{k}] has no entry for per-sample key {_describe(key)}; "
                    "give every parameter a preconditioned validation gradient (zeros if it has none)"
                )
            if tuple(c.shape[1:]) != tuple(P[key].shape):
                raise ValueError(
                    f"per-sample contributions of {_describe(key)} have shape {tuple(c.shape)} but P has shape "
                    f"{tuple(P[key].shape)}; expected [n, *P.shape]"
                )
            out[:, k] -= c.reshape(n, -1) @ P[key].reshape(-1).to(c.dtype)
    return out


def _describe(key: Hashable) -> str:
    return f"parameter of shape {tuple(key.shape)}" if isinstance(key, torch.Tensor) else repr(key)


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    reduction: Reduction | str | None = None,
    params: Iterable[torch.Tensor] | None = None,
    method: PerSampleMethod | str = "auto",
) -> PerSampleGrads:
    """Materialized per-sample contributions c_z = ∂L_B/∂θ restricted to sample z (torch.func).

        c_z = ∂/∂θ ⟨model(x_z), G_z⟩,   G = stopgrad(∂L_B/∂outputs),  L_B = loss_fn(model(inputs), targets):

    sample z's share of the batch gradient through its own outputs with every normaliser of the
    loss held fixed, one vector-Jacobian product per sample (``vmap`` of ``grad``, or for models
    vmap cannot trace, such as transformers' attention-mask code, the same computation once per
    sample; see :class:`PerSampleMethod`). For a mean-reduced loss c_z = ∇ℓ_z / n, for a sum
    ∇ℓ_z; class weights, label smoothing and token means with ``ignore_index`` keep their batch
    normaliser fixed (with a token mean, c_z is z's counted tokens' gradient over the batch's
    token count). Σ_z c_z = g_B, what ``backward()`` leaves in ``param.grad``, for every loss
    additive over samples; a loss that couples samples is refused. This is the same
    implementation as the oracle ``validation.per_sample_grads`` (keys differ: parameters here,
    names there) and the rule the ghost engine computes from hooks. Memory is n × #params.

    Args:
        model: the model; samples must not interact (no batch-statistics normalisation, no dropout).
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, the loss of a batch, additive over samples.
        batch: ``(inputs, targets)``; every tensor leaf batch-first ``[n, ...]``.
        reduction: no longer needed, kept for backward compatibility: ``"mean"``/``"sum"`` are
            accepted and ignored, since the share follows from ``loss_fn``'s own output gradient
            (a wrong hint can no longer rescale c_z); other values are refused.
        params: the parameters to differentiate; default every parameter with ``requires_grad``.
        method: ``"auto"`` (vmap, else the loop with a :class:`PerSampleFallbackWarning`),
            ``"vmap"`` or ``"loop"``.
    Returns:
        :class:`PerSampleGrads`: a dict parameter -> tensor ``[n, *param.shape]`` in the
        parameter's dtype; its ``method`` says which path ran (``vmap`` or ``loop``).
    Raises:
        SampleInteractionError: the model mixes samples (normalisation with batch statistics, or
            Σ_z c_z ≠ g_B), or ``loss_fn`` uses an output without a batch dimension.
        LossCouplingError: ``loss_fn`` couples samples (see :func:`check_loss_additive`).
        ValueError: bad ``reduction`` or ``method``, leaves with different n, a non-scalar loss,
            or random ops (dropout) in the model.
        RuntimeError: ``method="vmap"`` on a model vmap cannot trace (the message suggests the
            loop), or the model's own error on one sample.
    Example:
        >>> model = nn.Linear(2, 1)
        >>> c = per_sample_grads(model, nn.functional.mse_loss, (torch.ones(4, 2), torch.zeros(4, 1)))
        >>> c[model.weight].shape
        torch.Size([4, 1, 2])
        >>> weights = torch.tensor([1.0, 3.0])                       # a weighted mean over samples
        >>> loss_fn = lambda out, t: (weights * (out - t).pow(2).sum(1)).sum() / weights.sum()
        >>> x, y = torch.ones(2, 2), torch.zeros(2, 1)
        >>> c = per_sample_grads(model, loss_fn, (x, y))
        >>> model.zero_grad(); loss_fn(model(x), y).backward()
        >>> torch.allclose(c[model.bias].sum(0), model.bias.grad), torch.allclose(c[model.bias][1], 3 * c[model.bias][0])
        (True, True)
    """
    if reduction is not None:
        parse_enum(Reduction, reduction, "reduction")  # still validated: a typo is an error, not ignored
    method = parse_enum(PerSampleMethod, method, "method")
    check_samples_independent(model)
    _check_pair(batch)
    leaves = pytree.tree_leaves(batch)
    if not leaves or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in leaves):
        raise ValueError("batch must be (inputs, targets) whose leaves are all batch-first tensors")
    ns = {int(x.shape[0]) for x in leaves}
    if len(ns) != 1:
        raise ValueError(f"batch leaves disagree on the batch size (leading dims {sorted(ns)}); every leaf must be batch-first")
    names = {p: name for name, p in model.named_parameters()}
    wanted = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    missing = [tuple(p.shape) for p in wanted if p not in names]
    if missing:
        raise ValueError(f"params contains tensors that are not parameters of the model (shapes {missing})")
    inputs, targets = batch
    grads, _ = sample_contributions(
        model, loss_fn, inputs, targets, {names[p]: p for p in wanted}, method=method, what="the training batch",
        stacklevel=2,
    )
    return PerSampleGrads({p: grads[names[p]] for p in wanted}, grads.method, grads.fallback_reason)

"""Per-sample contributions c_z, and the map of a per-sample function over a batch.

:func:`sample_contributions` is the one implementation of the per-sample rule, shared by
``estimators.per_sample_grads`` (the materialized estimator) and ``validation.per_sample_grads``
(the oracle): c_z = ∂/∂θ ⟨model(x_z), stopgrad(∂L_B/∂outputs)_z⟩, sample z's share of the batch
gradient through its own outputs with every normaliser of the loss held fixed.

:func:`per_sample_map` maps it over the batch: ``vmap`` is fast but cannot trace every model:
data-dependent Python control flow on tensors (transformers' attention-mask code), ``.item()``,
or ops without a batching rule make it raise. The loop calls the very same function once per
sample (one forward and backward each), so it gives the same numbers, only slower.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ._checks import SampleInteractionError, check_loss_additive
from ._config import PerSampleMethod, parse_enum

#: The loop shows a progress bar (``progress=None``) from this many samples on.
PROGRESS_THRESHOLD = 256


class PerSampleFallbackWarning(UserWarning):
    """``method="auto"`` fell back from ``torch.func.vmap`` to the exact per-sample loop.

    The values are exact either way; the loop is slower. The message quotes vmap's error.
    Pass ``method="loop"`` to choose the loop explicitly (no warning).
    """


class PerSampleGrads(dict):
    """A dict key -> per-sample tensor ``[n, *shape]`` that also says which path computed it.

    Attributes:
        method: :class:`PerSampleMethod` ``VMAP`` or ``LOOP`` (never ``AUTO``): the path that ran.
        fallback_reason: when ``method="auto"`` fell back to the loop, the first line of the error
            ``torch.func.vmap`` raised; otherwise ``None``.

    Example:
        >>> c = PerSampleGrads({"w": torch.zeros(3, 2)}, PerSampleMethod.VMAP)
        >>> c.method.value, c.fallback_reason, c["w"].shape
        ('vmap', None, torch.Size([3, 2]))
    """

    def __init__(self, items: Mapping[Hashable, torch.Tensor], method: PerSampleMethod, fallback_reason: str | None = None):
        super().__init__(items)
        self.method = method
        self.fallback_reason = fallback_reason


class _RandomForward(RuntimeError):
    """The per-sample function drew random numbers; it says 'randomness' as torch.func's own error does."""


def _is_randomness_error(err: BaseException) -> bool:
    return isinstance(err, _RandomForward) or "randomness" in str(err)


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line if len(line) <= limit else line[:limit] + '...'}"


def _rng_states(leaves: list[Any]) -> list[torch.Tensor]:
    states = [torch.random.get_rng_state()]
    cuda = sorted({t.device.index or 0 for t in leaves if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    states += [torch.cuda.get_rng_state(d) for d in cuda]
    return states


def _stack(outputs: list[Any]) -> Any:
    flat = [pytree.tree_flatten(o) for o in outputs]
    spec = flat[0][1]
    columns = zip(*(leaves for leaves, _ in flat))
    return pytree.tree_unflatten([torch.stack(col) for col in columns], spec)


def per_sample_map(
    func: Callable[..., Any],
    params: Any,
    batched: tuple[Any, ...],
    *,
    method: PerSampleMethod | str = PerSampleMethod.AUTO,
    chunk_size: int | None = None,
    progress: bool | None = None,
    stacklevel: int = 2,
) -> tuple[Any, PerSampleMethod, str | None]:
    """``[func(params, *sample_z) for z]`` stacked along a new dimension 0.

    ``sample_z`` is row ``z`` of every tensor leaf of ``batched`` (dimension 0 removed), as
    ``torch.func.vmap(func, in_dims=(None, 0, ...))`` would pass it. ``func`` is typically
    ``torch.func.grad(loss_of_one_sample)``, so the loop is one forward and backward per sample,
    through ``torch.func`` (the live parameters' ``.grad`` are never touched).

    * ``vmap``: ``torch.func.vmap(..., randomness="error")``; its errors propagate unchanged.
    * ``loop``: one call per sample. A call that draws random numbers (dropout in train mode) is
      refused, as vmap's ``randomness="error"`` does.
    * ``auto``: ``vmap``; if it raises a ``RuntimeError``/``NotImplementedError`` that is not about
      randomness, sample 0 is run alone. If that fails too the error is the model's own and is
      raised (chained to vmap's); otherwise the loop finishes the batch and a
      :class:`PerSampleFallbackWarning` quotes vmap's error.

    Args:
        func: ``func(params, *sample) -> pytree of tensors``.
        params: passed unchanged to every call (not batched).
        batched: a tuple of pytrees whose tensor leaves all have the batch dimension ``n`` first.
        method: a :class:`PerSampleMethod` or its string value.
        chunk_size: samples per vmap chunk (``None``: all at once); the loop ignores it.
        progress: a tqdm bar over the loop; ``None`` shows it from ``PROGRESS_THRESHOLD`` samples.
        stacklevel: of the fallback warning, counted from the caller of this function.
    Returns:
        ``(outputs stacked [n, ...], the method that ran, vmap's error in one line or None)``.
    Raises:
        RuntimeError: vmap's error (``method="vmap"``), the model's own error, or a random
            forward pass (message mentions randomness).
        ValueError: ``method`` is not accepted.
    Example:
        >>> out, ran, why = per_sample_map(lambda p, x: p * x.sum(), torch.tensor(2.0), (torch.ones(3, 2),), method="loop")
        >>> out, ran.value, why
        (tensor([4., 4., 4.]), 'loop', None)
    """
    method = parse_enum(PerSampleMethod, method, "method")
    leaves = [t for t in pytree.tree_leaves(batched) if isinstance(t, torch.Tensor)]
    n = int(leaves[0].shape[0])
    if method is not PerSampleMethod.LOOP:
        in_dims = (None, *([0] * len(batched)))
        mapped = torch.func.vmap(func, in_dims=in_dims, randomness="error", chunk_size=chunk_size)
        try:
            return mapped(params, *batched), PerSampleMethod.VMAP, None
        except (RuntimeError, NotImplementedError) as err:
            if method is PerSampleMethod.VMAP or _is_randomness_error(err):
                raise
            vmap_error = err
    devices = leaves + [t for t in pytree.tree_leaves(params) if isinstance(t, torch.Tensor)]

    def one(z: int) -> Any:
        before = _rng_states(devices)
        out = func(params, *pytree.tree_map(lambda t: t[z] if isinstance(t, torch.Tensor) else t, batched))
        after = _rng_states(devices)
        if any(not torch.equal(a, b) for a, b in zip(before, after)):
            raise _RandomForward(
                "the per-sample computation drew random numbers (randomness in the forward pass, e.g. "
                "dropout in train mode), so it cannot reproduce the training pass"
            )
        return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)

    outputs = []
    reason = None
    if method is PerSampleMethod.AUTO:
        try:
            outputs.append(one(0))
        except Exception as err:
            raise err from vmap_error  # fails on one sample alone too: the model's own error, not vmap's
        reason = _first_line(vmap_error)
        warnings.warn(
            PerSampleFallbackWarning(
                f"torch.func.vmap could not trace the per-sample computation ({reason}); computed it with an "
                f"exact loop over the {n} samples instead (one forward and backward each, slower). Pass "
                "method='loop' to choose the loop explicitly."
            ),
            stacklevel=stacklevel + 1,
        )
    show = n >= PROGRESS_THRESHOLD if progress is None else bool(progress)
    with tqdm(total=n, initial=len(outputs), desc="per-sample loop", unit="sample", disable=not show, leave=False) as bar:
        for z in range(len(outputs), n):
            outputs.append(one(z))
            bar.update(1)
    return _stack(outputs), PerSampleMethod.LOOP, reason


class _ModelAndLoss(nn.Module):
    """``model`` and ``loss_fn`` in one module, so that ``functional_call`` swaps the parameters for
    ``loss_fn`` too: a weight penalty inside ``loss_fn`` is then seen (and refused) instead of being
    silently dropped from g_B."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, inputs: Any, targets: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """``(outputs, L_B, L_B at detached outputs)``: the last depends on θ only directly."""
        outputs = self.model(inputs)
        detached = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, outputs)
        return outputs, self.loss_fn(outputs, targets), self.loss_fn(detached, targets)


def _random_forward_error() -> ValueError:
    return ValueError(
        "the model's forward pass is random (e.g. Dropout in train mode): with random operations a "
        "per-sample recomputation cannot reproduce the training pass, so per-sample gradients are not "
        "defined. Fix: put the random layers in eval mode (`model.eval()`, or p=0); the ghost "
        "estimators read the real training pass instead."
    )


def _leaf_names(outputs: Any) -> list[str]:
    """``keystr`` of every leaf of the model's outputs (``"['logits']"``, ``"[0]"``; ``"<outputs>"`` for a tensor)."""
    return [pytree.keystr(path) or "<outputs>" for path, _ in pytree.tree_flatten_with_path(outputs)[0]]


def sample_contributions(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
    params: Mapping[str, torch.Tensor],
    *,
    method: PerSampleMethod | str = PerSampleMethod.AUTO,
    chunk_size: int | None = None,
    what: str = "the training batch",
    stacklevel: int = 1,
) -> tuple[PerSampleGrads, torch.Tensor]:
    """Each sample's share c_z of the batch gradient, the rule every per-sample path follows.

        c_z = ∂/∂θ ⟨model(x_z), G_z⟩,   G = stopgrad(∂L_B/∂outputs) at the batch's outputs,

    a vector-Jacobian product per sample with the batch loss's own output gradient: sample z's
    share of ∂L_B/∂θ through its own outputs with every normaliser of the loss held fixed. For a
    mean this is ∇ℓ_z / n, for a sum ∇ℓ_z; with class weights it is w_{y_z} ∇ℓ_z / Σ_b w_{y_b},
    with a token mean over ``ignore_index``-masked tokens it is the gradient of z's counted tokens'
    loss divided by the batch's token count. Σ_z c_z = g_B exactly for every loss additive over
    samples; this is also what the ghost engine computes from its hooks.

    Steps: one batch forward and backward (for G and g_B), refusing a ``loss_fn`` that depends on
    the parameters other than through the outputs (a weight penalty: no sample's term);
    :func:`check_loss_additive` on the batch outputs; the per-sample VJPs through
    :func:`per_sample_map` (vmap, or the exact loop); then, for n > 1, Σ_z c_z is compared with
    g_B, which catches a forward pass that mixes samples in a way
    :func:`check_samples_independent` cannot see. The caller validates the batch and checks the
    model's modules.

    Args:
        model: the network; never modified (buffers are cloned, parameters detached).
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, additive over samples.
        inputs, targets: the batch, every tensor leaf batch-first ``[n, ...]`` (validated by the caller).
        params: name -> parameter of ``model`` to differentiate (names as in ``named_parameters``);
            every other parameter and buffer is held fixed.
        method: ``"auto"``, ``"vmap"`` or ``"loop"`` (see :class:`PerSampleMethod`).
        chunk_size: samples per vmap chunk (``None``: all at once).
        what: names the batch in error messages.
        stacklevel: of the fallback warning, counted from the caller of this function.
    Returns:
        ``(PerSampleGrads {name: [n, *param.shape]} in the order of params, the batch loss L_B)``.
    Raises:
        LossCouplingError: ``loss_fn`` couples samples (see :func:`check_loss_additive`).
        SampleInteractionError: ``loss_fn`` uses an output with no batch dimension or depends on
            a parameter directly, an output's per-sample shape differs from its row in the
            batch, or Σ_z c_z ≠ g_B (the forward pass mixes samples).
        ValueError: a non-scalar loss, a random forward pass, or an unknown ``method``.
        RuntimeError: ``method="vmap"`` on a model vmap cannot trace (suggests the loop), or the
            model's own error.
    Example:
        >>> model = nn.Linear(3, 2).double()
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 1])
        >>> weighted = nn.CrossEntropyLoss(weight=torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> c, loss = sample_contributions(model, weighted, x, y, dict(model.named_parameters()))
        >>> model.zero_grad(); weighted(model(x), y).backward()
        >>> torch.allclose(c["weight"].sum(0), model.weight.grad), c["weight"].shape
        (True, torch.Size([4, 2, 3]))
    """
    method = parse_enum(PerSampleMethod, method, "method")
    n = int(next(t for t in pytree.tree_leaves((inputs, targets)) if isinstance(t, torch.Tensor)).shape[0])
    train = {name: p.detach() for name, p in params.items()}
    frozen = {name: b.detach().clone() for name, b in model.named_buffers()}  # a forward that writes buffers cannot reach the caller's model
    frozen.update({name: p.detach() for name, p in model.named_parameters() if name not in train})

    # 1. The batch pass: the loss's output gradient G and the batch gradient g_B.
    wrapper = _ModelAndLoss(model, loss_fn)
    leaves_in = [t for t in pytree.tree_leaves((inputs, targets, train)) if isinstance(t, torch.Tensor)]
    cuda = sorted({t.device.index or 0 for t in leaves_in if t.device.type == "cuda"})
    live = {name: p.detach().requires_grad_() for name, p in train.items()}  # fresh leaves: train stays as given
    before = _rng_states(leaves_in)
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():  # the batch pass leaves the global RNG as found
        state = {**{"model." + k: v for k, v in live.items()}, **{"model." + k: v for k, v in frozen.items()}}
        outputs, loss, direct = torch.func.functional_call(wrapper, state, (inputs, targets))
        drew = any(not torch.equal(a, b) for a, b in zip(before, _rng_states(leaves_in)))
    if drew:
        raise _random_forward_error()
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor (the reduced loss of {what}), got {shape}. "
            "Fix: use a mean or sum reduction, e.g. `nn.CrossEntropyLoss(reduction='mean')`."
        )
    _refuse_direct_dependence(direct, live, what)
    out_leaves = pytree.tree_leaves(outputs)
    names = _leaf_names(outputs)
    differentiable = [
        i for i, t in enumerate(out_leaves) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
    ]
    if loss.requires_grad:
        wrt = [out_leaves[i] for i in differentiable] + list(live.values())
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    else:
        grads = (None,) * (len(differentiable) + len(live))
    out_grads: dict[int, torch.Tensor] = {}
    for i, g in zip(differentiable, grads):
        if g is None:
            continue
        leaf = out_leaves[i]
        if leaf.dim() == 0 or leaf.shape[0] != n:
            if bool(g.any()):
                raise SampleInteractionError(
                    f"loss_fn depends on the model output {names[i]} of shape {tuple(leaf.shape)}, which has no batch "
                    f"dimension of {n} first, so its part of the gradient of {what} cannot be split over samples. "
                    "Fix: compute the loss from per-sample outputs only (e.g. leave batch-level auxiliary losses "
                    "out of loss_fn, or return them per sample)."
                )
            continue
        out_grads[i] = g.detach()
    batch_grad = {
        name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(live.items(), grads[len(differentiable):])
    }

    # 2. A coupled loss has no per-sample share at all: refuse it before computing one.
    check_loss_additive(loss_fn, outputs, targets, what=what)
    batch_shapes = {i: tuple(out_leaves[i].shape) for i in out_grads}

    # 3. c_z = ∂/∂θ ⟨model(x_z), G_z⟩, one vector-Jacobian product per sample.
    def share(p: dict[str, torch.Tensor], x: Any, g: dict[int, torch.Tensor]) -> torch.Tensor:
        one = pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, x)
        leaves = pytree.tree_leaves(torch.func.functional_call(model, (p, frozen), (one,)))
        terms = []
        for i, gi in g.items():
            if i >= len(leaves) or tuple(leaves[i].shape) != (1, *gi.shape):
                got = tuple(leaves[i].shape) if i < len(leaves) else "nothing"
                raise SampleInteractionError(
                    f"the model output {names[i]} has shape {batch_shapes[i]} for {what} but {got} for one sample "
                    f"alone (expected (1, {', '.join(map(str, gi.shape))})), so it is not one row per sample (e.g. a "
                    "similarity matrix between the batch's samples): samples interact in the forward pass and "
                    "per-sample contributions are undefined. Fix: return per-sample outputs from the model and "
                    "build any cross-sample quantity outside it (it must then not couple samples in the loss)."
                )
            terms.append((leaves[i].squeeze(0) * gi).sum())
        # A loss that uses no output gives c_z = 0; torch.func.grad needs a tensor that depends on p.
        return sum(terms) if terms else sum(0.0 * v.sum() for v in p.values())

    try:
        contribs, ran, reason = per_sample_map(
            torch.func.grad(share), train, (inputs, out_grads), method=method, chunk_size=chunk_size,
            stacklevel=stacklevel + 1,
        )
    except RuntimeError as err:
        if _is_randomness_error(err):
            raise _random_forward_error() from err
        if method is PerSampleMethod.VMAP:
            raise RuntimeError(
                f"torch.func.vmap failed on the per-sample gradients: {err}. If the model has data-dependent "
                "control flow (e.g. transformers' attention-mask code), use method='loop' (exact, one "
                "forward and backward per sample) or method='auto'."
            ) from err
        raise

    # 4. Σ_z c_z = g_B, or the forward pass mixed samples in a way no module check can see. One
    # sample cannot mix (and vmap's kernels may round differently from the batch's: no test then).
    if n > 1:
        _check_sum(contribs, batch_grad, what)
    return PerSampleGrads({name: contribs[name] for name in train}, ran, reason), loss.detach()


def _refuse_direct_dependence(direct: torch.Tensor, live: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise if ``loss_fn`` at detached outputs still has a gradient in θ (e.g. a weight penalty).

    Such a term is no sample's: c_z, defined through each sample's outputs, cannot carry it, so
    Σ_z c_z would silently miss part of g_B. Exact: the gradient is either zero or not.
    """
    if not (isinstance(direct, torch.Tensor) and direct.requires_grad):
        return
    grads = torch.autograd.grad(direct, list(live.values()), allow_unused=True)
    for name, g in zip(live, grads):
        if g is not None and bool(g.any()):
            raise SampleInteractionError(
                f"loss_fn depends on parameter {name!r} other than through the model's outputs (its gradient "
                f"with the outputs of {what} held fixed is {float(g.abs().max()):.3g}, not 0), e.g. a weight "
                "penalty inside loss_fn. That term belongs to no sample, so per-sample contributions cannot add "
                "up to the batch gradient. Fix: move the penalty into the optimizer (weight_decay), or out of "
                "loss_fn."
            )


def _check_sum(contribs: Mapping[str, torch.Tensor], batch_grad: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`SampleInteractionError` naming the first parameter where Σ_z c_z ≠ g_B."""
    if not batch_grad:
        return
    dtype = next(iter(batch_grad.values())).dtype
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    tol = eps ** 0.5  # float32 summation order over n samples, yet far below any real interaction
    # One scale over all parameters: a parameter whose gradient is zero up to rounding (an
    # attention key bias, which softmax ignores) must not be judged against its own noise.
    scale = max(float(g.abs().max() + contribs[name].abs().sum(0).max()) for name, g in batch_grad.items() if g.numel()) + eps
    for name, g in batch_grad.items():
        if not g.numel():
            continue
        gap = float((contribs[name].sum(0) - g).abs().max())
        if gap > tol * scale:
            raise SampleInteractionError(
                f"the per-sample contributions of parameter {name!r} do not add up to the gradient of {what} "
                f"(max |Σ_z c_z − g_B| = {gap:.3g}, scale {scale:.3g}): the model mixes samples in its forward "
                "pass (a sample's outputs computed alone differ from its row in the batch: a custom layer using "
                "batch statistics, attention or pooling across the batch, ...), so per-sample contributions are "
                "undefined. Fix: make every layer act on each sample alone (GroupNorm/LayerNorm instead of "
                "batch statistics)."
            )

"""Map a per-sample function over a batch: ``torch.func.vmap``, or an exact loop when vmap cannot.

``vmap`` is fast but cannot trace every model: data-dependent Python control flow on tensors
(transformers' attention-mask code), ``.item()``, or ops without a batching rule make it raise.
The loop calls the very same function once per sample (one forward and backward each), so it
gives the same numbers, only slower. Both ``estimators.per_sample_grads`` (the materialized
estimator) and ``validation.per_sample_grads`` (the oracle) run through :func:`per_sample_map`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

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

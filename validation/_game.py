"""The per-step game U(S), evaluated with the real torch optimizer.

``U(S) = L_val(θ_t) − L_val(θ_t + Δ(g_S))`` with ``g_S = Σ_{z∈S} c_z`` and ``Δ(g)`` the change
the caller's optimizer (a copy of it and of its state) makes when ``param.grad = g``.

Two ways to take the step, which must agree:

* ``loop``: deep-copy the model and the optimizer for each coalition, set ``.grad``, call
  ``step()``. Obviously correct, works for every optimizer, slow.
* ``stacked``: optimizers whose ``step()`` is elementwise (allow-list below) are rebuilt over
  parameters stacked to ``[m, *shape]``, with the state expanded the same way and the
  coalition gradients as ``.grad``: one real ``step()`` moves all ``m`` coalitions at once.

``L_val`` is measured with every module in eval mode (the tracker's convention; ``val_train_mode``
keeps the modules' own flags), ``c_z`` with the model's own modes; every evaluation runs inside
:func:`estimators.isolated_pass`, so none consumes the global RNG or changes a buffer.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from persample import isolated_pass

from ._per_sample import LossFn, _batch_size, _contributions, _scalar_loss, _unpack_batch, _vmap_error


class StepPath(str, enum.Enum):
    """How the real optimizer step is taken for many coalitions.

    ``AUTO``: ``STACKED`` for optimizers in :data:`STACKABLE_OPTIMIZERS` (and whose state has
    the expected layout), ``LOOP`` otherwise. ``STACKED``: always stacked, error if not
    possible. ``LOOP``: deep copy and step per coalition (the reference path).

    Example (the two paths agree):
        >>> gen = torch.Generator().manual_seed(0)
        >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
        >>> model = nn.Linear(3, 1).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(randn(1, 3)), model.bias.zero_()
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> loss_fn = nn.functional.mse_loss
        >>> x, y, xv, yv = randn(4, 3), randn(4, 1), randn(6, 3), randn(6, 1)
        >>> masks = torch.tensor([[True, True, False, True], [False, False, False, False]])
        >>> stacked = utility(model, opt, loss_fn, (x, y), (xv, yv), masks, path="stacked")
        >>> loop = utility(model, opt, loss_fn, (x, y), (xv, yv), masks, path=StepPath.LOOP)
        >>> torch.allclose(stacked, loop), torch.optim.Adam in STACKABLE_OPTIMIZERS
        (True, True)
    """

    AUTO = "auto"
    STACKED = "stacked"
    LOOP = "loop"


# Optimizer classes whose single-tensor step (foreach=False, fused off) is purely elementwise
# in (param, grad, state), so stacking coalitions along a new leading dimension is exact. Each
# entry lists the state keys: shared scalars (step counters and scalar schedules, identical for
# every coalition, kept scalar because torch reads them with ``.item()``) and elementwise
# tensors of the parameter's shape. Matched by exact type: a subclass may override step().
_STACKABLE: dict[type[torch.optim.Optimizer], tuple[frozenset[str], frozenset[str]]] = {
    torch.optim.SGD: (frozenset(), frozenset({"momentum_buffer"})),
    torch.optim.Adam: (frozenset({"step"}), frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"})),
    torch.optim.AdamW: (frozenset({"step"}), frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"})),
    torch.optim.RMSprop: (frozenset({"step"}), frozenset({"square_avg", "momentum_buffer", "grad_avg"})),
    torch.optim.Adagrad: (frozenset({"step"}), frozenset({"sum"})),
    torch.optim.Adamax: (frozenset({"step"}), frozenset({"exp_avg", "exp_inf"})),
    torch.optim.NAdam: (frozenset({"step", "mu_product"}), frozenset({"exp_avg", "exp_avg_sq"})),
    torch.optim.RAdam: (frozenset({"step"}), frozenset({"exp_avg", "exp_avg_sq"})),
    torch.optim.Adadelta: (frozenset({"step"}), frozenset({"square_avg", "acc_delta"})),
    torch.optim.ASGD: (frozenset({"step", "eta", "mu"}), frozenset({"ax"})),
    torch.optim.Rprop: (frozenset({"step"}), frozenset({"prev", "step_size"})),
}

#: Optimizer classes the stacked real-optimizer path accepts (exact types).
STACKABLE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = tuple(_STACKABLE)

# Above this many coalitions an automatic progress bar is shown.
_PROGRESS_THRESHOLD = 1000
# Default memory budget per chunk of coalitions, in tensor elements (about 256 MiB in float64
# for each stacked tensor: parameters, gradients, each state entry).
_CHUNK_ELEMENTS = 2**25


class _NotStackable(Exception):
    """Internal: the stacked path cannot represent this optimizer or state."""


def _as_path(path: StepPath | str) -> StepPath:
    try:
        return StepPath(path)
    except ValueError:
        raise ValueError(
            f"path must be one of {[p.value for p in StepPath]}, got {path!r}."
        ) from None


def _val_batches(val_batch: Any) -> tuple[list[tuple[Any, Any]], bool]:
    """A tuple is one validation batch; a list holds K of them. Returns (batches, single)."""
    if isinstance(val_batch, tuple):
        return [_unpack_batch(val_batch, "val_batch")], True
    if isinstance(val_batch, list):
        if not val_batch:
            raise ValueError("val_batch is an empty list; pass one (inputs, targets) tuple or a non-empty list of them.")
        if all(isinstance(b, Tensor) for b in val_batch):
            raise TypeError(
                f"val_batch is a list of {len(val_batch)} tensors; a list means K validation batches. "
                "Fix: pass one batch as a tuple `(inputs, targets)`, or several as `[(x1, y1), (x2, y2)]`."
            )
        return [_unpack_batch(b, f"val_batch[{k}]") for k, b in enumerate(val_batch)], False
    raise TypeError(
        f"val_batch must be a tuple (inputs, targets) or a list of such tuples, got {type(val_batch).__name__}."
    )


def _optimizer_param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _expand_state(key: str, value: Any, param: Tensor, m: int, spec: tuple[frozenset[str], frozenset[str]]) -> Any:
    shared, elementwise = spec
    if key in shared:
        if isinstance(value, Tensor):
            if value.dim() != 0:
                raise _NotStackable(f"state {key!r} has shape {tuple(value.shape)}, expected a scalar")
            return value.clone()  # torch increments it in place
        return copy.deepcopy(value)
    if key in elementwise:
        if value is None:
            return None
        if not isinstance(value, Tensor) or value.shape != param.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise _NotStackable(f"state {key!r} is {shape}, expected a tensor of shape {tuple(param.shape)}")
        return value.detach().unsqueeze(0).expand(m, *value.shape).clone()
    raise _NotStackable(f"unknown state entry {key!r}")


def _stacked_step(
    model_params: Mapping[str, Tensor], live_params: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer, grads: Mapping[str, Tensor], m: int,
) -> dict[str, Tensor]:
    """New parameters ``[m, *shape]`` after one real step of a rebuilt, stacked optimizer."""
    spec = _STACKABLE.get(type(optimizer))
    if spec is None:
        raise _NotStackable(f"{type(optimizer).__name__} is not in the allow-list")
    name_of = {id(p): name for name, p in live_params.items()}
    stacked: dict[str, Tensor] = {}
    groups: list[dict[str, Any]] = []
    states: list[tuple[Tensor, dict[str, Any]]] = []
    for group in optimizer.param_groups:
        new_params = []
        for p in group["params"]:
            name = name_of.get(id(p))
            if name is None:  # optimised but not part of the model: cannot affect L_val
                continue
            s = model_params[name].unsqueeze(0).expand(m, *p.shape).clone()
            s.grad = grads[name]
            stacked[name] = s
            new_params.append(s)
            # .get, not [...]: optimizer.state is a defaultdict and indexing would insert.
            old = optimizer.state.get(p)
            if old:
                states.append((s, {k: _expand_state(k, v, p, m, spec) for k, v in old.items()}))
        if not new_params:
            continue
        hyper = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
        # The single-tensor loop is the elementwise code path the allow-list was checked for.
        if "foreach" in hyper:
            hyper["foreach"] = False
        if "fused" in hyper:
            hyper["fused"] = None
        groups.append({"params": new_params, **hyper})
    if groups:
        opt = type(optimizer)(groups)
        for s, state in states:
            opt.state[s] = state
        opt.step()
    out = {}
    for name, p in model_params.items():
        out[name] = stacked[name].detach() if name in stacked else p.unsqueeze(0).expand(m, *p.shape)
    return out


def _val_losses(model: nn.Module, loss_fn: LossFn, val_batches: Sequence[tuple[Any, Any]], val_train_mode: bool) -> Tensor:
    """``L_val`` of ``model`` as it is, one per validation batch: ``[K]`` (eval mode unless asked)."""
    with torch.no_grad(), isolated_pass(model, train_mode=val_train_mode):
        return torch.stack([_scalar_loss(loss_fn(model(x), y), "validation") for x, y in val_batches])


def _functional_val_losses(
    model: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor], val_batches: Sequence[tuple[Any, Any]],
    val_train_mode: bool,
) -> Tensor:
    """``L_val`` for ``m`` stacked parameter sets: ``[m, K]`` (eval mode unless asked).

    Buffers and frozen parameters are the model's own; the isolated pass puts back anything the
    forward writes to them, so every evaluation starts from the caller's values.
    """

    def val_loss(p: dict[str, Tensor], x: Any, y: Any) -> Tensor:
        # functional_call keeps each module's training flag, which isolated_pass has set.
        return _scalar_loss(loss_fn(functional_call(model, p, (x,)), y), "validation")

    batched = vmap(val_loss, in_dims=(0, None, None))
    cols = []
    with torch.no_grad(), isolated_pass(model, train_mode=val_train_mode):
        try:
            for x, y in val_batches:
                cols.append(batched(dict(params), x, y))
        except RuntimeError as err:
            if val_train_mode and "randomness" in str(err):
                raise ValueError(
                    "val_train_mode=True: the validation forward pass draws random numbers with the modules' "
                    "own training flags, which the stacked path (torch.func.vmap) cannot evaluate. Fix: "
                    "val_train_mode=False (the default: validation in eval mode), or path='loop', where every "
                    "coalition's validation pass starts from the same global RNG state."
                ) from err
            raise _vmap_error(err) from err
    return torch.stack(cols, dim=-1)


def _loop_utilities(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, grads: Mapping[str, Tensor],
    m: int, val_batches: Sequence[tuple[Any, Any]], base: Tensor, bar: Any, val_train_mode: bool,
) -> Tensor:
    """Reference path: a fresh deep copy of (model, optimizer) per coalition, one real step."""
    rows = []
    for i in range(m):
        # One deepcopy shares the memo, so the copied optimizers step the copied model.
        model2, opts2 = copy.deepcopy((model, _as_list(optimizer)))
        for opt2 in opts2:
            for group in opt2.param_groups:
                for p in group["params"]:
                    p.grad = None
        named = dict(model2.named_parameters())
        for name, g in grads.items():
            named[name].grad = g[i].clone()
        for opt2 in opts2:
            opt2.step()
        losses = _val_losses(model2, loss_fn, val_batches, val_train_mode)
        rows.append(base - losses.double())
        if bar is not None:
            bar.update(1)
    return torch.stack(rows) if rows else base.new_zeros(0, len(val_batches))


def _as_list(optimizer: Any) -> list[torch.optim.Optimizer]:
    """One optimizer or several (each parameter held by one: Muon on the matrices, AdamW on the rest)."""
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]


def _subset_grads(contribs: Mapping[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
    """``g_S = mask @ c`` per parameter: ``[m, *shape]`` (one matmul per parameter)."""
    out = {}
    for name, c in contribs.items():
        w = mask.to(c.dtype)
        out[name] = (w @ c.reshape(c.shape[0], -1)).reshape(mask.shape[0], *c.shape[1:])
    return out


def _chunks(m: int, size: int) -> Iterator[slice]:
    for start in range(0, m, size):
        yield slice(start, min(start + size, m))


def _evaluate(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, batch: Any, val_batch: Any,
    subsets: Tensor, *, path: StepPath | str, chunk_size: int | None, progress: bool | None,
    val_train_mode: bool = False,
) -> tuple[Tensor, bool]:
    """``U(S)`` for each row of ``subsets``: ``[m, K]`` float64, and whether val_batch was single.

    Validation losses in eval mode unless ``val_train_mode``; the training batch's ``c_z`` in the
    model's own mode. Neither leaves a trace on the model or the global RNG.
    """
    path = _as_path(path)
    opts = _as_list(optimizer)
    for opt in opts:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a list of them), got {type(opt).__name__}.")
    if len(opts) == 1:
        optimizer = opts[0]
    if not isinstance(val_train_mode, bool):
        raise TypeError(
            f"val_train_mode must be a bool, got {val_train_mode!r}. Fix: False (default: the validation loss "
            "in eval mode, as the tracker measures it) or True (each module's own training flag)."
        )
    val_batches, single = _val_batches(val_batch)
    for k, (x, y) in enumerate(val_batches):
        _batch_size(x, y, "val_batch" if single else f"val_batch[{k}]")
    # The training side keeps the model's own mode; the isolated pass only undoes side effects.
    with isolated_pass(model, train_mode=True):
        contribs, _ = _contributions(model, loss_fn, batch)
    n = next(iter(contribs.values())).shape[0]
    if not isinstance(subsets, Tensor) or subsets.dtype != torch.bool or subsets.dim() != 2 or subsets.shape[1] != n:
        shape = (tuple(subsets.shape), subsets.dtype) if isinstance(subsets, Tensor) else type(subsets).__name__
        raise ValueError(
            f"subsets must be a bool tensor [m, n] with n = {n} (the batch size), one row per coalition; "
            f"got {shape}. Fix: e.g. `torch.ones(1, {n}, dtype=torch.bool)` for the full batch."
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")

    live = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = {name: p.detach() for name, p in live.items()}
    m = subsets.shape[0]

    stackable = len(opts) == 1 and type(opts[0]) in _STACKABLE
    if path is StepPath.STACKED and not stackable:
        what = type(opts[0]).__name__ if len(opts) == 1 else f"a list of {len(opts)} optimizers"
        raise ValueError(
            f"path='stacked' needs one optimizer whose step is elementwise; {what} is not "
            f"in the allow-list {[c.__name__ for c in STACKABLE_OPTIMIZERS]} (exact types). "
            "Fix: use path='auto' or 'loop' (deep copy per coalition, slower)."
        )
    use_stacked = path is StepPath.STACKED or (path is StepPath.AUTO and stackable)
    if use_stacked:
        # Validate the state layout once, up front, so 'auto' can fall back before doing work.
        try:
            _stacked_step(params, live, optimizer, _subset_grads(contribs, subsets[:0]), 0)
        except Exception as err:  # any failure to rebuild the optimizer: the loop path is always valid
            if path is StepPath.STACKED:
                raise ValueError(
                    f"path='stacked' cannot represent this {type(optimizer).__name__}: {err}. "
                    "Fix: use path='auto' or 'loop'."
                ) from None
            use_stacked = False

    if chunk_size is None:
        numel = sum(p.numel() for p in params.values())
        chunk_size = max(1, _CHUNK_ELEMENTS // max(numel, 1))
    show = m > _PROGRESS_THRESHOLD if progress is None else bool(progress)
    bar = tqdm(total=m, desc="coalitions", unit="coal", disable=not show, leave=False) if m else None

    out = []
    try:
        if use_stacked:
            base = _functional_val_losses(
                model, loss_fn, {k: v.unsqueeze(0) for k, v in params.items()}, val_batches, val_train_mode
            )[0].double()
            for sl in _chunks(m, max(chunk_size, 1)):
                size = sl.stop - sl.start
                new = _stacked_step(params, live, optimizer, _subset_grads(contribs, subsets[sl]), size)
                losses = _functional_val_losses(model, loss_fn, new, val_batches, val_train_mode)
                out.append(base - losses.double())
                if bar is not None:
                    bar.update(size)
        else:
            base = _val_losses(copy.deepcopy(model), loss_fn, val_batches, val_train_mode).double()
            for sl in _chunks(m, max(chunk_size, 1)):
                grads = _subset_grads(contribs, subsets[sl])
                out.append(_loop_utilities(
                    model, optimizer, loss_fn, grads, sl.stop - sl.start, val_batches, base, bar, val_train_mode
                ))
    finally:
        if bar is not None:
            bar.close()
    values = torch.cat(out) if out else torch.zeros(0, len(val_batches), dtype=torch.float64)
    return values, single


def utility(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, batch: Any, val_batch: Any,
    subsets: Tensor, *, path: StepPath | str = StepPath.AUTO, chunk_size: int | None = None,
    progress: bool | None = None, val_train_mode: bool = False,
) -> Tensor:
    """Per-step utility ``U(S)`` of many coalitions, with the real optimizer.

    ``U(S) = L_val(θ_t) − L_val(θ_t + Δ(g_S))``, ``g_S = Σ_{z∈S} c_z`` (normalisation fixed to the
    full batch, ``c_z`` from :func:`per_sample_grads`), ``Δ(g)`` = what a copy of ``optimizer``,
    with a copy of its state and hyper-parameters, does to the parameters when ``param.grad = g``.
    Positive = the coalition's step lowers the validation loss. ``U(∅)`` is generally not 0
    (momentum, weight decay keep moving).

    ``L_val`` is measured with every module in eval mode (deterministic, as users measure a
    validation loss, and the tracker's convention); ``c_z`` of the training batch with the
    model's own modes, as in training. No evaluation consumes the global RNG or changes the
    model's buffers (see :func:`estimators.isolated_pass`).

    Args:
        model, optimizer: as in training, just before ``optimizer.step()``; never modified.
            ``optimizer`` may be a list (each parameter held by one), valued on the loop path.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar mean or sum (training and validation).
        batch: the training batch ``(inputs, targets)`` with ``n`` samples.
        val_batch: ``(inputs, targets)``, or a list of K such batches (one column each).
        subsets: bool ``[m, n]``, row ``i`` = coalition ``S_i``.
        path: ``"auto"`` | ``"stacked"`` | ``"loop"`` (see :class:`StepPath`).
        chunk_size: coalitions per stacked step (bounds memory); default from a ~2^25-element budget.
        progress: tqdm bar; ``None`` shows it above 1000 coalitions.
        val_train_mode: ``False`` (default): ``L_val`` in eval mode. ``True``: ``L_val`` with each
            module's own training flag (the tracker's train-mode option). A forward pass that is
            random in train mode (dropout) is refused on the training side either way.

    Returns:
        float64 ``[m]`` for a single validation batch, ``[m, K]`` for a list.

    Raises:
        ValueError/TypeError: bad ``subsets``, ``path``, ``chunk_size``, ``val_train_mode``, batch
        or loss (see :func:`per_sample_grads`), ``path="stacked"`` with an optimizer outside
        :data:`STACKABLE_OPTIMIZERS`, or a random validation pass on the stacked path
        (``val_train_mode=True`` with dropout).

    Example (U(B) is the validation-loss drop of the real step; U(∅) = 0 at Adam's first step):
        >>> gen = torch.Generator().manual_seed(0)
        >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
        >>> model = nn.Linear(3, 1).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(randn(1, 3)), model.bias.zero_()
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> loss_fn = nn.functional.mse_loss
        >>> x, y, xv, yv = randn(4, 3), randn(4, 1), randn(6, 3), randn(6, 1)
        >>> masks = torch.tensor([[True] * 4, [False] * 4])                 # B and ∅
        >>> u = utility(model, opt, loss_fn, (x, y), (xv, yv), masks)
        >>> u.shape, u.dtype, abs(float(u[1])) < 1e-12
        (torch.Size([2]), torch.float64, True)
        >>> before = loss_fn(model(xv), yv).item()
        >>> loss_fn(model(x), y).backward(); opt.step()                     # the real step
        >>> abs(u[0].item() - (before - loss_fn(model(xv), yv).item())) < 1e-12
        True
        >>> utility(model, opt, loss_fn, (x, y), [(xv, yv), (xv[:2], yv[:2])], masks).shape   # K = 2
        torch.Size([2, 2])
    """
    values, single = _evaluate(
        model, optimizer, loss_fn, batch, val_batch, subsets, path=path, chunk_size=chunk_size, progress=progress,
        val_train_mode=val_train_mode,
    )
    return values[:, 0] if single else values


def leave_one_out(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, batch: Any, val_batch: Any, *,
    path: StepPath | str = StepPath.AUTO, chunk_size: int | None = None, progress: bool | None = None,
    val_train_mode: bool = False,
) -> Tensor:
    """Leave-one-out value of each sample in the per-step game, with the real optimizer.

    ``LOO_z = U(B) − U(B∖z) = L_val(θ_t + Δ(g_B − c_z)) − L_val(θ_t + Δ(g_B))``: how much worse
    the validation loss is after the step without ``z``. State and hyper-parameters are held at
    their current values (copied); the caller's model, gradients and optimizer are untouched.

    Args:
        model, optimizer: as in training, just before ``optimizer.step()``; never modified.
            ``optimizer`` may be a list (each parameter held by one), valued on the loop path.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar mean or sum over samples.
        batch: the training batch ``(inputs, targets)`` with ``n`` samples.
        val_batch: ``(inputs, targets)``, or a list of K such batches.
        path, chunk_size, progress: as in :func:`utility` (``n + 1`` coalitions are evaluated).
        val_train_mode: as in :func:`utility`; default ``False``: ``L_val`` in eval mode.

    Returns:
        float64 ``[n]`` for a single validation batch, ``[n, K]`` for a list of K.

    Raises:
        As :func:`utility`.

    Example (the same as U(B) − U(B∖z) from :func:`utility`):
        >>> gen = torch.Generator().manual_seed(0)
        >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
        >>> model = nn.Linear(3, 1).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(randn(1, 3)), model.bias.zero_()
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> loss_fn = nn.functional.mse_loss
        >>> x, y, xv, yv = randn(4, 3), randn(4, 1), randn(6, 3), randn(6, 1)
        >>> loo = leave_one_out(model, opt, loss_fn, (x, y), (xv, yv))
        >>> loo.shape, loo.dtype
        (torch.Size([4]), torch.float64)
        >>> masks = torch.ones(5, 4, dtype=torch.bool); _ = masks[1:].fill_diagonal_(False)
        >>> u = utility(model, opt, loss_fn, (x, y), (xv, yv), masks)
        >>> torch.allclose(loo, u[0] - u[1:])
        True
    """
    inputs, targets = _unpack_batch(batch, "batch")
    n = _batch_size(inputs, targets, "batch")
    masks = torch.ones(n + 1, n, dtype=torch.bool)
    masks[1:].fill_diagonal_(False)
    values, single = _evaluate(
        model, optimizer, loss_fn, batch, val_batch, masks, path=path, chunk_size=chunk_size, progress=progress,
        val_train_mode=val_train_mode,
    )
    loo = values[:1] - values[1:]
    return loo[:, 0] if single else loo


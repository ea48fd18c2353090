"""Replay leave-one-out: the effect of removing a sample from its step, K real steps later.

From a saved state (model and optimizer just before step ``t``) and the recorded batches of the
steps that followed, the trajectory is replayed with the REAL torch optimizer twice per sample:

* as recorded: ``θ_{t+1} = θ_t + Δ_t(g_B)``, then every later step on its own batch;
* without ``z``: ``θ'_{t+1} = θ_t + Δ_t(g_B − c_z)`` (``c_z`` z's share of the batch gradient, so
  the loss keeps the full batch's normalisation), then every later step on its unchanged batch,
  at the perturbed parameters and with the perturbed optimizer state.

``R_z(K) = L_val(θ'_{t+K}) − L_val(θ_{t+K})``. At ``K = 1`` this is the per-step game's
leave-one-out ``U(B) − U(B∖z)`` (:func:`validation.leave_one_out`); for larger ``K`` it is what
"removing z from its step" means over a horizon, the quantity in-run values are sometimes read
as predicting. It is not leave-one-out retraining: z is removed from one step only.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from persample import isolated_pass

from ._game import _as_list, _val_batches, _val_losses
from ._per_sample import LossFn, _batch_size, _contributions, _scalar_loss, _unpack_batch

# Above this many replayed optimizer steps ((samples + 1) × max(horizons)) a progress bar is shown.
_PROGRESS_THRESHOLD = 1000


def _check_horizons(horizons: Any) -> tuple[int, ...]:
    fix = "Fix: give positive step counts in increasing order, e.g. horizons=(1, 3, 10)."
    if isinstance(horizons, (str, bytes)) or not isinstance(horizons, Sequence):
        raise TypeError(f"horizons must be a sequence of ints, got {type(horizons).__name__} {horizons!r}. {fix}")
    out = []
    for h in horizons:
        if isinstance(h, bool) or not isinstance(h, numbers.Integral):
            raise TypeError(f"horizons must hold ints (numbers of optimizer steps), got {h!r} in {tuple(horizons)!r}. {fix}")
        out.append(int(h))
    if not out or out[0] < 1 or any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"horizons must be positive and strictly increasing, got {tuple(out)!r}. {fix}")
    return tuple(out)


def _check_batches(batches: Any, step_index: Any, horizon: int) -> list[tuple[Any, Any]]:
    if not isinstance(batches, Sequence) or isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], Tensor):
        raise TypeError(
            f"batches must be a list of (inputs, targets) pairs, one per optimizer step, got {type(batches).__name__}. "
            "Fix: record the batches as `[(x_1, y_1), (x_2, y_2), ...]`; a single batch is `[(x, y)]`."
        )
    if isinstance(step_index, bool) or not isinstance(step_index, numbers.Integral):
        raise TypeError(f"step_index must be an int (the position in batches of the valued step), got {step_index!r}.")
    step_index = int(step_index)
    if not 0 <= step_index < len(batches):
        raise ValueError(
            f"step_index={step_index} is outside batches, which records {len(batches)} step(s). "
            f"Fix: 0 <= step_index < {len(batches)}, the position of the batch taken from the saved state."
        )
    left = len(batches) - step_index
    if horizon > left:
        raise ValueError(
            f"horizons go up to {horizon} steps, but batches records only {left} step(s) from step_index={step_index} "
            f"(batches[{step_index}:]). Fix: record at least {horizon} batches from the saved state on, or pass "
            f"horizons no larger than {left}."
        )
    return [_unpack_batch(batches[step_index + k], f"batches[{step_index + k}]") for k in range(horizon)]


def _check_samples(samples: Any, n: int, step_index: int) -> list[int]:
    if samples is None:
        return list(range(n))
    if isinstance(samples, Tensor):
        if samples.dim() != 1 or samples.dtype.is_floating_point or samples.dtype.is_complex or samples.dtype == torch.bool:
            raise TypeError(
                f"samples must be a 1-D integer tensor or a sequence of ints, got a {samples.dtype} tensor of shape "
                f"{tuple(samples.shape)}. Fix: e.g. samples=[0, 3] (indices into batches[{step_index}])."
            )
        samples = samples.tolist()
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
        raise TypeError(f"samples must be a sequence of ints or None, got {type(samples).__name__}.")
    out = []
    for i in samples:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"samples must hold ints, got {i!r}. Fix: indices into batches[{step_index}], e.g. samples=[0, 3].")
        if not 0 <= int(i) < n:
            raise ValueError(
                f"samples holds {int(i)}, outside batches[{step_index}], which has n = {n} samples. "
                f"Fix: indices 0 <= i < {n}, or samples=None for all of them."
            )
        out.append(int(i))
    if not out:
        raise ValueError("samples is empty; pass at least one index, or samples=None for the whole batch.")
    return out


def _replay(
    model: nn.Module, optimizer: Any, loss_fn: LossFn, steps: Sequence[tuple[Any, Any]],
    horizons: tuple[int, ...], val_batches: Sequence[tuple[Any, Any]], val_train_mode: bool,
    removed: dict[str, Tensor] | None,
) -> Tensor:
    """One replay on fresh copies: ``L_val`` after each horizon, ``[H, V]`` float64.

    ``removed`` (``c_z`` per parameter name) is subtracted from the first step's real gradient.
    The copies run inside :func:`persample.isolated_pass` in train mode: the modules keep their
    own flags and the global RNG is put back on exit, so every replay starts from the caller's
    RNG state and draws the same random numbers as every other.
    """
    # One deepcopy shares the memo, so the copied optimizers step the copied model.
    model2, opts2 = copy.deepcopy((model, _as_list(optimizer)))
    named = dict(model2.named_parameters())
    wanted = set(horizons)
    rows = []
    with isolated_pass(model2, train_mode=True):
        for k, (x, y) in enumerate(steps):
            for p in model2.parameters():
                p.grad = None
            loss = _scalar_loss(loss_fn(model2(x), y), "training")
            loss.backward()
            if k == 0 and removed is not None:
                with torch.no_grad():
                    for name, c in removed.items():
                        p = named[name]
                        if p.grad is not None:  # no gradient reached p: c_z is zero and torch skips p
                            p.grad.sub_(c)
            for opt in opts2:
                opt.step()
            if k + 1 in wanted:
                rows.append(_val_losses(model2, loss_fn, val_batches, val_train_mode).double())
    return torch.stack(rows)


def replay_leave_one_out(
    model: nn.Module, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], loss_fn: LossFn,
    batches: Sequence[tuple[Any, Any]], val_batch: Any, *, samples: Sequence[int] | Tensor | None = None,
    horizons: Sequence[int] = (1, 3, 10, 30), step_index: int = 0, val_train_mode: bool = False,
    progress: bool | None = None,
) -> Tensor:
    """Effect on ``L_val`` after K real optimizer steps of removing a sample from its step.

        R_z(K) = L_val(θ'_{t+K}) − L_val(θ_{t+K}),   t = ``step_index``,

    ``θ`` the trajectory replayed as recorded from the saved state, ``θ'`` the same replay with
    ``param.grad = g_B − c_z`` at step ``t`` only (``c_z`` z's share of the batch gradient,
    :func:`per_sample_grads`: the loss keeps the full batch's normalisation) and every later step
    on its recorded batch, at the perturbed parameters and optimizer state. Positive = z helped.
    ``R_z(1)`` is :func:`leave_one_out`'s ``U(B) − U(B∖z)``. This is removal from ONE step, not
    leave-one-out retraining: z is not taken out of later epochs.

    Every replay deep-copies ``model`` and ``optimizer`` and runs the real ``step()`` with the
    real ``loss_fn(model(x), y).backward()`` gradient (``c_z`` subtracted at step ``t``). Training
    passes use the modules' own train/eval flags; ``L_val`` is measured in eval mode unless
    ``val_train_mode``. Determinism: every replay starts from the caller's global RNG state (each
    runs inside :func:`persample.isolated_pass`, which restores it), so any random numbers drawn by
    later steps are the same in the runs with and without z; a random forward pass at step ``t``
    itself (dropout in train mode) is refused, since ``c_z`` is not defined there. ``1 +
    len(samples)`` replays of ``max(horizons)`` steps each: a plain loop.

    Args:
        model, optimizer: the saved state just before step ``t``; never modified (nor their
            ``.grad``, state, buffers or flags). ``optimizer`` may be a list (each parameter held
            by one).
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar mean or sum over samples, as in training.
        batches: the recorded batches ``[(inputs, targets), ...]``, one per optimizer step;
            ``batches[t]`` is the valued batch (``n`` samples), ``batches[t + 1:]`` the later steps.
        val_batch: ``(inputs, targets)``, or a list of ``V`` such batches (one ``L_val`` each).
        samples: indices into ``batches[t]`` to remove one at a time (``m`` of them); default all ``n``.
        horizons: numbers of steps ``K`` after which ``L_val`` is compared, positive, strictly
            increasing, ``max(horizons) <= len(batches) − t``.
        step_index: ``t``, the position in ``batches`` of the step the saved state is about to take.
        val_train_mode: ``False`` (default): ``L_val`` in eval mode; ``True``: each module's own flag.
        progress: tqdm bar over replays; ``None`` shows it above 1000 replayed steps.

    Returns:
        float64 ``[m, H]`` (``H = len(horizons)``, column ``h`` the horizon ``horizons[h]``) for a
        single validation batch, ``[m, H, V]`` for a list of ``V``.

    Raises:
        ValueError/TypeError: bad ``horizons`` (not positive ints in increasing order, or longer
        than the recorded batches), ``step_index``, ``samples`` (not ints, or out of range),
        ``batches``, ``val_batch`` or ``val_train_mode``; and everything :func:`per_sample_grads`
        refuses for ``batches[t]`` (interacting samples, random forward, a non-additive loss).

    Example (K = 1 is the per-step leave-one-out):
        >>> import torch, validation
        >>> gen = torch.Generator().manual_seed(0)
        >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> loss_fn = torch.nn.functional.mse_loss
        >>> batches = [(randn(4, 3), randn(4, 1)) for _ in range(5)]
        >>> val = (randn(8, 3), randn(8, 1))
        >>> r = replay_leave_one_out(model, opt, loss_fn, batches, val, horizons=(1, 2, 5))
        >>> r.shape, r.dtype
        (torch.Size([4, 3]), torch.float64)
        >>> loo = validation.leave_one_out(model, opt, loss_fn, batches[0], val)
        >>> bool((r[:, 0] - loo).abs().max() < 1e-12)
        True
        >>> replay_leave_one_out(model, opt, loss_fn, batches, val, samples=[2], horizons=(1, 3), step_index=2).shape
        torch.Size([1, 2])
    """
    horizons = _check_horizons(horizons)
    steps = _check_batches(batches, step_index, horizons[-1])
    if not isinstance(val_train_mode, bool):
        raise TypeError(
            f"val_train_mode must be a bool, got {val_train_mode!r}. Fix: False (default: the validation loss "
            "in eval mode) or True (each module's own training flag)."
        )
    opts = _as_list(optimizer)
    for opt in opts:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a list of them), got {type(opt).__name__}.")
    val_batches, single = _val_batches(val_batch)
    for k, (x, y) in enumerate(val_batches):
        _batch_size(x, y, "val_batch" if single else f"val_batch[{k}]")
    n = _batch_size(*steps[0], f"batches[{int(step_index)}]")
    chosen = _check_samples(samples, n, int(step_index))

    # c_z of the valued batch with the model's own modes, as in training; no trace on the model.
    with isolated_pass(model, train_mode=True):
        contribs, _ = _contributions(model, loss_fn, steps[0])
    contribs = {name: c.detach() for name, c in contribs.items()}

    show = (len(chosen) + 1) * horizons[-1] > _PROGRESS_THRESHOLD if progress is None else bool(progress)
    bar = tqdm(total=len(chosen) + 1, desc="replays", unit="replay", disable=not show, leave=False)
    try:
        recorded = _replay(model, opts, loss_fn, steps, horizons, val_batches, val_train_mode, None)
        bar.update(1)
        rows = []
        for z in chosen:
            without = _replay(
                model, opts, loss_fn, steps, horizons, val_batches, val_train_mode,
                {name: c[z] for name, c in contribs.items()},
            )
            rows.append(without - recorded)
            bar.update(1)
    finally:
        bar.close()
    values = torch.stack(rows)  # [m, H, V]
    return values[..., 0] if single else values

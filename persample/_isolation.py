"""Extra forward/backward passes on the user's model that leave no trace on training.

The tracker evaluates the validation loss (and its gradient, possibly at shifted parameters)
at every step, and checks the model once at construction. Attached or not, the training run
must be bit-identical: these passes must not consume the global RNG (dropout masks), update
buffers (BatchNorm running statistics, ``num_batches_tracked``), renormalise embedding rows
(``max_norm``) or leave a module's ``training`` flag changed. :func:`isolated_pass` saves
exactly what a forward pass can change and puts it back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

# Modules whose forward writes to their own weight: with ``max_norm`` the looked-up rows are
# renormalised in place (torch.embedding_renorm_).
_RENORMALISING = (nn.Embedding, nn.EmbeddingBag)


def _rng_state() -> tuple[Tensor, list[Tensor] | None, Tensor | None]:
    cpu = torch.get_rng_state()
    # Only initialised CUDA devices: querying them would otherwise initialise CUDA itself.
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    mps = torch.mps.get_rng_state() if torch.backends.mps.is_available() else None
    return cpu, cuda, mps


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None, Tensor | None]) -> None:
    cpu, cuda, mps = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    if mps is not None:
        torch.mps.set_rng_state(mps)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (``torch.equal`` calls NaN != NaN and −0.0 == 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.layout is not torch.strided or a.is_quantized:
        return torch.equal(a, b)
    return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def _restore_values(original: Tensor, saved: Tensor, version: int) -> None:
    """Copy ``saved`` back into ``original`` in place, only if the pass changed it.

    Untouched tensors are left alone so that their version counters do not move (a pending
    backward that saved them stays valid).
    """
    if original._version == version and _same_bits(original, saved):
        return
    with torch.no_grad():
        if original.shape == saved.shape:
            original.copy_(saved)
        else:  # resized in place by the pass
            original.set_(saved)


def _refuse_lazy(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
            for tname, t in tensors.items():
                if t is not None and is_lazy(t):
                    where = f"{name}.{tname}" if name else tname
                    raise ValueError(
                        f"module {name or type(model).__name__!r} ({type(module).__name__}) has an uninitialised "
                        f"lazy {kind} {where!r}: the first forward pass initialises it and draws from the global "
                        "RNG, so an extra pass before training cannot leave training unchanged. Fix: run one "
                        "forward pass on a training batch (e.g. `model(x)`) before attaching the tracker."
                    )


@contextlib.contextmanager
def isolated_pass(model: nn.Module, *, train_mode: bool = False) -> Iterator[nn.Module]:
    """Run extra passes on ``model`` that leave the training run bit-identical.

    On entry it saves, and on exit (exceptions included) it restores:

    * the global RNG: CPU (``torch.get_rng_state``), every initialised CUDA device and MPS;
      Python's ``random`` and numpy are not used by torch modules and are left alone;
    * every buffer of every sub-module, bit-exactly: values are copied back in place into the
      original tensor objects (only where the pass changed them), a buffer attribute the pass
      re-bound or deleted is set back to the original object, a buffer it added is removed;
    * the weights of ``nn.Embedding`` / ``nn.EmbeddingBag`` with ``max_norm`` (their forward
      renormalises looked-up rows in place). No other parameter is copied, so a model without
      buffers pays nothing measurable;
    * each module's own ``training`` flag (a model may mix train and eval sub-modules).

    Inside, every module is in eval mode (a deterministic validation loss, as users measure
    it), unless ``train_mode=True``, which leaves each module's flag as the caller set it
    (dropout then draws masks, from an RNG state that is restored afterwards). Nests safely:
    each entry keeps its own snapshot. Gradients (``param.grad``) are not saved: take
    validation gradients with ``torch.autograd.grad``. Parameters moved on purpose inside
    (e.g. by :func:`shifted_parameters`) must be restored by whoever moved them.

    Args:
        model: the user's module, any parameter and buffer shapes; left as found.
        train_mode: keep the modules' own training flags instead of switching to eval.

    Yields:
        ``model`` itself.

    Raises:
        ValueError: on entry, a lazy module (``nn.LazyLinear``, ...) is still uninitialised: its
            first forward draws from the RNG, which no restore can make invisible.

    Example (dropout and BatchNorm in train mode; nothing of the pass remains):
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
        >>> x = torch.randn(8, 3)
        >>> stats, state = model[1].running_mean.clone(), torch.get_rng_state()
        >>> with isolated_pass(model):
        ...     a, b = model(x), model(x)                    # eval mode: deterministic
        ...     model[1].training
        False
        >>> torch.equal(a, b), model[1].training, torch.equal(torch.get_rng_state(), state)
        (True, True, True)
        >>> with isolated_pass(model, train_mode=True):
        ...     c = model(x)                                 # train mode: dropout draws, BatchNorm updates
        >>> torch.equal(model[1].running_mean, stats), int(model[1].num_batches_tracked)
        (True, 0)
    """
    _refuse_lazy(model)
    modules = list(model.named_modules())
    flags = [(m, m.training) for _, m in modules]
    # Per module: the buffer objects by name, and a private copy of each value and its version.
    buffers = []
    for _, m in modules:
        objects = dict(m._buffers)  # the raw dict: re-binding and deletion must be undone too
        values = {k: (b.detach().clone(), b._version) for k, b in objects.items() if b is not None}
        buffers.append((m, objects, set(m._non_persistent_buffers_set), values))
    weights = [
        (m.weight, m.weight.detach().clone(), m.weight._version)
        for _, m in modules
        if isinstance(m, _RENORMALISING) and m.max_norm is not None
    ]
    rng = _rng_state()
    try:
        if not train_mode:
            for _, m in modules:
                m.training = False  # per module, not m.eval(): the flags are restored one by one
        yield model
    finally:
        _set_rng_state(rng)
        for m, flag in flags:
            m.training = flag
        for m, objects, non_persistent, values in buffers:
            for k in [k for k in m._buffers if k not in objects]:
                del m._buffers[k]
            m._buffers.update(objects)
            m._non_persistent_buffers_set.clear()
            m._non_persistent_buffers_set.update(non_persistent)
            for k, (saved, version) in values.items():
                _restore_values(objects[k], saved, version)
        for weight, saved, version in weights:
            _restore_values(weight, saved, version)

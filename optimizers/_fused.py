"""Fused elementwise kernels: one compiled pass where eager torch makes many (``torch.compile``).

Every tracked step evaluates a few elementwise formulas over every parameter: the secant slope J
and the validation point's shift Δ(0) + s·J ⊙ g_B. In eager mode each operation of a formula is a
pass over memory (AdamW's secant is 15 passes, its shift 7); compiled, the formula is one pass.
A :class:`Kernel` is a plain function of tensors whose hyper-parameters travel in one float64
tensor, so that a new step count is new data, not a recompilation; it is compiled once per dtype
and device with dynamic shapes, on first use with a large enough tensor.

The kernels only ever feed attribution (slopes and validation points), never the training
update: training stays bit-identical with or without them. They agree with the eager formulas
to rounding (the compiler may fuse a multiply-add), which the tests check in float64.

Where a kernel cannot run (compiling switched off, tensors below :data:`MIN_ELEMENTS`, half
precision, a tensor subclass such as FSDP2's ``DTensor``, a torch function mode active, a failed
compilation), it returns ``None`` and the caller runs its eager formula; a failed compilation
warns once with :class:`FusedKernelWarning` and is not retried in the process.

Example:
    >>> import torch
    >>> from optimizers._fused import Kernel, fused_kernels
    >>> double = Kernel(lambda x, c: x * c[0])
    >>> with fused_kernels(False):
    ...     double(torch.ones(3), (2.0,)) is None
    True
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator

import torch

#: ``compile="auto"`` compiles on a CPU only for models with at least this many trainable elements:
#: below it, what fusing saves per step is small beside the compiler's fixed cost (about 115 MB of
#: resident memory for dynamo and inductor, and seconds for the first compilation).
AUTO_ELEMENTS = 2**22

#: A tensor below this many elements is evaluated eagerly: the compiled call's fixed cost
#: (guards, launch; about 30 µs on a CPU) exceeds what fusing saves on it.
MIN_ELEMENTS = 2**15

_log = logging.getLogger(__name__)
# Process-wide, not per thread: a streamed contraction runs in autograd's (or DDP's) threads.
# Off outside a block: a library call never starts a compilation unasked; the tracker (or the
# user, ``with optimizers.fused_kernels():``) switches it on.
_enabled = False


class FusedKernelWarning(UserWarning):
    """A fused kernel could not be compiled; its eager formula is used instead (same values, slower)."""


def enabled() -> bool:
    """Whether fused kernels are compiled here (False outside a :func:`fused_kernels` block)."""
    return _enabled


@contextlib.contextmanager
def fused_kernels(enable: bool = True) -> Iterator[None]:
    """Switch compiled kernels on or off inside the block (``InRunShapley(..., compile=...)`` does).

    Outside any block they are off, so that the functional API (``optimizers.linearize(opt).secant``,
    ``attribution.step_values``) runs eagerly unless asked.

    Example:
        >>> with fused_kernels():
        ...     enabled()
        True
        >>> enabled()
        False
    """
    global _enabled
    previous, _enabled = _enabled, bool(enable)
    try:
        yield
    finally:
        _enabled = previous


def resolve(compile: bool | str, params) -> bool:
    """The ``compile`` option of :class:`~attribution.InRunShapley` as a bool for these parameters.

    ``True``/``False`` are kept; ``"auto"`` is True when a parameter lives on an accelerator (host
    memory is not what a GPU run is short of) or the parameters hold at least
    :data:`AUTO_ELEMENTS` elements (MiniLM's 22.7M: 0.46 → 0.54 of plain throughput on a CPU; a
    0.4M-parameter MLP gains 0.39 → 0.41 and would pay 1.04 → 1.20 in peak memory).

    Raises:
        ValueError: any other value.
    Example:
        >>> resolve("auto", [torch.zeros(10)]), resolve(True, [torch.zeros(10)])
        (False, True)
    """
    if compile is True or compile is False:
        return compile
    if compile != "auto":
        raise ValueError(f"compile={compile!r} is not accepted; use 'auto' (default), True or False")
    params = list(params)
    return any(p.device.type != "cpu" for p in params) or sum(p.numel() for p in params) >= AUTO_ELEMENTS


def _compilable(tensors: tuple[torch.Tensor, ...]) -> bool:
    lead = tensors[0]
    if lead.numel() < MIN_ELEMENTS or not enabled():
        return False
    if any(type(t) is not torch.Tensor or t.requires_grad or t.device != lead.device or t.dtype != lead.dtype for t in tensors):
        return False  # DTensor shards, autograd inputs, mixed devices or dtypes: the eager formula
    if torch.compiler.is_compiling() or torch.overrides._get_current_function_mode_stack():
        return False  # inside a user's compiled region or a capture mode: do not nest dynamo
    # Not half precision: the eager formulas promote it to float32 (OptimizerLinearization._inputs).
    return lead.dtype in (torch.float32, torch.float64)


class Kernel:
    """An elementwise formula compiled on first use; ``None`` where it does not apply.

    Args:
        fn: ``fn(*tensors, c) -> tensor``: tensors of one shape (or broadcastable) and a float64
            ``[k]`` tensor ``c`` of hyper-parameters, unpacked inside ``fn``.
    Call:
        ``kernel(*tensors, values)`` with ``values`` the k hyper-parameters as Python floats
        returns ``fn``'s result computed by the compiled kernel, or ``None`` (the caller's eager
        path) when the tensors do not qualify. The float64 ``c`` is made only for a compiled call
        (data, not constants: a new step count is not a recompilation), so the eager path costs
        no tensor creation.
    """

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self._compiled: Callable[..., torch.Tensor] | None = None
        self.broken: BaseException | None = None

    def __call__(self, *args) -> torch.Tensor | None:
        *tensors, values = args
        if self.broken is not None or not _compilable(tuple(tensors)):
            return None
        if self._compiled is None:
            _log.info("compiling the fused kernel %s (dynamic shapes; dynamo adds a graph per dtype and device)", self.fn.__name__)
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            with torch.no_grad():
                return self._compiled(*tensors, torch.tensor(values, dtype=torch.float64, device=tensors[0].device))
        except Exception as exc:  # no C++ compiler, an unsupported device, a compiler bug
            self.broken = exc
            warnings.warn(
                f"the fused kernel {self.fn.__name__} could not be compiled ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); its eager formula is used from now on "
                "(the same values, slower). Switch compiling off with InRunShapley(..., compile=False) "
                "to silence this",
                FusedKernelWarning,
                stacklevel=3,
            )
            return None

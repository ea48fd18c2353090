"""What the ghost engine records during forward and backward: calls, passes, and the checks on them.

A :class:`_Pass` is one call of the model (a micro-batch, or one validation target); each
:class:`_Call` holds a tracked module's inputs and the gradient its output received. The
helpers here read the recording (batch sizes, gradient fingerprints for the streamed path) and
refuse what hooks cannot see (parameters used outside their module, reparametrized weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._completeness import CompletenessCheck
from ._contraction import StepContraction
from ._errors import ParameterUseError
from ._factors import PerSample, Term
from ._rules import LayerRule
from ._sharded import local

if TYPE_CHECKING:
    from ._engine import GhostEngine


@dataclasses.dataclass
class _Call:
    """One forward call of a tracked module and the gradient its output received."""

    module: nn.Module
    args: tuple
    kwargs: dict
    grad: torch.Tensor | None = None
    #: A rule whose terms are all materialized (norm weights and biases) and need no J: they are
    #: computed as soon as the output gradient arrives, and the gradient itself is not kept.
    eager: type[LayerRule] | None = None
    terms: dict[str, Term] | None = None
    #: Every covered parameter was contracted during the backward pass (streaming); the
    #: captured input and output gradient were released.
    streamed: bool = False

    #: The output gradient arrived in a backward with ``create_graph=True`` (double backward).
    create_graph: bool = False
    #: ``(device_type, dtype)`` of the autocast the forward ran under (the fallback recomputes in it).
    autocast: tuple[str, torch.dtype] | None = None
    #: For a module returning several tensors (fallback only): leaf index -> (batch axis, output gradient).
    leaf_grads: dict[int, tuple[int, torch.Tensor]] | None = None

    def add_leaf_grad(self, i: int, axis: int, g: torch.Tensor) -> None:
        """Hook of output leaf ``i`` (batch axis ``axis``) of a multi-output module."""
        self.create_graph = self.create_graph or torch.is_grad_enabled()
        g = g.detach()
        old = self.leaf_grads.get(i)
        self.leaf_grads[i] = (axis, g if old is None else old[1] + g)
        n = g.shape[axis]
        # A stride-0 stand-in [n]: the batch size and "a gradient arrived" for the pass bookkeeping.
        self.grad = g.new_zeros(()).expand(n)

    def add_grad(self, g: torch.Tensor) -> None:
        # Autograd enables grad mode inside hooks exactly when the backward builds a graph
        # (create_graph=True: gradient penalties, double backward).
        self.create_graph = self.create_graph or torch.is_grad_enabled()
        g = g.detach()
        if self.eager is not None:
            try:
                terms = self.eager.call_terms(self.module, self.args, self.kwargs, g)
            except Exception:  # noqa: BLE001 - keep the gradient; values() reports the error
                terms = None
            if terms is not None and all(isinstance(t, PerSample) for t in terms.values()):
                if self.terms is not None:  # retain_graph: a second backward adds up
                    terms = {a: PerSample(self.terms[a].c + t.c) for a, t in terms.items()}
                self.terms = terms
                # A stride-0 stand-in with the gradient's shape (the batch size is read from it).
                self.grad = g.new_zeros(()).expand(g.shape)
                return
            self.eager = None
        # A graph backpropagated twice (retain_graph) adds up in param.grad; do the same.
        self.grad = g if self.grad is None else self.grad + g


@dataclasses.dataclass
class _Pass:
    """The calls recorded during one call of the model (one micro-batch, or one target).

    A pass starts at a call of the root model, at the first top-level call after
    :meth:`GhostEngine.mark_boundary`, or when a top-level module of the current pass is called
    again. Top-level calls of submodules (a ``Trainer`` calling the model a wrapper holds, a
    ``LightningModule`` calling its encoder and decoder) join the current pass otherwise.
    """

    calls: list[_Call] = dataclasses.field(default_factory=list)
    top: set = dataclasses.field(default_factory=set)

    @property
    def has_grad(self) -> bool:
        return any(c.grad is not None for c in self.calls)


@dataclasses.dataclass
class _Stream:
    """One step's in-backward contraction (see :meth:`GhostEngine.stream`)."""

    val_grads: list[Mapping[torch.Tensor, torch.Tensor]]
    slope: Callable[[torch.Tensor, torch.Tensor], Any]
    dtype: torch.dtype
    #: The step's contraction routine (shared with ``values()``, which adds the other parameters).
    contraction: StepContraction
    #: φ[z, k] of the parameters contracted so far, ``[n, K]``.
    out: torch.Tensor | None = None
    #: parameter -> the ``.grad`` tensor its J was evaluated at.
    done: dict[torch.Tensor, torch.Tensor | None] = dataclasses.field(default_factory=dict)
    #: parameter -> (sum, norm) of that gradient, to see an in-place change after the backward.
    fingerprints: dict[torch.Tensor, tuple[float, float]] = dataclasses.field(default_factory=dict)
    #: Both sides of the completeness identity of the streamed parameters (at hook time).
    check: CompletenessCheck = dataclasses.field(default_factory=CompletenessCheck)
    error: str | None = None
    #: an exception a hook stored instead of raising it inside FSDP2's post-backward (raised by ``check_stream``)
    failure: BaseException | None = None
    #: all-gathers of P taken in the backward (FSDP2: every rank takes the same ones)
    gathers: int = 0
    #: post-accumulate-grad hooks of sharded parameters run (0: FSDP2 reduce-scattered nothing)
    fired: int = 0
    #: the engine's own post-accumulate-grad hooks contract (False: the caller's, see ``contract_streamed``)
    own_hooks: bool = True
    #: the parameters contracted in the backward, fixed when the training capture starts
    streamable: set | None = None
    #: the conditions were checked once after the backward (``check_stream``)
    checked: bool = False


@dataclasses.dataclass(frozen=True)
class _Tracked:
    """A module with trainable parameters of its own: the rule's share and the fallback's share."""

    name: str
    rule: type[LayerRule] | None
    covered: dict[str, nn.Parameter]
    uncovered: dict[str, nn.Parameter]


class _ParamUseMode(TorchFunctionMode):
    """Raise when a tracked parameter enters a differentiable op outside the modules that own it."""

    def __init__(self, engine: GhostEngine):
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.is_grad_enabled():
            used = [a for a in _flat(args, kwargs) if isinstance(a, torch.Tensor) and a in self.engine._owners]
            # Only differentiable uses matter: shape reads, detach() and autograd.grad itself do not
            # add to the parameter's gradient.
            if used and any(isinstance(o, torch.Tensor) and o.requires_grad for o in _flat((out,) if not isinstance(out, (list, tuple)) else out, {})):
                for a in used:
                    self.engine._check_use(a)
        return out


def _flat(args, kwargs) -> Iterator[Any]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


class _Capture:
    """Context manager returned by :meth:`GhostEngine.capture_train` / :meth:`GhostEngine.capture_val`."""

    def __init__(self, engine: GhostEngine, kind: str):
        self._engine, self._kind = engine, kind

    def __enter__(self) -> GhostEngine:
        self._engine._start(self._kind)
        return self._engine

    def __exit__(self, *exc) -> None:
        self._engine._stop()


#: Modules whose forward uses their children's parameters directly (``out_proj.weight`` inside
#: ``F.multi_head_attention_forward``): they own their whole subtree's parameters.
_COMPOSITE: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def _fingerprint(g: torch.Tensor) -> torch.Tensor:
    """(sum, norm) of a gradient, ``[2]``: changes under any rescale, sign flip or edit (bitwise-equal tensors agree)."""
    g = local(g.detach())  # FSDP2: this rank's shard (each rank checks its own; the ranks agree at the step)
    # The same norm kernel as _changed_since uses for all gradients at once (bitwise-equal results).
    foreach_norm = getattr(torch, "_foreach_norm", None)
    norm = foreach_norm([g])[0] if foreach_norm is not None else torch.linalg.vector_norm(g)
    return torch.stack([g.sum(), norm.to(g.dtype)])


def _changed_since(fingerprints: Mapping[torch.Tensor, torch.Tensor]) -> set[torch.Tensor]:
    """Parameters whose ``.grad`` no longer has the fingerprint taken in the backward hook (one comparison for all)."""
    params = [p for p in fingerprints if p.grad is not None]
    if not params:
        return set()
    then = torch.stack([fingerprints[p] for p in params])
    grads = [local(p.grad.detach()) for p in params]
    # One fused norm kernel for all gradients (as clip_grad_norm_ does), then one sum per gradient.
    foreach_norm = getattr(torch, "_foreach_norm", None)
    norms = foreach_norm(grads) if foreach_norm is not None else [torch.linalg.vector_norm(g) for g in grads]
    now = torch.stack([torch.stack([g.sum(), n.to(g.dtype)]) for g, n in zip(grads, norms)])
    same = (then == now).all(1).tolist()
    return {p for p, ok in zip(params, same) if not ok}


def _in_backward() -> bool:
    """Whether the autograd engine is running (a forward now is a checkpoint recomputation)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _leading_batch(args, kwargs) -> int | None:
    """The one leading dimension > 1 that the tensor arguments of a call agree on, else ``None``."""
    from torch.utils import _pytree

    sizes = {int(t.shape[0]) for t in _pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
    sizes.discard(1)
    return sizes.pop() if len(sizes) == 1 else None


def _refuse_reparametrized(name: str, module: nn.Module) -> None:
    """Refuse modules whose weight is computed from other parameters before each forward.

    ``torch.nn.utils.parametrize`` / ``parametrizations.weight_norm``, the older
    ``torch.nn.utils.weight_norm`` and ``torch.nn.utils.prune`` replace ``weight`` by a function of
    trainable tensors (``original``, ``weight_g``/``weight_v``, ``weight_orig``); the layer rules
    see only the computed weight, so the trained tensors' per-sample gradients are not captured.
    """
    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.weight_norm import WeightNorm

    what = None
    if parametrize.is_parametrized(module) or isinstance(module, parametrize.ParametrizationList):
        what = "torch.nn.utils.parametrize (e.g. parametrizations.weight_norm, orthogonal, spectral_norm)"
        fix = "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') before tracking"
    else:
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                what, fix = "torch.nn.utils.weight_norm", "torch.nn.utils.remove_weight_norm(module) before tracking"
            elif isinstance(hook, prune.BasePruningMethod):
                what, fix = "torch.nn.utils.prune", "torch.nn.utils.prune.remove(module, 'weight') (the pruned entries stay zero) before tracking"
    if what is not None:
        raise ParameterUseError(
            f"module {name or type(module).__name__!r} ({type(module).__name__}) computes its weight from other trainable "
            f"tensors before each forward ({what}); the layer rules see only the computed weight, so the per-sample "
            f"gradients of the trained tensors are not captured. Fix: {fix}, or train the plain weight"
        )

"""The completeness identity: the captured per-sample contributions add up to the gradient the optimizer uses.

For every parameter p and validation target k, with P = J ⊙ ∇L_val^k the preconditioned
validation gradient the estimator contracts with,

    ⟨P, param.grad⟩ = c · Σ_z ⟨P, c_z⟩

where c_z are the captured contributions and c is one number for the whole step: 1 when
nothing touched the gradient between the backward pass and ``optimizer.step()``, the clip
factor under ``clip_grad_norm_``, 1/S after ``GradScaler.unscale_``. The estimator already
computes every ⟨P, c_z⟩, so checking the identity costs one dot product per parameter. A
ratio that differs between parameters means the gradient was edited non-uniformly, or holds a
part that was never captured (a backward outside the capture, a gradient penalty, a hook the
layer rules do not see), and the step cannot be valued.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ._sharded import is_sharded, local


class IncompleteGradientError(RuntimeError):
    """The gradient the optimizer will use is not a uniform multiple of the captured per-sample contributions.

    Example:
        >>> check = CompletenessCheck()
        >>> P = torch.ones(2, dtype=torch.float64)
        >>> check.add_samples("w", 0, torch.tensor([1.0, 1.0], dtype=torch.float64))    # Σ_z ⟨P, c_z⟩ = 2
        >>> check.add_grad("w", 0, P, torch.tensor([3.0, 3.0], dtype=torch.float64))      # ⟨P, grad⟩ = 6
        >>> check.add_samples("b", 0, torch.tensor([1.0, 0.0], dtype=torch.float64))
        >>> check.add_grad("b", 0, P, torch.tensor([0.5, 0.5], dtype=torch.float64))      # ratio 1, not 3
        >>> check.add_samples("v", 0, torch.tensor([1.0, 0.0], dtype=torch.float64))
        >>> check.add_grad("v", 0, P, torch.tensor([0.5, 0.5], dtype=torch.float64))      # ratio 1
        >>> check.grad_scale()
        Traceback (most recent call last):
        ...
        estimators._completeness.IncompleteGradientError: the gradient of parameter 'w' ...
    """


#: Relative tolerance of the identity per dtype (of the gradient or of the contraction, the
#: coarser wins), against the rounding scale Σ|P ⊙ grad| + Σ_z |⟨P, c_z⟩| of the parameter plus
#: the largest such scale of the step (so the identity holds to this fraction of the step's
#: largest term). Measured errors on the bench models are far below these (docs/reliability.md).
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 4e-2}


def tolerance(dtype: torch.dtype) -> float:
    """The identity's relative tolerance in ``dtype``.

    Example:
        >>> tolerance(torch.float64), tolerance(torch.bfloat16)
        (1e-09, 0.04)
    """
    return _TOLERANCE.get(dtype, 1e-4)


_CAUSES = (
    "Likely causes: a non-uniform edit of the gradient (clip_grad_value_, a gradient hook such as "
    "param.register_hook, manual changes of .grad); a backward pass outside `tracker.batch` that added to "
    ".grad (an extra loss.backward(), or zero_grad(set_to_none=False) not called before the batch); a second "
    "backward or torch.autograd.grad(..., create_graph=True) inside the block (a gradient penalty); a "
    "parameter used in a way the layer hooks do not see. Fix: do uniform rescaling only (clip_grad_norm_, "
    "GradScaler.unscale_), run every backward of the step inside `with tracker.batch(ids):`, and move "
    "gradient penalties out of the tracked loss."
)


@dataclasses.dataclass
class _Entry:
    tolerance: float = 0.0
    captured: float = 0.0  # Σ_z ⟨P, c_z⟩
    spread: float = 0.0  # Σ_z |⟨P, c_z⟩|
    used: float = 0.0  # ⟨P, param.grad⟩
    #: Σ |P ⊙ param.grad|, computed only for an entry the cheap scales cannot clear.
    rounding: float = 0.0
    #: ‖P‖ · Σ_z ‖c_z‖ (an upper bound of every product the two sides sum), likewise only on demand:
    #: sums that cancel across samples or positions.
    magnitude: float = 0.0
    has_grad: bool = False
    #: ⟨P, param.grad⟩ and its rounding scale are this rank's shard only (FSDP2): summed over ranks by reduce()
    sharded: bool = False
    # Pending tensors, reduced together in one pass by _settle (no per-entry synchronisation).
    samples: list = dataclasses.field(default_factory=list)
    dots: list = dataclasses.field(default_factory=list)
    operands: list = dataclasses.field(default_factory=list)  # (P, grad) for the rounding scale
    roundings: list = dataclasses.field(default_factory=list)  # Σ|P ⊙ grad| already taken (0-d tensors)


class CompletenessCheck:
    """Collects both sides of the completeness identity per (parameter, target) and finds c.

    Use :meth:`add_samples` with each block of per-sample contractions ⟨P, c_z⟩ ``[n]`` and
    :meth:`add_grad` once with P and the gradient the optimizer uses; then :meth:`grad_scale`.
    Sums are kept as tensors and reduced once, in :meth:`grad_scale`; ``P`` and the gradient are
    referenced (not copied) until then, to compute the rounding scale of an entry that needs it.

    Example (a uniform rescale by 0.5, e.g. ``clip_grad_norm_``):
        >>> check = CompletenessCheck()
        >>> P = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> for name, c in (("w", torch.tensor([[1.0, 0.0], [3.0, 1.0]])), ("b", torch.tensor([[2.0, 2.0], [0.0, -1.0]]))):
        ...     c = c.double()
        ...     check.add_samples(name, 0, c @ P)            # ⟨P, c_z⟩ for z = 0, 1
        ...     check.add_grad(name, 0, P, 0.5 * c.sum(0))   # the optimizer sees half the sum
        >>> check.grad_scale()
        0.5
    """

    def __init__(self):
        self.entries: dict[tuple[str, int], _Entry] = {}

    def _entry(self, name: str, k: int, dtype: torch.dtype) -> _Entry:
        entry = self.entries.setdefault((name, k), _Entry())
        entry.tolerance = max(entry.tolerance, tolerance(dtype))
        return entry

    def add_samples(self, name: str, k: int, contractions: torch.Tensor, *, captured_dtype: torch.dtype | None = None) -> None:
        """Add per-sample contractions ⟨P, c_z⟩ ``[n]`` of parameter ``name`` for target ``k``.

        ``captured_dtype``: the dtype the contributions were captured in, if coarser than the
        contraction's (activations under ``torch.autocast``); the tolerance follows the coarser.
        """
        entry = self._entry(name, k, contractions.dtype)
        if captured_dtype is not None:
            entry.tolerance = max(entry.tolerance, tolerance(captured_dtype))
        entry.samples.append(contractions.detach())

    def add_grad(
        self, name: str, k: int, P: torch.Tensor, grad: torch.Tensor, *, keep: bool = True, grad_norm: torch.Tensor | None = None
    ) -> None:
        """Record ⟨P, grad⟩ for ``name`` and target ``k`` (``P`` and ``grad`` of the parameter's shape).

        ``keep=False`` takes the rounding scale now instead of keeping references to ``P`` and
        ``grad`` (the streamed contraction frees P right after), as the Cauchy–Schwarz bound
        ‖P‖ ‖grad‖ ≥ Σ|P ⊙ grad| (two reductions, no temporary; ``grad_norm`` if already known).
        """
        entry = self._entry(name, k, grad.dtype)
        entry.tolerance = max(entry.tolerance, tolerance(P.dtype))
        if is_sharded(grad) or is_sharded(P):
            # FSDP2: each rank holds one shard of P and of the gradient; the dot product is a sum
            # of per-shard parts, added over ranks in reduce() (no gather of either tensor).
            P, grad, entry.sharded = local(P), local(grad), True
            if grad_norm is not None:
                grad_norm = local(grad_norm)
        if grad.is_sparse:
            grad = grad.to_dense()
        p, g = P.reshape(-1), grad.reshape(-1)
        if g.dtype != p.dtype:
            g = g.to(p.dtype)
        entry.dots.append(torch.dot(p, g))
        if keep:
            entry.operands.append((p, g))
        else:
            norm_g = torch.linalg.vector_norm(g) if grad_norm is None else grad_norm
            entry.roundings.append(torch.linalg.vector_norm(p) * norm_g)
        entry.has_grad = True

    def _settle(self) -> None:
        """Reduce every pending tensor in a few batched operations and one transfer to Python."""
        pending = [e for e in self.entries.values() if e.samples or e.dots or e.roundings]
        if not pending:
            return
        # Every pending [n] block is summed (and its absolute values) and every 0-d sum taken in
        # one vector, moved to Python at once; the entries then add their parts there. The number of
        # tensor operations does not grow with the entries (each costs microseconds of dispatch: on
        # a small model a per-entry form was half of the whole check).
        blocks, owner, scalars, which = [], [], [], []
        for e in pending:
            blocks += [x.reshape(-1) for x in e.samples]
            owner += [e] * len(e.samples)
            scalars += e.dots + e.roundings
            which += [(e, "used")] * len(e.dots) + [(e, "rounding")] * len(e.roundings)
        parts = []
        if blocks:
            if len({(x.numel(), x.device, x.dtype) for x in blocks}) == 1:
                x = torch.stack(blocks).to(torch.float64).cpu()  # [B, n]: every block holds the step's n samples
                parts += [x.sum(1), x.abs().sum(1)]
            else:
                parts += [torch.stack([b.sum(dtype=torch.float64) for b in blocks]).cpu(),
                          torch.stack([b.abs().sum(dtype=torch.float64) for b in blocks]).cpu()]
        if scalars:
            parts.append(_gathered([x if x.dim() == 0 else x.reshape(()) for x in scalars]))
        values = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()
        B = len(blocks)
        for b, e in enumerate(owner):
            e.captured += values[b]
            e.spread += values[B + b]
        for j, (e, side) in enumerate(which):
            setattr(e, side, getattr(e, side) + values[2 * B + j])
        for e in pending:
            e.samples, e.dots, e.roundings = [], [], []

    def _rounding(self, e: _Entry) -> None:
        for p, g in e.operands:
            e.rounding += float(torch.linalg.vector_norm(p * g, 1, dtype=torch.float64))
        e.operands = []

    def _bound(self, e: _Entry, c: float, floor: float = 0.0) -> float:
        return e.tolerance * (e.rounding + abs(e.used) + abs(c) * (e.spread + e.magnitude) + floor) + 1e-300

    def excess(self, name: str, k: int, c: float = 1.0) -> float:
        """|⟨P, grad⟩ − c Σ_z ⟨P, c_z⟩| over its tolerance for one entry (> 1: the identity fails there).

        The rounding scale Σ|P ⊙ grad| is computed only when the cheap scales do not clear the entry.
        """
        self._settle()
        e = self.entries[(name, k)]
        ratio = abs(e.used - c * e.captured) / self._bound(e, c)
        if ratio > 1.0 and e.operands:
            self._rounding(e)
            ratio = abs(e.used - c * e.captured) / self._bound(e, c)
        return ratio

    def release(self, name: str, k: int) -> None:
        """Drop the references to P and the gradient kept for entry ``(name, k)``."""
        self.entries[(name, k)].operands = []

    def reduce(self, all_reduce: Callable[[torch.Tensor], torch.Tensor], world_size: int) -> None:
        """Sum the captured sides over the processes of a data-parallel run (param.grad is their average).

        ``all_reduce(t)`` sums a float64 tensor over ranks; afterwards the identity reads
        ⟨P, grad⟩ = c · (1/W) Σ_ranks Σ_z ⟨P, c_z⟩. Every rank holds the same numbers, so every
        rank accepts or refuses the step alike. Under FSDP2 (entries marked ``sharded``) each rank
        holds ⟨P, grad⟩ of its own shard: that side (and its rounding scale) is summed over ranks.
        """
        self._settle()
        keys = sorted(self.entries)
        for e in self.entries.values():
            self._rounding(e)  # before the collective decision: the same inputs on every rank
        rows = []
        for key in keys:
            e = self.entries[key]
            rows.append([e.captured, e.spread, e.used if e.sharded else 0.0, e.rounding if e.sharded else 0.0])
        total = all_reduce(torch.tensor(rows, dtype=torch.float64).reshape(-1, 4))
        for key, (captured, spread, used, rounding) in zip(keys, total.tolist()):
            e = self.entries[key]
            e.captured, e.spread = captured / world_size, spread / world_size
            if e.sharded:
                e.used, e.rounding = used, rounding

    def grad_scale(self, *, fixed: float | None = None, magnitude=None, noise_floor: dict[int, float] | None = None) -> float:
        """The common ratio c = ⟨P, grad⟩ / Σ_z ⟨P, c_z⟩ over every (parameter, target); 1.0 when within rounding of 1.

        Args:
            fixed: require this c (e.g. 1.0 when the slope J was evaluated before any rescale).
            magnitude: ``magnitude(name, k)`` -> ‖P‖ · Σ_z ‖c_z‖, asked only for an entry that
                fails against the cheap scales (its sums may cancel), to judge it against rounding.
            noise_floor: per target k, an absolute level below which a mismatch cannot change
                the validation loss in this dtype (about eps · |L_val^k|): a numerically
                degenerate layer (a LayerNorm over constant features) is not refused for noise.
        Raises:
            IncompleteGradientError: the ratios differ beyond rounding; the message names the
                parameter that disagrees most, both sides of the identity and the likely causes.
        """
        self._settle()
        entries = [(key, e) for key, e in self.entries.items() if e.has_grad or e.spread > 0]
        if fixed is not None:
            c = float(fixed)
        else:
            # The median ratio over the entries whose captured side is well above rounding: one
            # edited parameter must not pull c away from the ratio the others agree on.
            ratios = sorted(e.used / e.captured for _, e in entries if abs(e.captured) > 4 * self._bound(e, 1.0))
            c = ratios[len(ratios) // 2] if ratios else 1.0
            if abs(c - 1.0) <= max((e.tolerance for _, e in entries), default=0.0):
                c = 1.0
        # One scale per target over all parameters: a parameter whose gradient is zero up to rounding
        # (an attention key bias, which softmax ignores) must not be judged against its own noise.
        floor: dict[int, float] = {}
        for (_, k), e in entries:
            floor[k] = max(floor.get(k, 0.0), abs(e.used) + abs(c) * e.spread)
        for k, level in (noise_floor or {}).items():
            if k in floor:
                floor[k] = max(floor[k], level)
        worst, excess = None, 1.0
        for key, e in entries:
            ratio = abs(e.used - c * e.captured) / self._bound(e, c, floor[key[1]])
            if ratio > 1.0 and e.operands:
                self._rounding(e)
                ratio = abs(e.used - c * e.captured) / self._bound(e, c, floor[key[1]])
            if ratio > 1.0 and magnitude is not None and e.magnitude == 0.0:
                e.magnitude = float(magnitude(*key))
                ratio = abs(e.used - c * e.captured) / self._bound(e, c, floor[key[1]])
            if ratio > excess:
                worst, excess = (key, e), ratio
        for e in self.entries.values():
            e.operands = []  # release the references to P and the gradients
        if worst is not None:
            (name, k), e = worst
            own = e.used / e.captured if e.captured != 0 else float("inf")
            raise IncompleteGradientError(
                f"the gradient of parameter {name!r} is not the sum of the per-sample contributions captured in "
                f"`tracker.batch` (target {k}: ⟨P, Σ_z c_z⟩ = {e.captured:.6g} but ⟨P, param.grad⟩ = {e.used:.6g}, "
                f"a ratio of {own:.6g} where the step's common ratio is {c:.6g}; P = J ⊙ ∇L_val). The step cannot be "
                f"valued. {_CAUSES}"
            )
        return c


def _gathered(parts: list[torch.Tensor]) -> torch.Tensor:
    """0-d tensors as one float64 vector on the CPU (one stack where they share a device and dtype)."""
    if len({(x.device, x.dtype) for x in parts}) > 1:
        parts = [x.to(torch.float64).cpu() for x in parts]
    return torch.stack(parts).to(torch.float64).cpu()

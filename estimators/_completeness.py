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

import torch


class IncompleteGradientError(RuntimeError):
    """The gradient the optimizer will use is not a uniform multiple of the captured per-sample contributions.

    Example:
        >>> check = CompletenessCheck()
        >>> P = torch.ones(2, dtype=torch.float64)
        >>> check.add_samples("w", 0, torch.tensor([1.0, 1.0], dtype=torch.float64))    # Σ_z ⟨P, c_z⟩ = 2
        >>> check.add_grad("w", 0, P, torch.tensor([3.0, 3.0], dtype=torch.float64))      # ⟨P, grad⟩ = 6
        >>> check.add_samples("b", 0, torch.tensor([1.0, 0.0], dtype=torch.float64))
        >>> check.add_grad("b", 0, P, torch.tensor([0.5, 0.5], dtype=torch.float64))      # ratio 1, not 3
        >>> check.grad_scale()
        Traceback (most recent call last):
        ...
        estimators._completeness.IncompleteGradientError: the gradient of parameter 'b' ...
    """


#: Relative tolerance of the identity per dtype (of the gradient or of the contraction, the
#: coarser wins), against the rounding scale Σ|P ⊙ grad| + Σ_z |⟨P, c_z⟩| of the parameter plus
#: the largest such scale of the step (so the identity holds to this fraction of the step's
#: largest term). Measured errors on the bench models are far below these (docs/reliability.md).
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 4e-2}

def tolerance(dtype: torch.dtype) -> float:
    """The identity's relative tolerance in ``dtype``."""
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
    rounding: float = 0.0  # Σ |P ⊙ param.grad|
    #: ‖P‖ · Σ_z ‖c_z‖ (an upper bound of every product the two sides sum), filled in only for
    #: entries the cheap scales cannot clear: sums that cancel across samples or positions.
    magnitude: float = 0.0
    has_grad: bool = False


class CompletenessCheck:
    """Collects both sides of the completeness identity per (parameter, target) and finds c.

    Use :meth:`add_samples` with each block of per-sample contractions ⟨P, c_z⟩ ``[n]`` and
    :meth:`add_grad` once with P and the gradient the optimizer uses; then :meth:`grad_scale`.

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
        entry.tolerance = max(entry.tolerance, _TOLERANCE.get(dtype, 1e-4))
        return entry

    def add_samples(self, name: str, k: int, contractions: torch.Tensor, *, captured_dtype: torch.dtype | None = None) -> None:
        """Add per-sample contractions ⟨P, c_z⟩ ``[n]`` of parameter ``name`` for target ``k``.

        ``captured_dtype``: the dtype the contributions were captured in, if coarser than the
        contraction's (activations under ``torch.autocast``); the tolerance follows the coarser.
        """
        entry = self._entry(name, k, contractions.dtype)
        if captured_dtype is not None:
            entry.tolerance = max(entry.tolerance, _TOLERANCE.get(captured_dtype, 1e-4))
        c = contractions.detach().double()
        entry.captured += float(c.sum())
        entry.spread += float(c.abs().sum())

    def add_grad(self, name: str, k: int, P: torch.Tensor, grad: torch.Tensor) -> None:
        """Record ⟨P, grad⟩ for ``name`` and target ``k`` (``P`` and ``grad`` of the parameter's shape)."""
        entry = self._entry(name, k, grad.dtype)
        entry.tolerance = max(entry.tolerance, _TOLERANCE.get(P.dtype, 1e-4))
        if grad.is_sparse:
            grad = grad.to_dense()
        prod = P.reshape(-1) * grad.reshape(-1).to(P.dtype)
        entry.used += float(prod.sum(dtype=torch.float64))
        entry.rounding += float(torch.linalg.vector_norm(prod, 1, dtype=torch.float64))
        entry.has_grad = True

    def _bound(self, e: _Entry, c: float, floor: float = 0.0) -> float:
        return e.tolerance * (e.rounding + abs(e.used) + abs(c) * (e.spread + e.magnitude) + floor) + 1e-300

    def excess(self, name: str, k: int, c: float = 1.0) -> float:
        """|⟨P, grad⟩ − c Σ_z ⟨P, c_z⟩| over its tolerance for one entry (> 1: the identity fails there)."""
        e = self.entries[(name, k)]
        return abs(e.used - c * e.captured) / self._bound(e, c)

    def reduce(self, all_reduce, world_size: int) -> None:
        """Sum the captured sides over the processes of a data-parallel run (param.grad is their average).

        ``all_reduce(t)`` sums a float64 tensor over ranks; afterwards the identity reads
        ⟨P, grad⟩ = c · (1/W) Σ_ranks Σ_z ⟨P, c_z⟩. Every rank holds the same numbers, so every
        rank accepts or refuses the step alike.
        """
        keys = sorted(self.entries)
        local = torch.tensor([[self.entries[key].captured, self.entries[key].spread] for key in keys], dtype=torch.float64).reshape(-1, 2)
        total = all_reduce(local) / world_size
        for key, (captured, spread) in zip(keys, total.tolist()):
            self.entries[key].captured, self.entries[key].spread = captured, spread

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
            floor[k] = max(floor.get(k, 0.0), e.rounding + abs(e.used) + abs(c) * e.spread)
        for k, level in (noise_floor or {}).items():
            if k in floor:
                floor[k] = max(floor[k], level)
        worst, excess = None, 1.0
        for key, e in entries:
            ratio = abs(e.used - c * e.captured) / self._bound(e, c, floor[key[1]])
            if ratio > 1.0 and magnitude is not None and e.magnitude == 0.0:
                e.magnitude = float(magnitude(*key))
                ratio = abs(e.used - c * e.captured) / self._bound(e, c, floor[key[1]])
            if ratio > excess:
                worst, excess = (key, e), ratio
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

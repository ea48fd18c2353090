"""``credit="momentum"``: the part of later updates carried by the momentum buffer, credited to its samples.

The per-step game takes the update the optimizer makes with no gradient, Δ_s(0), as the empty
coalition's and credits it to nobody; under momentum that is most of every update (a run's
values then add up to about 1 − β1 of its improvement). To first order in θ, Δ_s(0) is linear in
the buffer (:class:`optimizers.MomentumCarry`: Δ_s(0) = K_s ⊙ buf_{s−1} + terms without it), and
the buffer is a sum of earlier steps' gradients: a sample z of step r is in buf_{s−1} with the
factor a_{r,s} = c_r · gain_r · Π_{q=r+1}^{s−1} decay_q (c_r the step's gradient rescale). Step s
then credits z with

    −a_{r,s} ⟨K_s ⊙ ∇L_val(θ*_s), c_z⟩,

and summed over z and r this is −⟨∇L_val(θ*_s), Δ_s(0)⟩ less the parts of the buffer no sample
put there (L2 weight decay). The credit is exact for the ``window`` steps after r: the factors
captured at step r are kept and contracted with each later step's K_s ⊙ ∇L_val. When the window
closes, the rest of the geometric tail is credited at once assuming later steps look like the
last one (u_{s+j} = u_s, decay constant): a multiplier 1 / (1 − decay).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Hashable, Sequence

import torch

from estimators._contraction import contract
from estimators._factors import Term


@dataclasses.dataclass
class _OpenStep:
    """A step whose samples are still in the buffer within the window."""

    step: int
    ids: list[Hashable]
    passes: list[tuple[int, dict[torch.Tensor, list[Term]]]]  # per micro-batch: n and each parameter's terms
    coef: dict[torch.Tensor, float]  # a_{r,s} of the next step s, per parameter
    age: int = 0
    nbytes: int = 0


@dataclasses.dataclass
class StagedCredit:
    """What one step adds: credits ``[n_r, K]`` for open steps, and the step's own record (committed with the step)."""

    credits: list[tuple[int, list[Hashable], torch.Tensor]]
    coefs: list[dict[torch.Tensor, float]]  # the open steps' next coefficients, in order
    closing: list[bool]
    record: _OpenStep | None
    last_u: list[dict[torch.Tensor, torch.Tensor]]
    decays: dict[torch.Tensor, float]
    buffers: dict[torch.Tensor, torch.Tensor]
    #: a buffer was replaced since the last step: the open steps were closed by their tails instead
    replaced: bool = False


class MomentumCredit:
    """The open window of steps whose samples the momentum buffer still carries.

    Args:
        window: steps after a sample's own during which its carried credit is exact (≥ 1).
        dtype: the computation dtype of the contractions.
    """

    def __init__(self, window: int, dtype: torch.dtype):
        if int(window) < 1:
            raise ValueError(f"momentum_window={window!r} must be at least 1")
        self.window = int(window)
        self.dtype = dtype
        self.open: list[_OpenStep] = []
        # u = K ⊙ ∇L_val and the decays of the last committed step, for closing the window on save
        self._last_u: list[dict[torch.Tensor, torch.Tensor]] = []
        self._decays: dict[torch.Tensor, float] = {}
        # each parameter's buffer as of the last step (weakly): step() updates it in place, so
        # another object means the optimizer's state was replaced and the window no longer follows it
        self._buffers: dict[torch.Tensor, weakref.ref] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the captured factors kept for the open window."""
        return sum(o.nbytes for o in self.open)

    def stage(
        self, lin, params, val_grads, grad_scale: float, passes, ids, step: int, dtype: torch.dtype | None = None, buffers=None
    ) -> StagedCredit:
        """Credits of step ``step`` for the open steps, and its own record; nothing is changed until :meth:`commit`.

        Args:
            lin: the step's linearization; params: the parameters it moves.
            val_grads: K dicts param -> ∇L_val at the step's validation point.
            grad_scale: c of this step (param.grad = c Σ_z c_z).
            passes: the step's captured terms, ``[(n, {param: [Term]})]`` per micro-batch.
            ids: the step's ids (n_total).
            buffers: param -> the optimizer's own momentum-buffer tensor (``optimizer.state``), where
                it exists: ``step()`` updates it in place, so another object than at the last step
                means the state was replaced, and the open steps are closed by their tails.
        """
        dtype = dtype or self.dtype
        carries = {p: lin.momentum_carry(p) for p in params}
        carries = {p: c for p, c in carries.items() if c is not None}
        K = len(val_grads)
        u = [
            {p: (c.slope.to(dtype) * val_grads[k][p].to(dtype)) for p, c in carries.items() if c.slope is not None and p in val_grads[k]}
            for k in range(K)
        ]
        decays = {p: c.decay for p, c in carries.items()}
        buffers = {p: b for p, b in (buffers or {}).items() if p in carries}
        replaced = any(p in self._buffers and self._buffers[p]() is not b for p, b in buffers.items())
        credits, coefs, closing = ([], [], []) if not replaced else (self.tails(), [{} for _ in self.open], [True for _ in self.open])
        for o in self.open if not replaced else ():
            closes = o.age + 1 >= self.window
            mult = {}
            for p, a in o.coef.items():
                d = decays.get(p, 0.0)
                mult[p] = a / (1.0 - d) if closes and 0.0 <= d < 1.0 else a
            credits.append((o.step, o.ids, _credit(o, u, mult, dtype)))
            coefs.append({p: a * decays.get(p, 0.0) for p, a in o.coef.items()})
            closing.append(closes)
        record = None
        coef = {p: grad_scale * c.gain for p, c in carries.items() if c.gain != 0.0 and c.decay != 0.0}
        if coef:
            kept = [(n, {p: ts for p, ts in terms.items() if p in coef}) for n, terms in passes]
            record = _OpenStep(step, list(ids), kept, coef, 0, _terms_bytes(kept))
        return StagedCredit(credits, coefs, closing, record, u, decays, buffers, replaced)

    def commit(self, staged: StagedCredit) -> list[tuple[int, list[Hashable], torch.Tensor]]:
        """Apply a staged step: advance the open steps, close those at the window's end, open the new one."""
        still = []
        for o, coef, closes in zip(self.open, staged.coefs, staged.closing):
            if not closes:
                o.coef, o.age = coef, o.age + 1
                still.append(o)
        if staged.record is not None:
            still.append(staged.record)
        self.open = still
        self._last_u, self._decays = staged.last_u, staged.decays
        self._buffers = {p: weakref.ref(b) for p, b in staged.buffers.items()}
        return staged.credits

    def tails(self) -> list[tuple[int, list[Hashable], torch.Tensor]]:
        """Every open step closed with the tail estimate at the last step's u (for :meth:`InRunShapley.save`).

        Step r's remaining credit Σ_{j≥0} a d^j ⟨u_{s+j}, c_z⟩ is estimated as a / (1 − d) ⟨u_last, c_z⟩.
        """
        if not self._last_u:
            return []
        out = []
        for o in self.open:
            mult = {p: a / (1.0 - d) for p, a in o.coef.items() if 0.0 <= (d := self._decays.get(p, 0.0)) < 1.0}
            out.append((o.step, o.ids, _credit(o, self._last_u, mult, self.dtype)))
        return out

    def close(self) -> list[tuple[int, list[Hashable], torch.Tensor]]:
        """:meth:`tails` of every open step, which then leave the window (it is empty afterwards)."""
        out = self.tails()
        self.open = []
        return out


def _credit(o: _OpenStep, u: list[dict[torch.Tensor, torch.Tensor]], mult: dict[torch.Tensor, float], dtype) -> torch.Tensor:
    """``[n_r, K]``: −Σ_p mult_p ⟨u_k[p], c_z⟩ for the samples z of the open step ``o`` (float64)."""
    K = len(u)
    out = torch.zeros(sum(n for n, _ in o.passes), K, dtype=torch.float64)
    for p, m in mult.items():
        if p not in u[0] or m == 0.0:
            continue
        row = 0
        for n, terms in o.passes:
            ts = terms.get(p)
            if ts:
                ts = [t.to(dtype) for t in ts]
                for k in range(K):
                    out[row : row + n, k] -= m * contract(ts, u[k][p]).to(torch.float64)
            row += n
    return out


def _terms_bytes(passes: Sequence[tuple[int, dict[torch.Tensor, list[Term]]]]) -> int:
    """Bytes of the distinct tensors the terms hold (shared factors counted once)."""
    seen: dict[int, int] = {}

    def visit(x) -> None:
        if isinstance(x, torch.Tensor):
            seen.setdefault(id(x), x.numel() * x.element_size())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                visit(getattr(x, f.name))
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)

    for _, terms in passes:
        for ts in terms.values():
            visit(ts)
    return sum(seen.values())

"""Several optimizers in one run: the union of their linearizations (each parameter held by one).

Muon's standard recipe steps the weight matrices with Muon and the embeddings, norms and biases
with AdamW. ``linearize([muon, adamw])`` linearizes each and answers for every parameter with
the linearization of the optimizer that holds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from ._base import OptimizerLinearization, ParamState
from ._preconditioner import Preconditioner


def as_optimizer_list(optimizer: Any) -> list[torch.optim.Optimizer]:
    """``[optimizer]`` for one optimizer, the list for several; refuses overlaps and non-optimizers.

    Raises:
        TypeError: an entry is not a ``torch.optim.Optimizer``.
        ValueError: an empty list, the same optimizer twice, or a parameter held by two optimizers.
    Example:
        >>> a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        >>> len(as_optimizer_list([torch.optim.SGD([a], lr=0.1), torch.optim.Adam([b])]))
        2
        >>> as_optimizer_list([torch.optim.SGD([a], lr=0.1), torch.optim.Adam([a, b])])
        Traceback (most recent call last):
        ...
        ValueError: a parameter of shape (2,) is held by two optimizers (SGD and Adam); each parameter must be stepped by exactly one
    """
    opts = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if not opts:
        raise ValueError("no optimizer given: pass an optimizer or a non-empty list of optimizers")
    for opt in opts:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"expected torch.optim.Optimizer(s), got {type(opt).__name__}")
    if len({id(o) for o in opts}) != len(opts):
        raise ValueError("the same optimizer was given twice; pass each optimizer once")
    owner: dict[int, torch.optim.Optimizer] = {}
    for opt in opts:
        for group in opt.param_groups:
            for p in group["params"]:
                other = owner.setdefault(id(p), opt)
                if other is not opt:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} is held by two optimizers ({type(other).__name__} and "
                        f"{type(opt).__name__}); each parameter must be stepped by exactly one"
                    )
    return opts


class LinearizationGroup:
    """The linearizations of several optimizers, answering per parameter with its owner's.

    Same per-parameter API as :class:`OptimizerLinearization` (``update``, ``tangent``,
    ``secant``, ``preconditioner``, ``learning_rate``, ``state``, ``params``, ``in``).

    Args:
        linearizations: one :class:`OptimizerLinearization` per optimizer, covering disjoint parameters.
    Example:
        >>> a, b = (torch.nn.Parameter(torch.ones(2, dtype=torch.float64)) for _ in range(2))
        >>> a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        >>> from optimizers import linearize
        >>> lin = linearize([torch.optim.SGD([a], lr=0.1), torch.optim.Adam([b], lr=0.1)])
        >>> len(lin), lin.preconditioner(a, a.grad, "tangent").scalar, type(lin.owner(b)).__name__
        (2, -0.1, 'AdamLinearization')
    """

    def __init__(self, linearizations: Sequence[OptimizerLinearization]):
        self.linearizations = list(linearizations)
        self._owner: dict[torch.Tensor, OptimizerLinearization] = {}
        for lin in self.linearizations:
            for p in lin.params:
                if p in self._owner:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} is covered by two linearizations")
                self._owner[p] = lin

    def owner(self, param: torch.Tensor) -> OptimizerLinearization:
        """The linearization covering ``param``.

        Raises:
            KeyError: no optimizer of the group covers it (it had no ``.grad`` at linearize time).
        """
        try:
            return self._owner[param]
        except KeyError:
            raise KeyError(
                f"parameter of shape {tuple(param.shape)} is not covered by any of the {len(self.linearizations)} "
                "optimizers' linearizations (it is in none of them, or had no .grad when linearize() ran)"
            ) from None

    def update(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return self.owner(param).update(param, grad)

    def zero_update(self, param: torch.Tensor) -> torch.Tensor:
        return self.owner(param).zero_update(param)

    def chord_shift(self, param: torch.Tensor, J: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
        return self.owner(param).chord_shift(param, J, grad, scale)

    def predicted_gradient(self, param: torch.Tensor) -> torch.Tensor | None:
        return self.owner(param).predicted_gradient(param)

    def chord_shift_on_rows(self, param: torch.Tensor, J: Any, grad: torch.Tensor, scale: float) -> torch.Tensor:
        return self.owner(param).chord_shift_on_rows(param, J, grad, scale)

    def update_batch(self, param: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return self.owner(param).update_batch(param, grads)

    def update_coordinates(
        self, param: torch.Tensor, grads: torch.Tensor, start: int, stop: int, step: int = 1, *, shard: bool = False
    ) -> torch.Tensor:
        return self.owner(param).update_coordinates(param, grads, start, stop, step, shard=shard)

    def update_coordinates_many(self, items: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> list[torch.Tensor]:
        """:meth:`OptimizerLinearization.update_coordinates_many`, each item evaluated by its owner."""
        out: list[torch.Tensor | None] = [None] * len(items)
        by_owner: dict[int, tuple[OptimizerLinearization, list[int]]] = {}
        for i, (param, _, _) in enumerate(items):
            owner = self.owner(param)
            by_owner.setdefault(id(owner), (owner, []))[1].append(i)
        for owner, idx in by_owner.values():
            for i, upd in zip(idx, owner.update_coordinates_many([items[i] for i in idx])):
                out[i] = upd
        return out  # type: ignore[return-value]

    def structure_of(self, param: torch.Tensor) -> str:
        return self.owner(param).structure

    def update_sampled(self, param: torch.Tensor, grads: torch.Tensor, max_coordinates: int = 4096) -> torch.Tensor:
        return self.owner(param).update_sampled(param, grads, max_coordinates)

    def momentum_carry(self, param: torch.Tensor):
        return self.owner(param).momentum_carry(param)

    def tangent(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return self.owner(param).tangent(param, grad)

    def secant(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return self.owner(param).secant(param, grad)

    def preconditioner(self, param: torch.Tensor, grad: torch.Tensor, kind: Any = "tangent") -> Preconditioner:
        return self.owner(param).preconditioner(param, grad, kind)

    def preconditioner_on_rows(self, param: torch.Tensor, grad: torch.Tensor, kind: Any, rows: torch.Tensor) -> Preconditioner:
        return self.owner(param).preconditioner_on_rows(param, grad, kind, rows)

    def learning_rate(self, param: torch.Tensor) -> float:
        return self.owner(param).learning_rate(param)

    def state(self, param: torch.Tensor) -> ParamState:
        return self.owner(param).state(param)

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self._owner)

    def __contains__(self, param: object) -> bool:
        return isinstance(param, torch.Tensor) and param in self._owner

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def __repr__(self) -> str:
        inner = ", ".join(repr(lin) for lin in self.linearizations)
        return f"LinearizationGroup([{inner}])"


def split_params(optimizers: Sequence[torch.optim.Optimizer], params: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``params`` split by the optimizer holding each (one list per optimizer).

    Raises:
        ValueError: a tensor is held by none of the optimizers.
    """
    index = {id(p): k for k, opt in enumerate(optimizers) for g in opt.param_groups for p in g["params"]}
    out: list[list[torch.Tensor]] = [[] for _ in optimizers]
    for p in params:
        k = index.get(id(p))
        if k is None:
            raise ValueError(f"params: a tensor of shape {tuple(p.shape)} is not in any param group of the optimizers")
        out[k].append(p)
    return out

"""The seam between optimizers and estimators: an applied preconditioner P = Jᵀ v.

Every estimator needs, per parameter and validation target, only the preconditioned validation
gradient P = Jᵀ ∇L_val, then φ_z = −⟨P, c_z⟩. A linearization returns one
:class:`Preconditioner` per parameter and step; estimators *apply* it and never inspect J.

Three kinds, each a small class:

* :class:`Scalar` -- J = j·I (plain SGD, the SGD proxy −η). Every ghost path is exact, the
  pairwise ghost dot-product included.
* :class:`Diagonal` -- J = diag(d) (the Adam family, RMSprop, Adagrad, ...). The dense path is
  exact; the factored path approximates d by a rank-one matrix.
* :class:`RowDiagonal` -- a diagonal J that is zero outside a few dim-0 rows (an embedding
  table's slope on the rows a step's tokens hit), kept for those rows only.
* :class:`Operator` -- J is a linear map given by its action v ↦ Jᵀ v (Muon's orthogonalised
  momentum, Adafactor's factored second moment). The dense path is exact; pairwise and factored
  need a scalar or diagonal J and are not taken.

Example:
    >>> import torch
    >>> v = torch.tensor([1.0, -2.0], dtype=torch.float64)
    >>> Scalar(-0.1).apply(v).tolist(), Diagonal(torch.tensor([2.0, 3.0], dtype=torch.float64)).apply(v).tolist()
    ([-0.1, 0.2], [2.0, -6.0])
    >>> flip = Operator(lambda u: u.flip(0), shape=(2,))       # a non-elementwise J (a permutation)
    >>> flip.apply(v).tolist(), flip.kind
    ([-2.0, 1.0], 'operator')
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch


class Preconditioner(abc.ABC):
    """The transposed Jacobian Jᵀ of one parameter's update Δ(g) for one step, applied to vectors.

    Subclasses: :class:`Scalar`, :class:`Diagonal`, :class:`Operator`. Estimators call
    :meth:`apply` (every kind) and read :attr:`scalar` / :attr:`diagonal` only to choose a
    cheaper exact path.

    Attributes:
        kind: ``"scalar"``, ``"diagonal"`` or ``"operator"``.
        diagnostics: what building J measured (e.g. a secant quadrature's node count and
            efficiency gap); empty for closed forms.
    """

    kind: ClassVar[str]

    def __init__(self) -> None:
        self.diagnostics: dict[str, Any] = {}

    @abc.abstractmethod
    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """Jᵀ v: the preconditioned vector, same shape and dtype as ``v`` (shape ``S`` of the parameter)."""

    @property
    def scalar(self) -> float | None:
        """J as one number if J = j·I, else ``None``."""
        return None

    @property
    def diagonal(self) -> torch.Tensor | float | None:
        """The elementwise J (a tensor broadcastable to the parameter, or a float), ``None`` for an operator."""
        return None

    @property
    def is_zero(self) -> bool:
        """True when J = 0 exactly (the step does not move the parameter): no contribution."""
        return False

    def dense_diagonal(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
        """The elementwise J expanded to ``shape`` (for the factored path's rank-one fit).

        Raises:
            TypeError: J is an operator (it has no elementwise form).
        """
        d = self.diagonal
        if d is None:
            raise TypeError(f"a {self.kind} preconditioner has no elementwise form; apply it with .apply(v)")
        if isinstance(d, torch.Tensor):
            return d.to(dtype).expand(torch.Size(shape))
        return torch.full(tuple(shape), float(d), dtype=dtype, device=device)

    def to(self, dtype: torch.dtype) -> Preconditioner:
        """This preconditioner computing in ``dtype`` (a no-op for scalars and operators)."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Scalar(Preconditioner):
    """J = j·I.

    Args:
        value: j, a Python float (0.0: the parameter does not move).
    Example:
        >>> Scalar(-0.5).apply(torch.ones(2)), Scalar(0.0).is_zero
        (tensor([-0.5000, -0.5000]), True)
    """

    kind = "scalar"

    def __init__(self, value: float):
        super().__init__()
        self.value = float(value)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return self.value * v

    @property
    def scalar(self) -> float:
        return self.value

    @property
    def diagonal(self) -> float:
        return self.value

    @property
    def is_zero(self) -> bool:
        return self.value == 0.0

    def __repr__(self) -> str:
        return f"Scalar({self.value!r})"


class Diagonal(Preconditioner):
    """J = diag(d), d a tensor broadcastable to the parameter's shape ``S``.

    Args:
        values: d; detached (J is a fixed linear map for the step).
    Example:
        >>> Diagonal(torch.tensor([[1.0], [2.0]])).apply(torch.ones(2, 3)).tolist()
        [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    """

    kind = "diagonal"

    def __init__(self, values: torch.Tensor):
        super().__init__()
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"Diagonal expects a tensor of slopes, got {type(values).__name__}; use Scalar for one number")
        self.values = values.detach()
        self._scalar: float | None | bool = False  # not looked at yet

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return self.values.to(v.dtype) * v

    @property
    def scalar(self) -> float | None:
        # Asked several times per step (path choice, capture, checks): scan once, and look at 16
        # strided entries before the whole tensor (an Adam J differs there at once).
        if self._scalar is False:
            self._scalar = None
            if type(self.values) is not torch.Tensor and type(self.values).__name__ == "DTensor":
                return None  # an FSDP2 shard: the dense order is exact for it (no collective to compare the shards)
            flat = self.values.reshape(-1)
            if flat.numel():
                first = flat[0]
                probe = flat[:: max(1, flat.numel() // 16)]
                if bool((probe == first).all()) and bool((flat == first).all()):
                    self._scalar = float(first)
        return self._scalar

    @property
    def diagonal(self) -> torch.Tensor:
        return self.values

    def to(self, dtype: torch.dtype) -> Diagonal:
        return self if self.values.dtype == dtype else Diagonal(self.values.to(dtype))

    def __repr__(self) -> str:
        return f"Diagonal(shape={tuple(self.values.shape)}, dtype={self.values.dtype})"


class RowDiagonal(Preconditioner):
    """J = diag(d) with d zero outside the dim-0 rows ``rows``: the slope on the rows a step touches.

    An embedding table's per-sample contributions, and its batch gradient, lie on the rows its
    tokens hit; J is needed there only (``OptimizerLinearization.preconditioner_on_rows``). The
    slopes are kept for those rows, never as a table-sized tensor: :meth:`apply_rows` gives P on
    the rows (what the contraction and the completeness check read), :meth:`apply` and
    :attr:`diagonal` the whole-table forms for callers that need them (built on demand).

    Args:
        rows: sorted ``int64`` dim-0 indices, shape ``[r]``, no repeats.
        values: d on those rows, shape ``[r, *S[1:]]``.
        shape: ``S``, the parameter's shape.
    Example:
        >>> J = RowDiagonal(torch.tensor([0, 2]), torch.tensor([[2.0], [3.0]]), (3, 1))
        >>> J.apply(torch.ones(3, 1)).tolist(), J.apply_rows(torch.ones(3, 1)).tolist()
        ([[2.0], [0.0], [3.0]], [[2.0], [3.0]])
    """

    kind = "diagonal"

    def __init__(self, rows: torch.Tensor, values: torch.Tensor, shape: Sequence[int]):
        super().__init__()
        self.shape = torch.Size(shape)
        if rows.dim() != 1 or values.shape != (rows.shape[0], *self.shape[1:]):
            raise ValueError(
                f"RowDiagonal needs rows [r] and values [r, *{tuple(self.shape[1:])}], got rows of shape "
                f"{tuple(rows.shape)} and values of shape {tuple(values.shape)}"
            )
        self.rows = rows
        self.values = values.detach()
        self._dense: torch.Tensor | None = None
        self._zero: bool | None = None

    def apply_rows(self, v: torch.Tensor) -> torch.Tensor:
        """(Jᵀ v) on :attr:`rows`: shape ``[r, *S[1:]]`` (Jᵀ v is zero on every other row)."""
        return self.values.to(v.dtype) * v.index_select(0, self.rows)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(v).index_copy_(0, self.rows, self.apply_rows(v))

    @property
    def scalar(self) -> float | None:
        return 0.0 if self.is_zero else None  # zero off the rows, so one number only if zero on them too

    @property
    def diagonal(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device).index_copy_(
                0, self.rows, self.values
            )
        return self._dense

    @property
    def is_zero(self) -> bool:
        if self._zero is None:
            self._zero = not bool(self.values.any())
        return self._zero

    def to(self, dtype: torch.dtype) -> RowDiagonal:
        return self if self.values.dtype == dtype else RowDiagonal(self.rows, self.values.to(dtype), self.shape)

    def __repr__(self) -> str:
        return f"RowDiagonal(rows={self.rows.numel()} of {self.shape[0]}, shape={tuple(self.shape)}, dtype={self.values.dtype})"


class Operator(Preconditioner):
    """J given by its action: ``apply_fn(v)`` = Jᵀ v for v of the parameter's shape ``S``.

    Args:
        apply_fn: v ``[*S]`` -> Jᵀ v ``[*S]``, linear in v, same dtype as v.
        shape: ``S``, the parameter's shape (checked on every call).
        diagnostics: optional measurements to report (node count, efficiency gap, ...).
    Example (a 2×2 rotation as J):
        >>> R = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
        >>> op = Operator(lambda v: R.T @ v, shape=(2,))
        >>> op.apply(torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist()
        [0.0, -1.0]
    """

    kind = "operator"

    def __init__(self, apply_fn: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int], diagnostics: dict | None = None):
        super().__init__()
        self._apply = apply_fn
        self.shape = torch.Size(shape)
        if diagnostics is not None:
            self.diagnostics = diagnostics  # shared with apply_fn, which may update it

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != self.shape:
            raise ValueError(f"the operator acts on vectors of shape {tuple(self.shape)}, got {tuple(v.shape)}")
        out = placed_like(self._apply(v), v)
        return out.to(v.dtype)

    def __repr__(self) -> str:
        return f"Operator(shape={tuple(self.shape)})"


def placed_like(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``out`` laid out over the ranks as ``ref`` is (FSDP2 ``DTensor`` s); ``out`` itself otherwise.

    An operator rule's DTensor operations may leave a result replicated (a product that gathered
    the matrix) where the parameter is sharded; the shard-wise sums downstream (the completeness
    check's ⟨P, grad⟩, the shift of the validation point) need the parameter's own placement.
    Replicate -> Shard is a local slice, no communication.
    """
    placements = getattr(ref, "placements", None)
    if placements is None or getattr(out, "placements", placements) == placements:
        return out
    return out.redistribute(ref.device_mesh, placements)


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a build without distributed
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 shard, or computed from one)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_part(t: Any) -> Any:
    """This rank's shard of a ``DTensor`` as a plain tensor; anything else as it is."""
    return t.to_local() if is_dtensor(t) else t


def shards_of(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """Each tensor's local shard as a plain tensor when every one is a ``DTensor``; else ``None``.

    Only then is an elementwise rule on the shards the rule on the whole: a plain tensor of the
    parameter's global shape next to a one-row shard would broadcast, not fail. A mix is left
    to DTensor, which refuses it.
    """
    if tensors and all(is_dtensor(t) for t in tensors):
        return tuple(t.to_local() for t in tensors)
    return None


def shard_like(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``ref``'s local shape as a ``DTensor`` laid out as ``ref`` (``out`` itself otherwise).

    Elementwise rules run on the local shards of an FSDP2 parameter (one DTensor dispatch per
    operation costs more than the operation on a shard); the result is wrapped back, with no
    communication, so that callers see the parameter's layout.
    """
    if not is_dtensor(ref) or is_dtensor(out):
        return placed_like(out, ref)
    return _dtensor_class().from_local(
        out, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape, stride=ref.stride()
    )


def alone_on_storage(t: torch.Tensor) -> bool:
    """Whether no other tensor (a view, a detached alias, another parameter) shares ``t``'s memory.

    The storage's use count is ``t``'s own and the temporary storage object's; a torch without
    the counter answers False (nothing is then written over or swapped on that assumption).
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count is not None and use_count(t.untyped_storage()._cdata) == 2


def as_preconditioner(J: Any) -> Preconditioner:
    """A preconditioner from what callers used to pass as J: a float (scalar), a tensor (diagonal) or one already.

    Raises:
        TypeError: ``J`` is none of these.
    Example:
        >>> as_preconditioner(-0.1), as_preconditioner(torch.ones(3)).kind
        (Scalar(-0.1), 'diagonal')
    """
    if isinstance(J, Preconditioner):
        return J
    if isinstance(J, torch.Tensor):
        return Diagonal(J)
    if isinstance(J, (int, float)) and not isinstance(J, bool):
        return Scalar(float(J))
    raise TypeError(f"J must be a Preconditioner, a tensor (elementwise slopes) or a float, got {type(J).__name__}")

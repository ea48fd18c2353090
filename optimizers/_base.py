"""The optimizer extension point: :class:`OptimizerLinearization`, its registry and ``linearize``.

A linearization freezes an optimizer's state s_{t-1} and hyper-parameters h as they are just
before ``optimizer.step()`` and exposes, per parameter, the update rule under that fixed state

    Δ(g) = the change ``step()`` would make to θ_t if ``param.grad`` were g,

and two elementwise slopes of it: the tangent J = ∂Δ/∂g and the secant (Δ(g) − Δ(0)) ⊘ g.

Example (plain SGD: Δ(g) = −η g, so both slopes are −η):
    >>> import torch, optimizers
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    >>> opt = torch.optim.SGD([w], lr=0.1)
    >>> w.grad = torch.tensor([0.5, 0.0], dtype=torch.float64)
    >>> lin = optimizers.linearize(opt)
    >>> lin.tangent(w, w.grad).tolist(), lin.secant(w, w.grad).tolist()
    ([-0.1, -0.1], [-0.1, -0.1])
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import sympy
import torch

from ._preconditioner import Diagonal, Preconditioner, RowDiagonal, Scalar, alone_on_storage, shard_like, shards_of

_REGISTRY: dict[type[torch.optim.Optimizer], type[OptimizerLinearization]] = {}
_HALF = (torch.float16, torch.bfloat16)


class UnsupportedOptimizerError(TypeError):
    """The optimizer class, or one of its settings, is not modelled by any registered linearization.

    Raised by :func:`linearize` / :func:`linearization_class` (unregistered class; the message
    lists the registered ones), by :meth:`OptimizerLinearization.check_group` (a refused flag,
    named) and for sparse gradients.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.ones(2)
        >>> linearize(torch.optim.Adam([w], capturable=True))
        Traceback (most recent call last):
        ...
        optimizers._base.UnsupportedOptimizerError: Adam param group 0 has capturable=True, ...
    """


class StaleStateError(RuntimeError):
    """The optimizer state changed after ``linearize`` read it (for example ``step()`` ran).

    Detected from the version counters of the state tensors; ``linearize(..., copy_state=True)``
    keeps a frozen copy instead and never raises it.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.ones(2, dtype=torch.float64); opt.step()   # creates momentum_buffer
        >>> lin = linearize(opt); opt.step()                          # the buffer moves on
        >>> lin.update(w, w.grad)
        Traceback (most recent call last):
        ...
        optimizers._base.StaleStateError: optimizer state 'momentum_buffer' of a parameter of shape (2,) changed ...
    """


@dataclasses.dataclass(frozen=True)
class ParamState:
    """Frozen per-parameter optimizer state and hyper-parameters; subclasses add their fields.

    Tensor fields hold references to the optimizer's own state tensors (or clones when
    ``linearize(..., copy_state=True)``); ``None`` means the state does not exist yet (the
    optimizer has not stepped this parameter), which torch treats as zeros or as "first step".

    Attributes:
        lr: η, the learning rate of the parameter's group (a Python float).

    Example:
        >>> from optimizers import AdamState
        >>> st = AdamState(lr=0.1, step=1, exp_avg=torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> sorted(st.tensors()), st.coordinate(1).exp_avg
        (['exp_avg'], 2.0)
    """

    lr: float

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor-valued fields, by name (fields that are ``None`` or scalars are left out).

        Returns:
            ``{field name: tensor}``; each tensor has the parameter's shape and dtype.
        Example:
            >>> from optimizers import SGDState
            >>> SGDState(lr=0.1, momentum_buffer=torch.zeros(3)).tensors()
            {'momentum_buffer': tensor([0., 0., 0.])}
        """
        # Read several times per parameter per step (staleness checks, dtype promotion, tiling):
        # scanned once per (frozen) state and kept beside its fields, outside eq and repr.
        found = self.__dict__.get("_tensor_fields")
        if found is None:
            found = {f.name: v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}
            object.__setattr__(self, "_tensor_fields", found)
        return dict(found)

    def map_tensors(self, fn) -> ParamState:
        """This state with ``fn`` applied to every tensor field (a subset of coordinates, a dtype).

        Example:
            >>> from optimizers import SGDState
            >>> SGDState(lr=0.1, momentum_buffer=torch.arange(4.0)).map_tensors(lambda t: t[1:3]).momentum_buffer
            tensor([1., 2.])
        """
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.tensors().items()})

    def coordinate(self, index: int) -> ParamState:
        """This state with every tensor field replaced by its value at flat ``index`` (a float).

        One coordinate of an elementwise rule, as the sympy model and the conformance check use it.

        Args:
            index: a flat index into the parameter, ``0 <= index < param.numel()``.
        Returns:
            A copy of the same :class:`ParamState` subclass; tensor fields become Python floats.
        Raises:
            IndexError: ``index`` is out of range for a tensor field.
        Example:
            >>> from optimizers import SGDState
            >>> SGDState(lr=0.1, momentum_buffer=torch.tensor([[1.0, 2.0], [3.0, 4.0]])).coordinate(2)
            SGDState(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, momentum_buffer=3.0)
        """
        return self.map_tensors(lambda v: float(v.reshape(-1)[index]))


@dataclasses.dataclass(frozen=True)
class MomentumCarry:
    """How one parameter's momentum buffer carries earlier gradients into this step (``credit="momentum"``).

    The buffer evolves as buf_t = decay · buf_{t−1} + gain · g_t, and the update with no gradient
    this step is linear in it: Δ_t(0) = slope ⊙ buf_{t−1} + (terms without the buffer).

    Attributes:
        slope: ∂Δ_t(0)/∂buf_{t−1} elementwise, shape of the parameter; ``None`` before the buffer
            exists (the first step).
        decay: the buffer's decay applied in this step (μ of SGD, β1 of Adam).
        gain: the factor this step's gradient enters the buffer with (1 − dampening, 1 − β1; 1 at
            SGD's first step, which copies the gradient; negative under ``maximize``).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)); w.grad = torch.ones(2, dtype=torch.float64)
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9); opt.step()
        >>> linearize(opt).momentum_carry(w)
        MomentumCarry(slope=tensor([-0.0900, -0.0900], dtype=torch.float64), decay=0.9, gain=1.0)
    """

    slope: torch.Tensor | None
    decay: float
    gain: float


#: Up to this many entries (m gradients × coordinates) an elementwise rule is evaluated on tiled
#: coordinates in one call; above, vmap over views (copying the state m times would cost more).
_TILE_ELEMENTS = 1 << 16


def _state_signature(state: ParamState, theta: torch.Tensor) -> tuple:
    """What must agree for two parameters' coordinates to share one call of an elementwise rule."""
    fields = []
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        if isinstance(v, torch.Tensor):
            fields.append((f.name, "tensor", v.dtype))
        else:
            try:
                hash(v)
            except TypeError:
                v = ("unhashable", id(v))  # never shared: an unhashable field is compared by identity
            fields.append((f.name, v))
    return (type(state), theta.dtype, theta.device, tuple(fields))


def _bounded(members: list, limit: int) -> Iterator[list]:
    """``members`` in runs whose coordinates (sum of d, d = ``len(grads[0])``) stay under ``limit`` (at least one each)."""
    run, size = [], 0
    for item in members:
        d = item[3].shape[1]
        if run and size + d > limit:
            yield run
            run, size = [], 0
        run.append(item)
        size += d
    if run:
        yield run


class OptimizerLinearization(abc.ABC):
    """The linearization of one optimizer's update under its current, fixed state.

    Subclass it once per ``torch.optim`` class; the class keyword ``optimizer=`` registers the
    subclass so that :func:`linearize` finds it::

        class MyAdamLinearization(OptimizerLinearization, optimizer=MyAdam):
            ...

    A subclass provides (all elementwise, all pure functions of their arguments):

    * :meth:`read_state` -- the frozen :class:`ParamState` of one parameter;
    * :meth:`update_rule` -- Δ(g) under that state (decoupled decay included);
    * :meth:`tangent_rule` -- ∂Δ/∂g, finite everywhere (limits written out where the
      formula is 0/0);
    * :meth:`symbolic_update` -- the same rule per coordinate as a sympy expression, written
      as a direct transcription of the torch algorithm, so the conformance check can
      differentiate it independently;
    * optionally :meth:`secant_rule` (the default is the chord with the tangent at g = 0) and
      :meth:`sample_hyperparameters` for the conformance check.

    Settings a subclass does not model are listed in ``refused_flags`` (refused when truthy).

    An instance (built by :func:`linearize`) maps each parameter with a gradient to its frozen
    state and answers :meth:`update`, :meth:`tangent` and :meth:`secant`, whose values give the
    preconditioned validation gradient P = J ⊙ ∇L_val and the values φ_z = −⟨P, c_z⟩.

    Raises:
        TypeError: ``optimizer=`` is not a ``torch.optim.Optimizer`` subclass.
        ValueError: the optimizer is already registered and ``replace=True`` was not given.

    Example (the registry; a full subclass is worked through in docs/extending.md):
        >>> import optimizers
        >>> optimizers.linearization_class(torch.optim.Adam).__name__
        'AdamLinearization'
        >>> class Again(OptimizerLinearization, optimizer=torch.optim.SGD):
        ...     pass
        Traceback (most recent call last):
        ...
        ValueError: torch.optim.sgd.SGD is already linearized by SGDLinearization; pass `replace=True` ...
    """

    optimizer_class: ClassVar[type[torch.optim.Optimizer]]
    #: Param-group keys that change the maths in ways the subclass does not model.
    refused_flags: ClassVar[tuple[str, ...]] = ("capturable", "differentiable")
    #: ``"elementwise"``: Δ acts coordinate by coordinate, J is diagonal (``tangent``/``secant``
    #: return it as a tensor). ``"operator"``: Δ couples a parameter's entries (Muon, Adafactor);
    #: J is only applied (VJPs of :meth:`update_rule`), see :meth:`preconditioner`.
    structure: ClassVar[str] = "elementwise"
    #: Whether :meth:`update_rule` runs on ``fully_shard`` (FSDP2) shards: elementwise rules always
    #: do (every operation is per coordinate). An operator rule sets it once its DTensor operations
    #: gather what they couple and its values under FSDP2 were checked against one process (Muon's
    #: are, in tests/attribution/test_fsdp.py); the tracker refuses the others under FSDP2.
    dtensor_update: ClassVar[bool] = False
    #: Operator secants: Gauss–Legendre nodes to start with, the most to refine to, and the largest
    #: accepted efficiency gap (``None``: 1e-9 in float64, 1e-4 in float32).
    secant_nodes: ClassVar[int] = 8
    secant_max_nodes: ClassVar[int] = 64
    secant_tolerance: ClassVar[float | None] = None

    def __init_subclass__(cls, optimizer: type[torch.optim.Optimizer] | None = None, replace: bool = False, **kw):
        super().__init_subclass__(**kw)
        if optimizer is None:
            return  # an intermediate abstract class: nothing to register
        if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
            raise TypeError(
                f"{cls.__name__}: the class keyword optimizer= must be a torch.optim.Optimizer subclass, "
                f"got {optimizer!r}"
            )
        if optimizer in _REGISTRY and not replace:
            raise ValueError(
                f"{optimizer.__module__}.{optimizer.__name__} is already linearized by "
                f"{_REGISTRY[optimizer].__qualname__}; pass `replace=True` in the class statement "
                f"(class {cls.__name__}(OptimizerLinearization, optimizer=..., replace=True)) to override it"
            )
        cls.optimizer_class = optimizer
        _REGISTRY[optimizer] = cls

    def __init__(self, states: Mapping[torch.Tensor, ParamState], versions: Mapping[torch.Tensor, dict[str, int]]):
        self._states = dict(states)
        self._versions = dict(versions)

    # ------------------------------------------------------------------ reading state
    @classmethod
    @abc.abstractmethod
    def read_state(cls, param: torch.Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> ParamState:
        """Freeze the state of ``param`` (``optimizer.state[param]``) and its group's hyper-parameters.

        Args:
            param: the parameter, shape ``S``.
            state: ``optimizer.state[param]`` as torch holds it (possibly empty before the first step).
            group: the param group holding ``param`` (``lr``, ``betas``, ...).
        Returns:
            The subclass's :class:`ParamState`, tensor fields detached (shape ``S``) or ``None``.
        Raises:
            UnsupportedOptimizerError: a setting the subclass does not model.
        Example:
            >>> from optimizers import SGDLinearization
            >>> w = torch.zeros(2)
            >>> SGDLinearization.read_state(w, {}, {"lr": 0.1, "momentum": 0.9, "dampening": 0.0,
            ...     "weight_decay": 0.0, "nesterov": False, "maximize": False}).momentum_buffer is None
            True
        """

    @classmethod
    def check_group(cls, group: Mapping[str, Any], index: int) -> None:
        """Refuse param-group settings this linearization does not model, naming the flag.

        Args:
            group: a param group of the optimizer.
            index: its position in ``optimizer.param_groups`` (for the message).
        Raises:
            UnsupportedOptimizerError: a flag of ``refused_flags`` is truthy in ``group``.
        Example:
            >>> from optimizers import AdamLinearization
            >>> AdamLinearization.check_group({"capturable": False, "differentiable": False}, 0)  # fine
            >>> AdamLinearization.check_group({"differentiable": True}, 0)
            Traceback (most recent call last):
            ...
            optimizers._base.UnsupportedOptimizerError: Adam param group 0 has differentiable=True, ...
        """
        for flag in cls.refused_flags:
            if group.get(flag):
                raise UnsupportedOptimizerError(
                    f"{cls.optimizer_class.__name__} param group {index} has {flag}={group[flag]!r}, which "
                    f"{cls.__name__} does not model (refused settings: {', '.join(cls.refused_flags)}). "
                    f"Create the optimizer with {flag}=False, or register a subclass that models it "
                    f"(class X(OptimizerLinearization, optimizer={cls.optimizer_class.__name__}, replace=True))."
                )

    @classmethod
    def from_optimizer(
        cls, optimizer: torch.optim.Optimizer, *, copy_state: bool = False, params: Iterable[torch.Tensor] | None = None
    ) -> OptimizerLinearization:
        """Read every parameter that has a gradient (or exactly ``params``); see :func:`linearize`.

        Args:
            optimizer: an instance of ``cls.optimizer_class``, after ``backward()``.
            copy_state: keep clones of the state tensors instead of references.
            params: read these parameters whether or not they have a gradient yet (the state
                only is read; the gradient is passed to :meth:`update`, :meth:`tangent`,
                :meth:`secant` later). Each must be in one of the optimizer's param groups.
        Returns:
            An instance of ``cls`` covering the parameters whose ``.grad`` is not ``None``, or ``params``.
        Raises:
            UnsupportedOptimizerError: a refused flag (:meth:`check_group`) or a sparse gradient.
            ValueError: a tensor of ``params`` is not in the optimizer.
        Example:
            >>> from optimizers import SGDLinearization
            >>> a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
            >>> a.grad = torch.ones(2)                      # b has no gradient: not covered
            >>> lin = SGDLinearization.from_optimizer(torch.optim.SGD([a, b], lr=0.1))
            >>> len(lin), a in lin, b in lin
            (1, True, False)
        """
        wanted = None if params is None else set(params)
        states: dict[torch.Tensor, ParamState] = {}
        versions: dict[torch.Tensor, dict[str, int]] = {}
        for i, group in enumerate(optimizer.param_groups):
            cls.check_group(group, i)
            for p in group["params"]:
                if (p.grad is None) if wanted is None else (p not in wanted):
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise UnsupportedOptimizerError(
                        f"parameter of shape {tuple(p.shape)} in group {i} has a sparse gradient; "
                        "linearizations model dense gradients only (use nn.Embedding(sparse=False))"
                    )
                st = cls.read_state(p, optimizer.state.get(p, {}), group)
                if copy_state:
                    st = dataclasses.replace(st, **{k: v.detach().clone() for k, v in st.tensors().items()})
                states[p] = st
                versions[p] = {k: v._version for k, v in st.tensors().items()}
        if wanted is not None and len(states) != len(wanted):
            shapes = sorted(str(tuple(p.shape)) for p in wanted if p not in states)
            raise ValueError(f"params: {len(shapes)} tensor(s) of shape {', '.join(shapes)} are not in any param group of the optimizer")
        return cls(states, versions)

    # ------------------------------------------------------------------ the maths
    @classmethod
    @abc.abstractmethod
    def update_rule(cls, theta: torch.Tensor, grad: torch.Tensor, state: ParamState) -> torch.Tensor:
        """Δ(g) under ``state``; ``theta`` is θ_t (needed for weight decay). Same shape as ``theta``.

        A pure classmethod: ``theta``, ``grad`` and the state's tensors share one shape ``S`` and
        dtype; the result has that shape and dtype. Subclasses implement it; :meth:`update` is the
        checked per-parameter entry point.

        Example:
            >>> from optimizers import SGDLinearization, SGDState
            >>> g = torch.tensor([1.0, -2.0], dtype=torch.float64)
            >>> SGDLinearization.update_rule(torch.zeros(2, dtype=torch.float64), g, SGDState(lr=0.5)).tolist()
            [-0.5, 1.0]
        """

    @classmethod
    def tangent_rule(cls, theta: torch.Tensor, grad: torch.Tensor, state: ParamState) -> torch.Tensor:
        """J = ∂Δ/∂g elementwise at ``grad``; finite for finite input.

        Shapes and dtypes as :meth:`update_rule`. Where the closed form is 0/0 (Adam with
        v̂ = 0 and g = 0) the subclass returns the limit, never NaN. The default derives it
        from :meth:`update_rule` by one forward-mode JVP along a ones vector (exact for an
        elementwise rule); closed forms override it for speed and for their limits.

        Example:
            >>> from optimizers import AdamLinearization, AdamState
            >>> g = torch.tensor([1.0, 0.0], dtype=torch.float64)
            >>> J = AdamLinearization.tangent_rule(torch.zeros(2, dtype=torch.float64), g, AdamState(lr=0.1))
            >>> bool(torch.isfinite(J).all()), bool(J[0].abs() < 1e-6)   # step 1: sign descent, flat slope
            (True, True)
        """
        if cls.structure != "elementwise":
            raise TypeError(
                f"{cls.__name__} models a non-elementwise update (structure={cls.structure!r}); its tangent is an "
                "operator: use lin.preconditioner(param, grad, 'tangent').apply(v)"
            )
        from ._autograd import tangent_diagonal

        return tangent_diagonal(lambda x: cls.update_rule(theta, x, state), grad)

    @classmethod
    def secant_rule(cls, theta: torch.Tensor, grad: torch.Tensor, state: ParamState) -> torch.Tensor:
        """(Δ(g) − Δ(0)) ⊘ g elementwise, the tangent where g = 0.

        This default is the plain chord; its float rounding error is about
        eps·|Δ(0)|/|g|, so subclasses with momentum override it with a cancellation-free form.

        By construction J_sec ⊙ g = Δ(g) − Δ(0), so Σ_z J_sec c_z = Δ(g_B) − Δ(0) (efficiency).
        Shapes and dtypes as :meth:`update_rule`.

        Example:
            >>> from optimizers import AdamLinearization, AdamState
            >>> th, g = torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, -3.0], dtype=torch.float64)
            >>> st = AdamState(lr=0.1)
            >>> chord = AdamLinearization.update_rule(th, g, st) - AdamLinearization.update_rule(th, 0 * g, st)
            >>> torch.allclose(AdamLinearization.secant_rule(th, g, st) * g, chord)
            True
        """
        chord = (cls.update_rule(theta, grad, state) - cls.update_rule(theta, torch.zeros_like(grad), state))
        zero = grad == 0
        safe = torch.where(zero, torch.ones_like(grad), grad)
        return torch.where(zero, cls.tangent_rule(theta, grad, state), chord / safe)

    @classmethod
    def symbolic_update(cls, g: sympy.Symbol, theta: sympy.Symbol, state: ParamState) -> sympy.Expr:
        """Δ for one coordinate as a sympy expression in ``g`` and ``theta`` (optional).

        Without it (the default raises ``NotImplementedError``) the conformance check compares
        the slopes with finite differences of the real ``step()`` instead of sympy.

        ``state`` is a :class:`ParamState` whose tensor fields were replaced by sympy symbols
        (or ``None`` where the state does not exist yet). Write it as a literal transcription
        of the torch algorithm; the conformance check differentiates it.

        Example:
            >>> import sympy
            >>> from optimizers import SGDLinearization, SGDState
            >>> g, theta = sympy.symbols("g theta")
            >>> SGDLinearization.symbolic_update(g, theta, SGDState(lr=0.5, weight_decay=0.1))
            -0.5*g - 0.05*theta
        """
        raise NotImplementedError(f"{cls.__name__} has no sympy model (symbolic_update is optional)")

    @classmethod
    def sample_hyperparameters(cls, rng) -> dict[str, Any]:
        """Constructor keyword arguments for ``optimizer_class`` drawn from ``rng`` (a ``random.Random``).

        Used by the conformance check; override to cover every flag the subclass models.

        Example:
            >>> import random
            >>> from optimizers import SGDLinearization
            >>> "momentum" in SGDLinearization.sample_hyperparameters(random.Random(0))
            True
        """
        return {"lr": rng.choice([1e-3, 0.05, 0.3])}

    # ------------------------------------------------------------------ public per-parameter API
    def _state_of(self, param: torch.Tensor) -> ParamState:
        try:
            state = self._states[param]
        except KeyError:
            raise KeyError(
                f"parameter of shape {tuple(param.shape)} is not covered by this {type(self).__name__}: "
                "linearize() reads only the optimizer's parameters that have a .grad; run backward() "
                "before linearize(), and pass the optimizer's own parameter tensors"
            ) from None
        for name, tensor in state.tensors().items():
            if tensor._version != self._versions[param][name]:
                raise StaleStateError(
                    f"optimizer state {name!r} of a parameter of shape {tuple(param.shape)} changed after "
                    "linearize() read it (did optimizer.step() run?). Call optimizers.linearize(optimizer) "
                    "again before the next step, or pass copy_state=True to keep a frozen copy."
                )
        return state

    @staticmethod
    def _check_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
        if grad.shape != param.shape:
            raise ValueError(
                f"grad has shape {tuple(grad.shape)} but the parameter has shape {tuple(param.shape)}; "
                "pass a gradient of the parameter's own shape"
            )

    def _inputs(
        self, param: torch.Tensor, grad: torch.Tensor, *, shard: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, ParamState]:
        """θ, g and the state, promoted to float32 when any of them is half precision.

        Half-precision slopes would underflow (Adam's ε = 1e-8 is 0 in float16) or lose most
        digits; the result is then float32, never silently half. ``shard=True``: for an
        elementwise rule on an FSDP2 parameter, this rank's local shards as plain tensors (the
        caller wraps its result back with ``shard_like``); every coordinate's update needs only
        its own coordinate.
        """
        self._check_grad(param, grad)
        state = self._state_of(param)
        theta, grad = param.detach(), grad.detach()
        if shard and self.structure == "elementwise":
            names = list(state.tensors())
            shards = shards_of(theta, grad, *state.tensors().values())
            if shards is not None:
                theta, grad = shards[:2]
                state = dataclasses.replace(state, **dict(zip(names, shards[2:])))
        tensors = state.tensors()
        if any(t.dtype in _HALF for t in (theta, grad, *tensors.values())):
            theta, grad = theta.float(), grad.float()
            state = state.map_tensors(lambda v: v.float())
        return theta, grad, state

    def update(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Δ(grad): the change ``step()`` would make to ``param`` if its gradient were ``grad``.

        The optimizer state is the one read by :func:`linearize`; θ_t is ``param``'s current value.

        Args:
            param: a parameter of the optimizer, shape ``S``.
            grad: a gradient, shape ``S``.
        Returns:
            Tensor of shape ``S`` (decoupled weight decay included), in the dtype of ``grad`` and the
            state (float32 if any of them is half precision).
        Raises:
            ValueError: ``grad`` does not have ``param``'s shape.
            KeyError: ``param`` is not covered (it had no ``.grad`` when :func:`linearize` ran).
            StaleStateError: the optimizer state changed since :func:`linearize`.

        Example (the update is exactly what ``step()`` does):
            >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
            >>> opt = torch.optim.Adam([w], lr=0.1)
            >>> w.grad = torch.tensor([0.3, -0.1, 0.0], dtype=torch.float64)
            >>> lin = linearize(opt, copy_state=True)
            >>> expected = w.detach() + lin.update(w, w.grad)
            >>> opt.step(); torch.allclose(w.detach(), expected)
            True
        """
        return shard_like(self.update_rule(*self._inputs(param, grad, shard=True)), param)

    def predicted_gradient(self, param: torch.Tensor) -> torch.Tensor | None:
        """ĝ: the optimizer's own prediction of the coming batch gradient from its state, or ``None`` if it keeps none.

        The ``"predicted"`` validation point θ_t + ½(Δ(ĝ) + Δ(0)) uses it in place of g_B, so that
        it is known before the backward pass. The default has no prediction (``None``: the point
        is refused for this optimizer); the Adam family, NAdam, RAdam and Adamax give their
        bias-corrected first moment m / (1 − β1^t), zero before the first step
        (:func:`first_moment_prediction`).

        Args:
            param: a covered parameter, shape ``S``.
        Returns:
            Tensor of shape ``S`` (the parameter's dtype), or ``None``.
        Example:
            >>> w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
            >>> opt = torch.optim.Adam([w], lr=0.1); w.grad = torch.tensor([1.0, -2.0], dtype=torch.float64); opt.step()
            >>> linearize(opt).predicted_gradient(w).tolist()      # one step: m / (1 − β1) = the last gradient
            [1.0, -2.0]
        """
        return None

    def zero_update(self, param: torch.Tensor) -> torch.Tensor:
        """Δ(0): the change ``step()`` would make with a zero gradient (what momentum and decay carry).

        Equal to ``update(param, torch.zeros_like(param))``; a rule may give a cheaper
        :meth:`zero_update_rule` (the midpoint validation point needs Δ(0) of every parameter at
        every tracked step).

        Args:
            param: a covered parameter, shape ``S``.
        Returns:
            Tensor of shape ``S``, dtype as :meth:`update`.
        Example:
            >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
            >>> opt = torch.optim.AdamW([w], lr=0.1)
            >>> w.grad = torch.tensor([0.3, -0.1], dtype=torch.float64); opt.step()
            >>> lin = linearize(opt)
            >>> torch.equal(lin.zero_update(w), lin.update(w, torch.zeros_like(w)))
            True
        """
        theta, _, state = self._inputs(param, param.detach(), shard=True)
        return shard_like(self.zero_update_rule(theta, state), param)

    def chord_shift(self, param: torch.Tensor, J: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
        """Δ(0) + scale · J ⊙ grad: the update at scale·grad along the secant chord (shape of ``param``).

        With J the secant at ``grad`` this is Δ(grad) at scale 1 and the midpoint validation
        point's ½(Δ(grad) + Δ(0)) at scale ½. A rule may fuse it into one pass (Adam and AdamW do,
        with a compiled kernel: :mod:`optimizers._fused`); the default is :meth:`zero_update` and
        one ``addcmul``.

        Args:
            param: a covered parameter, shape ``S``.
            J: the secant slopes, shape ``S``.
            grad: the point g, shape ``S``.
            scale: s.
        Returns:
            Tensor of shape ``S``.
        Example:
            >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
            >>> opt = torch.optim.AdamW([w], lr=0.1)
            >>> w.grad = torch.tensor([0.3, -0.1], dtype=torch.float64); opt.step()
            >>> lin = linearize(opt); g = torch.tensor([0.2, 0.4], dtype=torch.float64)
            >>> torch.allclose(lin.chord_shift(w, lin.secant(w, g), g, 1.0), lin.update(w, g))
            True
        """
        zero = self.zero_update(param)
        shards = shards_of(zero, J, grad.detach())
        zero, J, grad = shards if shards is not None else (zero, J, grad.detach())
        return shard_like(torch.addcmul(zero, J, grad.to(zero.dtype), value=scale), param)

    @classmethod
    def zero_update_rule(cls, theta: torch.Tensor, state: ParamState) -> torch.Tensor:
        """Δ(0) under ``state`` (shape of ``theta``); the default evaluates :meth:`update_rule` at g = 0."""
        return cls.update_rule(theta, torch.zeros_like(theta), state)

    def update_batch(self, param: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Δ(g) for m gradients at once, each under the same frozen state (the exact-update route).

        ``torch.func.vmap`` over :meth:`update_rule`; a rule vmap cannot trace (data-dependent
        Python control flow) is evaluated row by row, with the same result.

        Args:
            param: a covered parameter, shape ``S``.
            grads: ``[m, *S]``, m candidate gradients.
        Returns:
            ``[m, *S]``: row i is ``update(param, grads[i])``.
        Raises:
            ValueError: ``grads`` is not ``[m, *S]``; otherwise as :meth:`update`.
        Example:
            >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
            >>> opt = torch.optim.Adam([w], lr=0.1); w.grad = torch.tensor([0.3, -0.1], dtype=torch.float64)
            >>> lin = linearize(opt); G = torch.randn(3, 2, dtype=torch.float64)
            >>> torch.allclose(lin.update_batch(w, G), torch.stack([lin.update(w, g) for g in G]))
            True
        """
        if grads.dim() != param.dim() + 1 or grads.shape[1:] != param.shape:
            raise ValueError(
                f"grads has shape {tuple(grads.shape)}; pass m gradients stacked as [m, *{tuple(param.shape)}]"
            )
        theta, _, state = self._inputs(param, grads[0] if len(grads) else torch.zeros_like(param))
        return self._rule_over(theta, grads.detach().to(theta.dtype), state)

    @classmethod
    def _rule_over(cls, theta: torch.Tensor, grads: torch.Tensor, state: ParamState) -> torch.Tensor:
        """:meth:`update_rule` for each row of ``grads`` ``[m, ...]``: vmapped, row by row where vmap cannot trace."""
        try:
            return torch.func.vmap(lambda g: cls.update_rule(theta, g, state))(grads)
        except RuntimeError:  # e.g. .item() or Python branching on tensor values inside the rule
            return torch.stack([cls.update_rule(theta, g, state) for g in grads]) if len(grads) else grads.clone()

    # ------------------------------------------------------------------ momentum credit
    #: Name of the state field holding a momentum buffer linear in past gradients (Adam's
    #: ``exp_avg``, SGD's ``momentum_buffer``), for ``credit="momentum"``; ``None``: none declared.
    momentum_buffer: ClassVar[str | None] = None

    @classmethod
    def momentum_coefficients(cls, state: ParamState) -> tuple[float, float]:
        """``(decay, gain)`` of this step's buffer update buf_t = decay · buf_{t−1} + gain · g_t.

        Needed when :attr:`momentum_buffer` is set. Example (Adam: β1 and 1 − β1):
            >>> from optimizers import AdamLinearization, AdamState
            >>> AdamLinearization.momentum_coefficients(AdamState(lr=0.1, step=1))
            (0.9, 0.09999999999999998)
        """
        raise NotImplementedError(f"{cls.__name__} declares momentum_buffer but not momentum_coefficients")

    @classmethod
    def momentum_credit_refusal(cls, state: ParamState) -> str | None:
        """Why ``credit="momentum"`` cannot value a step under ``state``; ``None`` if it can.

        The default accepts a declared :attr:`momentum_buffer` and refuses otherwise; a rule with
        no state carried into Δ(0) (Adagrad, plain RMSprop) returns ``None``.
        """
        if cls.momentum_buffer is not None:
            return None
        return (
            f"{cls.__name__} declares no momentum buffer linear in past gradients (momentum_buffer is None), so the "
            "part of its update carried from earlier steps cannot be credited back to their samples"
        )

    def momentum_carry(self, param: torch.Tensor) -> MomentumCarry | None:
        """The :class:`MomentumCarry` of ``param`` at this step; ``None`` for a rule without momentum.

        The slope is one forward-mode derivative of :meth:`update_rule` at g = 0 along the buffer
        (exact: Δ(0) is linear in the buffer for every rule that declares one).

        Raises:
            UnsupportedOptimizerError: :meth:`momentum_credit_refusal` gives a reason.
            KeyError, StaleStateError: as :meth:`update`.
        """
        theta, _, state = self._inputs(param, param.detach())
        reason = self.momentum_credit_refusal(state)
        if reason is not None:
            raise UnsupportedOptimizerError(f"credit='momentum': {reason}. Use credit='step'")
        name = self.momentum_buffer
        if name is None:
            return None
        decay, gain = self.momentum_coefficients(state)
        buf = getattr(state, name)
        if buf is None:
            return MomentumCarry(None, float(decay), float(gain))
        cls, zero = type(self), torch.zeros_like(theta)

        def carried(b: torch.Tensor) -> torch.Tensor:
            return cls.update_rule(theta, zero, dataclasses.replace(state, **{name: b}))

        _, slope = torch.func.jvp(carried, (buf.to(theta.dtype),), (torch.ones_like(theta),))
        return MomentumCarry(slope.detach(), float(decay), float(gain))

    def update_sampled(self, param: torch.Tensor, grads: torch.Tensor, max_coordinates: int = 4096) -> torch.Tensor:
        """Δ(g) of m gradients at a deterministic subset of coordinates (every k-th), for cheap diagnostics.

        An elementwise rule evaluated on a strided subset of the coordinates is the rule on those
        coordinates, so diagnostics such as :func:`estimators.update_nonlinearity` cost O(m ·
        ``max_coordinates``) per parameter instead of O(m · numel). Operator rules
        (``structure = "operator"``) couple coordinates: they are evaluated in full.

        Args:
            param: a covered parameter, shape ``S``.
            grads: ``[m, *S]``.
            max_coordinates: at most this many coordinates per parameter (elementwise rules).
        Returns:
            ``[m, d]``: the updates at the chosen coordinates (d = numel for operator rules).
        Example:
            >>> w = torch.nn.Parameter(torch.randn(100, 50, dtype=torch.float64))
            >>> opt = torch.optim.Adam([w], lr=0.1); w.grad = torch.randn_like(w)
            >>> lin = linearize(opt); G = torch.stack([w.grad, 2 * w.grad])
            >>> sub = lin.update_sampled(w, G, max_coordinates=1000)
            >>> sub.shape, torch.equal(sub, lin.update_batch(w, G).reshape(2, -1)[:, ::5])
            (torch.Size([2, 1000]), True)
        """
        numel = param.numel()
        stride = max(1, -(-numel // max_coordinates))
        if self.structure != "elementwise":
            return self.update_batch(param, grads).reshape(len(grads), -1)
        index = slice(None, None, stride)
        return self._rule_at(param, grads.reshape(len(grads), -1)[:, index], index)

    def _rule_at(self, param: torch.Tensor, grads: torch.Tensor, index: slice, *, shard: bool = False) -> torch.Tensor:
        """An elementwise rule at the flat coordinates ``index`` of ``param``: ``grads`` ``[m, d]`` -> ``[m, d]``.

        The m gradients are laid side by side on m copies of the coordinates and the rule is
        evaluated once on m·d coordinates: an elementwise rule on any list of coordinates is the
        rule on each of them, and this avoids vmap, whose overhead exceeded the arithmetic for
        the few thousand coordinates of a diagnostic.
        """
        theta, _, state = self._inputs(param, param.detach(), shard=shard)
        m = len(grads)
        if grads.numel() > _TILE_ELEMENTS:  # large blocks (the exact route): vmap over views, no m copies of the state
            pick = lambda t: t.reshape(-1)[index]  # noqa: E731
            state = state.map_tensors(pick)
            return self._rule_over(pick(theta), grads.detach().to(theta.dtype), state)
        pick = lambda t: t.reshape(-1)[index].repeat(m)  # noqa: E731
        state = state.map_tensors(pick)
        g = grads.detach().to(theta.dtype).reshape(-1)
        return type(self).update_rule(pick(theta), g, state).reshape(m, -1)

    def update_coordinates(
        self, param: torch.Tensor, grads: torch.Tensor, start: int, stop: int, step: int = 1, *, shard: bool = False
    ) -> torch.Tensor:
        """Δ(g) of m gradients at the flat coordinates ``range(start, stop, step)`` of an elementwise rule.

        An elementwise rule on a block of coordinates is the rule on those coordinates, so the
        exact-update route evaluates large parameters block by block (bounded memory).

        Args:
            param: a covered parameter with an elementwise rule.
            grads: ``[m, d]``, the gradients at those d = len(range(start, stop, step)) coordinates.
            step: every step-th coordinate (a strided sample for diagnostics).
            shard: for an FSDP2 parameter, the coordinates are those of this rank's local shard
                (flattened) and ``grads`` is plain: no communication.
        Returns:
            ``[m, d]``.
        Raises:
            TypeError: the rule is not elementwise (``structure = "operator"``).
        Example:
            >>> w = torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
            >>> opt = torch.optim.Adam([w], lr=0.1); w.grad = torch.randn_like(w)
            >>> lin = linearize(opt); G = torch.randn(3, 4, 5, dtype=torch.float64)
            >>> torch.equal(lin.update_coordinates(w, G.reshape(3, -1)[:, 6:13], 6, 13), lin.update_batch(w, G).reshape(3, -1)[:, 6:13])
            True
        """
        if self.structure != "elementwise":
            raise TypeError(f"{type(self).__name__} is not elementwise: its update couples coordinates; use update_batch")
        return self._rule_at(param, grads, slice(start, stop, step), shard=shard)

    def update_coordinates_many(
        self, items: Sequence[tuple[torch.Tensor, torch.Tensor, int]]
    ) -> list[torch.Tensor]:
        """:meth:`update_coordinates` of several parameters at every ``step``-th coordinate, in few rule calls.

        Parameters whose states agree in every scalar field (learning rate, betas, step, flags,
        which buffers exist; one dtype and device) are laid side by side and the elementwise rule
        runs once on all of them: an elementwise rule on a list of coordinates is the rule on
        each. The per-step diagnostics (:func:`estimators.update_nonlinearity`) evaluate a few
        thousand coordinates of every parameter, where one call per parameter cost more in
        dispatch than in arithmetic.

        Args:
            items: ``(param, grads, step)`` triples; ``grads`` is ``[m, d]`` with
                d = len(range(0, param.numel(), step)), the same m for all. ``step`` may also be
                an ``int64`` tensor of d flat coordinates (contiguous blocks gather faster than a
                stride: one cache line per sampled coordinate is what a strided sample costs).
        Returns:
            One ``[m, d]`` tensor per item, in order: the same values as
            ``update_coordinates(param, grads, 0, param.numel(), step)``.
        Raises:
            TypeError: the rule is not elementwise.
            ValueError: the items disagree in m.
        Example:
            >>> w, b = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64)), torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
            >>> opt = torch.optim.Adam([w, b], lr=0.1); w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
            >>> lin = linearize(opt); Gw, Gb = torch.randn(3, 12, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
            >>> uw, ub = lin.update_coordinates_many([(w, Gw, 2), (b, Gb, 1)])
            >>> torch.equal(uw, lin.update_coordinates(w, Gw, 0, 24, 2)), torch.equal(ub, lin.update_coordinates(b, Gb, 0, 4))
            (True, True)
        """
        if self.structure != "elementwise":
            raise TypeError(f"{type(self).__name__} is not elementwise: its update couples coordinates; use update_batch")
        if len({len(g) for _, g, _ in items}) > 1:
            raise ValueError("every item needs the same number m of gradients (rows of grads)")
        out: list[torch.Tensor | None] = [None] * len(items)
        groups: dict[tuple, list] = {}
        for i, (param, grads, step) in enumerate(items):
            theta, _, state = self._inputs(param, param.detach())
            groups.setdefault(_state_signature(state, theta), []).append((i, theta, state, grads, step))
        for members in groups.values():
            m = len(members[0][3])
            for part in _bounded(members, _TILE_ELEMENTS * 16 // max(m, 1)):
                pick = lambda t, step: t.reshape(-1)[::step] if isinstance(step, int) else t.reshape(-1).index_select(0, step)  # noqa: E731
                cat = lambda ts: torch.cat(ts) if len(ts) > 1 else ts[0]  # noqa: E731
                theta = cat([pick(th, st) for _, th, _, _, st in part]).repeat(m)
                names = list(part[0][2].tensors())
                state = dataclasses.replace(
                    part[0][2], **{n: cat([pick(getattr(s_, n), st) for _, _, s_, _, st in part]).repeat(m) for n in names}
                )
                g = torch.cat([G.detach().to(theta.dtype) for _, _, _, G, _ in part], dim=1) if len(part) > 1 else part[0][3].detach().to(theta.dtype)
                upd = type(self).update_rule(theta, g.reshape(-1), state).reshape(m, -1)
                for (i, *_), piece in zip(part, upd.split([G.shape[1] for _, _, _, G, _ in part], dim=1)):
                    out[i] = piece
        return out  # type: ignore[return-value]

    def tangent(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """J = ∂Δ/∂g at ``grad``, elementwise (shape of ``param``); finite for finite input.

        The tangent at the batch gradient g_B matches the leave-one-out marginal
        U(B) − U(B∖z) ≈ −⟨J ⊙ ∇L_val, c_z⟩ to first order.

        Args:
            param: a covered parameter, shape ``S``.
            grad: the point g, shape ``S`` (usually ``param.grad``).
        Returns:
            Tensor of shape ``S``, dtype as :meth:`update`.
        Raises:
            As :meth:`update`.
        Example (agrees with a central finite difference of :meth:`update`):
            >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
            >>> opt = torch.optim.RMSprop([w], lr=0.01)
            >>> w.grad = torch.tensor([0.3, -0.1], dtype=torch.float64)
            >>> lin = linearize(opt)
            >>> h = 1e-6
            >>> fd = (lin.update(w, w.grad + h) - lin.update(w, w.grad - h)) / (2 * h)
            >>> torch.allclose(lin.tangent(w, w.grad), fd, rtol=1e-6)
            True
        """
        self._refuse_operator("tangent")
        return shard_like(self.tangent_rule(*self._inputs(param, grad, shard=True)), param)

    def secant(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """(Δ(grad) − Δ(0)) ⊘ grad elementwise (shape of ``param``), the tangent where grad is 0.

        With J = secant at g_B, Σ_z J ⊙ c_z = Δ(g_B) − Δ(0) exactly, so the values
        φ_z = −⟨J ⊙ ∇L_val, c_z⟩ sum to the first-order game's U(B) − U(∅) (efficiency).

        Args:
            param: a covered parameter, shape ``S``.
            grad: the point g, shape ``S`` (usually ``param.grad``).
        Returns:
            Tensor of shape ``S``, dtype as :meth:`update`.
        Raises:
            As :meth:`update`.
        Example (the chord identity, under momentum where Δ(0) ≠ 0):
            >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
            >>> opt = torch.optim.Adam([w], lr=0.1)
            >>> w.grad = torch.tensor([0.3, -0.1], dtype=torch.float64); opt.step()
            >>> g = torch.tensor([0.2, 0.4], dtype=torch.float64); w.grad = g
            >>> lin = linearize(opt)
            >>> torch.allclose(lin.secant(w, g) * g, lin.update(w, g) - lin.update(w, torch.zeros_like(g)))
            True
        """
        self._refuse_operator("secant")
        return shard_like(self.secant_rule(*self._inputs(param, grad, shard=True)), param)

    def _refuse_operator(self, kind: str) -> None:
        if self.structure != "elementwise":
            raise TypeError(
                f"{type(self).__name__} models a non-elementwise update (structure={self.structure!r}): its {kind} is a "
                f"linear map, not a tensor of slopes. Use lin.preconditioner(param, grad, {kind!r}).apply(v), which "
                "every estimator consumes"
            )

    def preconditioner(self, param: torch.Tensor, grad: torch.Tensor, kind: Any = "tangent") -> Preconditioner:
        """The applied preconditioner Jᵀ of ``param`` for this step: what every estimator consumes.

        * ``"tangent"``: J = ∂Δ/∂g at ``grad``;
        * ``"secant"``: J = ∫₀¹ ∂Δ/∂g(s·grad) ds (the chord (Δ(g) − Δ(0)) ⊘ g for elementwise rules),
          whose values add up to −⟨∇L_val, Δ(g_B) − Δ(0)⟩;
        * ``"sgd"``: J = −η (the original In-Run Data Shapley proxy).

        Elementwise rules give a :class:`Diagonal`, the SGD proxy a :class:`Scalar`, operator rules
        (``structure = "operator"``) an :class:`Operator` applying VJPs of :meth:`update_rule`
        (the secant by Gauss–Legendre quadrature with its efficiency check).

        Args:
            param: a covered parameter, shape ``S``.
            grad: the batch gradient g_B, shape ``S``.
            kind: ``"tangent"``, ``"secant"`` or ``"sgd"`` (or a ``LinearizationKind``).
        Returns:
            A :class:`Preconditioner`; ``.apply(v)`` maps ``[*S]`` to ``[*S]``.
        Raises:
            ValueError: unknown ``kind``.
            UpdateJumpError: ``"secant"`` of an operator rule whose update jumps at g = 0.
            KeyError, StaleStateError: as :meth:`update`.
        Example:
            >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
            >>> opt = torch.optim.Adam([w], lr=0.1); w.grad = torch.tensor([0.3, -0.1], dtype=torch.float64)
            >>> lin = linearize(opt)
            >>> P = lin.preconditioner(w, w.grad, "tangent")
            >>> P.kind, torch.allclose(P.apply(torch.ones(2, dtype=torch.float64)), lin.tangent(w, w.grad))
            ('diagonal', True)
            >>> lin.preconditioner(w, w.grad, "sgd")
            Scalar(-0.1)
        """
        kind = str(getattr(kind, "value", kind))
        if kind == "sgd":
            return Scalar(-float(self.learning_rate(param)))
        if kind not in ("tangent", "secant"):
            raise ValueError(f"kind must be 'tangent', 'secant' or 'sgd', got {kind!r}")
        if self.structure == "elementwise":
            return Diagonal(self.tangent(param, grad) if kind == "tangent" else self.secant(param, grad))
        from ._autograd import tangent_operator
        from ._piecewise import piecewise_secant

        theta, g, state = self._inputs(param, grad)
        cls = type(self)

        def update(x: torch.Tensor) -> torch.Tensor:
            return cls.update_rule(theta, x, state)

        if kind == "tangent":
            return tangent_operator(update, g)
        name = cls.optimizer_class.__name__
        return piecewise_secant(
            update, g, lambda: cls.path_breakpoints(theta, g, state),  # only once the jump test has passed
            nodes=self.secant_nodes, max_nodes=self.secant_max_nodes, tolerance=self.secant_tolerance,
            what=f"{'an' if name[0] in 'AEIOU' else 'a'} {name} parameter of shape {tuple(param.shape)}",
        )

    def preconditioner_on_rows(self, param: torch.Tensor, grad: torch.Tensor, kind: Any, rows: torch.Tensor) -> Preconditioner:
        """J of ``param`` on the rows ``rows`` (dim 0) and 0 elsewhere: the rule evaluated on those rows only.

        For vectors supported on ``rows`` (an embedding's per-sample gradients c_z, whose rows are
        the tokens of the step) the result acts exactly as :meth:`preconditioner`; the rule then
        costs in proportion to the rows a step touches, not to the whole table. Rules that are not
        elementwise, that override :meth:`preconditioner`, and the SGD proxy are computed whole.

        Args:
            param: a covered parameter, shape ``[R, *rest]``.
            grad: its batch gradient, shape ``[R, *rest]``.
            kind: ``"tangent"``, ``"secant"`` or ``"sgd"``.
            rows: ``int64`` row indices, shape ``[r]``.
        Returns:
            A :class:`Preconditioner`: a :class:`RowDiagonal` (J on ``rows``, zero elsewhere, no
            table-sized tensor) where the rule was restricted, else :meth:`preconditioner`'s.
        Example:
            >>> w = torch.nn.Parameter(torch.randn(5, 2, dtype=torch.float64))
            >>> opt = torch.optim.Adam([w], lr=0.1); w.grad = torch.randn_like(w)
            >>> lin = linearize(opt); rows = torch.tensor([1, 3])
            >>> P = lin.preconditioner_on_rows(w, w.grad, "secant", rows)
            >>> J = P.diagonal                                            # the whole table's form
            >>> torch.equal(J[rows], lin.secant(w, w.grad)[rows]), bool((J[[0, 2, 4]] == 0).all()), P.values.shape
            (True, True, torch.Size([2, 2]))
        """
        name = str(getattr(kind, "value", kind))
        if (
            name not in ("tangent", "secant")
            or self.structure != "elementwise"
            or type(self).preconditioner is not OptimizerLinearization.preconditioner
            or param.dim() == 0
        ):
            return self.preconditioner(param, grad, kind)
        theta, g, state = self._inputs(param, grad)
        pick = lambda t: t.index_select(0, rows)  # noqa: E731
        state = state.map_tensors(pick)
        rule = type(self).tangent_rule if name == "tangent" else type(self).secant_rule
        part = rule(pick(theta), pick(g), state)
        return RowDiagonal(rows, part, theta.shape)

    def chord_shift_on_rows(self, param: torch.Tensor, J: RowDiagonal, grad: torch.Tensor, scale: float) -> torch.Tensor:
        """:meth:`chord_shift` for a slope that is zero outside ``J.rows``: Δ(0), plus scale · J ⊙ grad on the rows.

        Δ(0) still moves every row (momentum and decay carry the whole table); the chord term
        is added on the touched rows only, so no table-sized J is needed. A rule may compute Δ(0)
        in one fused pass (Adam and AdamW do).

        Args:
            param: a covered parameter, shape ``[R, *rest]``.
            J: its secant slopes on ``J.rows`` (``J.values``: ``[r, *rest]``).
            grad: the point g, shape ``[R, *rest]``.
            scale: s.
        Returns:
            Tensor of shape ``[R, *rest]``, equal to ``chord_shift(param, J.diagonal, grad, scale)`` up to rounding.
        Example:
            >>> w = torch.nn.Parameter(torch.randn(4, 2, dtype=torch.float64))
            >>> opt = torch.optim.AdamW([w], lr=0.1); w.grad = torch.randn_like(w); opt.step()
            >>> lin = linearize(opt); g = torch.zeros_like(w); g[[0, 2]] = 1.0
            >>> J = lin.preconditioner_on_rows(w, g, "secant", torch.tensor([0, 2]))
            >>> torch.allclose(lin.chord_shift_on_rows(w, J, g, 0.5), lin.chord_shift(w, J.diagonal, g, 0.5))
            True
        """
        return self._add_chord_on_rows(self.zero_update(param), J, grad, scale)

    @staticmethod
    def _add_chord_on_rows(zero: torch.Tensor, J: RowDiagonal, grad: torch.Tensor, scale: float) -> torch.Tensor:
        """``zero`` (Δ(0), overwritten where nothing else holds its memory) plus scale · J ⊙ grad on ``J.rows``."""
        if zero._is_view() or not alone_on_storage(zero):
            zero = zero.clone()  # a rule's Δ(0) that aliases its state or a view: never written into
        rows = J.rows
        chord = J.values.to(zero.dtype) * grad.detach().index_select(0, rows).to(zero.dtype)
        return zero.index_add_(0, rows, chord, alpha=scale)

    @classmethod
    def path_breakpoints(cls, theta: torch.Tensor, grad: torch.Tensor, state: ParamState) -> list[float]:
        """Points of (0, 1) where s ↦ Δ(s·grad) is not smooth, for an operator rule's secant (default none).

        The secant ∫₀¹ J(s g)ᵀ v ds is integrated piecewise between them (each piece by an
        efficiency-checked Gauss–Legendre rule, bisected where it does not converge); give the
        kinks of the rule (a clipping that switches on) and points graded towards near
        singularities (Muon, Adafactor do). Shapes as :meth:`update_rule`.

        Example:
            >>> from optimizers import SGDLinearization, SGDState
            >>> SGDLinearization.path_breakpoints(torch.zeros(2), torch.ones(2), SGDState(lr=0.1))
            []
        """
        return []

    def learning_rate(self, param: torch.Tensor) -> float:
        """The learning rate of ``param``'s group at linearization time (the SGD proxy is J = −lr).

        Returns:
            η as a Python float.
        Raises:
            KeyError, StaleStateError: as :meth:`update`.
        Example:
            >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.ones(2)
            >>> linearize(torch.optim.Adam([w], lr=0.003)).learning_rate(w)
            0.003
        """
        return self._state_of(param).lr

    def state(self, param: torch.Tensor) -> ParamState:
        """The frozen :class:`ParamState` of ``param``.

        Raises:
            KeyError, StaleStateError: as :meth:`update`.
        Example:
            >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.ones(2)
            >>> st = linearize(torch.optim.Adam([w], lr=0.1)).state(w)
            >>> type(st).__name__, st.step, st.exp_avg is None    # before the first step
            ('AdamState', 0, True)
        """
        return self._state_of(param)

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters this linearization covers (those that had a gradient).

        Example:
            >>> a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
            >>> b.grad = torch.ones(3)
            >>> [p is b for p in linearize(torch.optim.SGD([a, b], lr=0.1)).params]
            [True]
        """
        return list(self._states)

    def __contains__(self, param: object) -> bool:
        return isinstance(param, torch.Tensor) and param in self._states

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} parameters)"


def first_moment_prediction(param: torch.Tensor, state: ParamState) -> torch.Tensor:
    """ĝ from an Adam-style first moment m ← β1 m + (1 − β1) g̃: m / (1 − β1^t), L2 term off, sign of ``maximize``.

    For the rules that keep such an ``exp_avg`` (Adam, AdamW, NAdam, RAdam, Adamax):
    m_t = Σ_k (1 − β1) β1^(t−k) g̃_k averages the past effective gradients g̃ = ±g + λθ (λ the L2
    term, − when maximizing) with weights summing to 1 − β1^t. Zero before the first step.

    Args:
        param: the parameter, shape ``S``.
        state: its frozen state, with fields ``exp_avg``, ``beta1``, ``step``, ``weight_decay``,
            ``maximize`` (and ``decoupled_weight_decay``, False if absent: L2 decay).
    Returns:
        Tensor of shape ``S`` in the parameter's dtype.
    """
    m, step = state.exp_avg, state.step
    if m is None or step == 0:
        return torch.zeros_like(param.detach())  # no history yet: no prediction beyond zero
    effective = m / (1 - state.beta1**step)
    if state.weight_decay != 0 and not getattr(state, "decoupled_weight_decay", False):
        effective = effective - state.weight_decay * param.detach().to(effective.dtype)
    return shard_like(-effective if state.maximize else effective, param).to(param.dtype)


def registered() -> dict[type[torch.optim.Optimizer], type[OptimizerLinearization]]:
    """A copy of the registry: torch optimizer class -> linearization class.

    Example:
        >>> sorted(c.__name__ for c in registered())
        ['ASGD', 'Adadelta', 'Adafactor', 'Adagrad', 'Adam', 'AdamW', 'Adamax', 'Muon', 'NAdam', 'RAdam', 'RMSprop', 'Rprop', 'SGD']
    """
    return dict(_REGISTRY)


#: torch.optim classes refused by design, with the reason.
_NOT_FIRST_ORDER = {
    "LBFGS": (
        "its step runs a line search that re-evaluates the loss through a closure several times, so the update is "
        "not a function of one batch gradient under a fixed state, and no per-step first-order game exists. Train "
        "with a first-order optimizer while tracking"
    ),
    "SparseAdam": (
        "it steps only the rows of sparse gradients (nn.Embedding(sparse=True)), and per-sample contributions are "
        "captured for dense gradients only. Use nn.Embedding(sparse=False) with Adam or AdamW"
    ),
}


def linearization_class(optimizer_class: type[torch.optim.Optimizer]) -> type[OptimizerLinearization]:
    """The registered linearization class for ``optimizer_class`` (exact type match).

    Raises:
        UnsupportedOptimizerError: nothing is registered for it; the message lists what is.
    Example:
        >>> linearization_class(torch.optim.AdamW).__name__
        'AdamWLinearization'
        >>> class MySGD(torch.optim.SGD):   # a subclass is a different algorithm until registered
        ...     pass
        >>> linearization_class(MySGD)
        Traceback (most recent call last):
        ...
        optimizers._base.UnsupportedOptimizerError: no linearization is registered for ...MySGD (supported: ASGD, Adadelta, ...
        >>> linearization_class(torch.optim.LBFGS)
        Traceback (most recent call last):
        ...
        optimizers._base.UnsupportedOptimizerError: torch.optim.LBFGS is not linearized: its step runs a line search ...
    """
    try:
        return _REGISTRY[optimizer_class]
    except KeyError:
        reason = _NOT_FIRST_ORDER.get(optimizer_class.__name__)
        if reason is not None and optimizer_class.__module__.startswith("torch.optim"):
            raise UnsupportedOptimizerError(
                f"torch.optim.{optimizer_class.__name__} is not linearized: {reason}"
            ) from None
        names = ", ".join(sorted(c.__name__ for c in _REGISTRY))
        raise UnsupportedOptimizerError(
            f"no linearization is registered for {optimizer_class.__module__}.{optimizer_class.__name__} "
            f"(supported: {names}). Register one by subclassing: "
            f"`class MyLinearization(optimizers.OptimizerLinearization, optimizer={optimizer_class.__name__}): ...` "
            "(see docs/extending.md)."
        ) from None


def linearize(
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    *,
    copy_state: bool = False,
    params: Iterable[torch.Tensor] | None = None,
) -> OptimizerLinearization:
    """The linearization of ``optimizer``'s CURRENT state, for every parameter that has a gradient.

    Several optimizers (a list: Muon on the matrices, AdamW on the rest) give a
    ``LinearizationGroup`` answering per parameter with the linearization of the optimizer
    holding it; each parameter must be held by exactly one of them.

    Call it after ``backward()`` and before ``optimizer.step()``. By default it keeps
    references to the optimizer's state tensors (no memory cost) and raises
    :class:`StaleStateError` if they change before use; ``copy_state=True`` keeps a copy.

    Args:
        optimizer: a ``torch.optim.Optimizer`` whose class is registered (see :func:`registered`).
        copy_state: keep float copies of the state tensors (memory) instead of references.
        params: cover exactly these parameters, with or without a ``.grad`` (e.g. before
            ``backward()``, when the gradient is evaluated later, during the backward pass).
    Returns:
        An :class:`OptimizerLinearization` covering every parameter with a ``.grad`` (or ``params``).
    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
        UnsupportedOptimizerError: the optimizer class is not registered, or a param group
            uses a setting the linearization does not model (e.g. ``capturable=True``).

    Example:
        >>> import torch, optimizers
        >>> w = torch.nn.Parameter(torch.ones(3)); opt = torch.optim.Adam([w], lr=0.1)
        >>> w.grad = torch.tensor([1.0, -2.0, 0.0])
        >>> lin = optimizers.linearize(opt)
        >>> lin.update(w, w.grad)  # Adam's first step is about -lr * sign(g)
        tensor([-0.1000,  0.1000, -0.0000])
    """
    if isinstance(optimizer, (list, tuple)):
        from ._group import LinearizationGroup, as_optimizer_list, split_params

        opts = as_optimizer_list(optimizer)
        parts = [None] * len(opts) if params is None else split_params(opts, params)
        return LinearizationGroup(
            [linearization_class(type(o)).from_optimizer(o, copy_state=copy_state, params=ps) for o, ps in zip(opts, parts)]
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"linearize() expects a torch.optim.Optimizer (or a list of them), got {type(optimizer).__name__}")
    return linearization_class(type(optimizer)).from_optimizer(optimizer, copy_state=copy_state, params=params)


def state_tensor(state: Mapping[str, Any], name: str) -> torch.Tensor | None:
    """``state[name]`` detached, or ``None`` where the optimizer has not created it yet (a ``read_state`` helper).

    Example:
        >>> state_tensor({"exp_avg": torch.ones(2, requires_grad=True)}, "exp_avg").requires_grad, state_tensor({}, "exp_avg")
        (False, None)
    """
    x = state.get(name)
    return None if x is None else x.detach()


def zeros_or(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``x``, or zeros shaped like ``like`` where the state does not exist yet (torch's initial value).

    Example:
        >>> zeros_or(None, torch.ones(2)).tolist(), zeros_or(torch.ones(1), torch.ones(2)).tolist()
        ([0.0, 0.0], [1.0])
    """
    return torch.zeros_like(like) if x is None else x


def as_float(x: Any) -> float:
    """A hyper-parameter (float or 0-d tensor, as torch allows for lr and betas) as a Python float.

    Example:
        >>> as_float(torch.tensor(0.5)), as_float(2)
        (0.5, 2.0)
    """
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)

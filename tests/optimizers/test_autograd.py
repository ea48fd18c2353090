"""Slopes derived by autograd: against the closed forms, dense Jacobians and the efficiency identity."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optimizers
from optimizers import Diagonal, Operator, OptimizerLinearization, Scalar, UpdateJumpError, as_preconditioner
from optimizers._autograd import gauss_legendre, jump_at_zero, secant_operator, tangent_diagonal, tangent_operator
from optimizers.conformance import _build, draw_case
from tests._helpers import assert_close

#: Registered elementwise linearizations that write their own closed-form tangent.
CLOSED_FORMS = sorted(
    (c for c in optimizers.registered().values() if c.structure == "elementwise" and "tangent_rule" in vars(c)),
    key=lambda c: c.__name__,
)


@pytest.mark.parametrize("cls", CLOSED_FORMS, ids=lambda c: c.__name__)
@given(rng=st.randoms(use_true_random=False))
@settings(max_examples=25, deadline=None)
def test_autograd_tangent_equals_the_closed_form(cls, rng):
    """The JVP of update_rule along ones is the closed-form tangent (where both exist)."""
    case = draw_case(cls, rng)
    p, opt = _build(cls, case)
    lin = optimizers.linearize(opt)
    theta, g, state = lin._inputs(p, p.grad)
    derived = tangent_diagonal(lambda x: cls.update_rule(theta, x, state), g)
    closed = cls.tangent_rule(theta, g, state)
    # The closed forms are exact to ~1e-14; the JVP differentiates the naive float formula and loses
    # digits where it cancels (measured worst against sympy over 60 drawn states: Adagrad 8.4e-6,
    # Adamax 2.0e-7, NAdam 2.0e-7, RMSprop 8.3e-8; /tmp-free command in docs/optimizers.md), which is
    # why closed forms stay where they exist. Removable 0/0 points (v = g = 0) must be finite limits.
    assert bool(torch.isfinite(derived).all()), cls.__name__
    scale = closed.abs().max().clamp_min(1e-300)
    assert float(((derived - closed).abs() / torch.maximum(closed.abs(), 1e-6 * scale)).max()) < 1e-4, cls.__name__


def test_a_subclass_writing_only_update_rule_gets_tangent_and_secant():
    """Registering Δ alone (no tangent, no sympy) is enough for every linearization kind."""

    class Cubic(torch.optim.SGD):
        pass

    class CubicLinearization(OptimizerLinearization, optimizer=Cubic):
        @classmethod
        def read_state(cls, param, state, group):
            return optimizers.SGDState(lr=float(group["lr"]))

        @classmethod
        def update_rule(cls, theta, grad, state):
            return -state.lr * (grad + grad**3)

    try:
        w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64))
        w.grad = torch.tensor([0.3, -2.0, 0.0], dtype=torch.float64)
        lin = optimizers.linearize(Cubic([w], lr=0.1))
        g = w.grad
        assert_close(lin.tangent(w, g), -0.1 * (1 + 3 * g**2), rtol=1e-14)
        assert_close(lin.secant(w, g), -0.1 * (1 + g**2), rtol=1e-14)  # the chord of g + g³
        J = lin.preconditioner(w, g, "secant")
        assert isinstance(J, Diagonal)
        with pytest.raises(NotImplementedError):
            CubicLinearization.symbolic_update(None, None, None)
    finally:
        optimizers._base._REGISTRY.pop(Cubic, None)


def _smooth_matrix_update(seed, n=5):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    return lambda x: -0.1 * torch.tanh(M @ x + b) + 0.01 * x.sum() * x, gen


@given(seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_tangent_operator_is_the_transposed_jacobian(seed):
    update, gen = _smooth_matrix_update(seed)
    g = torch.randn(5, generator=gen, dtype=torch.float64)
    v = torch.randn(5, generator=gen, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(update, g)
    assert_close(tangent_operator(update, g).apply(v), jac.T @ v, rtol=1e-12, atol=1e-15)


@given(seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_secant_operator_is_the_path_integral_and_adds_up_to_the_step(seed):
    update, gen = _smooth_matrix_update(seed)
    g = torch.randn(5, generator=gen, dtype=torch.float64)
    v = torch.randn(5, generator=gen, dtype=torch.float64)
    op = secant_operator(update, g)
    P = op.apply(v)
    target = float(v @ (update(g) - update(torch.zeros_like(g))))
    assert abs(float(P @ g) - target) <= 1e-9 * float(v.norm() * (update(g) - update(0 * g)).norm())
    assert op.diagnostics["efficiency_gap"] <= 1e-9 and op.diagnostics["nodes"] >= 8
    # An independent quadrature of the same integral: 256 Gauss–Legendre nodes of dense Jacobians
    # (no VJP, no refinement). P's components orthogonal to g are not seen by the identity above.
    s, w = gauss_legendre(256)
    ref = sum(float(wi) * (torch.autograd.functional.jacobian(update, float(si) * g).T @ v) for si, wi in zip(s, w))
    assert float((P - ref).norm()) <= 1e-7 * float(ref.norm())


def test_secant_refines_its_nodes_until_the_gap_is_below_tolerance():
    update, gen = _smooth_matrix_update(3)
    g = 20 * torch.randn(5, generator=gen, dtype=torch.float64)  # a long, strongly curved path
    v = torch.randn(5, generator=gen, dtype=torch.float64)
    coarse = secant_operator(update, g, nodes=2, max_nodes=2, tolerance=1.0, agreement=1.0)
    coarse.apply(v)
    fine = secant_operator(update, g, nodes=2, max_nodes=128)
    fine.apply(v)
    assert fine.diagnostics["nodes"] > 2 and fine.diagnostics["efficiency_gap"] <= 1e-9
    assert coarse.diagnostics["efficiency_gap"] > fine.diagnostics["efficiency_gap"]
    with pytest.raises(UpdateJumpError, match="did not converge"):
        secant_operator(update, g, nodes=2, max_nodes=2).apply(v)


def test_an_update_that_jumps_at_zero_is_refused_for_the_secant():
    """Δ(g) = −η g/‖g‖ (Muon's first step is scale-invariant too): the path integral would add up to 0."""
    g = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    normalized = lambda x: -0.1 * x / x.norm().clamp_min(1e-12)  # noqa: E731
    assert jump_at_zero(normalized, g) == pytest.approx(1.0)
    with pytest.raises(UpdateJumpError, match="jumps at g = 0"):
        secant_operator(normalized, g)
    assert jump_at_zero(lambda x: torch.sin(x), g) < 1e-5
    tangent_operator(normalized, g).apply(torch.ones(3, dtype=torch.float64))  # the tangent is defined


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_gauss_legendre_integrates_polynomials_of_degree_2n_minus_1_exactly(n):
    s, w = gauss_legendre(n)
    for k in range(2 * n):
        assert float((w * s**k).sum()) == pytest.approx(1.0 / (k + 1), rel=1e-13)
    assert np.all((s > 0) & (s < 1))


def test_as_preconditioner_kinds_and_errors():
    assert isinstance(as_preconditioner(-0.1), Scalar) and as_preconditioner(0.0).is_zero
    d = as_preconditioner(torch.tensor([1.0, 1.0]))
    assert isinstance(d, Diagonal) and d.scalar == 1.0
    assert as_preconditioner(torch.tensor([1.0, 2.0])).scalar is None
    op = Operator(lambda v: 2 * v, shape=(2,))
    assert as_preconditioner(op) is op and op.diagonal is None and op.scalar is None
    with pytest.raises(ValueError, match="shape"):
        op.apply(torch.ones(3))
    with pytest.raises(TypeError, match="no elementwise form"):
        op.dense_diagonal((2,), torch.float64)
    with pytest.raises(TypeError):
        as_preconditioner("fast")


def test_engine_applies_an_operator_preconditioner_on_the_dense_path_exactly():
    """A non-elementwise J (a fixed random matrix on the flattened weight) through the ghost engine."""
    import estimators

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    mats = {p: torch.randn(p.numel(), p.numel(), dtype=torch.float64) for p in model.parameters()}
    J = {p: Operator(lambda v, A=mats[p]: (A.T @ v.reshape(-1)).reshape(v.shape), p.shape) for p in model.parameters()}
    G = {p: torch.randn_like(p) for p in model.parameters()}
    engine = estimators.GhostEngine(model)
    with engine.capture_train():
        torch.nn.functional.mse_loss(model(x), y, reduction="sum").backward()
    phi = engine.values(J, [G], grads={p: p.grad for p in model.parameters()})[:, 0]
    c = estimators.per_sample_grads(model, lambda o, t: torch.nn.functional.mse_loss(o, t, reduction="sum"), (x, y))
    ref = -sum((c[p].reshape(6, -1) @ (mats[p].T @ G[p].reshape(-1))) for p in model.parameters())
    assert_close(phi, ref, rtol=1e-10, atol=1e-14)
    assert set(engine.paths_taken.values()) == {"dense"}
    # Forced to factored, an operator (no elementwise form to fit) is applied exactly on the dense path.
    engine_f = estimators.GhostEngine(model, path="factored")
    with engine_f.capture_train():
        torch.nn.functional.mse_loss(model(x), y, reduction="sum").backward()
    with engine_f.capture_val():
        torch.nn.functional.mse_loss(model(x[:2]), y[:2]).backward()
    phi_f = engine_f.values(J, [G])[:, 0]
    assert set(engine_f.paths_taken.values()) == {"dense"}
    assert_close(phi_f, ref, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="pairwise"):
        engine_p = estimators.GhostEngine(model, path="pairwise")
        with engine_p.capture_train():
            torch.nn.functional.mse_loss(model(x), y, reduction="sum").backward()
        with engine_p.capture_val():
            torch.nn.functional.mse_loss(model(x[:2]), y[:2]).backward()
        engine_p.values(J)


def test_draw_case_rng_is_independent_of_global_state():
    assert draw_case(optimizers.SGDLinearization, random.Random(1)).hyperparameters == draw_case(
        optimizers.SGDLinearization, random.Random(1)
    ).hyperparameters

"""Muon and Adafactor: operator rules on real models, dense Jacobians, the secant's efficiency, refusals."""

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import optimizers
from optimizers import (
    AdafactorLinearization,
    MuonLinearization,
    Operator,
    StaleStateError,
    UnsupportedOptimizerError,
    UpdateJumpError,
    linearize,
)
from optimizers._autograd import gauss_legendre
from optimizers.conformance import (
    BF16_TOLERANCE,
    _muon_bf16_error,
    float64_newton_schulz,
)
from optimizers.muon import newton_schulz
from tests._helpers import assert_close, one_torch_thread  # noqa: F401  (autouse fixture)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _backward(model, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    model.zero_grad()
    (scale * nn.functional.cross_entropy(model(x), y)).backward()


def _weights(model):
    return [p for p in model.parameters() if p.dim() == 2]


def _real_deltas(params, opt):
    """What a deep copy of ``opt`` does to each of ``params`` in one real step."""
    twin_params, twin_opt = copy.deepcopy((params, opt))
    for twin, p in zip(twin_params, params):
        twin.grad = p.grad.clone()
    before = [q.detach().clone() for q in twin_params]
    twin_opt.step()
    return [q.detach() - b for q, b in zip(twin_params, before)]


MUON = {
    "default": {"lr": 0.02},
    "plain, no decay": {"lr": 0.02, "nesterov": False, "weight_decay": 0.0},
    "match_rms_adamw, cubic NS": {"lr": 0.05, "adjust_lr_fn": "match_rms_adamw", "ns_coefficients": (1.5, -0.5, 0.0), "ns_steps": 4},
}
ADAFACTOR = {
    "default": {},
    "decay, maximize": {"lr": 0.05, "weight_decay": 0.1, "maximize": True},
    "foreach, eps1, d": {"foreach": True, "eps": (1e-3, 1e-3), "d": 1.5, "beta2_decay": -0.5},
}


def _trained(opt_factory, steps, model=None, params=None):
    model = model or _model()
    params = params or list(model.parameters())
    opt = opt_factory(params)
    with float64_newton_schulz():  # a Muon history that the float64 twin can follow exactly
        for k in range(steps):
            _backward(model, k)
            opt.step()
    _backward(model, 99)
    return model, params, opt


# ---------------------------------------------------------------------- update == step()
@pytest.mark.parametrize("name", ADAFACTOR)
@pytest.mark.parametrize("steps", [0, 1, 4])
def test_adafactor_update_is_the_real_step(name, steps):
    _, params, opt = _trained(lambda ps: torch.optim.Adafactor(ps, **ADAFACTOR[name]), steps)
    lin = linearize(opt)
    for p, expected in zip(params, _real_deltas(params, opt)):
        assert_close(lin.update(p, p.grad), expected, rtol=1e-10, atol=1e-17, name=f"{name} {tuple(p.shape)}")


@pytest.mark.parametrize("name", MUON)
@pytest.mark.parametrize("steps", [0, 1, 4])
def test_muon_update_is_torchs_code_path_with_float64_newton_schulz(name, steps):
    model = _model()
    model, params, opt = _trained(lambda ps: torch.optim.Muon(ps, **MUON[name]), steps, model, _weights(model))
    lin = linearize(opt)
    with float64_newton_schulz():
        expected = _real_deltas(params, opt)
    for p, e in zip(params, expected):
        assert_close(lin.update(p, p.grad), e, rtol=1e-10, atol=1e-17, name=f"{name} {tuple(p.shape)}")


@pytest.mark.parametrize("name", MUON)
@pytest.mark.parametrize("steps", [0, 4])
def test_muon_update_is_the_real_bf16_step_to_the_measured_gap(name, steps):
    model = _model()
    model, params, opt = _trained(lambda ps: torch.optim.Muon(ps, **MUON[name]), steps, model, _weights(model))
    lin = linearize(opt)
    for p, real in zip(params, _real_deltas(params, opt)):  # torch's own bfloat16 Newton–Schulz
        rel = float(torch.linalg.vector_norm(lin.update(p, p.grad) - real) / torch.linalg.vector_norm(real))
        assert rel > 1e-5, rel  # bf16 rounding: never exact
        # ... and within the measured gap once scaled by the iteration's conditioning (module doc).
        assert _muon_bf16_error(lin, p, real) <= BF16_TOLERANCE
        if p.shape[0] == 5:  # the hidden layer's full-rank gradient: a few percent at most
            assert rel < 0.05, rel


def test_muon_bf16_step_orthogonalises_rounding_noise_of_a_rank_deficient_gradient():
    """The classifier head's gradient under cross-entropy has rank ≤ classes − 1 (its rows sum to 0).

    The exact twin leaves the null direction at 0; torch's bfloat16 iteration rounds it to ~4e-3 and
    the quintic (slope ~488 at 0) blows that up to a singular value of order 1: the real step differs
    from the exact one by tens of percent there. The conditioning-scaled gap stays within tolerance.
    """
    model = _model()
    head = model[2].weight
    opt = torch.optim.Muon([head], lr=0.02, weight_decay=0.0)  # Δ = −η' O exactly: its rank is O's
    _backward(model, 99)
    assert float(torch.linalg.svdvals(head.grad)[-1]) < 1e-12 * float(torch.linalg.svdvals(head.grad)[0])
    lin = linearize(opt)
    (real,) = _real_deltas([head], opt)
    ours = lin.update(head, head.grad)
    assert float(torch.linalg.vector_norm(ours - real) / torch.linalg.vector_norm(real)) > 0.1
    assert float(torch.linalg.svdvals(ours)[-1]) < 1e-6 * float(torch.linalg.svdvals(ours)[0])  # exact: still rank 2
    assert float(torch.linalg.svdvals(real)[-1]) > 0.1 * float(torch.linalg.svdvals(real)[0])  # bf16: rank 3
    assert _muon_bf16_error(lin, head, real) <= BF16_TOLERANCE


def test_muon_with_adamw_on_the_rest_covers_the_whole_model():
    """Muon's recipe: the weight matrices with Muon, biases with AdamW; one linearization for both."""
    model = _model()
    weights = _weights(model)
    rest = [p for p in model.parameters() if p.dim() != 2]
    muon, adamw = torch.optim.Muon(weights, lr=0.02), torch.optim.AdamW(rest, lr=1e-2)
    _backward(model, 0)
    lin = linearize([muon, adamw])
    assert len(lin) == len(list(model.parameters()))
    assert all(lin.preconditioner(p, p.grad).kind == "operator" for p in weights)
    assert all(lin.preconditioner(p, p.grad).kind == "diagonal" for p in rest)


# ---------------------------------------------------------------------- tangent == dense Jacobianᵀ
def _dense_jacobian(lin, p, g):
    theta, grad, state = lin._inputs(p, g)
    jac = torch.autograd.functional.jacobian(lambda x: type(lin).update_rule(theta, x, state), grad)
    return jac.reshape(p.numel(), p.numel())


def _applied(P, shape):
    """The matrix whose columns are Jᵀ e_i, i.e. Jᵀ itself, by applying P to every basis vector."""
    n = int(torch.Size(shape).numel())
    return torch.stack([P.apply(e.reshape(shape)).reshape(-1) for e in torch.eye(n, dtype=torch.float64)], dim=1)


@pytest.mark.parametrize("kind", ["muon", "adafactor"])
@pytest.mark.parametrize("steps", [0, 3])
def test_tangent_operator_is_the_dense_jacobian_transpose(kind, steps):
    model = _model()
    if kind == "muon":
        model, params, opt = _trained(lambda ps: torch.optim.Muon(ps, lr=0.02), steps, model, _weights(model))
    else:
        model, params, opt = _trained(lambda ps: torch.optim.Adafactor(ps, lr=0.05, d=1.0), steps, model)
    lin = linearize(opt)
    for p in params:
        P = lin.preconditioner(p, p.grad, "tangent")
        assert isinstance(P, Operator) and P.kind == "operator"
        J = _dense_jacobian(lin, p, p.grad)
        assert not torch.allclose(J, torch.diag(torch.diagonal(J))) or p.dim() < 2  # truly not elementwise
        assert_close(_applied(P, p.shape), J.T, rtol=1e-10, atol=1e-10 * float(J.abs().max()), name=f"{kind} {tuple(p.shape)}")


def test_adafactor_vector_with_clipping_is_not_diagonal():
    """A bias (vector): once ‖U‖/√N > d the clipping couples its entries, so J has off-diagonal terms."""
    w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    opt = torch.optim.Adafactor([w], lr=0.05, d=1.0)
    w.grad = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    opt.step()
    w.grad = torch.tensor([3.0, -2.0, 4.0], dtype=torch.float64)  # large against v: RMS(U) ≈ 1/√w > d
    lin = linearize(opt)
    J = _dense_jacobian(lin, w, w.grad)
    assert float((J - torch.diag(torch.diagonal(J))).abs().max()) > 1e-3 * float(J.abs().max())
    assert_close(_applied(lin.preconditioner(w, w.grad, "tangent"), w.shape), J.T, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------- the secant
def _efficiency_gap(lin, p, g, P, v):
    change = lin.update(p, g) - lin.update(p, torch.zeros_like(g))
    return float(abs((P.apply(v) * g).sum() - (v * change).sum()) / (v.norm() * change.norm()))


@pytest.mark.parametrize("kind", ["muon", "adafactor"])
@pytest.mark.parametrize("steps", [1, 4])
def test_secant_satisfies_the_efficiency_identity(kind, steps):
    model = _model()
    if kind == "muon":
        model, params, opt = _trained(lambda ps: torch.optim.Muon(ps, lr=0.02), steps, model, _weights(model))
    else:
        model, params, opt = _trained(lambda ps: torch.optim.Adafactor(ps, lr=0.05, d=1.0), steps, model)
    lin = linearize(opt)
    gen = torch.Generator().manual_seed(5)
    for p in params:
        P = lin.preconditioner(p, p.grad, "secant")
        for _ in range(3):
            v = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            assert _efficiency_gap(lin, p, p.grad, P, v) < 1e-9
            assert P.diagnostics["efficiency_gap"] < 1e-9 and P.diagnostics["nodes"] >= 8


def _reference_secant(lin, p, g, v, panels=64, nodes=16):
    """∫₀¹ J(s g)ᵀ v ds by brute force: a geometric-then-uniform composite Gauss–Legendre rule of VJPs."""
    theta, grad, state = lin._inputs(p, g)
    edges = sorted({0.0, *[2.0**-k for k in range(1, 30)], *[k / panels for k in range(1, panels + 1)]})
    s_nodes, weights = gauss_legendre(nodes)
    out = torch.zeros_like(grad)
    for a, b in itertools.pairwise(edges):
        for s, w in zip(s_nodes.tolist(), weights.tolist()):
            point = (a + (b - a) * s) * grad
            _, vjp = torch.func.vjp(lambda x: type(lin).update_rule(theta, x, state), point)
            out = out + (b - a) * w * vjp(v)[0]
    return out


@pytest.mark.parametrize("kind", ["muon", "adafactor"])
def test_secant_is_the_path_integral_not_only_its_efficiency(kind):
    """The whole vector P (not just ⟨P, g⟩) against a brute-force quadrature of the same integral."""
    model = _model()
    if kind == "muon":
        model, params, opt = _trained(lambda ps: torch.optim.Muon(ps, lr=0.02), 2, model, _weights(model))
    else:  # no clipping (d large): the integrand is smooth, the brute force converges without breakpoints
        model, params, opt = _trained(lambda ps: torch.optim.Adafactor(ps, lr=0.05, d=1e3), 2, model)
    _backward(model, 99, scale=20.0)  # a gradient large against the state: the path has a sharp start
    lin = linearize(opt)
    p = params[0]
    v = torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    P = lin.preconditioner(p, p.grad, "secant").apply(v)
    ref = _reference_secant(lin, p, p.grad, v)
    assert_close(P, ref, rtol=0, atol=1e-8 * float(ref.abs().max()), name=kind)


def test_adafactor_secant_integrates_across_the_clipping_kink():
    """Where the clipping switches on along s·g, the kink is a breakpoint and the identity holds to 1e-9."""
    w = nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    opt = torch.optim.Adafactor([w], lr=0.05, d=1.0)
    for k in range(2):
        w.grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(k + 1), dtype=torch.float64)
        opt.step()
    w.grad = 10 * torch.randn(3, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    lin = linearize(opt)
    theta, g, st = lin._inputs(w, w.grad)
    points = AdafactorLinearization.path_breakpoints(theta, g, st)

    def rms(s):
        u = AdafactorLinearization.update_rule(theta, s * g, st) + st.lr * st.weight_decay * theta
        return float(u.norm())

    # The update's size is flat (clipped) after the kink and grows before it: find the switch among the points.
    kinks = [s for s in points if abs(rms(s * (1 + 1e-6)) - rms(s)) < 1e-9 * rms(s) < abs(rms(s) - rms(s * (1 - 1e-6)))]
    assert len(kinks) == 1
    P = lin.preconditioner(w, w.grad, "secant")
    v = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert _efficiency_gap(lin, w, w.grad, P, v) < 1e-9
    assert kinks[0] in P.diagnostics["breakpoints"]


# ---------------------------------------------------------------------- the first step's jump
@pytest.mark.parametrize("kind", ["muon", "adafactor"])
def test_first_step_secant_is_refused_and_tangent_is_defined(kind):
    model = _model()
    if kind == "muon":
        opt = torch.optim.Muon(_weights(model), lr=0.02)  # empty buffer: Δ(s g) = Δ(g) for every s > 0
        params = _weights(model)
    else:
        opt = torch.optim.Adafactor(model.parameters(), lr=0.05)  # zero factors: V(s g) = s² V(g)
        params = list(model.parameters())
    _backward(model, 0)
    lin = linearize(opt)
    for p in params:
        assert_close(lin.update(p, 3.0 * p.grad), lin.update(p, p.grad), rtol=1e-9, atol=1e-15)  # scale-invariant
        with pytest.raises(UpdateJumpError, match="jumps at g = 0"):
            lin.preconditioner(p, p.grad, "secant")
        P = lin.preconditioner(p, p.grad, "tangent")
        J = _dense_jacobian(lin, p, p.grad)
        assert_close(_applied(P, p.shape), J.T, rtol=1e-10, atol=1e-12)
        # Scale invariance: J g = 0, i.e. ⟨Jᵀ v, g⟩ = 0 for every v (relative to the step's own size).
        v = torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        change = lin.update(p, p.grad) - lin.update(p, torch.zeros_like(p.grad))
        assert abs(float((P.apply(v) * p.grad).sum())) < 1e-9 * float(v.norm() * change.norm())


def test_muon_momentum_zero_jumps_at_every_step():
    model = _model()
    model, params, opt = _trained(lambda ps: torch.optim.Muon(ps, lr=0.02, momentum=0.0), 3, model, _weights(model))
    lin = linearize(opt)
    with pytest.raises(UpdateJumpError, match="jumps at g = 0"):
        lin.preconditioner(params[0], params[0].grad, "secant")


# ---------------------------------------------------------------------- properties
@given(
    shape=st.sampled_from([(1, 3), (2, 2), (3, 2), (2, 4), (4, 1)]),
    steps=st.integers(0, 3),
    momentum=st.sampled_from([0.5, 0.9, 0.95]),
    nesterov=st.booleans(),
    scale=st.sampled_from([0.1, 1.0, 3.0]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_property_muon_tangent_is_jacobian_transpose_and_secant_adds_up(shape, steps, momentum, nesterov, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
    opt = torch.optim.Muon([w], lr=0.02, momentum=momentum, nesterov=nesterov)
    for _ in range(steps):
        w.grad = torch.randn(shape, generator=gen, dtype=torch.float64)
        opt.step()
    w.grad = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    lin = linearize(opt)
    J = _dense_jacobian(lin, w, w.grad)
    assert_close(_applied(lin.preconditioner(w, w.grad, "tangent"), shape), J.T, rtol=1e-9, atol=1e-10 * float(J.abs().max()))
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    if steps == 0:
        with pytest.raises(UpdateJumpError):
            lin.preconditioner(w, w.grad, "secant")
    else:  # a momentum buffer of the gradient's own scale: the path is smooth and the secant must converge
        assert _efficiency_gap(lin, w, w.grad, lin.preconditioner(w, w.grad, "secant"), v) < 1e-9


@given(
    shape=st.sampled_from([(2, 3), (3, 1), (2, 2, 3), (4,), ()]),
    steps=st.integers(1, 4),
    d=st.sampled_from([1.0, 2.0, 1e3]),
    maximize=st.booleans(),
    scale=st.sampled_from([0.3, 1.0, 3.0]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_property_adafactor_tangent_is_jacobian_transpose_and_secant_adds_up(shape, steps, d, maximize, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
    opt = torch.optim.Adafactor([w], lr=0.05, d=d, maximize=maximize)
    for _ in range(steps):
        w.grad = torch.randn(shape, generator=gen, dtype=torch.float64)
        opt.step()
    w.grad = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    lin = linearize(opt)
    J = _dense_jacobian(lin, w, w.grad)
    assert_close(_applied(lin.preconditioner(w, w.grad, "tangent"), shape), J.T, rtol=1e-9, atol=1e-10 * float(J.abs().max()))
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    assert _efficiency_gap(lin, w, w.grad, lin.preconditioner(w, w.grad, "secant"), v) < 1e-9


# ---------------------------------------------------------------------- refusals and the API
@pytest.mark.parametrize("opt_cls,flag", [
    (torch.optim.Muon, "capturable"), (torch.optim.Muon, "differentiable"), (torch.optim.Muon, "foreach"), (torch.optim.Muon, "fused"),
    (torch.optim.Adafactor, "capturable"), (torch.optim.Adafactor, "differentiable"), (torch.optim.Adafactor, "fused"),
])
def test_unmodelled_flags_are_refused_by_name(opt_cls, flag):
    w = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    opt = opt_cls([w])
    opt.param_groups[0][flag] = True  # neither constructor takes these; a group set by hand is refused
    w.grad = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(UnsupportedOptimizerError, match=rf"{opt_cls.__name__} param group 0 has {flag}=True"):
        linearize(opt)


def test_adafactor_foreach_is_modelled_not_refused():
    assert "foreach" not in AdafactorLinearization.refused_flags
    assert "foreach" in MuonLinearization.refused_flags  # torch's Muon raises on it


def test_muon_refuses_a_vector_added_after_construction():
    w, b = nn.Parameter(torch.ones(2, 2, dtype=torch.float64)), nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = torch.optim.Muon([w])
    opt.add_param_group({"params": [b]})  # torch checks 2-D only in the constructor
    w.grad, b.grad = torch.ones(2, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    with pytest.raises(UnsupportedOptimizerError, match=r"Muon models 2-D parameters only, got a parameter of shape \(2,\)"):
        linearize(opt)


def test_adafactor_refuses_mixed_dtypes_with_machine_eps1():
    a, b = nn.Parameter(torch.ones(2, dtype=torch.float64)), nn.Parameter(torch.ones(2, dtype=torch.float32))
    a.grad, b.grad = torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float32)
    with pytest.raises(UnsupportedOptimizerError, match="mixes dtypes"):
        linearize(torch.optim.Adafactor([a, b]))
    linearize(torch.optim.Adafactor([a, b], eps=(1e-30, 1e-3)))  # an explicit eps1 is fine


@pytest.mark.parametrize("opt_cls", [torch.optim.Muon, torch.optim.Adafactor])
def test_elementwise_slopes_are_refused_for_operators(opt_cls):
    w = nn.Parameter(torch.ones(2, 3, dtype=torch.float64))
    w.grad = torch.ones(2, 3, dtype=torch.float64)
    lin = linearize(opt_cls([w]))
    for method in ("tangent", "secant"):
        with pytest.raises(TypeError, match=rf"preconditioner\(param, grad, '{method}'\)"):
            getattr(lin, method)(w, w.grad)
    assert lin.preconditioner(w, w.grad, "sgd").scalar == -lin.learning_rate(w)


@pytest.mark.parametrize("opt_cls", [torch.optim.Muon, torch.optim.Adafactor])
def test_stale_state_is_detected_and_copy_state_avoids_it(opt_cls):
    w = nn.Parameter(torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    opt = opt_cls([w])
    w.grad = torch.ones(3, 2, dtype=torch.float64)
    opt.step()
    w.grad = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lin, frozen = linearize(opt), linearize(opt, copy_state=True)
    before = frozen.update(w, w.grad)
    opt.step()
    with pytest.raises(StaleStateError, match="changed after linearize"):
        lin.preconditioner(w, w.grad, "tangent")
    assert frozen.update(w, w.grad).shape == before.shape


def test_state_is_read_as_torch_holds_it():
    w = nn.Parameter(torch.ones(3, 4, dtype=torch.float64))
    opt = torch.optim.Adafactor([w], eps=(None, 1e-3))
    w.grad = torch.ones(3, 4, dtype=torch.float64)
    st0 = linearize(opt).state(w)
    assert st0.step == 0 and st0.row_var is None and st0.eps1 == torch.finfo(torch.float64).eps
    opt.step()
    st1 = linearize(opt).state(w)
    assert st1.step == 1 and st1.row_var.shape == (3, 1) and st1.col_var.shape == (1, 4) and st1.variance is None
    assert st1.row_var.data_ptr() == opt.state[w]["row_var"].data_ptr()  # a reference, no copy
    m = torch.optim.Muon([w], lr=0.1, momentum=0.5, ns_steps=3)
    assert linearize(m).state(w).momentum_buffer is None
    m.step()
    st = linearize(m).state(w)
    assert (st.momentum, st.ns_steps, st.momentum_buffer.shape) == (0.5, 3, (3, 4))


def test_half_precision_is_computed_in_float32():
    w = nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).bfloat16())
    opt = torch.optim.Muon([w], lr=0.02)
    w.grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).bfloat16()
    opt.step()
    lin = linearize(opt)
    for kind in ("tangent", "secant"):
        out = lin.preconditioner(w, w.grad, kind).apply(torch.ones(3, 4))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_newton_schulz_twin_is_torchs_iteration_in_float64():
    """newton_schulz is torch's function with the cast removed: equal to its float64 copy, close to torch in bf16."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    from optimizers.conformance import _float64_zeropower_via_newtonschulz

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coeffs = (3.4445, -4.7750, 2.0315)
    ours = newton_schulz(x, coeffs, 5, 1e-7)
    assert_close(ours, _float64_zeropower_via_newtonschulz(x, coeffs, 5, 1e-7), rtol=1e-12, atol=1e-14)
    assert float((ours - _zeropower_via_newtonschulz(x, coeffs, 5, 1e-7).double()).norm() / ours.norm()) < 0.05
    with pytest.raises(ValueError, match="less than 100"):
        newton_schulz(x, coeffs, 100, 1e-7)
    assert optimizers.registered()[torch.optim.Muon] is MuonLinearization

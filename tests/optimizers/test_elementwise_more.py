"""Adamax, NAdam, RAdam, Adadelta, ASGD and Rprop: exact updates on real models, slopes, refusals."""

import copy
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import optimizers
from optimizers import UnsupportedOptimizerError, UpdateJumpError, linearize
from optimizers.conformance import Case, check_case, check_linearization, passes
from tests._helpers import assert_close, one_torch_thread  # noqa: F401  (autouse fixture)

# Every modelled flag of every new optimizer, on (name -> factory).
OPTIMIZERS = {
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2),
    "adamax-l2-maximize": lambda ps: torch.optim.Adamax(ps, lr=1e-2, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.1, maximize=True),
    "adamax-foreach": lambda ps: torch.optim.Adamax(ps, lr=1e-2, weight_decay=0.01, foreach=True),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    "nadam-l2": lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=0.1),
    "nadam-decoupled": lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "nadam-momentum-decay-maximize": lambda ps: torch.optim.NAdam(ps, lr=1e-2, betas=(0.8, 0.99), momentum_decay=0.3, maximize=True),
    "nadam-foreach": lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
    "radam-beta2-0.9": lambda ps: torch.optim.RAdam(ps, lr=1e-2, betas=(0.9, 0.9)),
    "radam-l2-maximize": lambda ps: torch.optim.RAdam(ps, lr=1e-2, weight_decay=0.1, maximize=True),
    "radam-decoupled": lambda ps: torch.optim.RAdam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "radam-foreach": lambda ps: torch.optim.RAdam(ps, lr=1e-2, foreach=True),
    "adadelta": lambda ps: torch.optim.Adadelta(ps),
    "adadelta-l2-maximize": lambda ps: torch.optim.Adadelta(ps, lr=0.5, rho=0.5, eps=1e-3, weight_decay=0.1, maximize=True),
    "adadelta-foreach": lambda ps: torch.optim.Adadelta(ps, foreach=True),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=1e-2),
    "asgd-decay-maximize": lambda ps: torch.optim.ASGD(ps, lr=0.1, lambd=0.5, alpha=0.5, t0=1, weight_decay=0.1, maximize=True),
    "asgd-foreach": lambda ps: torch.optim.ASGD(ps, lr=0.1, lambd=0.5, t0=1, foreach=True),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=1e-2),
    "rprop-etas-maximize": lambda ps: torch.optim.Rprop(ps, lr=1e-2, etas=(0.3, 2.0), step_sizes=(1e-3, 0.05), maximize=True),
    "rprop-foreach": lambda ps: torch.optim.Rprop(ps, lr=1e-2, foreach=True),
}
CLASSES = {
    torch.optim.Adamax: "AdamaxLinearization",
    torch.optim.NAdam: "NAdamLinearization",
    torch.optim.RAdam: "RAdamLinearization",
    torch.optim.Adadelta: "AdadeltaLinearization",
    torch.optim.ASGD: "ASGDLinearization",
    torch.optim.Rprop: "RpropLinearization",
}
SMOOTH = [n for n in OPTIMIZERS if not n.startswith("rprop")]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def _stepped(name, steps, seed=0):
    model = _model(seed)
    opt = OPTIMIZERS[name](model.parameters())
    for k in range(steps):
        _backward(model, 100 * seed + k)
        opt.step()
    _backward(model, 100 * seed + 99)
    return model, opt


def _is_scalar(J, value):
    return isinstance(J, optimizers.Scalar) and J.scalar == value


def _torch_deltas(model, opt):
    twin_model, twin_opt = copy.deepcopy((model, opt))  # one memo: the twin optimizer holds the twin params
    for twin, p in zip(twin_model.parameters(), model.parameters()):
        twin.grad = p.grad.clone()
    before = [p.detach().clone() for p in twin_model.parameters()]
    twin_opt.step()
    return [p.detach() - b for p, b in zip(twin_model.parameters(), before)]


def test_each_optimizer_is_registered_by_the_package():
    for opt_cls, name in CLASSES.items():
        assert optimizers.linearization_class(opt_cls) is getattr(optimizers, name)
        assert name in optimizers.__all__ and name.replace("Linearization", "State") in optimizers.__all__


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("steps", [0, 1, 7])  # RAdam: t = 1, 2 un-adapted momentum, t = 8 rectified
def test_update_matches_torch_step_for_every_parameter(name, steps):
    model, opt = _stepped(name, steps)
    lin = linearize(opt)
    assert len(lin) == len(list(model.parameters()))
    for p, expected in zip(model.parameters(), _torch_deltas(model, opt)):
        assert_close(lin.update(p, p.grad), expected, rtol=1e-10, atol=1e-15, name=name)


@pytest.mark.parametrize("name", ["nadam", "radam", "asgd-decay-maximize", "rprop-etas-maximize"])
def test_update_matches_torch_over_a_run_of_steps(name):
    """Linearize before every step of a 12-step run: the scalar schedules (NAdam's μ product in
    float32, RAdam's switch to the rectified branch, ASGD's η_t) follow torch step by step."""
    model = _model(3)
    opt = OPTIMIZERS[name](model.parameters())
    for k in range(12):
        _backward(model, k)
        lin = linearize(opt, copy_state=True)
        expected = _torch_deltas(model, opt)
        for p, e in zip(model.parameters(), expected):
            assert_close(lin.update(p, p.grad), e, rtol=1e-10, atol=1e-15, name=f"{name} step {k}")
        opt.step()


@pytest.mark.parametrize("name", SMOOTH)
def test_closed_form_tangent_equals_the_jvp_of_update(name):
    """The hand-written tangent against the base class's derivation (forward-mode JVP of update_rule)."""
    model, opt = _stepped(name, 3)
    lin = linearize(opt)
    cls = type(lin)
    for p in model.parameters():
        theta, g, state = lin._inputs(p, p.grad)
        derived = optimizers.OptimizerLinearization.tangent_rule.__func__(cls, theta, g, state)
        assert_close(lin.tangent(p, p.grad), derived, rtol=1e-9, atol=1e-300, name=name)


@pytest.mark.parametrize("name", SMOOTH)
@given(seed=st.integers(0, 2**16), steps=st.integers(0, 7), scale=st.sampled_from([1e-6, 1.0, 30.0]))
def test_tangent_matches_central_finite_differences(name, seed, steps, scale):
    model, opt = _stepped(name, steps, seed=seed % 7)
    lin = linearize(opt)
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        g = scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        h = 1e-5 * g.abs().clamp_min(1e-9)  # per coordinate: the curvature scale is |g| (or ε near 0)
        fd = (lin.update(p, g + h) - lin.update(p, g - h)) / (2 * h)
        ok = torch.ones_like(g, dtype=torch.bool)
        if name.startswith("adamax"):  # keep away from the kinks |g̃| + ε = β2 u and g̃ = 0
            state = lin.state(p)
            gt = (-g if state.maximize else g) + state.weight_decay * p.detach()
            c = state.beta2 * (torch.zeros_like(g) if state.exp_inf is None else state.exp_inf)
            ok = ((gt.abs() + state.eps - c).abs() > 100 * h) & (gt.abs() > 100 * h)
        J = lin.tangent(p, g)
        rounding = 10 * torch.finfo(torch.float64).eps * lin.update(p, g).abs() / h  # of the difference quotient
        err = (J - fd).abs()
        assert (err <= 1e-5 * J.abs().max() + 1e-4 * J.abs() + rounding)[ok].all(), (name, err[ok].max())


@pytest.mark.parametrize("name", OPTIMIZERS)
@given(seed=st.integers(0, 2**16), steps=st.integers(0, 7), scale=st.sampled_from([1e-12, 1e-3, 1.0, 30.0]))
def test_secant_identity(name, seed, steps, scale):
    """J_sec ⊙ g = Δ(g) − Δ(0) (efficiency), to rounding of Δ."""
    model, opt = _stepped(name, steps, seed=seed % 7)
    lin = linearize(opt)
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        g = scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        g.view(-1)[0] = 0.0
        d0, dg = lin.update(p, torch.zeros_like(g)), lin.update(p, g)
        J = lin.secant(p, g)
        # Δ itself is rounded relative to its terms (momentum and decay can cancel in it): a few ulps
        # of the parameter's largest step.
        tol = 1e-9 * (dg - d0).abs() + 16 * torch.finfo(torch.float64).eps * torch.maximum(d0.abs().max(), dg.abs().max())
        assert ((J * g - (dg - d0)).abs() <= tol).all(), name
        if not name.startswith("rprop"):
            assert J.view(-1)[0] == lin.tangent(p, g).view(-1)[0]  # the tangent where g = 0


@pytest.mark.parametrize("name", OPTIMIZERS)
@given(exponent=st.integers(-300, 150), steps=st.integers(0, 2))
def test_finite_input_gives_finite_output(name, exponent, steps):
    model, opt = _stepped(name, steps)
    lin = linearize(opt)
    methods = ("update", "tangent") if name.startswith("rprop") else ("update", "tangent", "secant")  # Rprop: −σ/|g|
    for p in model.parameters():
        g = p.grad * 10.0**exponent
        g.view(-1)[0] = 0.0
        for method in methods:
            assert torch.isfinite(getattr(lin, method)(p, g)).all(), (name, method, exponent)


@pytest.mark.parametrize("name", ["adamax", "nadam-decoupled", "radam-l2-maximize", "adadelta", "asgd", "rprop"])
def test_update_rule_broadcasts_a_stack_of_gradients(name):
    """A leading coalition axis (validation.fidelity stacks gradients against one state)."""
    model, opt = _stepped(name, 7)
    lin = linearize(opt)
    for p in model.parameters():
        stack = torch.stack([p.grad, -2 * p.grad, torch.zeros_like(p.grad)])
        out = type(lin).update_rule(p.detach(), stack, lin.state(p))
        for k in range(3):
            assert torch.equal(out[k], lin.update(p, stack[k])), (name, k)


# ---------------------------------------------------------------------- closed forms
def test_radam_branches():
    """ρ_t ≤ 5: Δ = −η m'/b1, slopes −η(1 − β1)/b1 exactly; ρ_t > 5: adaptive; both conform to sympy."""
    lin_cls = optimizers.RAdamLinearization
    n = 8
    gen = torch.Generator().manual_seed(0)
    history = tuple(torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(5))
    theta, grad = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    for steps, rectified in ((0, False), (2, False), (5, True)):
        hp = {"lr": 0.1, "betas": (0.9, 0.9), "weight_decay": 0.1, "decoupled_weight_decay": steps == 2}
        case = Case(hp, history[:steps], theta, grad)
        assert passes(errors := check_case(lin_cls, case)), (steps, errors)
        p = nn.Parameter(theta.clone())
        opt = torch.optim.RAdam([p], **hp)
        for g in history[:steps]:
            p.grad = g.clone()
            opt.step()
        p.grad = grad.clone()
        lin = linearize(opt)
        assert (lin_cls.rectification(lin.state(p)) is not None) == rectified
        if not rectified:
            slope = torch.full_like(grad, -0.1 * 0.1 / (1 - 0.9 ** (steps + 1)))
            assert_close(lin.tangent(p, grad), slope, rtol=1e-15)
            assert_close(lin.secant(p, grad), slope, rtol=1e-15)
        else:
            assert lin.tangent(p, grad).std() > 0  # adaptive: per-coordinate slopes


def test_nadam_mu_product_is_rounded_as_torch_rounds_it():
    """torch keeps mu_product in float32: the state holds Π_t as torch forms it, not in float64."""
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = torch.optim.NAdam([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.tensor([0.3, -0.1, 2.0], dtype=torch.float64)
        opt.step()
    p.grad = torch.tensor([0.2, 0.4, -1.0], dtype=torch.float64)
    st_ = linearize(opt).state(p)
    mu = 0.9 * (1.0 - 0.5 * 0.96 ** (4 * 4e-3))
    exact = opt.state[p]["mu_product"].item() * mu
    assert opt.state[p]["mu_product"].dtype == torch.float32
    assert st_.mu_product == torch.tensor(exact, dtype=torch.float32).item() != exact


def test_asgd_slope_is_minus_the_scheduled_eta():
    p = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = torch.optim.ASGD([p], lr=0.1, lambd=0.5, alpha=0.75)
    for _ in range(4):
        p.grad = torch.ones(2, dtype=torch.float64)
        opt.step()
    lin = linearize(opt)
    eta = opt.state[p]["eta"].item()
    assert eta == pytest.approx(0.1 / (1 + 0.5 * 0.1 * 4) ** 0.75, rel=1e-6) and eta != 0.1
    for method in ("tangent", "secant"):
        assert torch.equal(getattr(lin, method)(p, p.grad), torch.full((2,), -eta, dtype=torch.float64))
    assert _is_scalar(lin.preconditioner(p, p.grad, "sgd"), -0.1)


def test_adamax_secant_keeps_its_digits_under_momentum():
    """Tiny g against a large momentum term: the plain chord loses ~12 digits, the closed form none."""
    case = Case({"lr": 0.1, "betas": (0.9, 0.999)}, (torch.full((4,), 3.0, dtype=torch.float64),),
                torch.zeros(4, dtype=torch.float64), torch.tensor([1e-12, -1e-12, 1e-9, 0.5], dtype=torch.float64))
    errors = check_case(optimizers.AdamaxLinearization, case)
    assert errors["secant_vs_sympy"] < 1e-14, errors


# ---------------------------------------------------------------------- Rprop
def test_rprop_refuses_first_order_slopes_but_gives_the_sgd_proxy():
    from estimators._config import LinearizationKind

    model, opt = _stepped("rprop", 2)
    lin = linearize(opt)
    p = model[0].weight
    for kind in ("tangent", "secant", LinearizationKind.TANGENT, LinearizationKind.SECANT):
        with pytest.raises(UpdateJumpError, match=r"Rprop's update is piecewise constant.*leave_one_out.*linearization=\"sgd\""):
            lin.preconditioner(p, p.grad, kind)
    assert isinstance(UpdateJumpError("x"), UnsupportedOptimizerError)
    assert _is_scalar(lin.preconditioner(p, p.grad, "sgd"), -1e-2)
    assert _is_scalar(lin.preconditioner(p, p.grad, LinearizationKind.SGD), -1e-2)
    with pytest.raises(ValueError, match="kind must be"):
        lin.preconditioner(p, p.grad, "exact")


def test_rprop_raw_slopes_are_zero_and_the_chord():
    model, opt = _stepped("rprop-etas-maximize", 3)
    lin = linearize(opt)
    for p in model.parameters():
        g = p.grad
        assert torch.equal(lin.tangent(p, g), torch.zeros_like(g))
        assert torch.equal(lin.update(p, torch.zeros_like(g)).abs(), torch.zeros_like(g))  # sign(0) = 0
        assert_close(lin.secant(p, g) * g, lin.update(p, g), rtol=1e-15)
        size = lin.update(p, g).abs()
        assert ((size == 0) | ((size >= 1e-3) & (size <= 0.05))).all()  # skipped, or a clamped step size


def test_rprop_refuses_in_the_estimators():
    """The first-order estimators reach the refusal through optimizers.linearize + preconditioner."""
    from estimators._first_order import preconditioning

    model, opt = _stepped("rprop", 1)
    lin = linearize(opt)
    p = model[2].bias
    with pytest.raises(UpdateJumpError, match="Rprop"):
        preconditioning(lin, p, p.grad, "secant")
    assert _is_scalar(preconditioning(lin, p, p.grad, "sgd"), -1e-2)


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("opt_cls", list(CLASSES), ids=lambda c: c.__name__)
@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_unmodelled_flags_are_refused_by_name(opt_cls, flag):
    p = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = opt_cls([p], **{flag: True})
    p.grad = torch.ones(2, dtype=torch.float64)
    with pytest.raises(UnsupportedOptimizerError, match=rf"{opt_cls.__name__} param group 0 has {flag}=True"):
        linearize(opt)


@pytest.mark.parametrize("opt_cls", list(CLASSES), ids=lambda c: c.__name__)
def test_every_modelled_flag_is_sampled_by_the_conformance_check(opt_cls):
    """sample_hyperparameters covers each constructor setting that changes Δ (all but the refused
    ones and foreach), and check_linearization certifies a few random cases of it."""
    import inspect

    cls = optimizers.linearization_class(opt_cls)
    wanted = set(inspect.signature(opt_cls.__init__).parameters) - {"self", "params", "foreach", *cls.refused_flags}
    drawn = set()
    rng = random.Random(0)
    for _ in range(20):
        drawn |= set(cls.sample_hyperparameters(rng))
    assert wanted <= drawn, wanted - drawn
    assert passes(check_linearization(cls, cases=4, seed=1))


SAMPLED = {
    **OPTIMIZERS,
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
    "rmsprop-centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, lr_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(SAMPLED))
@pytest.mark.parametrize("max_coordinates", [3, 7, 4096])
def test_update_sampled_is_the_update_at_every_kth_coordinate(name, max_coordinates):
    """The ν diagnostic's evaluation on strided coordinates (m gradients side by side) is the full update there."""
    model = _model(3)
    opt = SAMPLED[name](model.parameters())
    for k in range(4):
        _backward(model, 300 + k)
        opt.step()
    _backward(model, 399)
    lin = linearize(opt)
    for p in model.parameters():
        G = torch.stack([torch.zeros_like(p.grad), 0.5 * p.grad, p.grad, -3 * p.grad])
        stride = max(1, -(-p.numel() // max_coordinates))
        expected = torch.stack([lin.update(p, g) for g in G]).reshape(len(G), -1)[:, ::stride]
        got = lin.update_sampled(p, G, max_coordinates)
        assert got.shape == expected.shape, name
        assert_close(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(SAMPLED) + ["adamw-fresh", "adam-fresh-decoupled", "adamw-stepped", "adam-stepped-maximize"])
def test_zero_update_is_the_update_at_a_zero_gradient_to_the_bit(name):
    """Δ(0), which the midpoint validation point needs every step, by the rule's own shortcut where it has one."""
    fresh = {"adamw-fresh": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
             "adam-fresh-decoupled": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
             "adamw-stepped": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
             "adam-stepped-maximize": lambda ps: torch.optim.Adam(ps, lr=1e-2, maximize=True)}
    model = _model(4)
    opt = (SAMPLED.get(name) or fresh[name])(model.parameters())
    for k in range(0 if name.endswith("fresh") or "fresh-" in name else 3):
        _backward(model, 400 + k)
        opt.step()
    _backward(model, 499)
    lin = linearize(opt)
    for p in model.parameters():
        assert torch.equal(lin.zero_update(p), lin.update(p, torch.zeros_like(p))), name

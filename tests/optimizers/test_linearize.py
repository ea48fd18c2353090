"""linearize() on real models: every parameter, groups, schedulers, reductions and errors."""

import copy
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import optimizers
from optimizers import (
    StaleStateError,
    UnsupportedOptimizerError,
    UpdateJumpError,
    linearize,
)
from optimizers.conformance import float64_newton_schulz
from tests._helpers import assert_close

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.01),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-1, lr_decay=0.01),
}
#: Operator rules (J is applied, not a tensor of slopes), each on the parameters it accepts: Muon on the
#: model's weight matrices only (torch refuses vectors), Adafactor on every parameter.
OPERATOR_OPTIMIZERS = {
    "muon": lambda ps: torch.optim.Muon([p for p in ps if p.dim() == 2], lr=0.02),
    "muon-plain-match-rms": lambda ps: torch.optim.Muon(
        [p for p in ps if p.dim() == 2], lr=0.02, nesterov=False, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"
    ),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
    "adafactor-decay-maximize-foreach": lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.1, maximize=True, foreach=True),
}


def _covered(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def _slope(lin, p, g, method):
    """``tangent``/``secant`` of an elementwise rule; the operator's Jᵀ applied to a fixed v otherwise."""
    if lin.structure == "elementwise":
        return getattr(lin, method)(p, g)
    v = torch.linspace(-1.0, 1.0, p.numel(), dtype=p.dtype).reshape(p.shape)
    return lin.preconditioner(p, g, method).apply(v)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def _torch_deltas(model, opt):
    twin_model, twin_opt = copy.deepcopy((model, opt))  # one memo: the twin optimizer holds the twin params
    for twin, p in zip(twin_model.parameters(), model.parameters()):
        twin.grad = None if p.grad is None else p.grad.clone()  # deepcopy does not copy .grad
    before = [p.detach().clone() for p in twin_model.parameters()]
    twin_opt.step()
    return [p.detach() - b for p, b in zip(twin_model.parameters(), before)]


@pytest.mark.parametrize("name", [*OPTIMIZERS, *OPERATOR_OPTIMIZERS])
@pytest.mark.parametrize("steps", [0, 3])
def test_update_matches_torch_step_for_every_parameter(name, steps):
    model = _model()
    opt = {**OPTIMIZERS, **OPERATOR_OPTIMIZERS}[name](list(model.parameters()))
    covered = _covered(opt)
    with float64_newton_schulz():  # Muon's exact twin: torch's code with its Newton–Schulz in float64
        for k in range(steps):
            _backward(model, k)
            opt.step()
        _backward(model, 99)
        lin = linearize(opt)
        assert len(lin) == len(covered)
        deltas = _torch_deltas(model, opt)
    for p, expected in zip(model.parameters(), deltas):
        if any(p is q for q in covered):
            assert_close(lin.update(p, p.grad), expected, rtol=1e-9, atol=1e-15, name=name)
        else:
            assert p not in lin  # a bias Muon does not hold


def test_param_groups_and_scheduler_learning_rates():
    model = _model()
    opt = torch.optim.Adam(
        [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters(), "lr": 3e-3, "betas": (0.5, 0.9)}]
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for k in range(3):
        _backward(model, k)
        opt.step()
        sched.step()
    _backward(model, 7)
    lin = linearize(opt)
    assert lin.learning_rate(model[0].weight) == pytest.approx(1e-2 * 0.5**3)
    assert lin.learning_rate(model[2].weight) == pytest.approx(3e-3 * 0.5**3)
    for p, expected in zip(model.parameters(), _torch_deltas(model, opt)):
        assert_close(lin.update(p, p.grad), expected, rtol=1e-9, atol=1e-15)


def test_frozen_parameters_are_not_covered():
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters())
    _backward(model, 0)
    lin = linearize(opt)
    assert model[0].weight not in lin and model[2].weight in lin
    with pytest.raises(KeyError, match="not covered"):
        lin.tangent(model[0].weight, torch.zeros_like(model[0].weight))


def test_reduction_momentum_zero_is_plain_sgd():
    model = _model()
    a = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.0, dampening=0.5)
    _backward(model, 0)
    lin = linearize(a)
    for p in model.parameters():
        assert_close(lin.update(p, p.grad), -0.3 * p.grad)
        assert_close(lin.tangent(p, p.grad), torch.full_like(p, -0.3))
        assert_close(lin.secant(p, p.grad), torch.full_like(p, -0.3))


@given(lr=st.floats(1e-6, 10.0), steps=st.integers(0, 3))
def test_reduction_tangent_of_sgd_is_minus_lr(lr, steps):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for k in range(steps):
        _backward(model, k)
        opt.step()
    _backward(model, 5)
    lin = linearize(opt)
    for p in model.parameters():
        assert torch.all(lin.tangent(p, p.grad) == -lr)


@pytest.mark.parametrize("steps", [0, 2])
def test_reduction_adamw_without_decay_is_adam(steps):
    m1, m2 = _model(), _model()
    o1 = torch.optim.Adam(m1.parameters(), lr=1e-2, amsgrad=True)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, amsgrad=True, weight_decay=0.0)
    for k in range(steps):
        for m, o in ((m1, o1), (m2, o2)):
            _backward(m, k)
            o.step()
    _backward(m1, 9)
    _backward(m2, 9)
    l1, l2 = linearize(o1), linearize(o2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        for method in ("update", "tangent", "secant"):
            assert_close(getattr(l2, method)(p2, p2.grad), getattr(l1, method)(p1, p1.grad), rtol=0, name=method)


@given(
    exponent=st.integers(-300, 150),
    steps=st.integers(0, 2),
    name=st.sampled_from(sorted(OPTIMIZERS) + sorted(OPERATOR_OPTIMIZERS)),
)
def test_finite_input_gives_finite_output(exponent, steps, name):
    if name.startswith("adafactor"):
        # torch's own step overflows beyond this: R' C' ~ g⁴ (exponent 4·77 > 308); it is the real update.
        exponent = min(exponent, 60)
    model = _model()
    opt = {**OPTIMIZERS, **OPERATOR_OPTIMIZERS}[name](list(model.parameters()))
    for k in range(steps):
        _backward(model, k)
        opt.step()
    _backward(model, 1)
    lin = linearize(opt)
    for p in _covered(opt):
        g = p.grad * 10.0**exponent
        g.view(-1)[0] = 0.0  # a zero coordinate too
        assert torch.isfinite(lin.update(p, g)).all(), (name, "update", exponent)
        for method in ("tangent", "secant"):
            try:
                out = _slope(lin, p, g, method)
            except UpdateJumpError:
                # Operator secants are refused (never NaN) where Δ jumps at g = 0: the first step, or a
                # gradient so large against the state that Δ(s g) is scale-invariant down to s = 1e-6.
                assert method == "secant" and lin.structure == "operator", (name, exponent)
                assert steps == 0 or exponent >= 3, (name, steps, exponent)
                continue
            assert torch.isfinite(out).all(), (name, method, exponent)


# ---------------------------------------------------------------------- errors
class _Unregistered(torch.optim.Optimizer):
    """An optimizer no linearization is registered for (torch's own classes may all be, in time)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})


def test_unregistered_optimizer_is_refused_with_the_supported_list():
    p = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = _Unregistered([p])
    p.grad = torch.ones(2, dtype=torch.float64)
    supported = ", ".join(sorted(c.__name__ for c in optimizers.registered()))
    where = re.escape(f"{_Unregistered.__module__}.{_Unregistered.__name__}")
    with pytest.raises(UnsupportedOptimizerError, match=rf"no linearization is registered for {where}.*supported: {supported}\).*subclassing"):
        linearize(opt)


def test_subclass_of_a_registered_optimizer_is_refused():
    class MyAdam(torch.optim.Adam):
        pass

    p = nn.Parameter(torch.ones(2, dtype=torch.float64))
    p.grad = torch.ones(2, dtype=torch.float64)
    with pytest.raises(UnsupportedOptimizerError, match="MyAdam"):
        linearize(MyAdam([p]))


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_unmodelled_flags_are_refused_by_name(flag):
    p = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = torch.optim.Adam([p], **{flag: True})
    p.grad = torch.ones(2, dtype=torch.float64)
    with pytest.raises(UnsupportedOptimizerError, match=f"param group 0 has {flag}=True"):
        linearize(opt)


def test_not_an_optimizer():
    with pytest.raises(TypeError, match=r"expects a torch.optim.Optimizer \(or a list of them\), got int"):
        linearize(3)
    with pytest.raises(TypeError, match="expected torch.optim.Optimizer"):
        linearize([3])
    with pytest.raises(ValueError, match="no optimizer given"):
        linearize([])


def test_stale_state_is_detected_and_copy_state_avoids_it():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    for k in range(2):
        _backward(model, k)
        opt.step()
    _backward(model, 3)
    lin, frozen = linearize(opt), linearize(opt, copy_state=True)
    p = model[0].weight
    before = frozen.update(p, p.grad)
    opt.step()
    with pytest.raises(StaleStateError, match="changed after linearize"):
        lin.update(p, p.grad)
    # the frozen copy still describes the step that was taken (θ moved, so compare the state part)
    assert frozen.state(p).step == 2
    assert before.shape == p.shape


def test_grad_shape_mismatch():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _backward(model, 0)
    with pytest.raises(ValueError, match=r"grad has shape \(3,\) but the parameter has shape \(5, 4\)"):
        linearize(opt).update(model[0].weight, torch.zeros(3))


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(5, 2, sparse=True).double()
    opt = torch.optim.Adagrad(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(UnsupportedOptimizerError, match="sparse gradient"):
        linearize(opt)


def test_double_registration_is_an_error_unless_replace():
    with pytest.raises(ValueError, match=r"already linearized by AdamLinearization.*replace=True"):

        class Again(optimizers.AdamLinearization, optimizer=torch.optim.Adam):
            pass

    assert optimizers.linearization_class(torch.optim.Adam) is optimizers.AdamLinearization


def test_registering_a_non_optimizer_is_an_error():
    with pytest.raises(TypeError, match="optimizer= must be a torch.optim.Optimizer subclass"):

        class Bad(optimizers.SGDLinearization, optimizer=int):
            pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=dtype))
    opt = torch.optim.Adam([p], lr=1e-2)  # eps = 1e-8 underflows to 0 in float16
    p.grad = torch.tensor([1e-3, 0.0, -4.0], dtype=dtype)
    lin = linearize(opt)
    for method in ("update", "tangent", "secant"):
        out = getattr(lin, method)(p, p.grad)
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), method
    # step 1 of Adam at g = 0: the tangent is -lr/eps, representable only because of float32
    assert lin.tangent(p, p.grad)[1].item() == pytest.approx(-1e-2 / 1e-8, rel=1e-6)


def test_linearize_given_params_before_backward_equals_linearize_after():
    """``params=`` reads the state only: built before the gradient exists, it gives the same J."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(4, 3, dtype=torch.float64)), nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = torch.optim.AdamW([{"params": [w], "lr": 1e-2}, {"params": [b], "lr": 3e-2, "weight_decay": 0.0}])
    for _ in range(2):  # real state
        opt.zero_grad()
        (w.sin().sum() + (b ** 2).sum()).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    early = linearize(opt, params=[w, b])
    assert w in early and b in early and w.grad is None
    (w.cos().sum() + b.sum()).backward()
    late = linearize(opt)
    for p in (w, b):
        for method in ("update", "tangent", "secant"):
            assert torch.equal(getattr(early, method)(p, p.grad), getattr(late, method)(p, p.grad)), method


def test_linearize_refuses_params_outside_the_optimizer():
    w, other = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"shape \(2,\) are not in any param group"):
        linearize(torch.optim.SGD([w], lr=0.1), params=[w, other])


def test_adam_secant_where_the_squared_gradient_underflows_in_float32_matches_float64():
    """v = 0 and g² below float32's range: D0 + Dg rounds to 0 while m·g is a nonzero subnormal."""
    from optimizers.adam import AdamLinearization, AdamState

    m, v, g = [1e-22, 0.0, 1e-3], [0.0, 0.0, 1e-6], [1e-23, 0.0, 1e-3]
    out = {}
    for dtype in (torch.float32, torch.float64):
        st = AdamState(lr=1e-3, step=3, exp_avg=torch.tensor(m, dtype=dtype), exp_avg_sq=torch.tensor(v, dtype=dtype))
        out[dtype] = AdamLinearization._secant_from_zero(torch.tensor(g, dtype=dtype), st)
    assert torch.isfinite(out[torch.float32]).all()
    torch.testing.assert_close(out[torch.float32].double(), out[torch.float64], rtol=1e-5, atol=0.0)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["adam", "adamw", "nadam", "nadam-decoupled", "radam", "radam-decoupled", "adamax"]),
    steps=st.integers(0, 4), beta1=st.sampled_from([0.0, 0.5, 0.9]),
    weight_decay=st.sampled_from([0.0, 0.1]), maximize=st.booleans(), amsgrad=st.booleans(), seed=st.integers(0, 2**16),
)
def test_the_predicted_gradient_is_the_bias_corrected_average_of_past_gradients(kind, steps, beta1, weight_decay, maximize, amsgrad, seed):
    """ĝ = Σ_k (1 − β1) β1^(t−k) g_k / (1 − β1^t) (effective gradients ±g + λθ with the L2 term taken off), 0 before any step."""
    import estimators

    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64, generator=gen))
    hyper = dict(lr=1e-2, betas=(beta1, 0.99), weight_decay=weight_decay, maximize=maximize)
    base = kind.removesuffix("-decoupled")
    if base in ("adam", "adamw"):
        hyper["amsgrad"] = amsgrad
    if kind.endswith("-decoupled"):
        hyper["decoupled_weight_decay"] = True
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "nadam": torch.optim.NAdam, "radam": torch.optim.RAdam,
           "adamax": torch.optim.Adamax}[base]
    opt = cls([w], **hyper)
    l2 = 0.0 if kind == "adamw" or kind.endswith("-decoupled") else weight_decay
    m = torch.zeros(5, dtype=torch.float64)
    for _ in range(steps):
        w.grad = torch.randn(5, dtype=torch.float64, generator=gen)
        effective = (-w.grad if maximize else w.grad) + l2 * w.detach()
        m = beta1 * m + (1 - beta1) * effective
        opt.step()
    w.grad = torch.randn(5, dtype=torch.float64, generator=gen)  # the coming gradient (ĝ must not read it)
    lin = optimizers.linearize(opt)
    want = torch.zeros(5, dtype=torch.float64) if steps == 0 else m / (1 - beta1**steps) - l2 * w.detach()
    want = -want if maximize and steps else want
    got = lin.predicted_gradient(w)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    shift = estimators.val_point_shift(lin, [w], None, "predicted")[w]
    assert torch.allclose(shift, 0.5 * (lin.update(w, got) + lin.zero_update(w)), rtol=1e-12, atol=1e-15)


def test_a_constant_gradient_is_predicted_exactly_and_sgd_has_no_prediction():
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = torch.optim.AdamW([w], lr=1e-2)
    g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    for _ in range(3):
        w.grad = g.clone()
        opt.step()
    assert torch.allclose(optimizers.linearize(opt).predicted_gradient(w), g, rtol=1e-14)
    sgd = torch.optim.SGD([w], lr=1e-2, momentum=0.9)
    sgd.step()
    assert optimizers.linearize(sgd).predicted_gradient(w) is None

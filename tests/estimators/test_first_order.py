"""The generic first-order estimator: J, the validation point, the validation gradients and
the reference path, including the secant's efficiency against the real optimizer linearization."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import estimators as E
import optimizers
from tests._helpers import assert_close

from ._models import CASES, DT, MLP, TinyLM, token_ce


def _train_steps(model, opt, loss_fn, batches):
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


def _lm(seed=0, tied=True):
    torch.manual_seed(seed)
    model = TinyLM(5, 3, tied=tied, padding_idx=0, ln_bias=True, rms_eps=None)
    g = torch.Generator().manual_seed(seed)
    make = lambda n: (torch.randint(0, 5, (n, 3), generator=g), torch.randint(0, 5, (n, 3), generator=g))
    return model, make


OPTIMIZERS = {
    "adam-l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("warm_steps", [0, 2])
def test_secant_values_sum_to_the_first_order_update(opt_name, warm_steps):
    """Σ_z φ_z = −⟨∇L_val, Δ(g_B) − Δ(0)⟩ exactly for J = secant (efficiency), K = 2 targets."""
    model, make = _lm()
    opt = OPTIMIZERS[opt_name](model.parameters())
    _train_steps(model, opt, token_ce, [make(3) for _ in range(warm_steps)])
    opt.zero_grad()
    engine = E.GhostEngine(model)
    x, y = make(4)
    with engine.capture_train():
        token_ce(model(x), y).backward()
    lin = optimizers.linearize(opt)
    J = {p: E.preconditioning(lin, p, p.grad, "secant") for p in lin.params}
    val_grads = E.validation_gradients(model, token_ce, [make(2), make(3)], engine=engine)
    phi = engine.values(J, val_grads)
    for k, vg in enumerate(val_grads):
        expected = -sum((vg[p] * (lin.update(p, p.grad) - lin.update(p, torch.zeros_like(p)))).sum() for p in lin.params)
        assert_close(phi[:, k].sum(), expected, rtol=1e-10, name=f"efficiency[{opt_name}, k={k}]")


def test_preconditioning_kinds_read_the_linearization():
    model, make = _lm(tied=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train_steps(model, opt, token_ce, [make(3)])
    opt.zero_grad()
    x, y = make(3)
    token_ce(model(x), y).backward()
    lin = optimizers.linearize(opt)
    p = model.mix.weight
    tangent, secant = E.preconditioning(lin, p, p.grad, "tangent"), E.preconditioning(lin, p, p.grad, E.LinearizationKind.SECANT)
    assert (tangent.kind, secant.kind) == ("diagonal", "diagonal")
    assert_close(tangent.diagonal, lin.tangent(p, p.grad))
    assert_close(secant.diagonal, lin.secant(p, p.grad))
    v = torch.randn_like(p)
    assert_close(tangent.apply(v), lin.tangent(p, p.grad) * v)
    sgd = E.preconditioning(lin, p, p.grad, "sgd")
    assert (sgd.kind, sgd.scalar) == ("scalar", -1e-2)


@pytest.mark.parametrize("val_point", ["lookahead", "midpoint"])
def test_val_point_shift_matches_the_real_step_and_restores_exactly(val_point):
    model, make = _lm()
    opt = torch.optim.Adam(model.parameters(), lr=5e-2, weight_decay=0.1)
    _train_steps(model, opt, token_ce, [make(3)])
    opt.zero_grad()
    x, y = make(4)
    token_ce(model(x), y).backward()
    lin = optimizers.linearize(opt, copy_state=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    shift = E.val_point_shift(lin, lin.params, None, val_point)
    val = [make(3)]
    got = E.validation_gradients(model, token_ce, val, shift=shift)[0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} not restored bit-exactly"
    # Independent check: take the real optimizer step on a copy (lookahead), or average the
    # real steps with g_B and with zero gradients (midpoint).
    moved = copy.deepcopy(model)
    opt2 = torch.optim.Adam(moved.parameters(), lr=5e-2, weight_decay=0.1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict may share tensors
    for p2, p in zip(moved.parameters(), model.parameters()):
        p2.grad = p.grad.clone()
    opt2.step()
    if val_point == "midpoint":
        zero = copy.deepcopy(model)
        opt3 = torch.optim.Adam(zero.parameters(), lr=5e-2, weight_decay=0.1)
        opt3.load_state_dict(copy.deepcopy(opt.state_dict()))
        for p3 in zero.parameters():
            p3.grad = torch.zeros_like(p3)
        opt3.step()
        with torch.no_grad():
            for p2, p3, p in zip(moved.parameters(), zero.parameters(), model.parameters()):
                p2.copy_(p + 0.5 * ((p2 - p) + (p3 - p)))
    ref = torch.autograd.grad(token_ce(moved(val[0][0]), val[0][1]), list(moved.parameters()))
    assert_close({n: got[p] for n, p in model.named_parameters()}, {n: g for (n, _), g in zip(moved.named_parameters(), ref)}, rtol=1e-9)


@pytest.mark.parametrize("opt_cls,kw", [
    (torch.optim.Adam, dict(lr=5e-2, weight_decay=0.1)),           # L2: the general secant
    (torch.optim.AdamW, dict(lr=5e-2, weight_decay=0.1)),          # the closed-form secant
    (torch.optim.Adam, dict(lr=5e-2, amsgrad=True)),
    (torch.optim.SGD, dict(lr=5e-2, momentum=0.9, nesterov=True)),
    (torch.optim.RMSprop, dict(lr=1e-2, centered=True)),
])
@pytest.mark.parametrize("val_point", ["lookahead", "midpoint"])
@pytest.mark.parametrize("warm", [0, 2])
def test_val_point_shift_from_the_secant_equals_two_updates(opt_cls, kw, val_point, warm):
    """Δ(0) + J_sec ⊙ g_B (scaled by ½ for the midpoint) is the same shift as from Δ(g_B) and Δ(0)."""
    model, make = _lm()
    opt = opt_cls(model.parameters(), **kw)
    _train_steps(model, opt, token_ce, [make(3) for _ in range(warm)])
    opt.zero_grad()
    x, y = make(4)
    token_ce(model(x), y).backward()
    with torch.no_grad():
        model.mix.weight.grad[:3] = 0.0  # entries without gradient: the secant is the tangent there
    lin = optimizers.linearize(opt)
    secant = {p: E.preconditioning(lin, p, p.grad, "secant") for p in lin.params}
    fast = E.val_point_shift(lin, lin.params, None, val_point, secant=secant)
    slow = E.val_point_shift(lin, lin.params, None, val_point)
    scale = max(float(s.abs().max()) for s in slow.values())
    assert_close(fast, slow, rtol=1e-10, atol=1e-14 * scale)
    assert scale > 0


def test_current_val_point_is_no_shift():
    assert E.val_point_shift(None, [], None, "current") is None


def test_shifted_parameters_restores_after_an_exception():
    w = nn.Parameter(torch.tensor([0.1, 0.2, 0.3], dtype=DT))
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with E.shifted_parameters({w: torch.full_like(w, 1e-17 + 0.7)}):
            assert not torch.equal(w, before)
            raise RuntimeError("boom")
    assert torch.equal(w, before)


@given(release=st.booleans(), fail=st.booleans())
def test_shifted_parameters_with_release_empties_the_shift_and_gives_the_same_point(release, fail):
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(3, 2, dtype=DT)), nn.Parameter(torch.randn(4, dtype=DT))
    before = {p: p.detach().clone() for p in (a, b)}
    shift = {a: torch.randn(3, 2, dtype=DT) * 1e-3, b: torch.randn(4, dtype=DT) * 1e-3}
    expected = {p: before[p] + s for p, s in shift.items()}
    try:
        with E.shifted_parameters(shift, release=release):
            # the shifted point is the same whether the shifts are kept or released
            assert all(torch.equal(p, expected[p]) for p in (a, b))
            assert (len(shift) == 0) == release
            if fail:
                raise RuntimeError("boom")
    except RuntimeError:
        assert fail
    assert all(torch.equal(p, before[p]) for p in (a, b))  # restored bit-exactly either way


@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, DT]), channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_shifted_parameters_swap_keeps_each_parameters_storage_and_gives_in_place_bits(dtype, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(2, 3, 4, 5, generator=g, dtype=DT).to(dtype))
    if channels_last:
        w.data = w.data.to(memory_format=torch.channels_last)
    b = nn.Parameter(torch.randn(7, generator=g, dtype=DT).to(dtype))
    shift = {w: torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float32) * 1e-2, b: torch.randn(7, generator=g) * 1e-2}
    expected = {p: p.detach().clone().add_(s.to(p.dtype)) for p, s in shift.items()}  # what in place gives
    storage = {p: (p.data_ptr(), p.stride()) for p in (w, b)}
    before = {p: p.detach().clone() for p in (w, b)}
    with E.shifted_parameters(shift):
        assert all(torch.equal(p, expected[p]) and p.stride() == storage[p][1] for p in (w, b))
    assert all(torch.equal(p, before[p]) and (p.data_ptr(), p.stride()) == storage[p] for p in (w, b))


@given(keep=st.sampled_from(["none", "name", "view", "alias"]), seed=st.integers(0, 2**16))
def test_a_handed_over_shift_becomes_the_shifted_parameter_only_when_nothing_else_sees_it(keep, seed):
    g = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float32))
    before = w.detach().clone()
    buffer = torch.randn(16, generator=g) * 1e-2
    s = buffer[:15].view(5, 3) if keep == "view" else torch.randn(5, 3, generator=g) * 1e-2
    expected = before + s
    held = {"name": s, "alias": s.detach()}.get(keep)
    snapshot = s.clone()
    shift, ptr = {w: s}, s.data_ptr()
    if keep != "name":
        del s
    with E.shifted_parameters(shift, release=True):
        assert torch.equal(w, expected)
        # overwritten in place (no allocation) exactly when no name, view or alias can see it
        assert (w.data_ptr() == ptr) == (keep == "none")
    assert torch.equal(w, before)
    if held is not None:
        assert torch.equal(held, snapshot)  # what the caller still holds is untouched
    if keep == "view":
        assert torch.equal(buffer[:15].view(5, 3), snapshot)


def test_the_tracker_validation_pass_moves_parameters_into_the_handed_over_shifts():
    # StepComputer hands val_point_shift's dict over (release_shift=True): each parameter's
    # shifted point is written into its shift's own memory, with no allocation per step.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    shift = {p: torch.randn_like(p) * 1e-3 for p in model.parameters()}
    ptrs = {p: s.data_ptr() for p, s in shift.items()}
    seen = {}
    model.register_forward_pre_hook(lambda m, a: seen.update({p: p.data_ptr() for p in m.parameters()}))
    E.validation_gradients(model, F.mse_loss, [(torch.randn(2, 4), torch.randn(2, 1))], shift=shift, release_shift=True)
    assert seen == ptrs and not shift


def test_a_parameter_a_module_keeps_a_view_of_is_moved_in_place_so_the_view_sees_the_shift():
    class CachedTranspose(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4, dtype=DT))
            self.weight_t = self.weight.detach().t()  # a view of the parameter's memory, used in forward

        def forward(self, x):
            return x @ self.weight_t

    m = CachedTranspose()
    x, before = torch.randn(2, 4, dtype=DT), m.weight.detach().clone()
    shift = {m.weight: torch.full((3, 4), 0.5, dtype=DT)}
    with E.shifted_parameters(shift):
        assert torch.equal(m(x), x @ (before + 0.5).t())  # the forward reads the shifted point
    assert torch.equal(m.weight, before) and torch.equal(m(x), x @ before.t())


def test_shifted_parameters_moving_two_views_of_one_buffer_adds_both_shifts_like_the_optimizer():
    # Two Parameter objects viewing one storage: the optimizer's in-place steps move the shared
    # entries by both updates, and so must the validation point.
    flat = torch.zeros(6, dtype=DT)
    a, b = nn.Parameter(flat[:4]), nn.Parameter(flat[2:])
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    with E.shifted_parameters({a: torch.ones(4, dtype=DT), b: torch.full((4,), 2.0, dtype=DT)}):
        assert flat.tolist() == [1.0, 1.0, 3.0, 3.0, 2.0, 2.0]
    assert flat.tolist() == [0.0] * 6


@given(case=CASES["mlp"], n=st.integers(1, 4), reduction=st.sampled_from(["mean", "sum"]))
def test_per_sample_grads_match_a_loop_of_single_sample_backwards(case, n, reduction):
    g = torch.Generator().manual_seed(n)
    x, y = case.make_batch(n, g)
    loss = (lambda o, t: F.mse_loss(o, t, reduction="sum")) if reduction == "sum" else case.loss_fn
    got = E.per_sample_grads(case.model, loss, (x, y), reduction=reduction)
    params = [p for p in case.model.parameters()]
    scale = 1.0 / n if reduction == "mean" else 1.0
    for z in range(n):
        grads = torch.autograd.grad(loss(case.model(x[z:z + 1]), y[z:z + 1]), params)
        for p, gz in zip(params, grads):
            assert_close(got[p][z], gz * scale, name=f"sample {z}")
    total = torch.autograd.grad(loss(case.model(x), y), params)
    for p, gt in zip(params, total):
        assert_close(got[p].sum(0), gt, rtol=1e-9, atol=1e-14, name="sum of c_z = g_B")


def test_first_order_values_formula():
    c = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=DT), "b": torch.tensor([[1.0], [-1.0]], dtype=DT)}
    P = [{"a": torch.tensor([1.0, 0.0], dtype=DT), "b": torch.tensor([2.0], dtype=DT)}, {"a": torch.zeros(2, dtype=DT), "b": torch.ones(1, dtype=DT)}]
    assert_close(E.first_order_values(c, P), -torch.tensor([[3.0, 1.0], [1.0, -1.0]], dtype=DT))


def test_preconditioned_val_grad_broadcasts_and_accepts_floats():
    g = torch.arange(6, dtype=DT).reshape(2, 3)
    assert_close(E.preconditioned_val_grad(-0.5, g), -0.5 * g)
    assert_close(E.preconditioned_val_grad(torch.tensor([1.0, 2.0, 3.0], dtype=DT), g), g * torch.tensor([1.0, 2.0, 3.0], dtype=DT))


def test_materialized_estimator_uses_sgd_proxy_like_earlier_methods():
    """With J = −lr and plain SGD, values are −lr⟨∇L_val, c_z⟩ and sum to −lr⟨∇L_val, g_B⟩."""
    torch.manual_seed(0)
    model = MLP(3, 4, 2, True, True)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    vx, vy = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    c = E.per_sample_grads(model, F.mse_loss, (x, y))
    [vg] = E.validation_gradients(model, F.mse_loss, [(vx, vy)])
    phi = E.first_order_values(c, [{p: E.preconditioned_val_grad(-0.1, vg[p]) for p in vg}])
    gB = torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()))
    assert_close(phi.sum(), 0.1 * -(-sum((vg[p] * g).sum() for p, g in zip(model.parameters(), gB))), rtol=1e-10)

"""Fused (compiled) kernels of the Adam family: the same values as the eager formulas, a clean fallback.

The kernels compile once per pytest process (seconds); every test here reuses the two compiled kernels
of :mod:`optimizers.adam`, in float64 (and one float32 case), so that the cost is paid once.
"""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import optimizers
from optimizers import adam
from optimizers._fused import AUTO_ELEMENTS, MIN_ELEMENTS, FusedKernelWarning, Kernel, fused_kernels, resolve

SHAPE = (256, MIN_ELEMENTS // 256)  # exactly the smallest tensor that is fused


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _stepped(kind: str, steps: int, seed: int, dtype=torch.float64, **hyper):
    """A parameter of SHAPE after ``steps`` real torch steps; its optimizer; a fresh gradient g (zeros in places)."""
    gen = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(SHAPE, generator=gen, dtype=dtype))
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]([w], **hyper)
    for _ in range(steps):
        w.grad = torch.randn(SHAPE, generator=gen, dtype=dtype) * torch.rand(SHAPE, generator=gen, dtype=dtype)
        w.grad[: SHAPE[0] // 8] = 0  # rows with g = 0 (and, after one step, v = 0 where every g was 0)
        opt.step()
    g = torch.randn(SHAPE, generator=gen, dtype=dtype)
    g[SHAPE[0] // 16 : SHAPE[0] // 4] = 0
    w.grad = g.clone()  # linearize() reads the parameters that have a gradient
    return w, opt, g


def _eager_and_fused(lin, w, g, scale):
    with fused_kernels(False):
        J0 = lin.secant(w, g)
        shift0 = lin.chord_shift(w, J0, g, scale)
    with fused_kernels():
        J1 = lin.secant(w, g)
        shift1 = lin.chord_shift(w, J1, g, scale)
    return (J0, shift0), (J1, shift1)


def test_the_kernels_compile_on_this_machine():
    """Guard for the tests below: a machine where compiling fails would make them compare eager with eager."""
    w, opt, g = _stepped("adamw", 2, 0, lr=1e-2)
    st_ = optimizers.linearize(opt)._state_of(w)
    c = (st_.beta1, st_.beta2, 0.5, st_.eps, -1.0)
    assert adam._SECANT(g, st_.exp_avg, st_.exp_avg_sq, c) is None  # off outside a fused_kernels block
    with warnings.catch_warnings(), fused_kernels():
        warnings.simplefilter("error", FusedKernelWarning)
        out = adam._SECANT(g, st_.exp_avg, st_.exp_avg_sq, c)
    assert out is not None and out.shape == SHAPE and adam._SECANT.broken is None


@given(
    kind=st.sampled_from(["adam", "adamw"]),
    steps=st.integers(0, 3),
    lr=st.floats(1e-4, 1e-1),
    beta1=st.sampled_from([0.0, 0.5, 0.9]),
    beta2=st.sampled_from([0.9, 0.999]),
    eps=st.sampled_from([1e-8, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    maximize=st.booleans(),
    scale=st.sampled_from([0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_fused_secant_and_shift_equal_the_eager_formulas(kind, steps, lr, beta1, beta2, eps, weight_decay, maximize, scale, seed):
    """J and Δ(0) + s J ⊙ g to 1e-12 (float64): rounding only, with or without state, L2 decay, maximize."""
    w, opt, g = _stepped(kind, steps, seed, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, maximize=maximize)
    lin = optimizers.linearize(opt)
    (J0, s0), (J1, s1) = _eager_and_fused(lin, w, g, scale)
    assert torch.isfinite(J1).all() and torch.isfinite(s1).all()
    assert _rel(J1, J0) < 1e-12 and _rel(s1, s0) < 1e-12
    # And both are what they claim to be: the chord's end at scale 1 is the real update Δ(g).
    if scale == 1.0:
        assert _rel(s1, lin.update(w, g)) < 1e-10


def test_fused_kernels_run_in_float32():
    w, opt, g = _stepped("adamw", 2, 3, dtype=torch.float32, lr=1e-3, weight_decay=0.01)
    lin = optimizers.linearize(opt)
    (J0, s0), (J1, s1) = _eager_and_fused(lin, w, g, 0.5)
    assert J1.dtype == torch.float32 and _rel(J1, J0) < 1e-5 and _rel(s1, s0) < 1e-5


def test_small_tensors_half_precision_switched_off_and_autograd_inputs_run_eagerly():
    k = Kernel(lambda x, c: x * c[0])
    c = (2.0,)
    with fused_kernels():
        assert k(torch.ones(MIN_ELEMENTS - 1), c) is None
        assert k(torch.ones(MIN_ELEMENTS, requires_grad=True), c) is None
        assert k(torch.ones(MIN_ELEMENTS, dtype=torch.bfloat16), c) is None  # the eager path promotes half to float32
        assert k(torch.ones(MIN_ELEMENTS), torch.ones(MIN_ELEMENTS, dtype=torch.float64), c) is None  # mixed dtypes
        with fused_kernels(False):
            assert k(torch.ones(MIN_ELEMENTS), c) is None
    assert k(torch.ones(MIN_ELEMENTS), c) is None
    assert k._compiled is None  # nothing was compiled for any of them


def test_a_failed_compilation_warns_once_and_falls_back_to_the_same_values(monkeypatch):
    w, opt, g = _stepped("adamw", 2, 1, lr=1e-2, weight_decay=0.1)
    lin = optimizers.linearize(opt)
    with fused_kernels(False):
        J_eager = lin.secant(w, g)

    def no_compiler(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(adam, "_SECANT", Kernel(adam.adam_secant))
    with pytest.warns(FusedKernelWarning, match=r"adam_secant could not be compiled.*compile=False"), fused_kernels():
        J = lin.secant(w, g)
    assert torch.equal(J, J_eager)
    with warnings.catch_warnings(), fused_kernels():
        warnings.simplefilter("error")
        assert torch.equal(lin.secant(w, g), J_eager)  # no second warning, no retry
    assert isinstance(adam._SECANT.broken, RuntimeError)


def test_auto_compiles_on_a_cpu_only_for_large_models():
    small, large = [torch.zeros(AUTO_ELEMENTS - 1)], [torch.zeros(AUTO_ELEMENTS // 2), torch.zeros(AUTO_ELEMENTS // 2)]
    assert (resolve("auto", small), resolve("auto", large)) == (False, True)
    assert (resolve(True, small), resolve(False, large)) == (True, False)
    with pytest.raises(ValueError, match=r"compile='yes' is not accepted; use 'auto'"):
        resolve("yes", small)


def _big_model(seed=0):
    torch.manual_seed(seed)
    # 96 · 512 = 49,152 ≥ MIN_ELEMENTS: the first layer's weight goes through the fused kernels
    return nn.Sequential(nn.Linear(96, 512), nn.Tanh(), nn.Dropout(0.1), nn.Linear(512, 3)).double()


def _train(compile: bool | None, steps: int = 3):
    from attribution import InRunShapley

    model = _big_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    xv, yv = torch.randn(6, 96, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
    tracker = None
    if compile is not None:
        tracker = InRunShapley(model, opt, nn.functional.cross_entropy, (xv, yv), compile=compile, route="linear", record_steps=True)
    torch.manual_seed(2)
    for s in range(steps):
        x, y = torch.randn(8, 96, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        if tracker is None:
            nn.functional.cross_entropy(model(x), y).backward()
        else:
            with tracker.batch(list(range(8 * s, 8 * s + 8))):
                nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, tracker, torch.get_rng_state()


def test_tracker_values_with_and_without_compile_agree_and_training_is_untouched():
    plain_model, plain_opt, _, plain_rng = _train(None)
    runs = {flag: _train(flag) for flag in (True, False)}
    assert runs[True][2].compile and not runs[False][2].compile
    compiled_before = adam._CHORD_SHIFT._compiled
    assert compiled_before is not None and adam._CHORD_SHIFT.broken is None  # the fused shift ran
    fused, eager = runs[True][2].history(), runs[False][2].history()
    cols = [c for c in fused.columns if c.startswith("value")]
    assert cols and (fused[cols] - eager[cols]).abs().to_numpy().max() <= 1e-12 * eager[cols].abs().to_numpy().max()
    for model, opt, _, rng in runs.values():
        assert torch.equal(rng, plain_rng)
        for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
            assert torch.equal(p, q)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key], plain_opt.state[q][key])


@given(
    kind=st.sampled_from(["adam", "adamw"]),
    steps=st.integers(0, 3),
    weight_decay=st.sampled_from([0.0, 0.1]),
    amsgrad=st.booleans(),
    scale=st.sampled_from([0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_the_shift_on_rows_equals_the_shift_with_the_whole_tables_slope(kind, steps, weight_decay, amsgrad, scale, seed):
    """Δ(0) + s J ⊙ g from J on a few rows (fused Δ(0), eager, and the base class's form) = the dense chord shift."""
    w, opt, g = _stepped(kind, steps, seed, lr=1e-2, weight_decay=weight_decay, amsgrad=amsgrad)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(SHAPE[0], generator=gen)[: SHAPE[0] // 5].sort().values
    g_rows = torch.zeros_like(g).index_copy_(0, rows, g.index_select(0, rows))  # a gradient on those rows only
    w.grad = g_rows.clone()
    lin = optimizers.linearize(opt)
    J = lin.preconditioner_on_rows(w, g_rows, "secant", rows)
    assert isinstance(J, optimizers.RowDiagonal) and J.values.shape == (len(rows), SHAPE[1])
    dense = lin.chord_shift(w, J.diagonal, g_rows, scale)
    with fused_kernels(False):
        eager = lin.chord_shift_on_rows(w, J, g_rows, scale)
    with fused_kernels():
        fused = lin.chord_shift_on_rows(w, J, g_rows, scale)
    base = optimizers.OptimizerLinearization.chord_shift_on_rows(lin, w, J, g_rows, scale)
    for out in (eager, fused, base):
        assert out.shape == SHAPE and _rel(out, dense) < 1e-12
    if steps and not amsgrad and (weight_decay == 0 or kind == "adamw"):
        assert adam._ZERO_SHIFT._compiled is not None and adam._ZERO_SHIFT.broken is None  # the fused Δ(0) ran
    if scale == 1.0:
        assert _rel(fused, lin.update(w, g_rows)) < 1e-10  # the chord's end is the real update

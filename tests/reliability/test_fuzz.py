"""Fuzzing (issue 10): random small architectures, parameter groups and optimizers against the oracle.

Each example draws (see ``_fuzz_models.py``) a random stack of the supported layers (Embedding at
the input, Conv1d/Conv2d with random kernel/stride/padding/dilation/groups/padding mode, Linear
with or without bias, LayerNorm with or without affine/bias over one or two axes, RMSNorm,
GroupNorm, transformers' Conv1D and LlamaRMSNorm/DeepseekV4RMSNorm where installed, residual
blocks, activations), optional sequence axes, a random head (regression, classes,
per-token logits, tied to the embedding) and loss reduction (mean/sum), float64 throughout; 1-3
parameter groups with different hyper-parameters, some parameters frozen, and a registered
optimizer (SGD plain/momentum/Nesterov, Adam, AdamW, AMSGrad, RMSprop, Adagrad; ``maximize`` and
``foreach`` drawn too) warmed up by 0-3 real steps. Checked:

1. ``step_values(estimator="ghost")`` equals ``estimator="materialized"`` (rtol 1e-8) and an
   independent oracle: torch.func per-sample gradients (``validation.per_sample_grads``), the
   validation gradient at the validation point reached by the REAL optimizer's step (a copy), and
   the linearization's J; for every linearization (tangent/secant/sgd) and val_point
   (current/lookahead/midpoint);
2. the ghost engine's per-sample contributions: ``captured_grads`` equals ``param.grad`` and Σ_z c_z
   of the oracle; ``values`` on every path (auto/dense/pairwise/factored/materialized) with 1-2
   micro-batches equals −⟨J ⊙ G_k, c_z⟩ with the oracle's c_z, for the real validation gradients
   and (dense/materialized) for random directions G_k, which pins every per-sample gradient;
3. efficiency of the secant, as ``tests/estimators/test_first_order.py`` states it:
   Σ_z φ_z = −⟨∇L_val(θ*), Δ(g_B) − Δ(0)⟩ with Δ from the linearization, and the same with Δ
   from the real ``optimizer.step()`` (looser: θ' − θ rounds);
4. no mutation: parameters, ``.grad`` (stale gradients included) and the optimizer state are
   bit-for-bit unchanged by ``step_values``; and ``InRunShapley`` over two real steps equals the
   sum of ``step_values`` on a twin, without changing the training trajectory.

Profiles. The number of examples per test is ``FUZZ_EXAMPLES`` if set, otherwise a fraction of
the active Hypothesis profile's ``max_examples`` (``dev`` 25, ``ci`` 40 derandomised: the whole file
runs in well under a minute on two cores). The long run, on demand::

    FUZZ_EXAMPLES=500 python -m pytest tests/reliability/test_fuzz.py --hypothesis-profile=nightly -q

(``HYPOTHESIS_PROFILE=nightly`` works as well). ``FUZZ_REPORT=1`` prints the worst relative error
of every check at the end of the module.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from torch import nn

import estimators as E
import optimizers
import validation
from attribution import InRunShapley, step_values
from tests._helpers import assert_close, one_torch_thread, rank_one_slope  # noqa: F401  (autouse fixture)

from ._fuzz_models import DT, HF_CONV1D, ArchSpec, FuzzCase, assemble, fuzz_cases


def _examples() -> int:
    if os.environ.get("FUZZ_EXAMPLES"):
        return max(1, int(os.environ["FUZZ_EXAMPLES"]))
    return settings.default.max_examples


FUZZ = settings(
    max_examples=_examples(),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

#: Gradients below this are compared on this scale (atol 1e-13 with atol_rel 1e-10): float64 with
#: O(1) data, but a LayerNorm over one feature turns the rounding of x − μ into x̂ ≈ 1e-17/√eps.
GRAD_FLOOR = 1e-3

#: Worst relative error max|a − e| / max|e| seen per check (inspected by long runs, FUZZ_REPORT=1).
WORST: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if os.environ.get("FUZZ_REPORT"):
        print("\nworst relative errors (max|a-e| / max|e|):")
        for name, err in sorted(WORST.items()):
            print(f"  {name:40s} {err:.3e}")


def check(actual, expected, *, rtol: float, atol_rel: float, name: str, scale=None, min_scale: float = 0.0) -> None:
    """assert_close with atol = atol_rel · scale (default max|expected|), recording the worst error.

    ``min_scale`` floors the scale where the expected value may be zero in exact arithmetic and
    rounding noise in practice (a LayerNorm over one feature has a zero weight gradient).
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    scale = max(float(expected.abs().max()) if scale is None else float(scale), min_scale)
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
    WORST[name] = max(WORST.get(name, 0.0), rel)
    assert_close(actual, expected, rtol=rtol, atol=atol_rel * scale + 1e-300, name=name)


# ---------------------------------------------------------------------------------- the oracle
def _twin(case: FuzzCase):
    """Deep copies of (model, optimizer): the optimizer holds the copy's parameters and state."""
    return copy.deepcopy((case.model, case.optimizer))


def _batch_grads(case: FuzzCase) -> dict[str, torch.Tensor]:
    """g_B by name from an ordinary backward on a copy."""
    model = copy.deepcopy(case.model)
    model.zero_grad(set_to_none=True)
    x, y = case.batch
    case.loss_fn(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _real_update(case: FuzzCase, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Δ(g) by name: the change the REAL optimizer (a copy, same state) makes when param.grad = g."""
    model, opt = _twin(case)
    for n, p in model.named_parameters():
        p.grad = grads[n].clone() if n in grads else None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if n in grads}


def _val_point_shift(case: FuzzCase, g_B: dict[str, torch.Tensor], val_point: str) -> dict[str, torch.Tensor]:
    if val_point == "current":
        return {}
    full = _real_update(case, g_B)
    if val_point == "lookahead":
        return full
    zero = _real_update(case, {n: torch.zeros_like(g) for n, g in g_B.items()})
    return {n: 0.5 * (full[n] + zero[n]) for n in full}


def _val_grads_at(case: FuzzCase, shift: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """∇L_val^k by name at θ + shift (plain autograd on a shifted copy)."""
    model = copy.deepcopy(case.model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in shift:
                p.add_(shift[n])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = []
    for x, y in case.val_batches:
        grads = torch.autograd.grad(case.loss_fn(model(x), y), [p for _, p in named], allow_unused=True)
        out.append({n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)})
    return out


def _slopes(case: FuzzCase, linearization: str) -> dict[str, torch.Tensor | float]:
    """J by name from the optimizer's linearization (certified by tests/optimizers) at g_B."""
    model, opt = _twin(case)
    model.zero_grad(set_to_none=True)
    x, y = case.batch
    case.loss_fn(model(x), y).backward()
    lin = optimizers.linearize(opt)
    names = {p: n for n, p in model.named_parameters()}
    if linearization == "sgd":
        return {names[p]: -float(lin.learning_rate(p)) for p in lin.params}
    if lin.structure != "elementwise":
        return {names[p]: _dense_jacobian(lin, p, linearization) for p in lin.params}
    if linearization == "tangent":
        return {names[p]: lin.tangent(p, p.grad) for p in lin.params}
    return {names[p]: lin.secant(p, p.grad) for p in lin.params}


def _secant_jumps(case: FuzzCase, linearization: str) -> bool:
    """Whether the step's secant is refused because the update jumps at g = 0 (Adafactor's first step).

    Only operator rules take the secant by quadrature; for them a first step with empty state is
    scale-invariant in g (Δ(s g) = Δ(g)), and the values would miss the jump (UpdateJumpError).
    """
    if linearization != "secant":
        return False
    model, opt = _twin(case)
    model.zero_grad(set_to_none=True)
    x, y = case.batch
    case.loss_fn(model(x), y).backward()
    lin = optimizers.linearize(opt)
    try:
        for p in lin.params:
            lin.preconditioner(p, p.grad, "secant")
    except optimizers.UpdateJumpError:
        return True
    return False


class _Matrix:
    """A non-elementwise J as a dense matrix on the flattened parameter (the oracle of operator rules)."""

    def __init__(self, M: torch.Tensor, terms: float = 0.0):
        self.M = M
        #: the size of the terms whose cancellation gives J (about ‖Δ‖/|g| per entry): a
        #: scale-invariant update (Adafactor's first step on a one-column weight is sign(g)) has
        #: J = 0 exactly, while a VJP returns the eps-level remainder of 1/|g| − g²/|g|³.
        self.terms = terms

    def apply(self, G: torch.Tensor) -> torch.Tensor:
        return (self.M.T @ G.reshape(-1)).reshape(G.shape)

    def abs_apply(self, G: torch.Tensor) -> torch.Tensor:
        return (self.M.abs().T @ G.reshape(-1).abs() + self.terms * float(G.abs().sum())).reshape(G.shape)


def _dense_jacobian(lin, p, linearization: str) -> _Matrix:
    """∂Δ/∂g of an operator rule as a dense matrix, by torch.autograd.functional.jacobian of update().

    The secant is ∫₀¹ J(s g_B) ds by a 48-point Gauss–Legendre rule over dense Jacobians: independent of
    the library's VJP quadrature and its node refinement (the fuzz models' parameters are small).
    """
    g = p.grad.detach()
    theta, state, rule = p.detach(), lin.state(p), type(lin).update_rule  # (lin.update detaches its input)

    def jac(x):
        return torch.autograd.functional.jacobian(lambda y: rule(theta, y, state), x).reshape(p.numel(), p.numel())

    step = float(lin.update(p, g).norm()) + float(lin.update(p, torch.zeros_like(g)).norm())
    terms = step / max(float(g.abs().min()), float(g.norm()) * 1e-6, 1e-300)
    if linearization == "tangent":
        return _Matrix(jac(g), terms)
    s, w = optimizers.gauss_legendre(48)
    return _Matrix(sum(float(wi) * jac(float(si) * g) for si, wi in zip(s, w)), terms)


def _phi(c: dict[str, torch.Tensor], J: dict, val_grads: list[dict[str, torch.Tensor]], *, mass: bool = False) -> torch.Tensor:
    """φ[z, k] = −Σ_p ⟨J_p ⊙ G_k[p], c_z[p]⟩ by plain tensor algebra.

    ``mass=True``: Σ_p Σ_i |c_z,i J_i G_k,i| instead, the scale of the rounding error of any way
    of summing those products (a value that cancels to ~0 is only known to that scale).
    """
    n = next(iter(c.values())).shape[0]
    out = torch.zeros(n, len(val_grads), dtype=DT)
    for k, G in enumerate(val_grads):
        for name, cz in c.items():
            Jn = J[name]
            if isinstance(Jn, _Matrix):
                P = Jn.abs_apply(G[name]) if mass else Jn.apply(G[name])
                terms = (cz.abs() * P if mass else cz * P).reshape(n, -1)
            else:
                terms = (cz * (Jn * G[name])).reshape(n, -1)
            out[:, k] += terms.abs().sum(1) if mass else -terms.sum(1)
    return out


def oracle_mass(case: FuzzCase, linearization: str, val_point: str) -> float:
    """max over z, k of Σ |c_z J G_k| (see :func:`_phi`): the scale for comparing two summation orders."""
    c = validation.per_sample_grads(case.model, case.loss_fn, case.batch)
    J = _slopes(case, linearization)
    val_grads = _val_grads_at(case, _val_point_shift(case, _batch_grads(case), val_point))
    return float(_phi({n: c[n] for n in J}, J, val_grads, mass=True).max())


def oracle_values(case: FuzzCase, linearization: str, val_point: str) -> torch.Tensor:
    c = validation.per_sample_grads(case.model, case.loss_fn, case.batch)
    g_B = _batch_grads(case)
    scale = max(float(g_B[n].abs().max()) for n in c) + 1e-300
    for n in c:
        check(c[n].sum(0), g_B[n], rtol=1e-9, atol_rel=1e-10, name="oracle Σ_z c_z = g_B", scale=scale, min_scale=GRAD_FLOOR)
    J = _slopes(case, linearization)
    val_grads = _val_grads_at(case, _val_point_shift(case, g_B, val_point))
    return _phi({n: c[n] for n in J}, J, val_grads)


# ---------------------------------------------------------------------------------- mutation
def _snapshot(case: FuzzCase):
    params = [p.detach().clone() for p in case.model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in case.model.parameters()]
    return params, grads, copy.deepcopy(case.optimizer.state_dict())


def _assert_unchanged(case: FuzzCase, snap) -> None:
    params, grads, state = snap
    for (name, p), before, g in zip(case.model.named_parameters(), params, grads):
        assert torch.equal(p.detach(), before), f"parameter {name} changed"
        if g is None:
            assert p.grad is None, f"{name}.grad was None and is now set"
        else:
            assert p.grad is not None and torch.equal(p.grad, g), f"{name}.grad changed"
    after = case.optimizer.state_dict()
    assert after["param_groups"] == state["param_groups"]
    assert after["state"].keys() == state["state"].keys()
    for k, st_ in state["state"].items():
        assert after["state"][k].keys() == st_.keys()
        for key, v in st_.items():
            assert torch.equal(torch.as_tensor(after["state"][k][key]), torch.as_tensor(v)), f"state[{k}][{key!r}] changed"


def _events(case: FuzzCase) -> None:
    """Label the example for ``--hypothesis-show-statistics`` (how often each kind was drawn)."""
    event(f"input={case.spec.input[0]}")
    event(f"optimizer={case.optimizer_kind}")
    event(f"groups={len(case.optimizer.param_groups)}")
    event(f"frozen={any(not p.requires_grad for p in case.model.parameters())}")


def _as_2d(phi: torch.Tensor) -> torch.Tensor:
    return phi if phi.dim() == 2 else phi[:, None]


def _val_arg(case: FuzzCase, as_tuple: bool):
    return case.val_batches[0] if as_tuple and len(case.val_batches) == 1 else list(case.val_batches)


# ---------------------------------------------------------------------------------- pinned cases
# Built fresh for every @example (tests mutate their case). Cover what STYLE.md asks every suite to
# include: batch of one, step 1 (Adam's v == 0), eps-dominated v, a sequence axis, several targets.
def step_one_adam() -> FuzzCase:
    """Batch of one, step 1, eps-dominated group, sequence axis, K = 2, two groups."""
    spec = ArchSpec(("sequence", (3,), 2), (("linear", 3, True), ("act", "tanh"), ("layernorm", 1, True, True),
                    ("rmsnorm", 1, None, True)), False, ("regress", 2, True), "mean")
    return assemble(spec, 0, "adam", [([0, 1], {"lr": 1e-2, "eps": 1e-3}),
                                      ([2, 3, 4, 5, 6], {"lr": 5e-2, "betas": (0.5, 0.99), "weight_decay": 0.1})],
                    n=1, val_sizes=(2, 3))


def layernorm_over_one_feature() -> FuzzCase:
    """The only trainable parameter has a zero gradient in exact arithmetic (x̂ ≡ 0): rounding noise."""
    spec = ArchSpec(("vector", 1), (("linear", 1, False), ("layernorm", 1, True, False)), False, ("regress", 1, False), "mean")
    return assemble(spec, 0, "sgd", [([0, 1, 2], {"lr": 1e-3, "maximize": True})], frozen=(0, 2), n=1, val_sizes=(1,),
                    degenerate_ok=True)


def grouped_conv_to_sequence() -> FuzzCase:
    """Conv2d with groups, stride, circular padding, LayerNorm over (H, W), read as a sequence, pooled."""
    conv = ("conv2d", 2, 4, 3, 2, 1, 1, 2, True, "circular")
    spec = ArchSpec(("conv", True, 2, 5, ((conv, "gelu"),), True, ("layernorm", 2)), (("linear", 3, True),), True,
                    ("classify", 3, True), "sum")
    return assemble(spec, 1, "rmsprop", [([0, 1, 2], {"lr": 1e-2, "centered": True, "momentum": 0.5}),
                                         ([3, 4, 5, 6, 7], {"lr": 1e-3, "weight_decay": 0.1})],
                    frozen=(4,), n=4, warm_sizes=(3, 2), val_sizes=(2, 1))


def tied_tokens() -> FuzzCase:
    """Embedding with padding_idx, a residual block, the head tied to the embedding, SGD Nesterov."""
    spec = ArchSpec(("tokens", 3, 5, 3, 0), (("residual", "silu", True),), False, ("tied",), "mean")
    return assemble(spec, 2, "sgd-nesterov", [([0], {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
                                              ([1, 2], {"lr": 1e-2, "momentum": 0.5, "nesterov": True, "weight_decay": 1e-2})],
                    n=5, warm_sizes=(4,), val_sizes=(3,))


def new_layers() -> FuzzCase:
    """GroupNorm over a sequence read channels-first, and (with transformers) Conv1D and LlamaRMSNorm, Adam."""
    hf = (("conv1d_hf", 3), ("hf_rmsnorm", "llama")) if HF_CONV1D is not None else ()
    spec = ArchSpec(("sequence", (3,), 4), (("groupnorm", 2, True), *hf, ("act", "tanh")), False, ("regress", 2, True), "mean")
    params = list(range(7 if hf else 4))
    return assemble(spec, 3, "adam", [(params, {"lr": 1e-2})], n=3, warm_sizes=(2,), val_sizes=(2,))


LINEARIZATIONS = st.sampled_from(["tangent", "secant", "sgd"])
VAL_POINTS = st.sampled_from(["current", "lookahead", "midpoint"])


# ---------------------------------------------------------------------------------- 1 + 4
@FUZZ
@given(case=fuzz_cases(), linearization=LINEARIZATIONS, val_point=VAL_POINTS, as_tuple=st.booleans(), stale=st.booleans())
@example(case=step_one_adam(), linearization="tangent", val_point="lookahead", as_tuple=False, stale=True)
@example(case=step_one_adam(), linearization="secant", val_point="midpoint", as_tuple=False, stale=False)
@example(case=grouped_conv_to_sequence(), linearization="secant", val_point="midpoint", as_tuple=False, stale=True)
@example(case=tied_tokens(), linearization="sgd", val_point="lookahead", as_tuple=True, stale=False)
@example(case=new_layers(), linearization="tangent", val_point="midpoint", as_tuple=False, stale=False)
def test_step_values_ghost_equals_materialized_and_the_oracle(case, linearization, val_point, as_tuple, stale):
    _events(case)
    if _secant_jumps(case, linearization):  # refused, never a value that misses the jump
        with pytest.raises(optimizers.UpdateJumpError, match="jumps at g = 0"):
            step_values(case.model, case.optimizer, case.loss_fn, case.batch, list(case.val_batches), linearization="secant")
        return
    if stale:  # stale gradients on part of the parameters must survive untouched
        x, y = case.make_batch(2, case.generator)
        case.loss_fn(case.model(x), y).backward()
    snap = _snapshot(case)
    kw = dict(linearization=linearization, val_point=val_point)
    val = _val_arg(case, as_tuple)
    ghost = step_values(case.model, case.optimizer, case.loss_fn, case.batch, val, estimator="ghost", **kw)
    _assert_unchanged(case, snap)
    mat = step_values(case.model, case.optimizer, case.loss_fn, case.batch, val, estimator="materialized", **kw)
    _assert_unchanged(case, snap)
    factored = step_values(case.model, case.optimizer, case.loss_fn, case.batch, val, estimator="ghost-factored", **kw)
    _assert_unchanged(case, snap)

    n, K = case.batch[0].shape[0], len(case.val_batches)
    expected_shape = (n,) if as_tuple and K == 1 else (n, K)
    for phi in (ghost, mat, factored):
        assert phi.shape == expected_shape and phi.dtype == torch.float64
        assert torch.isfinite(phi).all()
    # Values that cancel (a RMSNorm over one feature has a rounding-level gradient) are compared
    # on the scale of their summands, not of their result.
    mass = oracle_mass(case, linearization, val_point)
    check(ghost, mat, rtol=1e-8, atol_rel=1e-12, scale=max(mass, float(mat.abs().max())), name=f"ghost vs materialized [{linearization}]")
    ref = oracle_values(case, linearization, val_point)
    scale = max(mass, float(ref.abs().max()))
    check(_as_2d(ghost), ref, rtol=1e-8, atol_rel=1e-11, scale=scale, name=f"ghost vs oracle [{linearization},{val_point}]")
    check(_as_2d(mat), ref, rtol=1e-8, atol_rel=1e-11, scale=scale, name=f"materialized vs oracle [{linearization}]")
    if linearization == "sgd" or case.optimizer_kind.startswith("sgd"):
        # J is one number per parameter, exactly rank one: the factored path is exact too.
        check(factored, mat, rtol=1e-8, atol_rel=1e-11, scale=scale, name="ghost-factored vs materialized [scalar J]")


# ---------------------------------------------------------------------------------- 2
def _make_J(case: FuzzCase, model, opt, path: str, g: torch.Generator) -> dict:
    """J per parameter of the twin ``model`` suited to ``path``.

    pairwise: the SGD proxy, one float per parameter (−lr of its group; groups differ);
    factored: an exactly rank-one J (so the factored path is exact); otherwise the optimizer's
    real tangent (elementwise).
    """
    lin = optimizers.linearize(opt)
    if path == "pairwise":
        return {p: -float(lin.learning_rate(p)) for p in lin.params}
    if path == "factored":
        return {p: rank_one_slope(p.shape, g, DT) for p in lin.params}
    if lin.structure != "elementwise":  # the engine applies the VJP; the oracle takes a dense Jacobian
        return {p: lin.preconditioner(p, p.grad, "tangent") for p in lin.params}
    return {p: lin.tangent(p, p.grad) for p in lin.params}


@FUZZ
@given(case=fuzz_cases(), path=st.sampled_from(["auto", "dense", "pairwise", "factored", "materialized"]), split=st.integers(0, 5))
@example(case=layernorm_over_one_feature(), path="dense", split=0)
@example(case=step_one_adam(), path="materialized", split=0)
@example(case=grouped_conv_to_sequence(), path="pairwise", split=1)
@example(case=tied_tokens(), path="factored", split=2)
@example(case=new_layers(), path="factored", split=1)
def test_engine_per_sample_contributions_equal_torch_func(case, path, split):
    _events(case)
    model, opt = _twin(case)
    model.zero_grad(set_to_none=True)
    x, y = case.batch
    n = x.shape[0]
    cut = 1 + split % n if n > 1 and split else n  # 1 or 2 micro-batches
    micro = [(x[:cut], y[:cut])] + ([(x[cut:], y[cut:])] if cut < n else [])
    engine = E.GhostEngine(model, path=path)
    with engine.capture_train():
        for mx, my in micro:
            case.loss_fn(model(mx), my).backward()
    names = {p: nm for nm, p in model.named_parameters()}
    trained = [p for p in model.parameters() if p.grad is not None]
    cs = [validation.per_sample_grads(model, case.loss_fn, mb) for mb in micro]

    # Σ_z c_z three ways: the hooks, param.grad, the oracle.
    rebuilt = engine.captured_grads()[0]
    assert set(rebuilt) == set(trained)
    # One scale for every parameter: a gradient that is zero in exact arithmetic (LayerNorm over
    # one feature) is rounding noise in autograd and exactly 0 in the hooks.
    scale = max(float(p.grad.abs().max()) for p in trained) + 1e-300
    for p in trained:
        check(rebuilt[p], p.grad, rtol=1e-9, atol_rel=1e-10, name="captured_grads vs param.grad", scale=scale, min_scale=GRAD_FLOOR)
        check(sum(c[names[p]].sum(0) for c in cs), p.grad, rtol=1e-9, atol_rel=1e-10, name="oracle Σ_z c_z vs param.grad", scale=scale, min_scale=GRAD_FLOOR)
    # The library's own torch.func route (materialized estimator) against the oracle's.
    for mb, c in zip(micro, cs):
        lib = E.per_sample_grads(model, case.loss_fn, mb, reduction=case.spec.reduction)
        cscale = max(float(c[names[p]].abs().max()) for p in trained) + 1e-300
        for p in trained:
            check(lib[p], c[names[p]], rtol=1e-9, atol_rel=1e-10, name="estimators.per_sample_grads vs oracle",
                  scale=cscale, min_scale=GRAD_FLOOR)

    J = _make_J(case, model, opt, path, case.generator)
    opt_lin = optimizers.linearize(opt)
    val_grads = E.validation_gradients(model, case.loss_fn, list(case.val_batches), engine=engine)
    c_all = {names[p]: torch.cat([c[names[p]] for c in cs]) for p in trained}
    J_named = {names[p]: (_dense_jacobian(opt_lin, p, "tangent") if isinstance(j, optimizers.Operator) else j) for p, j in J.items()}
    phi = engine.values(J, val_grads)
    named_vg = [{names[p]: vg[p] for p in trained} for vg in val_grads]
    ref = _phi(c_all, J_named, named_vg)
    # Operator rules: the scale is the summands' mass (a J that cancels to 0, such as Adafactor's
    # sign-like first step, is known only to it); elementwise rules keep max|ref|.
    operator = any(isinstance(j, _Matrix) for j in J_named.values())
    mass = max(float(_phi(c_all, J_named, named_vg, mass=True).max()), float(ref.abs().max())) if operator else None
    check(phi, ref, rtol=1e-8, atol_rel=1e-11, scale=mass, name=f"engine.values[{path}] vs oracle")
    taken = set(engine.paths_taken.values())
    assert taken <= {"dense", "pairwise", "factored", "materialized", "fallback"}
    assert "fallback" not in taken, f"a supported layer took the fallback: {engine.paths_taken}"
    if path in ("dense", "materialized"):
        # Random directions G_k instead of validation gradients (as many as the captured targets):
        # a random projection of every c_z, so any per-sample error shows.
        G = [{p: torch.randn(p.shape, generator=case.generator, dtype=DT) for p in trained} for _ in val_grads]
        phi = engine.values(J, G)
        named_G = [{names[p]: g[p] for p in trained} for g in G]
        ref = _phi(c_all, J_named, named_G)
        mass = max(float(_phi(c_all, J_named, named_G, mass=True).max()), float(ref.abs().max())) if operator else None
        check(phi, ref, rtol=1e-8, atol_rel=1e-11, scale=mass, name=f"engine.values[{path}] random directions")


# ---------------------------------------------------------------------------------- 3
@FUZZ
@given(case=fuzz_cases(), val_point=VAL_POINTS, estimator=st.sampled_from(["ghost", "materialized"]))
@example(case=step_one_adam(), val_point="midpoint", estimator="ghost")
@example(case=grouped_conv_to_sequence(), val_point="lookahead", estimator="materialized")
def test_secant_values_sum_to_the_first_order_batch_effect(case, val_point, estimator):
    _events(case)
    assume(not _secant_jumps(case, "secant"))  # refused (see the test above)
    phi = _as_2d(step_values(case.model, case.optimizer, case.loss_fn, case.batch, list(case.val_batches),
                             linearization="secant", val_point=val_point, estimator=estimator))
    g_B = _batch_grads(case)
    val_grads = _val_grads_at(case, _val_point_shift(case, g_B, val_point))
    # Δ(g_B) − Δ(0) from the linearization (the definition used by tests/estimators/test_first_order.py)...
    model, opt = _twin(case)
    for nm, p in model.named_parameters():
        p.grad = g_B[nm].clone() if nm in g_B else None
    lin = optimizers.linearize(opt)
    names = {p: nm for nm, p in model.named_parameters()}
    step_lin = {names[p]: lin.update(p, p.grad) - lin.update(p, torch.zeros_like(p)) for p in lin.params}
    # ... and from the real optimizer step.
    full, zero = _real_update(case, g_B), _real_update(case, {nm: torch.zeros_like(g) for nm, g in g_B.items()})
    step_real = {nm: full[nm] - zero[nm] for nm in full}
    assert set(step_real) == set(step_lin)
    theta = dict(case.model.named_parameters())
    for k, vg in enumerate(val_grads):
        total = phi[:, k].sum()
        terms = [(vg[nm] * step_lin[nm]).reshape(-1) for nm in step_lin]
        expected = -sum(t.sum() for t in terms)
        # Rounding scales: the secant is a chord (Δ(g) − Δ(0)) ⊘ g, exact up to eps·(|Δ(g)| + |Δ(0)|)
        # per coordinate, and a real step's θ' − θ is rounded at the scale of θ.
        mass = sum(float(t.abs().sum()) for t in terms) + float(phi[:, k].abs().sum())
        chord = sum(float((vg[nm].abs() * (full[nm].abs() + zero[nm].abs())).sum()) for nm in step_real)
        # (min_scale: values and steps that are all zero up to rounding, e.g. a frozen-out layer)
        check(total, expected, rtol=1e-9, atol_rel=1e-11, scale=mass + chord, min_scale=1e-18,
              name="efficiency (linearization Δ)")
        expected_real = -sum((vg[nm] * step_real[nm]).sum() for nm in step_real)
        rounding = chord + sum(float((vg[nm].abs() * theta[nm].detach().abs()).sum()) for nm in step_real)
        check(total, expected_real, rtol=1e-9, atol_rel=1e-11, scale=mass + rounding, min_scale=1e-18,
              name="efficiency (real optimizer Δ)")


# ---------------------------------------------------------------------------------- 4 (tracker)
@FUZZ
@given(case=fuzz_cases(), linearization=LINEARIZATIONS, val_point=VAL_POINTS)
@example(case=tied_tokens(), linearization="secant", val_point="midpoint")
def test_tracker_totals_equal_step_values_on_a_twin(case, linearization, val_point):
    _events(case)
    assume(not _secant_jumps(case, linearization))
    twin_model, twin_opt = _twin(case)
    kw = dict(linearization=linearization, val_point=val_point)
    val = list(case.val_batches)
    n = case.batch[0].shape[0]
    batches = [case.batch, case.make_batch(n, case.generator)]
    expected = torch.zeros(n, len(val), dtype=DT)
    for step, b in enumerate(batches):
        # The tracker's default route="auto" (the exact-update game where the update is far from
        # linear), its orders seeded by the step index.
        expected += _as_2d(step_values(twin_model, twin_opt, case.loss_fn, b, val, route="auto", seed=step, **kw))
        twin_opt.zero_grad()
        case.loss_fn(twin_model(b[0]), b[1]).backward()
        twin_opt.step()
    with InRunShapley(case.model, case.optimizer, case.loss_fn, val, **kw) as tracker:
        for b in batches:
            case.optimizer.zero_grad()
            with tracker.batch(list(range(n))):  # the same ids in both steps: totals add up
                case.loss_fn(case.model(b[0]), b[1]).backward()
            case.optimizer.step()
        frame = tracker.values()
    assert list(frame.index) == list(range(n)) and (frame["steps_seen"] == 2).all()
    columns = ["value"] if len(val) == 1 else [f"value_{k}" for k in range(len(val))]
    got = torch.tensor(frame[columns].to_numpy(), dtype=DT)
    check(got, expected, rtol=1e-9, atol_rel=1e-12, name="tracker vs Σ step_values")
    for (nm, p), q in zip(case.model.named_parameters(), twin_model.parameters()):
        assert torch.equal(p.detach(), q.detach()), f"the tracker changed the training trajectory of {nm}"


# ---------------------------------------------------------------------------------- 5 (streaming)
@FUZZ
@given(case=fuzz_cases(), linearization=LINEARIZATIONS, estimator=st.sampled_from(["ghost", "ghost-factored"]))
@example(case=tied_tokens(), linearization="secant", estimator="ghost")
@example(case=step_one_adam(), linearization="tangent", estimator="ghost-factored")
def test_streamed_contraction_equals_contraction_after_the_backward(case, linearization, estimator):
    """``InRunShapley(stream=True)`` (J and the contraction inside the backward) = ``stream=False``."""
    _events(case)
    assume(not _secant_jumps(case, linearization))
    twin_model, twin_opt = _twin(case)
    # route="linear": streaming cannot switch to the exact-update route (it releases the factors).
    kw = dict(linearization=linearization, val_point="current", estimator=estimator, route="linear")
    val = list(case.val_batches)
    n = case.batch[0].shape[0]
    batches = [case.batch, case.make_batch(n, case.generator)]
    totals = []
    for model, opt, stream in ((twin_model, twin_opt, False), (case.model, case.optimizer, True)):
        with InRunShapley(model, opt, case.loss_fn, val, **kw, stream=stream, record_steps=True) as tracker:
            for b in batches:
                opt.zero_grad()
                with tracker.batch(list(range(n))):
                    case.loss_fn(model(b[0]), b[1]).backward()
                if stream:  # every layer a rule covers released its captured tensors in the backward
                    engine = tracker._computer.engine
                    covered = [c for pas in engine._train for c in pas.calls if c.grad is not None
                               and engine._tracked[c.module].rule is not None and not engine._tracked[c.module].uncovered
                               and all(p.grad is not None for p in engine._tracked[c.module].covered.values())]
                    assert all(c.streamed and c.args == () for c in covered)
                opt.step()
            totals.append(tracker.history())
    expected, got = (torch.tensor(h.filter(like="value").to_numpy(), dtype=DT) for h in totals)
    check(got, expected, rtol=1e-9, atol_rel=1e-12, name="streamed vs after-backward")
    for (nm, p), q in zip(case.model.named_parameters(), twin_model.parameters()):
        assert torch.equal(p.detach(), q.detach()), f"streaming changed the training trajectory of {nm}"


# ---------------------------------------------------------------------------------- found by fuzzing
@pytest.mark.parametrize("stream", [False, True])
def test_trainable_parameter_outside_the_optimizer_contributes_nothing(stream):
    """A parameter with requires_grad=True that no param group holds does not move: J = 0 (was an error)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = torch.optim.Adam(model[2].parameters(), lr=0.1)  # model[0] is trainable but never stepped
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    # Streaming cannot take the exact-update route that Adam's first step gets by default.
    kw = dict(linearization="secant", val_point="current", route="linear" if stream else "auto")
    frozen_model, frozen_opt = copy.deepcopy((model, opt))
    frozen_model[0].requires_grad_(False)  # the same step with the unused parameter frozen
    ref = step_values(frozen_model, frozen_opt, nn.functional.mse_loss, (x, y), (x[:2], y[:2]), **kw)
    phi = step_values(model, opt, nn.functional.mse_loss, (x, y), (x[:2], y[:2]), **kw)
    with InRunShapley(model, opt, nn.functional.mse_loss, (x[:2], y[:2]), **kw, stream=stream, record_steps=True) as tracker:
        with tracker.batch(list(range(5))):
            nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert_close(phi, ref, rtol=1e-12)
    assert_close(torch.tensor(tracker.history()["value"].to_numpy()), ref, rtol=1e-12)
    assert float(ref.abs().max()) > 1e-6


# ---------------------------------------------------------------------------------- completeness
@FUZZ
@given(case=fuzz_cases(), scale=st.floats(0.01, 10.0), edit=st.floats(0.5, 2.0), which=st.integers(0, 50))
@example(case=step_one_adam(), scale=0.05, edit=1.0, which=0)
def test_completeness_identity_values_uniform_rescales_and_refuses_edits(case, scale, edit, which):
    """Σ_z φ_z = −Σ_p ⟨J(param.grad) ⊙ ∇L_val, param.grad⟩ for any uniform rescale c of the captured
    gradient, c is recovered exactly, and a non-uniform edit of one parameter's gradient is refused."""
    from attribution._config import AttributionConfig
    from attribution._step import StepComputer

    _events(case)
    assume(not _secant_jumps(case, "secant"))
    model, opt = case.model, case.optimizer
    computer = StepComputer(model, case.loss_fn, case.val_batches, AttributionConfig("secant", "current", "ghost"))
    for p in model.parameters():
        p.grad = None
    x, y = case.batch
    with computer.capture():
        case.loss_fn(model(x), y).backward()
    stepped = [p for grp in opt.param_groups for p in grp["params"] if p.grad is not None]
    with torch.no_grad():
        for p in stepped:
            p.grad.mul_(scale)
    phi = computer.step_values(opt)
    lin = optimizers.linearize(opt)
    G = E.validation_gradients(model, case.loss_fn, case.val_batches, params=stepped)
    Js = {p: lin.preconditioner(p, p.grad, "secant") for p in stepped}
    terms = torch.tensor([[float((Js[p].apply(G[k][p]) * p.grad).sum()) for k in range(len(G))] for p in stepped], dtype=DT)
    expected = -terms.sum(0)
    mass = float(terms.abs().sum()) + 1e-300
    assert_close(phi.sum(0), expected, rtol=0, atol=1e-9 * mass, name="Σ_z φ_z vs −⟨P, param.grad⟩")
    if mass > 1e-200:
        # c comes from the median entry's ratio: exact up to that entry's rounding.
        assert computer.grad_scale == pytest.approx(scale, rel=1e-6) or abs(scale - 1.0) < 1e-9
    # A non-uniform edit of one parameter is refused when it and some other parameter both carry a
    # non-negligible share of the step (if only one does, the edit is a uniform rescale of all
    # that matters, and the values of the edited step are exact).
    shares = terms.abs().sum(1)
    target = int(which) % len(stepped)
    big = shares > 1e-3 * float(shares.sum())
    if abs(edit - 1.0) > 0.05 and bool(big[target]) and int(big.sum()) >= 2:
        with torch.no_grad():
            stepped[target].grad.mul_(edit)
        with pytest.raises(E.IncompleteGradientError):
            computer.step_values(opt)
    computer.reset()

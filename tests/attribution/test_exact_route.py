"""The exact-update route: values of Ū(S) = −⟨∇L_val, Δ(g_S)⟩ with the real update, and the tracker's automatic switch.

The oracle here takes every coalition's update from the REAL torch optimizer (a deep copy of the
model and optimizer, ``.grad`` set to the coalition's gradient, ``step()``), with per-sample
gradients from ``validation.per_sample_grads`` (torch.func, no hooks), and enumerates all
coalitions for exact Shapley values; nothing of it uses the linearizations.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import estimators
import optimizers
import validation
from attribution import InRunShapley, step_values
from attribution._tracker import PoorLinearizationWarning
from tests._helpers import assert_close

LOSS = nn.functional.cross_entropy
GEN = torch.Generator().manual_seed(0)
X = torch.randn(48, 5, generator=GEN, dtype=torch.float64)
Y = torch.randint(0, 3, (48,), generator=GEN)
VAL = (X[40:], Y[40:])

OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-1),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _warm(model, opt, steps: int) -> None:
    for s in range(steps):
        idx = torch.arange(8 * s, 8 * s + 8) % 40
        opt.zero_grad()
        LOSS(model(X[idx]), Y[idx]).backward()
        opt.step()
    opt.zero_grad()


def _real_game_oracle(model, opt, batch, val_point: str = "current"):
    """(exact Shapley values, leave-one-out marginals) of Ū(S) = −⟨v, Δ_real(g_S)⟩ by enumeration."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    c = validation.per_sample_grads(model, LOSS, batch)
    n = batch[0].shape[0]

    def real_update(mask) -> dict[str, torch.Tensor]:
        m, o = copy.deepcopy((model, opt))
        params = dict(m.named_parameters())
        for name in names:
            params[name].grad = (c[name] * mask.to(c[name].dtype).view(-1, *[1] * (c[name].dim() - 1))).sum(0)
        before = {k: params[k].detach().clone() for k in names}
        o.step()
        return {k: params[k].detach() - before[k] for k in names}

    empty, full = real_update(torch.zeros(n, dtype=torch.bool)), real_update(torch.ones(n, dtype=torch.bool))
    shift = None if val_point == "current" else {k: 0.5 * (empty[k] + full[k]) for k in names}
    m = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in m.named_parameters():
            if shift is not None and k in shift:
                p.add_(shift[k])
    v = dict(zip(names, torch.autograd.grad(LOSS(m(VAL[0]), VAL[1]), [dict(m.named_parameters())[k] for k in names])))
    cache = {}

    def U(S) -> float:
        if S not in cache:
            mask = torch.zeros(n, dtype=torch.bool)
            mask[list(S)] = True
            d = real_update(mask)
            cache[S] = -sum(float((v[k] * d[k]).sum()) for k in names)
        return cache[S]

    full_set = tuple(range(n))
    phi = torch.zeros(n, dtype=torch.float64)
    for z in range(n):
        others = [j for j in range(n) if j != z]
        for k in range(n):
            w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for S in itertools.combinations(others, k):
                phi[z] += w * (U(tuple(sorted(S + (z,)))) - U(S))
    loo = torch.tensor([U(full_set) - U(tuple(j for j in range(n) if j != z)) for z in range(n)], dtype=torch.float64)
    return phi, loo, U(full_set) - U(())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("warm", [0, 2])
def test_exact_route_equals_the_real_optimizers_game(name, warm):
    """Shapley values within a few standard errors of exact enumeration; leave-one-out to 1e-10; efficiency exact."""
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    _warm(model, opt, warm)
    batch = (X[:6], Y[:6])
    phi, loo, total = _real_game_oracle(model, opt, batch, val_point="midpoint")
    est = step_values(model, opt, LOSS, batch, VAL, linearization="exact")  # n = 6: all 64 coalitions enumerated
    assert_close(est.sum(), torch.tensor(total, dtype=torch.float64), rtol=1e-9, atol=1e-15)
    assert_close(est, phi, rtol=1e-8, atol=1e-12 * float(phi.abs().max()))
    got_loo = step_values(model, opt, LOSS, batch, VAL, linearization="exact-loo")
    assert_close(got_loo, loo, rtol=1e-8, atol=1e-12 * float(loo.abs().max()))


def test_exact_route_stderr_covers_the_error():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = (X[:6], Y[:6])
    phi, _, _ = _real_game_oracle(model, opt, batch)
    for p in model.parameters():
        p.grad = None
    engine = estimators.GhostEngine(model)
    with engine.capture_train():
        LOSS(model(batch[0]), batch[1]).backward()
    v = dict(zip(model.parameters(), torch.autograd.grad(LOSS(model(VAL[0]), VAL[1]), list(model.parameters()))))
    out = estimators.exact_update_values(
        optimizers.linearize(opt), engine.per_sample_contributions(), [v], permutations=200,
        generator=torch.Generator().manual_seed(3), enumerate=False,
    )
    z = ((out.values[:, 0] - phi) / out.stderr[:, 0]).abs()
    assert float(z.max()) < 5.0 and out.permutations == 200 and not out.enumerated
    assert_close(out.values.sum(), out.total.sum(), rtol=1e-9, atol=1e-15)  # every order telescopes to Ū(B) − Ū(∅)
    for p in model.parameters():
        p.grad = None


@given(lr=st.sampled_from([1e-3, 1e-1]), n=st.integers(2, 7), seed=st.integers(0, 50))
def test_sgd_is_linear_so_the_exact_route_equals_the_secant(lr, n, seed):
    model = _model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batch = (X[:n], Y[:n])
    exact = step_values(model, opt, LOSS, batch, VAL, linearization="exact", permutations=4)
    secant = step_values(model, opt, LOSS, batch, VAL)
    assert_close(exact, secant, rtol=1e-8, atol=1e-12 * float(secant.abs().max()))


@given(name=st.sampled_from(sorted(OPTIMIZERS)), warm=st.integers(0, 3), m=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_every_sampled_order_adds_up_to_the_games_total(name, warm, m, seed):
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    _warm(model, opt, warm)
    batch = (X[:12], Y[:12])  # n = 12: orders are sampled (2^12 coalitions are more than 4 M (n + 1))
    a = step_values(model, opt, LOSS, batch, VAL, linearization="exact", permutations=m, seed=seed)
    b = step_values(model, opt, LOSS, batch, VAL, linearization="exact", permutations=m + 6, seed=seed + 1)
    assert_close(a.sum(), b.sum(), rtol=1e-9, atol=1e-15)


def test_exact_kinds_have_no_slope():
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    w.grad = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="exact-update game and has no slope"):
        estimators.preconditioning(optimizers.linearize(torch.optim.Adam([w])), w, w.grad, "exact")
    with pytest.raises(ValueError, match="permutations=0"):
        step_values(_model(), torch.optim.Adam(_model().parameters()), LOSS, (X[:4], Y[:4]), VAL, linearization="exact", permutations=0)


# ---------------------------------------------------------------------------------- the tracker's route
def _track(model, opt, steps: int, **kw) -> InRunShapley:
    tracker = InRunShapley(model, opt, LOSS, VAL, record_steps=True, **kw)
    for s in range(steps):
        idx = list(range(8 * s, 8 * s + 8))
        opt.zero_grad()
        with tracker.batch(idx):
            LOSS(model(X[idx]), Y[idx]).backward()
        opt.step()
    return tracker


def test_auto_route_takes_the_exact_route_at_sign_like_steps_only():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = _track(model, opt, 5, nonlinearity_threshold=0.5)
    info = tracker.step_info()
    assert info["route"][0] == "exact" and info["nonlinearity"][0] > 0.99  # Adam's first step: ν ≈ 1
    assert (info["nonlinearity"].diff().iloc[1:] < 0.2).all()
    assert set(info["route"]) <= {"exact", "mixed", "linear"} and info["route"].iloc[-1] == "linear"
    assert (info.loc[info.route != "linear", "stderr"] >= 0).all() and info.loc[info.route == "linear", "stderr"].isna().all()
    hist = tracker.history()
    assert (hist.groupby("step")["route"].first().to_numpy() == info["route"].to_numpy()).all()
    tracker.close()


def test_a_layer_unfrozen_mid_run_takes_the_exact_route_alone_at_its_first_step():
    """The route is per parameter: Adam's first step of a newly trained layer is sign-like, the others are not."""
    model = _model()
    model[0].requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = InRunShapley(model, opt, LOSS, VAL, record_steps=True, nonlinearity_threshold=0.5)
    twin = None
    for s in range(6):
        if s == 4:
            model[0].requires_grad_(True)
            twin = copy.deepcopy((model, opt))
        idx = list(range(8 * s, 8 * s + 8))
        opt.zero_grad()
        with tracker.batch(idx):
            LOSS(model(X[idx]), Y[idx]).backward()
        if s == 4:
            expected_twin = step_values(*twin, LOSS, (X[idx], Y[idx]), VAL, route="auto", nonlinearity_threshold=0.5, seed=4)
        opt.step()
    info = tracker.step_info()
    assert info["route"][0] == "exact" and info["route"][3] == "linear" and info["route"][4] == "mixed"
    step4 = torch.tensor(tracker.history().query("step == 4")["value"].to_numpy())
    assert_close(step4, expected_twin, rtol=1e-10, atol=1e-15)
    tracker.close()


def test_sgd_is_never_routed_and_route_linear_never_switches():
    model = _model()
    tracker = _track(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 3)
    info = tracker.step_info()
    assert (info["route"] == "linear").all() and float(info["nonlinearity"].abs().max()) < 1e-12
    tracker.close()
    model = _model()
    tracker = _track(model, torch.optim.Adam(model.parameters(), lr=1e-2), 2, route="linear")
    assert (tracker.step_info()["route"] == "linear").all() and tracker.step_info()["nonlinearity"].isna().all()
    tracker.close()


def test_the_sgd_proxy_is_kept_as_asked():
    model = _model()
    tracker = _track(model, torch.optim.Adam(model.parameters(), lr=1e-2), 1, linearization="sgd")
    assert list(tracker.step_info()["route"]) == ["linear"]
    tracker.close()


def test_tangent_switches_to_the_leave_one_out_game():
    model = _model()
    twin_model, twin_opt = copy.deepcopy(model), None
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin_opt = torch.optim.Adam(twin_model.parameters(), lr=1e-2)
    expected = step_values(twin_model, twin_opt, LOSS, (X[:8], Y[:8]), VAL, linearization="exact-loo", val_point="lookahead")
    tracker = _track(model, opt, 1, linearization="tangent", val_point="lookahead")
    assert list(tracker.step_info()["route"]) == ["exact-loo"]
    assert_close(torch.tensor(tracker.history()["value"].to_numpy()), expected, rtol=1e-12)
    tracker.close()


def test_the_default_tracker_values_step_one_far_better_than_the_secant():
    """Adam's first step against exact Shapley of the real game: the default route vs the slope."""
    model = _model(3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = (X[:10], Y[:10])
    truth = validation.shapley_values(model, opt, LOSS, batch, VAL).values
    secant = step_values(model, opt, LOSS, batch, VAL)
    auto = step_values(model, opt, LOSS, batch, VAL, route="auto")
    r_secant, r_auto = validation.fidelity(truth, secant)["pearson"], validation.fidelity(truth, auto)["pearson"]
    assert r_auto > 0.97 and r_auto > r_secant + 0.05, (r_auto, r_secant)


def test_muons_first_step_is_valued_by_the_exact_route_instead_of_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)).double()
    opt = torch.optim.Muon(model.parameters(), lr=0.02)
    with pytest.raises(optimizers.UpdateJumpError):
        step_values(model, opt, LOSS, (X[:8], Y[:8]), VAL)
    tracker = _track(model, opt, 2)
    info = tracker.step_info()
    assert info["route"][0] == "exact" and torch.isfinite(torch.tensor(tracker.values()["value"].to_numpy())).all()
    tracker.close()


def test_streaming_cannot_switch_and_warns_once():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = _track(model, opt, 3, val_point="current", stream=True)
    poor = [w for w in caught if issubclass(w.category, PoorLinearizationWarning)]
    assert len(poor) == 1 and "step 0" in str(poor[0].message) and "stream=True" in str(poor[0].message)
    info = tracker.step_info()
    assert (info["route"] == "linear").all() and info["nonlinearity"][0] > 0.99
    tracker.close()
    with pytest.raises(ValueError, match="stream=True .* releases the per-sample factors"):
        InRunShapley(model, opt, LOSS, VAL, val_point="current", stream=True, linearization="exact")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(route="always"), "route='always' is not accepted"),
        (dict(nonlinearity_threshold=-1.0), "nonlinearity_threshold=-1.0 must be a number >= 0"),
        (dict(exact_permutations=0), "exact_permutations=0 must be at least 1"),
        (dict(linearization="exactly"), "linearization='exactly' is not accepted"),
    ],
)
def test_bad_route_options_are_refused(kw, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        InRunShapley(model, torch.optim.Adam(model.parameters()), LOSS, VAL, **kw)


def test_route_options_and_step_info_survive_save_and_load(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = _track(model, opt, 2, nonlinearity_threshold=0.3, exact_permutations=8, seed=4)
    path = tmp_path / "values.pt"
    tracker.save(path)
    resumed = InRunShapley.load(path, model, opt, LOSS, VAL)
    assert resumed.options == tracker.options
    assert resumed.step_info().equals(tracker.step_info())
    other = InRunShapley(model, opt, LOSS, VAL)
    with pytest.raises(ValueError, match="pass the same options to resume"):
        other.restore(tracker.state())
    for t in (tracker, resumed, other):
        t.close()


@pytest.mark.parametrize("name", ["adafactor", "muon"])
def test_operator_rules_exact_route_equals_the_real_optimizers_game(name):
    """Non-elementwise updates (Adafactor's factored second moment, Muon's Newton–Schulz) through the same route.

    Muon's real step runs Newton–Schulz in bfloat16; the linearization is its float64 twin, so for
    Muon the values are held to R > 0.99 and a relative error below 0.1 (bfloat16's rounding of
    each coalition's update, amplified in the marginals), Adafactor to 1e-8.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)).double()
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2) if name == "adafactor" else torch.optim.Muon(model.parameters(), lr=0.02)
    _warm(model, opt, 1)
    batch = (X[:6], Y[:6])
    phi, loo, _ = _real_game_oracle(model, opt, batch, val_point="midpoint")
    est = step_values(model, opt, LOSS, batch, VAL, linearization="exact")
    got_loo = step_values(model, opt, LOSS, batch, VAL, linearization="exact-loo")
    if name == "adafactor":
        assert_close(est, phi, rtol=1e-8, atol=1e-8 * float(phi.abs().max()))
        assert_close(got_loo, loo, rtol=1e-8, atol=1e-8 * float(loo.abs().max()))
        return
    # bfloat16 rounds each coalition's real update; the marginals are differences of updates
    for a, b in ((est, phi), (got_loo, loo)):
        fid = validation.fidelity(b, a)
        assert fid["pearson"] > 0.99 and fid["relative_l2_error"] < 0.1, fid


@pytest.mark.parametrize("n, linearization", [(6, "exact"), (12, "exact"), (6, "exact-loo")])
def test_large_parameters_are_evaluated_block_by_block_with_the_same_values(monkeypatch, n, linearization):
    """Memory stays bounded: elementwise rules are evaluated on blocks of coordinates (here tiny ones)."""
    import estimators._exact as exact

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _warm(model, opt, 1)
    batch = (X[:n], Y[:n])
    whole = step_values(model, opt, LOSS, batch, VAL, linearization=linearization, permutations=4)
    monkeypatch.setattr(exact, "_CHUNK_ELEMENTS", 64)
    blocks = step_values(model, opt, LOSS, batch, VAL, linearization=linearization, permutations=4)
    assert_close(blocks, whole, rtol=1e-10, atol=1e-15)


def test_the_factored_estimator_takes_the_exact_route_without_its_rank_one_error():
    """A parameter switched by ν was first valued on the factored path; its exact part must not keep that approximation."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = (X[:8], Y[:8])
    ghost = step_values(model, opt, LOSS, batch, VAL, route="auto")
    factored = step_values(model, opt, LOSS, batch, VAL, route="auto", estimator="ghost-factored")
    slope_only = step_values(model, opt, LOSS, batch, VAL, estimator="ghost-factored")
    assert float((slope_only - step_values(model, opt, LOSS, batch, VAL)).abs().max()) > 1e-6  # the rank-one J differs
    assert_close(factored, ghost, rtol=1e-8, atol=1e-12 * float(ghost.abs().max()))

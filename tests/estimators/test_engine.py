"""Ghost-engine behaviour beyond the reference comparison: hook hygiene, accumulation, dtype,
path selection and its record, the factored error report, user-registered rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import estimators as E
from tests._helpers import assert_close

from ._models import DT, MLP, TinyLM, WithCustom, token_ce


def _lm(seed=0, tied=True):
    torch.manual_seed(seed)
    model = TinyLM(6, 4, tied=tied, padding_idx=0, ln_bias=True, rms_eps=1e-5)
    g = torch.Generator().manual_seed(seed)
    make = lambda n, T=3: (torch.randint(0, 6, (n, T), generator=g), torch.randint(0, 6, (n, T), generator=g))
    return model, make


def _reference(model, loss_fn, batches, val_grads, J):
    out = []
    for b in batches:
        c = E.per_sample_grads(model, loss_fn, b)
        out.append(E.first_order_values(c, [{p: E.preconditioned_val_grad(J if isinstance(J, float) else J[p], vg[p]) for p in c} for vg in val_grads]))
    return torch.cat(out)


def test_hooks_are_owned_and_removed_and_user_objects_untouched():
    model, make = _lm()
    modules_before = {m: (set(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()}
    params_before = {p: set(vars(p)) for p in model.parameters()}
    engine = E.GhostEngine(model)
    x, y = make(2)
    with engine.capture_train():
        assert len(model.head._forward_hooks) > 0
        token_ce(model(x), y).backward()
    for m, (attrs, nf, npre) in modules_before.items():
        assert set(vars(m)) == attrs and len(m._forward_hooks) == nf and len(m._forward_pre_hooks) == npre
    for p, attrs in params_before.items():
        assert set(vars(p)) == attrs
    # No mode is left behind: a parameter used outside its module is fine after the capture.
    (model.mix.weight * 2).sum()


def test_captured_contributions_sum_to_the_batch_and_validation_gradients():
    model, make = _lm()
    engine = E.GhostEngine(model)
    batches = [make(2), make(3)]
    model.zero_grad()
    with engine.capture_train():
        for x, y in batches:
            token_ce(model(x), y).backward()
    [train] = engine.captured_grads("train")
    assert_close({n: train[p] for n, p in model.named_parameters()}, {n: p.grad for n, p in model.named_parameters()}, rtol=1e-10, atol=1e-15)
    vals = [make(2), make(1)]
    vg = E.validation_gradients(model, token_ce, vals, engine=engine)
    for k, got in enumerate(engine.captured_grads("val")):
        assert_close({n: got[p] for n, p in model.named_parameters()}, {n: vg[k][p] for n, p in model.named_parameters()}, rtol=1e-10, atol=1e-15)
    assert engine.n_samples == 5


def test_micro_batches_in_separate_captures_concatenate_in_order():
    model, make = _lm(tied=False)
    engine = E.GhostEngine(model)
    batches = [make(3), make(1), make(2)]
    for x, y in batches:
        with engine.capture_train():
            token_ce(model(x), y).backward()
    vg = E.validation_gradients(model, token_ce, [make(2)])
    J = {p: -torch.rand_like(p) for p in model.parameters()}
    phi = engine.values(J, vg)
    assert phi.shape == (6, 1)
    assert_close(phi, _reference(model, token_ce, batches, vg, J), rtol=1e-8, atol=1e-14)
    engine.clear()
    assert engine.n_samples == 0


def test_forward_without_backward_inside_a_capture_is_ignored():
    model, make = _lm()
    engine = E.GhostEngine(model)
    x, y = make(2)
    with engine.capture_train():
        with torch.no_grad():
            model(make(5)[0])  # e.g. logging: no gradient, no samples
        model(make(4)[0])  # a forward whose loss is never backpropagated
        token_ce(model(x), y).backward()
    assert engine.n_samples == 2


def test_dtype_follows_the_parameters_unless_asked():
    torch.manual_seed(0)
    model = MLP(3, 4, 2, True, True).float()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    vg = E.validation_gradients(model, F.mse_loss, [(torch.randn(2, 3), torch.randn(2, 2))])
    J = {p: -torch.rand_like(p) for p in model.parameters()}
    out = {}
    for dtype in (None, torch.float64):
        engine = E.GhostEngine(model, dtype=dtype)
        with engine.capture_train():
            F.mse_loss(model(x), y).backward()
        out[dtype] = engine.values(J, vg)
    assert out[None].dtype == torch.float32 and out[torch.float64].dtype == torch.float64
    assert_close(out[None], out[torch.float64].float(), rtol=1e-4, atol=1e-7)


def test_auto_path_prefers_exact_paths_and_records_them():
    model, make = _lm(tied=False)
    x, y = make(8, T=4)
    vals = [make(1, T=1)]
    engine = E.GhostEngine(model)
    assert engine.needs_val_capture
    with engine.capture_train():
        token_ce(model(x), y).backward()
    vg = E.validation_gradients(model, token_ce, vals, engine=engine)
    engine.values(-0.1, vg)  # scalar J, one short validation sample: pairwise is cheaper
    assert engine.paths_taken["mix.weight"] == "pairwise" and engine.paths_taken["ln.weight"] == "dense"
    engine.values({p: -torch.rand_like(p) for p in model.parameters()}, vg)  # varying J: dense
    assert set(engine.paths_taken.values()) == {"dense"}
    assert not engine.factored_errors


def test_layer_paths_override_by_module_or_parameter_name():
    model, make = _lm(tied=False)
    engine = E.GhostEngine(model, path="dense", layer_paths={"mix": "factored", "head.weight": "materialized"})
    x, y = make(3)
    with engine.capture_train():
        token_ce(model(x), y).backward()
    vg = E.validation_gradients(model, token_ce, [make(2)], engine=engine)
    engine.values({p: -torch.rand_like(p) for p in model.parameters()}, vg)
    assert engine.paths_taken["mix.weight"] == "factored"
    assert engine.paths_taken["mix.bias"] == "dense"  # 1-D parameters always use J exactly
    assert engine.paths_taken["head.weight"] == "materialized"
    assert engine.paths_taken["emb.weight"] == "dense"
    assert set(engine.factored_errors) == {"mix.weight"}


def test_factored_error_is_reported_and_bounded_for_an_adam_like_J():
    """A non-rank-one J: the factored path differs from dense by about the factorisation error."""
    model, make = _lm(tied=True)
    x, y = make(4)
    engine = E.GhostEngine(model, path="factored")
    with engine.capture_train():
        token_ce(model(x), y).backward()
    vg = E.validation_gradients(model, token_ce, [make(3), make(2)], engine=engine)
    g = torch.Generator().manual_seed(1)
    # Adam-like: −lr / (sqrt(v) + eps) with v log-normal across entries.
    J = {p: -1e-2 / (torch.exp(torch.randn(p.shape, generator=g, dtype=DT)) + 1e-8) for p in model.parameters()}
    factored = engine.values(J, vg)
    report = engine.factored_errors
    assert set(report) == {"emb.weight", "mix.weight"}
    for r in report.values():
        assert 0 < r["rel_frobenius"] < 1 and r["sign_mismatch"] == 0 and r["method"] == "geometric"
    dense = E.GhostEngine(model, path="dense")
    with dense.capture_train():
        token_ce(model(x), y).backward()
    exact = dense.values(J, vg)
    assert not torch.allclose(factored, exact)
    assert float((factored - exact).norm() / exact.norm()) < 2.0


@pytest.mark.parametrize("method", ["geometric", "adafactor", "svd"])
def test_rank_one_is_exact_for_rank_one_maps(method):
    r, s = torch.rand(5, dtype=DT) + 0.1, torch.rand(3, dtype=DT) + 0.1
    sigma, r2, s2 = E.rank_one(-torch.outer(r, s), method)
    assert sigma == -1.0
    assert_close(torch.outer(r2, s2), torch.outer(r, s), rtol=1e-12)
    rep = E.factored_error(-torch.outer(r, s), method)
    assert rep["rel_frobenius"] < 1e-12 and rep["method"] == method


def test_factored_error_reports_sign_mismatch_and_scalars():
    J = -torch.ones(4, 4, dtype=DT)
    J[0, 0] = 1.0
    assert E.factored_error(J)["sign_mismatch"] == pytest.approx(1 / 16)
    assert E.factored_error(-0.1) == {"rel_frobenius": 0.0, "max_rel": 0.0, "sign_mismatch": 0.0, "method": "geometric"}
    assert E.factored_error(-torch.ones(2, 3, 4, dtype=DT), shape=(2, 12))["rel_frobenius"] < 1e-15


def test_a_user_registered_rule_replaces_the_fallback():
    class Gain(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.g = nn.Parameter(1 + torch.randn(d, dtype=DT))

        def forward(self, x):
            return x * self.g

    class GainRule(E.LayerRule, layer=Gain):
        @classmethod
        def params(cls, module):
            return ("g",)

        @classmethod
        def terms(cls, module, x, grad_output):
            n = x.shape[0]
            return {"g": E.PerSample((x * grad_output).reshape(n, -1, x.shape[-1]).sum(1))}

    assert E.rule_for(Gain) is GainRule and Gain in E.registered_rules()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, dtype=DT), Gain(4), nn.Tanh(), nn.Linear(4, 2, dtype=DT))
    engine = E.GhostEngine(model, strict=True)
    x, y = torch.randn(3, 2, 3, dtype=DT), torch.randn(3, 2, 2, dtype=DT)
    vg = E.validation_gradients(model, F.mse_loss, [(torch.randn(2, 2, 3, dtype=DT), torch.randn(2, 2, 2, dtype=DT))])
    with engine.capture_train():
        F.mse_loss(model(x), y).backward()
    assert_close(engine.values(-0.2, vg), _reference(model, F.mse_loss, [(x, y)], vg, -0.2), rtol=1e-8, atol=1e-15)
    assert engine.paths_taken["1.g"] == "dense" and not engine.fallback_modules


def test_ghost_values_one_call_with_a_callable_J():
    torch.manual_seed(0)
    model = WithCustom(3, 4, 2)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    vals = [(torch.randn(2, 3, dtype=DT), torch.randn(2, 2, dtype=DT))]
    phi = E.ghost_values(model, F.mse_loss, (x, y), vals, lambda p, g: -0.1 * torch.ones_like(p), path="pairwise")
    vg = E.validation_gradients(model, F.mse_loss, vals)
    assert_close(phi, _reference(model, F.mse_loss, [(x, y)], vg, -0.1), rtol=1e-8, atol=1e-15)
    assert all(p.grad is None for p in model.parameters())  # one-call leaves .grad untouched


def test_one_hot_and_dense_factor_contractions_agree_with_dense_tensors():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 5, (3, 4), generator=g)
    w = torch.rand(3, 4, generator=g, dtype=DT)
    oh = E.OneHotFactor(idx, 5, w)
    dn = E.DenseFactor(oh.dense())
    other = E.DenseFactor(torch.randn(2, 3, 5, generator=g, dtype=DT))
    from estimators._factors import gram

    assert_close(gram(oh, other), gram(dn, other))
    assert_close(gram(other, oh), gram(other, dn))
    assert_close(gram(oh, E.OneHotFactor(idx[:2, :3], 5)), gram(dn, E.DenseFactor(E.OneHotFactor(idx[:2, :3], 5).dense().to(DT))))
    cols = E.DenseFactor(torch.randn(3, 4, 2, generator=g, dtype=DT))
    P = torch.randn(5, 2, generator=g, dtype=DT)
    assert_close(E.Bilinear(oh, cols).dense_values(P), E.Bilinear(dn, cols).dense_values(P))
    assert_close(E.Bilinear(oh, cols).total(P.shape), E.Bilinear(dn, cols).total(P.shape))
    assert_close(E.Bilinear(cols, oh).total(P.T.shape), E.Bilinear(cols, dn).total(P.T.shape))
    assert_close(E.Bilinear(oh, cols).materialize(P.shape), E.Bilinear(dn, cols).materialize(P.shape))

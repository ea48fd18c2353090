"""Every user-facing error of the estimators package: what is wrong, the offending value, the fix."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import estimators as E

from ._models import DT, MLP, WithCustom


class FakeLin:
    def tangent(self, p, g):
        return -torch.ones_like(p)

    secant = tangent

    def update(self, p, g):
        return -g

    def learning_rate(self, p):
        return 0.1


def _mlp():
    torch.manual_seed(0)
    return MLP(3, 4, 2, True, True)


def _xy(n=3):
    return torch.randn(n, 3, dtype=DT), torch.randn(n, 2, dtype=DT)


def _captured(model, path="auto", **kw):
    engine = E.GhostEngine(model, path=path, **kw)
    x, y = _xy()
    with engine.capture_train():
        F.mse_loss(model(x), y).backward()
    return engine


# ---------------------------------------------------------------- modes: accepted values listed
@pytest.mark.parametrize(
    "call, accepted",
    [
        (lambda: E.preconditioning(FakeLin(), torch.ones(1), torch.ones(1), "newton"), "'tangent', 'secant', 'sgd'"),
        (lambda: E.val_point_shift(FakeLin(), [], None, "after"), "'current', 'lookahead', 'midpoint', 'predicted'"),
        (lambda: E.GhostEngine(_mlp(), path="fast"), "'auto', 'dense', 'pairwise', 'factored', 'materialized'"),
        (lambda: E.GhostEngine(_mlp(), factorization="qr"), "'geometric', 'adafactor', 'svd'"),
        (lambda: E.per_sample_grads(_mlp(), F.mse_loss, _xy(), reduction="avg"), "'mean', 'sum'"),
        (lambda: E.GhostEngine(_mlp(), layer_paths={"fc1": "quick"}), "'auto', 'dense'"),
    ],
)
def test_unknown_mode_strings_list_the_accepted_values(call, accepted):
    with pytest.raises(ValueError, match=re.escape(accepted)):
        call()


def test_kinds_accept_members_and_strings():
    assert E.preconditioning(FakeLin(), torch.ones(1), torch.ones(1), E.LinearizationKind.SGD).scalar == -0.1
    assert E.preconditioning(FakeLin(), torch.ones(1), torch.ones(1), "sgd").kind == "scalar"


# ---------------------------------------------------------------- engine construction
def test_strict_mode_names_module_parameter_registered_types_and_both_fixes():
    torch.manual_seed(0)
    with pytest.raises(E.UncoveredParameterError) as info:
        E.GhostEngine(WithCustom(2, 3, 2), strict=True)
    msg = str(info.value)
    assert "'affine.scale'" in msg and "module 'affine' (Affine)" in msg
    types = ", ".join(sorted(t.__name__ for t in E.registered_rules()))
    assert f"registered layer types: {types})" in msg
    assert all(name in types for name in ("Conv1d", "Conv2d", "Embedding", "LayerNorm", "Linear", "RMSNorm"))
    assert "register a rule for Affine" in msg and "LayerRule, layer=Affine" in msg
    assert "strict=False" in msg


def test_engine_refuses_batchnorm_in_train_mode_and_frequency_scaled_embeddings():
    with pytest.raises(E.SampleInteractionError, match="eval mode"):
        E.GhostEngine(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    with pytest.raises(E.SampleInteractionError, match="scale_grad_by_freq=False"):
        E.GhostEngine(nn.Sequential(nn.Embedding(4, 2, scale_grad_by_freq=True)))


def test_bad_dtype_and_layer_paths_key():
    with pytest.raises(ValueError, match="dtype=torch.int64 is not a floating"):
        E.GhostEngine(_mlp(), dtype=torch.int64)
    with pytest.raises(ValueError, match="layer_paths key 'fc3' names no module"):
        E.GhostEngine(_mlp(), layer_paths={"fc3": "dense"})


# ---------------------------------------------------------------- capture misuse
def test_parameter_used_outside_its_module_is_refused_naming_it():
    class FunctionalHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3, dtype=DT)

        def forward(self, t):
            return F.linear(torch.tanh(self.emb(t)), self.emb.weight)  # tied via F.linear: no hook sees it

    model = FunctionalHead()
    engine = E.GhostEngine(model)
    with pytest.raises(E.ParameterUseError, match=r"'emb.weight' \(owned by module 'emb'\) was used inside module '<root>'") as info:
        with engine.capture_train():
            model(torch.randint(0, 5, (2, 3)))
    assert "head.weight = embedding.weight" in str(info.value)
    model2 = _mlp()
    engine2 = E.GhostEngine(model2)
    x, y = _xy()
    with pytest.raises(E.ParameterUseError, match="outside any module .* weight_decay"):
        with engine2.capture_train():
            (F.mse_loss(model2(x), y) + 1e-3 * model2.fc1.weight.pow(2).sum()).backward()


def test_nested_captures_and_values_inside_a_capture_are_refused():
    engine = E.GhostEngine(_mlp())
    with engine.capture_train():
        with pytest.raises(E.GhostEngineError, match="already active"):
            with engine.capture_val():
                pass
        with pytest.raises(E.GhostEngineError, match="inside a train capture"):
            engine.values(-0.1, [{}])


def test_values_without_a_training_pass_or_validation_gradient():
    model = _mlp()
    with pytest.raises(E.GhostEngineError, match="no training backward pass was captured"):
        E.GhostEngine(model).values(-0.1, [{}])
    with pytest.raises(E.GhostEngineError, match="no validation gradient"):
        _captured(model).values(-0.1)


def test_val_grads_shape_and_count_errors():
    model = _mlp()
    engine = _captured(model)
    vg = E.validation_gradients(model, F.mse_loss, [_xy(2)], engine=engine)
    with pytest.raises(ValueError, match="list of K dicts"):
        engine.values(-0.1, vg[0])
    with pytest.raises(E.GhostEngineError, match="val_grads has 2 targets but 1 validation passes"):
        engine.values(-0.1, vg * 2)
    plain = _captured(model)
    with pytest.raises(ValueError, match="val_grads is empty"):
        plain.values(-0.1, [])
    with pytest.raises(ValueError, match=r"val_grads\[0\] has no gradient for parameter 'fc1.weight'"):
        plain.values(-0.1, [{}])


def test_J_errors_name_the_parameter():
    model = _mlp()
    engine = _captured(model)
    vg = E.validation_gradients(model, F.mse_loss, [_xy(2)])
    with pytest.raises(ValueError, match="J has no entry for parameter 'fc1.weight'"):
        engine.values({}, vg)
    J = {p: -torch.ones(7, dtype=DT) for p in model.parameters()}
    with pytest.raises(ValueError, match=r"J for parameter 'fc1.weight' has shape \(7,\), which does not broadcast"):
        engine.values(J, vg)
    with pytest.raises(TypeError, match="J must be a float or a mapping"):
        engine.values("-0.1", vg)


def test_pairwise_needs_a_scalar_J_and_a_captured_validation_pass():
    model = _mlp()
    vg = E.validation_gradients(model, F.mse_loss, [_xy(2)])
    with pytest.raises(E.GhostEngineError, match="'pairwise' for parameter 'fc1.weight' needs the validation pass captured"):
        _captured(model, "pairwise").values(-0.1, vg)
    engine = _captured(model, "pairwise")
    vg = E.validation_gradients(model, F.mse_loss, [_xy(2)], engine=engine)
    J = {p: -torch.rand_like(p) for p in model.parameters()}
    with pytest.raises(ValueError, match="exact only for a scalar J.*path='factored'"):
        engine.values(J, vg)


def test_mixed_parameter_dtypes_need_an_explicit_dtype():
    model = _mlp()
    model.fc2.float()
    engine = E.GhostEngine(model)
    x, y = _xy()
    with engine.capture_train():
        F.mse_loss(model.fc2(torch.tanh(model.fc1(x)).float()).double(), y).backward()
    with pytest.raises(ValueError, match="several dtypes.*dtype="):
        engine.values(-0.1, [{p: torch.zeros_like(p) for p in model.parameters()}])


def test_fallback_refuses_random_layers_and_tuple_outputs():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=DT))
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x * self.w)

    torch.manual_seed(0)
    model = nn.Sequential(Noisy(), nn.Linear(3, 2, dtype=DT))
    engine = E.GhostEngine(model)
    x, y = _xy()
    with engine.capture_train():
        F.mse_loss(model(x), y).backward()
    with pytest.raises(E.GhostEngineError, match="random operations.*register a rule for Noisy"):
        engine.values(-0.1, [{p: torch.zeros_like(p) for p in model.parameters()}])

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=DT))

        def forward(self, x):
            return x * self.w, x

    # A module returning several tensors is valued by the fallback (each output's gradient contracted);
    # with a layer rule, which reads one output gradient, it is refused.
    model = Pair()
    engine = E.GhostEngine(model)
    with engine.capture_train():
        a, b = model(x)
        (a.pow(2).sum(1) + b.sum(1)).sum().backward()
    phi = engine.values(-0.1, [{model.w: torch.ones(3, dtype=DT)}])[:, 0]
    assert torch.allclose(phi, 0.1 * (2 * (x * model.w) * x).detach().sum(1))

    class LinearPair(nn.Linear):
        def forward(self, x):
            return super().forward(x), x

    E._rules._base._REGISTRY[LinearPair] = E._rules._base._REGISTRY[nn.Linear]
    try:
        engine = E.GhostEngine(LinearPair(3, 2, dtype=DT))
        with pytest.raises(E.GhostEngineError, match="its layer rule needs a single tensor output"):
            with engine.capture_train():
                engine.model(x)
    finally:
        del E._rules._base._REGISTRY[LinearPair]


def test_inconsistent_batch_axes_and_missing_batch_axis():
    class Flattens(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3, dtype=DT), nn.Linear(3, 2, dtype=DT)

        def forward(self, x):  # x [n, T, 3]; b sees [n*T, 3]: batch axis lost
            return self.b(self.a(x).reshape(-1, 3))

    model = Flattens()
    engine = E.GhostEngine(model)
    with engine.capture_train():
        model(torch.randn(2, 4, 3, dtype=DT)).sum().backward()
    with pytest.raises(E.GhostEngineError, match="disagree on the batch size.*a: \\(2, 4, 3\\), b: \\(8, 2\\)"):
        engine.values(-0.1, [{p: torch.zeros_like(p) for p in model.parameters()}])
    lin = nn.Linear(3, 2, dtype=DT)
    engine = E.GhostEngine(lin)
    with engine.capture_train():
        lin(torch.randn(3, dtype=DT)).sum().backward()
    with pytest.raises(ValueError, match="without a batch axis"):
        engine.values(-0.1, [{p: torch.zeros_like(p) for p in lin.parameters()}])


def test_activation_checkpointing_is_refused():
    model = _mlp()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    wrapped = Wrapped()
    engine = E.GhostEngine(wrapped)
    x, y = _xy()
    with pytest.raises(E.GhostEngineError, match="checkpointing"):
        with engine.capture_train():
            F.mse_loss(wrapped(x), y).backward()


def test_misc_engine_arguments():
    model = _mlp()
    engine = _captured(model)
    with pytest.raises(ValueError, match="which='test' is not accepted"):
        engine.captured_grads("test")
    with pytest.raises(ValueError, match="either engine= or engine options"):
        E.ghost_values(model, F.mse_loss, _xy(), [_xy()], -0.1, engine=engine, path="dense")


# ---------------------------------------------------------------- rule extension point and factors
def test_rule_registration_errors():
    with pytest.raises(ValueError, match="already has the rule LinearRule.*replace=True"):
        class Again(E.LayerRule, layer=nn.Linear):
            @classmethod
            def terms(cls, module, x, grad_output):
                return {}
    with pytest.raises(TypeError, match="layer= must be an nn.Module subclass"):
        class Bad(E.LayerRule, layer=int):
            pass


def test_factor_and_term_shape_errors():
    a = E.DenseFactor(torch.zeros(2, 3, 4, dtype=DT))
    b = E.DenseFactor(torch.zeros(2, 2, 5, dtype=DT))
    with pytest.raises(ValueError, match="Bilinear factors disagree"):
        E.Bilinear(a, b)
    term = E.Bilinear(a, E.DenseFactor(torch.zeros(2, 3, 5, dtype=DT)))
    with pytest.raises(ValueError, match="cannot be viewed as a 4×5 matrix"):
        term.dense_values(torch.zeros(3, 3, dtype=DT))
    with pytest.raises(ValueError, match="2-D tensor J"):
        E.rank_one(torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match=r"cannot be viewed as \(4, 4\)"):
        E.factored_error(torch.zeros(3, 3, dtype=DT), shape=(4, 4))


# ---------------------------------------------------------------- first-order functions
def test_first_order_function_errors():
    model = _mlp()
    with pytest.raises(TypeError, match=r"wrap a single batch as \[val_batch\]"):
        E.validation_gradients(model, F.mse_loss, _xy())
    with pytest.raises(ValueError, match="must be an \\(inputs, targets\\) pair, got Tensor"):
        E.validation_gradients(model, F.mse_loss, [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="must be an \\(inputs, targets\\) pair"):
        E.per_sample_grads(model, F.mse_loss, (1, 2, 3))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        E.per_sample_grads(model, F.mse_loss, (torch.zeros(3, 3, dtype=DT), torch.zeros(2, 2, dtype=DT)))
    with pytest.raises(ValueError, match="not parameters of the model"):
        E.per_sample_grads(model, F.mse_loss, _xy(), params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(E.SampleInteractionError):
        E.per_sample_grads(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), F.mse_loss, _xy())
    noisy = nn.Sequential(nn.Linear(3, 2, dtype=DT), nn.Dropout(0.5))
    with pytest.raises(ValueError, match="random operations.*eval mode"):
        E.per_sample_grads(noisy, F.mse_loss, _xy())
    with pytest.raises(ValueError, match="per_sample is empty"):
        E.first_order_values({}, [{}])
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        E.first_order_values({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)}, [{}])
    with pytest.raises(ValueError, match=r"precond_val_grads\[0\] has no entry for per-sample key 'a'"):
        E.first_order_values({"a": torch.zeros(2, 1)}, [{}])
    with pytest.raises(ValueError, match=r"shape \(2, 1\) but P has shape \(3,\)"):
        E.first_order_values({"a": torch.zeros(2, 1)}, [{"a": torch.zeros(3)}])
    with pytest.raises(ValueError, match="does not broadcast to the validation gradient's shape"):
        E.preconditioned_val_grad(torch.ones(4), torch.ones(2, 3))
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="has no batch gradient"):
        E.val_point_shift(FakeLin(), [w], None, "lookahead")
    with pytest.raises(ValueError, match="shapes must match"):
        with E.shifted_parameters({w: torch.zeros(3)}):
            pass


def test_remaining_argument_errors():
    model = _mlp()
    with pytest.raises(ValueError, match="leaves are all batch-first tensors"):
        E.per_sample_grads(model, F.mse_loss, (torch.zeros(3, 3, dtype=DT), 1.0))
    engine = _captured(model, "dense")
    vg = {p: torch.zeros(5, dtype=DT) for p in model.parameters()}
    with pytest.raises(ValueError, match=r"validation gradient has shape \(5,\) but its parameter has shape \(4, 3\)"):
        engine.values(-0.1, [vg])


def test_a_rule_returning_the_wrong_number_of_samples_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=DT))

        def forward(self, x):
            return x * self.w

    class OddRule(E.LayerRule, layer=Odd):
        @classmethod
        def params(cls, module):
            return ("w",)

        @classmethod
        def terms(cls, module, x, grad_output):
            return {"w": E.PerSample(torch.zeros(x.shape[0] + 1, 3, dtype=DT))}

    model = nn.Sequential(Odd(), nn.Linear(3, 2, dtype=DT))
    engine = _captured(model)
    with pytest.raises(E.GhostEngineError, match="parameter '0.w': a term covers 4 samples in a pass of 3"):
        engine.values(-0.1, [{p: torch.zeros_like(p) for p in model.parameters()}])

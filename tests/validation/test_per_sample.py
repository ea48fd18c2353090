"""per_sample_grads: each sample's share of the batch gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tests._helpers import assert_close
from tests.validation._models import MODEL_KINDS, loss_for, make_batch, make_model, seeds
from validation import per_sample_grads


def batch_grad(model, loss_fn, batch):
    """The gradient an ordinary training step stores in ``param.grad``."""
    model = copy.deepcopy(model)
    model.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


@example(kind="seq", reduction="mean", n=1, seed=0)  # batch of one, sequence axis
@example(kind="seq", reduction="sum", n=3, seed=1)
@given(kind=st.sampled_from(MODEL_KINDS), reduction=st.sampled_from(["mean", "sum"]), n=st.integers(1, 6), seed=seeds())
def test_contributions_sum_to_batch_gradient(kind, reduction, n, seed):
    model = make_model(kind, seed)
    loss_fn = loss_for(kind, reduction)
    batch = make_batch(kind, n, seed + 1)
    c = per_sample_grads(model, loss_fn, batch)
    assert_close({k: v.sum(0) for k, v in c.items()}, batch_grad(model, loss_fn, batch), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_each_contribution_is_the_samples_own_gradient_share(reduction):
    # Reference: autograd on the batch of one, scaled by 1/n for a mean (the sample's share).
    n = 4
    model = make_model("mlp", 0)
    loss_fn = loss_for("mlp", reduction)
    x, y = make_batch("mlp", n, 1)
    c = per_sample_grads(model, loss_fn, (x, y))
    factor = 1.0 / n if reduction == "mean" else 1.0
    for z in range(n):
        g = batch_grad(model, loss_fn, (x[z : z + 1], y[z : z + 1]))
        assert_close({k: v[z] for k, v in c.items()}, {k: factor * v for k, v in g.items()}, atol=1e-15)


def test_keys_shapes_dtype_and_frozen_params_skipped():
    model = make_model("buffers", 0)
    c = per_sample_grads(model, loss_for("buffers"), make_batch("buffers", 3, 0))
    expected = [k for k, p in model.named_parameters() if p.requires_grad]
    assert list(c) == expected and "scale" not in c
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert c[k].shape == (3, *p.shape) and c[k].dtype == torch.float64


def test_chunk_size_gives_the_same_result():
    model = make_model("cnn", 3)
    batch = make_batch("cnn", 5, 3)
    chunked = per_sample_grads(model, loss_for("cnn"), batch, chunk_size=2)
    assert_close(chunked, per_sample_grads(model, loss_for("cnn"), batch))


def test_nested_inputs():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 3)
            self.b = torch.nn.Linear(3, 3)

        def forward(self, inputs):
            return self.a(inputs["left"]) + self.b(inputs["right"])

    model = TwoInputs().double()
    x = {"left": torch.randn(4, 2, dtype=torch.float64), "right": torch.randn(4, 3, dtype=torch.float64)}
    y = torch.randint(0, 3, (4,))
    loss_fn = loss_for("mlp")
    c = per_sample_grads(model, loss_fn, (x, y))
    assert_close({k: v.sum(0) for k, v in c.items()}, batch_grad(model, loss_fn, (x, y)), atol=1e-15)


def test_parameter_with_rounding_level_gradient_does_not_break_reduction_detection():
    """An attention key bias has a mathematically zero gradient (softmax ignores a shift)."""
    import torch

    import validation
    from attribution.experiments.models import TinyLM, lm_loss

    torch.manual_seed(0)
    m = TinyLM(50, width=16, depth=1, heads=2, max_len=8).double()
    batch = (torch.randint(1, 50, (4, 8)), torch.randint(1, 50, (4, 8)))
    grads = validation.per_sample_grads(m, lm_loss, batch)
    assert grads["blocks.0.attn.k.bias"].shape == (4, 16)


class _BranchesOnValues(torch.nn.Module):
    """Python control flow on a tensor's value, as transformers' attention-mask code does: vmap refuses it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2).double()

    def forward(self, x):
        if not bool(torch.isfinite(x).all()):  # a check on values, like transformers' "mask is all ones"
            raise ValueError("non-finite input")
        return self.fc(x)


def test_data_dependent_control_flow_falls_back_to_the_exact_loop():
    import warnings

    from validation import PerSampleFallbackWarning, PerSampleMethod

    model, loss_fn = _BranchesOnValues(), loss_for("mlp")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (5,), generator=g)
    with pytest.raises(RuntimeError, match="use method='loop'"):
        per_sample_grads(model, loss_fn, (x, y), method="vmap")
    with pytest.warns(PerSampleFallbackWarning, match="data-dependent control flow|calling .item()"):
        auto = per_sample_grads(model, loss_fn, (x, y))
    assert auto.method is PerSampleMethod.LOOP and auto.fallback_reason.startswith("RuntimeError: vmap")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        loop = per_sample_grads(model, loss_fn, (x, y), method="loop")
    assert loop.method is PerSampleMethod.LOOP and loop.fallback_reason is None
    for z in range(5):  # the batch of one, scaled by 1/n
        expected = {k: v / 5 for k, v in batch_grad(model, loss_fn, (x[z : z + 1], y[z : z + 1])).items()}
        assert_close({k: v[z] for k, v in auto.items()}, expected, atol=1e-15)
        assert_close({k: v[z] for k, v in loop.items()}, expected, atol=1e-15)


def test_vmap_is_the_default_path_where_it_works():
    c = per_sample_grads(make_model("mlp", 0), loss_for("mlp"), make_batch("mlp", 3, 1))
    assert c.method.value == "vmap" and c.fallback_reason is None and isinstance(c, dict)

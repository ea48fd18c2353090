"""The catalogue of sample interactions no gradient check can see, from the user study.

In-run values need each sample's contribution c_z to be defined by the sample alone. Each case
here was accepted silently (or valued wrongly) before: normalisation with batch statistics in
eval mode, losses that couple samples (in-batch negatives), and weighted / token-normalised
losses whose per-sample gradients the materialized estimator got wrong while the oracle
refused them. Now one rule, c_z = ∂/∂θ ⟨model(x_z), stopgrad(∂L_B/∂outputs)_z⟩, serves both
``estimators.per_sample_grads`` and ``validation.per_sample_grads``, and coupled set-ups are
refused with an error that names the cause and the fix.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import estimators
import validation
from attribution import InRunShapley, step_values
from estimators import LossCouplingError, SampleInteractionError, check_loss_additive, check_samples_independent
from tests._helpers import assert_close

DT = torch.float64


def _data(n=6, d=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def _mlp(seed=0, d=4, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, out)).double()


def _autograd_batch_grad(model, loss_fn, batch):
    """g_B as an ordinary training step stores it in ``param.grad``."""
    twin = copy.deepcopy(model)
    twin.zero_grad()
    loss_fn(twin(batch[0]), batch[1]).backward()
    return {name: p.grad for name, p in twin.named_parameters() if p.requires_grad}


def info_nce(out, _targets, temperature=0.5):
    """Contrastive loss with in-batch negatives: every sample is every other sample's negative."""
    z = F.normalize(out, dim=1)
    return F.cross_entropy(z @ z.T / temperature, torch.arange(len(out)))


def centred(out, targets):
    """A loss on outputs centred over the batch: batch-level normalisation of the outputs."""
    return F.cross_entropy(out - out.mean(0), targets)


def batch_softmax(out, targets):
    """A softmax over the samples of the batch (e.g. listwise ranking)."""
    return -(out[:, 0].log_softmax(0)).mean()


COUPLED = {"infonce": info_nce, "centred": centred, "batch-softmax": batch_softmax}


# ---------------------------------------------------------------- 1. normalisation with batch statistics
def _norm_layers():
    """(name, factory, input shape): every normalisation layer torch ships, both running-stat variants."""
    return [
        ("BatchNorm1d", lambda: nn.BatchNorm1d(3), (6, 3)),
        ("BatchNorm1d-no-stats", lambda: nn.BatchNorm1d(3, track_running_stats=False), (6, 3)),
        ("BatchNorm2d-no-stats", lambda: nn.BatchNorm2d(3, track_running_stats=False), (6, 3, 2, 2)),
        ("LazyBatchNorm1d", lambda: nn.LazyBatchNorm1d(), (6, 3)),
        ("LazyBatchNorm1d-no-stats", lambda: nn.LazyBatchNorm1d(track_running_stats=False), (6, 3)),
        ("InstanceNorm1d", lambda: nn.InstanceNorm1d(3), (6, 3, 5)),
        ("InstanceNorm1d-stats", lambda: nn.InstanceNorm1d(3, affine=True, track_running_stats=True), (6, 3, 5)),
        ("LazyInstanceNorm2d-stats", lambda: nn.LazyInstanceNorm2d(track_running_stats=True), (6, 3, 2, 2)),
        ("GroupNorm", lambda: nn.GroupNorm(1, 3), (6, 3, 5)),
        ("LayerNorm", lambda: nn.LayerNorm(5), (6, 3, 5)),
        ("RMSNorm", lambda: nn.RMSNorm(5), (6, 3, 5)),
        ("LocalResponseNorm", lambda: nn.LocalResponseNorm(2), (6, 3, 5)),
    ]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_check_refuses_exactly_the_normalisations_that_mix_samples(mode):
    # Ground truth from the layer itself: does sample z's output change with the rest of the batch?
    x = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(1), dtype=DT)
    for name, make, shape in _norm_layers():
        layer = make().double()
        xs = x.reshape(-1)[: torch.Size(shape).numel()].reshape(shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lazy modules warn that they are experimental
            layer(xs)  # materialises lazy parameters
            layer.train(mode == "train")
            with torch.no_grad():
                # A sub-batch of two (BatchNorm refuses one sample in train mode).
                mixes = not torch.allclose(layer(xs)[2:4], layer(xs[2:4]), rtol=1e-12, atol=1e-14)
        try:
            check_samples_independent(nn.Sequential(layer))
            refused = False
        except SampleInteractionError as err:
            refused = True
            msg = str(err)
            assert "module '0'" in msg and "batch statistics" in msg, msg
            assert "track_running_stats=True" in msg and "GroupNorm or LayerNorm" in msg, msg
        assert refused == mixes, f"{name} in {mode} mode: mixes samples={mixes}, refused={refused}"
    sync = nn.SyncBatchNorm(3, track_running_stats=False).eval()  # its forward needs a process group
    with pytest.raises(SampleInteractionError, match="SyncBatchNorm.*track_running_stats=False"):
        check_samples_independent(nn.Sequential(sync))


def test_batchnorm_without_running_stats_in_eval_mode_is_refused_everywhere():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False), nn.Linear(3, 3)).double().eval()
    x, y = _data()
    msg = r"module '1' \(BatchNorm1d\) normalises with batch statistics.*even in eval mode.*track_running_stats=True"
    with pytest.raises(SampleInteractionError, match=msg):
        validation.per_sample_grads(model, F.cross_entropy, (x, y))
    with pytest.raises(SampleInteractionError, match=msg):
        estimators.per_sample_grads(model, F.cross_entropy, (x, y))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SampleInteractionError, match=msg):
        step_values(model, opt, F.cross_entropy, (x[:4], y[:4]), (x[4:], y[4:]))


# ---------------------------------------------------------------- 2. losses that couple samples
@pytest.mark.parametrize("name", sorted(COUPLED))
def test_check_loss_additive_refuses_a_coupled_loss_naming_the_pair_and_the_fix(name):
    out, y = _data()
    with pytest.raises(LossCouplingError) as info:
        check_loss_additive(COUPLED[name], out, y, what="the training batch")
    msg = str(info.value)
    assert msg.startswith("loss_fn couples the samples of the training batch"), msg
    assert "moving sample 0's outputs changes the loss gradient of sample" in msg and "against" in msg, msg
    assert "in-batch negatives" in msg and "undefined" in msg and "Fix: use a per-sample loss" in msg, msg
    assert isinstance(info.value, SampleInteractionError)


@pytest.mark.parametrize(
    "loss_fn, out, targets",
    [
        (F.mse_loss, torch.randn(5, 2, dtype=DT), torch.randn(5, 2, dtype=DT)),
        (lambda o, t: F.mse_loss(o, t, reduction="sum"), torch.randn(5, 2, dtype=DT), torch.randn(5, 2, dtype=DT)),
        (F.cross_entropy, torch.randn(5, 3, dtype=DT), torch.tensor([0, 1, 2, 0, 1])),
        (nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0], dtype=DT)), torch.randn(5, 3, dtype=DT), torch.tensor([0, 1, 2, 2, 1])),
        (nn.CrossEntropyLoss(label_smoothing=0.2), torch.randn(5, 3, dtype=DT), torch.tensor([0, 1, 2, 0, 1])),
        (lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten(), ignore_index=-100),  # token mean
         torch.randn(3, 4, 7, dtype=DT), torch.tensor([[1, 2, -100, -100], [0, 1, 2, 3], [6, -100, 5, -100]])),
        (lambda o, t: o.sum(), torch.randn(5, 3, dtype=DT), None),  # linear: zero Hessian
        (centred, torch.randn(1, 3, dtype=DT), torch.tensor([1])),  # one sample: nothing to couple
        (F.cross_entropy, torch.randn(5, 3, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 0, 1])),
    ],
    ids=["mse-mean", "mse-sum", "ce", "class-weights", "label-smoothing", "token-mean-ignore-index", "linear", "n=1", "bf16"],
)
def test_check_loss_additive_accepts_losses_with_no_cross_sample_terms(loss_fn, out, targets):
    check_loss_additive(loss_fn, out, targets)


def test_check_loss_additive_reads_hf_model_outputs_and_leaves_the_global_rng_alone():
    from transformers.modeling_outputs import CausalLMOutput

    logits, labels = torch.randn(3, 4, 7, dtype=DT), torch.randint(0, 7, (3, 4))
    outputs = CausalLMOutput(logits=logits, hidden_states=(torch.randn(3, 4, 2, dtype=DT),))
    hf_loss = lambda o, t: F.cross_entropy(o.logits.flatten(0, 1), t.flatten())  # noqa: E731
    before = torch.random.get_rng_state()
    check_loss_additive(hf_loss, outputs, labels)
    with pytest.raises(LossCouplingError):
        check_loss_additive(lambda o, t: info_nce(o.logits.flatten(1), t), CausalLMOutput(logits=logits), labels)
    assert torch.equal(before, torch.random.get_rng_state())  # training stays bit-identical


class _OnceDifferentiable(torch.autograd.Function):
    """Σ_z ‖o_z − c‖² with c = 0 (additive) or the batch mean (coupled), as a fused kernel: no double backward."""

    @staticmethod
    def forward(ctx, out, centre):
        ctx.save_for_backward(out)
        ctx.centre = centre
        return ((out - out.mean(0) if centre else out) ** 2).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return 2 * grad * (out - out.mean(0) if ctx.centre else out), None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_loss_without_double_backward_is_probed_by_finite_differences(dtype):
    out = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=dtype)
    check_loss_additive(lambda o, t: _OnceDifferentiable.apply(o, False), out, None)
    with pytest.raises(LossCouplingError, match="couples the samples"):
        check_loss_additive(lambda o, t: _OnceDifferentiable.apply(o, True), out, None)


@pytest.mark.parametrize("name", sorted(COUPLED))
def test_both_per_sample_paths_refuse_a_coupled_loss(name):
    model, batch = _mlp(), _data()
    with pytest.raises(LossCouplingError, match="couples the samples of the batch"):
        validation.per_sample_grads(model, COUPLED[name], batch)
    with pytest.raises(LossCouplingError, match="couples the samples of the training batch"):
        estimators.per_sample_grads(model, COUPLED[name], batch)


def test_step_values_refuses_in_batch_negatives():
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(LossCouplingError, match="couples the samples"):
        step_values(model, opt, info_nce, (x[:4], y[:4]), (x[4:], y[4:]))


def test_tracker_refuses_in_batch_negatives_at_construction():
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(LossCouplingError, match="couples the samples of (the )?validation batch"):
        InRunShapley(model, opt, info_nce, (x[4:], y[4:]))


# ---------------------------------------------------------------- 3. one per-sample rule for both paths
def _class_weighted(out, y):
    return F.cross_entropy(out, y, weight=torch.tensor([0.2, 1.0, 3.0], dtype=out.dtype))


def _label_smoothed(out, y):
    return F.cross_entropy(out, y, label_smoothing=0.1)


def _sample_weighted(out, y):
    w = torch.linspace(0.5, 2.0, len(y), dtype=out.dtype)
    return (w * F.cross_entropy(out, y, reduction="none")).sum() / w.sum()


class _TokenModel(nn.Module):
    """Embedding -> Linear over a sequence axis: [n, T] tokens -> [n, T, 7] logits."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 7)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)))


def _token_mean(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100)


def _token_batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 7, (n, 5), generator=g), torch.randint(0, 7, (n, 5), generator=g)
    y[0, 2:] = -100  # unequal token counts: sample 0 has 2, sample 1 has 1
    y[1, 1:] = -100
    return x, y


@pytest.mark.parametrize("loss", ["class-weights", "label-smoothing", "sample-weights", "token-mean-ignore-index"])
def test_estimator_and_oracle_agree_and_add_up_to_the_batch_gradient(loss):
    if loss == "token-mean-ignore-index":
        torch.manual_seed(0)
        model, loss_fn, batch = _TokenModel().double(), _token_mean, _token_batch()
    else:
        loss_fn = {"class-weights": _class_weighted, "label-smoothing": _label_smoothed, "sample-weights": _sample_weighted}[loss]
        model, batch = _mlp(), _data()
    oracle = validation.per_sample_grads(model, loss_fn, batch)
    est = estimators.per_sample_grads(model, loss_fn, batch)
    names = {p: name for name, p in model.named_parameters()}
    assert_close({names[p]: c for p, c in est.items()}, oracle, rtol=1e-12, atol=1e-15, name="estimator vs oracle")
    assert_close({k: v.sum(0) for k, v in oracle.items()}, _autograd_batch_grad(model, loss_fn, batch), rtol=1e-12, atol=1e-15)


def test_token_mean_share_holds_the_batch_token_count_fixed():
    # Sample z's share is the gradient of its counted tokens' loss over the BATCH's token count.
    torch.manual_seed(0)
    model, (x, y) = _TokenModel().double(), _token_batch()
    c = estimators.per_sample_grads(model, _token_mean, (x, y))
    count = int((y != -100).sum())
    for z in range(len(y)):
        own = _autograd_batch_grad(model, lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten(), ignore_index=-100, reduction="sum"), (x[z : z + 1], y[z : z + 1]))
        assert_close({n: c[p][z] for n, p in model.named_parameters()}, {k: v / count for k, v in own.items()}, rtol=1e-12, atol=1e-15)


def test_a_loss_term_outside_the_outputs_is_refused_not_dropped():
    model, batch = _mlp(), _data()
    penalised = lambda out, y: F.cross_entropy(out, y) + 1e-2 * model[0].weight.pow(2).sum()  # noqa: E731
    for per_sample_grads in (validation.per_sample_grads, estimators.per_sample_grads):
        with pytest.raises(SampleInteractionError, match=r"depends on parameter '0.weight' other than through the model's outputs.*weight_decay"):
            per_sample_grads(model, penalised, batch)


def test_a_forward_pass_that_mixes_samples_is_refused_by_the_sum_check():
    class Centre(nn.Module):  # no normalisation layer, so check_samples_independent cannot see it
        def forward(self, h):
            return h - h.mean(0)

    model = nn.Sequential(nn.Linear(4, 5), Centre(), nn.Tanh(), nn.Linear(5, 3)).double()
    for per_sample_grads in (validation.per_sample_grads, estimators.per_sample_grads):
        with pytest.raises(SampleInteractionError, match=r"do not add up to the gradient .*mixes samples in its forward"):
            per_sample_grads(model, F.cross_entropy, _data())


def test_an_output_without_a_batch_dimension_used_by_the_loss_is_refused():
    class WithAux(nn.Module):  # returns a batch-level auxiliary loss, as MoE routers do
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            out = self.fc(x)
            return out, out.pow(2).mean()

    model = WithAux().double()
    loss_fn = lambda o, y: F.cross_entropy(o[0], y) + 0.1 * o[1]  # noqa: E731
    for per_sample_grads in (validation.per_sample_grads, estimators.per_sample_grads):
        with pytest.raises(SampleInteractionError, match=r"model output \[1\] of shape \(\), which has no batch dimension"):
            per_sample_grads(model, loss_fn, _data())


_LOSSES = {
    "mean": F.cross_entropy,
    "sum": lambda o, y: F.cross_entropy(o, y, reduction="sum"),
    "class-weights": _class_weighted,
    "label-smoothing": _label_smoothed,
    "sample-weights": _sample_weighted,
}


@example(seed=0, width=1, n=1, loss="sample-weights", method="vmap")  # batch of one
@example(seed=1, width=3, n=5, loss="class-weights", method="loop")
@given(
    seed=st.integers(0, 2**16),
    width=st.integers(1, 4),
    n=st.integers(1, 6),
    loss=st.sampled_from(sorted(_LOSSES)),
    method=st.sampled_from(["vmap", "loop"]),
)
def test_contributions_add_up_to_the_batch_gradient(seed, width, n, loss, method):
    model = _mlp(seed, out=3)
    model[0] = nn.Linear(4, width).double()
    model[2] = nn.Linear(width, 3).double()
    batch = _data(n, seed=seed + 1)
    loss_fn = _LOSSES[loss]
    g_B = _autograd_batch_grad(model, loss_fn, batch)
    oracle = validation.per_sample_grads(model, loss_fn, batch, method=method)
    est = estimators.per_sample_grads(model, loss_fn, batch, method=method)
    assert_close({k: v.sum(0) for k, v in oracle.items()}, g_B, rtol=1e-10, atol=1e-14, name="Σ_z c_z (oracle) vs g_B")
    names = {p: name for name, p in model.named_parameters()}
    assert_close({names[p]: c for p, c in est.items()}, oracle, rtol=1e-12, atol=1e-15, name="estimator vs oracle")

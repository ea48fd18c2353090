"""Catalogue of real training loops: each case is valued exactly or refused with an error that names the cause.

One test per case of the reliability study (docs/reliability.md lists them with their status).
Exact values are compared with :func:`_exact_values`, built from the oracle's per-sample
gradients (``validation.per_sample_grads``, torch.func, no hooks) and the real optimizer's
linearization: φ_z = −c ⟨J(param.grad) ⊙ ∇L_val(θ_t), c_z⟩ at the current validation point.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

import optimizers
import validation
from attribution import InRunShapley, step_values
from attribution._tracker import SkippedStepWarning, TrackerUsageError
from estimators import GhostEngineError, ParameterUseError
from tests._helpers import assert_close

LOSS = nn.functional.cross_entropy
GEN = torch.Generator().manual_seed(0)
X = torch.randn(40, 5, generator=GEN, dtype=torch.float64)
Y = torch.randint(0, 3, (40,), generator=GEN)
VAL = (X[32:], Y[32:])


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _tracker(model, opt, **kw) -> InRunShapley:
    kw.setdefault("val_point", "current")
    # The slope route, which _exact_values reproduces; the exact-update route of sign-like steps
    # has its own oracle tests (tests/attribution/test_exact_route.py).
    kw.setdefault("route", "linear")
    return InRunShapley(model, opt, LOSS, VAL, record_steps=True, **kw)


def _exact_values(model, opt, ids, grad_scale: float = 1.0, linearization: str = "secant") -> torch.Tensor:
    """φ_z = −c ⟨J ⊙ ∇L_val(θ_t), c_z⟩ from oracle per-sample gradients; call just before opt.step()."""
    contributions = validation.per_sample_grads(model, LOSS, (X[ids], Y[ids]))
    lin = optimizers.linearize(opt)
    names = {name: p for name, p in model.named_parameters() if p.requires_grad}
    val_loss = LOSS(model(VAL[0]), VAL[1])
    val_grads = torch.autograd.grad(val_loss, list(names.values()))
    phi = torch.zeros(len(ids), dtype=torch.float64)
    for (name, p), g_val in zip(names.items(), val_grads):
        if p not in lin or p.grad is None:
            continue
        J = lin.secant(p, p.grad) if linearization == "secant" else -lin.learning_rate(p)
        P = J * g_val
        phi -= grad_scale * (contributions[name].reshape(len(ids), -1) @ P.reshape(-1))
    return phi


def _last_step(tracker) -> torch.Tensor:
    h = tracker.history()
    return torch.tensor(h[h.step == h.step.max()]["value"].to_numpy())


def _tracked_step(model, opt, tracker, ids, *, inside=None, after=None):
    """One step; ``inside(model)`` runs inside the batch block after the backward, ``after`` between block and step.

    Returns the exact values computed just before ``opt.step()`` (with the measured clip factor).
    """
    opt.zero_grad()
    with tracker.batch(ids):
        LOSS(model(X[ids]), Y[ids]).backward()
        raw = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
        if inside is not None:
            inside(model)
    if after is not None:
        after(model)
    scale = float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in raw]))) / float(
        torch.linalg.vector_norm(torch.cat([raw[p].reshape(-1) for p in raw]))
    )
    expected = _exact_values(model, opt, ids, grad_scale=scale)
    opt.step()
    return expected, scale


# ---------------------------------------------------------------- 1. the completeness check


@pytest.mark.parametrize("where", ["inside", "after"])
def test_clip_grad_norm_is_valued_exactly_inside_and_after_the_block(where):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tracker = _tracker(model, opt)
    clip = lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.05)  # noqa: E731
    for step in range(3):
        ids = list(range(8 * step, 8 * step + 8))
        expected, scale = _tracked_step(model, opt, tracker, ids, **{where: clip})
        assert scale < 0.9  # the clip really clips
        assert_close(_last_step(tracker), expected, rtol=1e-9, atol=1e-15)
        assert tracker.last_grad_scale == pytest.approx(scale, rel=1e-9)
    tracker.close()


def test_grad_scaler_unscale_inside_the_block_is_valued_exactly():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    tracker = _tracker(model, opt)
    for step in range(2):
        ids = list(range(8 * step, 8 * step + 8))
        opt.zero_grad()
        with tracker.batch(ids):
            scaler.scale(LOSS(model(X[ids]), Y[ids])).backward()
            scaler.unscale_(opt)
        expected = _exact_values(model, opt, ids)
        scaler.step(opt)
        scaler.update()
        assert_close(_last_step(tracker), expected, rtol=1e-9, atol=1e-15)
        assert tracker.last_grad_scale == pytest.approx(2.0**-16, rel=1e-9)
    tracker.close()


@pytest.mark.parametrize("where", ["inside", "after"])
def test_clip_grad_value_is_refused_inside_and_after_the_block(where):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = _tracker(model, opt)
    clip = lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), 1e-3)  # noqa: E731
    opt.zero_grad()
    with tracker.batch(range(8)):
        LOSS(model(X[:8]), Y[:8]).backward()
        if where == "inside":
            clip(model)
    if where == "after":
        clip(model)
    with pytest.raises(TrackerUsageError, match=r"gradient of parameter '\d\.(weight|bias)' is not the sum.*clip_grad_value_"):
        opt.step()
    tracker.close()


def test_a_layer_unfrozen_after_the_tracker_was_created_is_tracked_from_then_on():
    model = _model()
    model[0].requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = _tracker(model, opt)
    _tracked_step(model, opt, tracker, list(range(8)))
    model[0].requires_grad_(True)
    expected, _ = _tracked_step(model, opt, tracker, list(range(8, 16)))
    assert_close(_last_step(tracker), expected, rtol=1e-9, atol=1e-15)
    tracker.close()


def test_a_module_added_with_add_param_group_is_tracked_from_then_on():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = _tracker(model, opt)
    _tracked_step(model, opt, tracker, list(range(8)))
    torch.manual_seed(3)
    extra = nn.Linear(3, 3).double()
    model.append(extra)
    opt.add_param_group({"params": extra.parameters(), "lr": 5e-3})
    expected, _ = _tracked_step(model, opt, tracker, list(range(8, 16)))
    assert_close(_last_step(tracker), expected, rtol=1e-9, atol=1e-15)
    tracker.close()


def test_a_forward_hook_that_changes_a_layers_output_is_valued_exactly():
    model = _model()
    model[0].register_forward_hook(lambda module, args, output: 2.0 * output + 0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = _tracker(model, opt)
    for step in range(2):
        expected, _ = _tracked_step(model, opt, tracker, list(range(8 * step, 8 * step + 8)))
        assert_close(_last_step(tracker), expected, rtol=1e-9, atol=1e-15)
    tracker.close()


def test_a_gradient_penalty_with_create_graph_inside_the_block_is_refused():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = _tracker(model, opt)
    with tracker.batch(range(8)):
        x = X[:8].clone().requires_grad_(True)
        loss = LOSS(model(x), Y[:8])
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + g.pow(2).sum()).backward()
    with pytest.raises(GhostEngineError, match="create_graph=True"):
        opt.step()
    tracker.close()


def test_a_second_backward_through_the_same_graph_is_valued_as_one_backward_of_the_sum():
    model, reference = _model(), _model()
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(reference.parameters(), lr=1e-2)
    tracker, ref_tracker = _tracker(model, opt), _tracker(reference, ref_opt)
    with tracker.batch(range(8)):
        out = model(X[:8])
        LOSS(out, Y[:8]).backward(retain_graph=True)
        (out[:, 0].sum() * 0.3).backward()  # another per-sample objective through the same graph
    opt.step()
    with ref_tracker.batch(range(8)):
        out = reference(X[:8])
        (LOSS(out, Y[:8]) + out[:, 0].sum() * 0.3).backward()
    ref_opt.step()
    assert_close(_last_step(tracker), _last_step(ref_tracker), rtol=1e-10, atol=1e-15)
    tracker.close(), ref_tracker.close()


def test_a_gradient_hook_on_one_parameter_is_refused():
    model = _model()
    model[2].weight.register_hook(lambda g: 3.0 * g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = _tracker(model, opt)
    with tracker.batch(range(8)):
        LOSS(model(X[:8]), Y[:8]).backward()
    with pytest.raises(TrackerUsageError, match=r"parameter '2\.weight'.*a ratio of 3"):
        opt.step()
    tracker.close()


def test_a_backward_outside_the_block_with_zero_grad_set_to_none_false_is_refused_naming_it():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = _tracker(model, opt)
    opt.zero_grad(set_to_none=False)
    LOSS(model(X[20:28]), Y[20:28]).backward()  # not in the block: adds to .grad uncaptured
    with tracker.batch(range(8)):
        LOSS(model(X[:8]), Y[:8]).backward()
    with pytest.raises(TrackerUsageError, match="a backward pass outside `tracker.batch`"):
        opt.step()
    tracker.close()


# ---------------------------------------------------------------- 3. training is unchanged


class _Counter(nn.Module):
    """A per-sample layer with a running buffer updated in train mode (like running statistics)."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(d, dtype=torch.float64))

    def forward(self, x):
        if self.training:
            self.seen += 1
            self.running.mul_(0.9).add_(0.1 * x.detach().mean(tuple(range(x.dim() - 1))))
        return x


class _TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6, max_norm=1.0)
        self.drop = nn.Dropout(0.3)
        self.counter = _Counter(6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(self.counter(self.drop(self.emb(tokens))).mean(1))


def _train_token_net(tracked: bool, steps: int = 6):
    torch.manual_seed(0)
    model = _TokenNet().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, 20, (30, 4), generator=gen), torch.randint(0, 3, (30,), generator=gen)
    tracker = InRunShapley(model, opt, LOSS, (tokens[24:], labels[24:])) if tracked else None
    for step in range(steps):
        ids = list(range(4 * step, 4 * step + 4))
        opt.zero_grad()
        ctx = tracker.batch(ids) if tracked else _null()
        with ctx:
            LOSS(model(tokens[ids]), labels[ids]).backward()
        opt.step()
    return model, opt, torch.get_rng_state()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _assert_bit_identical(a, b):
    (ma, oa, ra), (mb, ob, rb) = a, b
    assert torch.equal(ra, rb), "the global RNG differs"
    for (name, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(x, y), f"state {name} differs"
    for (pa, sa), sb in zip(oa.state.items(), ob.state.values()):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), f"optimizer state {key} differs"


def test_attaching_the_tracker_leaves_training_bit_identical_with_dropout_buffers_and_max_norm():
    _assert_bit_identical(_train_token_net(False), _train_token_net(True))


def test_attaching_the_tracker_leaves_a_hugging_face_bert_with_default_dropout_bit_identical():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, max_position_embeddings=16, num_labels=2
    )

    def run(tracked: bool):
        torch.manual_seed(0)
        bert = transformers.BertForSequenceClassification(config).train()
        opt = torch.optim.AdamW(bert.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(2)
        ids, labels = torch.randint(1, 40, (12, 6), generator=gen), torch.randint(0, 2, (12,), generator=gen)
        loss_fn = lambda out, y: nn.functional.cross_entropy(out.logits, y)  # noqa: E731
        tracker = InRunShapley(bert, opt, loss_fn, (ids[8:], labels[8:])) if tracked else None
        for step in range(2):
            rows = list(range(4 * step, 4 * step + 4))
            opt.zero_grad()
            with tracker.batch(rows) if tracked else _null():
                loss_fn(bert(ids[rows]), labels[rows]).backward()
            opt.step()
        return bert, opt, torch.get_rng_state()

    _assert_bit_identical(run(False), run(True))


def test_step_values_draws_from_the_global_rng_only_for_its_training_pass():
    model = _TokenNet().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens, labels = torch.randint(0, 20, (12, 4)), torch.randint(0, 3, (12,))
    torch.manual_seed(5)
    a = step_values(model, opt, LOSS, (tokens[:8], labels[:8]), (tokens[8:], labels[8:]))
    after_step_values = torch.get_rng_state()
    torch.manual_seed(5)
    LOSS(model(tokens[:8]), labels[:8]).backward()  # the training pass alone: its dropout masks
    assert torch.equal(after_step_values, torch.get_rng_state())
    torch.manual_seed(5)
    assert torch.equal(a, step_values(model, opt, LOSS, (tokens[:8], labels[:8]), (tokens[8:], labels[8:])))


# ---------------------------------------------------------------- 4. loops that must keep running


def test_a_step_skipped_by_grad_scaler_is_discarded_with_a_warning_and_the_loop_goes_on():
    model = _model().float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    tracker = InRunShapley(model, opt, LOSS, (VAL[0].float(), VAL[1]))
    with pytest.warns(SkippedStepWarning, match="GradScaler skipped it"):
        for step in range(3):
            ids = list(range(8 * step, 8 * step + 8))
            opt.zero_grad()
            with tracker.batch(ids):
                boost = 1e30 if step == 0 else 1.0  # the first scaled backward overflows
                scaler.scale(LOSS(model(X[ids].float()), Y[ids]) * boost).backward()
            scaler.step(opt)
            scaler.update()
    assert [step for step, _ in tracker.skipped_steps] == [0] and tracker.steps == 3
    assert len(tracker.values()) > 0  # later steps were valued
    tracker.close()


def test_discard_drops_a_deliberately_skipped_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = _tracker(model, opt)
    with tracker.batch(range(8)):
        LOSS(model(X[:8]), Y[:8]).backward()
    tracker.discard()
    opt.zero_grad()
    expected, _ = _tracked_step(model, opt, tracker, list(range(8, 16)))
    assert tracker.steps == 1 and sorted(tracker.values().index) == list(range(8, 16))
    assert_close(_last_step(tracker), expected, rtol=1e-9, atol=1e-15)
    tracker.close()


def test_an_exception_caught_inside_the_block_drops_its_capture():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = _tracker(model, opt)
    with pytest.raises(RuntimeError, match="logging failed"):
        with tracker.batch(range(8)):
            LOSS(model(X[:8]), Y[:8]).backward()
            raise RuntimeError("logging failed")  # the user catches it and goes on with the next batch
    expected, _ = _tracked_step(model, opt, tracker, list(range(8, 16)))
    assert_close(_last_step(tracker), expected, rtol=1e-9, atol=1e-15)
    tracker.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_with_clip_grad_norm_are_valued(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    # (Adam's eps=1e-8 underflows in float16: its second step would be NaN without the tracker too.)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    tracker = InRunShapley(model, opt, LOSS, (VAL[0].to(dtype), VAL[1]))
    for step in range(2):
        ids = list(range(8 * step, 8 * step + 8))
        opt.zero_grad()
        with tracker.batch(ids):
            LOSS(model(X[ids].to(dtype)), Y[ids]).backward()
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in model.parameters()])))
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
        opt.step()
        assert tracker.last_grad_scale == pytest.approx(0.01 / norm, rel=0.05)
    assert tracker.steps == 2 and not tracker.skipped_steps
    tracker.close()


def test_a_tracker_recreated_without_close_replaces_the_old_one():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = _tracker(model, opt)
    tracker = _tracker(model, opt)  # a notebook cell run twice: the first tracker is unreachable now
    gc.collect()
    expected, _ = _tracked_step(model, opt, tracker, list(range(8)))
    assert_close(_last_step(tracker), expected, rtol=1e-9, atol=1e-15)
    tracker.close()


def test_a_step_refused_by_one_tracker_is_not_counted_by_the_other():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = _tracker(model, opt)
    second = _tracker(model, opt, stream=True)  # stream=True refuses a clipped step
    opt.zero_grad()
    with first.batch(range(8)), second.batch(range(8)):
        pass
    first.discard(), second.discard()
    opt.zero_grad()
    # Both trackers capture the same block (nested blocks of different trackers).
    with second.batch(range(8)):
        with first.batch(range(8)):
            LOSS(model(X[:8]), Y[:8]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    with pytest.raises(TrackerUsageError, match="changed after the backward pass"):
        opt.step()
    opt.zero_grad()
    with pytest.warns(SkippedStepWarning, match="did not complete"):
        with first.batch(range(8, 16)):
            LOSS(model(X[8:16]), Y[8:16]).backward()
    assert first.steps == 0 and len(first.values()) == 0
    first.close(), second.close()


def test_step_with_a_closure_that_holds_the_batch_block_is_valued():
    model, reference = _model(), _model()
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(reference.parameters(), lr=1e-2)
    tracker, ref_tracker = _tracker(model, opt), _tracker(reference, ref_opt)
    for step in range(2):
        ids = list(range(8 * step, 8 * step + 8))

        def closure():
            opt.zero_grad()
            with tracker.batch(ids):
                loss = LOSS(model(X[ids]), Y[ids])
                loss.backward()
            return loss

        opt.step(closure)
        _tracked_step(reference, ref_opt, ref_tracker, ids)
    assert_close(torch.tensor(tracker.values()["value"].to_numpy()), torch.tensor(ref_tracker.values()["value"].to_numpy()), rtol=1e-12)
    tracker.close(), ref_tracker.close()


def test_step_inside_the_block_is_refused_saying_so():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = _tracker(model, opt)
    with pytest.raises(TrackerUsageError, match=r"called inside `with tracker.batch\(ids\):`"):
        with tracker.batch(range(8)):
            LOSS(model(X[:8]), Y[:8]).backward()
            opt.step()
    tracker.close()


# ---------------------------------------------------------------- 6. errors that say what happened


def test_an_empty_batch_is_refused_at_batch():
    model = _model()
    tracker = _tracker(model, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="got no ids"):
        with tracker.batch([]):
            pass
    tracker.close()


def test_two_forwards_in_one_block_say_how_many_model_calls_were_captured():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    tracker = _tracker(model, opt)
    with tracker.batch(range(8)):
        (LOSS(model(X[:8]), Y[:8]) + LOSS(model(X[8:16]), Y[8:16])).backward()
    with pytest.raises(ValueError, match="called the model 2 times"):
        opt.step()
    tracker.close()


def test_a_block_without_backward_says_so():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    tracker = _tracker(model, opt)
    with tracker.batch(range(8)):
        LOSS(model(X[:8]), Y[:8])
    with pytest.raises(TrackerUsageError, match="no backward reached them"):
        opt.step()
    tracker.close()


def test_mixed_float32_and_float64_parameters_are_valued_in_float64():
    class ToDouble(nn.Module):
        def forward(self, x):
            return x.double()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), ToDouble(), nn.Linear(8, 3).double())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    phi = step_values(model, opt, LOSS, (X[:8].float(), Y[:8]), (VAL[0].float(), VAL[1]), linearization="sgd", val_point="current")
    assert phi.dtype == torch.float64 and torch.isfinite(phi).all()


@pytest.mark.parametrize("kind", ["weight_norm", "parametrize", "prune"])
def test_reparametrized_weights_are_refused_naming_the_reparametrization(kind):
    model = _model()
    if kind == "weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(model[0])
        match = "torch.nn.utils.weight_norm"
    elif kind == "parametrize":
        torch.nn.utils.parametrizations.weight_norm(model[0])
        match = "torch.nn.utils.parametrize"
    else:
        torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.3)
        match = "torch.nn.utils.prune"
    with pytest.raises(ParameterUseError, match=match):
        _tracker(model, torch.optim.Adam(model.parameters()))


def test_flattened_tokens_are_refused_with_a_hint():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3).double()

        def forward(self, x):  # x [n, T, 5] -> [n*T, 5]: positions folded into the batch axis
            return self.fc(x.reshape(-1, 5)).reshape(x.shape[0], -1, 3).mean(1)

    model = Flat()
    opt = torch.optim.Adam(model.parameters())
    seq = X[:32].reshape(8, 4, 5)
    tracker = InRunShapley(model, opt, LOSS, (seq[6:], Y[6:8]))
    with tracker.batch(range(6)):
        LOSS(model(seq[:6]), Y[:6]).backward()
    with pytest.raises(ValueError, match=r"flatten positions into the batch axis \(\[n\*T, d\]\)"):
        opt.step()
    tracker.close()


def test_sequence_first_modules_are_refused_naming_batch_first():
    model = nn.Sequential(nn.Linear(4, 4), nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0))
    with pytest.raises(GhostEngineError, match="batch_first=False"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), lambda out, y: out.pow(2).mean(), (torch.randn(3, 2, 4), None))


def test_embedding_bag_with_offsets_is_refused_with_the_fix():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(10, 3)

        def forward(self, x):
            flat, offsets = x
            return self.bag(flat, offsets)

    model = Bag()
    opt = torch.optim.Adam(model.parameters())
    val = ((torch.tensor([1, 2, 3]), torch.tensor([0, 2])), torch.tensor([0, 1]))
    loss = lambda out, y: nn.functional.cross_entropy(out, y)  # noqa: E731
    tracker = InRunShapley(model, opt, loss, val)
    with pytest.raises(GhostEngineError, match=r"1-D input and offsets.*\[n, bag_size\]"):
        with tracker.batch([0, 1]):
            loss(model((torch.tensor([4, 5, 6, 7]), torch.tensor([0, 1]))), torch.tensor([1, 0])).backward()
    tracker.close()


def test_a_non_finite_slope_is_named_as_the_cause_of_a_skipped_step():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = _tracker(model, opt)
    _tracked_step(model, opt, tracker, list(range(8)))
    opt.state[model[0].weight]["exp_avg_sq"][0, 0] = float("nan")
    opt.zero_grad()
    with tracker.batch(range(8, 16)):
        LOSS(model(X[8:16]), Y[8:16]).backward()
    with pytest.warns(Warning, match="slope J of parameter '0.weight' is not finite"):
        opt.step()
    tracker.close()


@pytest.mark.parametrize("muon_first", [True, False])
def test_a_second_optimizer_stepping_parameters_the_tracked_one_does_not_hold_is_refused(muon_first):
    """The Muon recipe (Muon on weight matrices, AdamW on the rest) with a tracker on AdamW: the
    Muon-stepped matrices would be valued as not moving (issue 17: silently wrong values)."""
    model = _model().float()
    matrices = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    muon = torch.optim.Muon(matrices, lr=0.02) if hasattr(torch.optim, "Muon") else torch.optim.SGD(matrices, lr=0.02)
    adamw = torch.optim.AdamW(rest, lr=1e-2)
    tracker = InRunShapley(model, adamw, LOSS, (VAL[0].float(), VAL[1]))
    with pytest.raises(TrackerUsageError, match=r"'0\.weight'.*another optimizer steps them"):
        for step in range(2):
            ids = list(range(8 * step, 8 * step + 8))
            muon.zero_grad(), adamw.zero_grad()
            with tracker.batch(ids):
                LOSS(model(X[ids].float()), Y[ids]).backward()
            for opt in (muon, adamw) if muon_first else (adamw, muon):
                opt.step()
    assert tracker.steps <= 1
    tracker.close()


def test_a_trainable_parameter_no_optimizer_steps_is_still_valued_as_not_moving():
    model = _model()
    opt = torch.optim.Adam(model[2].parameters(), lr=1e-2)  # model[0] trainable but never stepped
    tracker = _tracker(model, opt)
    for step in range(3):
        _tracked_step(model, opt, tracker, list(range(8 * step, 8 * step + 8)))
    assert tracker.steps == 3
    tracker.close()

"""InRunShapley(stream=True): the in-backward contraction gives the same values and frees memory.

Equality with ``stream=False`` over random architectures and optimizers is fuzzed in
``tests/reliability/test_fuzz.py``; here: transformer layers, the release of captured tensors,
the fallback mixed with streamed layers, half precision, and every refused use.
"""

import copy

import pytest
import torch
from torch import nn

import estimators as E
from attribution import InRunShapley, TrackerUsageError
from attribution.experiments.models import TinyLM
from tests._helpers import assert_close

from .test_tracker import LOSS, VAL, X, Y
from .test_tracker import _model as _mlp


def _streamed():
    """A small MLP, its Adam, and a streamed tracker on it."""
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt, InRunShapley(model, opt, LOSS, VAL, val_point="current", stream=True)


def _train(model, opt, loss_fn, batches, val, *, stream, **kw):
    # The slope route on both sides: a streamed step cannot switch to the exact-update route.
    kw.setdefault("route", "linear")
    kw.setdefault("val_point", "current")
    with InRunShapley(model, opt, loss_fn, val, stream=stream, record_steps=True, **kw) as tracker:
        for ids, (x, y) in batches:
            opt.zero_grad()
            with tracker.batch(ids):
                loss_fn(model(x), y).backward()
            opt.step()
        return tracker.history()


def _lm_loss(logits, y):
    return LOSS(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("estimator", ["ghost", "ghost-factored"])
@pytest.mark.parametrize("linearization", ["secant", "tangent", "sgd"])
def test_streamed_values_equal_values_after_the_step_on_a_tied_decoder(estimator, linearization):
    torch.manual_seed(0)
    model = TinyLM(vocab=40, width=16, depth=2, heads=2, max_len=8, tied=True).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 40, (20, 9), generator=g)
    batches = [(list(range(5 * s, 5 * s + 5)), (tokens[5 * s:5 * s + 5, :-1], tokens[5 * s:5 * s + 5, 1:])) for s in range(3)]
    val = (tokens[15:, :-1], tokens[15:, 1:])
    kw = dict(linearization=linearization, estimator=estimator)
    streamed = _train(model, opt, _lm_loss, batches, val, stream=True, **kw)
    after = _train(twin_model, twin_opt, _lm_loss, batches, val, stream=False, **kw)
    assert_close(torch.tensor(streamed["value"].to_numpy()), torch.tensor(after["value"].to_numpy()), rtol=1e-10, atol=1e-14)
    assert float(after["value"].abs().max()) > 1e-6
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_captured_tensors_are_released_during_the_backward():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    engine = E.GhostEngine(model)
    released_at_hook = []

    def slope(p, g):
        # Called from the post-accumulate-grad hook: the first layer's gradient is the last to arrive,
        # by then the output layer (contracted first) must already be released.
        released_at_hook.append([c.streamed for pas in engine._train for c in pas.calls])
        return torch.ones_like(p)

    engine.stream([{p: torch.randn_like(p) for p in model.parameters()}], slope)
    with engine.capture_train():
        LOSS(model(X[:6]), Y[:6]).backward()
    calls = [c for pas in engine._train for c in pas.calls]
    assert [c.streamed for c in calls] == [True, True]
    assert all(c.args == () and c.terms is None and c.grad.stride() == (0, 0) for c in calls)
    assert released_at_hook[-1] == [False, True]  # layer 0's own hook ran while layer 2 was released
    assert engine.values({}).shape == (6, 1)
    del opt


class Scale(nn.Module):
    """A layer no rule covers: its parameter takes the per-parameter fallback after the step."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.ones(d, dtype=torch.float64))

    def forward(self, x):
        return x * self.s


def test_fallback_parameters_are_added_after_the_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), Scale(6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    batches = [(list(range(6 * s, 6 * s + 6)), (X[6 * s:6 * s + 6], Y[6 * s:6 * s + 6])) for s in range(3)]
    streamed = _train(model, opt, LOSS, batches, VAL, stream=True)
    after = _train(twin_model, twin_opt, LOSS, batches, VAL, stream=False)
    assert_close(torch.tensor(streamed["value"].to_numpy()), torch.tensor(after["value"].to_numpy()), rtol=1e-10, atol=1e-14)


def test_half_precision_parameters_stream_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3)).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    x, y = X.to(torch.bfloat16), Y
    batches = [(list(range(6 * s, 6 * s + 6)), (x[6 * s:6 * s + 6], y[6 * s:6 * s + 6])) for s in range(2)]
    val = (x[-8:], y[-8:])
    streamed = _train(model, opt, LOSS, batches, val, stream=True)
    after = _train(twin_model, twin_opt, LOSS, batches, val, stream=False)
    assert_close(torch.tensor(streamed["value"].to_numpy()), torch.tensor(after["value"].to_numpy()), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("weight_decay, decoupled", [(0.1, True), (0.1, False), (0.0, False)])
def test_the_predicted_point_streams_with_the_unstreamed_values(weight_decay, decoupled):
    """val_point='predicted' (θ_t + ½(Δ(m̂) + Δ(0))) is known before the backward: streamed = after the step, to 1e-10."""
    torch.manual_seed(0)
    model = TinyLM(vocab=40, width=16, depth=2, heads=2, max_len=8, tied=True).double()
    opt = (torch.optim.AdamW if decoupled else torch.optim.Adam)(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    first_model, first_opt = copy.deepcopy((model, opt))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 40, (25, 9), generator=g)
    batches = [(list(range(5 * s, 5 * s + 5)), (tokens[5 * s:5 * s + 5, :-1], tokens[5 * s:5 * s + 5, 1:])) for s in range(4)]
    val = (tokens[20:, :-1], tokens[20:, 1:])
    streamed = _train(model, opt, _lm_loss, batches, val, stream=True, val_point="predicted")
    after = _train(twin_model, twin_opt, _lm_loss, batches, val, stream=False, val_point="predicted")
    current = _train(first_model, first_opt, _lm_loss, batches, val, stream=False, val_point="current")
    a, b, c = (torch.tensor(h["value"].to_numpy()) for h in (streamed, after, current))
    assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert float((b - c).abs().max()) > 1e-3 * float(c.abs().max())  # the point moved after the first step
    for p, q, r in zip(model.parameters(), twin_model.parameters(), first_model.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)  # training untouched


def test_the_predicted_point_is_refused_for_an_optimizer_without_a_first_moment():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    tracker = InRunShapley(model, opt, LOSS, VAL, val_point="predicted", stream=True)
    with pytest.raises(ValueError, match=r"val_point='predicted' needs the optimizer's prediction.*SGD does not keep.*'midpoint'"):
        with tracker.batch(list(range(len(Y)))):
            LOSS(model(X), Y).backward()


# ------------------------------------------------------------------------------ refused uses
@pytest.mark.parametrize("kw,match", [
    (dict(val_point="midpoint"), "val_point='current' or 'predicted'"),
    (dict(val_point="lookahead"), "val_point='current' or 'predicted'"),
    (dict(val_point="current", estimator="materialized"), "materialized"),
])
def test_stream_refuses_settings_it_cannot_honour(kw, match):
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=match):
        InRunShapley(model, opt, LOSS, VAL, stream=True, **kw)


def test_gradient_accumulation_is_refused():
    model, opt, tracker = _streamed()
    with tracker.batch([0, 1]):
        LOSS(model(X[:2]), Y[:2]).backward()
    with pytest.raises(TrackerUsageError, match="gradient accumulation"):
        with tracker.batch([2, 3]):
            pass
    tracker.close()


def test_clipping_is_refused_but_a_clip_that_does_not_clip_is_not():
    model, opt, tracker = _streamed()
    with tracker.batch([0, 1, 2]):
        LOSS(model(X[:3]), Y[:3]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e6)  # multiplies by 1: fine
    opt.step()
    opt.zero_grad()
    with tracker.batch([3, 4, 5]):
        LOSS(model(X[3:6]), Y[3:6]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    with pytest.raises(TrackerUsageError, match=r"changed after the backward pass.*stream=False"):
        opt.step()
    assert tracker.steps == 1
    tracker.close()


def test_a_second_backward_in_one_step_is_refused():
    model, opt, tracker = _streamed()
    with tracker.batch([0, 1, 2]):
        loss = LOSS(model(X[:3]), Y[:3])
        loss.backward(retain_graph=True)
        loss.backward()
    with pytest.raises(E.GhostEngineError, match="second gradient"):
        opt.step()
    tracker.close()


def test_a_replaced_gradient_is_refused():
    model, opt, tracker = _streamed()
    with tracker.batch([0, 1, 2]):
        LOSS(model(X[:3]), Y[:3]).backward()
        model[0].weight.grad = model[0].weight.grad.clone()
    with pytest.raises(E.GhostEngineError, match="was replaced"):
        opt.step()
    tracker.close()


def test_an_error_inside_the_batch_context_leaves_the_tracker_usable():
    model, opt, tracker = _streamed()
    with pytest.raises(RuntimeError):
        with tracker.batch([0, 1]):
            model(torch.ones(2, 7, dtype=torch.float64))  # wrong width
    with tracker.batch([0, 1]):
        LOSS(model(X[:2]), Y[:2]).backward()
    opt.step()
    assert tracker.steps == 1
    tracker.close()


def test_engine_stream_argument_errors():
    model = _mlp()
    engine = E.GhostEngine(model)
    with pytest.raises(ValueError, match="non-empty list"):
        engine.stream({}, lambda p, g: 1.0)
    with engine.capture_train():
        LOSS(model(X[:2]), Y[:2]).backward()
    with pytest.raises(E.GhostEngineError, match="before the step's training capture"):
        engine.stream([{}], lambda p, g: 1.0)


def test_contract_streamed_needs_a_stream_without_own_hooks():
    model = _mlp()
    engine = E.GhostEngine(model)
    params = list(model.parameters())
    with pytest.raises(E.GhostEngineError, match=r"contract_streamed\(\) needs a stream\(\.\.\., own_hooks=False\)"):
        engine.contract_streamed(params, [torch.zeros_like(p) for p in params])
    engine.stream([{p: torch.randn_like(p) for p in params}], lambda p, g: 1.0)  # own hooks: the engine's
    with pytest.raises(E.GhostEngineError, match="own_hooks=False"):
        engine.contract_streamed(params, [torch.zeros_like(p) for p in params])


def test_contract_streamed_values_equal_the_engines_own_hooks():
    """own_hooks=False with each parameter's gradient handed in equals the post-accumulate-grad hooks."""
    model = _mlp()
    G = [{p: torch.randn_like(p) for p in model.parameters()}]
    J = {p: torch.rand_like(p) for p in model.parameters()}
    engine = E.GhostEngine(model)
    engine.stream(G, lambda p, g: J[p] * torch.sign(g))  # J depends on the gradient it is given
    with engine.capture_train():
        LOSS(model(X[:6]), Y[:6]).backward()
    own = engine.values({})
    engine.clear()
    model.zero_grad()
    engine.stream(G, lambda p, g: J[p] * torch.sign(g), own_hooks=False)
    assert engine.streaming
    with engine.capture_train():
        LOSS(model(X[:6]), Y[:6]).backward()
    assert engine.streamed_params == set()  # no hook of its own ran
    params = list(model.parameters())
    engine.contract_streamed(params, [p.grad.clone() for p in params])
    assert engine.streamed_params == set(params)
    assert_close(engine.values({}), own, rtol=1e-12, atol=1e-15)


class _BucketViewDDP:
    """Just what attach_stream_hook reads of a DistributedDataParallel model (no process group needed)."""

    def __init__(self):
        self.gradient_as_bucket_view, self.process_group, self._comm_hooks, self.registered = True, None, [], []

    def register_comm_hook(self, state, hook):
        self.registered.append(hook)


@pytest.mark.parametrize("world", [3, 4])
def test_ddp_stream_refuses_a_bucket_view_average_that_would_round_differently(monkeypatch, world):
    """gradient_as_bucket_view=True: DDP divides by W, the hook multiplies by 1/W; equal bits only for W = 2^k."""
    import torch.distributed as dist

    from attribution._distributed import attach_stream_hook

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    ddp, engine = _BucketViewDDP(), E.GhostEngine(_mlp())
    if world == 3:
        with pytest.raises(ValueError, match=r"gradient_as_bucket_view=True\) with 3 processes: .*power of two"):
            attach_stream_hook(ddp, engine)
        assert not ddp.registered
    else:
        assert attach_stream_hook(ddp, engine).world_size == 4 and len(ddp.registered) == 1

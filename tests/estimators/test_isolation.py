"""isolated_pass: extra passes on the user's model leave training bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from estimators import isolated_pass


class Net(nn.Module):
    """Embedding(max_norm) -> Linear -> BatchNorm -> Dropout -> Linear: every side effect a forward can have."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, max_norm=1.0)
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(6, 2)
        with torch.no_grad():
            self.emb.weight.mul_(5.0)  # rows well above max_norm, so every lookup renormalises

    def forward(self, tokens):
        return self.head(self.drop(self.bn(self.fc(self.emb(tokens)))))


class Rebinds(nn.Module):
    """A forward that re-binds one buffer to a new tensor and registers another."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls = self.calls + 1  # a new tensor object
        self.register_buffer("cache", x.detach().clone(), persistent=False)
        return self.fc(x)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k}: max diff {(a[k].double() - b[k].double()).abs().max()}"


def tokens(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train-mode"])
def test_global_rng_is_restored(train_mode):
    model = Net().train()
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    with isolated_pass(model, train_mode=train_mode):
        model(tokens())
    assert torch.equal(torch.rand(1), expected)


def test_eval_by_default_makes_the_pass_deterministic():
    model = Net(p=0.9).train()
    x = tokens()
    outputs = []
    for _ in range(2):  # two separate passes, as two calls of the tracker would make
        with isolated_pass(model):
            assert not any(m.training for m in model.modules())
            outputs.append(model(x))
    assert torch.equal(*outputs)


def test_train_mode_keeps_dropout_active():
    model = Net(p=0.9).train()
    x = tokens()
    with isolated_pass(model, train_mode=True):
        assert all(m.training for m in model.modules())
        h = model.bn(model.fc(model.emb(x)))
        dropped = model.drop(h)
    assert (dropped == 0).any() and not (h == 0).any()


def test_batchnorm_running_stats_and_counter_are_restored_in_place():
    model = Net().train()
    bn = model.bn
    objects = {name: b for name, b in bn.named_buffers()}
    before = state_of(model)
    with isolated_pass(model, train_mode=True):
        model(tokens())
        assert int(bn.num_batches_tracked) == 1  # the pass did update them
    assert_bit_identical(state_of(model), before)
    assert all(b is objects[name] for name, b in bn.named_buffers())


def test_untouched_buffers_keep_their_version_counter():
    model = Net().eval()  # eval BatchNorm reads its running stats and writes nothing
    versions = {name: b._version for name, b in model.named_buffers()}
    with isolated_pass(model):
        model(tokens())
    assert {name: b._version for name, b in model.named_buffers()} == versions


def test_rebound_and_added_buffers_are_put_back():
    model = Rebinds()
    calls = model.calls
    with isolated_pass(model):
        model(torch.ones(2, 3))
        assert model.calls is not calls and "cache" in dict(model.named_buffers())
    assert model.calls is calls and int(calls) == 0
    assert set(dict(model.named_buffers())) == {"calls"}
    assert "cache" not in model.state_dict() and not hasattr(model, "cache")


@pytest.mark.parametrize("cls", [nn.Embedding, nn.EmbeddingBag])
def test_max_norm_renormalisation_is_undone(cls):
    emb = cls(6, 3, max_norm=0.5)
    weight, before = emb.weight, emb.weight.detach().clone()
    x = torch.tensor([[0, 2, 4]])
    with isolated_pass(emb):
        emb(x)
        assert not torch.equal(emb.weight, before)  # the forward did renormalise in place
    assert emb.weight is weight and torch.equal(emb.weight, before)


def test_mixed_training_flags_are_restored_exactly():
    model = Net().train()
    model.bn.eval()  # a frozen sub-module kept in eval
    flags = [m.training for m in model.modules()]
    with isolated_pass(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == flags
    with isolated_pass(model, train_mode=True):
        assert [m.training for m in model.modules()] == flags
        model.train()  # a pass that changes modes itself
    assert [m.training for m in model.modules()] == flags


def test_everything_is_restored_on_exception():
    model = Net().train()
    model.drop.eval()
    flags = [m.training for m in model.modules()]
    before = state_of(model)
    torch.manual_seed(1)
    expected = torch.rand(1)
    torch.manual_seed(1)
    with pytest.raises(RuntimeError, match="boom"):
        with isolated_pass(model, train_mode=True):
            model(tokens())
            torch.rand(5)
            raise RuntimeError("boom")
    assert torch.equal(torch.rand(1), expected)
    assert_bit_identical(state_of(model), before)
    assert [m.training for m in model.modules()] == flags


def test_nested_passes_each_restore_their_own_snapshot():
    model = Net().train()
    before = state_of(model)
    torch.manual_seed(2)
    expected = torch.rand(1)
    torch.manual_seed(2)
    with isolated_pass(model, train_mode=True):
        model(tokens())
        with isolated_pass(model):
            assert not model.drop.training
            model(tokens(seed=1))
        assert model.drop.training  # the inner pass gave back the outer one's train mode
        model(tokens(seed=2))
    assert torch.equal(torch.rand(1), expected)
    assert_bit_identical(state_of(model), before)


def test_uninitialised_lazy_module_is_refused():
    model = nn.Sequential(nn.Linear(2, 3), nn.LazyLinear(1))
    with pytest.raises(ValueError, match=r"module '1' \(LazyLinear\).*lazy parameter '1.weight'.*Fix: run one forward"):
        with isolated_pass(model):
            pass


def _train(model, steps, seed, extra_passes, train_mode):
    """A plain training loop; with ``extra_passes`` an isolated validation pass runs before each step."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(seed)
    val = torch.randint(0, 10, (5,), generator=gen)
    for _ in range(steps):
        x = torch.randint(0, 10, (6,), generator=gen)
        y = torch.randint(0, 2, (6,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if extra_passes:
            with isolated_pass(model, train_mode=train_mode):
                val_loss = model(val).logsumexp(1).mean()
                torch.autograd.grad(val_loss, [p for p in model.parameters() if p.requires_grad])
        opt.step()
    return model, opt


@settings(max_examples=10)
@given(
    seed=st.integers(0, 2**16), steps=st.integers(1, 4), p=st.sampled_from([0.0, 0.3, 0.9]), train_mode=st.booleans()
)
def test_training_with_isolated_passes_is_bit_identical(seed, steps, p, train_mode):
    torch.manual_seed(seed)
    reference = Net(p).train()
    model = copy.deepcopy(reference)
    torch.manual_seed(seed)
    reference, ref_opt = _train(reference, steps, seed, False, train_mode)
    ref_rng = torch.get_rng_state()
    torch.manual_seed(seed)
    model, opt = _train(model, steps, seed, True, train_mode)
    assert torch.equal(torch.get_rng_state(), ref_rng)
    assert_bit_identical(state_of(model), state_of(reference))
    for (_, a), (_, b) in zip(sorted(opt.state_dict()["state"].items()), sorted(ref_opt.state_dict()["state"].items())):
        assert_bit_identical(a, b)


def test_transformers_bert_in_train_mode():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=50
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).train()
    assert config.hidden_dropout_prob > 0
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 0])
    before = state_of(model)
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    with isolated_pass(model):
        first = model(input_ids=ids, labels=labels).loss
        second = model(input_ids=ids, labels=labels).loss
    assert torch.equal(first, second)
    assert torch.equal(torch.rand(1), expected)
    assert_bit_identical(state_of(model), before)
    assert model.training and all(m.training for m in model.modules())

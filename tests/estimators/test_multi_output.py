"""Modules that return several tensors or use their children's parameters: MultiheadAttention and the
Transformer layers (a ghost rule), LSTM, GRU, RNN (the torch.func fallback), each valued exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import validation
from attribution import step_values
from estimators import GhostEngine, GhostEngineError
from tests._helpers import assert_close

LOSS = nn.functional.cross_entropy
N, T, D = 5, 6, 8


def _exact_sgd_values(model, x, y, val, lr):
    """φ_z = lr ⟨∇L_val, c_z⟩ with oracle per-sample gradients (the SGD proxy at θ_t)."""
    c = validation.per_sample_grads(model, LOSS, (x, y), method="loop")
    params = [p for p in model.parameters() if p.requires_grad]
    G = torch.autograd.grad(LOSS(model(val[0]), val[1]), params)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    n = y.shape[0]
    return sum(lr * (c[name].reshape(n, -1) @ g.reshape(-1)) for name, g in zip(names, G))


class Encoder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.inp, self.layer, self.head = nn.Linear(4, D), layer, nn.Linear(D, 3)

    def forward(self, x):
        x, mask = x
        h = self.inp(x)
        if isinstance(self.layer, nn.MultiheadAttention):
            causal = torch.triu(torch.full((T, T), float("-inf"), dtype=x.dtype), diagonal=1)
            h = self.layer(h, h, h, key_padding_mask=mask, attn_mask=causal)[0]
        elif isinstance(self.layer, nn.TransformerDecoderLayer):
            h = self.layer(h, h, tgt_key_padding_mask=mask)
        else:
            h = self.layer(h, src_key_padding_mask=mask)
        return self.head(h[:, 0])


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn, self.head = cell(4, D, batch_first=True, num_layers=2), nn.Linear(D, 3)

    def forward(self, x):
        out, h = self.rnn(x)
        h = h[0] if isinstance(h, tuple) else h
        return self.head(h[-1]) + self.head(out[:, 1])  # the final state and one output position


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N + 2, T, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N + 2,), generator=g)
    mask = torch.zeros(N + 2, T, dtype=torch.bool)
    mask[:, -2:] = torch.rand(N + 2, 1, generator=g) > 0.5  # some samples padded at the end
    return x, y, mask


@pytest.mark.parametrize(
    "layer",
    [
        lambda: nn.MultiheadAttention(D, 2, batch_first=True),
        lambda: nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True),
        lambda: nn.TransformerDecoderLayer(D, 2, 16, dropout=0.0, batch_first=True),
    ],
    ids=["mha", "encoder-layer", "decoder-layer"],
)
def test_attention_layers_equal_the_per_sample_oracle(layer):
    torch.manual_seed(0)
    model = Encoder(layer()).double()
    x, y, mask = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    phi = step_values(model, opt, LOSS, ((x[:N], mask[:N]), y[:N]), ((x[N:], mask[N:]), y[N:]), linearization="sgd", val_point="current")
    assert_close(phi, _exact_sgd_values(model, (x[:N], mask[:N]), y[:N], ((x[N:], mask[N:]), y[N:]), 0.1), rtol=1e-10, atol=1e-14)
    GhostEngine(model, strict=True)  # the attention rule covers every parameter: no fallback


@pytest.mark.parametrize("path", ["dense", "pairwise", "factored", "materialized"])
def test_the_attention_rule_takes_every_engine_path(path):
    torch.manual_seed(0)
    model = Encoder(nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)).double()
    x, y, mask = _data()
    engine = GhostEngine(model, path=path, strict=True)
    with engine.capture_train():
        LOSS(model((x[:N], mask[:N])), y[:N]).backward()
    params = [p for p in model.parameters()]
    with engine.capture_val():
        val_grads = torch.autograd.grad(LOSS(model((x[N:], mask[N:])), y[N:]), params)
    phi = engine.values(-0.1, [dict(zip(params, val_grads))])[:, 0]
    assert engine.paths_taken["layer.self_attn.in_proj_weight"] == ("dense" if path == "dense" else path)
    assert_close(phi, _exact_sgd_values(model, (x[:N], mask[:N]), y[:N], ((x[N:], mask[N:]), y[N:]), 0.1), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_equal_the_per_sample_oracle(cell):
    torch.manual_seed(0)
    model = Recurrent(cell).double()
    x, y, _ = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    phi = step_values(model, opt, LOSS, (x[:N], y[:N]), (x[N:], y[N:]), linearization="sgd", val_point="current")
    assert_close(phi, _exact_sgd_values(model, x[:N], y[:N], (x[N:], y[N:]), 0.1), rtol=1e-10, atol=1e-14)


def test_an_lstm_with_an_initial_state_is_refused():
    class WithState(Recurrent):
        def forward(self, x):
            h0 = torch.zeros(2, x.shape[0], D, dtype=x.dtype)
            out, _ = self.rnn(x, (h0, h0))
            return self.head(out[:, -1])

    torch.manual_seed(0)
    model = WithState(nn.LSTM).double()
    x, y, _ = _data()
    with pytest.raises(GhostEngineError, match="initial state hx"):
        step_values(model, torch.optim.SGD(model.parameters(), lr=0.1), LOSS, (x[:N], y[:N]), (x[N:], y[N:]))


def test_a_packed_sequence_is_refused():
    class Packed(Recurrent):
        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, torch.full((x.shape[0],), T), batch_first=True)
            _, (h, _) = self.rnn(packed)
            return self.head(h[-1])

    torch.manual_seed(0)
    model = Packed(nn.LSTM).double()
    x, y, _ = _data()
    with pytest.raises(GhostEngineError, match="PackedSequence"):
        step_values(model, torch.optim.SGD(model.parameters(), lr=0.1), LOSS, (x[:N], y[:N]), (x[N:], y[N:]))


def test_attention_dropout_in_train_mode_is_refused_naming_the_module():
    torch.manual_seed(0)
    model = Encoder(nn.TransformerEncoderLayer(D, 2, 16, dropout=0.1, batch_first=True)).double()
    x, y, mask = _data()
    with pytest.raises(ValueError, match=r"dropout=0.1 in train mode .* build it with dropout=0.0"):
        step_values(model, torch.optim.SGD(model.parameters(), lr=0.1), LOSS, ((x[:N], mask[:N]), y[:N]), ((x[N:], mask[N:]), y[N:]))


def test_a_gradient_into_the_attention_weights_is_refused():
    class UsesWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.head = nn.Linear(4, D), nn.MultiheadAttention(D, 2, batch_first=True), nn.Linear(D, 3)

        def forward(self, x):
            h = self.inp(x)
            out, weights = self.attn(h, h, h)  # need_weights=True: averaged attention weights [n, T, T]
            return self.head(out[:, 0]) + weights[:, 0, :3]

    torch.manual_seed(0)
    model = UsesWeights().double()
    x, y, _ = _data()
    with pytest.raises(GhostEngineError, match="attention weights, reached the loss"):
        step_values(model, torch.optim.SGD(model.parameters(), lr=0.1), LOSS, (x[:N], y[:N]), (x[N:], y[N:]))

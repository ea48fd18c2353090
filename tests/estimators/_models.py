"""Small float64 models and batches for the estimator tests, built valid by construction.

Every builder returns a :class:`Case`: the model, the loss (``loss_fn(model(inputs), targets)``),
and a function drawing an ``(inputs, targets)`` batch of n samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

DT = torch.float64


@dataclasses.dataclass
class Case:
    model: nn.Module
    loss_fn: Callable
    make_batch: Callable[[int, torch.Generator], tuple]


def mse(out, y):
    return F.mse_loss(out, y)


def token_ce(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class MLP(nn.Module):
    def __init__(self, d_in, hidden, d_out, bias1, bias2):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=bias1, dtype=DT)
        self.fc2 = nn.Linear(hidden, d_out, bias=bias2, dtype=DT)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> Linear -> RMSNorm -> head, the head optionally tied to the embedding."""

    def __init__(self, vocab, d, *, tied, padding_idx, ln_bias, rms_eps):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx, dtype=DT)
        self.ln = nn.LayerNorm(d, bias=ln_bias, dtype=DT)
        self.mix = nn.Linear(d, d, dtype=DT)
        self.rms = nn.RMSNorm(d, eps=rms_eps, dtype=DT)
        self.head = nn.Linear(d, vocab, bias=False, dtype=DT)
        with torch.no_grad():  # non-trivial norm weights so their per-sample grads are generic
            self.ln.weight.add_(0.3 * torch.randn(d, dtype=DT))
            self.rms.weight.add_(0.3 * torch.randn(d, dtype=DT))
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = self.ln(self.emb(tokens))
        h = self.rms(torch.tanh(self.mix(h)))
        return self.head(h)


class CNN(nn.Module):
    def __init__(self, conv: nn.Module, flat: int, d_out: int):
        super().__init__()
        self.conv = conv
        self.fc = nn.Linear(flat, d_out, dtype=DT)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class Twice(nn.Module):
    """The same Linear applied twice in one forward (a module called twice)."""

    def __init__(self, d, d_out):
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=DT)
        self.out = nn.Linear(d, d_out, dtype=DT)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class Affine(nn.Module):
    """A layer type no rule covers: y = x ⊙ scale + shift (takes the torch.func fallback)."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(1 + 0.3 * torch.randn(d, dtype=DT))
        self.shift = nn.Parameter(0.1 * torch.randn(d, dtype=DT))

    def forward(self, x):
        return x * self.scale + self.shift


class WithCustom(nn.Module):
    def __init__(self, d_in, d, d_out):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d, dtype=DT)
        self.affine = Affine(d)
        self.fc2 = nn.Linear(d, d_out, dtype=DT)

    def forward(self, x):
        return self.fc2(torch.tanh(self.affine(self.fc1(x))))


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DT)


@st.composite
def mlp_cases(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    d_in, hidden, d_out = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    mid = draw(st.sampled_from([(), (3,), (2, 2)]))
    model = MLP(d_in, hidden, d_out, draw(st.booleans()), draw(st.booleans()))
    return Case(model, mse, lambda n, g: (_randn(g, n, *mid, d_in), _randn(g, n, *mid, d_out)))


@st.composite
def lm_cases(draw, tied=None):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    vocab, d, T = draw(st.integers(3, 6)), draw(st.integers(2, 4)), draw(st.integers(1, 4))
    tied = draw(st.booleans()) if tied is None else tied
    padding_idx = draw(st.sampled_from([None, 0]))
    model = TinyLM(vocab, d, tied=tied, padding_idx=padding_idx, ln_bias=draw(st.booleans()), rms_eps=draw(st.sampled_from([None, 1e-5])))

    def make(n, g):
        return torch.randint(0, vocab, (n, T), generator=g), torch.randint(0, vocab, (n, T), generator=g)

    return Case(model, token_ce, make)


@st.composite
def conv_cases(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    two_d = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    k, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "circular"]))
    padding = draw(st.sampled_from([0, 1, "same"])) if stride == 1 else draw(st.sampled_from([0, 1]))
    if mode != "zeros" and padding == 0:
        padding = 1
    size = 6
    cls = nn.Conv2d if two_d else nn.Conv1d
    conv = cls(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
               bias=draw(st.booleans()), padding_mode=mode, dtype=DT)
    spatial = (size, size) if two_d else (size,)
    with torch.no_grad():
        flat = conv(torch.zeros(1, c_in, *spatial, dtype=DT)).numel()
    model = CNN(conv, flat, 2)
    return Case(model, mse, lambda n, g: (_randn(g, n, c_in, *spatial), _randn(g, n, 2)))


@st.composite
def twice_cases(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    d, T = draw(st.integers(1, 4)), draw(st.sampled_from([None, 2]))
    mid = () if T is None else (T,)
    return Case(Twice(d, 2), mse, lambda n, g: (_randn(g, n, *mid, d), _randn(g, n, *mid, 2)))


@st.composite
def custom_cases(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    d_in, d = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return Case(WithCustom(d_in, d, 2), mse, lambda n, g: (_randn(g, n, d_in), _randn(g, n, 2)))


CASES = {"mlp": mlp_cases(), "lm": lm_cases(), "conv": conv_cases(), "twice": twice_cases(), "custom": custom_cases()}

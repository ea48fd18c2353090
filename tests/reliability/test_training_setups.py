"""LoRA adapters, gradient checkpointing, torch.compile: supported, or refused with a clear error."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import estimators
from attribution import InRunShapley, step_values
from tests._helpers import assert_close

LOSS = nn.functional.cross_entropy


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)


class LoRALinear(nn.Module):
    """A frozen base Linear plus a trainable low-rank adapter B·A (both ordinary nn.Linear)."""

    def __init__(self, d_in, d_out, r=2):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.A = nn.Linear(d_in, r, bias=False)
        self.B = nn.Linear(r, d_out, bias=False)

    def forward(self, x):
        return self.base(x) + self.B(self.A(x))


def test_lora_adapters_are_attributed_through_the_linear_rule_only():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(6, 8), nn.Tanh(), LoRALinear(8, 3)).double()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = _data()
    for s in range(2):  # B starts non-zero here so the values are not trivially tiny
        opt.zero_grad()
        LOSS(model(x[s * 5 : s * 5 + 5]), y[s * 5 : s * 5 + 5]).backward()
        opt.step()
    ghost = step_values(model, opt, LOSS, (x[:6], y[:6]), (x[10:], y[10:]))
    ref = step_values(model, opt, LOSS, (x[:6], y[:6]), (x[10:], y[10:]), estimator="materialized")
    assert_close(ghost, ref, rtol=1e-8, atol=1e-14)
    engine = estimators.GhostEngine(model, strict=True)  # no fallback needed: adapters are nn.Linear
    with engine.capture_train():
        LOSS(model(x[:6]), y[:6]).backward()
    engine.values(-0.1, estimators.validation_gradients(model, LOSS, [(x[10:], y[10:])]))
    assert set(engine.paths_taken) == {"0.A.weight", "0.B.weight", "2.A.weight", "2.B.weight"}  # frozen base: no cost


def test_gradient_checkpointing_is_refused_clearly():
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=False))

    model = Checkpointed().double()
    x, y = _data()
    with pytest.raises(estimators.GhostEngineError, match="activation checkpointing"):
        step_values(model, torch.optim.Adam(model.parameters()), LOSS, (x[:6], y[:6]), (x[10:], y[10:]))


def test_torch_compile_is_refused_clearly():
    model = nn.Sequential(nn.Linear(6, 3)).double()
    compiled = torch.compile(model)
    x, y = _data()
    with pytest.raises(TypeError, match=r"torch.compile'd module.*_orig_mod"):
        InRunShapley(compiled, torch.optim.Adam(compiled.parameters()), LOSS, (x[10:], y[10:]))

"""Half-precision parameters and autocast: values are computed in float32, returned as float64."""

import copy

import pytest
import torch
from torch import nn

import validation
from attribution import step_values

LOSS = nn.functional.cross_entropy


def _setup(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3)).to(dtype)
    # float16 needs a representable eps (torch's own fp16 Adam divides by 0 with eps=1e-8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-4 if dtype == torch.float16 else 1e-8)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 8, generator=g).to(dtype), torch.randint(0, 3, (48,), generator=g)
    for s in range(3):
        opt.zero_grad()
        LOSS(model(x[8 * s : 8 * s + 8]), y[8 * s : 8 * s + 8]).backward()
        opt.step()
    return model, opt, (x[24:40], y[24:40]), (x[40:], y[40:])


def _as_float64(model, opt):
    twin_model, twin_opt = copy.deepcopy((model, opt))
    twin_model.double()
    for st in twin_opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point() and k != "step":
                st[k] = v.double()
    return twin_model, twin_opt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_give_float64_values_close_to_a_float64_run(dtype):
    model, opt, batch, val = _setup(dtype)
    phi = step_values(model, opt, LOSS, batch, val)
    assert phi.dtype == torch.float64 and torch.isfinite(phi).all()
    ref_model, ref_opt = _as_float64(model, opt)
    ref = step_values(ref_model, ref_opt, LOSS, (batch[0].double(), batch[1]), (val[0].double(), val[1]))
    # Same weights and state: the only difference is half-precision activations and gradients in
    # the forward/backward (about 3 significant digits for bf16); accumulation is float32.
    fid = validation.fidelity(phi, ref)
    assert fid["pearson"] > 0.99, fid
    assert ((phi - ref).norm() / ref.norm()).item() < 0.1


def test_autocast_bf16_training_matches_float32_attribution():
    model, opt, batch, val = _setup(torch.float32)
    exact = step_values(model, opt, LOSS, batch, val)

    class Autocast(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.inner(x).float()

    phi = step_values(Autocast(model), opt, LOSS, batch, val)
    assert phi.dtype == torch.float64
    assert validation.fidelity(phi, exact)["pearson"] > 0.99

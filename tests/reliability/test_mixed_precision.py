"""Half-precision parameters and autocast: values are computed in float32, returned as float64."""

import copy

import pytest
import torch
from torch import nn

import validation
from attribution import InRunShapley, step_values

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


def test_a_fallback_layer_under_bf16_autocast_is_recomputed_in_autocast():
    """The Trainer's bf16=True: a layer without a rule (PReLU here, Conv1D before its rule) is recomputed
    by torch.func under the same autocast (it raised 'expected m1 and m2 to have the same dtype')."""
    import warnings

    from attribution import FallbackWarning

    class Scaled(nn.Module):  # a matmul inside a module no rule covers: autocast changes its dtype
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8) * 0.3)

        def forward(self, x):
            return x @ self.w

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), Scaled(), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        tracker = InRunShapley(model, opt, nn.functional.cross_entropy, (x[8:], y[8:]))
    with tracker.batch(range(8)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x[:8])
        nn.functional.cross_entropy(out.float(), y[:8]).backward()
    opt.step()
    assert tracker.paths_taken["1.w"] == "fallback" and not tracker.skipped_steps
    assert torch.isfinite(torch.tensor(tracker.values()["value"].to_numpy())).all()
    tracker.close()

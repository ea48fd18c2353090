"""Assertion helpers shared by every test module.

``assert_close`` compares tensors (or dicts of tensors) and, on failure, raises with the
name of the offending entry, the worst absolute and relative error and where it occurs.
Tolerances follow the dtype unless given.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

_DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def assert_close(actual, expected, *, rtol: float | None = None, atol: float = 0.0, name: str = "value"):
    """Raise AssertionError unless |actual - expected| <= atol + rtol * |expected| everywhere.

    ``actual`` and ``expected`` are tensors or mappings of tensors with the same keys.
    The message names the entry, the worst absolute and relative errors and the index.
    """
    if isinstance(expected, Mapping):
        assert set(actual) == set(expected), f"{name}: keys differ: {sorted(set(actual) ^ set(expected))}"
        for key in expected:
            assert_close(actual[key], expected[key], rtol=rtol, atol=atol, name=f"{name}[{key!r}]")
        return
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if rtol is None:
        rtol = _DEFAULT_RTOL.get(expected.dtype, 1e-6)
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{name}: non-finite entries in actual: {a[~torch.isfinite(a)][:5].tolist()}"
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = err > bound
    if bad.any():
        excess = (err - bound).flatten()
        i = int(excess.argmax())
        idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), e.shape)) if e.dim() else ()
        rel = (err / e.abs().clamp_min(1e-300)).max().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{e.numel()} entries differ; max abs err {err.max().item():.3e}, "
            f"max rel err {rel:.3e} (rtol={rtol:g}, atol={atol:g}); worst at {idx}: "
            f"actual {a.flatten()[i].item():.17g} vs expected {e.flatten()[i].item():.17g}"
        )


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: one intra-op thread avoids thread hand-off costs that dominate at this size
    (measured 50x slower backward passes with two threads on a busy machine). Import it into a
    conftest or test module to make it apply there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rank_one_slope(shape: torch.Size, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A negative J of ``shape`` that the factored path represents exactly: −r sᵀ (rows × the rest)
    for a matrix or higher, −(0.1 + u) elementwise for a vector; entries in (−1.21, −0.01)."""
    if len(shape) >= 2:
        r = 0.1 + torch.rand(shape[0], generator=generator, dtype=dtype)
        s = 0.1 + torch.rand(int(torch.Size(shape).numel()) // shape[0], generator=generator, dtype=dtype)
        return -torch.outer(r, s).reshape(shape)
    return -(0.1 + torch.rand(shape, generator=generator, dtype=dtype))

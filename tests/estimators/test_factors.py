"""The dense contraction ⟨P, c_z⟩ of a bilinear term: chunked over samples, equal to the dense tensors."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from estimators import _factors as F

DT = torch.float64


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 7), T=st.integers(1, 5), R=st.integers(1, 9), C=st.integers(1, 9),
    budget=st.integers(1, 64), one_hot=st.sampled_from(["none", "rows", "cols"]), seed=st.integers(0, 2**16),
)
def test_chunked_dense_values_equal_the_materialized_contraction(n, T, R, C, budget, one_hot, seed):
    """Any chunk size (down to one sample) gives ⟨P, Σ_t u_t v_tᵀ⟩ per sample, for dense and one-hot sides."""
    g = torch.Generator().manual_seed(seed)

    def side(size):
        return F.DenseFactor(torch.randn(n, T, size, dtype=DT, generator=g))

    rows = F.OneHotFactor(torch.randint(0, R, (n, T), generator=g), R, torch.randn(n, T, dtype=DT, generator=g)) if one_hot == "rows" else side(R)
    cols = F.OneHotFactor(torch.randint(0, C, (n, T), generator=g), C, None) if one_hot == "cols" else side(C)
    if one_hot == "cols":
        cols = cols.to(DT)
    term = F.Bilinear(rows, cols)
    P = torch.randn(R, C, dtype=DT, generator=g)
    expected = torch.einsum("ntr,ntc,rc->n", rows.dense().to(DT), cols.dense().to(DT), P)
    old = F._PROJECTION_BUDGET
    try:
        F._PROJECTION_BUDGET = budget  # chunks of budget // (T·D) samples, at least one
        got = term.dense_values(P)
    finally:
        F._PROJECTION_BUDGET = old
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, term.dense_values(P), rtol=1e-12, atol=1e-12)  # unchunked at the default budget

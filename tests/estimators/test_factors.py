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


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4), T=st.integers(1, 6), R=st.integers(2, 40), C=st.integers(1, 5),
    weighted=st.booleans(), outside=st.booleans(), seed=st.integers(0, 2**16),
)
def test_a_row_sparse_P_contracts_and_checks_as_its_dense_form(n, T, R, C, weighted, outside, seed):
    """⟨P, c_z⟩ and ⟨P, grad⟩ of an embedding term from P kept on its rows = with the table-sized P (float64)."""
    import optimizers
    from estimators._contraction import RowSparse, _precondition, check_operands, contract

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, R, (n, T), generator=gen)
    rows = torch.unique(idx)
    if outside:  # a term with a token off P's rows: contracted against the dense form (P = 0 there)
        rows = rows[1:] if len(rows) > 1 else rows
    w = torch.rand(n, T, generator=gen, dtype=torch.float64) if weighted else None
    term = F.Bilinear(F.OneHotFactor(idx, R, w), F.DenseFactor(torch.randn(n, T, C, generator=gen, dtype=torch.float64)))
    J = optimizers.RowDiagonal(rows, torch.randn(len(rows), C, generator=gen, dtype=torch.float64), (R, C))
    v = torch.randn(R, C, generator=gen, dtype=torch.float64)
    P = _precondition(J, v, torch.Size((R, C)))
    dense = optimizers.Diagonal(J.diagonal).apply(v)
    assert isinstance(P, RowSparse) and torch.equal(P.dense(), dense) and torch.equal(J.apply(v), dense)
    assert torch.allclose(contract([term], P), term.dense_values(dense), rtol=1e-12, atol=1e-14)
    grad = term.total(torch.Size((R, C)))
    a, b = check_operands(P, grad)
    assert torch.allclose(torch.dot(a.reshape(-1), b.reshape(-1)), torch.dot(dense.reshape(-1), grad.reshape(-1)), rtol=1e-12, atol=1e-14)

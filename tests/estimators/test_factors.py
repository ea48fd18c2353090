"""The dense contraction ⟨P, c_z⟩ of a bilinear term: chunked over samples, equal to the dense tensors."""

from __future__ import annotations

import pytest
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


@settings(max_examples=40, deadline=None)
@given(
    two_d=st.booleans(), groups=st.sampled_from([1, 2]), k=st.integers(1, 3), stride=st.integers(1, 2),
    dilation=st.integers(1, 2), padding=st.sampled_from([0, 1, "same"]), mode=st.sampled_from(["zeros", "reflect", "circular"]),
    n=st.integers(1, 5), budget=st.sampled_from([1, 7, 1 << 20]), seed=st.integers(0, 2**16),
)
def test_conv_dense_values_by_convolution_equal_the_per_sample_gradients(two_d, groups, k, stride, dilation, padding, mode, n, budget, seed):
    """⟨P, c_z⟩ of a Conv1d/Conv2d weight computed as ⟨conv(x_z, P), ∂L/∂y_z⟩ (ConvBilinear) equals
    the contraction of autograd's per-sample weight gradient with P, for any sample chunk; the
    unfolded patches (materialize) agree with autograd too."""
    from torch import nn

    from estimators._rules.conv import Conv1dRule, Conv2dRule

    if padding == "same" and stride > 1:
        stride = 1  # torch refuses padding="same" with a stride
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c_in, c_out = 2 * groups, 3 * groups
    cls, rule = (nn.Conv2d, Conv2dRule) if two_d else (nn.Conv1d, Conv1dRule)
    conv = cls(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode).to(DT)
    spatial = (6, 7) if two_d else (9,)
    x = torch.randn(n, c_in, *spatial, dtype=DT, generator=g)
    b = torch.randn(conv(x).shape, dtype=DT, generator=g)
    term = rule.terms(conv, x, b)["weight"]
    assert isinstance(term, F.ConvBilinear)
    per_sample = torch.stack([torch.autograd.grad(conv(x[z:z + 1]), conv.weight, b[z:z + 1])[0] for z in range(n)])
    P = torch.randn(conv.weight.shape, dtype=DT, generator=g)
    old = F._CONV_BUDGET
    try:
        F._CONV_BUDGET = budget
        got = term.dense_values(P)
    finally:
        F._CONV_BUDGET = old
    torch.testing.assert_close(got, (per_sample * P).flatten(1).sum(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(term.materialize(conv.weight.shape), per_sample, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(term.select(torch.arange(n).flip(0)).dense_values(P), got.flip(0), rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 7), T=st.integers(1, 6), R=st.integers(1, 9), C=st.integers(1, 9), K=st.integers(1, 8),
    budget=st.sampled_from([1, 5, 1 << 20]), kind=st.sampled_from(["dense", "one-hot", "conv"]), seed=st.integers(0, 2**16),
)
def test_many_targets_at_once_equal_one_target_at_a_time(n, T, R, C, K, budget, kind, seed):
    """``dense_values_many`` of K preconditioned gradients = K calls of ``dense_values`` (float64),
    for any chunk of the per-sample route; that route is taken exactly when K·T > T + K (dense factors)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "conv":
        from torch import nn

        from estimators._rules.conv import Conv1dRule

        # 3·T output locations, so that both routes occur (per-sample from K = 5); grouped when R is even.
        conv = nn.Conv1d(2, R, 3, padding=1, groups=2 if R % 2 == 0 and seed % 2 else 1).to(DT)
        x = torch.randn(n, 2, 3 * T, dtype=DT, generator=g)
        term = Conv1dRule.terms(conv, x, torch.randn(conv(x).shape, dtype=DT, generator=g))["weight"]
        shape = conv.weight.shape
    else:
        rows = (
            F.OneHotFactor(torch.randint(0, R, (n, T), generator=g), R, torch.randn(n, T, dtype=DT, generator=g))
            if kind == "one-hot" else F.DenseFactor(torch.randn(n, T, R, dtype=DT, generator=g))
        )
        term = F.Bilinear(rows, F.DenseFactor(torch.randn(n, T, C, dtype=DT, generator=g)))
        shape = torch.Size((R, C))
    Ps = [torch.randn(shape, dtype=DT, generator=g) for _ in range(K)]
    old = F._MATERIALIZE_BUDGET, F._CONV_BUDGET
    try:
        # chunks of budget // (R·C) samples on the per-sample route, of budget // (K·C_out·L) when stacked
        F._MATERIALIZE_BUDGET = F._CONV_BUDGET = budget
        got = term.dense_values_many(Ps)
    finally:
        F._MATERIALIZE_BUDGET, F._CONV_BUDGET = old
    assert got.shape == (n, K)
    torch.testing.assert_close(got, torch.stack([term.dense_values(P) for P in Ps], 1), rtol=1e-10, atol=1e-12)
    T_term = term.rows.T  # a convolution's per-sample route is taken later: unfolding is slow per flop
    if kind == "conv":
        assert term._materializes(K) == (K > 1 and F._CONV_PER_SAMPLE_SLOWDOWN * (T_term + K) < K * T_term)
    else:
        assert term._materializes(K) == (kind == "dense" and K * T_term > T_term + K)


def test_a_grouped_convolution_is_not_stacked():
    """Stacking K targets as output channels of a grouped convolution would pair them with another
    group's inputs: ``dense_values_many`` contracts one target at a time there, and the stacked
    convolution refuses K > 1."""
    from torch import nn

    from estimators._rules.conv import Conv1dRule

    g = torch.Generator().manual_seed(0)
    conv = nn.Conv1d(4, 6, 3, padding=1, groups=2).to(DT)
    x = torch.randn(3, 4, 5, dtype=DT, generator=g)
    term = Conv1dRule.terms(conv, x, torch.randn(conv(x).shape, dtype=DT, generator=g))["weight"]
    Ps = [torch.randn(conv.weight.shape, dtype=DT, generator=g) for _ in range(2)]
    assert not term._materializes(2)
    torch.testing.assert_close(term.dense_values_many(Ps), torch.stack([term.dense_values(P) for P in Ps], 1), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="groups=2"):
        term._conv_values(Ps)

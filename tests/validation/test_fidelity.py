"""fidelity: agreement metrics between an estimate and the ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from validation import fidelity

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


def test_known_values():
    e = torch.tensor([0.3, 0.1, -0.2, 0.0])
    t = torch.tensor([0.5, 0.2, -0.1, 0.1])
    r = fidelity(e, t, k=2, efficiency_target=0.5)
    assert r["spearman"] == pytest.approx(1.0) and r["kendall"] == pytest.approx(1.0)
    assert r["pearson"] == pytest.approx(np.corrcoef(e.numpy(), t.numpy())[0, 1])
    assert r["top_k_overlap"] == 1.0
    assert r["sign_agreement"] == 0.75  # 0.0 vs 0.1 disagree
    assert r["estimate_sum"] == pytest.approx(0.2)
    assert r["efficiency_gap"] == pytest.approx(-0.3) and r["relative_efficiency_gap"] == pytest.approx(-0.6)
    assert r["relative_l2_error"] == pytest.approx(float(torch.linalg.norm(e - t) / torch.linalg.norm(t)))
    assert r["k"] == 2 and r["undefined"] == {}


def test_top_k_partial_overlap_and_default_k():
    e = np.array([5.0, 4.0, 3.0, 2.0, 1.0] * 4)
    t = e.copy()
    t[0] = -10.0  # the top sample of the estimate falls out of the truth's top set
    r = fidelity(e, t)
    assert r["k"] == 2  # ceil(20 / 10)
    assert r["top_k_overlap"] == 0.5  # ties broken by lower index: {0, 5} vs {5, 10}
    r = fidelity(e, t, k=4)
    assert r["top_k_overlap"] == 0.75  # {0, 5, 10, 15} vs {5, 10, 15, 1}


@given(arrays(np.float64, st.integers(2, 30), elements=finite))
def test_self_agreement(x):
    r = fidelity(x, x, efficiency_target=float(x.sum()))
    assert r["top_k_overlap"] == 1.0 and r["sign_agreement"] == 1.0 and r["efficiency_gap"] == 0.0
    if np.all(x == x[0]):
        assert all(math.isnan(r[m]) for m in ("pearson", "spearman", "kendall"))
    else:
        assert r["pearson"] == pytest.approx(1.0) and r["spearman"] == pytest.approx(1.0)
        assert r["kendall"] == pytest.approx(1.0)


def test_constant_input_gives_nan_for_correlations_only_with_a_reason():
    r = fidelity(torch.ones(5), torch.arange(5.0), efficiency_target=5.0)
    for m in ("pearson", "spearman", "kendall"):
        assert math.isnan(r[m]) and "estimate constant" in r["undefined"][m]
    assert r["efficiency_gap"] == 0.0 and r["sign_agreement"] == 0.8
    assert set(r["undefined"]) == {"pearson", "spearman", "kendall"}


def test_other_undefined_metrics_are_nan_with_reasons():
    r = fidelity([1.0], [0.0])
    assert r["undefined"]["pearson"] == "fewer than 2 samples"
    assert r["undefined"]["relative_l2_error"] == "truth is all zeros"
    assert r["undefined"]["efficiency_gap"] == "no efficiency_target given"
    assert math.isnan(r["relative_l2_error"]) and math.isnan(r["efficiency_gap"])
    r = fidelity([1.0, -1.0], [2.0, 1.0], efficiency_target=0.0)
    assert r["efficiency_gap"] == 0.0 and r["undefined"]["relative_efficiency_gap"] == "efficiency_target is 0"


def test_column_vector_accepted():
    r = fidelity(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.0, 2.0, 4.0]))
    assert r["spearman"] == pytest.approx(1.0)

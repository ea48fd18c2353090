"""Every rule and every path of the ghost engine against the materialized reference (float64).

Reference: per-sample gradients by torch.func (vmap of grad) and φ = −Σ⟨J ⊙ ∇L_val, c_z⟩.
Drawn: the model (MLP with 0-2 middle axes, tiny LM with embedding/LayerNorm/RMSNorm and an
optionally tied head, Conv1d/Conv2d with stride/padding/dilation/groups/padding modes, a Linear
called twice, a layer taking the fallback), batch sizes down to one, 1-3 micro-batches,
K = 1-3 validation targets, and the path.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import estimators as E
from tests._helpers import assert_close, rank_one_slope

from ._models import CASES, DT, Case, lm_cases

PATHS = ["auto", "dense", "pairwise", "factored", "materialized"]


def make_J(model, path, g):
    """J per parameter suited to ``path``: scalar for pairwise, rank-one matrices for factored."""
    if path == "pairwise":
        return -0.37
    # A rank-one matrix J on the factored path; otherwise an elementwise one (vectors are the same either way).
    return {
        p: rank_one_slope(p.shape, g, DT) if path == "factored" else -(0.1 + torch.rand(p.shape, generator=g, dtype=DT))
        for p in model.parameters()
    }


def reference(case: Case, micro_batches, val_grads, J):
    blocks = []
    for mb in micro_batches:
        c = E.per_sample_grads(case.model, case.loss_fn, mb)
        P = [{p: E.preconditioned_val_grad(J if isinstance(J, float) else J[p], vg[p]) for p in c} for vg in val_grads]
        blocks.append(E.first_order_values(c, P))
    return torch.cat(blocks)


def ghost(case: Case, micro_batches, val_batches, J, path):
    engine = E.GhostEngine(case.model, path=path)
    with engine.capture_train():
        for inputs, targets in micro_batches:
            case.loss_fn(case.model(inputs), targets).backward()
    val_grads = E.validation_gradients(case.model, case.loss_fn, val_batches, engine=engine)
    return engine.values(J, val_grads), val_grads, engine


def check(case: Case, sizes: list[int], K: int, path: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    micro = [case.make_batch(n, g) for n in sizes]
    vals = [case.make_batch(1 + k % 3, g) for k in range(K)]
    J = make_J(case.model, path, g)
    phi, val_grads, engine = ghost(case, micro, vals, J, path)
    ref = reference(case, micro, val_grads, J)
    assert phi.shape == (sum(sizes), K) and phi.dtype == DT
    assert_close(phi, ref, rtol=1e-8, atol=1e-12 * float(ref.abs().max()), name=f"values[{path}]")
    taken = set(engine.paths_taken.values())
    if path in ("pairwise", "factored", "materialized", "dense"):
        assert path in taken or taken <= {"dense", "fallback"}
    return engine


sizes_st = st.lists(st.integers(1, 3), min_size=1, max_size=3)


@given(case=CASES["mlp"], sizes=sizes_st, K=st.integers(1, 3), path=st.sampled_from(PATHS), seed=st.integers(0, 99))
def test_linear_with_any_middle_axes(case, sizes, K, path, seed):
    check(case, sizes, K, path, seed)


@given(case=CASES["lm"], sizes=sizes_st, K=st.integers(1, 3), path=st.sampled_from(PATHS), seed=st.integers(0, 99))
def test_embedding_norms_and_tied_head(case, sizes, K, path, seed):
    check(case, sizes, K, path, seed)


@given(case=CASES["conv"], sizes=sizes_st, K=st.integers(1, 2), path=st.sampled_from(PATHS), seed=st.integers(0, 99))
def test_conv1d_conv2d(case, sizes, K, path, seed):
    check(case, sizes, K, path, seed)


@given(case=CASES["twice"], sizes=sizes_st, K=st.integers(1, 2), path=st.sampled_from(PATHS), seed=st.integers(0, 99))
def test_module_called_twice(case, sizes, K, path, seed):
    check(case, sizes, K, path, seed)


@given(case=CASES["custom"], sizes=sizes_st, K=st.integers(1, 2), path=st.sampled_from(PATHS), seed=st.integers(0, 99))
def test_fallback_for_uncovered_layer(case, sizes, K, path, seed):
    engine = check(case, sizes, K, path, seed)
    assert engine.paths_taken["affine.scale"] == "fallback"
    assert engine.fallback_modules == ["affine"]


@given(case=lm_cases(tied=True), path=st.sampled_from(PATHS), seed=st.integers(0, 99))
def test_tied_weights_batch_of_one_three_targets(case, path, seed):
    assert case.model.head.weight is case.model.emb.weight
    engine = check(case, [1], 3, path, seed)
    assert "head.weight" not in engine.paths_taken  # one parameter, both modules' contributions summed
    assert "emb.weight" in engine.paths_taken

"""The completeness check's batched reduction: each entry's sums equal the naive float64 sums."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings, strategies as st

from estimators._completeness import CompletenessCheck


@settings(max_examples=60, deadline=None)
@given(
    entries=st.integers(1, 6), blocks=st.integers(0, 3), same_n=st.booleans(), mixed=st.booleans(),
    dots=st.integers(0, 2), seed=st.integers(0, 2**16), rounds=st.integers(1, 2),
)
def test_settled_sums_equal_the_naive_sums(entries, blocks, same_n, mixed, dots, seed, rounds):
    """Σ_z ⟨P, c_z⟩, Σ_z |⟨P, c_z⟩|, ⟨P, grad⟩ and the rounding scale per entry, whatever the block sizes and dtypes."""
    gen = torch.Generator().manual_seed(seed)
    check = CompletenessCheck()
    want: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):  # a second round adds to the settled sums
        for i in range(entries):
            key = (f"p{i}", i % 2)
            w = want.setdefault(key, [0.0, 0.0, 0.0, 0.0])
            for b in range(blocks):
                n = 5 if same_n else 3 + b + i
                dtype = torch.float32 if mixed and (b + i) % 2 else torch.float64
                x = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
                check.add_samples(*key, x)
                w[0] += float(x.double().sum())
                w[1] += float(x.double().abs().sum())
            for _ in range(dots):
                P, g = torch.randn(7, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
                check.add_grad(*key, P, g, keep=False)
                w[2] += float(P @ g)
                w[3] += float(P.norm() * g.norm())
        check._settle()
        for key, (captured, spread, used, rounding) in want.items():
            if not blocks and not dots:
                assert key not in check.entries  # nothing was added for it
                continue
            e = check.entries[key]
            for got, ref in ((e.captured, captured), (e.spread, spread), (e.used, used), (e.rounding, rounding)):
                assert math.isclose(got, ref, rel_tol=1e-12, abs_tol=1e-12)
            assert not e.samples and not e.dots and not e.roundings

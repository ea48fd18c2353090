"""``nn.Linear``: y = x Wᵀ + b, x ``[n, *mid, d_in]``.

With T = prod(mid) positions (T = 1 without a sequence axis), a_t = x_t, b_t = ∂L/∂y_t:
c_z(W) = Σ_t b_t a_tᵀ (rows: output gradients, columns: inputs), c_z(b) = Σ_t b_t.
"""

from __future__ import annotations

from torch import nn

from .._factors import Bilinear, DenseFactor, PerSample
from ._base import LayerRule, batch_first


class LinearRule(LayerRule, layer=nn.Linear):
    """Rule for ``nn.Linear``; dense cost n·T·d_in·d_out, pairwise n·T·m·S·(d_in + d_out)."""

    @classmethod
    def terms(cls, module, x, grad_output):
        batch_first("nn.Linear", x, 2)
        n = x.shape[0]
        a = x.reshape(n, -1, x.shape[-1])  # [n, T, d_in]
        b = grad_output.reshape(n, -1, grad_output.shape[-1])  # [n, T, d_out]
        out = {"weight": Bilinear(DenseFactor(b), DenseFactor(a))}
        if module.bias is not None:
            out["bias"] = PerSample(b.sum(1))
        return out

"""``nn.LayerNorm``: y = x̂ ⊙ w + b over the trailing ``normalized_shape`` dims.

x̂ is recomputed from the captured input: x̂ = (x − μ) / √(σ² + eps) (biased variance), by
``F.layer_norm`` without weight and bias.
Per sample: c_z(w) = Σ_t x̂_t ⊙ b_t, c_z(b) = Σ_t b_t, materialized (cost n·T·d).
"""

from __future__ import annotations

import torch
from torch import nn

from .._factors import PerSample
from ._base import LayerRule, batch_first


def sum_positions(t: torch.Tensor, n: int, norm_dims: int) -> torch.Tensor:
    """Sum ``t`` ``[n, *mid, *norm]`` over the middle positions: ``[n, *norm]``.

    Example:
        >>> sum_positions(torch.ones(2, 3, 5, 4), 2, 1).shape, float(sum_positions(torch.ones(2, 3, 5, 4), 2, 1)[0, 0])
        (torch.Size([2, 4]), 15.0)
    """
    return t.reshape(n, -1, *t.shape[t.dim() - norm_dims:]).sum(1)


class LayerNormRule(LayerRule, layer=nn.LayerNorm):
    """Rule for ``nn.LayerNorm`` (weight and bias); cost n·T·d on every path.

    ``terms(module, x, grad_output)``: x and grad_output ``[n, *mid, *normalized_shape]`` ->
    ``{"weight": PerSample(Σ_t x̂_t ⊙ b_t), "bias": PerSample(Σ_t b_t)}``, each
    ``[n, *normalized_shape]``; so ⟨P, c_z(w)⟩ = Σ_t (P ⊙ x̂_t)·b_t.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
        >>> ln = nn.LayerNorm(4).double()
        >>> x, b = randn(2, 3, 4), randn(2, 3, 4)
        >>> terms = LayerNormRule.terms(ln, x, b)
        >>> gw, gb = torch.autograd.grad(ln(x[:1]), [ln.weight, ln.bias], b[:1])     # sample 0 alone
        >>> torch.allclose(terms["weight"].c[0], gw), torch.allclose(terms["bias"].c[0], gb)
        (True, True)
    """

    @classmethod
    def terms(cls, module, x, grad_output):
        k = len(module.normalized_shape)
        batch_first("nn.LayerNorm", x, k + 1)
        n = x.shape[0]
        # x̂ by torch's fused kernel without the affine part (one pass; the mean/var reduction
        # over a short trailing axis is several times slower on CPU).
        xhat = nn.functional.layer_norm(x, tuple(module.normalized_shape), None, None, module.eps)
        out = {}
        if module.weight is not None:
            out["weight"] = PerSample(sum_positions(xhat * grad_output, n, k))
        if module.bias is not None:
            out["bias"] = PerSample(sum_positions(grad_output, n, k))
        return out

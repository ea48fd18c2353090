"""``nn.RMSNorm``: y = x̂ ⊙ w, x̂ = x / √(mean(x²) + eps) over the trailing ``normalized_shape``.

eps = None means torch's default, ``torch.finfo(x.dtype).eps``. Per sample: c_z(w) = Σ_t x̂_t ⊙ b_t.
"""

from __future__ import annotations

import torch
from torch import nn

from .._factors import PerSample
from ._base import LayerRule, batch_first
from .layernorm import sum_positions


class RMSNormRule(LayerRule, layer=nn.RMSNorm):
    """Rule for ``nn.RMSNorm`` (weight); cost n·T·d on every path.

    ``terms(module, x, grad_output)``: x and grad_output ``[n, *mid, *normalized_shape]`` ->
    ``{"weight": PerSample(Σ_t x̂_t ⊙ b_t)}``, ``[n, *normalized_shape]``.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
        >>> rms = nn.RMSNorm(4, eps=1e-6).double()
        >>> x, b = randn(2, 3, 4), randn(2, 3, 4)
        >>> c = RMSNormRule.terms(rms, x, b)["weight"].c
        >>> torch.allclose(c[1], torch.autograd.grad(rms(x[1:]), rms.weight, b[1:])[0])
        True
    """

    @classmethod
    def params(cls, module):
        return ("weight",)

    @classmethod
    def terms(cls, module, x, grad_output):
        k = len(module.normalized_shape)
        batch_first("nn.RMSNorm", x, k + 1)
        n = x.shape[0]
        dims = tuple(range(x.dim() - k, x.dim()))
        eps = torch.finfo(x.dtype).eps if module.eps is None else module.eps
        xhat = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
        out = {}
        if module.weight is not None:
            out["weight"] = PerSample(sum_positions(xhat * grad_output, n, k))
        return out

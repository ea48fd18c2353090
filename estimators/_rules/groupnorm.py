"""``nn.GroupNorm``: y = x̂ ⊙ w + b per channel, x ``[n, C, *spatial]``.

x̂ normalises each sample's G groups of C/G channels over the channels and spatial positions of
the group (biased variance), so samples never interact. x̂ is recomputed from the captured input
by ``F.group_norm`` without weight and bias. Per sample: c_z(w)[c] = Σ_s x̂[c, s] · b[c, s],
c_z(b)[c] = Σ_s b[c, s], materialized (cost n·C·S).
"""

from __future__ import annotations

from torch import nn

from .._factors import PerSample
from ._base import LayerRule, batch_first


class GroupNormRule(LayerRule, layer=nn.GroupNorm):
    """Rule for ``nn.GroupNorm`` (affine weight and bias); cost n·C·S on every path.

    ``terms(module, x, grad_output)``: x and grad_output ``[n, C, *spatial]`` (no spatial axis
    is allowed) -> ``{"weight": PerSample(Σ_s x̂ ⊙ b), "bias": PerSample(Σ_s b)}``, each ``[n, C]``;
    so ⟨P, c_z(w)⟩ = Σ_{c,s} P[c] x̂[c, s] b[c, s]. Raises ValueError without a batch axis.

    Example:
        >>> import torch
        >>> gen = torch.Generator().manual_seed(0)
        >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
        >>> gn = nn.GroupNorm(2, 4).double()
        >>> x, b = randn(3, 4, 5, 2), randn(3, 4, 5, 2)
        >>> terms = GroupNormRule.terms(gn, x, b)
        >>> gw, gb = torch.autograd.grad(gn(x[2:]), [gn.weight, gn.bias], b[2:])     # sample 2 alone
        >>> torch.allclose(terms["weight"].c[2], gw), torch.allclose(terms["bias"].c[2], gb)
        (True, True)
    """

    @classmethod
    def terms(cls, module, x, grad_output):
        batch_first("nn.GroupNorm", x, 2)
        n, C = x.shape[0], x.shape[1]
        xhat = nn.functional.group_norm(x, module.num_groups, None, None, module.eps)
        out = {}
        if module.weight is not None:
            out["weight"] = PerSample((xhat * grad_output).reshape(n, C, -1).sum(-1))
        if module.bias is not None:
            out["bias"] = PerSample(grad_output.reshape(n, C, -1).sum(-1))
        return out

"""``nn.Conv1d`` and ``nn.Conv2d`` via unfold, the Linear form of a convolution.

In the Linear form the padded input is unfolded into L patches a_t ∈ R^{C_in/G · k} (k = kernel elements) and
the output gradient read as b_t ∈ R^{C_out} per output location, so on the view
W ∈ R^{C_out × (C_in/G · k)}: c_z(W) = Σ_t b_t a_tᵀ, c_z(bias) = Σ_t b_t.
Groups G > 1: group g's patches pair only with its own output channels, so each group is a
separate set of positions whose output gradient is zero outside the group (T = G·L).
The patches stay folded (:class:`~estimators._factors.UnfoldFactor`): the dense contraction
⟨P, c_z⟩ is one convolution of x_z with P (:class:`~estimators._factors.ConvBilinear`), and only
the pairwise and materializing contractions unfold them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._factors import ConvBilinear, DenseFactor, PerSample, UnfoldFactor
from ._base import LayerRule, batch_first


def _conv_terms(module, x, grad_output, spatial: int):
    batch_first(type(module).__name__, x, spatial + 2)
    n = x.shape[0]
    # _reversed_padding_repeated_twice is torch's own [left, right, top, bottom] padding,
    # which also encodes padding="same" (asymmetric for even kernels) and non-zero modes.
    pad = list(module._reversed_padding_repeated_twice)
    zeros = module.padding_mode == "zeros" and all(pad[i] == pad[i + 1] for i in range(0, len(pad), 2))
    if any(pad) and not zeros:  # asymmetric or non-zero padding: a padded copy of the input
        x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    # else symmetric zeros: the unfolding and the convolution pad the input themselves
    padding = (pad[2] if spatial == 2 else 0, pad[0]) if zeros else (0, 0)  # (height, width)
    if spatial == 1:  # Conv1d as a Conv2d of height 1
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    G = module.groups
    # The patches are not unfolded here: the dense contraction convolves x with P instead
    # (ConvBilinear); what needs the patches unfolds them on demand.
    a = UnfoldFactor(x, tuple(kernel), tuple(stride), tuple(dilation), G, padding)
    c_out = grad_output.shape[1]
    go = grad_output.reshape(n, c_out, -1)  # [n, C_out, L]
    b = go.transpose(1, 2)  # [n, L, C_out]
    if a.T != G * b.shape[1]:
        raise RuntimeError(
            f"{type(module).__name__}: unfold produced {a.T // G} positions but the output has {b.shape[1]}; "
            "this configuration is not supported by the rule, allow the fallback for it"
        )
    if G > 1:
        per_out = c_out // G
        mask = torch.zeros(G, 1, c_out, dtype=b.dtype, device=b.device)
        for g in range(G):
            mask[g, :, g * per_out:(g + 1) * per_out] = 1
        b = (b.unsqueeze(1) * mask.unsqueeze(0)).reshape(n, G * b.shape[1], c_out)
    out = {"weight": ConvBilinear(DenseFactor(b), a, go)}
    if module.bias is not None:
        out["bias"] = PerSample(go.sum(-1))
    return out


class Conv1dRule(LayerRule, layer=nn.Conv1d):
    """Rule for ``nn.Conv1d``; dense cost n·L·G·C_out·C_in/G·k.

    ``terms(module, x, grad_output)``: x ``[n, C_in, length]``, grad_output ``[n, C_out, L]`` ->
    ``{"weight": Bilinear(b [n, G·L, C_out], a [n, G·L, C_in/G·k]), "bias": PerSample([n, C_out])}``.
    Raises ValueError without a batch axis, RuntimeError if unfold and the output disagree.

    Example (padding "same", stride 1):
        >>> gen = torch.Generator().manual_seed(0)
        >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
        >>> conv = nn.Conv1d(2, 3, 3, padding="same").double()
        >>> x, b = randn(2, 2, 7), randn(2, 3, 7)
        >>> c = Conv1dRule.terms(conv, x, b)["weight"].materialize(conv.weight.shape)
        >>> torch.allclose(c[1], torch.autograd.grad(conv(x[1:]), conv.weight, b[1:])[0])
        True
    """

    @classmethod
    def terms(cls, module, x, grad_output):
        return _conv_terms(module, x, grad_output, 1)


class Conv2dRule(LayerRule, layer=nn.Conv2d):
    """Rule for ``nn.Conv2d``; dense cost n·L·G·C_out·C_in/G·kh·kw.

    ``terms(module, x, grad_output)``: x ``[n, C_in, H, W]``, grad_output ``[n, C_out, H', W']``
    -> ``{"weight": Bilinear(b [n, G·L, C_out], a [n, G·L, C_in/G·kh·kw]), "bias": PerSample([n, C_out])}``
    with L = H'·W' output locations; ⟨P, c_z(W)⟩ = Σ_t b_tᵀ P a_t on the view [C_out, C_in/G·kh·kw].

    Example (groups, stride and padding; per-sample terms equal autograd on one sample):
        >>> gen = torch.Generator().manual_seed(0)
        >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
        >>> conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
        >>> x = randn(3, 4, 5, 5)
        >>> b = randn(*conv(x).shape)
        >>> terms = Conv2dRule.terms(conv, x, b)
        >>> c = terms["weight"].materialize(conv.weight.shape)
        >>> gw, gb = torch.autograd.grad(conv(x[2:]), [conv.weight, conv.bias], b[2:])
        >>> torch.allclose(c[2], gw), torch.allclose(terms["bias"].c[2], gb)
        (True, True)
    """

    @classmethod
    def terms(cls, module, x, grad_output):
        return _conv_terms(module, x, grad_output, 2)

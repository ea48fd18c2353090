"""``nn.Embedding``: y_t = W[x_t], indices x ``[n, *mid]``.

c_z(W) = Σ_t e_{x_t} b_tᵀ: a one-hot row factor (never materialized) and the output gradients
as columns, so ⟨P, c_z⟩ = Σ_t P[x_t] · b_t costs n·T·d. Positions equal to ``padding_idx``
receive no gradient in torch and get weight 0 here.
"""

from __future__ import annotations

from torch import nn

from persample import SampleInteractionError
from .._factors import Bilinear, DenseFactor, OneHotFactor
from ._base import LayerRule, batch_first


class EmbeddingRule(LayerRule, layer=nn.Embedding):
    """Rule for ``nn.Embedding``; dense cost n·T·d, pairwise n·T·m·S·(1 + d).

    ``terms(module, x, grad_output)``: indices x ``[n, *mid]``, grad_output ``[n, *mid, d]`` ->
    ``{"weight": Bilinear(OneHotFactor(x [n, T], num_embeddings, weight), DenseFactor(b [n, T, d]))}``.
    ``unsupported`` raises :class:`SampleInteractionError` for ``scale_grad_by_freq=True``.

    Example (padding positions get no gradient, as in torch):
        >>> import torch
        >>> gen = torch.Generator().manual_seed(0)
        >>> emb = nn.Embedding(6, 3, padding_idx=0).double()
        >>> idx = torch.tensor([[1, 0, 1], [2, 3, 0]])
        >>> b = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
        >>> c = EmbeddingRule.terms(emb, idx, b)["weight"].materialize(emb.weight.shape)    # [n, 6, 3]
        >>> torch.allclose(c[0], torch.autograd.grad(emb(idx[:1]), emb.weight, b[:1])[0])
        True
        >>> torch.allclose(c.sum(0), torch.autograd.grad(emb(idx), emb.weight, b)[0])
        True
    """

    @classmethod
    def params(cls, module):
        return ("weight",)

    @classmethod
    def unsupported(cls, module):
        if module.scale_grad_by_freq:
            # The gradient is divided by token counts over the whole batch: samples interact.
            raise SampleInteractionError(
                "nn.Embedding with scale_grad_by_freq=True scales each sample's gradient by token counts "
                "of the whole batch, so per-sample contributions are undefined; create it with "
                "scale_grad_by_freq=False"
            )
        return None

    @classmethod
    def terms(cls, module, x, grad_output):
        batch_first("nn.Embedding", x, 1)
        n = x.shape[0]
        idx = x.reshape(n, -1)
        b = grad_output.reshape(n, idx.shape[1], -1)
        weight = None
        if module.padding_idx is not None:
            weight = (idx != module.padding_idx).to(grad_output.dtype)
        return {"weight": Bilinear(OneHotFactor(idx, module.num_embeddings, weight), DenseFactor(b))}

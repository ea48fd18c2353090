"""``nn.Embedding``: y_t = W[x_t], indices x ``[n, *mid]``.

c_z(W) = Σ_t e_{x_t} b_tᵀ: a one-hot row factor (never materialized) and the output gradients
as columns, so ⟨P, c_z⟩ = Σ_t P[x_t] · b_t costs n·T·d. Positions equal to ``padding_idx``
receive no gradient in torch and get weight 0 here.
"""

from __future__ import annotations

from torch import nn

from .._checks import SampleInteractionError
from .._factors import Bilinear, DenseFactor, OneHotFactor
from ._base import LayerRule, batch_first


class EmbeddingRule(LayerRule, layer=nn.Embedding):
    """Rule for ``nn.Embedding``; dense cost n·T·d, pairwise n·T·m·S·(1 + d)."""

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

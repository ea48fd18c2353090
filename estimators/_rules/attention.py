"""``nn.MultiheadAttention`` (``batch_first=True``): a ghost rule from one batched recomputation.

y = o W_outᵀ + b_out with o = attention(q W_qᵀ + b_q, k W_kᵀ + b_k, v W_vᵀ + b_v) and
[W_q; W_k; W_v] = ``in_proj_weight`` ``[3d, d]``. The capture gives the call's inputs and ∂L/∂y;
one recomputation of the attention for the whole batch (samples never mix in attention) gives
the per-sample output-side gradients ∂L/∂(q W_qᵀ), ∂L/∂(k W_kᵀ), ∂L/∂(v W_vᵀ) and the
pre-projection activations o. Then, per sample z, with positions t of the query, key and value:

    c_z(in_proj_weight) = Σ_t [∂q_t; 0; 0] x^q_tᵀ + Σ_s [0; ∂k_s; 0] x^k_sᵀ + Σ_s [0; 0; ∂v_s] x^v_sᵀ
    c_z(out_proj.weight) = Σ_t b_t o_tᵀ,   c_z(in_proj_bias) = Σ [∂q; ∂k; ∂v],   c_z(out_proj.bias) = Σ_t b_t

(one ``Bilinear`` over the concatenated positions; for self-attention, where query, key and
value are one tensor, the three blocks share the positions). No per-sample gradient is formed.
"""

from __future__ import annotations

import torch
from torch import nn

from .._factors import Bilinear, DenseFactor, PerSample
from ._base import LayerRule, batch_first

_PARAMS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not attended) or a float one as an additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttentionRule(LayerRule, layer=nn.MultiheadAttention):
    """Rule for ``nn.MultiheadAttention`` with ``batch_first=True``; cost one attention forward and backward per batch.

    ``call_terms(module, (query, key, value), kwargs, grad_output)`` with query ``[n, L, d]``, key
    and value ``[n, S, d]``, ``key_padding_mask`` ``[n, S]`` and a shared ``attn_mask`` ``[L, S]``
    (boolean or additive) -> ``{"in_proj_weight": Bilinear, "in_proj_bias": PerSample [n, 3d],
    "out_proj.weight": Bilinear, "out_proj.bias": PerSample [n, d]}``. Instances with
    ``add_bias_kv``, ``add_zero_attn`` or different key/value sizes take the fallback.

    Example (self-attention; the terms add up to autograd's gradient):
        >>> torch.manual_seed(0) and None
        >>> mha = nn.MultiheadAttention(4, 2, batch_first=True).double()
        >>> x = torch.randn(3, 5, 4, dtype=torch.float64)
        >>> y = mha(x, x, x, need_weights=False)[0]
        >>> b = torch.randn_like(y)
        >>> terms = MultiheadAttentionRule.call_terms(mha, (x, x, x), {"need_weights": False}, b)
        >>> grad = torch.autograd.grad(y, mha.in_proj_weight, b)[0]
        >>> torch.allclose(terms["in_proj_weight"].total(mha.in_proj_weight.shape), grad)
        True
    """

    multi_output = True

    @classmethod
    def params(cls, module):
        return _PARAMS

    @classmethod
    def unsupported(cls, module):
        if not module._qkv_same_embed_dim:
            return "kdim/vdim differ from embed_dim (separate q/k/v projection weights)"
        if module.bias_k is not None or module.add_zero_attn:
            return "add_bias_kv / add_zero_attn"
        if not module.batch_first:
            return "batch_first=False"
        return None

    @classmethod
    def terms(cls, module, x, grad_output):
        return cls.call_terms(module, (x, x, x), {}, grad_output)

    @classmethod
    def call_terms(cls, module, args, kwargs, grad_output):
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
        bound = dict(zip(names, args)) | dict(kwargs)
        query, key, value = bound["query"], bound.get("key", bound["query"]), bound.get("value", bound["query"])
        for name, t in (("query", query), ("key", key), ("value", value)):
            batch_first(f"nn.MultiheadAttention {name}", t, 3)
        if module.training and module.dropout > 0:
            raise ValueError(
                f"nn.MultiheadAttention with dropout={module.dropout} in train mode draws random attention masks that a "
                "recomputation cannot reproduce; build it with dropout=0.0 or put it in eval mode"
            )
        n, L, d = query.shape
        S, h = key.shape[1], module.num_heads
        dtype = grad_output.dtype
        W, bias = module.in_proj_weight.detach().to(dtype), module.in_proj_bias
        biases = (None, None, None) if bias is None else bias.detach().to(dtype).chunk(3)
        xs = [t.detach().to(dtype) for t in (query, key, value)]
        mask = _additive(bound.get("attn_mask"), dtype)
        if mask is not None and mask.dim() == 3:
            raise ValueError("nn.MultiheadAttention with a 3-D attn_mask (per sample and head) is not supported; pass [L, S] and key_padding_mask [n, S]")
        padding = _additive(bound.get("key_padding_mask"), dtype)
        total = None if mask is None else mask.reshape(1, 1, L, S)
        if padding is not None:
            padding = padding.reshape(n, 1, 1, S)
            total = padding if total is None else total + padding
        with torch.enable_grad():
            projected = [
                torch.nn.functional.linear(x, w, b).detach().requires_grad_(True) for x, w, b in zip(xs, W.chunk(3), biases)
            ]
            q, k, v = (p.reshape(n, -1, h, d // h).transpose(1, 2) for p in projected)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=total).transpose(1, 2).reshape(n, L, d)
            # y = o W_outᵀ + b_out, so ∂L/∂o = b W_out; then back through the attention to q, k, v.
            d_o = grad_output @ module.out_proj.weight.detach().to(dtype)
            dq, dk, dv = torch.autograd.grad(o, projected, d_o)
        zeros = lambda t: torch.zeros_like(t)  # noqa: E731
        if query is key and key is value:
            rows = torch.cat([dq, dk, dv], dim=-1)  # [n, L, 3d]: self-attention shares the positions
            cols = xs[0]
        else:
            rows = torch.cat(
                [torch.cat([dq, zeros(dq), zeros(dq)], -1), torch.cat([zeros(dk), dk, zeros(dk)], -1), torch.cat([zeros(dv), zeros(dv), dv], -1)],
                dim=1,
            )  # [n, L + 2S, 3d]
            cols = torch.cat(xs, dim=1)  # [n, L + 2S, d]
        out = {
            "in_proj_weight": Bilinear(DenseFactor(rows), DenseFactor(cols)),
            "out_proj.weight": Bilinear(DenseFactor(grad_output), DenseFactor(o.detach())),
        }
        if bias is not None:
            out["in_proj_bias"] = PerSample(torch.cat([dq.sum(1), dk.sum(1), dv.sum(1)], dim=-1))
        if module.out_proj.bias is not None:
            out["out_proj.bias"] = PerSample(grad_output.sum(1))
        return out

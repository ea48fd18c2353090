"""``nn.Linear``: y = x Wᵀ + b, x ``[n, *mid, d_in]``.

With T = prod(mid) positions (T = 1 without a sequence axis), a_t = x_t, b_t = ∂L/∂y_t:
c_z(W) = Σ_t b_t a_tᵀ (rows: output gradients, columns: inputs), c_z(b) = Σ_t b_t.
"""

from __future__ import annotations

from torch import nn

from .._factors import Bilinear, DenseFactor, PerSample
from ._base import LayerRule, batch_first


class LinearRule(LayerRule, layer=nn.Linear):
    """Rule for ``nn.Linear``; dense cost n·T·d_in·d_out, pairwise n·T·m·S·(d_in + d_out).

    ``terms(module, x, grad_output)``: x ``[n, *mid, d_in]``, grad_output ``[n, *mid, d_out]``
    -> ``{"weight": Bilinear(rows=b [n, T, d_out], cols=a [n, T, d_in]), "bias": PerSample([n, d_out])}``
    (no ``"bias"`` when the layer has none). Raises ValueError for an input without a batch axis.

    Example (with a sequence axis, T = 5: sample 1's term equals the gradient of sample 1 alone):
        >>> import torch
        >>> gen = torch.Generator().manual_seed(0)
        >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
        >>> lin = nn.Linear(3, 2).double()
        >>> x, b = randn(4, 5, 3), randn(4, 5, 2)
        >>> terms = LinearRule.terms(lin, x, b)
        >>> c1 = terms["weight"].materialize(lin.weight.shape)[1]
        >>> torch.allclose(c1, torch.autograd.grad(lin(x[1:2]), lin.weight, b[1:2])[0])
        True
        >>> terms["bias"].c.shape
        torch.Size([4, 2])
    """

    @classmethod
    def terms(cls, module, x, grad_output):
        return affine_terms("nn.Linear", module, x, grad_output, weight_in_out=False)


def affine_terms(layer: str, module, x, grad_output, *, weight_in_out: bool) -> dict:
    """Terms of y = x Wᵀ + b (``weight_in_out=False``, nn.Linear's [out, in]) or y = x W + b (W [in, out]).

    x ``[n, *mid, d_in]``, grad_output ``[n, *mid, d_out]``: c_z(W) = Σ_t b_t a_tᵀ (or its transpose)
    as a ``Bilinear`` of the positions, c_z(b) = Σ_t b_t as ``PerSample``.
    """
    batch_first(layer, x, 2)
    n = x.shape[0]
    a = x.reshape(n, -1, x.shape[-1])  # [n, T, d_in]
    b = grad_output.reshape(n, -1, grad_output.shape[-1])  # [n, T, d_out]
    weight = Bilinear(DenseFactor(a), DenseFactor(b)) if weight_in_out else Bilinear(DenseFactor(b), DenseFactor(a))
    out = {"weight": weight}
    if module.bias is not None:
        out["bias"] = PerSample(b.sum(1))
    return out

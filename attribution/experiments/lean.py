"""A lean re-implementation of the streamed estimator for the bench MLP: what the arithmetic alone costs.

The bench's ``lean-streamed`` mode (``--model mlp``) times this beside the toolkit's
``ghost-streamed`` (``InRunShapley(..., val_point="current", stream=True)``), to separate what
the estimator must compute from what the toolkit adds around it. At each step it computes,
and nothing else:

1. ∇L_val at θ_t (one forward and backward of the validation batch, before the training forward);
2. for each parameter, AdamW's secant slope J under the optimizer's current state (the chord
   form of ``optimizers.adam``), P = J ⊙ ∇L_val;
3. for each ``nn.Linear``, the per-sample ⟨P, c_z⟩ from the layer's input a_z ``[n, d_in]`` and
   output gradient b_z ``[n, d_out]``: Σ_o (a_z Pᵀ)_o b_{z,o} for the weight, ⟨P_b, b_z⟩ for the bias;
   φ_z = −Σ over the layers.

It has none of the toolkit's guarantees: no completeness check, no nonlinearity diagnostic, no
exact-update route, no ledger or ids, no other layer kinds or optimizers (AdamW without AMSGrad
or ``maximize``), no refusals. Its values equal the toolkit's streamed values to float32 rounding
(``tests/attribution/test_lean.py``), so the two modes do the same work.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    >>> x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    >>> lean = LeanStreamed(model, opt, nn.functional.cross_entropy, (x[4:], y[4:]))
    >>> with lean.batch():
    ...     nn.functional.cross_entropy(model(x[:4]), y[:4]).backward()
    >>> opt.step()
    >>> lean.last_values.shape
    torch.Size([4])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn


class LeanStreamed:
    """First-order in-run values (val_point="current", secant J) of a model of ``nn.Linear`` layers under AdamW.

    Args:
        model: layers with parameters must be ``nn.Linear``.
        optimizer: a ``torch.optim.AdamW`` (or ``Adam`` without weight decay) holding every parameter.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch's samples.
        val_batch: ``(inputs, targets)``.
    Attributes:
        last_values: float32 ``[n]``, φ_z of the last step's batch (positive: lowers the validation loss).
        total: float64, the sum of every step's values (a running number the bench reads).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, val_batch: tuple):
        self.model, self.optimizer, self.loss_fn, self.val_batch = model, optimizer, loss_fn, val_batch
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        owned = {id(p) for m in self.layers for p in m.parameters(recurse=False)}
        if any(id(p) not in owned for p in model.parameters()):
            raise TypeError("LeanStreamed values nn.Linear layers only")
        self.last_values: torch.Tensor | None = None
        self.total = 0.0

    @contextlib.contextmanager
    def batch(self):
        """Capture one batch's forward and backward; its values are computed on leaving the block (before ``step()``)."""
        val = self._validation_gradients()
        inputs: dict[nn.Module, torch.Tensor] = {}
        grads: dict[nn.Module, torch.Tensor] = {}

        def forward_hook(module, args, output):
            inputs[module] = args[0].detach()
            output.register_hook(lambda g: grads.__setitem__(module, g.detach()))

        handles = [m.register_forward_hook(forward_hook) for m in self.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        phi = None
        for m in self.layers:
            a, b = inputs[m], grads[m]
            P = self._secant(m.weight) * val[m.weight]
            v = torch.linalg.vecdot(a @ P.T, b)  # [n]: Σ_o (a_z Pᵀ)_o b_{z,o} = ⟨P, b_z a_zᵀ⟩
            if m.bias is not None:
                v = v + b @ (self._secant(m.bias) * val[m.bias])
            phi = -v if phi is None else phi - v
        self.last_values = phi
        self.total += float(phi.sum(dtype=torch.float64))

    def _validation_gradients(self) -> dict[torch.Tensor, torch.Tensor]:
        """∇L_val(θ_t) of each parameter, in eval mode (the toolkit's default validation pass)."""
        params = [p for p in self.model.parameters()]
        training = self.model.training
        self.model.eval()
        try:
            x, y = self.val_batch
            with torch.enable_grad():
                grads = torch.autograd.grad(self.loss_fn(self.model(x), y), params)
        finally:
            self.model.train(training)
        return dict(zip(params, grads))

    def _secant(self, p: torch.Tensor) -> torch.Tensor:
        """(Δ(g) − Δ(0)) ⊘ g of AdamW at g = p.grad under the current state (the chord form, no cancellation)."""
        group = next(g for g in self.optimizer.param_groups if any(q is p for q in g["params"]))
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        st = self.optimizer.state.get(p, {})
        t = int(st["step"]) + 1 if "step" in st else 1
        b1, b2 = 1 - beta1**t, 1 - beta2**t
        g = p.grad
        m = st.get("exp_avg", torch.zeros_like(g))
        u = st.get("exp_avg_sq", torch.zeros_like(g)) * (beta2 / b2)
        da = torch.sqrt(u)
        db = u.addcmul_(g, g, value=(1 - beta2) / b2).sqrt_()
        s = da + db
        frac = torch.mul(m, g).div_(s).masked_fill_(s == 0, 0.0).div_(da.add_(eps))
        bracket = frac.mul_(-(1 - beta2) * beta1 / b2).add_(1 - beta1)
        return bracket.div_(db.add_(eps)).mul_(-(lr / b1))

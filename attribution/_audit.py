"""The online audit: every N steps, the real optimizer's leave-one-out of k samples against the tracker's values.

For k samples z of the step (drawn by the tracker's own generator), the oracle takes the REAL
optimizer step (a copy of the model and the optimizers with their state) with gradient
g_B − c·c_z and with g_B, and measures the validation loss after each:

    LOO_z = L_val(θ_t + Δ(g_B − c·c_z)) − L_val(θ_t + Δ(g_B)),

the per-step game's leave-one-out marginal U(B) − U(B∖z). No linearization, no first-order
expansion in θ: what the audit compares the values with is the step's real effect. The
contributions c_z are the captured ones (checked against ``param.grad`` by the completeness
identity every step). Cost: k + 1 optimizer steps and validation forwards on a copy of the model.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_map

from persample import isolated_pass


def _as_float64(x):
    """Floating-point tensors of a validation batch in float64, as the float64 copy of the model."""
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    """One audited step: Pearson R and relative L2 error of the k values against the real leave-one-out."""

    step: int
    route: str
    samples: int
    pearson: float
    relative_error: float
    seconds: float


def real_leave_one_out(computer, opts: list[torch.optim.Optimizer], rows: list[int]) -> torch.Tensor:
    """``[k, K]`` real-optimizer leave-one-out marginals of the captured samples ``rows`` (float64).

    Call inside the step's pre-hook: the model is at θ_t, ``param.grad`` holds g_B and the
    optimizers hold s_{t−1}. Nothing of the caller's is changed (the global RNG included).
    """
    model = computer.model
    names = {p: n for n, p in model.named_parameters()}
    originals = {n: p for p, n in names.items()}
    stepped = [p for o in opts for g in o.param_groups for p in g["params"] if p.grad is not None]
    wanted = [p for p in stepped if p in computer.engine._names]
    contributions = {
        p: c * computer.grad_scale for p, c in computer.engine.per_sample_contributions(wanted, dtype=torch.float64, rows=rows)
    }
    # One deepcopy shares the memo, so the copied optimizers hold the copied model's parameters.
    # The copy steps in float64 (load_state_dict casts the state to it): one sample's effect on the
    # validation loss is often below float32's resolution of the loss.
    twin, twin_opts = copy.deepcopy((model, list(opts)))
    twin.double()
    twin_params = dict(twin.named_parameters())
    theta = {n: p.detach().clone() for n, p in twin_params.items()}
    state = [copy.deepcopy(o.state_dict()) for o in twin_opts]
    grads = {names[p]: p.grad.detach().to(torch.float64) for p in stepped}

    def stepped_to(remove: int | None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for n, p in twin_params.items():
                p.copy_(theta[n])
        for o, s in zip(twin_opts, state):
            o.load_state_dict(copy.deepcopy(s))
            o.zero_grad(set_to_none=True)
        for n, g in grads.items():
            q = twin_params[n]
            c = contributions.get(originals[n]) if remove is not None else None
            q.grad = g.clone() if c is None else g - c[remove].reshape(g.shape)
        for o in twin_opts:
            o.step()
        return {n: p.detach() for n, p in twin_params.items()}

    val_batches = [tree_map(_as_float64, b) for b in computer.val_batches]

    def val_loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        with isolated_pass(twin, train_mode=computer.val_train_mode), torch.no_grad():
            return torch.tensor(
                [float(computer.loss_fn(functional_call(twin, params, (x,)), y)) for x, y in val_batches], dtype=torch.float64
            )

    # The copies carry the tracker's step hooks too; they return at once for an optimizer they do not track.
    full = val_loss(stepped_to(None))
    return torch.stack([val_loss(stepped_to(j)) - full for j in range(len(rows))])


def audit_record(step: int, route: str, values: torch.Tensor, loo: torch.Tensor, seconds: float) -> AuditRecord:
    """Compare ``values [k, K]`` with ``loo [k, K]`` (the first target; NaN R when k < 2 or a constant)."""
    a, b = values[:, 0].to(torch.float64), loo[:, 0].to(torch.float64)
    if len(a) >= 2 and float(a.std()) > 0 and float(b.std()) > 0:
        r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    else:
        r = float("nan")
    denom = float(torch.linalg.vector_norm(b))
    err = float(torch.linalg.vector_norm(a - b)) / denom if denom > 0 else float("nan")
    return AuditRecord(step, route, len(a), r, err, seconds)


def timed_audit(computer, opts, values: torch.Tensor, k: int, generator: torch.Generator, step: int, route: str) -> AuditRecord:
    """Audit ``k`` random samples of the step (all of them if the step has fewer)."""
    t0 = time.perf_counter()
    n = values.shape[0]
    rows = torch.randperm(n, generator=generator)[: min(k, n)].sort().values.tolist()
    loo = real_leave_one_out(computer, opts, rows)
    return audit_record(step, route, values[rows], loo, time.perf_counter() - t0)


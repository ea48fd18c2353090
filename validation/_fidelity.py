"""How well an estimate of data values matches a ground truth."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import stats


def _as_vector(x: Any, what: str) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(
            f"{what} must be one value per sample, shape [n], got shape {arr.shape}. "
            "Fix: for a value matrix [n, K] compare one validation target at a time, e.g. `values[:, k]`."
        )
    if arr.size == 0:
        raise ValueError(f"{what} is empty; fidelity needs at least one sample.")
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise ValueError(
            f"{what} has {idx.size} non-finite entries (NaN or inf), first at index {int(idx[0])}: "
            f"{arr[idx[0]]}. Fidelity of a broken estimate is meaningless; fix the computation that produced it."
        )
    return arr


def _top_k(x: np.ndarray, k: int) -> set[int]:
    # Stable sort of -x: ties are broken by the lower index, deterministically.
    return set(np.argsort(-x, kind="stable")[:k].tolist())


def fidelity(estimate: Any, truth: Any, *, k: int | None = None, efficiency_target: Any = None) -> dict[str, Any]:
    """Agreement between estimated values and ground-truth values.

    Metrics (``e`` = estimate, ``t`` = truth, both ``[n]``):

    * ``pearson``, ``spearman``, ``kendall``: correlations (``scipy.stats``; Kendall's tau-b).
    * ``top_k_overlap``: ``|top_k(e) ∩ top_k(t)| / k`` (largest values; ties by lower index).
    * ``sign_agreement``: fraction of samples with ``sign(e_z) == sign(t_z)`` (0 is its own sign).
    * ``relative_l2_error``: ``‖e − t‖ / ‖t‖``.
    * ``estimate_sum``: ``Σ e``; ``efficiency_gap``: ``Σ e − efficiency_target``;
      ``relative_efficiency_gap``: that over ``|efficiency_target|``. For Shapley values the
      target is ``U(B) − U(∅)`` (``ShapleyEstimate.efficiency_target``).

    A metric that is undefined for the inputs is ``nan`` (never an exception) and the reason is
    given in ``result["undefined"][metric]``: a correlation when either input is constant or
    ``n < 2``, the relative L2 error when ``t`` is all zeros, the efficiency gaps when no
    ``efficiency_target`` is given, the relative gap when the target is 0.

    Args:
        estimate: values ``[n]`` (tensor, array or sequence; ``[n, 1]`` accepted).
        truth: ground truth ``[n]``, e.g. :func:`shapley_values` or :func:`leave_one_out`.
        k: size of the top-k sets; default ``max(1, ceil(n / 10))``; ``1 <= k <= n``.
        efficiency_target: scalar the estimate should sum to, or ``None``.

    Returns:
        ``dict`` of Python floats for the metrics above, plus ``"k"`` (int) and ``"undefined"``
        (``dict[str, str]``, empty when every metric is defined).

    Raises:
        ValueError: shapes differ or are not ``[n]``, empty input, NaN/inf in an input or in
            ``efficiency_target``, ``k`` out of range.

    Example:
        >>> fidelity(torch.tensor([0.1, 0.3, -0.2]), torch.tensor([0.2, 0.5, -0.1]), k=1)["spearman"]
        1.0
        >>> f = fidelity([1.0, 2.0, -1.0, 0.5], [1.0, 2.0, 1.0, 0.5], k=2, efficiency_target=4.5)
        >>> f["top_k_overlap"], f["sign_agreement"], round(f["efficiency_gap"], 12), f["undefined"]
        (1.0, 0.75, -2.0, {})
        >>> f = fidelity([1.0, 1.0], [0.0, 1.0])             # a constant estimate: correlations undefined
        >>> f["pearson"], f["undefined"]["pearson"]
        (nan, 'estimate constant: correlation is 0/0')
        >>> fidelity([1.0, 2.0], [1.0, 2.0, 3.0])
        Traceback (most recent call last):
        ...
        ValueError: estimate and truth must have the same shape, got (2,) and (3,). ...
    """
    e = _as_vector(estimate, "estimate")
    t = _as_vector(truth, "truth")
    if e.shape != t.shape:
        raise ValueError(
            f"estimate and truth must have the same shape, got {e.shape} and {t.shape}. "
            "Fix: value the same batch, in the same sample order."
        )
    n = e.size
    if k is None:
        k = max(1, math.ceil(n / 10))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an int with 1 <= k <= n = {n}, got {k!r}.")
    k = int(k)

    out: dict[str, Any] = {}
    undefined: dict[str, str] = {}
    constant = [name for name, x in (("estimate", e), ("truth", t)) if np.all(x == x[0])]
    for metric, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
        if n < 2:
            out[metric], undefined[metric] = math.nan, "fewer than 2 samples"
        elif constant:
            out[metric] = math.nan
            undefined[metric] = f"{' and '.join(constant)} constant: correlation is 0/0"
        else:
            out[metric] = float(fn(e, t)[0])

    out["top_k_overlap"] = len(_top_k(e, k) & _top_k(t, k)) / k
    out["sign_agreement"] = float(np.mean(np.sign(e) == np.sign(t)))
    norm_t = float(np.linalg.norm(t))
    if norm_t == 0.0:
        out["relative_l2_error"], undefined["relative_l2_error"] = math.nan, "truth is all zeros"
    else:
        out["relative_l2_error"] = float(np.linalg.norm(e - t)) / norm_t
    out["estimate_sum"] = float(e.sum())

    if efficiency_target is None:
        for metric in ("efficiency_gap", "relative_efficiency_gap"):
            out[metric], undefined[metric] = math.nan, "no efficiency_target given"
    else:
        target = torch.as_tensor(efficiency_target, dtype=torch.float64)
        if target.numel() != 1:
            raise ValueError(
                f"efficiency_target must be a scalar, got shape {tuple(target.shape)}. "
                "Fix: pass the target of the column being compared, e.g. `est.efficiency_target[k]`."
            )
        target = float(target.reshape(()))
        if not math.isfinite(target):
            raise ValueError(f"efficiency_target must be finite, got {target}.")
        out["efficiency_gap"] = out["estimate_sum"] - target
        if target == 0.0:
            out["relative_efficiency_gap"] = math.nan
            undefined["relative_efficiency_gap"] = "efficiency_target is 0"
        else:
            out["relative_efficiency_gap"] = out["efficiency_gap"] / abs(target)
    out["k"] = k
    out["undefined"] = undefined
    return out

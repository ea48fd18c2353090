"""Shapley values of the per-step game: exact enumeration and permutation sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._game import StepPath, _evaluate
from ._per_sample import LossFn, _batch_size, _unpack_batch

#: Largest batch for which ``shapley_values(exact=True)`` enumerates all 2^n coalitions.
MAX_EXACT_PLAYERS = 16


@dataclass(frozen=True)
class ShapleyEstimate:
    """Shapley values of the per-step game and their Monte Carlo standard errors.

    Attributes:
        values: float64 ``[n]`` (or ``[n, K]``), ``φ_z``.
        std_errors: same shape; the standard error of each value (zeros when exact).
        utility_empty: ``U(∅)``, float64 scalar (or ``[K]``).
        utility_full: ``U(B)``, float64 scalar (or ``[K]``).
        num_permutations: permutations sampled, ``None`` for the exact enumeration.

    ``values.sum(0)`` equals :attr:`efficiency_target` ``= U(B) − U(∅)`` in both cases (every
    sampled permutation telescopes to it), up to rounding.

    Example:
        >>> f64 = dict(dtype=torch.float64)
        >>> est = ShapleyEstimate(torch.tensor([0.1, 0.2], **f64), torch.zeros(2, **f64),
        ...                       torch.tensor(0.05, **f64), torch.tensor(0.35, **f64))
        >>> est.exact, round(est.efficiency_target.item(), 12), torch.isclose(est.values.sum(), est.efficiency_target).item()
        (True, 0.3, True)
    """

    values: Tensor
    std_errors: Tensor
    utility_empty: Tensor
    utility_full: Tensor
    num_permutations: int | None = None

    @property
    def exact(self) -> bool:
        """True when computed by enumerating every coalition (``num_permutations is None``).

        Example:
            >>> z = torch.zeros(1, dtype=torch.float64)
            >>> ShapleyEstimate(z, z, z[0], z[0], num_permutations=100).exact
            False
        """
        return self.num_permutations is None

    @property
    def efficiency_target(self) -> Tensor:
        """``U(B) − U(∅)``, what the values sum to (float64 scalar, or ``[K]``).

        Example:
            >>> z = torch.zeros(1, dtype=torch.float64)
            >>> ShapleyEstimate(z, z, torch.tensor(1.0), torch.tensor(3.0)).efficiency_target.item()
            2.0
        """
        return self.utility_full - self.utility_empty


def _bit_masks(n: int) -> Tensor:
    """All ``2^n`` coalitions as bool ``[2^n, n]``; row ``b`` holds sample ``i`` iff bit ``i`` of ``b``."""
    codes = torch.arange(2**n, dtype=torch.int64)
    return ((codes.unsqueeze(1) >> torch.arange(n)) & 1).bool()


def _shapley_weights(n: int) -> Tensor:
    """``w[s] = s!(n−s−1)!/n!`` for ``s = 0..n−1``, float64 from exact integers."""
    total = math.factorial(n)
    return torch.tensor(
        [math.factorial(s) * math.factorial(n - s - 1) / total for s in range(n)], dtype=torch.float64
    )


def _exact(u: Tensor, n: int) -> Tensor:
    """``φ_i = Σ_{S∌i} w[|S|] (U(S∪i) − U(S))`` from ``u`` indexed by bit code: ``[n, K]``."""
    codes = torch.arange(2**n, dtype=torch.int64)
    sizes = _bit_masks(n).sum(1)
    w = _shapley_weights(n)
    phi = []
    for i in range(n):  # n <= 16 players; each term is vectorised over 2^(n-1) coalitions
        without = codes[(codes >> i) & 1 == 0]
        marg = u[without | (1 << i)] - u[without]
        phi.append((w[sizes[without]].unsqueeze(1) * marg).sum(0))
    return torch.stack(phi)


def shapley_values(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, batch: Any, val_batch: Any, *,
    exact: bool | None = None, samples: int | None = None, seed: int | None = None,
    path: StepPath | str = StepPath.AUTO, chunk_size: int | None = None, progress: bool | None = None,
    val_train_mode: bool = False,
) -> ShapleyEstimate:
    """Shapley values of the per-step game ``U`` (real optimizer, fixed state).

    ``φ_z = Σ_{S ⊆ B∖z} |S|!(n−|S|−1)!/n! · (U(S∪z) − U(S))``, so ``Σ_z φ_z = U(B) − U(∅)``
    (values are relative to the empty coalition, which need not be 0 under momentum).

    * ``exact=True`` (the default when ``samples`` is not given): enumerates all ``2^n``
      coalitions; ``n <= 16``. Standard errors are zeros.
    * ``samples=k``: ``k`` uniformly random permutations; ``φ_z`` is the mean of ``z``'s
      marginal contribution over them and its standard error is the sample standard deviation
      (ddof=1) over ``sqrt(k)``. Each permutation's marginals telescope to ``U(B) − U(∅)``, so the
      estimate is efficient too. Coalitions shared by several permutations are evaluated once.

    Args:
        model, optimizer, loss_fn, batch, val_batch, path, chunk_size, progress, val_train_mode: as
            in :func:`utility`; nothing passed in is modified. ``L_val`` is taken in eval mode unless
            ``val_train_mode=True``.
        exact: enumerate every coalition. Mutually exclusive with ``samples``.
        samples: number of permutations (>= 2, for a standard error).
        seed: seed of the permutation generator (``None``: drawn from torch's global generator).

    Returns:
        :class:`ShapleyEstimate` with ``values`` and ``std_errors`` float64 ``[n]``, or ``[n, K]``
        for a list of K validation batches.

    Raises:
        ValueError: ``exact`` with ``n > 16``, both or neither mode chosen, ``samples < 2``, and
            every error of :func:`utility`.

    Example (momentum: U(∅) ≠ 0; both modes are efficient, Σ_z φ_z = U(B) − U(∅)):
        >>> gen = torch.Generator().manual_seed(0)
        >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
        >>> model = nn.Linear(3, 1).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(randn(1, 3)), model.bias.zero_()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> loss_fn = nn.functional.mse_loss
        >>> loss_fn(model(randn(4, 3)), randn(4, 1)).backward(); opt.step()   # a first step fills the buffer
        >>> x, y, xv, yv = randn(4, 3), randn(4, 1), randn(6, 3), randn(6, 1)
        >>> est = shapley_values(model, opt, loss_fn, (x, y), (xv, yv))                # exact, 2^4 coalitions
        >>> est.exact, est.values.shape, bool(est.utility_empty != 0)
        (True, torch.Size([4]), True)
        >>> torch.allclose(est.values.sum(), est.efficiency_target)
        True
        >>> mc = shapley_values(model, opt, loss_fn, (x, y), (xv, yv), samples=50, seed=0)
        >>> mc.num_permutations, torch.allclose(mc.values.sum(), mc.efficiency_target)
        (50, True)
        >>> bool(((mc.values - est.values).abs() <= 5 * mc.std_errors + 1e-12).all())
        True
        >>> shapley_values(model, opt, loss_fn, (x, y), (xv, yv), samples=1)
        Traceback (most recent call last):
        ...
        ValueError: samples must be an int >= 2 (permutations; two or more give a standard error), got 1.
    """
    if samples is not None and exact:
        raise ValueError(
            f"choose one of exact=True and samples={samples!r}, not both. Fix: drop `samples` to enumerate "
            "every coalition, or drop `exact` for permutation sampling."
        )
    if samples is None and exact is False:
        raise ValueError("exact=False needs `samples=k` (number of permutations to sample), e.g. samples=200.")
    inputs, targets = _unpack_batch(batch, "batch")
    n = _batch_size(inputs, targets, "batch")
    kwargs = dict(path=path, chunk_size=chunk_size, progress=progress, val_train_mode=val_train_mode)

    if samples is None:
        if n > MAX_EXACT_PLAYERS:
            raise ValueError(
                f"exact Shapley values enumerate 2^n coalitions; n = {n} > {MAX_EXACT_PLAYERS} is too many "
                f"(2^{n} = {2**n} optimizer steps). Fix: use permutation sampling, e.g. "
                "`shapley_values(..., samples=500, seed=0)`, which also returns standard errors."
            )
        u, single = _evaluate(model, optimizer, loss_fn, batch, val_batch, _bit_masks(n), **kwargs)
        values = _exact(u, n)
        est = ShapleyEstimate(values, torch.zeros_like(values), u[0], u[-1], None)
    else:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
            raise ValueError(
                f"samples must be an int >= 2 (permutations; two or more give a standard error), got {samples!r}."
            )
        gen = torch.Generator()
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(2**62, (1,)).item()))
        perms = torch.rand(samples, n, generator=gen).argsort(dim=1)  # [k, n] uniform permutations
        rank = perms.argsort(dim=1)  # rank[p, z] = position of z in permutation p
        # Prefix j of permutation p = {z : rank[p, z] < j}, j = 0..n; j=0 is ∅ and j=n is B.
        prefixes = rank.unsqueeze(1) < torch.arange(n + 1).view(1, n + 1, 1)  # [k, n+1, n]
        unique, inverse = torch.unique(prefixes.reshape(-1, n), dim=0, return_inverse=True)
        u_unique, single = _evaluate(model, optimizer, loss_fn, batch, val_batch, unique, **kwargs)
        u = u_unique[inverse].reshape(samples, n + 1, -1)  # [k, n+1, K]
        steps = u[:, 1:] - u[:, :-1]  # marginal of the sample added at position j
        marginals = torch.gather(steps, 1, rank.unsqueeze(-1).expand(-1, -1, u.shape[-1]))  # [k, n, K]
        values = marginals.mean(0)
        errors = marginals.std(0, correction=1) / math.sqrt(samples)
        est = ShapleyEstimate(values, errors, u[0, 0], u[0, -1], samples)

    if single:
        est = ShapleyEstimate(
            est.values[:, 0], est.std_errors[:, 0], est.utility_empty[0], est.utility_full[0], est.num_permutations
        )
    return est

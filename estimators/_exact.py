"""The exact-update route: values of the game Ū(S) = −⟨∇L_val, Δ(g_S)⟩ with the optimizer's real update.

Where no single slope J fits the update (Adam's, RMSprop's and Adagrad's first steps are close
to −η sign(g); Muon's first step jumps at g = 0), the linear closed form φ_z = −⟨P, c_z⟩ is a
poor value. This route keeps the first order in θ (the validation gradient v at the step's
validation point) but evaluates the optimizer's exact update Δ under its frozen state for each
coalition of per-sample contributions:

* ``shapley``: Shapley values of Ū, exact from all 2^n coalitions for small batches
  (:func:`enumerates`), otherwise by permutation sampling. Each sampled order contributes the
  marginals of its n prefixes (n + 1 update evaluations per parameter); orders come in antithetic
  pairs (an order and its reverse); the standard error is over pairs. Every order's marginals
  telescope to Ū(B) − Ū(∅), so the values add up to it exactly whatever the sample.
* ``loo``: leave-one-out marginals Ū(B) − Ū(B∖z), n + 1 update evaluations.

Ū is a sum over parameters (every optimizer here updates each parameter from its own gradient
and state), and Shapley values are additive over games, so parameters are processed one at a
time: peak memory is n per-sample contributions of the largest parameter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import torch

# Coalition gradients evaluated in one vmapped update call, in tensor elements (16 MiB in float32 each:
# the rule's temporaries are a few times that, the peak the exact route adds to training).
_CHUNK_ELEMENTS = 2**22


@dataclasses.dataclass(frozen=True)
class ExactValues:
    """Values of the exact-update game for one step.

    Attributes:
        values: ``[n, K]``, positive = the sample reduces the validation loss.
        stderr: ``[n, K]`` standard errors of the permutation estimate (zeros for ``loo`` and
            for enumerated Shapley values).
        permutations: sampled orders (0 for ``loo`` and when the coalitions were enumerated).
        total: ``[K]``, Ū(B) − Ū(∅), what the Shapley values add up to.
        enumerated: the Shapley values are exact, from all 2^n coalitions.
    """

    values: torch.Tensor
    stderr: torch.Tensor
    permutations: int
    total: torch.Tensor
    enumerated: bool = False


def enumerates(n: int, permutations: int) -> bool:
    """Whether ``exact_update_values`` enumerates all 2^n coalitions instead of sampling orders.

    Enumeration gives the exact Shapley values; it is taken while it costs at most four times
    the update evaluations of the sampled orders (2^n ≤ 4 · M · (n + 1)): n ≤ 10 at M = 32.

    Example:
        >>> enumerates(10, 32), enumerates(11, 32), enumerates(12, 256)
        (True, False, True)
    """
    return n <= 16 and 2**n <= 4 * _even(permutations) * (n + 1)


def _even(permutations: int) -> int:
    return 2 * max(1, (permutations + 1) // 2)


def _subset_masks(n: int) -> torch.Tensor:
    """``[2^n, n]``: row S has a 1 at position z when bit z of S is set."""
    bits = torch.arange(2**n)[:, None]
    return ((bits >> torch.arange(n)) & 1).to(torch.float64)


def _shapley_from_games(u: torch.Tensor, n: int) -> torch.Tensor:
    """Exact Shapley values ``[n, K]`` of the game u ``[2^n, K]`` (coalitions indexed by bit masks)."""
    sizes = _subset_masks(n).sum(1).long()
    weight = torch.tensor(
        [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) if s < n else 0.0 for s in range(n + 1)],
        dtype=torch.float64,
    )
    index = torch.arange(2**n)
    out = torch.zeros(n, u.shape[1], dtype=torch.float64)
    for z in range(n):
        without = index[(index >> z) & 1 == 0]
        out[z] = (weight[sizes[without]][:, None] * (u[without | (1 << z)] - u[without])).sum(0)
    return out


def _prefix_sums(cs: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """``[m, n + 1, d]``: the coalition gradients 0, c_{o_1}, c_{o_1} + c_{o_2}, … of each order (rows of ``orders`` ``[m, n]``, ``cs`` ``[n, d]``).

    The same bits as ``cat([0, cs[orders].cumsum(1)], 1)`` (CPU cumsum accumulates in float64
    and rounds each prefix; so does this loop), without the ``[m, n, d]`` gather, and about 3×
    faster on a CPU for rows of m·d ≥ 4096 entries: cumsum along a middle axis strides through
    memory (``python -m attribution.experiments.step_cost`` times both).
    """
    # CUDA's cumsum accumulates float32 in float32 and is fast there; on a CPU the loop's per-row
    # dispatch costs more than the strided cumsum below about 4096 entries per prefix row.
    if cs.device.type != "cpu" or orders.shape[0] * cs.shape[1] < 4096:
        return torch.cat([torch.zeros(len(orders), 1, cs.shape[1], dtype=cs.dtype, device=cs.device), cs[orders].cumsum(1)], dim=1)
    m, n = orders.shape
    out = torch.empty(m, n + 1, cs.shape[1], dtype=cs.dtype, device=cs.device)
    out[:, 0] = 0
    acc = torch.zeros(m, cs.shape[1], dtype=torch.float64, device=cs.device)
    for i in range(n):
        acc.add_(cs[orders[:, i]])
        out[:, i + 1].copy_(acc)
    return out


def _orders(n: int, permutations: int, generator: torch.Generator | None) -> torch.Tensor:
    """``[M, n]`` sampled orders in antithetic pairs (an order, then its reverse); M even, ≥ 2."""
    half = max(1, (permutations + 1) // 2)
    base = torch.stack([torch.randperm(n, generator=generator) for _ in range(half)])
    return torch.stack([base, base.flip(1)], dim=1).reshape(2 * half, n)


def exact_update_values(
    lin,
    contributions: Iterable[tuple[torch.Tensor, torch.Tensor]],
    val_grads: Sequence[Mapping[torch.Tensor, torch.Tensor]],
    *,
    game: str = "shapley",
    permutations: int = 32,
    generator: torch.Generator | None = None,
    scale: float = 1.0,
    enumerate: bool | None = None,
) -> ExactValues:
    """Values of Ū(S) = −⟨v, Δ(g_S)⟩, g_S = scale · Σ_{z∈S} c_z, with the exact update Δ of ``lin``.

    Args:
        lin: a linearization of the step (``optimizers.linearize``), read before ``step()``.
        contributions: ``(param, c)`` pairs, ``c`` of shape ``[n, *param.shape]`` (the samples'
            contributions to the batch gradient), consumed one at a time; parameters the step
            does not move are left out.
        val_grads: K dicts param -> v (the validation gradient at the step's validation point).
        game: ``"shapley"`` (Shapley values: enumerated for small n, else permutation sampled) or
            ``"loo"`` (Ū(B) − Ū(B∖z)).
        permutations: sampled orders for ``"shapley"`` (rounded up to an even number); small
            batches are enumerated instead (:func:`enumerates`).
        generator: the random source of the orders; pass a seeded one so that the global RNG
            (and so training) is untouched.
        scale: c of ``param.grad = c · Σ_z c_z`` (clipping, loss-scale unscaling): coalitions
            are rescaled the same way.
        enumerate: force (``True``) or forbid (``False``) enumerating the 2^n coalitions for
            ``"shapley"``; ``None``: :func:`enumerates` decides.
    Returns:
        :class:`ExactValues` with ``values`` and ``stderr`` ``[n, K]`` (float64).
    Raises:
        ValueError: unknown ``game``, ``permutations < 1``, no contributions, n disagreeing
            between parameters, or a parameter missing from ``val_grads``.
    Example (SGD is linear in g: the exact game's values are the slope values −⟨−η v, c_z⟩):
        >>> import optimizers
        >>> w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        >>> opt = torch.optim.SGD([w], lr=0.1); c = torch.randn(4, 3, dtype=torch.float64)
        >>> w.grad = c.sum(0); v = torch.randn(3, dtype=torch.float64)
        >>> out = exact_update_values(optimizers.linearize(opt), [(w, c)], [{w: v}])
        >>> torch.allclose(out.values[:, 0], 0.1 * c @ v), out.values.shape
        (True, torch.Size([4, 1]))
    """
    if game not in ("shapley", "loo"):
        raise ValueError(f"game={game!r} is not accepted; use 'shapley' or 'loo'")
    if permutations < 1:
        raise ValueError(f"permutations={permutations} must be at least 1")
    K = len(val_grads)
    orders = None
    marg = None  # [M, n, K] (shapley) or [n, K] (loo)
    total = torch.zeros(K, dtype=torch.float64)
    n = None
    games = None  # [2^n, K]: Ū of every coalition, when enumerated
    for p, c in contributions:
        if n is None:
            n = int(c.shape[0])
            if game == "shapley" and (enumerates(n, permutations) if enumerate is None else enumerate):
                if n > 20:
                    raise ValueError(f"enumerating 2^{n} coalitions is refused (n > 20); sample orders instead")
                games, masks = torch.zeros(2**n, K, dtype=torch.float64), _subset_masks(n)
            elif game == "shapley":
                orders = _orders(n, permutations, generator)
                marg = torch.zeros(len(orders), n, K, dtype=torch.float64)
            else:
                marg = torch.zeros(n, K, dtype=torch.float64)
        elif int(c.shape[0]) != n:
            raise ValueError(f"contributions cover {int(c.shape[0])} samples for one parameter and {n} for another")
        missing = [k for k in range(K) if p not in val_grads[k]]
        if missing:
            raise ValueError(f"val_grads[{missing[0]}] has no gradient for a parameter of shape {tuple(p.shape)}")
        D = p.numel()
        cs_all = (c.detach() * scale).reshape(n, D)
        V_all = torch.stack([val_grads[k][p].detach().reshape(D).to(cs_all.dtype) for k in range(K)], dim=1)  # [D, K]
        rows_per_call = 2**n if games is not None else (n if game == "loo" else n + 1)
        for lo, hi, update in _coordinate_blocks(lin, p, D, rows_per_call):
            cs, V = cs_all[:, lo:hi], V_all[lo:hi]
            d = hi - lo
            ends = update(torch.stack([torch.zeros_like(cs[0]), cs.sum(0)]))
            total += (-(ends[1] - ends[0]).to(V.dtype) @ V).to(torch.float64)
            if games is not None:
                for rows in _chunks(2**n, max(1, _CHUNK_ELEMENTS // max(d, 1))):
                    upd = update(masks[rows].to(cs.dtype) @ cs)
                    games[rows] += (-upd.to(V.dtype) @ V).to(torch.float64)
                continue
            if game == "loo":
                full = cs.sum(0)
                for rows in _chunks(n, max(1, _CHUNK_ELEMENTS // max(d, 1))):
                    upd = update(full - cs[rows])
                    # Ū(B) − Ū(B∖z) = −⟨v, Δ(g_B) − Δ(g_B − c_z)⟩
                    marg[rows] += (-(ends[1] - upd).to(V.dtype) @ V).to(torch.float64)
                continue
            per_order = max(1, _CHUNK_ELEMENTS // max((n + 1) * d, 1))
            for rows in _chunks(len(orders), per_order):
                o = orders[rows]  # [m, n]
                prefix = _prefix_sums(cs, o)  # [m, n+1, d]
                upd = update(prefix.reshape(-1, d)).reshape(len(o), n + 1, d)
                # The first and last prefixes are 0 and g_B for every order: use the shared ends so
                # that each order's marginals telescope to the same Ū(B) − Ū(∅).
                upd[:, 0], upd[:, n] = ends[0], ends[1]
                inc = -(upd[:, 1:] - upd[:, :-1]).to(V.dtype) @ V  # [m, n, K], marginal of the player at each position
                marg[rows].scatter_add_(1, o[:, :, None].expand(-1, -1, K), inc.to(torch.float64))  # a view: in place
    if n is None:
        raise ValueError("no contributions were given; pass (param, c) pairs for the parameters the step moves")
    if games is not None:
        values = _shapley_from_games(games, n)
        return ExactValues(values, torch.zeros_like(values), 0, total, enumerated=True)
    if game == "loo":
        return ExactValues(marg, torch.zeros_like(marg), 0, total)
    values = marg.mean(0)
    pairs = marg.reshape(-1, 2, n, K).mean(1)  # antithetic pairs are the independent draws
    stderr = pairs.std(0, unbiased=True) / pairs.shape[0] ** 0.5 if pairs.shape[0] > 1 else torch.full_like(values, float("nan"))
    return ExactValues(values, stderr, len(orders), total)


def _elementwise(lin, p: torch.Tensor) -> bool:
    """Whether ``lin`` evaluates p's update coordinate by coordinate (``update_coordinates`` applies)."""
    structure = lin.structure_of(p) if hasattr(lin, "structure_of") else getattr(lin, "structure", "elementwise")
    return structure == "elementwise" and hasattr(lin, "update_coordinates")


def _coordinate_blocks(lin, p: torch.Tensor, D: int, rows: int):
    """``(lo, hi, update)`` blocks of p's flat coordinates, ``update([m, hi − lo]) -> [m, hi − lo]``.

    An elementwise rule is evaluated on blocks small enough that ``rows`` gradients of a block
    fit the chunk size (so a large embedding never builds [n + 1, numel] tensors); an operator
    rule couples its coordinates and is evaluated whole.
    """
    if not _elementwise(lin, p) or rows * D <= _CHUNK_ELEMENTS:
        yield 0, D, lambda G: lin.update_batch(p, G.reshape(-1, *p.shape)).reshape(len(G), -1)
        return
    size = max(1, _CHUNK_ELEMENTS // rows)
    for lo in range(0, D, size):
        hi = min(D, lo + size)
        yield lo, hi, lambda G, lo=lo, hi=hi: lin.update_coordinates(p, G, lo, hi)


def _chunks(m: int, size: int):
    for start in range(0, m, size):
        yield slice(start, min(start + size, m))


def _nonlinearity_terms(upd: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """ν's two terms per coordinate ``[d, 2]``: w |Δ(½ g) − ½ (Δ(0) + Δ(g))| and w |½ (Δ(g) − Δ(0))|.

    ``upd`` ``[3, d]`` holds the updates at 0, ½ g, g; ``w`` ``[d]`` the validation weights.
    """
    w = w.to(upd.dtype)
    return torch.stack([w * (upd[1] - 0.5 * (upd[0] + upd[2])).abs(), w * (0.5 * (upd[2] - upd[0])).abs()], dim=1)


def _nonlinearity_sums(upd: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ν's two sums from the updates ``upd`` ``[3, d]`` at 0, ½ g, g and the weights ``w`` ``[d]`` (0-d tensors)."""
    num, den = _nonlinearity_terms(upd, w).sum(0)
    return num, den


def _sample_stride(numel: int, max_coordinates: int, width: int) -> int:
    """The stride of ν's sample: the smallest s ≥ ⌈numel / max_coordinates⌉ coprime to the row width.

    A stride that shares a factor with the width of a row (the trailing size of a weight) sees
    the same few columns in every row: 16 on a 512 × 128 weight read 8 of its 128 input features,
    and its ν 0.79–0.89 where the whole weight's was 0.92–1.09
    (``python -m attribution.experiments.nonlinearity_sample``). Coprime, it walks every column.

    Example:
        >>> _sample_stride(512 * 128, 4096, 128), _sample_stride(100, 4096, 10)
        (17, 1)
    """
    stride = max(1, -(-numel // max_coordinates))
    while stride > 1 and math.gcd(stride, max(1, width)) != 1:
        stride += 1
    return stride


def _row_width(p: torch.Tensor) -> int:
    """Elements per dim-0 row of ``p`` (1 for a vector or a scalar)."""
    return p.numel() // p.shape[0] if p.dim() > 1 and p.shape[0] else 1


def _sampled_nonlinearity_sums(lin, p: torch.Tensor, g: torch.Tensor, val_grads_of_p, max_coordinates: int, *, shard: bool = False):
    """``(num, den, stride)`` of ν for an elementwise rule, at every ``stride``-th coordinate (at most ``max_coordinates``).

    The three gradients and the weights are taken only at the sampled coordinates (no [3, *S]
    stack of the whole parameter); ``num`` and ``den`` (0-d tensors) are the sums over those
    coordinates, to be scaled up by ``stride``. ``shard=True``: ``g`` and ``val_grads_of_p`` are
    FSDP2 ``DTensor`` s and the coordinates are this rank's local shard (no communication).
    """
    from ._sharded import local

    view = local if shard else (lambda t: t)
    flat = view(g.detach()).reshape(-1)
    stride = _sample_stride(flat.numel(), max_coordinates, _row_width(p))
    gs = flat[::stride]
    on_shard = {"shard": True} if shard else {}  # a duck-typed linearization need not know the keyword
    upd = lin.update_coordinates(p, torch.stack([torch.zeros_like(gs), 0.5 * gs, gs]), 0, flat.numel(), stride, **on_shard)
    w = sum(view(v.detach()).reshape(-1)[::stride].abs() for v in val_grads_of_p)
    num, den = _nonlinearity_sums(upd, w)
    return num, den, stride


def _row_coordinates(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Flat coordinates ``[len(rows) · row size]`` of dim-0 rows ``rows`` of ``p`` (row-major)."""
    width = _row_width(p)
    return (rows.to(torch.long)[:, None] * width + torch.arange(width, device=rows.device)).reshape(-1)


def _batched_nonlinearity_sums(lin, items, max_coordinates: int, rows=None) -> dict[torch.Tensor, tuple[float, float]]:
    """``{param: (num, den)}`` of ν (scaled up by the sampled share) for elementwise parameters ``(param, g, [v_k])``.

    At most ``max_coordinates`` coordinates of each parameter, every stride-th (the sample of
    :func:`_sampled_nonlinearity_sums`), and every parameter's updates come from one
    ``lin.update_coordinates_many`` call and the sums from one segmented reduction: a constant
    number of tensor operations per step instead of about thirty per parameter
    (``python -m attribution.experiments.step_cost`` times both).
    """
    strides, picks, gs, ws = [], [], [], []
    rows = rows or {}
    for p, g, vs in items:
        flat = g.detach().reshape(-1)
        D = flat.numel()
        if p in rows:
            # Every nonzero of g lies on these rows; an elementwise update does not move with g
            # where g is 0, so both of ν's terms vanish elsewhere: the sample is taken on the rows
            # (all of them, or every stride-th of their coordinates), scaled up by their share.
            on_rows = _row_coordinates(p, rows[p])
            pick = on_rows[:: _sample_stride(len(on_rows), max_coordinates, _row_width(p))]
            scale = len(on_rows) / max(1, len(pick))
            gs.append(flat.index_select(0, pick))
            ws.append(sum(v.detach().reshape(-1).index_select(0, pick).abs() for v in vs))
        elif D <= max_coordinates:
            pick, scale = 1, 1.0
            gs.append(flat)
            ws.append(sum(v.detach().reshape(-1).abs() for v in vs))
        else:
            # Every stride-th coordinate, as _sampled_nonlinearity_sums takes. Not contiguous
            # blocks, which gather faster: an embedding table's ν lives on the rows the step
            # touches, and 64 blocks saw one row in 16 (the bench decoder's table read 1.2-1.5
            # where the whole table's ν was 0.66-0.78, and took the exact route for nothing).
            pick = scale = _sample_stride(D, max_coordinates, _row_width(p))
            gs.append(flat[::pick])
            ws.append(sum(v.detach().reshape(-1)[::pick].abs() for v in vs))
        picks.append(pick)
        strides.append(scale)
    sizes = [len(x) for x in gs]
    dtype = torch.promote_types(gs[0].dtype, torch.float32) if len({x.dtype for x in gs}) == 1 else torch.float64
    G = torch.cat([x.to(dtype) for x in gs])
    G3 = torch.stack([torch.zeros_like(G), 0.5 * G, G])  # [3, Σd]: Δ at 0, ½ g, g
    pieces = G3.split(sizes, dim=1)
    upd = torch.cat(lin.update_coordinates_many([(p, piece, pk) for (p, _, _), piece, pk in zip(items, pieces, picks)]), dim=1)
    terms = _nonlinearity_terms(upd, torch.cat([x.to(upd.dtype) for x in ws]))  # [Σd, 2]
    segment = torch.repeat_interleave(torch.arange(len(items), device=terms.device), torch.tensor(sizes, device=terms.device))
    sums = torch.zeros(len(items), 2, dtype=torch.float64, device=terms.device).index_add_(0, segment, terms.to(torch.float64))
    return {p: (a * st, b * st) for (p, _, _), st, (a, b) in zip(items, strides, sums.tolist())}


def update_nonlinearity(
    lin,
    batch_grads: Mapping[torch.Tensor, torch.Tensor],
    val_grads: Sequence[Mapping[torch.Tensor, torch.Tensor]],
    *,
    per_parameter: bool = False,
    max_coordinates: int = 4096,
    rows: Mapping[torch.Tensor, torch.Tensor] | None = None,
):
    """How far the update is from linear along the batch gradient, weighted by the validation gradient.

        ν = Σ_p Σ_i w_i |Δ_i(½ g_B) − ½ (Δ_i(g_B) + Δ_i(0))|  /  Σ_p Σ_i w_i |½ (Δ_i(g_B) − Δ_i(0))|,

    with w = Σ_k |∇L_val^k| (shapes of each parameter). ν = 0 for an update affine in g (SGD,
    Adam once v is dominated by the past) and ν = 1 for a sign-like update (Δ(s g) constant in
    s > 0, as Adam's at step 1). Three update evaluations per parameter, at most
    ``max_coordinates`` coordinates of an elementwise rule (a strided subset, scaled up; operator
    rules in full).

    Args:
        lin: a linearization of the step.
        batch_grads: param -> g_B (what the optimizer will use).
        val_grads: K dicts param -> validation gradient.
        per_parameter: return ``{param: (numerator, denominator)}`` instead of ν.
        max_coordinates: coordinates per parameter an elementwise rule is evaluated at.
        rows: optional param -> ``int64`` dim-0 rows holding every nonzero of its g_B (an
            embedding's rows the step touched, ``GhostEngine.row_supports``): an elementwise
            rule with ``update_coordinates_many`` is sampled on those rows only, where all of
            the parameter's ν lies.
    Returns:
        ν ≥ 0 (a float; 0.0 when the step moves nothing the validation loss sees), or the
        per-parameter sums.
    Example:
        >>> import optimizers
        >>> w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64)); w.grad = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
        >>> v = {w: torch.ones(3, dtype=torch.float64)}
        >>> update_nonlinearity(optimizers.linearize(torch.optim.SGD([w], lr=0.1)), {w: w.grad}, [v])
        0.0
        >>> round(update_nonlinearity(optimizers.linearize(torch.optim.Adam([w], lr=0.1)), {w: w.grad}, [v]), 6)
        1.0
    """
    parts: dict[torch.Tensor, tuple[float, float]] = {}
    batched = []  # elementwise parameters: sampled together (_batched_nonlinearity_sums)
    for p, g in batch_grads.items():
        if p not in lin:
            continue
        if not any(p in val_grads[k] for k in range(len(val_grads))):
            continue
        vs = [val_grads[k][p] for k in range(len(val_grads)) if p in val_grads[k]]
        if _elementwise(lin, p) and hasattr(lin, "update_coordinates_many"):
            batched.append((p, g, vs))
            continue
        if _elementwise(lin, p):
            num, den, stride = _sampled_nonlinearity_sums(lin, p, g, vs, max_coordinates)
        else:
            upd, stride = lin.update_sampled(p, torch.stack([torch.zeros_like(g), 0.5 * g, g]), max_coordinates), 1
            num, den = _nonlinearity_sums(upd, sum(v.detach().reshape(-1).abs() for v in vs))
        parts[p] = (float(num) * stride, float(den) * stride)
    if batched:
        parts.update(_batched_nonlinearity_sums(lin, batched, max_coordinates, rows))
        parts = {p: parts[p] for p in batch_grads if p in parts}  # in the order of batch_grads
    if per_parameter:
        return parts
    num, den = sum(a for a, _ in parts.values()), sum(b for _, b in parts.values())
    return num / den if den > 0 else 0.0

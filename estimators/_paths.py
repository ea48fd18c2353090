"""Which ghost path contracts a parameter: the exact paths a preconditioner allows, and the cheaper one.

* materialized -- only when forced; * dense -- exact for every preconditioner kind (scalar,
  diagonal, operator), and the only path for non-factored terms (biases, norms, the fallback);
* pairwise -- exact for a scalar J only, chosen under ``auto`` when its ghost dot-products are
  cheaper than the dense contraction; * factored -- a rank-one approximation of a diagonal J,
  only when forced (an operator, which has no elementwise form, takes dense instead).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from optimizers._preconditioner import Preconditioner

from ._config import GhostPath
from ._errors import GhostEngineError
from ._factors import Bilinear, Term


def choose_path(
    name: str,
    forced: GhostPath,
    p: torch.Tensor,
    Jp: Preconditioner,
    terms: Sequence[Term],
    val_terms: Sequence[Sequence[Term]],
    have_val: bool,
) -> GhostPath:
    """The path of parameter ``p`` (named ``name``) for this step.

    Args:
        name: the parameter's name (for messages).
        forced: the path asked for it (``auto`` lets the cost decide).
        p: the parameter, shape ``S``.
        Jp: its preconditioner for the step.
        terms: its captured training terms.
        val_terms: per validation target, its captured validation terms (empty lists if none).
        have_val: whether validation passes were captured.
    Returns:
        A :class:`GhostPath` other than ``auto``.
    Raises:
        ValueError: ``pairwise`` forced for a J that is not one number.
        GhostEngineError: ``pairwise``/``factored`` forced without a captured validation pass.
    """
    if forced is GhostPath.MATERIALIZED:
        return forced
    if not terms or not all(isinstance(t, Bilinear) for t in terms) or any(not isinstance(v, Bilinear) for vt in val_terms for v in vt):
        return GhostPath.DENSE  # materialized parameters (bias, norms, fallback): J exactly
    scalar = Jp.scalar is not None
    if forced is GhostPath.FACTORED and Jp.diagonal is None:
        # The factored path approximates an elementwise J by a rank-one matrix; an operator (Muon,
        # Adafactor) has no elementwise form, so its weights are applied exactly on the dense path
        # (``paths_taken`` says "dense").
        return GhostPath.DENSE
    if forced in (GhostPath.PAIRWISE, GhostPath.FACTORED) and not have_val:
        raise GhostEngineError(
            f"path {forced.value!r} for parameter {name!r} needs the validation pass captured: run the K "
            "validation forward/backward passes inside `with engine.capture_val():` (validation_gradients("
            "..., engine=engine) does this), or use path='dense'"
        )
    if forced is GhostPath.PAIRWISE and not scalar:
        raise ValueError(
            f"path 'pairwise' is exact only for a scalar J, but J of parameter {name!r} is a {Jp.kind} that is not "
            "one number; use path='dense' (exact for any preconditioner) or path='factored' (rank-one approximation)"
        )
    if forced is not GhostPath.AUTO:
        return forced
    if not (scalar and have_val):
        return GhostPath.DENSE
    K = max(1, len(val_terms))
    dense = sum(t.dense_cost() for t in terms) * K + p.numel() * K
    pairwise = sum(t.pairwise_cost(v) for t in terms for vt in val_terms for v in vt)
    return GhostPath.PAIRWISE if pairwise < dense else GhostPath.DENSE

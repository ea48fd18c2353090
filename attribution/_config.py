"""Frozen, validated configuration shared by ``step_values`` and ``InRunShapley``."""

from __future__ import annotations

import dataclasses
import enum

from estimators import LinearizationKind, ValPoint, parse_enum


class EstimatorKind(str, enum.Enum):
    """Where per-sample contributions come from.

    * ``ghost``: hooks on one ordinary backward pass, dense preconditioned validation gradient
      (exact for any diagonal optimizer);
    * ``ghost-factored``: hooks, rank-one factorisation of J per weight matrix (pairwise cost);
    * ``materialized``: explicit per-sample gradients (torch.func), the slow reference.

    All three compute φ_z = −⟨J ⊙ ∇L_val, c_z⟩; ``ghost-factored`` approximates J ≈ σ r sᵀ.

    Example:
        >>> EstimatorKind("ghost-factored") is EstimatorKind.GHOST_FACTORED
        True
    """

    GHOST = "ghost"
    GHOST_FACTORED = "ghost-factored"
    MATERIALIZED = "materialized"


@dataclasses.dataclass(frozen=True)
class AttributionConfig:
    """How per-step values are computed; validated on construction.

    Attributes:
        linearization: the slope J of the optimizer's update (``"tangent"``, ``"secant"`` or
            the SGD proxy ``"sgd"``, J = −lr), or ``"exact"`` / ``"exact-loo"`` (no slope: the
            exact-update game, see :func:`step_values`).
        val_point: where the validation gradient is taken (``"current"``, ``"lookahead"``,
            ``"midpoint"``, or ``"predicted"``: the midpoint with the batch gradient replaced by the
            optimizer's prediction of it, for Adam, AdamW, NAdam, RAdam and Adamax, which can stream).
        estimator: ``"ghost"``, ``"ghost-factored"`` or ``"materialized"``.

    Raises:
        ValueError: a field is not one of its accepted strings (the message lists them).

    Example:
        >>> AttributionConfig(linearization="secant").linearization
        <LinearizationKind.SECANT: 'secant'>
        >>> AttributionConfig(val_point="after")
        Traceback (most recent call last):
        ...
        ValueError: val_point='after' is not accepted; use one of 'current', 'lookahead', 'midpoint', 'predicted'
    """

    linearization: LinearizationKind | str = LinearizationKind.SECANT
    val_point: ValPoint | str = ValPoint.MIDPOINT
    estimator: EstimatorKind | str = EstimatorKind.GHOST

    def __post_init__(self):
        object.__setattr__(self, "linearization", parse_enum(LinearizationKind, self.linearization, "linearization"))
        object.__setattr__(self, "val_point", parse_enum(ValPoint, self.val_point, "val_point"))
        object.__setattr__(self, "estimator", parse_enum(EstimatorKind, self.estimator, "estimator"))

    def as_dict(self) -> dict[str, str]:
        """Plain strings, for saving next to results.

        Example:
            >>> AttributionConfig("tangent", "lookahead").as_dict()
            {'linearization': 'tangent', 'val_point': 'lookahead', 'estimator': 'ghost'}
        """
        return {f.name: getattr(self, f.name).value for f in dataclasses.fields(self)}

"""String modes of the estimators as enums, and the one parser that validates them."""

from __future__ import annotations

import enum

# The per-sample method and the option parser are shared with the oracle (validation): they live
# in the neutral ``persample`` package and are re-exported here.
from persample._config import PerSampleMethod, parse_enum

__all__ = ["Factorization", "GhostPath", "LinearizationKind", "PerSampleMethod", "Reduction", "ValPoint", "parse_enum"]


class LinearizationKind(str, enum.Enum):
    """Which slope J of the optimizer's update Δ(g) preconditions the validation gradient.

    * ``TANGENT`` -- J = ∂Δ/∂g at the batch gradient g_B (matches leave-one-out);
    * ``SECANT`` -- J = (Δ(g_B) − Δ(0)) ⊘ g_B (values sum to −⟨∇L_val, Δ(g_B) − Δ(0)⟩);
    * ``SGD`` -- J = −η, the optimizer-agnostic proxy of earlier in-run methods;
    * ``EXACT`` -- no slope: the Shapley values of the exact-update game
      Ū(S) = −⟨∇L_val, Δ(g_S)⟩ (the optimizer's real update for each coalition, permutation
      sampled; see :func:`exact_update_values`), for steps no single J fits (Adam's first steps);
    * ``EXACT_LOO`` -- the leave-one-out marginals Ū(B) − Ū(B∖z) of the same game (n + 1 updates).

    The slope kinds compute φ_z = −⟨J ⊙ ∇L_val, c_z⟩. Members compare equal to their strings.

    Example:
        >>> LinearizationKind("secant") is LinearizationKind.SECANT, LinearizationKind.SGD == "sgd"
        (True, True)
    """

    TANGENT = "tangent"
    SECANT = "secant"
    SGD = "sgd"
    EXACT = "exact"
    EXACT_LOO = "exact-loo"

    @property
    def is_exact(self) -> bool:
        """Whether this kind values the exact-update game (no slope J).

        Example:
            >>> LinearizationKind("exact-loo").is_exact, LinearizationKind.SECANT.is_exact
            (True, False)
        """
        return self in (LinearizationKind.EXACT, LinearizationKind.EXACT_LOO)


class ValPoint(str, enum.Enum):
    """Where the validation gradient is taken (DESIGN section 2).

    * ``CURRENT`` -- ∇L_val(θ_t), the first-order form;
    * ``LOOKAHEAD`` -- ∇L_val(θ_t + Δ(g_B)), pairs with the tangent;
    * ``MIDPOINT`` -- ∇L_val(θ_t + ½(Δ(g_B) + Δ(0))), pairs with the secant;
    * ``PREDICTED`` -- ∇L_val(θ_t + ½(Δ(ĝ) + Δ(0))), the midpoint with the batch gradient replaced
      by the optimizer's own prediction of it from its state (Adam's bias-corrected first moment,
      ``OptimizerLinearization.predicted_gradient``): known before the backward pass, so a
      second-order validation point that can stream.

    Example:
        >>> [v.value for v in ValPoint]
        ['current', 'lookahead', 'midpoint', 'predicted']
    """

    CURRENT = "current"
    LOOKAHEAD = "lookahead"
    MIDPOINT = "midpoint"
    PREDICTED = "predicted"


class GhostPath(str, enum.Enum):
    """How the ghost engine forms ⟨J ⊙ ∇L_val, c_z⟩ for one weight matrix.

    * ``AUTO`` -- the cheaper exact path: ``pairwise`` when J is a scalar, the validation pass
      was captured and pairwise is cheaper, else ``dense``;
    * ``DENSE`` -- contract P = J ⊙ ∇L_val with the captured factors (exact for any diagonal J);
    * ``PAIRWISE`` -- train × validation ghost dot-products (exact only for a scalar J);
    * ``FACTORED`` -- pairwise with a rank-one J ≈ r sᵀ (approximate, Adam-aware);
    * ``MATERIALIZED`` -- build c_z ``[n, *param.shape]`` from the captured factors, then
      −⟨P, c_z⟩ (the reference path; memory n × #params).

    Example:
        >>> parse_enum(GhostPath, "factored", "path")
        <GhostPath.FACTORED: 'factored'>
    """

    AUTO = "auto"
    DENSE = "dense"
    PAIRWISE = "pairwise"
    FACTORED = "factored"
    MATERIALIZED = "materialized"


class Factorization(str, enum.Enum):
    """Rank-one factorisation |J| ≈ r sᵀ used by the ``factored`` path.

    * ``GEOMETRIC`` -- r_i s_j = exp(mean_j log|J_ij| + mean_i log|J_ij| − mean log|J|),
      the least-squares fit in log space (geometric row and column means);
    * ``ADAFACTOR`` -- r sᵀ = (row sums)(column sums)ᵀ / total, as Adafactor factors v;
    * ``SVD`` -- the leading singular pair of |J| (best in Frobenius norm).

    Example:
        >>> Factorization("svd").name
        'SVD'
    """

    GEOMETRIC = "geometric"
    ADAFACTOR = "adafactor"
    SVD = "svd"


class Reduction(str, enum.Enum):
    """How the training loss reduces over the batch: c_z = ∇ℓ_z / n (``MEAN``) or ∇ℓ_z (``SUM``).

    Either way g_B = Σ_z c_z is the gradient ``backward()`` leaves in ``param.grad``.

    Example:
        >>> Reduction("mean") is Reduction.MEAN
        True
    """

    MEAN = "mean"
    SUM = "sum"

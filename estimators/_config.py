"""String modes of the estimators as enums, and the one parser that validates them."""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


class LinearizationKind(str, enum.Enum):
    """Which slope J of the optimizer's update Δ(g) preconditions the validation gradient.

    * ``TANGENT`` -- J = ∂Δ/∂g at the batch gradient g_B (matches leave-one-out);
    * ``SECANT`` -- J = (Δ(g_B) − Δ(0)) ⊘ g_B (values sum to −⟨∇L_val, Δ(g_B) − Δ(0)⟩);
    * ``SGD`` -- J = −η, the optimizer-agnostic proxy of earlier in-run methods.

    Every estimator then computes φ_z = −⟨J ⊙ ∇L_val, c_z⟩. Members compare equal to their strings.

    Example:
        >>> LinearizationKind("secant") is LinearizationKind.SECANT, LinearizationKind.SGD == "sgd"
        (True, True)
    """

    TANGENT = "tangent"
    SECANT = "secant"
    SGD = "sgd"


class ValPoint(str, enum.Enum):
    """Where the validation gradient is taken (DESIGN section 2).

    * ``CURRENT`` -- ∇L_val(θ_t), the first-order form;
    * ``LOOKAHEAD`` -- ∇L_val(θ_t + Δ(g_B)), pairs with the tangent;
    * ``MIDPOINT`` -- ∇L_val(θ_t + ½(Δ(g_B) + Δ(0))), pairs with the secant.

    Example:
        >>> [v.value for v in ValPoint]
        ['current', 'lookahead', 'midpoint']
    """

    CURRENT = "current"
    LOOKAHEAD = "lookahead"
    MIDPOINT = "midpoint"


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


class PerSampleMethod(str, enum.Enum):
    """How per-sample gradients are computed by ``per_sample_grads`` (estimators and validation).

    * ``AUTO`` -- ``VMAP``; if ``torch.func.vmap`` cannot trace the model (data-dependent control
      flow, ``.item()``, an op without a batching rule) and one sample runs fine on its own,
      ``LOOP`` instead, with a :class:`PerSampleFallbackWarning` saying why;
    * ``VMAP`` -- ``torch.func.vmap`` over the samples (fast; refuses untraceable models);
    * ``LOOP`` -- one ``torch.func.grad`` (forward + backward) per sample: exact, slower.

    Example:
        >>> PerSampleMethod.AUTO.value
        'auto'
    """

    AUTO = "auto"
    VMAP = "vmap"
    LOOP = "loop"


class Reduction(str, enum.Enum):
    """How the training loss reduces over the batch: c_z = ∇ℓ_z / n (``MEAN``) or ∇ℓ_z (``SUM``).

    Either way g_B = Σ_z c_z is the gradient ``backward()`` leaves in ``param.grad``.

    Example:
        >>> Reduction("mean") is Reduction.MEAN
        True
    """

    MEAN = "mean"
    SUM = "sum"


def parse_enum(enum_cls: type[E], value: object, argument: str) -> E:
    """``value`` as a member of ``enum_cls``, accepting the member or its string value.

    Args:
        enum_cls: the enum (its members' values are the accepted strings).
        value: a member of ``enum_cls`` or one of its string values.
        argument: the user-facing argument name, for the error message.
    Returns:
        The member of ``enum_cls``.
    Raises:
        ValueError: naming ``argument``, the offending value and the accepted values.

    Example:
        >>> parse_enum(ValPoint, "lookahead", "val_point")
        <ValPoint.LOOKAHEAD: 'lookahead'>
        >>> parse_enum(ValPoint, "after", "val_point")
        Traceback (most recent call last):
        ...
        ValueError: val_point='after' is not accepted; use one of 'current', 'lookahead', 'midpoint'
    """
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{argument}={value!r} is not accepted; use one of {accepted}") from None

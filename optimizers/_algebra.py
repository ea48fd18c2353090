"""Small cancellation-free building blocks shared by the adaptive linearizations."""

from __future__ import annotations

import torch


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else 0 (the 0/0 limits documented by each optimizer).

    ``num`` and ``den`` broadcast together; the result has their shape and dtype, never NaN.

    Example:
        >>> safe_div(torch.tensor([1.0, 0.0]), torch.tensor([4.0, 0.0])).tolist()
        [0.25, 0.0]
    """
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(num))


def root_product_gap(w: torch.Tensor, kappa: float, ya: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """√(w + κ ya²) · √(w + κ yb²) − κ ya yb, without subtracting nearly equal numbers.

    Where ya·yb > 0 the two terms nearly cancel when w is small; there the identity
    (√A√B − c)(√A√B + c) = AB − c² = w (w + κ ya² + κ yb²) gives the difference directly.
    Every chord (secant) of an update u(x) = x/(√(w + κ x²) + ε) reduces to this quantity.

    Args:
        w: non-negative tensor; ``ya``, ``yb`` broadcast with it; ``kappa`` ≥ 0 a float.
    Returns:
        Tensor of the broadcast shape, ≥ 0 (it equals w (w + κ ya² + κ yb²)/(√A√B + κ ya yb)).
    Example (agrees with the naive formula where it has no cancellation to suffer from):
        >>> w = torch.tensor([2.0], dtype=torch.float64)
        >>> ya, yb = torch.tensor([1.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)
        >>> naive = torch.sqrt(w + 0.5 * ya**2) * torch.sqrt(w + 0.5 * yb**2) - 0.5 * ya * yb
        >>> torch.allclose(root_product_gap(w, 0.5, ya, yb), naive)
        True
    """
    ra = torch.sqrt(w + kappa * ya * ya)
    rb = torch.sqrt(w + kappa * yb * yb)
    cross = kappa * ya * yb
    same_sign = cross > 0
    stable = safe_div(w * (w + kappa * (ya * ya + yb * yb)), ra * rb + cross)
    return torch.where(same_sign, stable, ra * rb - cross)


def ratio_chord(
    p: torch.Tensor | float, q: float, w: torch.Tensor, kappa: float, eps: float, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """(f(b) − f(a))/(b − a) for f(x) = (p + q x)/(√(w + κ x²) + ε), and f'(a) where a = b.

    The Adam-type rules (NAdam, RAdam, Adadelta) all have this form per coordinate. With
    R(x) = √(w + κ x²), the chord is, exactly,

        [ q ε + (q (w + R(a) R(b) − κ a b) − p κ (a + b)) / (R(a) + R(b)) ] / ((R(a) + ε)(R(b) + ε))

    with R(a)R(b) − κab formed without cancellation (:func:`root_product_gap`); at a = b it is the
    derivative [q ε + (q w − p κ a)/R] / (R + ε)². Where R(a) + R(b) = 0 (w = 0, a = b = 0) the
    fraction's limit is 0 (p = 0 there for every reachable state: w = 0 means no past gradient).

    Args:
        p, w: tensors (or a float for ``p``) broadcasting with ``a`` and ``b``; ``w`` ≥ 0.
        q, kappa, eps: floats, ``kappa`` ≥ 0, ``eps`` ≥ 0.
        a, b: the end points.
    Returns:
        Tensor of the broadcast shape.
    Example (agrees with the plain chord where it has nothing to cancel):
        >>> f = lambda x: (0.3 + 2.0 * x) / (torch.sqrt(0.5 + 0.1 * x * x) + 1e-3)
        >>> a, b = torch.tensor([0.2], dtype=torch.float64), torch.tensor([1.5], dtype=torch.float64)
        >>> w = torch.tensor([0.5], dtype=torch.float64)
        >>> torch.allclose(ratio_chord(0.3, 2.0, w, 0.1, 1e-3, a, b), (f(b) - f(a)) / (b - a))
        True
    """
    ra = torch.sqrt(w + kappa * a * a)
    rb = torch.sqrt(w + kappa * b * b)
    n = q * (w + root_product_gap(w, kappa, a, b)) - p * kappa * (a + b)
    return (q * eps + safe_div(n, ra + rb)) / ((ra + eps) * (rb + eps))

"""Measured claims of docs/extending.md that its code blocks do not re-measure (too slow for them).

``tests/test_docs.py`` runs every block of the page; these re-measure, over 60 drawn states each,
the closed-form table and that the operator tutorial's piecewise secant converges.
Marked ``slow`` (about half a minute): ``python -m pytest -m slow tests/test_extending_doc.py``.
"""

import random
import re
from pathlib import Path

import pytest

import optimizers
from optimizers import OptimizerLinearization
from optimizers.conformance import check_case, draw_case

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
_ROW = re.compile(r"^\| (Adagrad|Adamax|NAdam|RMSprop) \| (.+) \|$", re.MULTILINE)
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _quoted_table() -> dict[str, list[float]]:
    """{optimizer: [tangent autograd, tangent closed, secant chord, secant closed]} as the page quotes them."""
    rows = {m.group(1): [float(x) for x in m.group(2).split(" | ")] for m in _ROW.finditer(DOC.read_text())}
    assert sorted(rows) == ["Adagrad", "Adamax", "NAdam", "RMSprop"], "the closed-form table of docs/extending.md moved"
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Adagrad", "Adamax", "NAdam", "RMSprop"])
def test_closed_form_table_is_what_check_case_measures(name):
    cls = getattr(optimizers, f"{name}Linearization")
    base = OptimizerLinearization.__dict__
    # The shipped class with its slopes reset to the base class's autograd defaults (not registered).
    autograd = type(f"Autograd{name}", (cls,), {"tangent_rule": base["tangent_rule"], "secant_rule": base["secant_rule"]})
    rng = random.Random(0)
    worst = [0.0] * 4
    for _ in range(60):
        case = draw_case(cls, rng)
        auto, closed = check_case(autograd, case), check_case(cls, case)
        errors = (auto["tangent_vs_sympy"], closed["tangent_vs_sympy"], auto["secant_vs_sympy"], closed["secant_vs_sympy"])
        worst = [max(w, e) for w, e in zip(worst, errors)]
    quoted = _quoted_table()[name]
    for column, measured, claim in zip(("tangent autograd", "tangent closed", "secant chord", "secant closed"), worst, quoted):
        assert claim / 2 <= measured <= 2 * claim, f"{name} {column}: measured {measured:.2g}, the page says {claim:g}"
    assert worst[1] < 1e-13 and worst[3] < 1e-13  # closed forms: float64 accuracy


def _normalized_momentum_class():
    """The operator tutorial's classes, defined by running the block's definitions (up to its checks)."""
    block = next(code for code in _BLOCK.findall(DOC.read_text()) if "class NormalizedMomentumLinearization" in code)
    marker = "# Operator checks"
    assert marker in block, "the operator tutorial's block no longer starts its checks with '# Operator checks'"
    namespace: dict = {"__name__": "__doc_example__"}
    exec(compile(block.split(marker)[0], "<docs/extending.md>", "exec"), namespace)  # noqa: S102 (the page's own code)
    return namespace["NormalizedMomentumLinearization"]


@pytest.mark.slow
def test_operator_secant_converges_on_every_drawn_state_with_a_history():
    """The piecewise secant (bisected where a piece does not converge) passes the efficiency check on
    every drawn state with a history, tiny momentum against the gradient included (a single
    Gauss–Legendre rule over [0, 1] refused 3 of them, ‖μ m‖/‖g_B‖ from 1.3e-4 to 3.1e-3)."""
    saved = dict(optimizers._base._REGISTRY)
    try:
        cls = _normalized_momentum_class()
        rng = random.Random(0)
        checked = 0
        for _ in range(60):
            case = draw_case(cls, rng)
            if not case.history:
                continue
            errors = check_case(cls, case)
            assert "secant_efficiency" not in errors.skipped, errors.skipped
            assert errors["secant_efficiency"] < 2e-9
            checked += 1
        assert checked > 20
    finally:
        optimizers._base._REGISTRY.clear()
        optimizers._base._REGISTRY.update(saved)

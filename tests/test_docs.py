"""Every ```python block in README.md and docs/*.md runs, and every docstring example passes.

So the examples cannot rot.
"""

import re
import textwrap
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parents[1]
# estimators.md and validation.md have their own tests, which also check what the pages claim.
OWN_TESTS = {"estimators.md", "validation.md"}
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in OWN_TESTS)]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks():
    for path in DOCS:
        for k, code in enumerate(BLOCK.findall(path.read_text())):
            yield pytest.param(textwrap.dedent(code), id=f"{path.name}[{k}]")  # blocks inside list items are indented


@pytest.fixture
def isolated_registries():
    """Examples register optimizers and layer rules; undo that so other tests see the stock registries."""
    import estimators._rules._base as rules
    import optimizers._base as lin

    saved = dict(lin._REGISTRY), dict(rules._REGISTRY)
    yield
    lin._REGISTRY.clear()
    lin._REGISTRY.update(saved[0])
    rules._REGISTRY.clear()
    rules._REGISTRY.update(saved[1])


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_example_runs(code, tmp_path, monkeypatch, isolated_registries):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})


DOCTEST_MODULES = [
    "optimizers",
    "optimizers._algebra",
    "optimizers._autograd",
    "optimizers._base",
    "optimizers._group",
    "optimizers._piecewise",
    "optimizers._preconditioner",
    "optimizers.adadelta",
    "optimizers.adafactor",
    "optimizers.adagrad",
    "optimizers.adam",
    "optimizers.adamax",
    "optimizers.asgd",
    "optimizers.conformance",
    "optimizers.muon",
    "optimizers.nadam",
    "optimizers.radam",
    "optimizers.rmsprop",
    "optimizers.rprop",
    "optimizers.sgd",
    "attribution",
    "attribution._check",
    "attribution._config",
    "attribution._ledger",
    "attribution._step",
    "attribution._tracker",
    "attribution.hf",
    "attribution.lightning",
    "attribution.experiments._report",
    "estimators",
    "estimators._completeness",
    "estimators._config",
    "estimators._engine",
    "estimators._factorize",
    "estimators._factors",
    "estimators._ghost",
    "estimators._rules",
    "estimators._rules._base",
    "estimators._rules.attention",
    "estimators._rules.conv",
    "estimators._rules.embedding",
    "estimators._rules.groupnorm",
    "estimators._rules.hf",
    "estimators._rules.layernorm",
    "estimators._rules.linear",
    "estimators._rules.rmsnorm",
    "persample",
    "persample._checks",
    "persample._config",
    "persample._contributions",
    "persample._isolation",
    "validation",
    "validation._fidelity",
    "validation._game",
    "validation._per_sample",
    "validation._shapley",
]


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module} has no docstring example"
    assert result.failed == 0

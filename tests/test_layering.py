"""The oracle does not import what it certifies; the library never imports the oracle."""

import subprocess
import sys

import pytest


def _loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_validation_imports_neither_estimators_nor_optimizers():
    loaded = _loaded_after("validation")
    assert "persample" in loaded
    assert not {"estimators", "optimizers", "attribution"} & loaded


@pytest.mark.parametrize("module", ["estimators", "optimizers", "attribution"])
def test_the_library_never_imports_validation(module):
    assert "validation" not in _loaded_after(module)

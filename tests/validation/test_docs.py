"""The example in docs/validation.md runs and says what the page claims."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "validation.md"


def test_docs_example_runs(capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    exact = namespace["exact"]
    assert torch.allclose(exact.values.sum(), exact.efficiency_target, rtol=1e-9, atol=1e-15)
    assert namespace["loo"].shape == (8,)


def test_docs_list_the_allow_list():
    from validation import STACKABLE_OPTIMIZERS

    text = DOC.read_text()
    assert "`" + ", ".join(c.__name__ for c in STACKABLE_OPTIMIZERS) + "`" in text

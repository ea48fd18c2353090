"""The code in docs/estimators.md runs as written."""

from __future__ import annotations

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "estimators.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_code_block_runs(index, capsys):
    # The rule example registers a new layer type; a fresh namespace per block keeps blocks independent.
    exec(compile(BLOCKS[index], f"{DOC.name}[block {index}]", "exec"), {"__name__": f"doc_block_{index}"})
    if "print(" in BLOCKS[index]:
        assert "torch.Size([6, 2]) dense" in capsys.readouterr().out


@pytest.mark.parametrize(
    "module",
    ["estimators._config", "estimators._engine", "estimators._factorize", "estimators._factors", "estimators._first_order", "estimators._ghost"],
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    import torch
    from torch import nn

    result = doctest.testmod(importlib.import_module(module), extraglobs={"torch": torch, "nn": nn}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0

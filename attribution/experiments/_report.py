"""Markdown tables for the experiments' ``summary.md`` files and printed tables (one renderer)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pandas as pd


def markdown_table(columns: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; each cell is ``str()`` of its value (format numbers first).

    Example:
        >>> print(markdown_table(["method", "top-1"], [["tf-idf", "1.000"], ["adam-aware", "0.810"]]))
        | method | top-1 |
        |---|---|
        | tf-idf | 1.000 |
        | adam-aware | 0.810 |
    """
    columns = [str(c) for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        row = [str(v) for v in row]
        if len(row) != len(columns):
            raise ValueError(f"a row has {len(row)} cells but the table has {len(columns)} columns: {row}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def frame_table(frame: pd.DataFrame) -> str:
    """A data frame (its index as leading columns) as a markdown table; multi-level column names are joined by a space.

    Example:
        >>> frame = pd.DataFrame({"auroc": [0.9, 0.7]}, index=pd.Index(["a", "b"], name="method"))
        >>> print(frame_table(frame))
        | method | auroc |
        |---|---|
        | a | 0.9 |
        | b | 0.7 |
    """
    flat = frame.reset_index()
    columns = [" ".join(str(p) for p in c if str(p)) if isinstance(c, tuple) else c for c in flat.columns]
    return markdown_table(columns, flat.itertuples(index=False))


def mean_std(values: Sequence[float] | pd.Series, fmt: str = ".4f") -> str:
    """``"mean ± std"`` over seeds (sample std), or just the mean for a single value.

    Example:
        >>> mean_std([0.5, 0.7], ".2f"), mean_std([0.5], ".2f")
        ('0.60 ± 0.14', '0.50')
    """
    s = pd.Series(values, dtype=float)
    if len(s) < 2 or math.isnan(s.std()):
        return f"{s.mean():{fmt}}"
    return f"{s.mean():{fmt}} ± {s.std():{fmt}}"

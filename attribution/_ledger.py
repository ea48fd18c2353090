"""The value ledger: totals by dataset id, the per-step history, and atomic save/load."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Hashable, Sequence
from pathlib import Path

import pandas as pd
import torch

FORMAT = "inrun-shapley-ledger"
FORMAT_VERSION = 1


class LedgerFileError(ValueError):
    """A saved ledger is corrupted, truncated, or from an incompatible version."""


def normalize_ids(ids) -> list[Hashable]:
    """Dataset ids as a list of Python hashables (an integer tensor becomes a list of ints)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point():
            raise TypeError(
                f"ids given as a tensor must be 1-D integers (one per sample), got dtype {ids.dtype} "
                f"and shape {tuple(ids.shape)}"
            )
        return ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"ids must be a sequence or 1-D integer tensor with one id per sample, got {type(ids).__name__}")
    out = list(ids)
    for i in out:
        if not isinstance(i, Hashable):
            raise TypeError(f"every id must be hashable, got {type(i).__name__} ({i!r})")
    return out


class Ledger:
    """Float64 totals ``[N, K]`` and occurrence counts per id, plus an optional long history.

    A sample that appears twice in one batch (duplicate ids) is two occurrences: both values are
    added to the id's total and its count rises by two.
    """

    def __init__(self, num_targets: int | None = None, record_steps: bool = False):
        self.num_targets = num_targets
        self.record_steps = record_steps
        self.index: dict[Hashable, int] = {}
        self.ids: list[Hashable] = []
        self.totals = torch.zeros(0, num_targets or 0, dtype=torch.float64)
        self.counts = torch.zeros(0, dtype=torch.int64)
        self.history: list[tuple[int, int, Hashable, list[float]]] = []  # (step, position, id, values)
        self.steps = 0
        self.skipped: list[tuple[int, str]] = []

    def _rows(self, ids: list[Hashable]) -> torch.Tensor:
        new = [i for i in dict.fromkeys(ids) if i not in self.index]
        for i in new:
            self.index[i] = len(self.ids)
            self.ids.append(i)
        if new:
            grow = torch.zeros(len(new), self.totals.shape[1], dtype=torch.float64)
            self.totals = torch.cat([self.totals, grow])
            self.counts = torch.cat([self.counts, torch.zeros(len(new), dtype=torch.int64)])
        return torch.tensor([self.index[i] for i in ids], dtype=torch.long)

    def add(self, ids: list[Hashable], values: torch.Tensor) -> None:
        """Add one step's values ``[n, K]`` (float64) for ``ids`` (n entries)."""
        if self.num_targets is None:
            self.num_targets = values.shape[1]
            self.totals = torch.zeros(0, self.num_targets, dtype=torch.float64)
        rows = self._rows(ids)
        self.totals.index_add_(0, rows, values.to(torch.float64))
        self.counts.index_add_(0, rows, torch.ones_like(rows))
        if self.record_steps:
            for pos, (i, v) in enumerate(zip(ids, values.tolist())):
                self.history.append((self.steps, pos, i, v))
        self.steps += 1

    def merge(self, other: Ledger) -> None:
        """Add another ledger's totals, counts and history (for gathering ranks)."""
        if other.num_targets is None:
            return
        if self.num_targets is None:
            self.num_targets = other.num_targets
            self.totals = torch.zeros(0, other.num_targets, dtype=torch.float64)
        rows = self._rows(other.ids)
        self.totals.index_add_(0, rows, other.totals)
        self.counts.index_add_(0, rows, other.counts)
        self.history += other.history
        self.history.sort(key=lambda h: (h[0], h[1]))
        self.skipped = sorted(set(self.skipped) | set(other.skipped))

    def skip(self, reason: str) -> None:
        """Record a step whose values were not added (for example non-finite gradients)."""
        self.skipped.append((self.steps, reason))
        self.steps += 1

    # ------------------------------------------------------------------ tables
    def _value_columns(self) -> list[str]:
        k = self.num_targets or 1
        return ["value"] if k == 1 else [f"value_{j}" for j in range(k)]

    def values_frame(self) -> pd.DataFrame:
        cols = self._value_columns()
        totals = self.totals if self.totals.shape[1] else torch.zeros(len(self.ids), 1, dtype=torch.float64)
        frame = pd.DataFrame(totals.numpy().copy(), columns=cols, index=pd.Index(self.ids, name="id"))
        frame["steps_seen"] = self.counts.numpy().copy()
        return frame

    def history_frame(self) -> pd.DataFrame:
        cols = self._value_columns()
        rows = [(s, p, i, *v) for s, p, i, v in self.history]
        return pd.DataFrame(rows, columns=["step", "position", "id", *cols])

    # ------------------------------------------------------------------ persistence
    def state_dict(self, config: dict) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": dict(config),
            "num_targets": self.num_targets,
            "record_steps": self.record_steps,
            "ids": list(self.ids),
            "totals": self.totals.clone(),
            "counts": self.counts.clone(),
            "history": list(self.history),
            "steps": self.steps,
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> Ledger:
        ledger = cls(state["num_targets"], state["record_steps"])
        ledger.ids = list(state["ids"])
        ledger.index = {i: k for k, i in enumerate(ledger.ids)}
        ledger.totals = state["totals"].to(torch.float64)
        ledger.counts = state["counts"].to(torch.int64)
        ledger.history = [tuple(h) for h in state["history"]]
        ledger.steps = int(state["steps"])
        ledger.skipped = [tuple(s) for s in state["skipped"]]
        return ledger


def atomic_save(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the target folder, fsync, then rename over ``path``.

    A crash at any point leaves either the previous file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checked(path: str | os.PathLike) -> dict:
    """Load a ledger file, refusing corrupted files and other formats or versions with a clear error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved ledger at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files raise many different errors
        raise LedgerFileError(
            f"{str(path)!r} is not a readable ledger file (corrupted or not written by InRunShapley.save): {exc}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise LedgerFileError(f"{str(path)!r} is not an InRunShapley ledger (format marker missing)")
    if state.get("version") != FORMAT_VERSION:
        raise LedgerFileError(
            f"{str(path)!r} was written by ledger format version {state.get('version')!r}; this version of "
            f"the toolkit reads version {FORMAT_VERSION}. Load it with the version that wrote it."
        )
    return state

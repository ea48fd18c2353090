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
    """A saved ledger is corrupted, truncated, or from an incompatible version.

    Example:
        >>> import tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = pathlib.Path(tmp.name) / "bad.pt"
        >>> _ = path.write_bytes(b"not a ledger")
        >>> load_checked(path)
        Traceback (most recent call last):
        ...
        attribution._ledger.LedgerFileError: '...bad.pt' is not a readable ledger file ...
        >>> tmp.cleanup()
    """


def normalize_ids(ids) -> list[Hashable]:
    """Dataset ids as a list of Python hashables (an integer tensor becomes a list of ints).

    Args:
        ids: a 1-D integer tensor ``[n]`` or a sequence of n hashables (not a bare string).
    Returns:
        ``list`` of n ids.
    Raises:
        TypeError: a float or multi-dimensional tensor, a string, a non-sequence, or an
            unhashable id.
    Example:
        >>> normalize_ids(torch.tensor([3, 1])), normalize_ids(("a", 7))
        ([3, 1], ['a', 7])
        >>> normalize_ids(torch.tensor([0.5]))
        Traceback (most recent call last):
        ...
        TypeError: ids given as a tensor must be 1-D integers (one per sample), got dtype torch.float32 and shape (1,)
    """
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

    The in-run value of id i is totals[i] = Σ_t Σ_{z in step t with id i} φ_z^{(t)} (K columns,
    one per validation target); ``counts[i]`` is the number of occurrences.

    Args:
        num_targets: K, or ``None`` to take it from the first :meth:`add`.
        record_steps: also keep every (step, position, id, values) row in ``history``.

    Example:
        >>> led = Ledger(record_steps=True)
        >>> led.add(["a", "b"], torch.tensor([[0.5], [-1.0]], dtype=torch.float64))
        >>> led.add(["a", "a"], torch.tensor([[0.25], [0.25]], dtype=torch.float64))
        >>> led.values_frame()
           value  steps_seen
        id
        a    1.0           3
        b   -1.0           1
        >>> led.steps, len(led.history)
        (2, 4)
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
        """Add one step's values ``[n, K]`` (float64) for ``ids`` (n entries).

        New ids get a row; repeated ids accumulate; the step counter advances by one.

        Example:
            >>> led = Ledger()
            >>> led.add([0, 1, 0], torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64))
            >>> led.ids, led.totals.tolist(), led.counts.tolist()
            ([0, 1], [[6.0, 8.0], [3.0, 4.0]], [2, 1])
        """
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
        """Add another ledger's totals, counts and history (for gathering ranks).

        Example:
            >>> a, b = Ledger(), Ledger()
            >>> a.add(["x"], torch.ones(1, 1, dtype=torch.float64))
            >>> b.add(["x", "y"], torch.ones(2, 1, dtype=torch.float64))
            >>> a.merge(b); a.ids, a.totals.reshape(-1).tolist(), a.counts.tolist()
            (['x', 'y'], [2.0, 1.0], [2, 1])
        """
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
        """Record a step whose values were not added (for example non-finite gradients).

        Example:
            >>> led = Ledger(); led.skip("non-finite gradient"); led.steps, led.skipped
            (1, [(0, 'non-finite gradient')])
        """
        self.skipped.append((self.steps, reason))
        self.steps += 1

    # ------------------------------------------------------------------ tables
    def _value_columns(self) -> list[str]:
        k = self.num_targets or 1
        return ["value"] if k == 1 else [f"value_{j}" for j in range(k)]

    def values_frame(self) -> pd.DataFrame:
        """Totals as a DataFrame indexed by ``id``: ``value`` (or ``value_0..value_{K-1}``) and ``steps_seen``.

        Example:
            >>> led = Ledger(); led.add([7, 8], torch.tensor([[1.0, 0.0], [2.0, 3.0]], dtype=torch.float64))
            >>> list(led.values_frame().columns), float(led.values_frame().loc[8, "value_1"])
            (['value_0', 'value_1', 'steps_seen'], 3.0)
        """
        cols = self._value_columns()
        totals = self.totals if self.totals.shape[1] else torch.zeros(len(self.ids), 1, dtype=torch.float64)
        frame = pd.DataFrame(totals.numpy().copy(), columns=cols, index=pd.Index(self.ids, name="id"))
        frame["steps_seen"] = self.counts.numpy().copy()
        return frame

    def history_frame(self) -> pd.DataFrame:
        """The per-step long table: one row (``step``, ``position``, ``id``, values) per occurrence.

        Empty unless the ledger was built with ``record_steps=True``.

        Example:
            >>> led = Ledger(record_steps=True); led.add(["a"], torch.tensor([[0.5]], dtype=torch.float64))
            >>> led.history_frame().to_dict("records")
            [{'step': 0, 'position': 0, 'id': 'a', 'value': 0.5}]
        """
        cols = self._value_columns()
        rows = [(s, p, i, *v) for s, p, i, v in self.history]
        return pd.DataFrame(rows, columns=["step", "position", "id", *cols])

    # ------------------------------------------------------------------ persistence
    def state_dict(self, config: dict) -> dict:
        """Everything needed to restore the ledger, plus ``config`` and the format marker/version.

        Tensors are cloned; the dict round-trips through :meth:`from_state_dict` and
        :func:`atomic_save` / :func:`load_checked` (``torch.load(weights_only=True)``).

        Example:
            >>> led = Ledger(); led.add(["a"], torch.tensor([[0.5]], dtype=torch.float64))
            >>> state = led.state_dict({"linearization": "secant"})
            >>> state["format"], state["version"], state["ids"]
            ('inrun-shapley-ledger', 1, ['a'])
        """
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
        """The ledger saved by :meth:`state_dict` (totals float64, counts int64).

        Raises:
            KeyError: a field is missing (use :func:`load_checked` to validate a file first).
        Example:
            >>> led = Ledger(); led.add([1, 2], torch.tensor([[0.5], [1.5]], dtype=torch.float64))
            >>> back = Ledger.from_state_dict(led.state_dict({}))
            >>> back.ids, torch.equal(back.totals, led.totals), back.steps
            ([1, 2], True, 1)
        """
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

    Example:
        >>> import tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = pathlib.Path(tmp.name) / "sub" / "ledger.pt"
        >>> led = Ledger(); led.add(["a"], torch.tensor([[0.5]], dtype=torch.float64))
        >>> atomic_save(led.state_dict({}), path)
        >>> Ledger.from_state_dict(load_checked(path)).totals.tolist()
        [[0.5]]
        >>> tmp.cleanup()
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
    """Load a ledger file, refusing corrupted files and other formats or versions with a clear error.

    Returns:
        The state dict written by :meth:`Ledger.state_dict`.
    Raises:
        FileNotFoundError: no file at ``path``.
        LedgerFileError: unreadable, not a ledger, or another format version.
    Example:
        >>> import tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = pathlib.Path(tmp.name) / "old.pt"
        >>> atomic_save({"format": FORMAT, "version": 0}, path)
        >>> load_checked(path)
        Traceback (most recent call last):
        ...
        attribution._ledger.LedgerFileError: '...old.pt' was written by ledger format version 0; ...
        >>> tmp.cleanup()
    """
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

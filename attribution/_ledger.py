"""The value ledger: totals by dataset id, the per-step history, and atomic, checksummed save/load."""

from __future__ import annotations

import contextlib
import hashlib
import io
import numbers
import os
import re
import secrets
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.utils._pytree as pytree

FORMAT = "inrun-shapley-ledger"
#: 2: the state is a checksummed payload and records the validation fingerprint; 1: the bare state.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


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


# ---------------------------------------------------------------------- ids
def normalize_ids(ids) -> list[Hashable]:
    """Dataset ids as a list of plain ``int``, ``str``, or tuples of those.

    Ids are the ledger's dictionary keys and must come back from ``torch.load(weights_only=True)``,
    so only exact, saveable keys are accepted: numpy integers and 0-d integer arrays/tensors become
    ``int``, numpy strings become ``str``, and a tuple id such as ``(shard, row)`` keeps its parts
    (``values()`` is then indexed by a MultiIndex with levels ``id_0, id_1, ...``). Ints and strs
    may mix in one run: ``1`` and ``"1"`` are two ids.

    Args:
        ids: a 1-D integer tensor or numpy array ``[n]``, or a sequence of n ids (not a bare string).
    Returns:
        ``list`` of n ids.
    Raises:
        TypeError: a float, bool or multi-dimensional tensor or array; a string or non-sequence;
            an id that is a bool or float (``True == 1`` and ``1.0 == 1``: they would share the row
            of an integer id), None, or of any other type (UUID, bytes, ...); tuple ids of
            different lengths, or mixed with scalar ids. The message names the id, its position
            and type, and the fix.
    Example:
        >>> import numpy as np
        >>> normalize_ids(torch.tensor([3, 1])), normalize_ids(("a", np.int64(7), np.str_("b")))
        ([3, 1], ['a', 7, 'b'])
        >>> normalize_ids([("shard-0", 4), ("shard-1", np.int32(4))])
        [('shard-0', 4), ('shard-1', 4)]
        >>> normalize_ids(torch.tensor([0.5]))
        Traceback (most recent call last):
        ...
        TypeError: ids given as a tensor must be 1-D integers (one per sample), got dtype torch.float32 and shape (1,)
        >>> normalize_ids([0, 1.0])
        Traceback (most recent call last):
        ...
        TypeError: id 1.0 at position 1 has type float, which cannot be a dataset id: ...
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(
                f"ids given as a tensor must be 1-D integers (one per sample), got dtype {ids.dtype} "
                f"and shape {tuple(ids.shape)}"
            )
        return ids.tolist()
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise TypeError(f"ids given as a numpy array must be 1-D (one per sample), got shape {ids.shape}")
        ids = list(ids)  # each element is checked below (a float or bool array is refused there)
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"ids must be a sequence or 1-D integer tensor with one id per sample, got {type(ids).__name__}")
    out = [_normalize_id(i, pos) for pos, i in enumerate(ids)]
    _check_id_lengths(out, None, "the earlier ids of this batch")
    return out


def _normalize_id(i, pos: int, part: int | None = None):
    """One id (or one part of a tuple id) as a plain int or str; refuse anything else."""
    where = f"id {i!r} at position {pos}" if part is None else f"part {part} ({i!r}) of the tuple id at position {pos}"
    if isinstance(i, (np.ndarray, torch.Tensor)) and i.ndim == 0:
        i = i.item()  # a 0-d integer array is its integer; a 0-d float or bool is refused below
    if isinstance(i, (bool, np.bool_)):
        why = "a bool equals the integer id 0 or 1 (True == 1) and would share its row; pass int(id) or str(id)"
    elif isinstance(i, str):
        return str(i)  # numpy.str_ and other str subclasses: plain str, which the file can hold
    elif isinstance(i, numbers.Integral):
        return int(i)
    elif isinstance(i, tuple) and part is None:
        if not i:
            raise TypeError(f"{where} is an empty tuple; a tuple id needs at least one part (int or str)")
        return tuple(_normalize_id(p, pos, j) for j, p in enumerate(i))
    elif isinstance(i, tuple):
        why = "a tuple id holds int or str parts, not nested tuples; flatten it"
    elif isinstance(i, numbers.Number):
        why = (
            "a number that is no int (a float, ...) equals the integer id of the same value (1.0 == 1) "
            "and would share its row; pass int(id) or str(id)"
        )
    elif i is None:
        why = "every sample needs an id; pass an int or str for it"
    else:
        why = "the saved file holds only int, str and tuples of those; pass str(id) (for example str(uuid)) or an int"
    raise TypeError(f"{where} has type {type(i).__qualname__}, which cannot be a dataset id: {why}")


def _id_length(i) -> int:
    """0 for a scalar id, the number of parts of a tuple id."""
    return len(i) if isinstance(i, tuple) else 0


def _describe_length(n: int) -> str:
    return "a scalar (int or str)" if n == 0 else f"a tuple of {n} parts"


def _check_id_lengths(ids: list[Hashable], expected: int | None, others: str) -> None:
    """Refuse tuple ids of another length than ``expected`` (0: scalar ids; None: the first id's)."""
    for pos, i in enumerate(ids):
        n = _id_length(i)
        if expected is None:
            expected = n
        elif n != expected:
            raise TypeError(
                f"id {i!r} at position {pos} is {_describe_length(n)} but {others} are each "
                f"{_describe_length(expected)}; all ids of one run must be scalars, or all tuples of one "
                "length (they become the index levels id_0, id_1, ... of values())"
            )


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
        #: (step, route, nonlinearity ν or None, largest standard error or None) of every valued step
        self.step_info: list[tuple[int, str, float | None, float | None]] = []
        #: (step, route, samples, pearson, relative error, seconds) of every audited step
        self.audits: list[tuple] = []

    def check_ids(self, ids: list[Hashable], pending: Sequence[Hashable] = ()) -> None:
        """Refuse ids (normalized, see :func:`normalize_ids`) that cannot share this ledger's index.

        All ids of one ledger are scalars (int or str) or all tuples of one length.

        Args:
            ids: the n ids of one batch.
            pending: ids accepted earlier but not yet added (the batch contexts of a step in
                progress); they count as ids of this run.
        Raises:
            TypeError: a tuple id of another length than the ledger's ids, or a tuple id among
                scalar ids (or the reverse), naming the id and its position in ``ids``.
        Example:
            >>> led = Ledger(); led.add([("a", 0)], torch.zeros(1, 1, dtype=torch.float64))
            >>> led.check_ids([("b", 1)])
            >>> led.check_ids([("b", 1, 2)])
            Traceback (most recent call last):
            ...
            TypeError: id ('b', 1, 2) at position 0 is a tuple of 3 parts but the ids already in this run are each a tuple of 2 parts; ...
        """
        known = self.ids[:1] or list(pending[:1])
        _check_id_lengths(ids, _id_length(known[0]) if known else None, "the ids already in this run")

    def _rows(self, ids: list[Hashable]) -> torch.Tensor:
        self.check_ids(ids)  # before any row is added, so a refused step changes nothing
        new = [i for i in dict.fromkeys(ids) if i not in self.index]
        for i in new:
            self.index[i] = len(self.ids)
            self.ids.append(i)
        if new:
            grow = torch.zeros(len(new), self.totals.shape[1], dtype=torch.float64)
            self.totals = torch.cat([self.totals, grow])
            self.counts = torch.cat([self.counts, torch.zeros(len(new), dtype=torch.int64)])
        return torch.tensor([self.index[i] for i in ids], dtype=torch.long)

    def add(self, ids: list[Hashable], values: torch.Tensor, info: tuple | None = None) -> None:
        """Add one step's values ``[n, K]`` (float64) for ``ids`` (n entries).

        New ids get a row; repeated ids accumulate; the step counter advances by one. ``info``
        is the step's ``(route, nonlinearity, stderr)`` for :meth:`step_info_frame`.

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
        route, nu, err = info if info is not None else ("linear", None, None)
        self.step_info.append((self.steps, route, nu, err))
        self.steps += 1

    def credit(self, ids: list[Hashable], values: torch.Tensor, *, origin: int, step: int | None = None) -> None:
        """Add values ``[n, K]`` that a later step credits to the samples of step ``origin`` (momentum credit).

        Totals grow; counts and the step counter do not (the samples were counted at ``origin``).
        History rows (with ``record_steps``) carry ``step`` (default: the last step added) and ``origin``.

        Example:
            >>> led = Ledger(record_steps=True)
            >>> led.add(["a"], torch.tensor([[1.0]], dtype=torch.float64)); led.add(["b"], torch.tensor([[2.0]], dtype=torch.float64))
            >>> led.credit(["a"], torch.tensor([[0.5]], dtype=torch.float64), origin=0)
            >>> led.values_frame()["value"].tolist(), led.counts.tolist(), led.steps
            ([1.5, 2.0], [1, 1], 2)
            >>> led.history_frame()[["step", "id", "value", "origin"]].values.tolist()[-1]
            [1, 'a', 0.5, 0]
        """
        if self.num_targets is None:
            raise ValueError("credit() before any step was added")
        rows = self._rows(ids)
        self.totals.index_add_(0, rows, values.to(torch.float64))
        if self.record_steps:
            at = self.steps - 1 if step is None else step
            for pos, (i, v) in enumerate(zip(ids, values.tolist())):
                self.history.append((at, pos, i, v, origin))

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
        self.history.sort(key=lambda h: (h[0], h[4] if len(h) > 4 else h[0], h[1]))
        self.audits = sorted(set(self.audits) | set(other.audits))
        known = {row[0] for row in self.step_info}
        self.step_info = sorted(self.step_info + [row for row in other.step_info if row[0] not in known])
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
        """Totals ``[N, K]`` as a DataFrame: ``value`` (or ``value_0..value_{K-1}``) and ``steps_seen``.

        Indexed by ``id`` in order of first appearance; with tuple ids of length L by a MultiIndex
        with levels ``id_0 .. id_{L-1}``.

        Example:
            >>> led = Ledger(); led.add([7, 8], torch.tensor([[1.0, 0.0], [2.0, 3.0]], dtype=torch.float64))
            >>> list(led.values_frame().columns), float(led.values_frame().loc[8, "value_1"])
            (['value_0', 'value_1', 'steps_seen'], 3.0)
            >>> led = Ledger(); led.add([("web", 3), ("books", 3)], torch.ones(2, 1, dtype=torch.float64))
            >>> frame = led.values_frame(); frame.index.names, float(frame.loc[("books", 3), "value"])
            (FrozenList(['id_0', 'id_1']), 1.0)
        """
        cols = self._value_columns()
        totals = self.totals if self.totals.shape[1] else torch.zeros(len(self.ids), 1, dtype=torch.float64)
        if self.ids and isinstance(self.ids[0], tuple):  # check_ids keeps every id a tuple of this length
            names = [f"id_{j}" for j in range(len(self.ids[0]))]
            index = pd.MultiIndex.from_tuples(self.ids, names=names)
        else:
            index = pd.Index(self.ids, name="id")
        frame = pd.DataFrame(totals.numpy().copy(), columns=cols, index=index)
        frame["steps_seen"] = self.counts.numpy().copy()
        return frame

    def history_frame(self) -> pd.DataFrame:
        """The per-step long table: one row (``step``, ``position``, ``id``, values) per occurrence.

        Empty unless the ledger was built with ``record_steps=True``. A tuple id stays one tuple in
        the ``id`` column.

        Example:
            >>> led = Ledger(record_steps=True); led.add(["a"], torch.tensor([[0.5]], dtype=torch.float64))
            >>> led.history_frame().to_dict("records")
            [{'step': 0, 'position': 0, 'id': 'a', 'value': 0.5, 'route': 'linear', 'origin': 0}]
        """
        cols = self._value_columns()
        routes = {row[0]: row[1] for row in self.step_info}
        rows = []
        for h in self.history:
            s, p, i, v = h[:4]
            origin = h[4] if len(h) > 4 else s  # a momentum credit from a later step names its sample's step
            rows.append((s, p, i, *v, routes.get(s, "linear") if origin == s else "carry", origin))
        return pd.DataFrame(rows, columns=["step", "position", "id", *cols, "route", "origin"])

    def step_info_frame(self) -> pd.DataFrame:
        """One row per valued step: ``step``, ``route`` (``"linear"``, ``"exact"``, ``"exact-loo"``),
        ``nonlinearity`` (ν, NaN where not computed) and ``stderr`` (the exact route's largest
        standard error, NaN otherwise).

        Example:
            >>> led = Ledger(); led.add(["a"], torch.zeros(1, 1, dtype=torch.float64), info=("exact", 0.9, 1e-4))
            >>> led.step_info_frame().to_dict("records")
            [{'step': 0, 'route': 'exact', 'nonlinearity': 0.9, 'stderr': 0.0001}]
        """
        rows = [(s, r, float("nan") if nu is None else nu, float("nan") if e is None else e) for s, r, nu, e in self.step_info]
        return pd.DataFrame(rows, columns=["step", "route", "nonlinearity", "stderr"])

    # ------------------------------------------------------------------ persistence
    def state_dict(self, config: dict, val_fingerprint: str | None = None) -> dict:
        """Everything needed to restore the ledger, plus ``config``, the format marker/version and
        the validation fingerprint.

        Tensors are cloned (totals ``[N, K]`` float64, counts ``[N]`` int64); the dict round-trips
        through :meth:`from_state_dict` and :func:`atomic_save` / :func:`load_checked`
        (``torch.load(weights_only=True)``).

        Args:
            config: the tracker's configuration (``AttributionConfig.as_dict()``).
            val_fingerprint: :func:`val_fingerprint` of the validation batches the values were
                measured on, so that :func:`check_same_validation` can refuse another set on resume.
        Example:
            >>> led = Ledger(); led.add(["a"], torch.tensor([[0.5]], dtype=torch.float64))
            >>> state = led.state_dict({"linearization": "secant"})
            >>> state["format"], state["version"], state["ids"], state["val_fingerprint"]
            ('inrun-shapley-ledger', 2, ['a'], None)
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
            "step_info": [list(row) for row in self.step_info],
            "audits": [list(row) for row in self.audits],
            "val_fingerprint": val_fingerprint,
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
        ledger.step_info = [tuple(row) for row in state.get("step_info", [])]  # absent in files before it existed
        ledger.audits = [tuple(row) for row in state.get("audits", [])]
        return ledger


# ---------------------------------------------------------------------- the validation fingerprint
def val_fingerprint(val_batches: list[tuple]) -> str:
    """SHA-256 hex digest of K validation batches: their structure, dtypes, shapes and bytes.

    Each leaf of the ``(inputs, targets)`` pytrees (``torch.utils._pytree``: inputs may be a tensor
    or dicts / tuples / lists of tensors; a mapping that is no pytree node, such as Hugging Face's
    ``BatchEncoding``, counts as a dict) contributes its path in the tree, then for a tensor its
    dtype, shape and bytes (on the CPU, so the same data on another device matches; bfloat16
    included), for a numpy array likewise, and for any other leaf its type and ``repr``. Dict
    entries are taken in key order, so insertion order does not matter. Stored in the saved file
    so that :func:`check_same_validation` refuses to resume on other validation data.

    Args:
        val_batches: list of K ``(inputs, targets)`` pairs.
    Returns:
        64 hex characters.
    Example:
        >>> x, y = torch.ones(2, 3), torch.tensor([0, 1])
        >>> a = val_fingerprint([(x, y)])
        >>> len(a), a == val_fingerprint([(x.clone(), y.clone())])
        (64, True)
        >>> a == val_fingerprint([(x, torch.tensor([1, 0]))]), a == val_fingerprint([(x.double(), y)])
        (False, False)
        >>> a == val_fingerprint([({"input_ids": x}, y)]), a == val_fingerprint([(x, y), (x, y)])
        (False, False)
    """
    digest = hashlib.sha256(b"inrun-shapley validation fingerprint 1\0")
    _hash_tree(digest, list(val_batches), "")
    return digest.hexdigest()


def _hash_tree(digest, tree, prefix: str) -> None:
    """Feed every leaf of ``tree`` to ``digest``, each after its path; leaves in path order."""
    leaves, _ = pytree.tree_flatten_with_path(tree)
    for path, leaf in sorted(((prefix + _key_path(p), leaf) for p, leaf in leaves), key=lambda pl: pl[0]):
        if isinstance(leaf, Mapping):  # its entries are hashed as a dict's would be
            _hash_tree(digest, dict(leaf), path)
            continue
        digest.update(f"{path}\0".encode())
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach()
            t = (t.to_dense() if t.layout != torch.strided else t).cpu().resolve_conj().resolve_neg().contiguous()
            digest.update(f"tensor {t.dtype} {tuple(t.shape)}\0".encode())
            # bytes through a uint8 view: numpy has no bfloat16
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(leaf, np.ndarray) and leaf.dtype != object:
            a = np.ascontiguousarray(leaf)
            digest.update(f"ndarray {a.dtype.str} {a.shape}\0".encode())
            digest.update(a.tobytes())
        else:  # an object array's bytes are pointers: its repr is the content
            digest.update(f"{type(leaf).__qualname__} {leaf!r}\0".encode())


def _key_path(path) -> str:
    """``[0][1]['input_ids']`` for a pytree key path (stable across torch versions, unlike keystr)."""
    parts = []
    for key in path:
        if isinstance(key, pytree.SequenceKey):
            parts.append(f"[{key.idx}]")
        elif isinstance(key, pytree.MappingKey):
            parts.append(f"[{key.key!r}]")
        elif isinstance(key, pytree.GetAttrKey):
            parts.append(f".{key.name}")
        else:
            parts.append(f"<{key!r}>")
    return "".join(parts)


def check_same_validation(state: dict, fingerprint: str | None, path: str | os.PathLike) -> None:
    """Refuse to resume the run saved at ``path`` on validation batches with another fingerprint.

    Nothing is checked when either fingerprint is unknown (``None``: a version-1 file, or a state
    saved without one).

    Raises:
        ValueError: both fingerprints are known and differ.
    Example:
        >>> x, y = torch.ones(2, 3), torch.tensor([0, 1])
        >>> state = Ledger().state_dict({}, val_fingerprint=val_fingerprint([(x, y)]))
        >>> check_same_validation(state, val_fingerprint([(x.clone(), y)]), "run.pt")
        >>> check_same_validation(state, val_fingerprint([(x, 1 - y)]), "run.pt")
        Traceback (most recent call last):
        ...
        ValueError: 'run.pt': the saved run was measured on a different validation set (fingerprint ... != ...); pass the same val_batch to resume, or start a new tracker
    """
    saved = state.get("val_fingerprint")
    if saved is not None and fingerprint is not None and saved != fingerprint:
        raise ValueError(
            f"{str(path)!r}: the saved run was measured on a different validation set (fingerprint "
            f"{saved[:16]}... != {fingerprint[:16]}...); pass the same val_batch to resume, or start a new tracker"
        )


# ---------------------------------------------------------------------- the file
def atomic_save(obj: dict, path: str | os.PathLike) -> None:
    """Write the state ``obj`` with a SHA-256 checksum to ``path``, atomically.

    ``obj`` is serialized with ``torch.save`` into payload bytes; the file is a ``torch.save`` of
    ``{"format", "version": 2, "sha256": hex digest of the payload, "payload": uint8 tensor}``,
    which :func:`load_checked` verifies. The bytes go to a temporary file
    ``.<name>.<pid>.<random>.tmp`` in the folder of the real target (``os.path.realpath``: saving
    onto a symlink rewrites the file it points to and keeps the link), are fsync'ed, and the
    temporary file is renamed over the target: a reader sees the previous file or the new one,
    never a partial one. The new file's permissions are those the umask gives (``0o666 & ~umask``).

    Temporary files: removed on every exception (KeyboardInterrupt included). A process killed
    with SIGKILL, or a power cut, cannot clean up and leaves its temporary file behind; the next
    save of the same target removes every such file whose writing process no longer runs on this
    machine (it cannot tell for a process of another machine sharing the folder, or on Windows,
    and keeps those).

    Example:
        >>> import tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = pathlib.Path(tmp.name) / "sub" / "ledger.pt"
        >>> led = Ledger(); led.add(["a"], torch.tensor([[0.5]], dtype=torch.float64))
        >>> atomic_save(led.state_dict({}), path)
        >>> Ledger.from_state_dict(load_checked(path)).totals.tolist()
        [[0.5]]
        >>> sorted(p.name for p in path.parent.iterdir())
        ['ledger.pt']
        >>> tmp.cleanup()
    """
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    data = _encode(obj)  # before any file exists: a failure here leaves nothing to clean
    _remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    created, fd = False, None
    try:
        # O_EXCL: never write through someone else's file; mode 0o666 lets the umask decide
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        created = True
        with os.fdopen(fd, "wb") as f:
            fd = None  # the file object owns it now
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if fd is not None:
            os.close(fd)
        if created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    _fsync_folder(target.parent)


def _encode(obj: dict) -> bytes:
    payload = io.BytesIO()
    torch.save(obj, payload)
    payload = payload.getvalue()
    wrapper = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    out = io.BytesIO()
    torch.save(wrapper, out)
    return out.getvalue()


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporary files of ``target`` left by saves whose process was killed (SIGKILL)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[0-9a-f]+\.tmp")
    with os.scandir(target.parent) as entries:
        stale = [e.path for e in entries if (m := pattern.fullmatch(e.name)) and not _process_runs(int(m.group(1)))]
    for name in stale:
        with contextlib.suppress(OSError):  # cleaning up must never stop the save itself
            os.unlink(name)


def _process_runs(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (True when that cannot be told)."""
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, under another user
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); where a folder cannot be opened (Windows) the rename still happened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _torch_load(source, path: Path):
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files raise many different errors
        raise LedgerFileError(
            f"{str(path)!r} is not a readable ledger file (corrupted or not written by InRunShapley.save): {exc}"
        ) from exc


def _check_format(state, path: Path) -> int:
    """The format version of a loaded dict, refusing other formats and unreadable versions."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise LedgerFileError(f"{str(path)!r} is not an InRunShapley ledger (format marker missing)")
    version = state.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # type(): True == 1 is no version
        raise LedgerFileError(
            f"{str(path)!r} was written by ledger format version {version!r}; this version of the toolkit "
            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}. Load it with the version that wrote it."
        )
    return version


#: the fields of a state and their types; load_checked refuses a file whose state differs.
_FIELDS = {
    "config": dict,
    "num_targets": (int, type(None)),
    "record_steps": bool,
    "ids": list,
    "totals": torch.Tensor,
    "counts": torch.Tensor,
    "history": list,
    "steps": int,
    "skipped": list,
}


def _check_fields(state: dict, path: Path) -> None:
    for name, kind in _FIELDS.items():
        if not isinstance(state.get(name), kind):
            raise LedgerFileError(
                f"{str(path)!r} is corrupted: field {name!r} is missing or has type {type(state.get(name)).__name__}"
            )
    n, k = len(state["ids"]), state["num_targets"] or 0
    if tuple(state["totals"].shape) != (n, k) or tuple(state["counts"].shape) != (n,):
        raise LedgerFileError(
            f"{str(path)!r} is corrupted: {n} ids and {k} targets but totals of shape {tuple(state['totals'].shape)} "
            f"and counts of shape {tuple(state['counts'].shape)}"
        )
    for name in ("step_info", "audits"):
        if not isinstance(state.get(name, []), list):
            raise LedgerFileError(f"{str(path)!r} is corrupted: field {name!r} is not a list")
    if not isinstance(state.get("val_fingerprint"), (str, type(None))):
        raise LedgerFileError(f"{str(path)!r} is corrupted: field 'val_fingerprint' is not a string")


def load_checked(path: str | os.PathLike) -> dict:
    """Load a ledger file, refusing corrupted files and other formats or versions with a clear error.

    A version-2 file's payload must match its SHA-256 checksum; version-1 files (no checksum, no
    validation fingerprint) are still read. Either way the state's fields are checked.

    Returns:
        The state dict written by :meth:`Ledger.state_dict` (``state.get("val_fingerprint")`` is
        None for a version-1 file).
    Raises:
        FileNotFoundError: no file at ``path``.
        LedgerFileError: unreadable, not a ledger, another format version, a checksum mismatch, or
            fields missing or inconsistent.
    Example:
        >>> import tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = pathlib.Path(tmp.name) / "old.pt"
        >>> atomic_save({"format": FORMAT, "version": 0}, path)
        >>> load_checked(path)
        Traceback (most recent call last):
        ...
        attribution._ledger.LedgerFileError: '...old.pt' was written by ledger format version 0; ...
        >>> path = pathlib.Path(tmp.name) / "flipped.pt"
        >>> atomic_save(Ledger().state_dict({}), path)
        >>> wrapper = torch.load(path, weights_only=True); wrapper["payload"][-30] ^= 1
        >>> torch.save(wrapper, path)
        >>> load_checked(path)
        Traceback (most recent call last):
        ...
        attribution._ledger.LedgerFileError: '...flipped.pt' is corrupted (checksum mismatch: ...
        >>> tmp.cleanup()
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved ledger at {str(path)!r}")
    state = _torch_load(path, path)
    version = _check_format(state, path)
    if version == 2:
        digest, payload = state.get("sha256"), state.get("payload")
        is_bytes = isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8 and payload.dim() == 1
        if not (isinstance(digest, str) and is_bytes):
            raise LedgerFileError(f"{str(path)!r} is corrupted: its checksum or payload is missing")
        data = payload.numpy().tobytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise LedgerFileError(
                f"{str(path)!r} is corrupted (checksum mismatch: the SHA-256 of its payload differs from the "
                "one saved with it); restore the file from a copy or start a new run"
            )
        state = _torch_load(io.BytesIO(data), path)
        if _check_format(state, path) != version:
            raise LedgerFileError(f"{str(path)!r} is corrupted: its payload has another format version than the file")
    _check_fields(state, path)
    return state

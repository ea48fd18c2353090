"""The catalogue of id and save-file faults from the user study: each is refused clearly or kept exactly.

Ids are checked at ``tracker.batch()`` (numpy ids become plain ints and strs, tuple ids give a
MultiIndex, bool / float / None / UUID ids are refused); the saved file carries a SHA-256 checksum,
is written through symlinks with the umask's permissions, leaves no temporary file behind, reads
version-1 files, and remembers the validation set it was measured on.
"""

import os
import random
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attribution import InRunShapley, LedgerFileError
from attribution import _ledger

ROOT = Path(__file__).resolve().parents[2]
LOSS = nn.functional.cross_entropy
_g = torch.Generator().manual_seed(0)
X, Y = torch.randn(30, 4, generator=_g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=_g)
VAL = (X[-6:], Y[-6:])


def _tracker(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return InRunShapley(model, opt, LOSS, VAL, **kw), model, opt


def _step(tracker, model, opt, ids, rows):
    opt.zero_grad()
    with tracker.batch(ids):
        LOSS(model(X[list(rows)]), Y[list(rows)]).backward()
    opt.step()


def _listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# ---------------------------------------------------------------------- ids
def test_numpy_ids_become_python_ids_and_the_saved_run_loads(tmp_path):
    tracker, model, opt = _tracker(record_steps=True)
    _step(tracker, model, opt, [np.int64(0), np.int32(1), np.uint8(2), np.array(3)], range(4))
    _step(tracker, model, opt, [np.str_("four"), np.int16(1)], range(4, 6))
    _step(tracker, model, opt, np.arange(5, 8), range(5, 8))  # a 1-D numpy array of ids
    frame = tracker.values()
    assert frame.index.tolist() == [0, 1, 2, 3, "four", 5, 6, 7]
    assert [type(i) for i in frame.index.tolist()] == [int] * 4 + [str] + [int] * 3
    assert frame.loc[1, "steps_seen"] == 2
    tracker.save(tmp_path / "run.pt")  # torch.load(weights_only=True) refused numpy scalars in the file
    resumed = InRunShapley.load(tmp_path / "run.pt", model, opt, LOSS, VAL)
    pd.testing.assert_frame_equal(resumed.values(), frame)
    pd.testing.assert_frame_equal(resumed.history(), tracker.history())


def test_uuid_ids_are_refused_at_batch_not_at_load():
    tracker, model, opt = _tracker()
    sample = uuid.UUID(int=7)
    with pytest.raises(TypeError, match=r"id UUID\('[0-]+7'\) at position 1 has type UUID, .*pass str\(id\) \(for example str\(uuid\)\)"):
        with tracker.batch([0, sample, 2]):
            pass
    _step(tracker, model, opt, [0, str(sample), 2], range(3))  # the refused batch left nothing pending
    assert tracker.values().index.tolist() == [0, str(sample), 2]


def test_tuple_ids_give_a_multiindex_and_round_trip(tmp_path):
    tracker, model, opt = _tracker(record_steps=True)
    _step(tracker, model, opt, [("web", 0), ("web", 1), ("books", 0)], range(3))
    _step(tracker, model, opt, [("web", 1), (np.str_("books"), np.int64(1))], range(3, 5))
    frame = tracker.values()  # a pd.Index of tuples named "id" crashed here
    assert list(frame.index.names) == ["id_0", "id_1"]
    assert frame.index.tolist() == [("web", 0), ("web", 1), ("books", 0), ("books", 1)]
    assert frame["steps_seen"].tolist() == [1, 2, 1, 1]
    history = tracker.history()
    assert history["id"].tolist() == [("web", 0), ("web", 1), ("books", 0), ("web", 1), ("books", 1)]
    sums = {i: 0.0 for i in frame.index}
    for i, v in zip(history["id"], history["value"]):
        sums[i] += v
    assert [sums[i] for i in frame.index] == pytest.approx(frame["value"].tolist(), rel=1e-12, abs=1e-15)
    tracker.save(tmp_path / "run.pt")
    resumed = InRunShapley.load(tmp_path / "run.pt", model, opt, LOSS, VAL)
    pd.testing.assert_frame_equal(resumed.values(), frame)


def test_tuple_ids_of_different_lengths_are_refused():
    tracker, model, opt = _tracker()
    with pytest.raises(
        TypeError,
        match=r"id \('web', 1, 'x'\) at position 1 is a tuple of 3 parts but the earlier ids of this batch are each a tuple of 2 parts",
    ):
        with tracker.batch([("web", 0), ("web", 1, "x")]):
            pass
    _step(tracker, model, opt, [("web", 0)], range(1))
    # against earlier steps: refused at the step today, at batch() once the tracker checks there
    with pytest.raises(TypeError, match=r"id 'web-2' at position 0 is a scalar \(int or str\) but the ids already in this run are each a tuple of 2 parts"):
        _step(tracker, model, opt, ["web-2"], range(1, 2))
    with pytest.raises(TypeError, match=r"id \('web', 3, 'x'\) at position \d is a tuple of 3 parts but the ids already in this run"):
        opt.zero_grad()
        with tracker.batch([("web", 2)]):  # gradient accumulation: two contexts, one step
            LOSS(model(X[2:3]), Y[2:3]).backward()
        with tracker.batch([("web", 3, "x")]):
            LOSS(model(X[3:4]), Y[3:4]).backward()
        opt.step()
    assert tracker.values().index.tolist() == [("web", 0)]


@pytest.mark.parametrize(
    "bad,kind",
    [(True, "bool"), (np.bool_(False), "bool"), (1.0, "float"), (np.float64(2.0), "float64"), (torch.tensor(1.0), "float")],
    ids=["bool", "numpy-bool", "float", "numpy-float", "0-d-float-tensor"],
)
def test_bool_and_float_ids_are_refused_so_they_never_share_an_integer_row(bad, kind):
    tracker, model, opt = _tracker()
    # True == 1 and 1.0 == 1 hash equal: accepted, they silently added to the row of id 1
    with pytest.raises(TypeError, match=rf"at position 2 has type {kind}, which cannot be a dataset id: .* would share its row; pass int\(id\) or str\(id\)"):
        with tracker.batch([0, 1, bad]):
            pass
    with pytest.raises(TypeError, match=r"must be 1-D integers .* got dtype torch.bool"):
        with tracker.batch(torch.tensor([False, True, True])):
            pass


@pytest.mark.parametrize(
    "bad,why",
    [
        (None, r"has type NoneType, .*every sample needs an id"),
        (b"row-3", r"has type bytes, .*pass str\(id\)"),
        (object(), r"has type object, .*pass str\(id\)"),
        (("a", ("b", 1)), r"part 1 \(\('b', 1\)\) of the tuple id at position 1 has type tuple, .*not nested tuples"),
        ((), r"id \(\) at position 1 is an empty tuple"),
    ],
    ids=["None", "bytes", "object", "nested-tuple", "empty-tuple"],
)
def test_none_and_other_ids_are_refused_naming_the_fix(bad, why):
    tracker, _, _ = _tracker()
    with pytest.raises(TypeError, match=why):
        with tracker.batch([0, bad]):
            pass


_scalar_ids = st.one_of(
    st.integers(-(2**70), 2**70),
    st.text(max_size=4),
    st.integers(-(2**31), 2**31 - 1).map(np.int32),
    st.integers(0, 2**64 - 1).map(np.uint64),
    st.text(alphabet="ab1", max_size=3).map(np.str_),
)
_id_lists = st.one_of(
    st.lists(_scalar_ids, min_size=1, max_size=8),
    st.integers(1, 3).flatmap(lambda n: st.lists(st.tuples(*[_scalar_ids] * n), min_size=1, max_size=6)),
)


def _plain(i):
    return tuple(_plain(p) for p in i) if isinstance(i, tuple) else i.item() if isinstance(i, np.generic) else i


@given(_id_lists)
def test_every_accepted_id_round_trips_through_save_and_load(ids):
    import tempfile

    normalized = _ledger.normalize_ids(ids)
    assert normalized == [_plain(i) for i in ids] and _ledger.normalize_ids(normalized) == normalized
    led = _ledger.Ledger(record_steps=True)
    led.add(normalized, torch.arange(2.0 * len(ids), dtype=torch.float64).reshape(-1, 2))
    with tempfile.TemporaryDirectory() as folder:
        _ledger.atomic_save(led.state_dict({}), Path(folder) / "run.pt")
        back = _ledger.Ledger.from_state_dict(_ledger.load_checked(Path(folder) / "run.pt"))
    assert back.ids == led.ids and [type(i) for i in back.ids] == [type(i) for i in led.ids]
    pd.testing.assert_frame_equal(back.values_frame(), led.values_frame())
    assert back.history == led.history


# ---------------------------------------------------------------------- file integrity
def _same_state(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for key in a:
        if isinstance(a[key], torch.Tensor):
            if not (isinstance(b[key], torch.Tensor) and a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])):
                return False
        elif type(a[key]) is not type(b[key]) or a[key] != b[key]:
            return False
    return True


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # what a flipped protocol byte makes torch say
def test_every_single_byte_flip_is_refused_or_loads_unchanged(tmp_path):
    led = _ledger.Ledger(record_steps=True)
    led.add([3, "b"], torch.tensor([[0.25, -1.5], [2.0, 0.5]], dtype=torch.float64))
    led.add(["b", 7], torch.tensor([[1.0, 1.0], [-0.125, 3.0]], dtype=torch.float64))
    led.skip("non-finite gradients (NaN/inf)")
    path = tmp_path / "run.pt"
    _ledger.atomic_save(led.state_dict({"linearization": "secant"}), path)
    original, data = _ledger.load_checked(path), path.read_bytes()
    rng = random.Random(0)
    positions = rng.sample(range(len(data)), 400)
    changed, refused = [], 0
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(flipped))
        try:
            state = _ledger.load_checked(path)
        except LedgerFileError:
            refused += 1
            continue
        if not _same_state(state, original):
            changed.append(pos)
    assert changed == [], f"{len(changed)} of {len(positions)} single-byte flips loaded with changed content"
    assert refused > len(positions) // 2  # most bytes carry content; the rest (zip padding, ...) load unchanged


def test_version_1_files_still_load_and_are_rewritten_as_version_2(tmp_path):
    tracker, model, opt = _tracker()
    version_1 = {  # a file exactly as version 1 wrote it: the bare state, no checksum, no fingerprint
        "format": "inrun-shapley-ledger",
        "version": 1,
        "config": tracker.config.as_dict(),
        "num_targets": 1,
        "record_steps": False,
        "ids": [3, "b"],
        "totals": torch.tensor([[0.25], [-0.5]], dtype=torch.float64),
        "counts": torch.tensor([1, 2]),
        "history": [],
        "steps": 2,
        "skipped": [],
    }
    tracker.close()
    torch.save(version_1, tmp_path / "v1.pt")
    resumed = InRunShapley.load(tmp_path / "v1.pt", model, opt, LOSS, VAL)
    assert resumed.steps == 2 and resumed.values()["value"].to_dict() == {3: 0.25, "b": -0.5}
    _step(resumed, model, opt, ["b", 4], range(2))
    resumed.save(tmp_path / "v2.pt")
    wrapper = torch.load(tmp_path / "v2.pt", weights_only=True)
    assert wrapper["version"] == 2 and len(wrapper["sha256"]) == 64
    again = InRunShapley.load(tmp_path / "v2.pt", model, opt, LOSS, VAL)
    pd.testing.assert_frame_equal(again.values(), resumed.values())


_KILLED_SAVE = textwrap.dedent(
    """
    import os, sys, time, torch
    from attribution._ledger import Ledger, atomic_save

    def hang(fd):  # the temporary file is written: tell the test, then wait for SIGKILL
        open(sys.argv[2], "w").close()
        time.sleep(600)

    os.fsync = hang
    led = Ledger(); led.add(["a"], torch.ones(1, 1, dtype=torch.float64))
    atomic_save(led.state_dict({}), sys.argv[1])
    """
)


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL and os.kill(pid, 0) are POSIX")
def test_no_temporary_file_remains_after_a_failed_or_killed_save(tmp_path, monkeypatch):
    folder, flag = tmp_path / "runs", tmp_path / "written"
    path = folder / "run.pt"
    tracker, model, opt = _tracker()
    _step(tracker, model, opt, [0, 1], range(2))
    tracker.save(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(path), str(flag)], cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while not flag.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.kill()  # SIGKILL: the child cannot clean up
    child.wait()
    assert flag.exists(), "the child never reached fsync"
    assert any(name.endswith(".tmp") for name in _listing(folder))  # what the kill left behind
    _step(tracker, model, opt, [2, 3], range(2, 4))
    tracker.save(path)  # the next save of the same target removes it
    assert _listing(folder) == ["run.pt"]
    before = path.read_bytes()
    for name in ("fsync", "replace"):  # in-process failures after the temporary file exists

        def fail(*args, _name=name):
            raise OSError(f"{_name} failed")

        with monkeypatch.context() as patch:
            patch.setattr(os, name, fail)
            with pytest.raises(OSError, match=f"{name} failed"):
                tracker.save(path)
        assert _listing(folder) == ["run.pt"] and path.read_bytes() == before


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664)])
def test_saved_file_permissions_follow_the_umask(tmp_path, umask, mode):
    tracker, _, _ = _tracker()
    previous = os.umask(umask)
    try:
        tracker.save(tmp_path / "run.pt")  # mkstemp made every save 0o600
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "run.pt").st_mode) == mode


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_saving_onto_a_symlink_writes_its_target_and_keeps_the_link(tmp_path):
    store, runs = tmp_path / "store", tmp_path / "runs"
    store.mkdir()
    runs.mkdir()
    link = runs / "latest.pt"
    link.symlink_to(store / "run.pt")  # dangling until the first save
    tracker, model, opt = _tracker()
    for s in range(2):
        _step(tracker, model, opt, [s, s + 1], range(s, s + 2))
        tracker.save(link)
        assert link.is_symlink() and os.readlink(link) == str(store / "run.pt")
        assert _listing(store) == ["run.pt"] and _listing(runs) == ["latest.pt"]  # temporaries in the real folder
    resumed = InRunShapley.load(store / "run.pt", model, opt, LOSS, VAL)
    pd.testing.assert_frame_equal(resumed.values(), tracker.values())


# ---------------------------------------------------------------------- the validation set
def test_val_fingerprint_tells_validation_sets_apart():
    from transformers import BatchEncoding

    fingerprint = _ledger.val_fingerprint
    x, y = X[:4].clone(), Y[:4].clone()
    base = fingerprint([(x, y)])
    assert base == fingerprint([(x.clone(), y.clone())]) == fingerprint([(x.t().contiguous().t(), y)])
    changed = x.clone()
    changed[2, 1] = torch.nextafter(changed[2, 1], torch.tensor(np.inf, dtype=torch.float64))  # one ulp
    others = [
        [(changed, y)],
        [(x.float(), y)],  # dtype
        [(x.reshape(2, 8), y)],  # shape, same bytes
        [(x, y), (x, y)],  # K
        [({"x": x}, y)],  # structure
        [(x, y.to(torch.int32))],
    ]
    assert len({base, *(fingerprint(v) for v in others)}) == len(others) + 1
    ids, mask = torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]])
    hf = fingerprint([({"input_ids": ids, "attention_mask": mask}, y[:1])])
    assert hf == fingerprint([({"attention_mask": mask, "input_ids": ids}, y[:1])])  # key order is no content
    assert hf == fingerprint([(BatchEncoding({"input_ids": ids, "attention_mask": mask}), y[:1])])
    assert hf != fingerprint([({"input_ids": ids, "attention_mask": 1 - mask}, y[:1])])
    half = x.to(torch.bfloat16)
    assert fingerprint([(half, y)]) != fingerprint([(half.clone().fill_(0), y)])


@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=12), st.data())
def test_val_fingerprint_changes_with_any_element(values, data):
    x = torch.tensor(values, dtype=torch.float64).reshape(-1, 1)
    k = data.draw(st.integers(0, len(values) - 1))
    other = data.draw(st.floats(-1e3, 1e3, allow_nan=False).filter(lambda v: v != values[k]))
    changed = x.clone()
    changed[k, 0] = other
    y = torch.zeros(len(values), dtype=torch.long)
    assert _ledger.val_fingerprint([(x, y)]) == _ledger.val_fingerprint([(x.clone(), y.clone())])
    assert _ledger.val_fingerprint([(changed, y)]) != _ledger.val_fingerprint([(x, y)])


def test_check_same_validation_refuses_another_fingerprint(tmp_path):
    led = _ledger.Ledger()
    led.add([0], torch.ones(1, 1, dtype=torch.float64))
    saved = _ledger.val_fingerprint([VAL])
    _ledger.atomic_save(led.state_dict({}, val_fingerprint=saved), tmp_path / "run.pt")
    state = _ledger.load_checked(tmp_path / "run.pt")
    assert state["val_fingerprint"] == saved
    _ledger.check_same_validation(state, _ledger.val_fingerprint([(VAL[0].clone(), VAL[1].clone())]), tmp_path / "run.pt")
    other = _ledger.val_fingerprint([(X[:6], Y[:6])])
    message = (
        rf"run.pt': the saved run was measured on a different validation set \(fingerprint {saved[:16]}\.\.\. != "
        rf"{other[:16]}\.\.\.\); pass the same val_batch to resume, or start a new tracker"
    )
    with pytest.raises(ValueError, match=message):
        _ledger.check_same_validation(state, other, tmp_path / "run.pt")
    _ledger.check_same_validation({}, other, tmp_path / "run.pt")  # a version-1 file has no fingerprint


def test_load_refuses_a_different_validation_set_of_the_same_size(tmp_path):
    tracker, model, opt = _tracker()
    _step(tracker, model, opt, [0, 1], range(2))
    tracker.save(tmp_path / "run.pt")
    with pytest.raises(ValueError, match="measured on a different validation set"):
        InRunShapley.load(tmp_path / "run.pt", model, opt, LOSS, (X[:6], Y[:6]))
    resumed = InRunShapley.load(tmp_path / "run.pt", model, opt, LOSS, (VAL[0].clone(), VAL[1].clone()))
    pd.testing.assert_frame_equal(resumed.values(), tracker.values())

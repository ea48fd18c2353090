"""InRunShapleyCallback inside a real lightning.Trainer (CPU, float64 MLP LightningModule).

Every value test compares the callback's per-step values with an independent computation on the
same batches: ``step_values`` before each step of a plain loop, or a plain PyTorch loop with its
own ``InRunShapley`` (for accumulation and clipping, which ``step_values`` does not model).
"""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

L = pytest.importorskip("lightning")

from attribution import InRunShapley, TrackerUsageError, step_values  # noqa: E402
from attribution.lightning import InRunShapleyCallback  # noqa: E402
from tests._helpers import assert_close  # noqa: E402

LOSS = nn.functional.cross_entropy
_GEN = torch.Generator().manual_seed(0)
X = torch.randn(48, 4, generator=_GEN, dtype=torch.float64)
Y = torch.randint(0, 3, (48,), generator=_GEN)
VAL = (X[:8], Y[:8])
OFFSET = 8  # dataset row i is X[OFFSET + i]
TRAIN = TensorDataset(X[OFFSET:], Y[OFFSET:])  # 40 rows: 8 batches of 5 per epoch
BATCH = 5


@pytest.fixture(autouse=True)
def _quiet():
    # Lightning's advice (num_workers, logging) is noise here; the library's own warnings are not silenced.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"lightning\..*")
        warnings.filterwarnings("ignore", message=r".*(num_workers|LeafSpec|does not have many workers).*")
        yield


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def _momentum(params):
    return torch.optim.SGD(params, lr=5e-2, momentum=0.9)


class MLP(L.LightningModule):
    """An MLP classifier; ``manual=True`` steps itself every ``accumulate`` batches."""

    def __init__(self, make_opt=_adam, *, manual=False, accumulate=1, skip=()):
        super().__init__()
        self.net = _net()
        self.make_opt = make_opt
        self.automatic_optimization = not manual
        self.accumulate = accumulate
        self.skip = set(skip)  # batch indices whose training_step returns None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        if batch_idx in self.skip:
            return None
        loss = LOSS(self(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss / self.accumulate)
        if (batch_idx + 1) % self.accumulate == 0:
            opt.step()
            opt.zero_grad()
        return loss

    def configure_optimizers(self):
        return self.make_opt(self.parameters())


class Rows(Dataset):
    """Dict rows carrying their own id (``1000 + i``), for shuffled loaders."""

    def __len__(self):
        return len(TRAIN)

    def __getitem__(self, i):
        return {"x": X[OFFSET + i], "y": Y[OFFSET + i], "sample_id": 1000 + i}


def _trainer(callbacks=(), max_steps=4, **kw):
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kw,
    )


def _loader(**kw):
    return DataLoader(TRAIN, batch_size=BATCH, **kw)


def _positions(batch_number):
    """Dataset positions of the ``batch_number``-th batch of a run over the unshuffled loader."""
    k = batch_number % (len(TRAIN) // BATCH)
    return list(range(BATCH * k, BATCH * k + BATCH))


def _reference(make_opt, steps, *, accumulate=1, clip=None, ids=lambda pos: pos, **options):
    """A plain PyTorch loop with its own tracker: ``steps`` is a list of steps, each a list of micro-batch positions."""
    model = _net()
    opt = make_opt(model.parameters())
    tracker = InRunShapley(model, opt, LOSS, VAL, record_steps=True, **options)
    for micro_batches in steps:
        opt.zero_grad()
        for pos in micro_batches:
            rows = [OFFSET + p for p in pos]
            with tracker.batch(ids(pos)):
                # Lightning divides each micro-batch's loss by accumulate_grad_batches.
                (LOSS(model(X[rows]), Y[rows]) / accumulate).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    tracker.close()
    return model, tracker


def _assert_same_history(callback, tracker, steps):
    got, want = callback.history(), tracker.history()
    assert got["step"].nunique() == steps, f"the callback valued {got['step'].nunique()} steps, expected {steps}"
    assert list(got["id"]) == list(want["id"]) and list(got["step"]) == list(want["step"])
    assert_close(torch.tensor(got["value"].to_numpy()), torch.tensor(want["value"].to_numpy()), rtol=1e-10, atol=1e-14)
    assert got["value"].abs().max() > 0


def _assert_same_weights(module, model):
    for (name, p), q in zip(module.net.named_parameters(), model.parameters()):
        assert torch.equal(p, q), f"{name}: the Lightning run and the reference loop trained differently"


def test_automatic_optimization_equals_step_values_at_every_step():
    steps = 10  # 8 batches per epoch: crosses into the second epoch (batch_idx restarts at 0)
    callback = InRunShapleyCallback(VAL, LOSS, record_steps=True)
    module = MLP(_adam)
    _trainer([callback], max_steps=steps).fit(module, _loader())

    # Independent of the tracker: step_values on a plain loop's model/optimizer at the same state.
    model = _net()
    opt = _adam(model.parameters())
    expected = []
    for t in range(steps):
        rows = [OFFSET + p for p in _positions(t)]
        expected.append(step_values(model, opt, LOSS, (X[rows], Y[rows]), VAL, route="auto", seed=t))  # the tracker's default
        opt.zero_grad()
        LOSS(model(X[rows]), Y[rows]).backward()
        opt.step()
    history = callback.history()
    assert list(history["id"]) == [p for t in range(steps) for p in _positions(t)]
    assert_close(torch.tensor(history["value"].to_numpy()), torch.cat(expected), rtol=1e-10, atol=1e-14)
    _assert_same_weights(module, model)
    totals = callback.values()
    assert len(totals) == len(TRAIN) and int(totals["steps_seen"].sum()) == steps * BATCH


def test_gradient_accumulation_is_one_step_valued_exactly():
    steps = 6  # 12 micro-batches: 1.5 epochs
    callback = InRunShapleyCallback(VAL, LOSS, record_steps=True)
    module = MLP(_adam)
    _trainer([callback], max_steps=steps, accumulate_grad_batches=2).fit(module, _loader())
    model, tracker = _reference(_adam, [[_positions(2 * t), _positions(2 * t + 1)] for t in range(steps)], accumulate=2)
    _assert_same_weights(module, model)
    _assert_same_history(callback, tracker, steps)
    assert set(callback.history().groupby("step")["id"].count()) == {2 * BATCH}


def test_gradient_clipping_by_norm_is_valued_as_taken():
    steps, clip = 4, 0.05
    callback = InRunShapleyCallback(VAL, LOSS, record_steps=True, linearization="tangent", val_point="lookahead")
    module = MLP(_adam)
    _trainer([callback], max_steps=steps, gradient_clip_val=clip, accumulate_grad_batches=2).fit(module, _loader())
    model, tracker = _reference(
        _adam, [[_positions(2 * t), _positions(2 * t + 1)] for t in range(steps)], accumulate=2, clip=clip,
        linearization="tangent", val_point="lookahead",
    )
    _assert_same_weights(module, model)
    _assert_same_history(callback, tracker, steps)
    assert callback.tracker.last_grad_scale < 1.0  # the clip did clip: the test exercises the rescale


def test_manual_optimization_with_accumulation():
    steps = 4
    callback = InRunShapleyCallback(VAL, LOSS, record_steps=True)
    module = MLP(_momentum, manual=True, accumulate=2)
    _trainer([callback], max_steps=steps).fit(module, _loader())
    model, tracker = _reference(_momentum, [[_positions(2 * t), _positions(2 * t + 1)] for t in range(steps)], accumulate=2)
    _assert_same_weights(module, model)
    _assert_same_history(callback, tracker, steps)


def test_a_micro_batch_whose_training_step_returns_none_is_left_out_exactly():
    steps = 3
    callback = InRunShapleyCallback(VAL, LOSS, record_steps=True)
    module = MLP(_adam, skip={1, 4})  # Lightning skips these batches' backward
    _trainer([callback], max_steps=steps, accumulate_grad_batches=2).fit(module, _loader())
    micro = [[_positions(b) for b in (2 * t, 2 * t + 1) if b not in {1, 4}] for t in range(steps)]
    model, tracker = _reference(_adam, micro, accumulate=2)
    _assert_same_weights(module, model)
    _assert_same_history(callback, tracker, steps)


def test_ids_from_a_batch_key_follow_the_shuffled_rows():
    steps = 4
    callback = InRunShapleyCallback(VAL, LOSS, record_steps=True)
    module = MLP(_adam)
    torch.manual_seed(1)
    _trainer([callback], max_steps=steps).fit(module, DataLoader(Rows(), batch_size=BATCH, shuffle=True))
    history = callback.history()
    order = [[i - 1000 for i in history[history["step"] == t]["id"]] for t in range(steps)]
    assert order[0] != _positions(0)  # shuffled: positions would have been wrong ids
    # The values are those of the rows the ids name, so the ids follow the rows.
    model, tracker = _reference(_adam, [[pos] for pos in order], ids=lambda pos: [1000 + p for p in pos])
    _assert_same_weights(module, model)
    _assert_same_history(callback, tracker, steps)


def test_ids_fn_gives_the_ids():
    callback = InRunShapleyCallback(VAL, LOSS, record_steps=True, ids_fn=lambda batch, i: [f"b{i}r{r}" for r in range(len(batch[1]))])
    _trainer([callback], max_steps=2).fit(MLP(_adam), _loader())
    assert list(callback.values().index) == [f"b{i}r{r}" for i in range(2) for r in range(BATCH)]
    model, tracker = _reference(_adam, [[_positions(t)] for t in range(2)], ids=lambda pos: [f"b{pos[0] // BATCH}r{p % BATCH}" for p in pos])
    _assert_same_history(callback, tracker, 2)


def test_model_fn_runs_the_validation_forward():
    calls = []

    def model_fn(module, inputs):
        calls.append(inputs.shape)
        return module.net(inputs)

    callback = InRunShapleyCallback(VAL, LOSS, record_steps=True, model_fn=model_fn)
    _trainer([callback], max_steps=2).fit(MLP(_adam), _loader())
    _, tracker = _reference(_adam, [[_positions(t)] for t in range(2)])
    _assert_same_history(callback, tracker, 2)
    assert calls and all(shape == VAL[0].shape for shape in calls)


def test_the_validation_batch_is_converted_as_lightning_converts_training_batches():
    # precision="64-true" casts training batches to float64; a float32 val_batch must be cast the same way.
    val32 = (VAL[0].float(), VAL[1])
    callback = InRunShapleyCallback(val32, LOSS, record_steps=True)
    _trainer([callback], max_steps=2, precision="64-true").fit(MLP(_adam), _loader())
    model = _net()
    opt = _adam(model.parameters())
    tracker = InRunShapley(model, opt, LOSS, (val32[0].double(), val32[1]), record_steps=True)
    for t in range(2):
        rows = [OFFSET + p for p in _positions(t)]
        opt.zero_grad()
        with tracker.batch(_positions(t)):
            LOSS(model(X[rows]), Y[rows]).backward()
        opt.step()
    _assert_same_history(callback, tracker, 2)

def test_training_is_bit_identical_with_the_callback():
    plain, tracked = MLP(_adam), MLP(_adam)
    callback = InRunShapleyCallback(VAL, LOSS)
    _trainer(max_steps=6, gradient_clip_val=0.5, accumulate_grad_batches=2).fit(plain, _loader())
    trainer = _trainer([callback], max_steps=6, gradient_clip_val=0.5, accumulate_grad_batches=2)
    trainer.fit(tracked, _loader())
    assert callback.tracker.steps == 6 and int(callback.values()["steps_seen"].sum()) == 6 * 2 * BATCH
    for (name, p), q in zip(plain.named_parameters(), tracked.parameters()):
        assert torch.equal(p, q), f"{name} differs with the callback attached"
    opt = trainer.optimizers[0]
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks  # removed at on_fit_end


# ---------------------------------------------------------------------- refusals
def _refused(callback, module, loader=None, match="", **trainer_kw):
    trainer = _trainer([callback], **trainer_kw)
    with pytest.raises(TrackerUsageError, match=match):
        trainer.fit(module, loader if loader is not None else _loader())
    for opt in trainer.optimizers:  # on_exception removed every hook
        assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    return trainer


def test_rows_without_ids_are_refused_saying_how_to_give_them():
    callback = InRunShapleyCallback(VAL, LOSS)
    _refused(callback, MLP(), _loader(shuffle=True), match=r"RandomSampler \(shuffle=True\).*'sample_id'.*ids_fn")


def test_a_batch_that_loses_its_id_key_is_refused():
    def collate(rows):
        batch = torch.utils.data.default_collate(rows)
        if int(batch["sample_id"][0]) >= 1000 + 2 * BATCH:
            del batch["sample_id"]  # the third batch on has no ids
        return batch

    callback = InRunShapleyCallback(VAL, LOSS)
    _refused(callback, MLP(), DataLoader(Rows(), batch_size=BATCH, collate_fn=collate), match=r"training batch 2 has no 'sample_id' entry")
    assert callback.tracker.steps == 2  # the steps before the refusal are kept


def test_value_clipping_is_refused():
    _refused(InRunShapleyCallback(VAL, LOSS), MLP(), match=r"gradient_clip_algorithm='norm'", gradient_clip_val=0.1, gradient_clip_algorithm="value")


def test_two_optimizers_are_refused():
    class Two(MLP):
        def configure_optimizers(self):
            return _adam(self.net[0].parameters()), _adam(self.net[2].parameters())

    _refused(InRunShapleyCallback(VAL, LOSS), Two(manual=True), match=r"tracks one optimizer, but configure_optimizers\(\) returned 2")


def test_two_manual_steps_in_one_training_step_are_refused():
    class Twice(MLP):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            for _ in range(2):  # two steps on the same batch
                opt.zero_grad()
                self.manual_backward(LOSS(self(batch[0]), batch[1]))
                opt.step()

    _refused(InRunShapleyCallback(VAL, LOSS), Twice(manual=True), match=r"called optimizer.step\(\) twice for batch 0")


def test_a_step_without_any_backward_is_refused():
    _refused(InRunShapleyCallback(VAL, LOSS), MLP(skip={0}), match=r"step 0 has no samples: no training batch of the step reached a backward")



def test_a_manual_backward_that_bypasses_lightning_is_refused():
    class Direct(MLP):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            LOSS(self(batch[0]), batch[1]).backward()  # not self.manual_backward: Lightning cannot see it
            opt.step()

    _refused(InRunShapleyCallback(VAL, LOSS), Direct(manual=True), match=r"step 0 has no samples.*self.manual_backward")

def test_a_resumed_fit_with_position_ids_is_refused(tmp_path):
    first = _trainer(max_steps=2)
    first.fit(MLP(), _loader())
    first.save_checkpoint(tmp_path / "ckpt.pt")
    trainer = _trainer([InRunShapleyCallback(VAL, LOSS)], max_steps=4)
    with pytest.raises(TrackerUsageError, match=r"resumes from a checkpoint"):
        trainer.fit(MLP(), _loader(), ckpt_path=tmp_path / "ckpt.pt")


def test_a_second_fit_is_refused_and_the_first_values_stay():
    callback = InRunShapleyCallback(VAL, LOSS)
    module = MLP()
    _trainer([callback], max_steps=2).fit(module, _loader())
    first = callback.values().copy()
    _refused(callback, module, match=r"already ran a fit\(\)", max_steps=4)
    assert callback.values().equals(first) and len(first) == 2 * BATCH


def test_an_exception_in_training_closes_the_tracker_and_keeps_the_values():
    class Fails(MLP):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    callback = InRunShapleyCallback(VAL, LOSS)
    trainer = _trainer([callback], max_steps=6)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Fails(), _loader())
    assert callback.tracker.steps == 3 and len(callback.values()) == 3 * BATCH
    assert not trainer.optimizers[0]._optimizer_step_pre_hooks
    with pytest.raises(TrackerUsageError, match="closed"):
        with callback.tracker.batch([0]):
            pass


def test_bad_options_are_refused_when_the_callback_is_created():
    with pytest.raises(ValueError, match="later"):
        InRunShapleyCallback(VAL, LOSS, linearization="later")



def test_a_fit_resumed_from_a_checkpoint_continues_the_values(tmp_path):
    """Lightning saves the callback's ledger in its checkpoints; fit(ckpt_path=...) continues the totals."""
    def fit(max_steps, ckpt_path=None, checkpoint=None):
        callback = InRunShapleyCallback(VAL, LOSS, record_steps=True)
        callbacks = [callback] + ([checkpoint] if checkpoint is not None else [])
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=checkpoint is not None,
            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=str(tmp_path),
        )
        torch.manual_seed(0)
        trainer.fit(MLP(), DataLoader(Rows(), batch_size=BATCH), ckpt_path=ckpt_path)
        return callback

    full = fit(4)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    fit(2, checkpoint=saver)
    ckpt = sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1]
    resumed = fit(4, ckpt_path=str(ckpt))
    assert full.tracker.steps == resumed.tracker.steps == 4
    # The checkpoint's two steps are in the resumed ledger exactly as the uninterrupted run valued them
    # (Lightning restarts a plain DataLoader's epoch on resume, so the later batches may differ).
    a, b = full.history(), resumed.history()
    a, b = a[a.step < 2], b[b.step < 2]
    assert list(a["id"]) == list(b["id"]) and len(a) == 2 * BATCH
    assert_close(torch.tensor(b["value"].to_numpy()), torch.tensor(a["value"].to_numpy()), rtol=1e-12, atol=1e-15)
    assert int(resumed.values()["steps_seen"].sum()) == 4 * BATCH

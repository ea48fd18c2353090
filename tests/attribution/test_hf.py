"""InRunShapleyCallback inside transformers.Trainer, on a tiny BERT built from a config (offline)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from attribution import step_values  # noqa: E402
from attribution.hf import InRunShapleyCallback, KwargsModel, model_loss  # noqa: E402
from tests._helpers import assert_close  # noqa: E402


KEYS = ("input_ids", "attention_mask", "position_ids", "labels")


def _tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def _rows(n=16, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, 40, (length,), generator=g)
        real = int(torch.randint(3, length + 1, (1,), generator=g))
        mask = (torch.arange(length) < real).long()
        # Explicit per-row position_ids (optional: the engine also expands BERT's default
        # broadcast [1, T] ids, see tests/reliability/test_hf_models.py).
        rows.append({"input_ids": ids * mask, "attention_mask": mask, "position_ids": torch.arange(length),
                     "labels": int(i % 2), "sample_id": 100 + i})
    return rows


def _val():
    rows = _rows(6, seed=1)
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in KEYS}


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
        remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        lr_scheduler_type="constant", seed=0, **kw,
    )


def test_callback_first_step_equals_step_values(tmp_path):
    model = _tiny_bert()
    initial = copy.deepcopy(model)
    callback = InRunShapleyCallback(_val(), record_steps=True)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_grad_norm=0.0), train_dataset=_rows(), callbacks=[callback])
    trainer.train()
    values = callback.values()
    assert len(values) == 12 and torch.isfinite(torch.tensor(values["value"].to_numpy())).all()
    hist = callback.history()
    first = hist[hist.step == 0]
    rows = {r["sample_id"]: r for r in _rows()}
    batch = {k: torch.stack([torch.as_tensor(rows[i][k]) for i in first["id"]]) for k in KEYS}
    wrapped = KwargsModel(initial)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3, weight_decay=0.0)
    expected = step_values(wrapped, opt, model_loss, (batch, None), (_val(), None))
    assert_close(torch.tensor(first["value"].to_numpy()), expected, rtol=1e-4, atol=1e-9)


def test_callback_takes_over_clipping_and_restores_args(tmp_path):
    args = _args(tmp_path, max_grad_norm=0.01)
    callback = InRunShapleyCallback(_val())
    trainer = transformers.Trainer(model=_tiny_bert(), args=args, train_dataset=_rows(), callbacks=[callback])
    trainer.train()
    assert args.max_grad_norm == 0.01
    assert callback.tracker.steps == 3 and not callback.tracker.skipped_steps


def test_missing_id_column_is_an_error(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "sample_id"} for r in _rows()]
    trainer = transformers.Trainer(model=_tiny_bert(), args=_args(tmp_path), train_dataset=rows, callbacks=[InRunShapleyCallback(_val())])
    with pytest.raises(Exception, match="no 'sample_id' column"):
        trainer.train()


def test_validation_batch_without_labels_is_refused():
    with pytest.raises(ValueError, match="including 'labels'"):
        InRunShapleyCallback({"input_ids": torch.zeros(2, 3, dtype=torch.long)})

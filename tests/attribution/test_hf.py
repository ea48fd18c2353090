"""InRunShapleyCallback inside transformers.Trainer, on a tiny BERT built from a config (offline)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from attribution import step_values  # noqa: E402
from attribution.hf import InRunShapleyCallback, KwargsModel, model_loss, with_ids  # noqa: E402
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
    expected = step_values(wrapped, opt, model_loss, (batch, None), (_val(), None), route="auto")  # the tracker's default
    assert_close(torch.tensor(first["value"].to_numpy()), expected, rtol=1e-4, atol=1e-9)


def test_trainer_clipping_is_valued_by_the_tracker_and_args_are_untouched(tmp_path):
    args = _args(tmp_path, max_grad_norm=0.01)
    callback = InRunShapleyCallback(_val())
    trainer = transformers.Trainer(model=_tiny_bert(), args=args, train_dataset=_rows(), callbacks=[callback])
    trainer.train()
    assert args.max_grad_norm == 0.01
    assert callback.tracker.steps == 3 and not callback.tracker.skipped_steps
    assert callback.tracker.last_grad_scale < 1.0  # the Trainer's own clip was measured and valued


def _stock(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=24, max_position_embeddings=16, num_labels=2)
        return transformers.BertForSequenceClassification(config)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def _stock_rows(kind: str, n=16, length=8):
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        ids = torch.randint(1, 40, (length,), generator=g)
        labels = int(i % 2) if kind == "bert" else ids.clone()
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels})
    return rows


@pytest.mark.parametrize("kind,bf16", [("bert", False), ("gpt2", False), ("llama", False), ("gpt2", True), ("llama", True)])
def test_stock_models_train_with_trainer_defaults_accumulation_and_no_position_ids(tmp_path, kind, bf16):
    """Dropout as configured, max_grad_norm=1.0, gradient accumulation, no position_ids, ids from with_ids, bf16 autocast."""
    rows = _stock_rows(kind)
    val = {k: torch.stack([torch.as_tensor(r[k]) for r in _stock_rows(kind, n=4)]) for k in ("input_ids", "attention_mask", "labels")}
    callback = InRunShapleyCallback(val, record_steps=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=0, bf16=bf16,
    )
    trainer = transformers.Trainer(model=_stock(kind), args=args, train_dataset=with_ids(rows), callbacks=[callback])
    trainer.train()
    hist = callback.history()
    assert callback.tracker.steps == 2 and not callback.tracker.skipped_steps
    assert hist.groupby("step")["id"].count().tolist() == [8, 8]  # two micro-batches of 4 per step
    assert set(hist["id"]) <= set(range(16)) and torch.isfinite(torch.tensor(hist["value"].to_numpy())).all()
    assert callback.tracker.fallback_modules == [] and "fallback" not in callback.tracker.paths_taken.values()


def test_resume_from_checkpoint_continues_the_values(tmp_path):
    def run(out, resume=None, max_steps=4):
        callback = InRunShapleyCallback(_val(), record_steps=True)
        args = transformers.TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps, learning_rate=1e-3,
            remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2,
            logging_strategy="no", lr_scheduler_type="constant", seed=0,
        )
        trainer = transformers.Trainer(model=_tiny_bert(), args=args, train_dataset=_rows(), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return callback

    full = run(tmp_path / "full")
    interrupted = run(tmp_path / "cut", max_steps=2)
    assert (tmp_path / "cut" / "checkpoint-2" / "inrun_shapley.pt").exists()
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert interrupted.tracker.steps == 2 and resumed.tracker.steps == 4
    a, b = full.values().sort_index(), resumed.values().sort_index()
    assert list(a.index) == list(b.index) and (a["steps_seen"] == b["steps_seen"]).all()
    assert_close(torch.tensor(b["value"].to_numpy()), torch.tensor(a["value"].to_numpy()), rtol=1e-5, atol=1e-9)


def test_a_crashed_train_leaves_no_hook_behind_once_closed(tmp_path):
    model = _tiny_bert()
    callback = InRunShapleyCallback(_val())
    rows = _rows()
    rows[5] = {k: v for k, v in rows[5].items() if k != "labels"}  # the collator fails on this batch
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=rows, callbacks=[callback])
    with pytest.raises(Exception):
        trainer.train()
    callback.close()
    assert not model._forward_pre_hooks and callback.tracker._closed


def test_missing_id_column_is_an_error(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "sample_id"} for r in _rows()]
    trainer = transformers.Trainer(model=_tiny_bert(), args=_args(tmp_path), train_dataset=rows, callbacks=[InRunShapleyCallback(_val())])
    with pytest.raises(Exception, match="no 'sample_id' column: wrap the dataset in attribution.hf.with_ids"):
        trainer.train()


def test_validation_batch_without_labels_is_refused():
    with pytest.raises(ValueError, match="including 'labels'"):
        InRunShapleyCallback({"input_ids": torch.zeros(2, 3, dtype=torch.long)})


def test_peft_lora_on_a_stock_model_is_valued_through_the_linear_rule(tmp_path):
    """PEFT LoRA adapters (trainable nn.Linear lora_A / lora_B inside peft's wrapper, base frozen) on GPT-2."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_stock("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    rows = _stock_rows("llama")
    val = {k: torch.stack([torch.as_tensor(r[k]) for r in _stock_rows("llama", n=4)]) for k in ("input_ids", "attention_mask", "labels")}
    callback = InRunShapleyCallback(val, record_steps=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, remove_unused_columns=False, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", seed=0, learning_rate=1e-3,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=with_ids(rows), callbacks=[callback])
    trainer.train()
    paths = callback.tracker.paths_taken
    assert paths and all("lora_" in name for name in paths)  # only the adapters are trained and valued
    assert set(paths.values()) == {"dense"} and callback.tracker.steps == 2 and not callback.tracker.skipped_steps
    assert torch.isfinite(torch.tensor(callback.history()["value"].to_numpy())).all()


def test_streamed_callback_equals_the_unstreamed_one(tmp_path):
    def run(stream):
        # route="linear" on both: a streamed step cannot switch to the exact-update route.
        callback = InRunShapleyCallback(_val(), val_point="current", stream=stream, record_steps=True, route="linear")
        args = _args(tmp_path / str(stream), max_grad_norm=0.0)
        transformers.Trainer(model=_tiny_bert(), args=args, train_dataset=_rows(), callbacks=[callback]).train()
        return callback

    plain, streamed = run(False), run(True)
    assert streamed.tracker.stream and streamed.tracker.steps == 3
    a, b = plain.values().sort_index(), streamed.values().sort_index()
    assert_close(torch.tensor(b["value"].to_numpy()), torch.tensor(a["value"].to_numpy()), rtol=1e-5, atol=1e-10)

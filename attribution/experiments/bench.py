"""Throughput and peak memory of in-run attribution against plain AdamW training.

``python -m attribution bench [--quick] [--json PATH] [--model gpt|mlp] [size options]`` trains
the same model (same initial weights, same batches, same number of steps) in each mode:

* ``plain`` -- AdamW without attribution (the baseline);
* ``ghost-factored``, ``ghost``, ``materialized`` -- ``InRunShapley(..., estimator=mode)``
  with the tracker's defaults (secant linearization, midpoint validation point);
* ``ghost-factored-streamed``, ``ghost-streamed`` -- the same estimators with
  ``InRunShapley(..., val_point="current", stream=True)``: the validation gradient is taken
  before the forward and each layer is contracted inside the backward pass, so the captured
  activations are released there (the paper's first-order form, ∇L_val at θ_t).

Throughput: the modes are interleaved in one process, round by round (A B C D, then D C B A,
...), so that machine noise hits every mode alike; samples/s is the total over the timed
rounds, and every attribution step includes its extra validation forward and backward. Peak
memory: one fresh subprocess per mode (``--worker MODE``, hidden) trains a few steps and reports
its peak resident set size on CPU or ``torch.cuda.max_memory_allocated`` on CUDA. Both are given
as ratios to the baseline of the same run. ``--json`` writes::

    {"device": ..., "model": ..., "modes": {"<mode>": {"throughput_ratio": x, "memory_ratio": y,
                                                         "samples_per_s": ..., "peak_mb": ...}}}

(plus the configuration, the machine and per-mode details: steps trained, losses, per-round
ratios and ``round_ratio_spread``, their largest distance from their median). A mode whose
per-round ratios spread more than ±0.1, or whose ratio exceeds 1.05 (faster than plain training),
is reported as ``noise (spread ±x)`` with a warning, not as a target met or missed. ``--quick`` is
a tiny configuration that finishes in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from attribution import InRunShapley
from attribution.experiments._report import markdown_table
from attribution.experiments.models import TinyLM, bench_cnn, lm_loss, mlp

#: Baseline first; then the tracker's estimators; then the streamed variants.
MODES = ("plain", "ghost-factored", "ghost", "materialized", "ghost-factored-streamed", "ghost-streamed")
#: Modes run only when asked for with ``--modes``: ``ghost-audit`` is ``ghost`` with the online audit
#: at every step (``audit_every=1``, ``audit_samples=8``), the audit's cost at its most frequent;
#: ``ghost-eager`` / ``ghost-compiled`` are ``ghost`` with ``compile=False`` / ``True`` (the optimizer's
#: formulas unfused or fused, whatever ``compile="auto"`` picks for the model: what fusing saves and costs).
#: ``ghost-predicted-streamed`` streams with the second-order ``val_point="predicted"`` (the midpoint
#: with the batch gradient replaced by AdamW's bias-corrected first moment).
#: ``lean-streamed`` (``--model mlp`` only) is ``attribution.experiments.lean``: the streamed estimator's
#: arithmetic alone (∇L_val, AdamW's secant, the per-sample contraction), with none of the toolkit's
#: checks, diagnostics or bookkeeping: what ``ghost-streamed`` would cost if it added nothing.
EXTRA_MODES = ("ghost-audit", "ghost-eager", "ghost-compiled", "ghost-predicted-streamed", "opacus-ghost", "lean-streamed")
#: A peer timed in the same interleaved run (``--peers``, when Opacus is installed): Opacus's ghost
#: clipping (per-sample gradient norms from the same kind of layer hooks, max_grad_norm 1, no noise).
PEER_MODES = ("opacus-ghost",)
#: Re-implementations timed for reference, not the toolkit (no completeness check, no route).
LEAN = "lean-streamed"
AUDIT = "-audit"
EAGER = "-eager"
COMPILED = "-compiled"
BASELINE = "plain"
STREAMED = "-streamed"
PREDICTED = "-predicted"
#: (min throughput ratio, max memory ratio) targets per model kind and mode (the performance issues:
#: the default mode and its streamed variant; memory ≤ 1.05 of plain training for both).
TARGETS = {
    "mlp": {"ghost": (0.55, 1.05), "ghost-streamed": (0.60, 1.05)},
    "cnn": {"ghost": (0.55, 1.05), "ghost-streamed": (0.60, 1.05)},
    "gpt": {"ghost": (0.70, 1.05), "ghost-streamed": (0.72, 1.05)},
    "hf-gpt2": {"ghost": (0.70, 1.05), "ghost-streamed": (0.72, 1.05)},
    "minilm": {"ghost": (0.50, 1.05), "ghost-streamed": (0.55, 1.05)},
}


def target_of(mode: str, model: str = "gpt") -> tuple[float, float] | None:
    """The (throughput, memory) target of ``mode`` on ``model``, or ``None``."""
    return TARGETS.get(model, {}).get(mode)


#: A run whose per-round throughput ratios of a mode lie further than this from their median,
#: or where a tracked mode's ratio exceeds MAX_RATIO, measured the machine, not the mode: its
#: targets are reported as noise, not as met or missed.
MAX_SPREAD = 0.1
#: At most this many untimed steps after the warm-up wait for the exact-update route to end.
MAX_EXACT_PHASE = 50
#: A tracked step does all of plain training's work and more; a ratio above 1 is timing noise.
MAX_RATIO = 1.05

#: Default sizes per model kind, and the ``--quick`` overrides.
DEFAULTS = {
    "gpt": dict(vocab=1024, width=128, depth=4, heads=4, seq_len=128, batch=64, val_batch=8),
    "mlp": dict(d_in=256, width=512, depth=2, classes=10, batch=256, val_batch=32),
    # images 3 × d_in × d_in, ``width`` channels in the first convolution
    "cnn": dict(d_in=32, width=32, classes=10, batch=128, val_batch=16),
}
#: Stock Hugging Face decoders built from configs at the hand-built decoder's sizes (dropout off, tied
#: embeddings), to compare the ghost rules of transformers' layers with the hand-built ones.
LANGUAGE_MODELS = ("gpt", "hf-gpt2", "hf-llama")
DEFAULTS.update({name: dict(DEFAULTS["gpt"]) for name in LANGUAGE_MODELS[1:]})
#: Fine-tuning the pretrained all-MiniLM-L6-v2 (bundled weights, 22.7M parameters, half of them the
#: 30,522-row token-embedding table) with a linear head on Rotten Tomatoes sentences, AdamW lr 2e-5.
PRETRAINED = ("minilm",)
DEFAULTS["minilm"] = dict(seq_len=64, batch=16, val_batch=4, lr=2e-5)
QUICK = {
    "gpt": dict(vocab=256, width=32, depth=2, heads=2, seq_len=32, batch=16, val_batch=4, rounds=2, steps=2, memory_steps=2),
    "mlp": dict(d_in=32, width=64, depth=2, classes=10, batch=64, val_batch=16, rounds=2, steps=2, memory_steps=2),
    "cnn": dict(d_in=8, width=4, classes=10, batch=16, val_batch=4, rounds=2, steps=2, memory_steps=2),
}
QUICK.update({name: dict(QUICK["gpt"]) for name in LANGUAGE_MODELS[1:]})
QUICK["minilm"] = dict(seq_len=16, batch=4, val_batch=2, rounds=2, steps=1, memory_steps=2)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration (saved in the JSON next to the results).

    Attributes:
        model: ``"gpt"`` (a GPT-2-style decoder, :class:`TinyLM` with tied embeddings) or ``"mlp"``.
        vocab, width, depth, heads, seq_len: the decoder's sizes (``width``/``depth`` are the
            hidden size and the number of hidden layers for the MLP).
        d_in, classes: the MLP's input size and number of classes.
        batch: training sequences (samples) per step, one micro-batch.
        val_batch: validation sequences (samples) per validation target.
        val_targets: K, the number of validation batches (value columns).
        rounds, steps, warmup: timed rounds, steps per mode per round, untimed steps per mode first.
        memory_steps: steps each memory worker trains.
        modes: the modes to run; the baseline ``plain`` is always included.
        device: ``"cpu"`` or ``"cuda"``.
        threads: ``torch.set_num_threads`` (``None``: torch's default).
        flush_denormal: ``torch.set_flush_denormal(True)`` in every mode (the default decoder's logit
            gradients are 42 % subnormal at step 1, which made its plain step 2–3× slower on x86).
        lr, seed: AdamW learning rate (weight decay 0.01) and the seed of weights and data.
    """

    model: str = "gpt"
    vocab: int = 1024
    width: int = 128
    depth: int = 4
    heads: int = 4
    seq_len: int = 128
    d_in: int = 256
    classes: int = 10
    batch: int = 64
    val_batch: int = 8
    val_targets: int = 1
    rounds: int = 4
    steps: int = 2
    warmup: int = 1
    memory_steps: int = 2
    modes: tuple[str, ...] = MODES
    device: str = "cpu"
    threads: int | None = None
    flush_denormal: bool = True
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if self.model not in DEFAULTS:
            raise ValueError(f"model={self.model!r} is not supported; accepted values: {', '.join(map(repr, DEFAULTS))}")
        accepted = (*MODES, *EXTRA_MODES)
        unknown = [m for m in self.modes if m not in accepted]
        if unknown:
            raise ValueError(f"mode {unknown[0]!r} is not supported; accepted values: {', '.join(map(repr, accepted))}")
        if LEAN in self.modes and self.model != "mlp":
            raise ValueError(f"mode {LEAN!r} is implemented for --model mlp only (nn.Linear layers), not {self.model!r}")
        modes = (BASELINE, *(m for m in accepted if m in self.modes and m != BASELINE))
        object.__setattr__(self, "modes", modes)
        for name in ("batch", "val_batch", "val_targets", "rounds", "steps", "memory_steps", "width", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")

    @property
    def total_steps(self) -> int:
        """Steps every mode trains in the throughput run."""
        return self.warmup + self.rounds * self.steps


# ---------------------------------------------------------------------- the workload
class Workload:
    """Model, AdamW, optional tracker and the fixed batch sequence of one mode."""

    def __init__(self, cfg: BenchConfig, mode: str):
        self.cfg, self.mode = cfg, mode
        device = torch.device(cfg.device)
        self.model = build_model(cfg).to(device)
        self.loss_fn = lm_loss if cfg.model in LANGUAGE_MODELS else nn.functional.cross_entropy
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.01)
        data = make_data(cfg)
        self.batches = [(_to(x, device), y.to(device)) for x, y in data["train"]]
        val = [(_to(x, device), y.to(device)) for x, y in data["val"]]
        self.val_batches = val
        self.tracker = None
        self.peer_loss = None
        self.lean = None
        if mode in PEER_MODES:
            self._opacus(cfg)
        elif mode == LEAN:
            from attribution.experiments.lean import LeanStreamed

            self.lean = LeanStreamed(self.model, self.opt, self.loss_fn, val[0])
        elif mode != BASELINE:
            stream = mode.endswith(STREAMED)
            point = "predicted" if mode.removesuffix(STREAMED).endswith(PREDICTED) else "current"
            kw = dict(val_point=point, stream=True) if stream else {}
            if mode.endswith(AUDIT):
                kw = dict(audit_every=1, audit_samples=8, audit_threshold=-1.0)  # cost only: no warning
            if mode.endswith((EAGER, COMPILED)):
                kw = dict(compile=mode.endswith(COMPILED))
            estimator = mode.removesuffix(STREAMED).removesuffix(PREDICTED).removesuffix(AUDIT).removesuffix(EAGER).removesuffix(COMPILED)
            self.tracker = InRunShapley(self.model, self.opt, self.loss_fn, val if len(val) > 1 else val[0], estimator=estimator, **kw)
        self.step = 0
        self.losses: list[float] = []

    def _opacus(self, cfg: BenchConfig) -> None:
        """Wrap model and AdamW in Opacus's fast gradient clipping with ghost norms (no noise)."""
        try:
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizerFastGradientClipping
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("mode 'opacus-ghost' (--peers) needs Opacus: pip install opacus") from exc
        self.model = GradSampleModuleFastGradientClipping(self.model, max_grad_norm=1.0, use_ghost_clipping=True)
        self.opt = DPOptimizerFastGradientClipping(
            torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.01),
            noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=cfg.batch,
        )
        criterion = DPLossFastGradientClipping(self.model, self.opt, nn.CrossEntropyLoss(reduction="mean"))
        if cfg.model in LANGUAGE_MODELS:  # per-sequence losses: Opacus's privacy unit for generative models
            self.peer_loss = lambda logits, y: criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), shape=logits.shape)
        else:
            self.peer_loss = criterion

    def train_step(self) -> None:
        """One optimizer step on the next batch (the tracker values it in its step pre-hook)."""
        x, y = self.batches[self.step % len(self.batches)]
        ids = torch.arange(self.step * len(y), (self.step + 1) * len(y))
        self.opt.zero_grad(set_to_none=True)
        if self.peer_loss is not None:  # Opacus's loss wrapper: its backward runs the clipping's passes
            wrapped = self.peer_loss(self.model(x), y)
            wrapped.backward()
            per_sample = getattr(wrapped, "loss_per_sample", None)
            loss = torch.tensor(float("nan")) if per_sample is None else per_sample.mean()
        else:
            with self.block(ids):
                loss = self.loss_fn(self.model(x), y)
                loss.backward()
        self.opt.step()
        self.losses.append(loss.detach())
        self.step += 1

    def block(self, ids: torch.Tensor):
        """The context one training forward+backward runs in: the tracker's batch, the lean reference's, or none."""
        if self.tracker is not None:
            return self.tracker.batch(ids)
        return self.lean.batch() if self.lean is not None else contextlib.nullcontext()

    def steady(self) -> bool:
        """Whether the tracker's last step kept the slope (no exact-update route); always for plain training."""
        if self.tracker is None:
            return True
        routes = self.tracker.step_info()["route"]
        return len(routes) > 0 and routes.iloc[-1] == "linear"

    @property
    def exact_steps(self) -> int | None:
        """Steps valued (wholly or partly) by the exact-update route so far."""
        return None if self.tracker is None else int((self.tracker.step_info()["route"] != "linear").sum())

    def finished_losses(self) -> list[float]:
        return [float(v) for v in self.losses]


def _to(x, device):
    """A tensor, or a dict of tensors (the MiniLM inputs), on ``device``."""
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def build_model(cfg: BenchConfig) -> nn.Module:
    """The GPT-2-style decoder (tied embeddings, pre-LN, GELU, learned positions), the MLP or pretrained MiniLM."""
    if cfg.model == "minilm":
        from attribution.experiments.prune import MiniLMClassifier, load_minilm, make_head

        encoder, _ = load_minilm()  # dropout off (eval mode): both copies see the same function
        return MiniLMClassifier(encoder, make_head(0, cfg.seed)).eval()
    if cfg.model == "cnn":
        return bench_cnn(cfg.width, cfg.classes, seed=cfg.seed)
    if cfg.model == "gpt":
        return TinyLM(cfg.vocab, cfg.width, cfg.depth, cfg.heads, max_len=cfg.seq_len, tied=True, seed=cfg.seed)
    if cfg.model in LANGUAGE_MODELS:
        return _hf_decoder(cfg)
    return mlp(cfg.d_in, cfg.width, cfg.classes, depth=cfg.depth, seed=cfg.seed)


class HFLogits(nn.Module):
    """``model(input_ids)`` -> logits of a Hugging Face causal LM (the bench's ``lm_loss`` convention)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def _hf_decoder(cfg: BenchConfig) -> nn.Module:
    """A stock ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` from a config at the bench's sizes."""
    import transformers

    torch.manual_seed(cfg.seed)
    if cfg.model == "hf-gpt2":
        config = transformers.GPT2Config(
            vocab_size=cfg.vocab, n_embd=cfg.width, n_layer=cfg.depth, n_head=cfg.heads, n_positions=cfg.seq_len,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=cfg.vocab, hidden_size=cfg.width, intermediate_size=4 * cfg.width, num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, max_position_embeddings=cfg.seq_len,
            tie_word_embeddings=True,
        )
        model = transformers.LlamaForCausalLM(config)
    return HFLogits(model)


def make_data(cfg: BenchConfig) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Synthetic, learnable data, the same for every mode: ``{"train": [...], "val": [K batches]}``.

    gpt: sequences from a fixed sparse random bigram model over tokens 1..V−1 (0 is padding);
    mlp: Gaussian clusters, one per class.
    """
    g = torch.Generator().manual_seed(cfg.seed + 1)
    n_train = max(cfg.total_steps, cfg.memory_steps)
    if cfg.model == "minilm":
        from attribution.experiments.data import load_rotten_tomatoes
        from attribution.experiments.prune import load_minilm, tokenize

        texts, labels = load_rotten_tomatoes()
        _, tokenizer = load_minilm()
        order = torch.randperm(len(texts), generator=g)

        def take(start, n):
            rows = order[start : start + n]
            return tokenize(tokenizer, [texts[int(r)] for r in rows], cfg.seq_len), labels[rows].clone()

        val = [take(i * cfg.val_batch, cfg.val_batch) for i in range(cfg.val_targets)]
        first = cfg.val_targets * cfg.val_batch
        return {"train": [take(first + i * cfg.batch, cfg.batch) for i in range(n_train)], "val": val}
    if cfg.model in LANGUAGE_MODELS:
        V = cfg.vocab
        logits = torch.randn(V, V, generator=g) * 3.0
        logits[:, 0] = -math.inf
        probs = torch.softmax(logits, dim=1)

        def draw(n):
            seq = torch.empty(n, cfg.seq_len + 1, dtype=torch.long)
            seq[:, 0] = torch.randint(1, V, (n,), generator=g)
            for t in range(cfg.seq_len):
                seq[:, t + 1] = torch.multinomial(probs[seq[:, t]], 1, generator=g).squeeze(1)
            return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    else:
        shape = (3, cfg.d_in, cfg.d_in) if cfg.model == "cnn" else (cfg.d_in,)
        centers = torch.randn(cfg.classes, *shape, generator=g)

        def draw(n):
            y = torch.randint(0, cfg.classes, (n,), generator=g)
            return centers[y] + torch.randn(n, *shape, generator=g), y

    return {"train": [draw(cfg.batch) for _ in range(n_train)], "val": [draw(cfg.val_batch) for _ in range(cfg.val_targets)]}


def _sync(cfg: BenchConfig) -> None:
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()


def _set_threads(cfg: BenchConfig) -> None:
    """Threads and flush-to-zero of subnormal floats, alike for every mode (and every memory worker)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(cfg.flush_denormal)


# ---------------------------------------------------------------------- throughput
@contextlib.contextmanager
def _settings(cfg: BenchConfig):
    """:func:`_set_threads` for an in-process measurement, undone after it (flush-to-zero is process-wide
    state: left on, it would change the arithmetic of whatever runs next in the process)."""
    threads = torch.get_num_threads()
    _set_threads(cfg)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # torch's default; there is no getter to restore another value
        torch.set_num_threads(threads)


def measure_throughput(cfg: BenchConfig, progress: bool = True) -> dict[str, dict]:
    """Interleaved timing rounds in this process: per mode seconds, samples/s, steps, losses."""
    with _settings(cfg):
        return _measure_throughput(cfg, progress)


def _measure_throughput(cfg: BenchConfig, progress: bool) -> dict[str, dict]:
    work = {mode: Workload(cfg, mode) for mode in cfg.modes}
    warm_seconds = {mode: 0.0 for mode in cfg.modes}

    def warm(w: Workload) -> None:
        start = time.perf_counter()
        w.train_step()
        _sync(cfg)
        warm_seconds[w.mode] += time.perf_counter() - start

    for w in work.values():  # warm-up: first-call allocations, lazy initialisation
        for _ in range(cfg.warmup):
            warm(w)
    # The first steps of an adaptive optimizer take the exact-update route (route="auto"), a
    # one-time cost of the run's start: the timed rounds measure the steady state after it. Every
    # mode then trains the same number of untimed steps, so all modes follow one trajectory.
    while any(not w.steady() for w in work.values()) and max(w.step for w in work.values()) < cfg.warmup + MAX_EXACT_PHASE:
        for w in work.values():
            if not w.steady():
                warm(w)
    for w in work.values():
        while w.step < max(v.step for v in work.values()):
            warm(w)
    _sync(cfg)
    for w in work.values():  # the completeness check's own time, counted from here on
        if w.tracker is not None:
            w.tracker._computer.engine.check_seconds = 0.0
    seconds = {mode: 0.0 for mode in cfg.modes}
    per_round: list[dict[str, float]] = []
    for r in range(cfg.rounds):
        order = cfg.modes if r % 2 == 0 else cfg.modes[::-1]  # A B C D, D C B A: drift cancels
        times = {}
        for mode in order:
            _sync(cfg)
            start = time.perf_counter()
            for _ in range(cfg.steps):
                work[mode].train_step()
            _sync(cfg)
            times[mode] = time.perf_counter() - start
            seconds[mode] += times[mode]
        per_round.append(times)
        if progress:
            print(f"bench: round {r + 1}/{cfg.rounds}: " + ", ".join(f"{m} {t / cfg.steps:.3f} s/step" for m, t in times.items()), flush=True)
    out = {}
    for mode, w in work.items():
        if w.tracker is not None:
            w.tracker.close()
        samples = cfg.rounds * cfg.steps * cfg.batch
        out[mode] = {
            "samples_per_s": samples / seconds[mode],
            "seconds": seconds[mode],
            "steps": w.step,
            "losses": w.finished_losses(),
            "round_ratios": [t[BASELINE] / t[mode] for t in per_round],
            "attributed_steps": None if w.tracker is None else w.tracker.steps,
            # Share of the tracked mode's time spent on the per-step completeness check.
            "completeness_fraction": None if w.tracker is None else w.tracker._computer.engine.check_seconds / seconds[mode],
            # The untimed start: steps (and their seconds) until the tracker's route was the slope's.
            "warmup_steps": w.step - cfg.rounds * cfg.steps,  # cfg.warmup, or more while the exact route lasted
            "warmup_seconds": warm_seconds[mode],
            "exact_route_steps": w.exact_steps,
        }
    return out


# ---------------------------------------------------------------------- the FLOP bound
def flop_bound(cfg: BenchConfig) -> dict[str, float]:
    """The throughput ratio an exact tracker could reach if only its matrix arithmetic cost time.

    Counted with ``torch.utils.flop_counter`` (matrix products and convolutions, 2 flops per
    multiply-add): the plain step's forward+backward F_plain, the K validation forward+backwards
    F_val, and the dense contraction F_con = 2 Σ_terms n·T·R·C per target (what an exact
    contraction with an elementwise J must do: ``Bilinear.dense_cost``, n·T·D for an embedding;
    for K ≥ 2 targets the cheaper n·R·C·(T + K) of building each c_z once where that is less,
    ``Bilinear.dense_cost_many``).
    Elementwise work (the optimizer's update, J, the shift) is not counted, for the plain step
    neither. ``bound = F_plain / (F_plain + F_val + F_con)``; a mode's efficiency is its measured
    ratio over this bound.

    Returns:
        ``{"plain_flops", "val_flops", "contraction_flops", "bound"}``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from estimators._factors import Bilinear

    w = Workload(cfg, "ghost")
    x, y = w.batches[0]

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    plain = count(lambda: w.loss_fn(w.model(x), y).backward())
    val = sum(count(lambda b=b: w.loss_fn(w.model(b[0]), b[1]).backward()) for b in w.val_batches)
    w.opt.zero_grad(set_to_none=True)
    engine = w.tracker._computer.engine
    with engine.capture_train():
        w.loss_fn(w.model(x), y).backward()
    K = len(w.val_batches)
    multiply_adds = 0
    for _, terms in engine.captured_terms():
        for p, ts in terms.items():
            multiply_adds += sum(t.dense_cost_many(K) if isinstance(t, Bilinear) else K * t.n * p.numel() for t in ts)
    engine.clear()
    w.tracker.close()
    contraction = 2.0 * multiply_adds
    return {"plain_flops": plain, "val_flops": val, "contraction_flops": contraction, "bound": plain / (plain + val + contraction)}


# ---------------------------------------------------------------------- memory
def _proc_status_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from Linux's /proc, MB (``None`` elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) so that it covers training only (Linux ≥ 4.0).

    Importing torch, building the data and the model can reach a higher resident size than a
    small model's training; without the reset the peak would measure the imports. Freed heap
    is first returned to the system (glibc ``malloc_trim``), so that memory the start's
    exact-update route used and freed does not count as resident during training.
    """
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_mb("VmHWM") is not None


def worker(cfg: BenchConfig, mode: str) -> dict:
    """Train ``memory_steps`` steps of ``mode`` in this (fresh) process and report its peak memory."""
    _set_threads(cfg)
    w = Workload(cfg, mode)
    while not w.steady() and w.step < MAX_EXACT_PHASE:  # the start's exact-update route, as in the timing
        w.train_step()
    exact_phase = w.step
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
        setup = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        how = "torch.cuda.max_memory_allocated"
    else:
        setup = _proc_status_mb("VmRSS")
        how = "peak RSS of the training steps (VmHWM after a reset)" if _reset_peak_rss() else "peak RSS of the process (ru_maxrss)"
    for _ in range(cfg.memory_steps):
        w.train_step()
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    elif how.startswith("peak RSS of the training"):
        peak = _proc_status_mb("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"mode": mode, "peak_mb": peak, "setup_mb": setup, "measure": how, "steps": w.step - exact_phase, "exact_phase_steps": exact_phase,
            "losses": w.finished_losses()}


def measure_memory(cfg: BenchConfig, progress: bool = True) -> dict[str, dict]:
    """One fresh ``python -m attribution bench --worker MODE`` process per mode, one after the other."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    out = {}
    for mode in cfg.modes:
        cmd = [sys.executable, "-m", "attribution", "bench", "--worker", mode, "--config-json", json.dumps(dataclasses.asdict(cfg))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
        if proc.returncode != 0:
            raise RuntimeError(f"the memory worker for mode {mode!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        if progress:
            print(f"bench: memory {mode}: peak {out[mode]['peak_mb']:.1f} MB", flush=True)
    return out


# ---------------------------------------------------------------------- profile
def profile(cfg: BenchConfig, steps: int = 2, top: int = 12) -> dict[str, dict[str, float]]:
    """Per mode: seconds per step in forward+backward (with capture), attribution (the tracker's
    values: linearization, validation pass, contraction) and the rest of ``optimizer.step()`` (the
    AdamW update and the tracker's bookkeeping); then print torch.profiler's heaviest operators
    of one step of each mode. Returns the phase table. (Streamed modes do their validation pass
    when the batch context is entered and their contraction inside the backward: both count as
    forward+backward there.)"""
    with _settings(cfg):
        return _profile(cfg, steps, top)


def _profile(cfg: BenchConfig, steps: int, top: int) -> dict[str, dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    phases = {}
    for mode in cfg.modes:
        w = Workload(cfg, mode)
        w.train_step()  # warm-up
        spent = [0.0]
        if w.tracker is not None:  # time the tracker's own work inside optimizer.step()
            computer = w.tracker._computer
            inner = computer.step_values

            def timed(*a, **kw):
                t = time.perf_counter()
                try:
                    return inner(*a, **kw)
                finally:
                    _sync(cfg)
                    spent[0] += time.perf_counter() - t

            computer.step_values = timed
        totals = {"forward+backward": 0.0, "attribution": 0.0, "update": 0.0}
        for _ in range(steps):
            x, y = w.batches[w.step % len(w.batches)]
            w.opt.zero_grad(set_to_none=True)
            _sync(cfg)
            t0 = time.perf_counter()
            with w.block(torch.arange(len(y))):
                w.loss_fn(w.model(x), y).backward()
            _sync(cfg)
            t1 = time.perf_counter()
            spent[0] = 0.0
            w.opt.step()
            _sync(cfg)
            w.step += 1
            totals["forward+backward"] += t1 - t0
            totals["attribution"] += spent[0]
            totals["update"] += time.perf_counter() - t1 - spent[0]
        phases[mode] = {k: v / steps for k, v in totals.items()}
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device.startswith("cuda") else [])
        with torch_profile(activities=acts) as prof:
            w.train_step()
            _sync(cfg)
        key = "self_cuda_time_total" if cfg.device.startswith("cuda") else "self_cpu_time_total"
        print(f"\n=== {mode}: one step, heaviest operators\n" + prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=48))
        if w.tracker is not None:
            w.tracker.close()
    print("\n| mode | forward+backward s | attribution s | update + bookkeeping s | total s |\n|---|---|---|---|---|")
    for mode, ph in phases.items():
        print(f"| {mode} | {ph['forward+backward']:.3f} | {ph['attribution']:.3f} | {ph['update']:.3f} | {sum(ph.values()):.3f} |")
    return phases


# ---------------------------------------------------------------------- the whole run
def machine() -> dict:
    """Where the numbers come from: device name, CPU model, cores, threads, torch version."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "nproc": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe_model(cfg: BenchConfig) -> dict:
    """Kind, sizes and parameter count of the benchmarked model."""
    model = build_model(cfg)
    keys = ("vocab", "width", "depth", "heads", "seq_len") if cfg.model in LANGUAGE_MODELS else ("d_in", "width", "depth", "classes")
    if cfg.model in PRETRAINED:
        keys = ("seq_len",)
    kind = {"cnn": "CNN (3 convolutions, mean pool, linear)", "gpt": "gpt2-style decoder (tied embeddings)", "hf-gpt2": "transformers GPT2LMHeadModel", "hf-llama": "transformers LlamaForCausalLM",
            "minilm": "all-MiniLM-L6-v2 (pretrained, bundled) + linear head, Rotten Tomatoes"}
    desc = {"kind": kind.get(cfg.model, "mlp"), **{k: getattr(cfg, k) for k in keys}}
    desc.update(params=sum(p.numel() for p in model.parameters()), batch=cfg.batch, val_batch=cfg.val_batch, val_targets=cfg.val_targets)
    return desc


def run(cfg: BenchConfig, *, memory: bool = True, progress: bool = True) -> dict:
    """Throughput (interleaved, in process) and memory (one subprocess per mode); the JSON dict."""
    throughput = measure_throughput(cfg, progress)
    bound = flop_bound(cfg)
    for t in throughput.values():
        t["efficiency"] = None
    mem = measure_memory(cfg, progress) if memory else {}
    base_tp = throughput[BASELINE]["samples_per_s"]
    base_mem = mem.get(BASELINE, {}).get("peak_mb")
    modes = {}
    for mode in cfg.modes:
        t = throughput[mode]
        m = mem.get(mode, {})
        modes[mode] = {
            "throughput_ratio": t["samples_per_s"] / base_tp,
            "memory_ratio": m["peak_mb"] / base_mem if m else None,
            "samples_per_s": t["samples_per_s"],
            "peak_mb": m.get("peak_mb"),
            "setup_mb": m.get("setup_mb"),
            "steps": t["steps"],
            "attributed_steps": t["attributed_steps"],
            "losses_finite": all(math.isfinite(v) for v in t["losses"] + m.get("losses", [])),
            "first_loss": t["losses"][0],
            "last_loss": t["losses"][-1],
            "seconds": t["seconds"],
            "round_ratios": t["round_ratios"],
            "round_ratio_spread": round_ratio_spread(t["round_ratios"]),
            "completeness_fraction": t["completeness_fraction"],
            "warmup_steps": t["warmup_steps"],
            "warmup_seconds": t["warmup_seconds"],
            "exact_route_steps": t["exact_route_steps"],
            "efficiency": None if mode in (BASELINE, *PEER_MODES) else t["samples_per_s"] / base_tp / bound["bound"],
            "memory_steps": m.get("steps"),
            "memory_measure": m.get("measure"),
        }
    return {
        "device": cfg.device if not cfg.device.startswith("cuda") else f"{cfg.device} ({torch.cuda.get_device_name(0)})",
        "model": describe_model(cfg),
        "modes": modes,
        "config": dataclasses.asdict(cfg),
        "machine": {**machine(), "threads": cfg.threads or torch.get_num_threads()},  # the measured count
        "targets": {m: {"throughput_ratio_min": t[0], "memory_ratio_max": t[1]} for m in MODES if (t := target_of(m, cfg.model))},
        "flop_bound": bound,
    }


def round_ratio_spread(ratios: list[float]) -> float:
    """max |r − median(r)| over a mode's per-round throughput ratios (0 for a single round)."""
    if not ratios:
        raise ValueError("round_ratios is empty: the run timed no round")
    middle = statistics.median(ratios)
    return max(abs(r - middle) for r in ratios)


def noise_of(mode: str, r: dict) -> str | None:
    """Why the throughput of ``mode`` in this run is noise rather than a measurement, or ``None``.

    Noise: the per-round ratios spread more than ±MAX_SPREAD around their median, or a tracked
    mode's ratio (overall or in a round) is above MAX_RATIO.
    """
    if mode == BASELINE:
        return None
    ratios, spread, fastest = _timing(r)
    reasons = []
    if spread > MAX_SPREAD:
        reasons.append(f"per-round throughput ratios {_ratios(ratios)} spread ±{spread:.2f} around their median "
                       f"{statistics.median(ratios):.3f} (more than ±{MAX_SPREAD})")
    if fastest > MAX_RATIO:
        reasons.append(f"throughput ratio {fastest:.3f} is above {MAX_RATIO}, faster than plain training, "
                       f"which a tracked mode cannot be (spread ±{spread:.2f})")
    return "; ".join(reasons) or None


def _timing(r: dict) -> tuple[list[float], float, float]:
    """A mode's per-round ratios, their spread and its highest ratio; older JSON lacks the spread."""
    ratios = r.get("round_ratios") or [r["throughput_ratio"]]
    spread = r.get("round_ratio_spread")
    return ratios, round_ratio_spread(ratios) if spread is None else spread, max([r["throughput_ratio"], *ratios])


def _ratios(ratios: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in ratios) + "]"


def noise_warnings(result: dict) -> list[str]:
    """One warning line per mode whose throughput in ``result`` is noise (see :func:`noise_of`)."""
    return [f"warning: {mode}: {why}; its targets are not judged. Rerun on an idle machine, with more "
            f"--rounds or --steps, or --threads 1." for mode, r in result["modes"].items() if (why := noise_of(mode, r))]


def format_table(result: dict) -> str:
    """The per-mode table printed by the command (and pasted into docs/performance.md).

    The target column says met / NOT met, or ``noise (spread ±x)`` when the mode's timing is
    noise (:func:`noise_of`), so that a noisy run is never read as a target met or missed.
    """
    rows = []
    model = result.get("config", {}).get("model", "gpt")
    bound = (result.get("flop_bound") or {}).get("bound")
    for mode, r in result["modes"].items():
        peak = "–" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        ratio = "–" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}"
        target = ""
        if noise_of(mode, r) is not None:
            _, spread, fastest = _timing(r)
            target = f"noise (spread ±{spread:.2f}" + (f", ratio {fastest:.3f} > {MAX_RATIO})" if fastest > MAX_RATIO else ")")
        elif target_of(mode, model) is not None:
            tp, mr = target_of(mode, model)
            ok_tp = r["throughput_ratio"] >= tp
            ok_mem = r["memory_ratio"] is not None and r["memory_ratio"] <= mr
            target = f"≥ {tp} {'met' if ok_tp else 'NOT met'}; ≤ {mr} {'met' if ok_mem else 'NOT met' if r['memory_ratio'] is not None else 'not measured'}"
        check = "–" if r.get("completeness_fraction") is None else f"{100 * r['completeness_fraction']:.2f} %"
        tracked = mode != BASELINE and mode not in PEER_MODES and bound is not None
        rows.append([mode, f"{r['samples_per_s']:.2f}", f"{r['throughput_ratio']:.3f}", f"{bound:.3f}" if tracked else "–",
                     f"{r['throughput_ratio'] / bound:.2f}" if tracked else "–", peak, ratio, check, target])
    return markdown_table(["mode", "samples/s", "throughput ratio", "FLOP bound", "efficiency", "peak MB", "memory ratio",
                           "completeness check", "target"], rows)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Model defaults, then ``--quick``, then every size given explicitly on the command line."""
    values = dict(DEFAULTS[args.model])
    if args.quick:
        values.update(QUICK[args.model])
    for field in dataclasses.fields(BenchConfig):
        given = getattr(args, field.name, None)
        if given is not None and field.name != "model":
            values[field.name] = tuple(given.split(",")) if field.name == "modes" else given
    if "device" not in values:
        values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if getattr(args, "peers", False):
        import importlib.util

        if importlib.util.find_spec("opacus") is None:
            print("bench: --peers: Opacus is not installed (pip install opacus); no peer is timed", file=sys.stderr)
        elif args.model not in ("mlp", "cnn"):
            # Opacus 1.5.4: "Parameter tying is not supported with Ghost Clipping"; with the head untied,
            # its embedding norm rule fails on the decoder's expanded position ids (input_ids.view).
            print(f"bench: --peers: Opacus's ghost clipping does not run on --model {args.model} (tied embeddings; "
                  "expanded position ids); no peer is timed", file=sys.stderr)
        else:
            values["modes"] = tuple(dict.fromkeys((*values.get("modes", MODES), *PEER_MODES)))
    return BenchConfig(model=args.model, **values)


#: The size options (``--name`` -> BenchConfig field, type, what it sets); their defaults
#: depend on ``--model`` and ``--quick`` (see :func:`_size_default`).
SIZE_OPTIONS = (
    ("vocab", int, "vocabulary size (gpt)"),
    ("width", int, "hidden size (gpt) or hidden-layer width (mlp)"),
    ("depth", int, "decoder blocks (gpt) or hidden layers (mlp)"),
    ("heads", int, "attention heads (gpt)"),
    ("seq-len", int, "tokens per sequence (gpt)"),
    ("d-in", int, "input size (mlp)"),
    ("classes", int, "classes (mlp)"),
    ("batch", int, "training samples per step"),
    ("val-batch", int, "validation samples per validation target"),
    ("val-targets", int, "validation batches K, one value column each"),
    ("rounds", int, "timed rounds"),
    ("steps", int, "steps per mode per round"),
    ("warmup", int, "untimed steps per mode before the rounds"),
    ("memory-steps", int, "steps each memory worker trains"),
    ("threads", int, "torch.set_num_threads"),
    ("lr", float, "AdamW learning rate (weight decay 0.01)"),
    ("seed", int, "seed of the weights and the data"),
)


def _size_default(field: str) -> str:
    """``"default: ..."`` for a size option: per ``--model`` where it differs, and with ``--quick``."""
    base = next(f.default for f in dataclasses.fields(BenchConfig) if f.name == field)
    models = [m for m in DEFAULTS if field in DEFAULTS[m]] or list(DEFAULTS)

    def values(table):
        got = {m: table[m].get(field, DEFAULTS[m].get(field, base)) for m in models}
        if len(set(got.values())) == 1 and len(models) == len(DEFAULTS):
            v = next(iter(got.values()))
            return "torch's default" if v is None else f"{v:g}"
        return ", ".join(f"{m} {v:g}" for m, v in got.items())

    text = f"default: {values(DEFAULTS)}"
    if values(QUICK) != values(DEFAULTS):
        text += f"; with --quick: {values(QUICK)}"
    return text


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m attribution bench``, each help stating its default."""
    parser = argparse.ArgumentParser(prog="python -m attribution bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds, well under a minute on 2 CPU cores (default: off)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH (default: none written)")
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="gpt", help="the benchmarked model (default: %(default)s)")
    for name, typ, what in SIZE_OPTIONS:
        parser.add_argument(f"--{name}", type=typ, default=None, help=f"{what} ({_size_default(name.replace('-', '_'))})")
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated subset of {','.join((*MODES, *EXTRA_MODES))}; plain is always run "
                             f"(default: all but {','.join(EXTRA_MODES)})")
    parser.add_argument("--peers", action="store_true",
                        help="also time Opacus's ghost clipping (mode opacus-ghost) on the same model in the same interleaved "
                             "run, when Opacus is installed (default: off)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-mode memory subprocesses (default: off, memory is measured)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the benchmark: time each phase of a step and print torch.profiler's top operators per mode (default: off)")
    parser.add_argument("--world-size", type=int, default=1,
                        help="W > 1: the FSDP2 bench (fully_shard over W gloo CPU processes, an MLP), per-rank throughput and "
                             "memory ratios against plain FSDP training in the same run; the other size options do not apply "
                             "(default: %(default)s, the single-process bench)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config-json", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    """Command-line entry point of ``python -m attribution bench``."""
    args = build_parser().parse_args(argv)
    if args.world_size > 1:
        # FSDP2 over W gloo processes: its own sized workload (attribution.experiments.bench_distributed)
        from attribution.experiments import bench_distributed

        extra = ["--world-size", str(args.world_size)] + (["--json", args.json] if args.json else [])
        bench_distributed.main(extra)
        return 0
    if args.worker is not None:
        cfg = BenchConfig(**{k: tuple(v) if k == "modes" else v for k, v in json.loads(args.config_json).items()})
        print(json.dumps(worker(cfg, args.worker)))
        return 0
    cfg = config_from_args(args)
    if args.profile:
        profile(cfg)
        return 0
    result = run(cfg, memory=not args.no_memory)
    m = result["machine"]
    print(f"\n{result['model']}\ndevice {result['device']}; CPU {m['cpu']}, nproc {m['nproc']}, torch threads {m['threads']}, torch {m['torch']}\n")
    print(format_table(result))
    for line in noise_warnings(result):
        print(line, file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0

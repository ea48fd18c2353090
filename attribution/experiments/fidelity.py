"""The fidelity study: how well do per-step values match the real per-step game, across settings?

``python -m attribution fidelity [--quick] [--out DIR]`` trains each model with each optimizer
(several seeds) and, at a few training phases, values the batch of the step about to be taken
with every estimator and every validation point, and compares the values with this toolkit's
own oracles, computed with the real ``torch.optim`` step under the real, fixed state:

* ``loo``: leave-one-out marginals ``U(B) − U(B∖z)`` (:func:`validation.leave_one_out`);
* ``shapley``: exact Shapley values of the step's game at small n (:func:`validation.shapley_values`).

Grid (defaults, :class:`FidelityConfig`): optimizers {SGD, SGD+momentum, Adam, AdamW, Adam at a
larger lr} × models {MLP and small CNN on scikit-learn's digits, a tiny transformer LM with
untied and with tied head on Rotten Tomatoes sentences} × phases {step 1, early, mid, late} ×
estimators {``sgd`` proxy (J = −lr), ``tangent``, ``secant``, ``factored`` (tangent, rank-one
J per weight matrix)} × validation points {current, lookahead, midpoint} × truths {loo, shapley}
× seeds. Everything runs in float64 so that the oracles' loss differences are not rounding noise.

``--grid optimizers`` (:data:`OPTIMIZER_GRID`) runs the optimizers linearized later instead:
Muon (on the weight matrices, AdamW on the rest), Adafactor, NAdam, RAdam, Adamax, Adadelta and
Rprop, with Adam as the reference, at steps 1, 3, 10, 100 and 400, and adds the diagnostic
``twin`` (the step's game with the linearization's own update, exact in g and θ: for Muon it
differs from the real step only by torch's bfloat16 Newton–Schulz). An estimator the
linearization refuses for a cell (:class:`optimizers.UpdateJumpError`: Rprop's tangent and
secant, the secant of Muon's and Adafactor's first step, and of an Adafactor step whose factored
moment is still zero on a row the gradient now reaches, e.g. an LM embedding row seen for the
first time) is recorded as a row with NaN metrics and the reason in the ``refused`` column, never
dropped.

``--grid early`` (:data:`EARLY_GRID`) runs the first ten steps from initialisation, where the
update of an adaptive optimizer is far from linear in g: Adam, AdamW, Adam at lr 1e-2, RMSprop,
Adagrad and Nesterov SGD on the MLP, the CNN and the untied LM at steps 1, 2, 3, 5 and 10, with
the estimators ``secant``, ``auto`` (the tracker's default: the secant, or the exact-update game
where the update's nonlinearity ν exceeds ``attribution._step.DEFAULT_NONLINEARITY_THRESHOLD``
or the update jumps), ``exact`` (the exact-update game Ū(S) = −⟨∇L_val(θ_mid), Δ(g_S)⟩, 32
sampled orders), the SGD proxy and ``exact-g``. ``auto`` and ``exact`` are valued at the midpoint
only (:data:`ESTIMATOR_VAL_POINTS`). Every row records the cell's ν and the ``auto`` rows the route taken
(:func:`auto_values`); ``thresholds`` (:attr:`FidelityConfig.thresholds`) values the default
again at each listed threshold τ (:func:`threshold_values`), one row per cell and τ in
``sweep.csv``, summarised by :func:`threshold_sweep`. ``--rewrite-report DIR`` writes
``DIR/results.md`` again from a finished run's files (:func:`rewrite_report`), recomputing nothing.

Outputs in ``--out`` (default ``results/fidelity``, ``results/fidelity_optimizers`` for
``--grid optimizers``, ``results/fidelity_early`` for ``--grid early``): ``cells.csv`` (one row
per cell and estimate: every :func:`validation.fidelity` metric, R against the tangent and the
exact-g values of the same cell, ``refused`` (the reason, or empty), ``update_rel_error``, the
real step's distance from the linearization's update, :func:`update_error`, ``nonlinearity``
(ν, NaN without ``auto``) and ``route`` (of the ``auto`` rows)), ``values.csv`` (every per-sample value and its
truth), ``results.md`` (tables), ``r_by_phase_<truth>.png``,
``scatter_headline.png``, ``config.json`` (the frozen configuration) and ``run.json`` (machine,
timings).

The LM is fed fixed-length chunks of the concatenated token stream, so every target token is
real (no padding): the token-mean loss is then a mean over samples, as the oracles require.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

import estimators
import optimizers
import validation
from attribution import _step as attribution_step
from attribution import step_values
from attribution._config import AttributionConfig
from attribution.experiments.data import Split, WordVocabulary, load_digits, load_rotten_tomatoes
from attribution.experiments.models import TinyLM, lm_loss, mlp, small_cnn
from attribution.experiments._json_config import JsonConfig
from attribution.experiments._report import frame_table

#: name -> (torch.optim class, keyword arguments). Learning rates typical for each optimizer on
#: these small models, plus Adam at a 10× larger lr, where the validation loss's curvature along
#: one step matters (the ``val_point`` effect).
#:
#: The optimizers of the ``optimizers`` grid (:data:`NEW_OPTIMIZERS`) take torch's default lr, or
#: the one their recipe uses where torch has none of its own:
#:
#: * ``muon``: lr 0.02, the Muon recipe's lr (torch's default 1e-3 is an AdamW-scale lr; Muon's
#:   orthogonalised step has unit spectral norm, so it needs a larger one), torch's other defaults
#:   (momentum 0.95, Nesterov, 5 quintic Newton–Schulz steps, weight decay 0.1). Muon steps the
#:   2-D weights of the ``nn.Linear`` layers (:func:`muon_matrices`), the output layers included
#:   (the MLP's and CNN's last layer, the untied LM head; Keller Jordan's recipe would give those
#:   to AdamW, but then the CNN would have no Muon parameter at all); everything else
#:   (embeddings and a head tied to one, LayerNorm, biases, the CNN's 4-D kernels, which torch's
#:   Muon refuses) goes to :data:`MUON_COMPANION`, AdamW at the study's AdamW setting.
#: * ``adafactor``: lr 1e-2, torch's default (a relative step: ρ_t = min(lr, 1/√t) times RMS(θ)).
#: * ``nadam`` 2e-3, ``adamax`` 2e-3: torch's defaults (Adam-scale).
#: * ``radam``: 1e-3, torch's default and Adam's lr here; its first ~5 steps are un-adapted
#:   momentum SGD at that lr, so it starts slowly (digits MLP: val loss 2.15 at step 100).
#: * ``adadelta``: lr 1.0, torch's default (the original, lr-free Adadelta).
#: * ``rprop``: lr 1e-2 (torch's default initial step size) with step sizes capped at 0.05
#:   instead of torch's 50: with mini-batches, sign agreement by chance grows the steps without
#:   bound, and the LM diverged with the default cap (validation loss 15.6 at step 100; 5.2 at the
#:   cap 0.05). Rprop is a full-batch method; the study trains it on batches of 32 like the others.
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 3e-3, "weight_decay": 1e-2}),
    "adam-lr1e-2": (torch.optim.Adam, {"lr": 1e-2}),
    "muon": (torch.optim.Muon, {"lr": 0.02}),
    "adafactor": (torch.optim.Adafactor, {"lr": 1e-2}),
    "nadam": (torch.optim.NAdam, {"lr": 2e-3}),
    "radam": (torch.optim.RAdam, {"lr": 1e-3}),
    "adamax": (torch.optim.Adamax, {"lr": 2e-3}),
    "adadelta": (torch.optim.Adadelta, {"lr": 1.0}),
    "rprop": (torch.optim.Rprop, {"lr": 1e-2, "step_sizes": (1e-6, 0.05)}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-2}),
    "sgd-nesterov": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
}
#: The optimizer of the parameters Muon does not take (see :data:`OPTIMIZERS`).
MUON_COMPANION = (torch.optim.AdamW, {"lr": 3e-3, "weight_decay": 1e-2})
#: The optimizers of the original study (the default grid).
ORIGINAL_OPTIMIZERS = ("sgd", "sgd-momentum", "adam", "adamw", "adam-lr1e-2")
#: The optimizers linearized later (the ``optimizers`` grid, with Adam as the reference).
NEW_OPTIMIZERS = ("muon", "adafactor", "nadam", "radam", "adamax", "adadelta", "rprop")
#: The optimizers of the ``early`` grid: the adaptive ones whose first updates are sign-like
#: (Adam, AdamW, Adam at lr 1e-2, RMSprop, Adagrad) and Nesterov SGD (linear in g) as the control.
EARLY_OPTIMIZERS = ("adam", "adamw", "adam-lr1e-2", "rmsprop", "adagrad", "sgd-nesterov")
MODELS = ("mlp", "cnn", "lm", "lm-tied")
#: name -> step_values keyword arguments (besides val_point).
ESTIMATORS = {
    "sgd": {"linearization": "sgd", "estimator": "ghost"},
    "tangent": {"linearization": "tangent", "estimator": "ghost"},
    "secant": {"linearization": "secant", "estimator": "ghost"},
    "factored": {"linearization": "tangent", "estimator": "ghost-factored"},
    # What InRunShapley does by default: the secant, or the exact-update game where the update's
    # nonlinearity ν exceeds attribution's DEFAULT_NONLINEARITY_THRESHOLD (or jumps at g = 0).
    "auto": {"linearization": "secant", "estimator": "ghost", "route": "auto"},
    # The exact-update game Ū(S) = −⟨∇L_val(θ_mid), Δ(g_S)⟩, Shapley values by 32 sampled orders.
    "exact": {"linearization": "exact", "estimator": "ghost"},
}
#: The estimators of the original study and of the ``optimizers`` grid (slopes only).
ORIGINAL_ESTIMATORS = ("sgd", "tangent", "secant", "factored")
#: Estimators valued at some validation points only: the automatic route and the exact-update game
#: are defined (and used by the tracker) with the midpoint gradient; a grid's other points are
#: skipped for them, and a grid that has none of their points is refused.
ESTIMATOR_VAL_POINTS = {"auto": ("midpoint",), "exact": ("midpoint",)}
#: Diagnostics, not in-run methods, from materialized per-sample gradients: ``exact-g`` is first
#: order in θ but the EXACT optimizer update in g (:func:`exact_in_g_values`); ``twin`` is the
#: step's game with the linearization's own update Δ_lin, exact in g and θ
#: (:func:`twin_game_values`): equal to the oracle wherever Δ_lin is the real step, so against
#: the truth it measures what the linearization's update model misses (for Muon: torch's
#: bfloat16 Newton–Schulz, which the float64 twin leaves out). ``twin`` has no validation point:
#: its variant is ``twin/exact``.
DIAGNOSTICS = ("exact-g", "twin")
VAL_POINTS = ("current", "lookahead", "midpoint")
#: Also accepted (the ``predicted`` grid): the midpoint with g_B replaced by the optimizer's
#: prediction of it, known before the backward (refused, as a variant, for optimizers keeping none).
ACCEPTED_VAL_POINTS = (*VAL_POINTS, "predicted")
TRUTHS = ("loo", "shapley")
#: Metrics copied from validation.fidelity into every row.
METRICS = ("pearson", "spearman", "kendall", "top_k_overlap", "sign_agreement", "relative_l2_error", "relative_efficiency_gap")
#: Variants shown in the per-cell markdown tables, where the grid has them (every variant is in cells.csv).
KEY_VARIANTS = ("sgd/current", "tangent/current", "tangent/lookahead", "secant/current", "secant/midpoint", "secant/predicted",
                "auto/midpoint", "exact/midpoint", "factored/lookahead", "exact-g/current", "exact-g/predicted", "twin/exact")


def _check_names(values, accepted, field: str) -> tuple:
    values = tuple(values)
    unknown = [v for v in values if v not in accepted]
    if unknown or not values:
        raise ValueError(
            f"{field}={values!r}: {'unknown ' + repr(unknown) if unknown else 'empty'}; accepted values: "
            f"{', '.join(map(repr, accepted))}"
        )
    return values


@dataclasses.dataclass(frozen=True)
class FidelityConfig(JsonConfig):
    """What the study runs; validated on construction and saved as ``config.json`` next to results.

    Attributes:
        seeds: each seed sets the data split, the model's initialisation and the batch order.
        models: names from :data:`MODELS`.
        optimizers: names from :data:`OPTIMIZERS`.
        phases: ``(name, step)`` pairs, steps strictly increasing; the cell values the batch of
            that step (1-based) just before the optimizer takes it.
        estimators, val_points, truths: names from :data:`ESTIMATORS` (plus the diagnostics
            ``"exact-g"`` and ``"twin"``, :data:`DIAGNOSTICS`), :data:`VAL_POINTS`, :data:`TRUTHS`.
        loo_batch: batch size n of the training run and of the leave-one-out cells.
        shapley_batch: n of the exact Shapley cells (the first n samples of the step's batch,
            valued as a step with that batch under the same state); 2^n optimizer steps each.
        lm_shapley_batch: the same for the language models (their validation forward is dearer).
        val_size: validation samples (digits) or validation chunks (LM) in ``L_val``.
        lm_length, lm_vocab: tokens per LM sample and vocabulary size (with ``<pad>``, ``<unk>``).
        headline: ``(model, optimizer, phase, truth)`` of the scatter plot (seed = first seed).
        thresholds: nonlinearity thresholds τ at which the ``auto`` estimator is valued again
            (``sweep.csv``, :func:`threshold_sweep`); needs ``"auto"`` in ``estimators``.
        threads: torch intra-op threads. 1 by default: these models are too small to gain from
            more, and on a shared machine spinning OpenMP threads slowed small ops many times.

    Example:
        >>> FidelityConfig(models=("mlp",), truths=("loo",)).models
        ('mlp',)
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    models: tuple[str, ...] = ("mlp", "cnn", "lm", "lm-tied")
    optimizers: tuple[str, ...] = ORIGINAL_OPTIMIZERS
    phases: tuple[tuple[str, int], ...] = (("step 1", 1), ("early", 10), ("mid", 100), ("late", 400))
    estimators: tuple[str, ...] = (*ORIGINAL_ESTIMATORS, "exact-g")
    val_points: tuple[str, ...] = VAL_POINTS
    truths: tuple[str, ...] = TRUTHS
    loo_batch: int = 32
    shapley_batch: int = 10
    lm_shapley_batch: int = 8
    val_size: int = 64
    lm_val_size: int = 8
    lm_length: int = 16
    lm_vocab: int = 1000
    headline: tuple[str, str, str, str] = ("cnn", "adam", "mid", "loo")
    threads: int = 1
    thresholds: tuple[float, ...] = ()

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds:
            raise ValueError("seeds=(): give at least one seed, e.g. seeds=(0,)")
        set_("models", _check_names(self.models, MODELS, "models"))
        set_("optimizers", _check_names(self.optimizers, tuple(OPTIMIZERS), "optimizers"))
        set_("estimators", _check_names(self.estimators, (*ESTIMATORS, *DIAGNOSTICS), "estimators"))
        set_("val_points", _check_names(self.val_points, ACCEPTED_VAL_POINTS, "val_points"))
        for est in self.estimators:
            if est in ESTIMATOR_VAL_POINTS and not set(ESTIMATOR_VAL_POINTS[est]) & set(self.val_points):
                raise ValueError(
                    f"estimators has {est!r}, which is valued at val_points {ESTIMATOR_VAL_POINTS[est]!r} only, but "
                    f"val_points={self.val_points!r}; add 'midpoint' to val_points or drop {est!r}"
                )
        set_("truths", _check_names(self.truths, TRUTHS, "truths"))
        phases = tuple((str(name), int(step)) for name, step in self.phases)
        steps = [s for _, s in phases]
        if not phases or steps[0] < 1 or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"phases={phases!r}: give (name, step) pairs with steps >= 1, strictly increasing")
        set_("phases", phases)
        limit = validation.MAX_EXACT_PLAYERS
        for name in ("shapley_batch", "lm_shapley_batch"):
            n = getattr(self, name)
            if not 2 <= n <= min(limit, self.loo_batch):
                raise ValueError(f"{name}={n}: exact Shapley cells need 2 <= n <= min({limit}, loo_batch={self.loo_batch})")
        set_("headline", tuple(self.headline))
        set_("thresholds", tuple(float(t) for t in self.thresholds))
        if self.thresholds and ("auto" not in self.estimators or any(not t >= 0 for t in self.thresholds)):
            raise ValueError(f"thresholds={self.thresholds!r}: give thresholds >= 0, with 'auto' in estimators (got {self.estimators!r})")


#: The reduced grid of ``--quick`` (MLP only, Adam and SGD, two phases, leave-one-out only).
QUICK = FidelityConfig(
    seeds=(0,), models=("mlp",), optimizers=("sgd", "adam"), phases=(("step 1", 1), ("mid", 30)), truths=("loo",),
    headline=("mlp", "adam", "mid", "loo"),
)
#: ``--grid optimizers``: the optimizers linearized later (:data:`NEW_OPTIMIZERS`) with Adam as
#: the reference, at steps 1, 3, 10, 100, 400, on the MLP and the untied LM (the CNN and the tied
#: LM are left out to fit the run in ~45 minutes on two shared cores; ``--models`` adds them),
#: every estimator and both diagnostics.
OPTIMIZER_GRID = FidelityConfig(
    models=("mlp", "lm"), optimizers=(*NEW_OPTIMIZERS, "adam"),
    phases=(("step 1", 1), ("step 3", 3), ("step 10", 10), ("step 100", 100), ("step 400", 400)),
    estimators=(*ORIGINAL_ESTIMATORS, *DIAGNOSTICS), headline=("mlp", "muon", "step 100", "loo"),
)
#: ``--grid early``: the first ten steps from initialisation, where the update of an adaptive
#: optimizer is far from linear in g, on the MLP, the CNN and the untied LM, under
#: :data:`EARLY_OPTIMIZERS`, at steps 1, 2, 3, 5 and 10: the secant, the tracker's default
#: (``auto``), the exact-update game (``exact``), the SGD proxy and ``exact-g``; every cell records
#: the update's nonlinearity ν and the route the default took (``nonlinearity``, ``route`` in
#: cells.csv), so the threshold can be re-evaluated from the cells (:func:`threshold_sweep`).
EARLY_GRID = FidelityConfig(
    models=("mlp", "cnn", "lm"), optimizers=EARLY_OPTIMIZERS,
    phases=(("step 1", 1), ("step 2", 2), ("step 3", 3), ("step 5", 5), ("step 10", 10)),
    estimators=("secant", "auto", "exact", "sgd", "exact-g"), truths=("shapley",),
    headline=("mlp", "adam", "step 1", "shapley"), thresholds=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
)
#: The streamable second-order point against the midpoint and the first-order point (issue: the
#: default mode streamed): the Adam family, where the optimizer keeps a first moment to predict g_B.
PREDICTED_GRID = FidelityConfig(
    models=("mlp", "cnn", "lm"), optimizers=("adam", "adamw", "adam-lr1e-2"),
    phases=(("early", 10), ("mid", 100), ("late", 400)), estimators=("secant", "exact-g"),
    val_points=("current", "midpoint", "predicted"), truths=("shapley", "loo"), headline=("cnn", "adam", "mid", "shapley"),
)
#: ``--grid`` name -> (configuration, default output folder).
GRIDS = {
    "default": (FidelityConfig(), "results/fidelity"),
    "optimizers": (OPTIMIZER_GRID, "results/fidelity_optimizers"),
    "early": (EARLY_GRID, "results/fidelity_early"),
    "predicted": (PREDICTED_GRID, "results/fidelity_predicted"),
}


# ----------------------------------------------------------------------------------- data, models


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_texts() -> tuple[str, ...]:
    return tuple(load_rotten_tomatoes()[0])


def lm_chunks(seed: int, length: int, vocab_size: int, val_fraction: float = 0.1) -> tuple[Split, Split, int]:
    """Rotten Tomatoes as next-token prediction on fixed-length chunks, no padding anywhere.

    The sentences are split into train/validation by ``seed``; the vocabulary is built from the
    training sentences; each split's sentences are tokenized and concatenated into one stream
    (out-of-vocabulary words become ``<unk>``, a real token) and cut into chunks of
    ``length + 1`` tokens: inputs ``chunk[:-1]``, targets ``chunk[1:]`` (``[N, length]`` each).

    Returns:
        ``(train, val, vocabulary size)``.
    """
    texts = _rotten_tomatoes_texts()
    perm = np.random.default_rng(seed).permutation(len(texts))
    n_val = int(len(texts) * val_fraction)
    val_texts, train_texts = [texts[i] for i in perm[:n_val]], [texts[i] for i in perm[n_val:]]
    vocab = WordVocabulary(train_texts, size=vocab_size)
    unk = vocab.index["<unk>"]

    def split(chosen: list[str]) -> Split:
        stream = [vocab.index.get(tok, unk) for text in chosen for tok in vocab.tokenize(text)]
        m = len(stream) // (length + 1)
        chunks = torch.tensor(stream[: m * (length + 1)], dtype=torch.long).view(m, length + 1)
        if (chunks == 0).any():  # lm_loss ignores id 0; a real token must never be 0
            raise RuntimeError("a token was encoded as the padding id 0")
        return Split(chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous(), torch.arange(m))

    return split(train_texts), split(val_texts), len(vocab)


@dataclasses.dataclass(frozen=True)
class Task:
    """One model on its data: train split, fixed validation batch, loss, model builder."""

    train: Split
    val_batch: tuple[torch.Tensor, torch.Tensor]
    loss_fn: object
    build: object  # () -> nn.Module


def make_task(model_name: str, seed: int, config: FidelityConfig) -> Task:
    """Data, validation batch, loss and a model factory, all in float64."""
    dtype = torch.float64
    if model_name in ("mlp", "cnn"):
        train, val, _ = load_digits(seed=seed, dtype=dtype, image=model_name == "cnn")
        builder = mlp if model_name == "mlp" else small_cnn
        build = lambda: builder(seed=seed).to(dtype)  # noqa: E731
        return Task(train, (val.inputs[: config.val_size], val.targets[: config.val_size]), nn.functional.cross_entropy, build)
    train, val, vocab = lm_chunks(seed, config.lm_length, config.lm_vocab)

    def build_lm() -> nn.Module:
        model = TinyLM(vocab, width=32, depth=2, heads=2, max_len=config.lm_length, tied=model_name == "lm-tied", seed=seed)
        # Softmax is invariant to adding the same number to every score, so the key projection's
        # bias has an identically zero gradient: frozen, it changes nothing. Trainable, its
        # rounding-level gradient trips the oracles' mean-or-sum check (see docs/results.md).
        for block in model.blocks:
            block.attn.k.bias.requires_grad_(False)
        return model.to(dtype)

    return Task(train, (val.inputs[: config.lm_val_size], val.targets[: config.lm_val_size]), lm_loss, build_lm)


def muon_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The parameters Muon steps in the study: the trainable 2-D weights of the ``nn.Linear`` layers.

    A weight that is also an ``nn.Embedding``'s (a tied LM head) is left out: it is an embedding.

    Example:
        >>> [tuple(p.shape) for p in muon_matrices(mlp(hidden=8, depth=1))]
        [(8, 64), (10, 8)]
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out, seen = [], set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and w is not None and w.requires_grad and w.dim() == 2 and id(w) not in embeddings | seen:
            seen.add(id(w))
            out.append(w)
    return out


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
    """The optimizer ``name`` from :data:`OPTIMIZERS` over the model's trainable parameters.

    ``"muon"`` gives a list ``[Muon, AdamW]``: Muon on :func:`muon_matrices`, AdamW
    (:data:`MUON_COMPANION`) on every other trainable parameter.

    Example:
        >>> [type(o).__name__ for o in make_optimizer("muon", mlp(depth=1))]
        ['Muon', 'AdamW']
    """
    cls, kwargs = OPTIMIZERS[name]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if name != "muon":
        return cls(trainable, **kwargs)
    matrices = muon_matrices(model)
    if not matrices:
        raise ValueError(f"{type(model).__name__} has no nn.Linear weight matrix for Muon to step")
    chosen = {id(p) for p in matrices}
    rest = [p for p in trainable if id(p) not in chosen]
    companion_cls, companion_kwargs = MUON_COMPANION
    return [cls(matrices, **kwargs), *([companion_cls(rest, **companion_kwargs)] if rest else [])]


def optimizer_list(opt) -> list[torch.optim.Optimizer]:
    """``[opt]`` for one optimizer, the list itself for several."""
    return list(opt) if isinstance(opt, (list, tuple)) else [opt]


# ----------------------------------------------------------------------------------------- study


def _bit_masks(n: int) -> torch.Tensor:
    """``[2^n, n]`` bool: row b is the coalition of the set bits of b."""
    return (torch.arange(2**n).unsqueeze(1) >> torch.arange(n)) & 1 == 1


def _shapley_from_utilities(u: torch.Tensor, n: int) -> torch.Tensor:
    """Exact Shapley values ``[n]`` of a game given on :func:`_bit_masks` order, ``u [2^n]``."""
    index = torch.arange(2**n)
    sizes = _bit_masks(n).sum(1)
    weights = torch.tensor([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)], dtype=torch.float64)
    out = torch.empty(n, dtype=torch.float64)
    for z in range(n):
        without = index[(index >> z) & 1 == 0]
        out[z] = (weights[sizes[without]] * (u[without | (1 << z)] - u[without])).sum()
    return out


def coalition_updates(lin, p: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Δ(g_S) of parameter ``p`` for a stack of coalition gradients ``grads [m, *p.shape]``.

    Elementwise rules broadcast over the leading coalition axis; operator rules (Muon's
    Newton–Schulz, Adafactor's row and column means and its clipping norm) couple the entries of
    one gradient and would silently mix coalitions, so they are mapped over it with ``torch.vmap``.
    ``lin`` is a linearization or a ``LinearizationGroup`` (then ``p``'s owner's rule is used).
    """
    owner = lin.owner(p) if hasattr(lin, "owner") else lin
    if owner.structure == "elementwise":
        return type(owner).update_rule(p.detach(), grads, owner.state(p))
    return torch.vmap(lambda g: owner.update(p, g))(grads)


def _coalition_masks(n: int, truth: str) -> torch.Tensor:
    """Row 0 the full batch, row z+1 the batch without z (``loo``); every coalition (``shapley``)."""
    if truth == "loo":
        masks = torch.ones(n + 1, n, dtype=torch.bool)
        masks[1:].fill_diagonal_(False)
        return masks
    return _bit_masks(n)


def _values_from_utilities(u: torch.Tensor, n: int, truth: str) -> torch.Tensor:
    """Leave-one-out (``u`` on :func:`_coalition_masks` order) or exact Shapley values ``[n]``."""
    return u[0] - u[1:] if truth == "loo" else _shapley_from_utilities(u, n)


def _linearized_at_batch_grad(model, opt, contribs):
    """The trainable parameters by name and the linearization read with ``.grad`` = the batch gradient."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = {p: p.grad for p in named.values()}
    for name, p in named.items():
        p.grad = contribs[name].sum(0)
    return named, saved, optimizers.linearize(opt)


def exact_in_g_values(model, opt, loss_fn, batch, val_batch, truth: str, val_points, chunk: int = 128) -> dict[str, torch.Tensor]:
    """Leave-one-out or exact Shapley values of the game that is first order in θ, exact in g.

        Ū_vp(S) = −⟨∇L_val(θ_vp), Δ(g_S)⟩,   Δ = the optimizer's exact update (``optimizers``),
        θ_vp = θ_t, θ_t + Δ(g_B) or θ_t + ½(Δ(g_B) + Δ(0)) for ``vp`` = current, lookahead, midpoint.

    A diagnostic that splits an estimate's error in two: (estimate vs Ū) is the error of
    linearizing the update in g (the tangent or secant J), (Ū vs the real game) is the curvature
    of the validation loss in θ that the chosen validation point leaves out. Needs materialized
    per-sample gradients and, for Shapley, the update of every coalition: not an in-run method.
    ``opt`` may be a list of optimizers (each parameter held by one); operator rules (Muon,
    Adafactor) are evaluated per coalition (:func:`coalition_updates`).

    Returns:
        ``{val_point: float64 [n]}``, without ``"predicted"`` for an optimizer that predicts no gradient.
    """
    contribs = validation.per_sample_grads(model, loss_fn, batch)
    n = next(iter(contribs.values())).shape[0]
    masks = _coalition_masks(n, truth)
    named, saved, lin = _linearized_at_batch_grad(model, opt, contribs)
    try:
        params = {name: p for name, p in named.items() if p in lin}
        grads = {p: p.grad for p in params.values()}
        shifts = {}
        for vp in val_points:
            try:
                shifts[vp] = estimators.val_point_shift(lin, list(params.values()), grads, vp)
            except estimators.NoGradientPredictionError:
                continue  # left out of the result: the caller records the variant as refused
        val_points = list(shifts)
        val_grads = {
            vp: estimators.validation_gradients(model, loss_fn, [val_batch], params=list(params.values()), shift=shifts[vp])[0]
            for vp in val_points
        }
        u = torch.zeros(len(masks), len(val_points), dtype=torch.float64)
        for name, p in params.items():
            c = contribs[name].reshape(n, -1)
            g_val = torch.stack([val_grads[vp][p].reshape(-1) for vp in val_points], dim=1)  # [P, V]
            for start in range(0, len(masks), chunk):
                m = masks[start : start + chunk].to(c.dtype)
                delta = coalition_updates(lin, p, (m @ c).reshape(len(m), *p.shape))
                u[start : start + chunk] -= (delta.reshape(len(m), -1) @ g_val).double()
    finally:
        for p, g in saved.items():
            p.grad = g
    return {vp: _values_from_utilities(u[:, k], n, truth) for k, vp in enumerate(val_points)}


def twin_game_values(model, opt, loss_fn, batch, val_batch, truth: str, chunk: int = 64) -> torch.Tensor:
    """Leave-one-out or exact Shapley values of the step's game played with the linearization's update.

        U_lin(S) = L_val(θ_t) − L_val(θ_t + Δ_lin(g_S)),   Δ_lin = ``optimizers.linearize(opt).update``

    exact in g and in θ (every coalition's update applied, the validation loss evaluated there).
    Wherever Δ_lin is the real ``step()`` (to 1e-10 for every elementwise optimizer and for
    Adafactor) this is the oracle's game; for Muon Δ_lin is the float64 twin of torch's
    bfloat16 Newton–Schulz, so its distance from the oracle is the bf16 rounding of the real step.
    Not an in-run method (per-sample gradients, one validation pass per coalition).

    Returns:
        float64 ``[n]``.
    """
    contribs = validation.per_sample_grads(model, loss_fn, batch)
    n = next(iter(contribs.values())).shape[0]
    masks = _coalition_masks(n, truth)
    named, saved, lin = _linearized_at_batch_grad(model, opt, contribs)
    training = model.training
    u = torch.zeros(len(masks), dtype=torch.float64)
    try:
        model.eval()  # as the oracles' L_val (val_train_mode=False)
        params = {name: p for name, p in named.items() if p in lin}
        with torch.no_grad():
            for start in range(0, len(masks), chunk):
                m = masks[start : start + chunk]
                deltas = {
                    name: coalition_updates(lin, p, (m.to(contribs[name].dtype) @ contribs[name].reshape(n, -1)).reshape(len(m), *p.shape))
                    for name, p in params.items()
                }
                for k in range(len(m)):
                    moved = {name: p.detach() + deltas[name][k] for name, p in params.items()}
                    out = torch.func.functional_call(model, moved, (val_batch[0],), tie_weights=True)
                    u[start + k] = -loss_fn(out, val_batch[1]).double()
    finally:
        model.train(training)
        for p, g in saved.items():
            p.grad = g
    return _values_from_utilities(u, n, truth)


def auto_values(model, opt, loss_fn, batch, val_batch, threshold: float | None = None) -> tuple[torch.Tensor, str, float]:
    """The tracker's default values of this step (secant, midpoint, ``route="auto"``), the route it took and ν.

    What ``step_values(..., route="auto", nonlinearity_threshold=threshold)`` computes (the same
    :class:`attribution._step.StepComputer`, the same seed of the exact route's orders), with
    the computer's own record of the route (``"linear"``, ``"exact"`` or ``"mixed"``: the exact
    route for some parameters) and of the update's nonlinearity ν, which ``step_values`` does
    not return. ``threshold=None`` is ``attribution._step.DEFAULT_NONLINEARITY_THRESHOLD``.
    ``.grad`` is left as found.

    Returns:
        ``(values [n] float64, route, ν)``.
    """
    computer = attribution_step.StepComputer(model, loss_fn, [val_batch], AttributionConfig("secant", "midpoint", "ghost"))
    computer.route = "auto"
    if threshold is not None:
        computer.nonlinearity_threshold = float(threshold)
    saved = {p: p.grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.grad = None
        with computer.capture():
            loss_fn(model(batch[0]), batch[1]).backward()
        values = computer.step_values(opt, generator=torch.Generator().manual_seed(0))
        nu = computer.last_nonlinearity
        return values[:, 0], computer.last_route, float("nan") if nu is None else float(nu)
    finally:
        computer.reset()
        for p, g in saved.items():
            p.grad = g


def threshold_values(model, opt, loss_fn, batch, val_batch, thresholds) -> dict[float, tuple[torch.Tensor, str, float, float]]:
    """:func:`auto_values` at each threshold τ, computing only where the route can differ.

    A parameter takes the exact route where its update's nonlinearity exceeds τ (or jumps), so
    the exact set shrinks as τ grows: a ``"linear"`` step at τ is linear at every larger τ, an
    ``"exact"`` one (every parameter) exact at every smaller τ. Those results are reused.

    Returns:
        ``{τ: (values, route, ν, seconds)}`` (``seconds`` 0.0 for a reused result).
    """
    taus = sorted({float(t) for t in thresholds})
    out: dict[float, tuple] = {}

    def compute(tau):
        t0 = time.perf_counter()
        values, route, nu = auto_values(model, opt, loss_fn, batch, val_batch, tau)
        out[tau] = (values, route, nu, time.perf_counter() - t0)

    compute(taus[-1])
    if out[taus[-1]][1] == "exact":  # every smaller τ: exact too
        out.update({tau: (*out[taus[-1]][:3], 0.0) for tau in taus[:-1]})
        return out
    for k, tau in enumerate(taus[:-1]):
        compute(tau)
        if out[tau][1] == "linear":  # every larger τ: linear too
            out.update({t: (*out[tau][:3], 0.0) for t in taus[k + 1 :] if t not in out})
            break
    return out


def _refusal(error: Exception) -> str:
    """The one-line reason recorded for a refused estimate."""
    return f"{type(error).__name__}: " + " ".join(str(error).split())


def _pearson_vs(estimates: dict, refused: dict, variant: str, reference: str) -> float:
    """Pearson R of ``variant``'s values against ``reference``'s (same cell); NaN if either is missing or refused."""
    if reference not in estimates or variant in refused or reference in refused:
        return float("nan")
    return validation.fidelity(estimates[variant], estimates[reference])["pearson"]


def _cell(model, opt, loss_fn, batch, val_batch, truth: str, config: FidelityConfig, n_shapley: int):
    """Rows (one per estimate) and per-sample values of one cell: this step, this truth.

    An estimator the linearization refuses here (:class:`optimizers.UpdateJumpError`) gives rows
    with NaN values and metrics and the reason in ``refused``. The refusal comes from the
    step's preconditioner, which does not depend on the validation point, so the other validation
    points of that estimator are recorded with the same reason without being recomputed.
    """
    if truth == "loo":
        t0 = time.perf_counter()
        target, efficiency = validation.leave_one_out(model, opt, loss_fn, batch, val_batch, progress=False), None
    else:
        batch = (batch[0][:n_shapley], batch[1][:n_shapley])
        t0 = time.perf_counter()
        est = validation.shapley_values(model, opt, loss_fn, batch, val_batch, exact=True, progress=False)
        target, efficiency = est.values, est.efficiency_target
    oracle_s = time.perf_counter() - t0
    estimates, seconds, refused = {}, {}, {}
    nonlinearity, route = float("nan"), ""
    for est_name in config.estimators:
        if est_name == "exact-g":
            t0 = time.perf_counter()
            exact = exact_in_g_values(model, opt, loss_fn, batch, val_batch, truth, config.val_points)
            for vp in config.val_points:
                if vp in exact:
                    estimates[f"{est_name}/{vp}"] = exact[vp]
                else:  # the predicted point of an optimizer that predicts no gradient
                    estimates[f"{est_name}/{vp}"] = torch.full_like(target, float("nan"))
                    refused[f"{est_name}/{vp}"] = "no gradient prediction"
                seconds[f"{est_name}/{vp}"] = (time.perf_counter() - t0) / len(config.val_points)
            continue
        if est_name == "auto" and "midpoint" in config.val_points:
            t0 = time.perf_counter()
            estimates["auto/midpoint"], route, nonlinearity = auto_values(model, opt, loss_fn, batch, val_batch)
            seconds["auto/midpoint"] = time.perf_counter() - t0
            continue
        if est_name == "twin":
            t0 = time.perf_counter()
            estimates["twin/exact"] = twin_game_values(model, opt, loss_fn, batch, val_batch, truth)
            seconds["twin/exact"] = time.perf_counter() - t0
            continue
        reason = None
        for vp in [v for v in config.val_points if v in ESTIMATOR_VAL_POINTS.get(est_name, ACCEPTED_VAL_POINTS)]:
            variant = f"{est_name}/{vp}"
            t0 = time.perf_counter()
            point_reason = None
            if reason is None:
                try:
                    estimates[variant] = step_values(model, opt, loss_fn, batch, val_batch, val_point=vp, **ESTIMATORS[est_name])
                except optimizers.UpdateJumpError as error:
                    reason = _refusal(error)
                except estimators.NoGradientPredictionError as error:
                    point_reason = _refusal(error)  # this point only: the optimizer predicts no gradient
            if reason is not None or point_reason is not None:
                estimates[variant] = torch.full_like(target, float("nan"))
                refused[variant] = reason or point_reason
            seconds[variant] = time.perf_counter() - t0
    rows = []
    nan_metrics = {m: float("nan") for m in METRICS}
    for variant, value in estimates.items():
        est_name, vp = variant.split("/")
        if variant in refused:
            fid, undefined = {**nan_metrics, "estimate_sum": float("nan")}, "refused"
        else:
            fid = validation.fidelity(value, target, efficiency_target=efficiency)
            undefined = ";".join(sorted(fid["undefined"]))
        vs_tangent, vs_exact_g = (_pearson_vs(estimates, refused, variant, f"{ref}/{vp}") for ref in ("tangent", "exact-g"))
        rows.append({
            "truth": truth, "estimator": est_name, "val_point": vp, "variant": variant, "n": len(target),
            **{m: fid[m] for m in METRICS},
            "pearson_vs_tangent": vs_tangent, "pearson_vs_exact_g": vs_exact_g,
            "estimate_sum": fid["estimate_sum"], "truth_sum": float(target.sum()),
            "efficiency_target": float("nan") if efficiency is None else float(efficiency),
            "undefined": undefined, "refused": refused.get(variant, ""),
            "nonlinearity": nonlinearity, "route": route if est_name == "auto" else "",
            "oracle_seconds": oracle_s, "estimate_seconds": seconds[variant],
        })
    values = pd.DataFrame({"truth": truth, "sample": np.arange(len(target)), "truth_value": target.numpy(),
                           **{v: e.numpy() for v, e in estimates.items()}})
    sweep = []
    if config.thresholds and "midpoint" in config.val_points:
        for tau, (value, tau_route, nu, sec) in threshold_values(model, opt, loss_fn, batch, val_batch, config.thresholds).items():
            fid = validation.fidelity(value, target, efficiency_target=efficiency)
            sweep.append({"truth": truth, "threshold": tau, "route": tau_route, "nonlinearity": nu, "n": len(target),
                          "pearson": fid["pearson"], "relative_efficiency_gap": fid["relative_efficiency_gap"], "seconds": sec})
    return rows, values, sweep


def update_error(opt, take_step) -> float:
    """‖θ_{t+1} − θ_t − Δ_lin(g_B)‖ / ‖Δ_lin(g_B) − Δ_lin(0)‖ over the first optimizer's parameters.

    Call it after ``backward()``; it takes the step (``take_step()`` steps every optimizer). Δ_lin is the linearization's update, read just before; for ``"muon"`` the first
    optimizer is Muon, so this is the relative size of torch's bfloat16 rounding in the real step
    against the float64 twin, measured on the part of the update the values attribute.
    """
    opts = optimizer_list(opt)
    lin = optimizers.linearize(opts[0], copy_state=True)
    params = [p for p in lin.params]
    with torch.no_grad():
        predicted = [lin.update(p, p.grad) for p in params]
        own = [d - lin.update(p, torch.zeros_like(p.grad)) for p, d in zip(params, predicted)]
        before = [p.detach().clone() for p in params]
    take_step()
    with torch.no_grad():
        gap = torch.sqrt(sum(((p - b - d) ** 2).sum() for p, b, d in zip(params, before, predicted)))
        size = torch.sqrt(sum((d**2).sum() for d in own))
    return float(gap / size) if size > 0 else float("nan")


def run_one(model_name: str, optimizer: str, seed: int, config: FidelityConfig, bar=None):
    """Train one (model, optimizer, seed) to the last phase; evaluate every cell on the way.

    Returns ``(rows, values, sweep)``: lists of dicts, of per-sample DataFrames and of
    :attr:`FidelityConfig.thresholds` rows (dicts; empty without thresholds).
    """
    task = make_task(model_name, seed, config)
    model = task.build()
    opt = make_optimizer(optimizer, model)
    opts = optimizer_list(opt)

    def take_step():
        for o in opts:
            o.step()

    gen = torch.Generator().manual_seed(seed)
    order, pointer = torch.randperm(len(task.train), generator=gen), 0
    phase_at = {step: name for name, step in config.phases}
    n_shapley = config.lm_shapley_batch if model_name.startswith("lm") else config.shapley_batch
    rows, values, sweeps = [], [], []
    meta = {"model": model_name, "optimizer": optimizer, "lr": OPTIMIZERS[optimizer][1]["lr"], "seed": seed}
    for step in range(1, config.phases[-1][1] + 1):
        if pointer + config.loo_batch > len(order):
            order, pointer = torch.randperm(len(task.train), generator=gen), 0
        batch = task.train.batch(order[pointer : pointer + config.loo_batch])
        pointer += config.loo_batch
        cell_rows, cell_values, cell_sweep = [], [], []
        if step in phase_at:
            with torch.no_grad():
                val_loss = float(task.loss_fn(model(task.val_batch[0]), task.val_batch[1]))
            for truth in config.truths:
                r, v, sw = _cell(model, opt, task.loss_fn, batch, task.val_batch, truth, config, n_shapley)
                cell = {**meta, "phase": phase_at[step], "step": step, "val_loss": val_loss}
                cell_rows += [{**cell, **row} for row in r]
                cell_values.append(v.assign(**cell))
                cell_sweep += [{**cell, **row} for row in sw]
            if bar is not None:
                bar.update(1)
        for o in opts:
            o.zero_grad()
        loss = task.loss_fn(model(batch[0]), batch[1])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{model_name}/{optimizer}/seed {seed}: training loss is {loss.item()} at step {step}")
        loss.backward()
        if step in phase_at:
            # The step just valued, taken for real: how far is it from the linearization's update?
            error = update_error(opt, take_step)
            rows += [{**row, "update_rel_error": error} for row in cell_rows]
            values += cell_values
            sweeps += cell_sweep
        else:
            take_step()
    return rows, values, sweeps


def machine() -> dict:
    """CPU count, CPU model, torch and Python versions."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}


def run(config: FidelityConfig = FidelityConfig(), out: str | Path = "results/fidelity", progress: bool = True, command: str | None = None):
    """Run the grid; write every output to ``out``; return ``(cells, values)`` DataFrames."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json())
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    runs = [(m, o, s) for s in config.seeds for m in config.models for o in config.optimizers]
    rows, values, sweeps = [], [], []
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), tqdm(total=len(runs) * len(config.phases), desc="fidelity grid", unit="cell", disable=not progress) as bar:
            # vmap over the LM's scaled_dot_product_attention falls back to a loop (slow, correct).
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")
            for model_name, optimizer, seed in runs:
                bar.set_postfix_str(f"{model_name} {optimizer} seed {seed}")
                r, v, sw = run_one(model_name, optimizer, seed, config, bar)
                rows += r
                values += v
                sweeps += sw
        seconds = time.perf_counter() - start
        info = {"command": command, "seconds": round(seconds, 1), "machine": machine(), "cells": len(runs) * len(config.phases) * len(config.truths),
                "nonlinearity_threshold": attribution_step.DEFAULT_NONLINEARITY_THRESHOLD}
    finally:
        torch.set_num_threads(threads)
    cells = pd.DataFrame(rows)
    cells.to_csv(out / "cells.csv", index=False)
    vals = pd.concat(values, ignore_index=True)
    vals.to_csv(out / "values.csv", index=False)
    info["rows"] = len(cells)
    sweep = pd.DataFrame(sweeps)
    if not sweep.empty:
        sweep.to_csv(out / "sweep.csv", index=False)
    (out / "run.json").write_text(json.dumps(info, indent=2))
    (out / "results.md").write_text(markdown(cells, config, info, vals, sweep))
    plots(cells, vals, config, out)
    return cells, vals


# ---------------------------------------------------------------------------------------- report


def rewrite_report(out: str | Path) -> Path:
    """Write ``out/results.md`` again from the run's own files (config.json, run.json, cells.csv, values.csv, sweep.csv).

    For a run made before a table was added to :func:`markdown`: the tables change, the
    measurements do not (nothing is recomputed). Returns the path of ``results.md``.
    """
    out = Path(out)
    config = FidelityConfig.from_json((out / "config.json").read_text())
    info = json.loads((out / "run.json").read_text())

    def read(name):  # an empty "refused" or "route" stays a string
        return pd.read_csv(out / name, keep_default_na=False, na_values=[""])

    cells = read("cells.csv")
    for col in ("refused", "route", "undefined"):
        if col in cells:
            cells[col] = cells[col].fillna("").astype(str)
    sweep = read("sweep.csv") if (out / "sweep.csv").exists() else None
    (out / "results.md").write_text(markdown(cells, config, info, read("values.csv"), sweep))
    return out / "results.md"


def _mean_spread(series: pd.Series, refused: pd.Series | None = None) -> str:
    """``mean ±sd`` of the finite entries; ``refused`` where every entry was refused, and the count
    of refused entries where some were (``refused``: a boolean series aligned with ``series``).

    Example:
        >>> _mean_spread(pd.Series([0.5, 0.7, float("nan")]), pd.Series([False, False, True]))
        '0.600 ±0.141 (1/3 refused)'
    """
    k = 0 if refused is None else int(refused.sum())
    if k and k == len(series):
        return "refused"
    x = series.dropna()
    text = "n/a" if x.empty else (f"{x.mean():.3f}" if len(x) == 1 else f"{x.mean():.3f} ±{x.std(ddof=1):.3f}")
    return f"{text} ({k}/{len(series)} refused)" if k else text


def _is_refused(frame: pd.DataFrame) -> pd.Series:
    """Rows whose estimate was refused (the ``refused`` column holds the reason; absent in older runs)."""
    if "refused" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["refused"].fillna("").astype(str) != ""


def _ordered(frame: pd.DataFrame, config: FidelityConfig) -> pd.DataFrame:
    order = {"model": config.models, "optimizer": config.optimizers, "phase": [p for p, _ in config.phases]}
    for col, cats in order.items():
        if col in frame:
            frame[col] = pd.Categorical(frame[col], categories=list(cats), ordered=True)
    return frame


def summary_table(cells: pd.DataFrame, config: FidelityConfig, truth: str, metric: str = "pearson", variants=None, by=("model", "optimizer", "phase")) -> pd.DataFrame:
    """``metric`` per row group (mean ±sd over seeds and whatever ``by`` leaves out) × variant."""
    frame = _ordered(cells[cells.truth == truth].copy(), config)
    variants = [v for v in (variants or frame["variant"].unique()) if v in set(frame["variant"])]
    frame = frame[frame.variant.isin(variants)]
    frame = frame.assign(_refused=_is_refused(frame))
    table = frame.groupby([*by, "variant"], observed=True).apply(
        lambda g: _mean_spread(g[metric], g["_refused"]), include_groups=False
    ).unstack("variant")
    return table[variants]


def refused_table(cells: pd.DataFrame, config: FidelityConfig) -> pd.DataFrame:
    """Refused estimates: per (optimizer, model, estimator, truth), refused cells / cells, the
    phases they fell in, and the reason (the first 140 characters of each distinct one)."""
    frame = cells.assign(_refused=_is_refused(cells))
    frame = frame[frame.val_point == frame.groupby("estimator").val_point.transform("first")]  # one row per cell
    hit = frame[frame._refused]
    if hit.empty:
        return pd.DataFrame()
    out = []
    for key, g in _ordered(frame.copy(), config).groupby(["optimizer", "model", "estimator", "truth"], observed=True):
        r = g[g._refused]
        if r.empty:
            continue
        reasons = " / ".join(dict.fromkeys(x[:140] + ("…" if len(x) > 140 else "") for x in r.refused))
        out.append({"optimizer": key[0], "model": key[1], "estimator": key[2], "truth": key[3],
                    "refused cells": f"{len(r)}/{len(g)}", "phases": ", ".join(dict.fromkeys(map(str, r.phase))), "reason": reasons})
    return pd.DataFrame(out).set_index(["optimizer", "model", "estimator", "truth"])


def update_error_table(cells: pd.DataFrame, config: FidelityConfig) -> pd.DataFrame:
    """``update_rel_error`` (one number per model, seed and phase) per optimizer × phase: median and max."""
    one = cells.drop_duplicates(["model", "optimizer", "seed", "phase"])
    one = _ordered(one.copy(), config)
    g = one.groupby(["optimizer", "phase"], observed=True)["update_rel_error"]
    return pd.DataFrame({"median": g.median().map("{:.1e}".format), "max": g.max().map("{:.1e}".format)}).unstack("phase").swaplevel(axis=1).sort_index(axis=1, level=0, sort_remaining=False)


def threshold_sweep(sweep: pd.DataFrame, config: FidelityConfig, truth: str = "shapley") -> pd.DataFrame:
    """The default's Pearson R per threshold τ and phase (rows of ``sweep.csv``, :attr:`FidelityConfig.thresholds`).

    Returns:
        rows τ, columns ``(phase, "min R" | "mean R" | "exact")``: the minimum and mean R over
        the cells, and the cells whose route was not linear (exact or mixed); empty without rows.
    """
    frame = sweep[sweep.truth == truth] if not sweep.empty else sweep
    if frame.empty:
        return pd.DataFrame()
    phases = [p for p, _ in config.phases if p in set(frame.phase)]
    rows = {}
    for tau, g in frame.groupby("threshold"):
        row = {}
        for ph in phases:
            sel = g[g.phase == ph]
            row[(ph, "min R")] = f"{sel.pearson.min():.3f}"
            row[(ph, "mean R")] = f"{sel.pearson.mean():.3f}"
            row[(ph, "exact")] = f"{int((sel.route != 'linear').sum())}/{len(sel)}"
        rows[f"{tau:g}"] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    table.index.name = "τ"
    return table


def phase_extremes(cells: pd.DataFrame, config: FidelityConfig, truth: str, variants) -> pd.DataFrame:
    """Per phase and variant: ``min / mean`` Pearson R over every cell (models, optimizers, seeds) and the cells below 0.95."""
    frame = _ordered(cells[(cells.truth == truth) & cells.variant.isin(list(variants))].copy(), config)
    if frame.empty:
        return pd.DataFrame()
    shown = [v for v in variants if v in set(frame.variant)]
    g = frame.groupby(["phase", "variant"], observed=True)["pearson"]
    text = g.apply(lambda x: f"{x.min():.3f} / {x.mean():.3f} ({int((x < 0.95).sum())}/{len(x)} < 0.95)")
    return text.unstack("variant")[shown]


def seconds_table(cells: pd.DataFrame, config: FidelityConfig, variants) -> pd.DataFrame:
    """Median seconds per estimate (``step_values``' own forward and backward included) and of the oracle, per model."""
    frame = _ordered(cells[cells.variant.isin(list(variants))].copy(), config)
    if frame.empty:
        return pd.DataFrame()
    shown = [v for v in variants if v in set(frame.variant)]
    table = frame.groupby(["model", "truth", "variant"], observed=True)["estimate_seconds"].median().unstack("variant")[shown]
    table["oracle"] = frame.groupby(["model", "truth"], observed=True)["oracle_seconds"].median()
    return table.map("{:.3f}".format)


def route_table(cells: pd.DataFrame, config: FidelityConfig, truth: str) -> pd.DataFrame:
    """ν (mean, min–max over models and seeds) and the default's exact cells per optimizer × phase."""
    frame = _ordered(cells[(cells.truth == truth) & (cells.variant == "auto/midpoint")].copy(), config)
    if frame.empty:
        return pd.DataFrame()
    g = frame.groupby(["optimizer", "phase"], observed=True)
    out = pd.DataFrame({
        "ν": g["nonlinearity"].apply(lambda x: f"{x.mean():.3f} ({x.min():.3f}–{x.max():.3f})"),
        "exact / mixed route": g["route"].apply(lambda x: f"{int((x == 'exact').sum())} / {int(x.str.startswith('mixed').sum())} of {len(x)}"),
    })
    return out.unstack("phase").swaplevel(axis=1).sort_index(axis=1, level=0, sort_remaining=False)


def step1_dependence(vals: pd.DataFrame, config: FidelityConfig, truth: str = "loo") -> pd.DataFrame | None:
    """Pearson R between the ``truth`` values of the step-1 batch under two optimizers, mean ±sd over models and seeds.

    At step 1 every optimizer of a (model, seed) starts from the same θ and values the same batch
    (the seed fixes both), so the R between two optimizers' true values measures how much the
    optimizer alone changes the attribution. The row ``sgd proxy`` is the SGD proxy's value of
    the first non-Muon optimizer's cell (−lr⟨∇L_val, c_z⟩: the first-order SGD value, the same for
    every single-lr optimizer up to scale).
    """
    first = config.phases[0][0]
    sub = vals[(vals.phase == first) & (vals.truth == truth)]
    if sub.empty or len(config.optimizers) < 2:
        return None
    names = list(config.optimizers)
    single = [o for o in names if o != "muon"]
    rs = {}
    for (_, _), g in sub.groupby(["model", "seed"]):
        cols = {o: g[g.optimizer == o].sort_values("sample")["truth_value"].to_numpy() for o in names if (g.optimizer == o).any()}
        if single and "sgd/current" in g and (g.optimizer == single[0]).any():
            cols["sgd proxy"] = g[g.optimizer == single[0]].sort_values("sample")["sgd/current"].to_numpy()
        keys = list(cols)
        for a in keys:
            for b in keys:
                if len(cols[a]) == len(cols[b]):
                    rs.setdefault((a, b), []).append(float(np.corrcoef(cols[a], cols[b])[0, 1]))
    rows = [*names, "sgd proxy"]
    table = pd.DataFrame({b: [_mean_spread(pd.Series(rs.get((a, b), []), dtype=float)) for a in rows] for b in rows}, index=pd.Index(rows, name="optimizer"))
    return table


def markdown(cells: pd.DataFrame, config: FidelityConfig, info: dict, vals: pd.DataFrame | None = None, sweep: pd.DataFrame | None = None) -> str:
    """The study's tables as markdown (``results.md``); ``vals`` (values.csv) adds the step-1 optimizer-dependence table,
    ``sweep`` (sweep.csv) the threshold sweep."""
    m = info["machine"]
    truth_name = {"loo": "leave-one-out (n = {})".format(config.loo_batch),
                  "shapley": "exact Shapley (n = {}, LM n = {})".format(config.shapley_batch, config.lm_shapley_batch)}
    parts = [
        "# Fidelity study: results",
        "",
        f"Command: `{info['command'] or 'python -m attribution fidelity'}`; {info['cells']} cells, {info['rows']} rows, "
        f"{info['seconds']:.0f} s on {m['nproc']} × {m['cpu']} (torch {m['torch']}, {m['torch_threads']} threads).",
        f"Seeds {list(config.seeds)}; entries are Pearson R, mean ±sd over seeds unless stated.",
    ]
    for truth in config.truths:
        parts += ["", f"## Key variants, mean over models: Pearson R against {truth_name[truth]}", "",
                  frame_table(summary_table(cells, config, truth, variants=KEY_VARIANTS, by=("optimizer", "phase")))]
    for truth in config.truths:
        parts += ["", f"## Mean over models: Pearson R against {truth_name[truth]}", "",
                  frame_table(summary_table(cells, config, truth, by=("optimizer", "phase")))]
    for truth in config.truths:
        parts += ["", f"## Every cell: Pearson R against {truth_name[truth]}", "",
                  frame_table(summary_table(cells, config, truth, variants=KEY_VARIANTS))]
    if "factored" in config.estimators and "tangent" in config.estimators:
        fac = cells[cells.estimator == "factored"]
        if not fac.empty:
            parts += ["", "## Factored against dense: Pearson R of factored vs dense tangent values (same cells, same val point), mean over models", "",
                      frame_table(summary_table(fac, config, config.truths[0], metric="pearson_vs_tangent", by=("optimizer", "phase")))]
    if "shapley" in config.truths:
        parts += ["", "## Efficiency: (Σ estimate − (U(B) − U(∅))) / |U(B) − U(∅)| against exact Shapley, mean over models", "",
                  frame_table(summary_table(cells, config, "shapley", metric="relative_efficiency_gap", by=("optimizer", "phase"),
                                    variants=["sgd/current", "tangent/lookahead", "secant/current", "secant/midpoint",
                                              "auto/midpoint", "exact/midpoint"]))]
    if "auto" in config.estimators:
        tau = info.get("nonlinearity_threshold", attribution_step.DEFAULT_NONLINEARITY_THRESHOLD)
        early = ["secant/midpoint", "auto/midpoint", "exact/midpoint", "sgd/current", "exact-g/midpoint"]
        for truth in config.truths:
            parts += ["", (f"## Per phase, every cell: min / mean Pearson R against {truth_name[truth]} (auto: τ = {tau:g}), "
                           "and the cells below 0.95"), "", frame_table(phase_extremes(cells, config, truth, early))]
        parts += ["", "## Median seconds per estimate and per oracle cell", "",
                  frame_table(seconds_table(cells, config, ["secant/midpoint", "auto/midpoint", "exact/midpoint", "sgd/midpoint"]))]
        for truth in config.truths:
            parts += ["", (f"## The automatic route (τ = {tau:g}): the update's nonlinearity ν at the midpoint and the cells "
                           f"the default values by the exact-update game, cells of {truth_name[truth]}"), "",
                      frame_table(route_table(cells, config, truth))]
        if sweep is not None and not sweep.empty:
            for truth in config.truths:
                table = threshold_sweep(sweep, config, truth)
                if not table.empty:
                    parts += ["", (f"## Threshold sweep: Pearson R of the default (secant, midpoint, route='auto') at each threshold τ "
                                   f"against {truth_name[truth]}, min and mean over cells, and the cells with an exact or mixed route"), "",
                              frame_table(table)]
    if _is_refused(cells).any():
        parts += ["", "## Refused estimates (NaN metrics; the linearization's reason)", "",
                  "One count per cell (all validation points of a refused estimator are refused with it).", "",
                  frame_table(refused_table(cells, config))]
    if "sgd" in config.estimators and "tangent" in config.estimators:
        if "exact-g" in config.estimators and "pearson_vs_exact_g" in cells:
            parts += ["", "## How optimizer-dependent the values are: Pearson R of each in-run variant vs the exact-g/current values "
                      "(the optimizer's exact update in g, first order in θ; same cell, the cells of "
                      f"{truth_name[config.truths[0]]}), mean over models", "",
                      frame_table(summary_table(cells, config, config.truths[0], metric="pearson_vs_exact_g", by=("optimizer", "phase"),
                                                variants=["sgd/current", "tangent/current", "secant/current"]))]
    if vals is not None:
        for truth in config.truths:
            dep = step1_dependence(vals, config, truth)
            if dep is not None:
                parts += ["", f"## Optimizer dependence at {config.phases[0][0]}: Pearson R between the {truth_name[truth]} values "
                          "of the same batch at the same θ under two optimizers, mean ±sd over models and seeds", "",
                          frame_table(dep)]
    if "update_rel_error" in cells and cells["update_rel_error"].notna().any():
        parts += ["", "## The linearization's update against the real step: ‖θ_{t+1} − θ_t − Δ_lin(g_B)‖ / ‖Δ_lin(g_B) − Δ_lin(0)‖ "
                  "over the (first) optimizer's parameters (Muon's matrices for muon), median and max over models and seeds", "",
                  frame_table(update_error_table(cells, config))]
    return "\n".join(parts) + "\n"


def plots(cells: pd.DataFrame, vals: pd.DataFrame, config: FidelityConfig, out: Path) -> None:
    """``r_by_phase_<truth>.png`` (R by phase per estimator) and ``scatter_headline.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p, _ in config.phases]
    variants = [v for v in KEY_VARIANTS if v in set(cells.variant)]
    for truth in config.truths:
        frame = cells[cells.truth == truth]
        nr, nc = len(config.models), len(config.optimizers)
        fig, axes = plt.subplots(nr, nc, figsize=(2.6 * nc + 1.5, 2.2 * nr + 0.6), sharex=True, sharey=True, squeeze=False)
        for i, model_name in enumerate(config.models):
            for j, optimizer in enumerate(config.optimizers):
                ax = axes[i, j]
                sub = frame[(frame.model == model_name) & (frame.optimizer == optimizer)]
                for variant in variants:
                    g = sub[sub.variant == variant].groupby("phase")["pearson"]
                    mean, lo, hi = (g.mean().reindex(phases), g.min().reindex(phases), g.max().reindex(phases))
                    line = ax.plot(range(len(phases)), mean.values, marker="o", ms=3, lw=1.2, label=variant)[0]
                    ax.fill_between(range(len(phases)), lo.values, hi.values, color=line.get_color(), alpha=0.12)
                ax.axhline(0.99, color="k", lw=0.6, ls=":")
                ax.set_ylim(-0.3, 1.05)
                if i == 0:
                    ax.set_title(optimizer, fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"{model_name}\nPearson R", fontsize=8)
                ax.set_xticks(range(len(phases)), phases, fontsize=7, rotation=30)
        axes[0, -1].legend(fontsize=6, loc="lower right")
        fig.suptitle(f"Pearson R against {truth} by training phase (mean over seeds; band: min–max)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"r_by_phase_{truth}.png", dpi=110)
        plt.close(fig)

    model_name, optimizer, phase, truth = config.headline
    seed = config.seeds[0]
    rows = [p for p in (phase, phases[0]) if p in phases]
    rows = list(dict.fromkeys(rows))
    shown = [v for v in ("sgd/current", "tangent/current", "tangent/lookahead", "secant/midpoint") if v in vals]
    if not shown:
        return
    fig, axes = plt.subplots(len(rows), len(shown), figsize=(3 * len(shown), 2.9 * len(rows)), squeeze=False)
    for i, ph in enumerate(rows):
        sub = vals[(vals.model == model_name) & (vals.optimizer == optimizer) & (vals.phase == ph) & (vals.truth == truth) & (vals.seed == seed)]
        for j, variant in enumerate(shown):
            ax = axes[i, j]
            if sub.empty:
                ax.set_axis_off()
                continue
            if not np.isfinite(sub[variant].to_numpy()).all():
                ax.text(0.5, 0.5, f"{variant} ({ph})\nrefused", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                ax.set_axis_off()
                continue
            r = validation.fidelity(sub[variant].to_numpy(), sub["truth_value"].to_numpy())["pearson"]
            ax.scatter(sub["truth_value"], sub[variant], s=10)
            ax.set_title(f"{variant} ({ph})\nR = {r:.3f}", fontsize=8)
            ax.set_xlabel(f"{truth} (real optimizer)", fontsize=7)
            ax.set_ylabel("estimate", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    fig.suptitle(f"{model_name}, {optimizer}, seed {seed}: estimate vs {truth}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "scatter_headline.png", dpi=110)
    plt.close(fig)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m attribution fidelity``, each help stating its default."""
    parser = argparse.ArgumentParser(prog="python -m attribution fidelity", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="reduced grid (MLP, SGD and Adam, two phases, leave-one-out): under a minute (default: off, the full grid)")
    parser.add_argument("--grid", choices=tuple(GRIDS), default="default",
                        help="which grid: 'default' (SGD, SGD+momentum, Adam, AdamW, Adam lr 1e-2 on four models), 'optimizers' "
                             f"({', '.join(NEW_OPTIMIZERS)} and Adam as the reference, steps 1, 3, 10, 100, 400, MLP and LM, "
                             f"with the twin diagnostic) or 'early' ({', '.join(EARLY_OPTIMIZERS)} at steps 1, 2, 3, 5, 10 on the "
                             "MLP, CNN and LM: secant, the tracker's default route 'auto', the exact-update game 'exact') "
                             "or 'predicted' (Adam, AdamW, Adam lr 1e-2 on the MLP, CNN and LM: the secant at the current, "
                             "midpoint and predicted validation points) (default: %(default)s)")
    parser.add_argument("--optimizers", type=_csv, default=None,
                        help=f"comma-separated optimizers from {', '.join(OPTIMIZERS)} (default: the grid's)")
    parser.add_argument("--models", type=_csv, default=None, help=f"comma-separated models from {', '.join(MODELS)} (default: the grid's)")
    parser.add_argument("--seeds", type=_csv, default=None, help="comma-separated seeds, e.g. 0,1 (default: the grid's, 0,1,2)")
    parser.add_argument("--phases", type=_csv, default=None,
                        help="comma-separated steps to value, named 'step N', e.g. 1,3,10 (default: the grid's)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: results/fidelity, results/fidelity_optimizers with --grid optimizers, "
                             "results/fidelity_early with --grid early, results/fidelity_predicted with --grid predicted, or results/fidelity-quick with --quick)")
    parser.add_argument("--rewrite-report", metavar="DIR", default=None,
                        help="run nothing: write DIR/results.md again from the CSV files of the run in DIR (default: off)")
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[FidelityConfig, str]:
    """The configuration and the default output folder the options ask for (validated).

    Example:
        >>> config, out = config_from_args(build_parser().parse_args(["--grid", "optimizers", "--seeds", "0", "--phases", "1,3"]))
        >>> config.seeds, config.phases, out
        ((0,), (('step 1', 1), ('step 3', 3)), 'results/fidelity_optimizers')
    """
    if args.quick:
        config, out = QUICK, "results/fidelity-quick"
    else:
        config, out = GRIDS[args.grid]
    changes = {}
    if args.optimizers is not None:
        changes["optimizers"] = args.optimizers
    if args.models is not None:
        changes["models"] = args.models
    if args.seeds is not None:
        changes["seeds"] = tuple(int(x) for x in args.seeds)
    if args.phases is not None:
        changes["phases"] = tuple((f"step {int(x)}", int(x)) for x in args.phases)
    if changes:
        config = dataclasses.replace(config, **changes)
        model, optimizer, phase, truth = config.headline
        names = [name for name, _ in config.phases]
        config = dataclasses.replace(config, headline=(
            model if model in config.models else config.models[0],
            optimizer if optimizer in config.optimizers else config.optimizers[0],
            phase if phase in names else names[-1],
            truth if truth in config.truths else config.truths[0],
        ))
    return config, out


def main(argv=None) -> int:
    """Command-line entry point of ``python -m attribution fidelity``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.rewrite_report is not None:
        print(f"wrote {rewrite_report(args.rewrite_report)}")
        return 0
    config, default_out = config_from_args(args)
    out = args.out or default_out
    command = " ".join(["python -m attribution fidelity", *argv])
    cells, _ = run(config, out, command=command)
    info = json.loads((Path(out) / "run.json").read_text())
    pd.set_option("display.width", 160)
    for truth in config.truths:
        print(f"\nPearson R against {truth} (mean over models and seeds):")
        table = summary_table(cells, config, truth, variants=KEY_VARIANTS, by=("optimizer", "phase"))
        print(table.to_string())
    print(f"\n{info['cells']} cells in {info['seconds']:.0f} s; wrote {out}/cells.csv, values.csv, results.md, "
          f"r_by_phase_*.png, scatter_headline.png, config.json, run.json")
    return 0

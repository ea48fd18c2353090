"""Hypothesis strategies for the fuzz tests: random small architectures, parameter groups, optimizers.

Everything is built valid by construction, in float64. A drawn :class:`FuzzCase` holds

* a model: an input stage (dense features ``[n, d]``, a sequence ``[n, *mid, d]`` with one or two
  middle axes, token ids through ``nn.Embedding``, or a ``Conv1d``/``Conv2d`` stack on
  ``[n, C, *spatial]`` that is flattened or read as a sequence), then a random stack of
  ``nn.Linear`` (with or without bias), ``nn.LayerNorm`` (affine or not, with or without bias, over
  the last one or two axes), ``nn.RMSNorm``, ``nn.GroupNorm`` (channels-first around it when there
  are middle axes), and where transformers is installed its ``Conv1D`` and RMSNorm classes
  (``LlamaRMSNorm``, ``DeepseekV4RMSNorm``), residual blocks and activations, then a head
  (regression, class logits, per-token logits, optionally tied to the embedding);
* a loss ``loss_fn(model(inputs), targets)`` with a mean or sum reduction;
* an optimizer among the registered ones with 1-3 parameter groups that differ in their
  hyper-parameters (lr, weight decay, betas, momentum, ...), some parameters frozen
  (``requires_grad=False``, sometimes still listed in a group), already warmed up by a few real
  ``step()`` calls so that its state is non-trivial (0 warm-up steps covers "step 1");
* the batch to value and K validation batches.

The drawn *spec* (plain tuples) is what Hypothesis shrinks and prints; ``build`` turns it into
modules deterministically from a drawn seed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

DT = torch.float64


def _transformers_layers():
    """(Conv1D, {name: RMSNorm class}) of transformers, or (None, {}) without it. Only RMSNorm forms
    whose weight gradient is formed in the weight's dtype (float64 here): Gemma's float32 product
    rounds Σ_z c_z apart from g_B by more than the float64 oracle accepts."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - depends on the environment
        return None, {}
    norms = {"llama": LlamaRMSNorm}
    try:
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm

        norms["deepseek_v4"] = DeepseekV4RMSNorm
    except ImportError:  # pragma: no cover - older transformers
        pass
    return Conv1D, norms


HF_CONV1D, HF_RMS_NORMS = _transformers_layers()

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "relu": nn.ReLU,
}

#: Interleaved so that Hypothesis' bias toward early entries does not starve the adaptive optimizers.
OPTIMIZER_KINDS = [
    "adam", "sgd", "adafactor", "adamw", "sgd-momentum", "nadam", "rmsprop", "amsgrad", "radam", "sgd-nesterov",
    "adamax", "adagrad", "adadelta", "asgd",
]


# ---------------------------------------------------------------------------------- losses
def mse_loss(out, y, reduction):
    return F.mse_loss(out, y, reduction=reduction)


def ce_loss(logits, y, reduction):
    """Cross-entropy over the last axis; every middle axis is a token (``[n, *mid, C]``)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)


# ---------------------------------------------------------------------------------- the model
class Residual(nn.Module):
    """x + inner(x): the input reaches the output along two paths."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class Reshape(nn.Module):
    """A parameter-free change of layout between stages."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "flatten":  # [n, ...] -> [n, prod]
            return x.flatten(1)
        # contiguous: transformers' Conv1D reads its input with .view
        if self.how == "to_seq":  # [n, C, *spatial] -> [n, prod(spatial), C]
            return x.flatten(2).transpose(1, 2).contiguous()
        if self.how == "pool":  # [n, *mid, d] -> [n, d]
            return x.flatten(1, -2).mean(1)
        if self.how == "channels_first":  # [n, *mid, d] -> [n, d, *mid] (GroupNorm's layout)
            # contiguous: torch 2.13's CPU group_norm backward segfaults on a strided input that
            # needs no gradient while the weight does
            return x.movedim(-1, 1).contiguous()
        if self.how == "channels_last":
            return x.movedim(1, -1).contiguous()
        raise AssertionError(self.how)

    def extra_repr(self):
        return self.how


class FuzzNet(nn.Module):
    """The drawn stack, in order; ``head`` is the output layer (possibly tied to ``layers[0]``)."""

    def __init__(self, layers: list[nn.Module], head: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = head

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


# ---------------------------------------------------------------------------------- specs
@st.composite
def conv_spec(draw, two_d: bool, c_in: int, size: int):
    """One convolution layer's spec; the build step falls back to a 1x1 kernel if it does not fit."""
    divisors = [g for g in (1, 2, 3) if c_in % g == 0]
    groups = draw(st.sampled_from(divisors))
    c_out = groups * draw(st.integers(1, 2))
    k, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    padding = draw(st.sampled_from([0, 1, "same"])) if stride == 1 else draw(st.sampled_from([0, 1]))
    if mode != "zeros" and padding == 0:
        padding = 1
    return ("conv2d" if two_d else "conv1d", c_in, c_out, k, stride, padding, dilation, groups, draw(st.booleans()), mode)


def _conv_out(spec, spatial):
    """(module, output spatial shape) for ``spec`` on an input of ``spatial``; a 1x1 kernel if it does not fit."""
    kind, c_in, c_out, k, stride, padding, dilation, groups, bias, mode = spec
    cls = nn.Conv2d if kind == "conv2d" else nn.Conv1d
    try:
        conv = cls(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                   padding_mode=mode, dtype=DT)
        with torch.no_grad():
            out = conv(torch.zeros(1, c_in, *spatial, dtype=DT))
        if out.numel() == 0:
            raise RuntimeError("empty output")
    except RuntimeError:
        conv = cls(c_in, c_out, 1, groups=groups, bias=bias, dtype=DT)
        with torch.no_grad():
            out = conv(torch.zeros(1, c_in, *spatial, dtype=DT))
    return conv, tuple(out.shape[2:])


@st.composite
def feature_layer_spec(draw, has_mid: bool):
    kinds = ["linear", "linear", "act", "act", "layernorm", "rmsnorm", "residual", "groupnorm"]
    if HF_CONV1D is not None:
        kinds += ["conv1d_hf", "hf_rmsnorm"]
    kind = draw(st.sampled_from(kinds))
    if kind == "linear":
        return ("linear", draw(st.integers(1, 5)), draw(st.booleans()))
    if kind == "conv1d_hf":
        return ("conv1d_hf", draw(st.integers(1, 5)))
    if kind == "hf_rmsnorm":
        return ("hf_rmsnorm", draw(st.sampled_from(sorted(HF_RMS_NORMS))))
    if kind == "groupnorm":  # groups = gcd(d, drawn), so that it divides the channels (see _groupnorm)
        return ("groupnorm", draw(st.integers(1, 4)), draw(st.booleans()))  # groups, affine
    if kind == "act":
        return ("act", draw(st.sampled_from(sorted(ACTIVATIONS))))
    if kind == "layernorm":
        two_axes = has_mid and draw(st.booleans())
        return ("layernorm", 2 if two_axes else 1, draw(st.booleans()), draw(st.booleans()))  # axes, affine, bias
    if kind == "rmsnorm":
        two_axes = has_mid and draw(st.booleans())
        return ("rmsnorm", 2 if two_axes else 1, draw(st.sampled_from([None, 1e-5])), draw(st.booleans()))
    return ("residual", draw(st.sampled_from(sorted(ACTIVATIONS))), draw(st.booleans()))  # act, bias


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """A drawn architecture: input stage, feature stack, head and loss. Plain data (readable, shrinkable)."""

    input: tuple  # ("vector", d) | ("sequence", mid, d) | ("tokens", T, vocab, d, padding_idx) | ("conv", two_d, c_in, size, convs, to_seq, norm)
    stack: tuple  # feature_layer_spec tuples
    pool: bool  # mean over the middle axes before the head
    head: tuple  # ("regress", d_out, bias) | ("classify", classes, bias) | ("tied",)
    reduction: str  # "mean" | "sum"


@st.composite
def arch_specs(draw) -> ArchSpec:
    kind = draw(st.sampled_from(["vector", "sequence", "tokens", "conv"]))
    has_mid = kind in ("sequence", "tokens")
    if kind == "vector":
        inp = ("vector", draw(st.integers(1, 5)))
    elif kind == "sequence":
        mid = draw(st.sampled_from([(1,), (2,), (3,), (4,), (2, 2), (3, 1)]))
        inp = ("sequence", mid, draw(st.integers(1, 4)))
    elif kind == "tokens":
        inp = ("tokens", draw(st.integers(1, 4)), draw(st.integers(3, 7)), draw(st.integers(1, 4)),
               draw(st.sampled_from([None, 0])))
    else:
        two_d = draw(st.booleans())
        c_in, size = draw(st.integers(1, 4)), draw(st.integers(4, 6) if two_d else st.integers(4, 8))
        convs, c = [], c_in
        for _ in range(draw(st.integers(1, 2))):
            spec = draw(conv_spec(two_d, c, size))
            convs.append((spec, draw(st.sampled_from(sorted(ACTIVATIONS)))))
            c = spec[2]
        to_seq = draw(st.booleans())
        has_mid = to_seq
        # an optional norm on the [n, C, *spatial] map over its trailing axes (per sample)
        norm = draw(st.sampled_from([None, None, ("layernorm", 1), ("rmsnorm", 1), ("layernorm", 2), ("groupnorm", 2)]))
        inp = ("conv", two_d, c_in, size, tuple(convs), to_seq, norm)
    stack = tuple(draw(st.lists(feature_layer_spec(has_mid), min_size=0, max_size=4)))
    pool = has_mid and draw(st.booleans())
    head_kind = draw(st.sampled_from(["regress", "classify"] + (["tied"] if kind == "tokens" and not pool else [])))
    if head_kind == "regress":
        head = ("regress", draw(st.integers(1, 3)), draw(st.booleans()))
    elif head_kind == "classify":
        head = ("classify", draw(st.integers(2, 4)), draw(st.booleans()))
    else:
        head = ("tied",)
    return ArchSpec(inp, stack, pool, head, draw(st.sampled_from(["mean", "sum"])))


def _perturb_(module: nn.Module, g: torch.Generator) -> None:
    """Non-trivial norm weights and biases, so that their per-sample gradients are generic."""
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))


def _layernorm(shape, *, degenerate_ok: bool, **kw) -> nn.Module:
    """LayerNorm, or RMSNorm where LayerNorm would normalise a single element.

    Over one element x̂ ≡ 0 in exact arithmetic, while torch's kernel returns rounding noise
    amplified by 1/√eps: every gradient upstream is then noise, which no per-sample method can
    reproduce bit for bit (the oracle's mean/sum detection may even refuse the loss). Random
    stacks avoid it; ``degenerate_ok`` keeps it for the pinned example that checks the zero gradient.
    """
    if math.prod(shape) == 1 and not degenerate_ok:
        return nn.RMSNorm(shape, elementwise_affine=kw.get("elementwise_affine", True), dtype=DT)
    return nn.LayerNorm(shape, dtype=DT, **kw)


def _groupnorm(groups: int, channels: int, last: int, *, affine: bool) -> nn.Module:
    """GroupNorm with gcd(channels, groups) groups (one group if that leaves one channel per group)
    on ``[n, channels, *spatial]``, or RMSNorm over the input's last axis (of size ``last``) for a
    single channel. A group of one channel has x̂ of mean 0 over the spatial axes in exact
    arithmetic, so a mean pool right after it returns rounding noise (see :func:`_layernorm`)."""
    g = math.gcd(channels, groups)
    if channels // g == 1:
        g = 1
    if channels == 1:
        return nn.RMSNorm(last, elementwise_affine=affine, dtype=DT)
    return nn.GroupNorm(g, channels, affine=affine, dtype=DT)


def build(spec: ArchSpec, seed: int, *, degenerate_ok: bool = False) -> tuple[FuzzNet, Callable, Callable[[int, torch.Generator], tuple]]:
    """(model, loss_fn, make_batch(n, generator)) for ``spec``; parameters drawn from ``seed``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    layers: list[nn.Module] = []
    inp = spec.input
    emb = None
    if inp[0] == "vector":
        mid, d = (), inp[1]
        make_x = lambda n, gen, d=d: torch.randn(n, d, generator=gen, dtype=DT)  # noqa: E731
    elif inp[0] == "sequence":
        mid, d = inp[1], inp[2]
        make_x = lambda n, gen, mid=mid, d=d: torch.randn(n, *mid, d, generator=gen, dtype=DT)  # noqa: E731
    elif inp[0] == "tokens":
        T, vocab, d, padding_idx = inp[1:]
        mid = (T,)
        emb = nn.Embedding(vocab, d, padding_idx=padding_idx, dtype=DT)
        layers.append(emb)
        make_x = lambda n, gen, T=T, vocab=vocab: torch.randint(0, vocab, (n, T), generator=gen)  # noqa: E731
    else:
        _, two_d, c_in, size, convs, to_seq, norm = inp
        spatial = (size, size) if two_d else (size,)
        make_x = lambda n, gen, c_in=c_in, spatial=spatial: torch.randn(n, c_in, *spatial, generator=gen, dtype=DT)  # noqa: E731
        shape = spatial
        c = c_in
        for cspec, act in convs:
            conv, shape = _conv_out(cspec, shape)
            layers += [conv, ACTIVATIONS[act]()]
            c = cspec[2]
        if norm is not None:
            # one axis: the last spatial axis; two: (C, L) for Conv1d, (H, W) for Conv2d
            trailing = shape[-1:] if norm[1] == 1 else (c, *shape)[-2:]
            if norm[0] == "groupnorm":  # over channels and spatial axes, [n, C, *spatial]
                mod = _groupnorm(norm[1], c, shape[-1], affine=True)
            elif norm[0] == "layernorm":
                mod = _layernorm(trailing, degenerate_ok=degenerate_ok)
            else:
                mod = nn.RMSNorm(trailing, dtype=DT)
            _perturb_(mod, g)
            layers.append(mod)
        if to_seq:
            layers.append(Reshape("to_seq"))
            mid, d = (math.prod(shape),), c
        else:
            layers.append(Reshape("flatten"))
            mid, d = (), c * math.prod(shape)
    for layer in spec.stack:
        if layer[0] == "linear":
            layers.append(nn.Linear(d, layer[1], bias=layer[2], dtype=DT))
            d = layer[1]
        elif layer[0] == "act":
            layers.append(ACTIVATIONS[layer[1]]())
        elif layer[0] == "conv1d_hf":  # transformers' Conv1D(nf = outputs, nx = inputs), W [d, nf]
            mod = HF_CONV1D(layer[1], d).to(DT)
            _perturb_(mod, g)  # its bias starts at zero
            layers.append(mod)
            d = layer[1]
        elif layer[0] == "hf_rmsnorm":
            mod = HF_RMS_NORMS[layer[1]](d).to(DT)
            _perturb_(mod, g)
            layers.append(mod)
        elif layer[0] == "groupnorm":
            # [n, *mid, d] is read channels-first, [n, d, *mid]; an RMSNorm stand-in acts on d directly.
            mod = _groupnorm(layer[1], d, d, affine=layer[2])
            _perturb_(mod, g)
            if mid and isinstance(mod, nn.GroupNorm):
                layers += [Reshape("channels_first"), mod, Reshape("channels_last")]
            else:
                layers.append(mod)
        elif layer[0] in ("layernorm", "rmsnorm"):
            axes = layer[1] if len(mid) >= 1 else 1
            shape = (*mid, d)[-axes:]
            if layer[0] == "layernorm":
                mod = _layernorm(shape, elementwise_affine=layer[2], bias=layer[3], degenerate_ok=degenerate_ok)
            else:
                mod = nn.RMSNorm(shape, eps=layer[2], elementwise_affine=layer[3], dtype=DT)
            _perturb_(mod, g)
            layers.append(mod)
        else:  # residual
            inner = nn.Sequential(ACTIVATIONS[layer[1]](), nn.Linear(d, d, bias=layer[2], dtype=DT))
            layers.append(Residual(inner))
    if spec.pool and mid:
        layers.append(Reshape("pool"))
        mid = ()
    if spec.head[0] == "tied":
        if d != emb.embedding_dim:
            layers.append(nn.Linear(d, emb.embedding_dim, dtype=DT))
        head = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, dtype=DT)
        head.weight = emb.weight
        classes = emb.num_embeddings
    else:
        head = nn.Linear(d, spec.head[1], bias=spec.head[2], dtype=DT)
        classes = spec.head[1]
    model = FuzzNet(layers, head)
    if spec.head[0] == "regress":
        loss_fn = partial(mse_loss, reduction=spec.reduction)
        make_y = lambda n, gen, mid=mid: torch.randn(n, *mid, classes, generator=gen, dtype=DT)  # noqa: E731
    else:
        loss_fn = partial(ce_loss, reduction=spec.reduction)
        make_y = lambda n, gen, mid=mid: torch.randint(0, classes, (n, *mid), generator=gen)  # noqa: E731

    def make_batch(n: int, gen: torch.Generator) -> tuple:
        return make_x(n, gen), make_y(n, gen)

    return model, loss_fn, make_batch


# ---------------------------------------------------------------------------------- optimizers
@st.composite
def group_hyperparameters(draw, kind: str) -> dict:
    """Hyper-parameters of one parameter group of optimizer ``kind`` (differ from group to group)."""
    wd = draw(st.sampled_from([0.0, 0.0, 1e-2, 0.1]))
    maximize = draw(st.integers(0, 5)) == 0
    if kind.startswith("sgd"):
        hp = {"lr": draw(st.sampled_from([1e-3, 1e-2, 0.1])), "weight_decay": wd, "maximize": maximize}
        if kind == "sgd-momentum":
            hp.update(momentum=draw(st.sampled_from([0.5, 0.9])), dampening=draw(st.sampled_from([0.0, 0.1])))
        elif kind == "sgd-nesterov":
            hp.update(momentum=draw(st.sampled_from([0.5, 0.9])), nesterov=True)
        return hp
    if kind in ("adam", "adamw", "amsgrad"):
        return {
            "lr": draw(st.sampled_from([1e-3, 1e-2, 5e-2])),
            "betas": (draw(st.sampled_from([0.0, 0.5, 0.9])), draw(st.sampled_from([0.9, 0.99, 0.999]))),
            "eps": draw(st.sampled_from([1e-8, 1e-3])),
            "weight_decay": wd,
            "amsgrad": kind == "amsgrad" or draw(st.booleans()),
            "maximize": maximize,
        }
    if kind == "rmsprop":
        return {
            "lr": draw(st.sampled_from([1e-3, 1e-2])),
            "alpha": draw(st.sampled_from([0.9, 0.99])),
            "eps": draw(st.sampled_from([1e-8, 1e-3])),
            "weight_decay": wd,
            "momentum": draw(st.sampled_from([0.0, 0.5])),
            "centered": draw(st.booleans()),
            "maximize": maximize,
        }
    if kind == "adamax":
        return {"lr": draw(st.sampled_from([2e-3, 2e-2])), "betas": (draw(st.sampled_from([0.0, 0.9])), 0.999),
                "eps": draw(st.sampled_from([1e-8, 1e-3])), "weight_decay": wd, "maximize": maximize}
    if kind == "nadam":
        return {"lr": draw(st.sampled_from([2e-3, 2e-2])), "betas": (draw(st.sampled_from([0.5, 0.9])), draw(st.sampled_from([0.99, 0.999]))),
                "eps": draw(st.sampled_from([1e-8, 1e-3])), "weight_decay": wd, "momentum_decay": draw(st.sampled_from([4e-3, 0.1])),
                "decoupled_weight_decay": draw(st.booleans()), "maximize": maximize}
    if kind == "radam":
        return {"lr": draw(st.sampled_from([1e-3, 1e-2])), "betas": (0.9, draw(st.sampled_from([0.9, 0.999]))),
                "eps": draw(st.sampled_from([1e-8, 1e-3])), "weight_decay": wd, "decoupled_weight_decay": draw(st.booleans()),
                "maximize": maximize}
    if kind == "adadelta":
        return {"lr": draw(st.sampled_from([0.1, 1.0])), "rho": draw(st.sampled_from([0.5, 0.9])),
                "eps": draw(st.sampled_from([1e-6, 1e-3])), "weight_decay": wd, "maximize": maximize}
    if kind == "asgd":
        return {"lr": draw(st.sampled_from([1e-2, 0.1])), "lambd": 1e-4, "alpha": 0.75, "t0": draw(st.sampled_from([1.0, 1e6])),
                "weight_decay": wd, "maximize": maximize}
    if kind == "adafactor":
        return {"lr": draw(st.sampled_from([1e-3, 1e-2])), "beta2_decay": draw(st.sampled_from([-0.8, -0.5])),
                "eps": (None, draw(st.sampled_from([1e-3, 1e-2]))), "weight_decay": wd, "maximize": maximize}
    assert kind == "adagrad", kind
    return {
        "lr": draw(st.sampled_from([1e-2, 0.1])),
        "lr_decay": draw(st.sampled_from([0.0, 0.1])),
        "eps": draw(st.sampled_from([1e-10, 1e-3])),
        "weight_decay": wd,
        "initial_accumulator_value": draw(st.sampled_from([0.0, 0.5])),
        "maximize": maximize,
    }


OPTIMIZER_CLASS = {
    "sgd": torch.optim.SGD,
    "sgd-momentum": torch.optim.SGD,
    "sgd-nesterov": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "amsgrad": torch.optim.Adam,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "adadelta": torch.optim.Adadelta,
    "asgd": torch.optim.ASGD,
    "adafactor": torch.optim.Adafactor,
}


@dataclasses.dataclass
class FuzzCase:
    """A drawn model, loss, warmed-up optimizer, batch and K validation batches."""

    spec: ArchSpec
    optimizer_kind: str
    model: FuzzNet
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    batch: tuple
    val_batches: list[tuple]
    make_batch: Callable[[int, torch.Generator], tuple]
    generator: torch.Generator
    warm_steps: int
    seed: int = 0

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def __repr__(self) -> str:
        groups = [
            {k: v for k, v in grp.items() if k != "params"} | {"params": [self.names[p] for p in grp["params"]]}
            for grp in self.optimizer.param_groups
        ]
        frozen = [n for n, p in self.model.named_parameters() if not p.requires_grad]
        return (
            f"FuzzCase(spec={self.spec!r}, seed={self.seed}, optimizer={self.optimizer_kind} "
            f"({type(self.optimizer).__name__}), warm_steps={self.warm_steps}, n={self.batch[0].shape[0]}, "
            f"K={len(self.val_batches)}, frozen={frozen}, groups={groups})"
        )

    @property
    def names(self) -> dict[torch.Tensor, str]:
        return {p: n for n, p in self.model.named_parameters()}


def assemble(
    spec: ArchSpec,
    seed: int,
    kind: str,
    groups: list[tuple[list[int], dict]],
    *,
    frozen: tuple[int, ...] = (),
    foreach: bool | None = None,
    n: int = 3,
    warm_sizes: tuple[int, ...] = (),
    val_sizes: tuple[int, ...] = (2,),
    degenerate_ok: bool = False,
) -> FuzzCase:
    """Build a case deterministically (what :func:`fuzz_cases` draws; also for ``@example``).

    Args:
        groups: per parameter group, the indices into ``list(model.parameters())`` it holds and
            its hyper-parameters.
        frozen: indices of the parameters made ``requires_grad=False``.
        warm_sizes: batch sizes of the real warm-up steps (``()``: the valued step is step 1).
        val_sizes: sizes of the K validation batches.
        degenerate_ok: allow a LayerNorm over one element (see :func:`_layernorm`).
    """
    model, loss_fn, make_batch = build(spec, seed, degenerate_ok=degenerate_ok)
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i not in frozen)
    optimizer = OPTIMIZER_CLASS[kind]([{"params": [params[i] for i in idx], **hp} for idx, hp in groups], foreach=foreach)
    g = torch.Generator().manual_seed(seed + 2)
    for size in warm_sizes:
        x, y = make_batch(size, g)
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    batch = make_batch(n, g)
    val_batches = [make_batch(size, g) for size in val_sizes]
    return FuzzCase(spec, kind, model, loss_fn, optimizer, batch, val_batches, make_batch, g, len(warm_sizes), seed)


@st.composite
def fuzz_cases(draw, *, optimizer_kinds=OPTIMIZER_KINDS, max_groups: int = 3) -> FuzzCase:
    """A random architecture with a warmed-up optimizer over several parameter groups."""
    spec = draw(arch_specs())
    seed = draw(st.integers(0, 2**16))
    n_params = len(list(build(spec, seed)[0].parameters()))
    # Freeze some parameters (at least one stays trainable); some frozen ones stay in a group.
    frozen = [draw(st.integers(0, 5)) == 0 for _ in range(n_params)]
    if all(frozen):
        frozen[-1] = False
    kind = draw(st.sampled_from(optimizer_kinds))
    n_groups = draw(st.integers(1, max_groups))
    which = [draw(st.integers(0, n_groups - 1)) for _ in range(n_params)]
    keep_frozen = draw(st.booleans())
    groups = []
    for k in range(n_groups):
        members = [i for i in range(n_params) if which[i] == k and (keep_frozen or not frozen[i])]
        if members:
            groups.append((members, draw(group_hyperparameters(kind))))
    return assemble(
        spec, seed, kind, groups,
        frozen=tuple(i for i, f in enumerate(frozen) if f),
        foreach=draw(st.sampled_from([None, False, True])),
        n=draw(st.integers(1, 6)),
        warm_sizes=tuple(draw(st.lists(st.integers(1, 6), max_size=3))),
        val_sizes=tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))),
    )

"""Ghost rules for transformers' ``Conv1D`` and RMSNorm classes and for ``nn.GroupNorm``.

Every rule against the per-sample oracle (``validation.per_sample_grads``, torch.func) in float64
on every path, through ``GhostEngine(strict=True)`` so that a fallback would be refused; the
RMSNorm classes in several dtypes (x̂ is computed in float32 and cast back); the classification
of the installed transformers' RMSNorm classes by their source; stock GPT-2 and Llama models
built from tiny configs.
"""

from __future__ import annotations

import ast
import copy
import glob
import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import estimators as E
import validation
from attribution import InRunShapley, step_values
from estimators._rules import rule_for
from tests._helpers import assert_close, rank_one_slope

transformers = pytest.importorskip("transformers")
hf = importlib.import_module("estimators._rules.hf")
from transformers.pytorch_utils import Conv1D  # noqa: E402

transformers.logging.set_verbosity_error()
DT = torch.float64
PATHS = ["auto", "dense", "pairwise", "factored", "materialized"]
#: Examples per drawn test: a fraction of the active profile's (dev 25, ci 40, nightly 500).
FEW = settings(max_examples=max(4, settings.default.max_examples // 4), deadline=None)

# (module, class) of RMSNorm classes with each form the rule knows; those not installed are skipped.
NORM_CLASSES = [
    ("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("qwen2", "Qwen2RMSNorm"), ("qwen3", "Qwen3RMSNorm"),
    ("gemma", "GemmaRMSNorm"), ("gemma2", "Gemma2RMSNorm"), ("gemma3n", "Gemma3nRMSNorm"), ("helium", "HeliumRMSNorm"),
    ("deepseek_v4", "DeepseekV4RMSNorm"), ("llama4", "Llama4TextRMSNorm"), ("moshi", "MoshiRMSNorm"),
]


def _hf_class(model: str, name: str):
    try:
        return getattr(importlib.import_module(f"transformers.models.{model}.modeling_{model}"), name)
    except (ImportError, AttributeError):
        return None


NORMS = [c for c in (_hf_class(m, n) for m, n in NORM_CLASSES) if c is not None]


def _scan_rms_norms() -> list[tuple[str, str, str, str | None]]:
    """(module, class, forward source, _norm source) of every class named *RMSNorm in the
    installed modeling files, read with ``ast`` (importing all of them takes ~17 s)."""
    root = os.path.dirname(transformers.__file__)
    found = []
    for path in sorted(glob.glob(os.path.join(root, "models", "*", "modeling_*.py"))):
        src = open(path, encoding="utf-8").read()
        for node in ast.parse(src).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("RMSNorm"):
                methods = {f.name: ast.get_source_segment(src, f) for f in node.body if isinstance(f, ast.FunctionDef)}
                if "forward" in methods and "nn.Parameter" in methods.get("__init__", ""):
                    module = "transformers." + os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    found.append((module, node.name, methods["forward"], methods.get("_norm")))
    return found


SCANNED = _scan_rms_norms()


# ------------------------------------------------------------------------------ models
class ChannelsFirst(nn.Module):
    """[n, *spatial, C] <-> [n, C, *spatial] (GroupNorm reads channels at axis 1)."""

    def __init__(self, first: bool):
        super().__init__()
        self.first = first

    def forward(self, x):
        return x.movedim(-1, 1) if self.first else x.movedim(1, -1)


def _perturb_(module: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def layer_model(layer: str, mid: tuple[int, ...], seed: int):
    """(model, tracked parameter names, make_batch) with ``layer`` between two parametrised layers."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    d_in, d, d_out = 3, 4, 2
    if layer == "Conv1D":
        mods = [Conv1D(d, d_in), nn.Tanh(), Conv1D(d_out, d)]  # Conv1D(nf = outputs, nx = inputs)
        names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    elif layer == "GroupNorm":
        norm = nn.GroupNorm(2, d)
        _perturb_(norm, g)
        mods = [nn.Linear(d_in, d), ChannelsFirst(True), norm, ChannelsFirst(False), nn.Tanh(), nn.Linear(d, d_out)]
        names = ["2.weight", "2.bias"]
    else:
        norm = next(c for c in NORMS if c.__name__ == layer)(d)
        _perturb_(norm, g)
        mods = [nn.Linear(d_in, d), norm, nn.Tanh(), nn.Linear(d, d_out)]
        names = ["1.weight"]
    model = nn.Sequential(*mods).to(DT)

    def make_batch(n, gen):
        return torch.randn(n, *mid, d_in, generator=gen, dtype=DT), torch.randn(n, *mid, d_out, generator=gen, dtype=DT)

    return model, names, make_batch


def _slopes(model, path, g):
    if path == "pairwise":
        return -0.37
    return {p: rank_one_slope(p.shape, g) if path == "factored" else -(0.1 + torch.rand(p.shape, generator=g, dtype=DT))
            for p in model.parameters()}


def float32_accumulated(model) -> bool:
    """Whether an RMSNorm of ``model`` forms its weight's gradient in float32 whatever the weight's dtype
    (Gemma's ``(1 + w.float()) ⊙ x̂``): Σ_z c_z then differs from g_B by float32 rounding, which
    ``validation.per_sample_grads`` refuses in a float64 model as a sample interaction."""
    forms = [getattr(rule_for(type(m)), "form", None) for m in model.modules()]
    return any(f is not None and not f.cast_first and f.product == "float32" for f in forms)


def _vjp_shares(model, batch, loss_fn):
    """c_z = ∂/∂θ ⟨model(x_z), G_z⟩ with G = ∂L_B/∂outputs of the batch, one VJP per sample: the
    oracle's definition without its Σ_z c_z = g_B check (see ``float32_accumulated``)."""
    x, y = batch
    out = model(x)
    G, = torch.autograd.grad(loss_fn(out, y), out)
    named = {nm: p for nm, p in model.named_parameters() if p.requires_grad}
    rows = [torch.autograd.grad(model(x[z:z + 1]), list(named.values()), G[z:z + 1]) for z in range(x.shape[0])]
    return {nm: torch.stack([r[i] for r in rows]) for i, nm in enumerate(named)}


def _oracle_values(model, loss_fn, batch, J, val_grads):
    """−⟨J ⊙ G_k, c_z⟩ with c_z from torch.func (``validation.per_sample_grads``), or from one VJP
    per sample where that oracle refuses float32-accumulated norm gradients (``float32_accumulated``)."""
    if float32_accumulated(model):
        c = _vjp_shares(model, batch, loss_fn)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' vmap performance notices
            c = validation.per_sample_grads(model, loss_fn, batch)
    named = dict(model.named_parameters())
    cols = []
    for G in val_grads:
        cols.append(-sum((c[nm] * ((J if isinstance(J, float) else J[p]) * G[p])).flatten(1).sum(1)
                         for nm, p in named.items() if p.requires_grad))
    return torch.stack(cols, 1)


def _engine_values(model, loss_fn, batch, val_batches, J, path):
    engine = E.GhostEngine(model, strict=True, path=path)
    model.zero_grad(set_to_none=True)
    with engine.capture_train():
        loss_fn(model(batch[0]), batch[1]).backward()
    val_grads = E.validation_gradients(model, loss_fn, val_batches, engine=engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return engine.values(J, val_grads), val_grads, engine


# ------------------------------------------------------------------------------ 1. lazy registration
def test_importing_estimators_does_not_import_transformers_and_rules_are_found_on_first_lookup():
    code = (
        "import sys, estimators\n"
        "from estimators._rules import rule_for\n"
        "assert 'transformers' not in sys.modules, 'estimators imported transformers'\n"
        "import transformers.models.llama.modeling_llama as m\n"
        "from transformers.pytorch_utils import Conv1D\n"
        "print(rule_for(m.LlamaRMSNorm).__name__, rule_for(Conv1D).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.split() == ["LlamaRMSNormRule", "Conv1DRule"]


def test_exact_type_semantics_subclasses_and_unknown_forwards_are_refused_under_strict():
    llama = _hf_class("llama", "LlamaRMSNorm")

    class MyNorm(llama):  # a subclass may change the forward: never matched
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(3, 4), MyNorm(4))
    assert rule_for(llama) is not None and rule_for(MyNorm) is None
    with pytest.raises(E.UncoveredParameterError, match=r"'1\.weight' of module '1' \(MyNorm\).*no rule is registered for MyNorm"):
        E.GhostEngine(model, strict=True)
    # The fallback still values it (strict=False).
    assert E.GhostEngine(model).fallback_modules == ["1"]


# ------------------------------------------------------------------------------ 2. every rule, every path
LAYERS = ["Conv1D", "GroupNorm", *(c.__name__ for c in NORMS)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layer", LAYERS)
@settings(max_examples=max(2, settings.default.max_examples // 10), deadline=None)
@given(mid=st.sampled_from([(), (1,), (3,), (2, 2)]), n=st.integers(1, 4), K=st.integers(1, 2),
       seed=st.integers(0, 2**16), reduction=st.sampled_from(["mean", "sum"]))
@example(mid=(3,), n=3, K=2, seed=0, reduction="mean")  # a sequence, several targets
@example(mid=(), n=1, K=1, seed=1, reduction="sum")  # a batch of one without a sequence axis
def test_each_rule_equals_the_per_sample_oracle_on_every_path(layer, path, mid, n, K, seed, reduction):
    model, names, make_batch = layer_model(layer, mid, seed)
    loss_fn = lambda out, y: F.mse_loss(out, y, reduction=reduction)  # noqa: E731
    g = torch.Generator().manual_seed(seed + 2)
    batch = make_batch(n, g)
    vals = [make_batch(1 + k, g) for k in range(K)]
    J = _slopes(model, path, g)
    phi, val_grads, engine = _engine_values(model, loss_fn, batch, vals, J, path)
    ref = _oracle_values(model, loss_fn, batch, J, val_grads)
    assert engine.fallback_modules == []
    assert "fallback" not in engine.paths_taken.values()
    if layer == "Conv1D" and path != "auto":  # a bilinear weight takes the path it is given, like nn.Linear
        assert engine.paths_taken["0.weight"] == engine.paths_taken["2.weight"] == path
    assert_close(phi, ref, rtol=1e-10, atol=1e-13 * float(ref.abs().max()), name=f"{layer}[{path}]")


# ------------------------------------------------------------------------------ 3. RMSNorm dtypes
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@FEW
@given(cls=st.sampled_from(NORMS), x_dtype=st.sampled_from(DTYPES), w_dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
@example(cls=NORMS[0], x_dtype=torch.float64, w_dtype=torch.float64, seed=0)  # Llama: x̂ through float32
@example(cls=NORMS[0], x_dtype=torch.bfloat16, w_dtype=torch.float32, seed=0)
def test_rms_norm_terms_equal_autograd_per_sample_in_every_dtype(cls, x_dtype, w_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    norm = cls(5).to(w_dtype)
    _perturb_(norm, g)
    x = (3 * torch.randn(3, 4, 5, generator=g, dtype=DT)).to(x_dtype)
    out = norm(x)
    b = torch.randn(out.shape, generator=g, dtype=DT).to(out.dtype)
    c = rule_for(cls).terms(norm, x, b)["weight"].c
    for z in range(3):
        expected, = torch.autograd.grad(norm(x[z:z + 1]), norm.weight, b[z:z + 1])
        # Autograd casts the product's gradient to w's dtype last; the rule keeps the product's dtype.
        assert_close(c[z].to(w_dtype), expected, rtol=0.0, atol=0.0, name=f"{cls.__name__} x {x_dtype} w {w_dtype}")


# ------------------------------------------------------------------------------ 4. classification
def test_the_installed_rms_norms_of_each_known_family_are_classified():
    classified = {name for _, name, fwd, norm in SCANNED if hf.classify_source(fwd, norm) is not None}
    for cls in NORMS:
        assert cls.__name__ in classified
    # Most of the family shares a handful of forwards; a new transformers release that changes
    # them all would drop this count (and send its models to the fallback).
    assert len(classified) >= 0.9 * len(SCANNED), sorted({n for _, n, *_ in SCANNED} - classified)


@settings(max_examples=10, deadline=None)
@given(entry=st.sampled_from(SCANNED), seed=st.integers(0, 2**16))
@example(entry=next(e for e in SCANNED if e[1] == "IdeficsRMSNorm"), seed=0)
@example(entry=next(e for e in SCANNED if e[1] == "Qwen4ExpTextRMSNorm"), seed=0)
@example(entry=next(e for e in SCANNED if e[1] == "Gemma3nRMSNorm"), seed=0)
def test_any_installed_rms_norm_is_exact_or_refused(entry, seed):
    """Drawn from every *RMSNorm class of the installed transformers: the live class classifies as
    its source does, and is then exact in float64 through the strict engine, or has no rule and is
    refused by the strict engine (never a guessed rule)."""
    module, name, forward, norm = entry
    cls = getattr(importlib.import_module(module), name)
    form = hf.classify_source(forward, norm)
    assert hf.classify(cls) == form
    d = 4
    try:
        layer = cls(d, group_size=2) if name == "Qwen4ExpTextRMSNorm" else cls(d)
    except TypeError:
        pytest.skip(f"{name} takes a config, not (dim, eps)")
    g = torch.Generator().manual_seed(seed)
    _perturb_(layer, g)
    model = nn.Sequential(nn.Linear(3, d), layer, nn.Linear(d, 2)).to(DT)
    if form is None:
        assert rule_for(cls) is None
        with pytest.raises(E.UncoveredParameterError, match=rf"\({name}\).*no rule is registered for {name}"):
            E.GhostEngine(model, strict=True)
        return
    batch = (torch.randn(3, 2, 3, generator=g, dtype=DT), torch.randn(3, 2, 2, generator=g, dtype=DT))
    J = _slopes(model, "dense", g)
    phi, val_grads, _ = _engine_values(model, F.mse_loss, batch, [batch], J, "dense")
    ref = _oracle_values(model, F.mse_loss, batch, J, val_grads)
    assert_close(phi, ref, rtol=1e-10, atol=1e-13 * float(ref.abs().max()), name=name)


# ------------------------------------------------------------------------------ 5. stock models
VOCAB, T = 50, 6


class CausalLM(nn.Module):
    """A transformers causal LM returning next-token logits ``[n, T, V]`` (loss: token-mean cross-entropy)."""

    def __init__(self, arch: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
        if arch == "gpt2":
            config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
            self.lm = transformers.GPT2LMHeadModel(config)
        else:
            config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, **ids)
            self.lm = transformers.LlamaForCausalLM(config)
        self.to(DT)
        with torch.no_grad():  # non-trivial norm weights (they start at one)
            for name, p in self.named_parameters():
                if "norm" in name or ".ln_" in name:
                    p.add_(0.2 * torch.randn_like(p))

    def forward(self, ids):
        return self.lm(input_ids=ids).logits


def lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lm_batch(n, seed):
    ids = torch.randint(0, VOCAB, (n, T + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_stock_models_run_under_the_strict_engine_on_every_path(arch, path):
    model = CausalLM(arch)
    g = torch.Generator().manual_seed(5)
    J = _slopes(model, path, g)
    phi, val_grads, engine = _engine_values(model, lm_loss, lm_batch(3, 1), [lm_batch(2, 2)], J, path)
    assert engine.fallback_modules == []
    assert "fallback" not in engine.paths_taken.values()
    mats = {nm for nm, p in model.named_parameters() if p.dim() == 2 and "wpe" not in nm}
    if path != "auto":
        assert {engine.paths_taken[nm] for nm in mats} == {path}
    kinds = {type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert kinds == ({"Conv1D", "Embedding", "LayerNorm", "Linear"} if arch == "gpt2" else {"Embedding", "LlamaRMSNorm", "Linear"})
    ref = _oracle_values(model, lm_loss, lm_batch(3, 1), J, val_grads)
    assert_close(phi, ref, rtol=1e-10, atol=1e-13 * float(ref.abs().max()), name=f"{arch}[{path}]")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_in_run_shapley_step_on_a_stock_model_equals_the_materialized_step(arch):
    model = CausalLM(arch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for s in range(2):  # Adam state of a few steps
        opt.zero_grad()
        lm_loss(model(lm_batch(3, 10 + s)[0]), lm_batch(3, 10 + s)[1]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    x, y = lm_batch(4, 20)
    val = lm_batch(3, 21)
    twin, twin_opt = copy.deepcopy((model, opt))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = step_values(twin, twin_opt, lm_loss, (x, y), val, estimator="materialized", route="auto")  # the tracker's default
        tracker = InRunShapley(model, opt, lm_loss, val)
        with tracker.batch([10, 11, 12, 13]):
            lm_loss(model(x), y).backward()
        opt.step()
    paths = tracker._computer.engine.paths_taken  # the tracker's own engine
    assert paths and "fallback" not in paths.values(), paths
    values = tracker.values()
    got = torch.tensor(values.loc[[10, 11, 12, 13], "value"].to_numpy())
    assert_close(got, expected, rtol=1e-8, atol=1e-12 * float(expected.abs().max()), name=arch)
    tracker.close()

"""Rules for the layers of Hugging Face ``transformers``: ``Conv1D`` and the RMSNorm family.

Imported by :func:`~estimators._rules._base.rule_for` the first time it is asked about a class
defined in ``transformers`` (so that importing ``estimators`` never imports transformers), whose
:func:`provide` then registers the rule for exactly that class.

* ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ...): y = x W + b with W ``[in, out]``,
  the transpose of ``nn.Linear``'s layout, so c_z(W) = Σ_t x_t b_tᵀ (rows: inputs, columns:
  output gradients) and c_z(b) = Σ_t b_t.
* The RMSNorm classes (``LlamaRMSNorm``, ``MistralRMSNorm``, ``Qwen2RMSNorm``, ``GemmaRMSNorm``,
  ...): y = w ⊙ x̂ or y = (1 + w) ⊙ x̂ with x̂ = x / √(mean(x²) + eps) over the last axis, x̂
  computed in float32 (also for a float64 input, which is rounded to float32 first) and cast
  back. Both give c_z(w) = Σ_t x̂_t ⊙ b_t, with x̂ and b in the dtype of the product the module
  forms. A class is recognised by its source, not its name: its ``forward`` (and the ``_norm``
  it calls) must equal one of the templates below up to names, annotations and docstrings. A
  class that matches none (a grouped norm, a dtype-dependent cast, an input scale) gets no rule
  and takes the torch.func fallback, or is refused with ``strict=True``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._factors import PerSample
from ._base import LayerRule, batch_first, register
from .layernorm import sum_positions
from .linear import affine_terms


# ---------------------------------------------------------------------------------- Conv1D
class Conv1DRule(LayerRule):
    """Rule for ``transformers.pytorch_utils.Conv1D``; dense cost n·T·in·out, pairwise n·T·m·S·(in + out).

    ``terms(module, x, grad_output)``: x ``[n, *mid, in]``, grad_output ``[n, *mid, out]`` ->
    ``{"weight": Bilinear(rows=a [n, T, in], cols=b [n, T, out]), "bias": PerSample([n, out])}``:
    c_z(W) = Σ_t a_t b_tᵀ on W ``[in, out]``. Raises ValueError for an input without a batch axis.

    Example (sample 1's terms equal the gradient of sample 1 alone):
        >>> gen = torch.Generator().manual_seed(0)
        >>> def randn(*shape): return torch.randn(*shape, generator=gen, dtype=torch.float64)
        >>> conv = Conv1D(2, 3).double()                     # nf = 2 outputs, nx = 3 inputs: W [3, 2]
        >>> x, b = randn(4, 5, 3), randn(4, 5, 2)
        >>> terms = Conv1DRule.terms(conv, x, b)
        >>> c = terms["weight"].materialize(conv.weight.shape)          # [n, 3, 2]
        >>> gw, gb = torch.autograd.grad(conv(x[1:2]), [conv.weight, conv.bias], b[1:2])
        >>> torch.allclose(c[1], gw), torch.allclose(terms["bias"].c[1], gb)
        (True, True)
        >>> from estimators._rules import rule_for
        >>> rule_for(Conv1D) is Conv1DRule
        True
    """

    @classmethod
    def terms(cls, module, x, grad_output):
        return affine_terms("transformers Conv1D", module, x, grad_output, weight_in_out=True)


# ---------------------------------------------------------------------------------- RMSNorm family
@dataclasses.dataclass(frozen=True)
class RMSNormForm:
    """How one RMSNorm class computes y from x and w (what its ``forward`` source says).

    Attributes:
        eps: name of the module attribute holding eps (``variance_epsilon`` or ``eps``).
        norm: ``"rsqrt"`` (x̂ = h · rsqrt(mean h² + eps)) or ``"pow"`` (h · (mean h² + eps)^−½),
            h = x in float32; the two round differently, so the rule uses the module's own.
        cast_first: ``True`` for y = w · x̂.to(x.dtype) (Llama: the product is in the promoted
            dtype of w and x), ``False`` for y = (w' · x̂).to(x.dtype) (the product is in float32
            or in the promoted dtype of w and float32, see ``product``).
        product: for ``cast_first=False``, ``"float32"`` (w' = w.float(), (1 + w).float(), ...)
            or ``"promote"`` (w' = w).
        offset: 0 for w ⊙ x̂, 1 for (1 + w) ⊙ x̂ (the gradient is the same: Σ_t x̂_t ⊙ b_t).
        scale_flag: a module attribute that must be true for the weight to be used (Gemma3n's
            ``with_scale``), or ``None``.

    Example:
        >>> RMSNormForm("eps", "rsqrt", False, "float32", 1.0).offset
        1.0
    """

    eps: str
    norm: str
    cast_first: bool
    product: str = "promote"
    offset: float = 0.0
    scale_flag: str | None = None


#: ``_norm(self, x)`` helpers a forward may call: source -> (norm, eps attribute).
_NORM_TEMPLATES = {
    "def _norm(self, x):\n    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)": ("rsqrt", "eps"),
    "def _norm(self, x):\n    m = x.pow(2).mean(-1, keepdim=True) + self.eps\n    return x * torch.pow(m, -0.5)": ("pow", "eps"),
    # the same two, eps named variance_epsilon (Llama4 text, Gemma3n from transformers 5.2x)
    "def _norm(self, x):\n    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)": ("rsqrt", "variance_epsilon"),
    "def _norm(self, x):\n    m = x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon\n    return x * torch.pow(m, -0.5)": (
        "pow", "variance_epsilon"
    ),
}

#: ``forward`` sources -> form; ``None`` as eps/norm: taken from the ``_norm`` the forward calls.
_FORWARD_TEMPLATES = {
    # Llama, Mistral, Qwen2, Qwen3, Mamba and ~140 more
    """def forward(self, x):
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * x.to(input_dtype)""": RMSNormForm("variance_epsilon", "rsqrt", True),
    # Afmoe, DeepseekV4, FlexOlmo, ...
    """def forward(self, x):
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + self.variance_epsilon)
    return (self.weight * x).to(input_dtype)""": RMSNormForm("variance_epsilon", "rsqrt", False, "promote"),
    # Helium, NemotronH
    """def forward(self, x):
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + self.variance_epsilon)
    return (self.weight.to(torch.float32) * x).to(input_dtype)""": RMSNormForm("variance_epsilon", "rsqrt", False, "float32"),
    # Gemma, Gemma2, Gemma3, ...: (1 + w) ⊙ x̂
    """def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)""": RMSNormForm(None, None, False, "float32", 1.0),
    # MuseSpark's centered norm: (1 + w) ⊙ x̂, the sum cast to float32
    """def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight).float()
    return output.type_as(x)""": RMSNormForm(None, None, False, "float32", 1.0),
    # Moshi, KyutaiSpeechToText
    """def forward(self, x):
    output = self._norm(x.float())
    output = output * self.weight.float()
    return output.type_as(x)""": RMSNormForm(None, None, False, "float32"),
    # Gemma3n, Gemma4, ... (weight only with with_scale=True)
    """def forward(self, x):
    normed_output = self._norm(x.float())
    if self.with_scale:
        normed_output = normed_output * self.weight.float()
    return normed_output.type_as(x)""": RMSNormForm(None, None, False, "float32", 0.0, "with_scale"),
    # Llama4 text
    """def forward(self, x):
    output = self._norm(x.float()).type_as(x)
    return output * self.weight""": RMSNormForm(None, None, True),
}


class _Canonical(ast.NodeTransformer):
    """A function's AST without annotations or docstring, its arguments and locals renamed v0, v1, ..."""

    def __init__(self, local_names: set[str]):
        self.local_names = local_names
        self.renamed: dict[str, str] = {}

    def _name(self, name: str) -> str:
        return self.renamed.setdefault(name, f"v{len(self.renamed)}")

    def visit_FunctionDef(self, node):
        node.returns = None
        if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            node.body = node.body[1:]
        return self.generic_visit(node)

    def visit_arg(self, node):
        node.annotation = None
        if node.arg != "self":
            node.arg = self._name(node.arg)
        return node

    def visit_Name(self, node):
        if node.id in self.local_names:
            node.id = self._name(node.id)
        return node


def canonical(source: str) -> str | None:
    """The comparison key of one function's source (``None`` if it is not a single function).

    Example (names, annotations and docstrings do not matter; operations do):
        >>> a = "def forward(self, x: torch.Tensor) -> torch.Tensor:\\n    '''doc'''\\n    return self.weight * x"
        >>> canonical(a) == canonical("def forward(self, h):\\n    return self.weight * h")
        True
        >>> canonical(a) == canonical("def forward(self, h):\\n    return self.weight + h")
        False
    """
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    fn = tree.body[0]
    local_names = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    local_names |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    local_names.discard("self")
    return ast.dump(_Canonical(local_names).visit(fn), include_attributes=False)


_FORWARDS = {canonical(src): form for src, form in _FORWARD_TEMPLATES.items()}
_NORMS = {canonical(src): spec for src, spec in _NORM_TEMPLATES.items()}


def classify_source(forward: str, norm: str | None = None) -> RMSNormForm | None:
    """The :class:`RMSNormForm` of a ``forward`` source (and the ``_norm`` source it calls), or ``None``.

    Example:
        >>> import transformers.models.gemma.modeling_gemma as gemma
        >>> classify_source(inspect.getsource(gemma.GemmaRMSNorm.forward), inspect.getsource(gemma.GemmaRMSNorm._norm))
        RMSNormForm(eps='eps', norm='rsqrt', cast_first=False, product='float32', offset=1.0, scale_flag=None)
        >>> classify_source("def forward(self, x):\\n    return self.weight * x") is None
        True
    """
    form = _FORWARDS.get(canonical(forward))
    if form is None or form.norm is not None:
        return form
    spec = _NORMS.get(canonical(norm)) if norm is not None else None
    if spec is None:
        return None
    return dataclasses.replace(form, norm=spec[0], eps=spec[1])


@functools.lru_cache(maxsize=None)
def classify(layer_type: type) -> RMSNormForm | None:
    """The :class:`RMSNormForm` of a class (its resolved ``forward`` and ``_norm``), or ``None``.

    Example:
        >>> import transformers.models.llama.modeling_llama as llama
        >>> classify(llama.LlamaRMSNorm)
        RMSNormForm(eps='variance_epsilon', norm='rsqrt', cast_first=True, product='promote', offset=0.0, scale_flag=None)
        >>> classify(llama.LlamaMLP) is None
        True
    """
    forward = getattr(layer_type, "forward", None)
    if forward is None or forward is nn.Module.forward:
        return None
    try:
        source = inspect.getsource(forward)
        norm = getattr(layer_type, "_norm", None)
        norm_source = inspect.getsource(norm) if callable(norm) else None
    except (OSError, TypeError):  # no source (built at run time, compiled): never guess
        return None
    return classify_source(source, norm_source)


def rms_xhat(form: RMSNormForm, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̂ = h / √(mean h² + eps) over the last axis, h = x in float32, by the module's own operations.

    Example:
        >>> form = RMSNormForm("eps", "pow", False, "float32")
        >>> norm = nn.Module(); norm.eps = 1e-6
        >>> rms_xhat(form, norm, torch.tensor([[3.0, 4.0]], dtype=torch.float64)).dtype
        torch.float32
    """
    h = x.to(torch.float32)
    ms = h.pow(2).mean(-1, keepdim=True)
    eps = getattr(module, form.eps)
    return h * (torch.rsqrt(ms + eps) if form.norm == "rsqrt" else torch.pow(ms + eps, -0.5))


class HFRMSNormRule(LayerRule):
    """Rule base for the RMSNorm classes of transformers; one final subclass per class, made by :func:`provide`.

    ``terms(module, x, grad_output)``: x and grad_output ``[n, *mid, d]`` ->
    ``{"weight": PerSample(Σ_t x̂_t ⊙ b_t)}``, ``[n, d]``, where x̂ (float32, from
    :func:`rms_xhat`) and b are taken to the dtype in which the module multiplies by the weight
    (``form``), exactly as autograd forms the weight's gradient before casting it to w's dtype.
    Cost n·T·d on every path. Instances whose weight is not 1-D, or whose ``scale_flag`` is
    false, take the fallback (``unsupported``).

    Example (Llama's norm on a float64 input: x̂ is rounded through float32, as in the module):
        >>> import transformers.models.llama.modeling_llama as llama
        >>> from estimators._rules import rule_for
        >>> norm = llama.LlamaRMSNorm(4, eps=1e-6).double()
        >>> rule = rule_for(llama.LlamaRMSNorm)
        >>> rule.__name__, issubclass(rule, HFRMSNormRule)
        ('LlamaRMSNormRule', True)
        >>> gen = torch.Generator().manual_seed(0)
        >>> x, b = (torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) for _ in range(2))
        >>> c = rule.terms(norm, x, b)["weight"].c
        >>> torch.equal(c[1], torch.autograd.grad(norm(x[1:]), norm.weight, b[1:])[0])
        True
    """

    form: ClassVar[RMSNormForm]

    @classmethod
    def params(cls, module):
        return ("weight",)

    @classmethod
    def unsupported(cls, module):
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() != 1:
            return f"its weight has shape {tuple(w.shape)}, the rule needs a vector over the last axis"
        if cls.form.scale_flag is not None and not getattr(module, cls.form.scale_flag, False):
            return f"{cls.form.scale_flag}=False: the forward does not use the weight"
        return None

    @classmethod
    def terms(cls, module, x, grad_output):
        name = type(module).__name__
        batch_first(name, x, 2)
        w = module.weight
        if w.shape != x.shape[-1:]:
            raise ValueError(f"{name}: weight of shape {tuple(w.shape)} does not match the input's last axis {x.shape[-1]}")
        n, form = x.shape[0], cls.form
        xhat = rms_xhat(form, module, x)
        if form.cast_first:  # y = w · x̂.to(x.dtype), in the promoted dtype of w and x
            dtype = torch.promote_types(w.dtype, x.dtype)
            xhat = xhat.to(x.dtype)
        else:  # y = (w' · x̂).to(x.dtype): the gradient of the product arrives cast to its dtype
            dtype = torch.float32 if form.product == "float32" else torch.promote_types(w.dtype, torch.float32)
        return {"weight": PerSample(sum_positions(xhat.to(dtype) * grad_output.to(dtype), n, 1))}


def provide(layer_type: type) -> type[LayerRule] | None:
    """Register and return the rule for exactly ``layer_type`` (a transformers class), or ``None``.

    Called by ``rule_for`` when the registry has no rule for a class of transformers.

    Example:
        >>> import transformers.models.gpt2.modeling_gpt2 as gpt2
        >>> provide(gpt2.GPT2MLP) is None                  # not a layer with a rule: the fallback
        True
    """
    if layer_type is Conv1D:
        return register(Conv1DRule, Conv1D)
    form = classify(layer_type)
    if form is None:
        return None
    name = f"{layer_type.__name__}Rule"
    doc = f"Rule for ``{layer_type.__module__}.{layer_type.__qualname__}`` ({form}); see :class:`HFRMSNormRule`."
    return type(name, (HFRMSNormRule,), {"form": form, "__module__": __name__, "__qualname__": name, "__doc__": doc},
                layer=layer_type)

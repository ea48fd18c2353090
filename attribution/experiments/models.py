"""Small models for the experiments, built only from layers the ghost engine has rules for."""

from __future__ import annotations

import torch
from torch import nn


def mlp(d_in: int = 64, hidden: int = 64, classes: int = 10, seed: int = 0, depth: int = 2) -> nn.Module:
    """Linear → GELU → (Linear → GELU) × (depth − 1) → Linear: ``depth`` hidden layers (default 2)."""
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(d_in, hidden), nn.GELU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(hidden, classes))


def small_cnn(classes: int = 10, seed: int = 0) -> nn.Module:
    """For 8×8 images: Conv(1→8, 3×3) → GELU → Conv(8→16, 3×3) → GELU → Linear(256 → classes); no BatchNorm."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.GELU(), nn.Conv2d(8, 16, 3), nn.GELU(), nn.Flatten(), nn.Linear(16 * 4 * 4, classes)
    )


def bench_cnn(width: int = 32, classes: int = 10, seed: int = 0) -> nn.Module:
    """For 3×S×S images: Conv(3→w) → GELU → Conv(w→2w, stride 2) → GELU → Conv(2w→2w, stride 2) → GELU → mean pool → Linear(2w → classes)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q, k, v, out ``nn.Linear`` projections."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        split = lambda z: z.view(n, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        y = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A GPT-style decoder: token + position embeddings, ``depth`` blocks, LayerNorm, LM head.

    ``tied=True`` makes the head's weight the token embedding's parameter (one tensor used by
    two modules). Input ``[n, T]`` token ids; output ``[n, T, vocab]`` logits.
    """

    def __init__(self, vocab: int, width: int = 32, depth: int = 2, heads: int = 2, max_len: int = 64, tied: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)  # per-row positions
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos(positions))))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over non-padding targets (pad id 0)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=0)

"""Tiny float64 models, batches and optimizers shared by the validation tests.

Everything is built from an integer seed so Hypothesis can shrink and replay it.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

DT = torch.float64


class TinyCNN(nn.Module):
    """Conv -> ReLU -> Linear on 1x5x5 images, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class TinySeq(nn.Module):
    """Embedding -> LayerNorm -> Linear over a sequence axis (vocabulary 7, length 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 7)

    def forward(self, tokens):
        return self.head(self.norm(self.emb(tokens)))


class WithBuffers(nn.Module):
    """MLP with an eval-mode BatchNorm (running stats are buffers) and a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.scale = nn.Parameter(torch.tensor(1.5), requires_grad=False)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))) * self.scale)


def seq_loss(logits, targets, reduction="mean"):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)


MODEL_KINDS = ("mlp", "cnn", "seq", "buffers")


def make_model(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    elif kind == "cnn":
        model = TinyCNN()
    elif kind == "seq":
        model = TinySeq()
    elif kind == "buffers":
        model = WithBuffers()
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
        model.eval()
    else:
        raise ValueError(kind)
    return model.to(DT)


def make_batch(kind: str, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "seq":
        return torch.randint(0, 7, (n, 3), generator=g), torch.randint(0, 7, (n, 3), generator=g)
    shape = (n, 1, 5, 5) if kind == "cnn" else (n, 4)
    return torch.randn(shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def loss_for(kind: str, reduction: str = "mean"):
    if kind == "seq":
        return lambda out, y: seq_loss(out, y, reduction)
    return lambda out, y: F.cross_entropy(out, y, reduction=reduction)


def warm_up(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, batch, steps: int) -> None:
    """Take ``steps`` real training steps (fills the optimizer state), then leave ``.grad`` of the
    next batch in place, as just before ``optimizer.step()``."""
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        optimizer.step()
    optimizer.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()


# name -> (optimizer class, kwargs): every allow-listed class, with the flags that change its update.
OPT = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "sgd_nesterov_wd_foreach": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=True)),
    "sgd_dampening_maximize": (torch.optim.SGD, dict(lr=0.1, momentum=0.5, dampening=0.3, maximize=True)),
    "adam": (torch.optim.Adam, dict(lr=0.01)),
    "adam_amsgrad_wd": (torch.optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    "adam_foreach": (torch.optim.Adam, dict(lr=0.01, foreach=True)),
    "adam_fused": (torch.optim.Adam, dict(lr=0.01, fused=True)),
    "adam_maximize_betas": (torch.optim.Adam, dict(lr=0.01, maximize=True, betas=(0.8, 0.95))),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=0.01)),
    "rmsprop_momentum_centered_wd": (torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
    "adamax": (torch.optim.Adamax, dict(lr=0.01)),
    "nadam_decoupled": (torch.optim.NAdam, dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.01)),
    "radam": (torch.optim.RAdam, dict(lr=0.01)),
    "adadelta": (torch.optim.Adadelta, dict(lr=1.0)),
    "asgd": (torch.optim.ASGD, dict(lr=0.05, t0=1)),
    "rprop": (torch.optim.Rprop, dict(lr=0.01)),
}
OPTIMIZER_CONFIGS = list(OPT.values())


def config_id(cfg) -> str:
    cls, kw = cfg
    return cls.__name__ + "".join(f"-{k}={v}" for k, v in kw.items() if k != "lr")


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Deep copy of everything the oracle must not change."""
    snap = {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "training": [m.training for m in model.modules()],
    }
    if optimizer is not None:
        snap["state_keys"] = [id(p) for p in optimizer.state]
        snap["state"] = copy.deepcopy(optimizer.state_dict()["state"])
        snap["groups"] = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])
        snap["group_params"] = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
    return snap


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**16)


def assert_unchanged(before, after, where: str = "") -> None:
    """Bit-for-bit equality of two :func:`snapshot` results, naming the first difference."""

    def same(a, b, path):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), f"{where}{path}: keys {sorted(map(str, a))} -> {sorted(map(str, b))}"
            for k in a:
                same(a[k], b[k], f"{path}[{k!r}]")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), f"{where}{path}: length {len(a)} -> {len(b)}"
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{path}[{i}]")
        elif isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), f"{where}{path} changed"
        else:
            assert a == b, f"{where}{path}: {a!r} -> {b!r}"

    same(before, after, "")

"""What each optimizer's linearization costs per step: tangent and secant against the SGD proxy.

``python -m attribution.experiments.optimizer_cost [--quick] [--repeats R]`` times
``attribution.step_values`` on one MLP step for several optimizers and prints, per optimizer and
linearization, the median time over R repeats, its spread (min–max) and the ratio to the SGD
proxy (J = −lr) of the same optimizer, measured in the same run. Operator rules (Muon,
Adafactor) apply J by VJPs; their secant integrates the path by Gauss–Legendre quadrature with
many VJPs, which is where their cost goes. Machines here are shared: read ratios, not seconds,
and treat differences inside the spread as noise.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import attribution


def _optimizers(name: str, model: nn.Module) -> list[torch.optim.Optimizer]:
    matrices = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    if name == "muon+adamw":
        return [torch.optim.Muon(matrices, lr=2e-2), torch.optim.AdamW(rest, lr=1e-2)]
    cls = {"adam": torch.optim.Adam, "nadam": torch.optim.NAdam, "adafactor": torch.optim.Adafactor, "sgd-momentum": torch.optim.SGD}[name]
    kwargs = {"lr": 1e-2} | ({"momentum": 0.9} if name == "sgd-momentum" else {})
    return [cls(model.parameters(), **kwargs)]


def measure(name: str, *, width: int, batch: int, repeats: int, seed: int = 0) -> dict[str, list[float]]:
    """Seconds of ``step_values`` per linearization (``repeats`` timings each) for optimizer ``name``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width // 2, width), nn.GELU(), nn.Linear(width, 10))
    opts = _optimizers(name, model)
    x, y = torch.randn(4 * batch, width // 2), torch.randint(0, 10, (4 * batch,))
    loss_fn = nn.functional.cross_entropy
    for _ in range(2):  # two real steps: state exists (Muon's first step is a jump for the secant)
        loss_fn(model(x[:batch]), y[:batch]).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    out: dict[str, list[float]] = {}
    for lin in ("sgd", "tangent", "secant"):
        out[lin] = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            attribution.step_values(model, opts, loss_fn, (x[batch : 2 * batch], y[batch : 2 * batch]), (x[:32], y[:32]),
                                    linearization=lin, val_point="current")
            out[lin].append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a width-32 MLP and 2 repeats, a few seconds (default: off)")
    parser.add_argument("--repeats", type=int, default=None, help="timings per cell (default: 5, 2 with --quick)")
    parser.add_argument("--width", type=int, default=None, help="hidden width of the MLP (default: 256, 32 with --quick)")
    args = parser.parse_args(argv)
    width = args.width or (32 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(1)
    print(f"MLP {width // 2}-{width}-10, batch 64, K = 1, val_point current, {repeats} repeats, torch threads 1")
    print(f"{'optimizer':<14}{'linearization':<15}{'median s':>10}{'spread s':>18}{'× sgd proxy':>13}")
    for name in ("sgd-momentum", "adam", "nadam", "adafactor", "muon+adamw"):
        times = measure(name, width=width, batch=64, repeats=repeats)
        base = statistics.median(times["sgd"])
        for lin, ts in times.items():
            med = statistics.median(ts)
            print(f"{name:<14}{lin:<15}{med:>10.4f}{f'{min(ts):.4f}–{max(ts):.4f}':>18}{med / base:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

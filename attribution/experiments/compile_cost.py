"""What the fused kernels' compiler costs: resident memory and seconds, cold and from inductor's cache.

``python -m attribution.experiments.compile_cost [--fresh-cache]`` runs the measurement twice,
each time in a new Python process (imports and compilations are per process): it imports the
toolkit, then dynamo and inductor, then makes the first call of each fused kernel of
``optimizers.adam`` (the secant J and the shift to the validation point) on a 512 × 512 float32
parameter, and prints the resident memory (``VmRSS``) each stage adds and the seconds it takes.
With ``--fresh-cache`` both processes share a new, empty inductor cache directory, so the first
run compiles cold and the second reads the first one's cache; without it, both use the machine's
usual cache (often already warm). This is what ``InRunShapley(compile="auto")`` weighs against
the per-step saving (docs/performance.md, finding 16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _rss_mb() -> float:
    """Resident memory of this process in MB (``VmRSS``; the peak RSS where /proc is absent)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def measure() -> dict:
    """In this process: MB and seconds added by importing the compiler and by each kernel's first call.

    Returns:
        ``{"base_mb", "stages": [{"stage", "mb", "seconds"}], "compiled": bool}``; ``compiled``
        is False when a kernel fell back to its eager formula (no C++ compiler: nothing compiled).
    """
    import torch

    import attribution  # noqa: F401 - the toolkit's own imports belong to the baseline
    from optimizers import adam
    from optimizers._fused import fused_kernels

    x = torch.randn(512, 512)
    m, v, J = torch.randn(512, 512), torch.rand(512, 512), torch.randn(512, 512)
    calls = [
        ("adam_secant (first call)", lambda: adam._SECANT(x, m, v, (0.9, 0.999, 0.5, 1e-8, -1e-3))),
        ("adam_chord_shift (first call)", lambda: adam._CHORD_SHIFT(x, m, v, J, x, (0.9, 0.999, 0.5, 1e-8, -1e-3, -1e-5, 0.5))),
    ]
    base = _rss_mb()
    stages = []
    t0 = time.perf_counter()
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401

    stages.append({"stage": "import dynamo + inductor", "mb": _rss_mb() - base, "seconds": time.perf_counter() - t0})
    compiled = True
    for name, call in calls:
        before, t0 = _rss_mb(), time.perf_counter()
        with fused_kernels():
            compiled &= call() is not None
        stages.append({"stage": name, "mb": _rss_mb() - before, "seconds": time.perf_counter() - t0})
    return {"base_mb": base, "stages": stages, "compiled": compiled}


def _child() -> None:
    import torch

    torch.set_num_threads(1)
    print(json.dumps(measure()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh-cache", action="store_true", help="a new, empty inductor cache for both runs (default: the usual one)")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        if args.fresh_cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        print(f"inductor cache: {'new, empty: ' + cache if args.fresh_cache else env.get('TORCHINDUCTOR_CACHE_DIR', 'the default')}")
        for run in ("first process", "second process"):
            code = "from attribution.experiments.compile_cost import _child; _child()"
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            total = sum(s["mb"] for s in result["stages"])
            print(f"\n{run}: resident {result['base_mb']:.0f} MB after importing the toolkit; "
                  f"+{total:.0f} MB in all{'' if result['compiled'] else ' (NOT compiled: eager fallback)'}")
            for s in result["stages"]:
                print(f"  {s['stage']:<32}{s['mb']:>+8.1f} MB{s['seconds']:>9.2f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

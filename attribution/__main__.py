"""``python -m attribution <command>``: the toolkit's experiments.

Commands:

* ``demo``: the main job; in-run values on digits under AdamW, checked against leave-one-out;
* ``fidelity``: the fidelity study; every estimator against leave-one-out and exact Shapley
  values across optimizers, models and training phases (``--quick`` for a reduced grid);
* ``bench``: throughput and peak memory of in-run attribution against plain AdamW training;
* ``mislabel``: mislabelled-sample detection on digits or Rotten Tomatoes (value variants vs loss
  and self-influence baselines);
* ``prune``: data pruning on Rotten Tomatoes with MiniLM (remove the lowest-valued p%, retrain);
* ``source-id``: source identification; a small LM trained on King James Bible chapters, queried
  with verbatim passages, their American Standard Version paraphrase and parallel passages;
* ``trajectory``: what in-run values predict; per-step values against replay leave-one-out
  (a sample removed from its step, K real optimizer steps later) at K = 1, 3, 10, 30;
* ``run-totals``: run totals from initialisation; the tracker's summed values (default route and
  secant only) against the summed per-step exact Shapley values and leave-one-out;
* ``momentum``: do a run's values add up to its improvement? ``credit="step"`` vs ``"momentum"``.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": "attribution.experiments.demo",
    "bench": "attribution.experiments.bench",
    "fidelity": "attribution.experiments.fidelity",
    "mislabel": "attribution.experiments.mislabel",
    "prune": "attribution.experiments.prune",
    "source-id": "attribution.experiments.source_id",
    "trajectory": "attribution.experiments.trajectory",
    "run-totals": "attribution.experiments.run_totals",
    "momentum": "attribution.experiments.momentum",
}


def build_parser(command: str):
    """The ``argparse`` parser of ``command`` (imports only that command's module)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; accepted values: {', '.join(COMMANDS)}")
    import importlib

    return importlib.import_module(COMMANDS[command]).build_parser()


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the command's own ``main``; ``python -m attribution <command> --help`` lists its options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: python -m attribution {{{','.join(COMMANDS)}}} [options]"
    if not argv or argv[0] in {"-h", "--help"}:
        print(f"{usage}\n\n{__doc__}\nEach command lists its options and their defaults: python -m attribution <command> --help")
        return 0
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}; accepted commands: {', '.join(COMMANDS)}\n{usage}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())

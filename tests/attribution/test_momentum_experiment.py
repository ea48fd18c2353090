"""Smoke run of ``python -m attribution momentum`` (the full run is a script; its table is in docs/results.md)."""

import pandas as pd

from attribution.experiments import momentum


def test_quick_run_writes_its_table_and_momentum_credit_covers_more_of_the_run(tmp_path):
    assert momentum.main(["--quick", "--out", str(tmp_path)]) == 0
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert (tmp_path / "results.md").read_text().startswith("Command: `python -m attribution momentum --quick")
    for optimizer, rows in runs.groupby("optimizer"):
        step = float(rows.loc[rows.credit == "step", "ratio"].iloc[0])
        carried = float(rows.loc[rows.credit != "step", "ratio"].iloc[0])
        # Under momentum the per-step game leaves most of each update to nobody; the credit restores it.
        assert step < 0.5 < carried, (optimizer, step, carried)
    assert (runs.loc[runs.credit != "step", "momentum_bytes"] > 0).all()

"""Smoke test of ``attribution.experiments.conv_many`` (the K-target convolution timing)."""

from __future__ import annotations

from attribution.experiments import conv_many


def test_routes_agree_and_the_table_names_the_route_taken():
    rows = conv_many.measure(samples=4, reps=1, layers=((3, 8, 6), (8, 8, 6)), Ks=(2, 8))
    assert len(rows) == 4
    for r in rows:
        assert r["max_abs_diff"] <= 1e-5 * max(1.0, r["scale"])
        assert r["taken"] in ("stacked", "per-sample")
        assert all(r[k] > 0 for k in ("ms_per_target", "ms_stacked", "ms_per_sample"))
    # T = 36 output locations: per-sample from K = 8 (4·(36 + 8) < 8·36), stacked at K = 2.
    assert [r["taken"] for r in rows] == ["stacked", "per-sample"] * 2


def test_main_prints_the_table(capsys):
    conv_many.main(["--samples", "2", "--reps", "1"])
    out = capsys.readouterr().out
    assert out.count("\n| ") >= 9 and "relative to the largest value" in out
    assert "(stacked)" in out

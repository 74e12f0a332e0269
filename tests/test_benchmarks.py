"""The benchmark runner at toy size (tiny UNet, 32x32, N up to 20): every code path runs, every key is reported.

The memory children run in-process here (their RSS figures are then meaningless, the code path is the same); one
test runs a child in a fresh process. The no-op re-run benchmark (two Prefect ephemeral-server starts) is slow.
"""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from benchmarks import memory, official, report
from benchmarks.common import run_child
from benchmarks.run import main
from pipeline import features

KEYS = ("train_peak_rss_mb_n20", "train_rss_growth_n5_to_n20", "official_rss_mb_per_image",
        "store_ratio_vs_upsampled_fp32", "store_ratio_vs_upsampled_fp32_realistic", "extraction_overhead_ratio",
        "streaming_throughput_ratio", "noop_rerun_s", "ensemble_speedup_batched_vs_independent",
        "ensemble_speedup_vs_official", "mlp_flops_utilisation")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """`python benchmarks/run.py --toy --json` (all but the no-op benchmark) run in-process, memory children too."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "results.md"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory, "run_child", lambda module, args: memory.child_result(args))
        with contextlib.redirect_stdout(stdout):
            assert main(["--toy", "--json", "--only", "memory,store,extraction,throughput,ensemble", "--out", str(out),
                         "--workdir", str(root / "work")]) == 0
    lines = stdout.getvalue().strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line"
    return json.loads(lines[0]), out.read_text(), root / "work"


def test_json_has_every_key_with_sane_values(toy_run):
    results, _, _ = toy_run
    assert results["errors"] == {}
    for key in KEYS:
        assert key in results, key
    assert results["noop_rerun_s"] is None  # not run here
    assert results["train_peak_rss_mb_n20"] > 100  # an interpreter with torch is never smaller
    assert results["train_rss_growth_n5_to_n20"] > 0
    assert results["official_rss_mb_per_image"] is not None
    # toy geometry (32x32, 320 dims): native maps are a third of the upsampled fp32 size at most, then compressed
    assert 0.05 < results["store_ratio_vs_upsampled_fp32"] < 0.4
    assert 0.005 < results["store_ratio_vs_upsampled_fp32_realistic"] < 0.03  # carried to the 256 geometry
    # timings at toy size on a shared machine say nothing: only that they were measured
    assert 0 < results["extraction_overhead_ratio"] < math.inf
    assert 0 < results["extraction_overhead_ratio_stress"] < math.inf
    assert results["details"]["extraction_stress"]["fp16_bytes_per_image_step"] > 0
    assert 0 < results["streaming_throughput_ratio"] < math.inf
    ensemble = results["details"]["ensemble"]
    for key in ("ensemble_speedup_batched_vs_independent", "ensemble_speedup_vs_official", "mlp_flops_utilisation"):
        assert 0 < results[key] < math.inf and results[key] == ensemble[key], key
    assert ensemble["members"] == 10 and ensemble["dim"] == results["geometry"]["feature_dim"]
    for key, goal in results["goals"].items():
        assert set(goal) == {"value", "goal", "pass"} and goal["value"] == results[key]
    assert results["goals"]["noop_rerun_s"]["pass"] is None
    assert results["machine"]["nproc"] >= 1 and results["machine"]["torch"] == torch.__version__


def test_memory_details_cover_both_paths(toy_run):
    results, _, _ = toy_run
    mem = results["details"]["memory"]
    assert [r["n"] for r in mem["ours"]] == [5, 20]
    assert all(r["pixels"] > 0 and r["iterations"] > 0 for r in mem["ours"])
    full_dim, step_dim = results["geometry"]["feature_dim"], results["geometry"]["feature_dim"] // 2
    assert sorted((r["dim"], r["n"]) for r in mem["official"]) == [(step_dim, 2), (step_dim, 3),
                                                                 (full_dim, 1), (full_dim, 2)]
    assert all(r["labelled_pixels"] > 0 for r in mem["official"])
    assert set(mem["official_extrapolated_mb"]) == {"5", "10", "20", "50"}
    assert mem["official_theory_mb_per_image"] == pytest.approx(2 * 32 * 32 * 320 * 4 / 2**20)


def test_throughput_breakdown_times_the_stage_calls(toy_run):
    results, _, _ = toy_run
    tp = results["details"]["throughput"]
    b = tp["breakdown_s"]
    # the timing wrappers saw the stage's own calls (0 would mean the stage no longer calls them as assumed)
    assert b["read_maps"] > 0 and b["sample_tables"] > 0
    assert b["read_maps"] + b["sample_tables"] < tp["streaming_no_prefetch_s"]
    assert tp["prefetch_thread_s"]["sample_tables"] > 0  # the prefetch thread's calls are timed too
    assert tp["iterations"] == tp["labelled_pixels"] // 64 and tp["torch_threads"] == 1


def test_markdown_has_command_machine_and_goal_rows(toy_run):
    results, text, _ = toy_run
    assert "python benchmarks/run.py --toy --json" in text
    assert f"{results['machine']['nproc']} CPUs" in text and results["machine"]["cpu_model"] in text
    for row in ("training peak RSS, N = 20", "store bytes per image and step", "extraction time",
                "training throughput", "no-op re-run"):
        assert row in text
    assert "not run" in text  # the no-op goal


def test_memory_child_measures_its_own_process(toy_run):
    _, _, work = toy_run
    result = run_child("benchmarks.memory", ["ours", str(work / "synthetic"), "1"])
    assert result["n"] == 1 and result["iterations"] >= 1
    # VmHWM of a fresh interpreter: at least what it held before training, far below the test process's size
    assert result["rss_before_training_mb"] > 50
    assert result["peak_rss_mb"] >= result["rss_before_training_mb"]


def test_official_prepare_data_equals_upsampled_features_at_labelled_pixels():
    torch.manual_seed(0)
    size, ignore = 16, 255
    maps = {"a": [torch.randn(6, 4, 4).half(), torch.randn(3, 8, 8).half()],
            "b": [torch.randn(6, 4, 4).half(), torch.randn(3, 8, 8).half()]}
    rng = np.random.default_rng(0)
    labels = {k: np.where(rng.random((size, size)) < 0.3, rng.integers(0, 2, (size, size)), ignore).astype(np.uint8)
              for k in maps}
    labels["b"][0, 0] = 7  # a class with 1 pixel: the small-annotation rule drops it
    X, y = official.prepare_data(["a", "b"], maps.__getitem__, labels.__getitem__, size, 9, ignore)
    expected_X, expected_y = [], []
    for k in ("a", "b"):
        full = features.upsample_concat(maps[k], size)  # (9, size, size)
        label = labels[k].copy()
        label[label == 7] = ignore
        ys, xs = np.nonzero(label != ignore)
        expected_X.append(full[:, ys, xs].T)
        expected_y.append(torch.from_numpy(label[ys, xs]))
    assert X.shape == (sum(len(t) for t in expected_y), 9) and X.dtype == torch.float32
    torch.testing.assert_close(X, torch.cat(expected_X))
    assert torch.equal(y, torch.cat(expected_y))


def test_summarise_scales_the_one_step_slope_and_extrapolates_from_the_measured_point():
    ours = [{"n": 5, "peak_rss_mb": 900.0}, {"n": 20, "peak_rss_mb": 990.0}]
    official_runs = [{"n": 1, "dim": 300, "peak_rss_mb": 1300.0}, {"n": 2, "dim": 300, "peak_rss_mb": 2500.0},
                     {"n": 2, "dim": 100, "peak_rss_mb": 1000.0}, {"n": 3, "dim": 100, "peak_rss_mb": 1200.0}]
    out = memory.summarise(ours, official_runs, [], 300, 100, 8)
    assert out["train_peak_rss_mb_n20"] == 990.0
    assert out["train_rss_growth_n5_to_n20"] == pytest.approx(1.1)
    assert out["ours_rss_mb_per_image"] == pytest.approx(6.0)
    assert out["official_rss_mb_per_image"] == pytest.approx(600.0)  # 200 MB/image at a third of D
    assert out["official_peak_rss_mb_n20_extrapolated"] == pytest.approx(2500.0 + 18 * 600.0)
    assert out["official_check_n2_predicted_mb"] == pytest.approx(600.0 + 2 * 600.0)


def test_goals_pass_and_miss():
    g = report.goals({"train_peak_rss_mb_n20": 1500.0, "train_rss_growth_n5_to_n20": 1.2,
                      "store_ratio_vs_upsampled_fp32": 0.02, "noop_rerun_s": math.inf})
    assert g["train_peak_rss_mb_n20"]["pass"] is True
    assert g["train_rss_growth_n5_to_n20"]["pass"] is False
    assert g["store_ratio_vs_upsampled_fp32"]["pass"] is True
    assert g["noop_rerun_s"]["pass"] is False
    assert g["extraction_overhead_ratio"]["pass"] is None


@pytest.mark.slow
def test_noop_rerun_benchmark(tmp_path):
    from benchmarks.noop import run_noop

    out = run_noop(tmp_path)
    assert out["noop_stages"] == {"extract": "cached", "train": "cached", "evaluate": "cached"}
    assert out["noop_unet_forwards"] == 0 and out["noop_members_trained"] == 0
    assert out["direct_noop"]["fresh"] is True
    assert out["noop_flow_run"] is None and out["always_flow_run"]  # the fast path; --always-flow ran the flow
    assert out["always_flow_stages"] == out["noop_stages"]
    assert 0 < out["noop_rerun_s"] < out["noop_always_flow_s"] < out["cold_run_s"]
    assert 0 < out["direct_noop_process_s"] < out["noop_always_flow_s"]
    assert out["prefect_first_flow_s"] > 0


def test_a_partial_or_toy_run_never_replaces_the_full_results():
    from benchmarks.run import BENCHMARKS, DEFAULT_OUT, default_out

    assert default_out(BENCHMARKS, toy=False) == DEFAULT_OUT
    assert default_out(("ensemble",), toy=False) == DEFAULT_OUT.with_name("results-ensemble.md")
    assert default_out(BENCHMARKS, toy=True).name.startswith("results-toy-")
    assert default_out(("cli", "noop"), toy=False).name == "results-cli-noop.md"


def test_members_at_once_benchmark_runs_and_checks_the_members_bit_for_bit():
    from benchmarks.members_at_once import run

    out = run(toy=True, members=2, at_once=2, repeats=1, labelled_pixels=600)
    assert out["bit_identical"] and out["at_once"] == 2 and out["members_at_once_speedup"] > 0
    assert set(out["seconds"]) == {"one_after_another", "at_once"}

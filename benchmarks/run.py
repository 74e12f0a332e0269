"""Benchmarks of ddpmseg against a faithful re-implementation of the official in-memory path (issue 8).

    python benchmarks/run.py [--quick] [--json] [--out benchmarks/results.md] [--workdir DIR] [--keep]

Prints one JSON object (the last line of stdout; with --json nothing else) and writes a markdown table with the
command and the machine. Every figure compares our path with the official one (or bare forwards / in-memory
training) in the same run, on the same data:

1. training memory: peak RSS of the training stage vs N training images (fresh process per point), at the real
   feature geometry from a synthetic store; the official path measured where it fits, extrapolated beyond;
2. store size per image and timestep vs the upsampled float32 features of the official path;
3. extraction (flows.extract_stage.extract_split) vs bare UNet forwards on the same inputs, on a CPU-sized UNet;
4. labelled pixels per second through one member's training, streaming from the store vs in memory;
5. wall time of a second `ddpmseg run` of an unchanged small config, and how much of it is Prefect;
6. member-pixels per second of 10 members trained batched vs one after another vs the official loop, and the
   batched step's FLOP/s against a plain matmul (benchmarks/ensemble.py).
7. CLI start-up: `ddpmseg --help` and `ddpmseg status` on a demo-sized config, fresh processes (benchmarks/cli.py).

Full: N = 2, 5, 10, 20, 40 for ours; official N = 1, 2 (+ 2, 3, 4 at one timestep for its slope); extraction
8 images x 3 steps, 3 repetitions, and 1 image x 1 step with the real 552.8 M-parameter UNet; throughput on 4 images of 16384 labelled pixels; the no-op run also against a
running Prefect server. --quick: N = 5, 20 for ours; official 1, 2 (+ 2, 3); extraction 8 images x 2 steps;
throughput on 2 images of 8192 labelled pixels. --toy: tiny shapes (the tests).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report  # noqa: E402
from benchmarks.common import log, machine_info  # noqa: E402
from benchmarks.geometry import MID_EXTRACTION, OFFICIAL_AT_64, REAL, TOY, TOY_EXTRACTION, Geometry  # noqa: E402

BENCHMARKS = ("memory", "store", "extraction", "throughput", "noop", "ensemble", "cli")
DEFAULT_OUT = Path(__file__).resolve().parent / "results.md"


def default_out(only: tuple[str, ...], toy: bool) -> Path:
    """benchmarks/results.md for a run of every benchmark at a real plan; a file of its own otherwise
    (results-<names>.md, results-toy-....md: git ignores them), so a partial or toy run never replaces it."""
    if set(only) == set(BENCHMARKS) and not toy:
        return DEFAULT_OUT
    return DEFAULT_OUT.with_name(f"results-{'toy-' if toy else ''}{'-'.join(only)}.md")


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    name: str
    geometry: Geometry
    ours_ns: tuple[int, ...]
    official_ns: tuple[int, ...]  # at the full geometry
    official_one_step_ns: tuple[int, ...]  # at one timestep, for the official slope (N >= 2)
    labelled_pixels: int  # per image (>= 1024 at 256x256: every 4096-pixel slice of a 4-image buffer is full)
    throughput_images: int
    throughput_labelled_pixels: int  # per throughput image (denser: the per-image read is amortised as in real data)
    extraction_geometry: Geometry
    extraction_images: int
    extraction_repeats: int
    running_server: bool = False
    extraction_real_unet: bool = False  # also extract 1 image x 1 step with the real 552.8 M UNet (random init)
    # also extraction on a UNet that writes far more per second of forward than the real one (a stress figure)
    stress_extraction_geometry: Geometry | None = None
    official_cap_mb: float = 11000
    ensemble_iterations: int = 48  # per member, figure 6 (within one 4096-pixel slice)
    ensemble_repeats: int = 2


DENSE = 256 * 256  # a fully labelled 256x256 training image (the paper's data sets)
FULL = Plan("full", REAL, (2, 5, 10, 20, 40), (1, 2), (2, 3, 4), 1200, 2, DENSE, OFFICIAL_AT_64, 8, 3,
            running_server=True, extraction_real_unet=True, stress_extraction_geometry=MID_EXTRACTION)
QUICK = Plan("quick", REAL, (5, 20), (1, 2), (2, 3), 1200, 2, DENSE, OFFICIAL_AT_64.with_steps((50, 150)), 4, 4,
             running_server=True, stress_extraction_geometry=MID_EXTRACTION.with_steps((50, 150)))
TOY_PLAN = Plan("toy", TOY, (5, 20), (1, 2), (2, 3), 400, 2, 600, TOY_EXTRACTION, 2, 1,
                stress_extraction_geometry=TOY_EXTRACTION, ensemble_iterations=4, ensemble_repeats=1)


def _figures(extraction: dict[str, Any]) -> dict[str, Any]:
    """An extraction result without its paths (what the JSON carries)."""
    return {k: v for k, v in extraction.items() if k not in ("store_dir", "image_ids", "unit_paths")}


def run_benchmarks(plan: Plan, workdir: Path, only: tuple[str, ...] = BENCHMARKS, command: str = "",
                   memory_runner=None) -> dict[str, Any]:
    """Run the selected benchmarks of `plan` under `workdir`; returns the results (the JSON object).

    A benchmark that fails is recorded under "errors" (its figures stay None) and the others still run.
    memory_runner: how figure 1 runs a child (default benchmarks.common.run_child, a fresh process)."""
    unknown = set(only) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; expected some of {BENCHMARKS}")
    start = time.perf_counter()
    workdir = Path(workdir)
    geo = plan.geometry
    results: dict[str, Any] = {
        "command": command, "quick": plan.name == "quick", "plan": plan.name, "machine": machine_info(),
        "geometry": geo.describe(), "details": {"labelled_pixels_per_image": plan.labelled_pixels},
        "train_peak_rss_mb_n20": None, "train_rss_growth_n5_to_n20": None, "official_rss_mb_per_image": None,
        "official_peak_rss_mb_n20_extrapolated": None, "ours_rss_mb_per_image": None,
        "store_ratio_vs_upsampled_fp32": None, "store_ratio_vs_upsampled_fp32_realistic": None,
        "extraction_overhead_ratio": None, "extraction_overhead_ratio_stress": None,
        "extraction_overhead_ratio_real_unet": None,
        "streaming_throughput_ratio": None, "noop_rerun_s": None,
        "ensemble_speedup_batched_vs_independent": None, "ensemble_speedup_vs_official": None,
        "mlp_flops_utilisation": None, "cli_help_s": None, "cli_status_s": None,
        "errors": {},
    }
    details = results["details"]
    # the images of figures 1-2 first, then the fully labelled ones of figures 4 and 6
    n_memory = max(plan.ours_ns + plan.official_ns + plan.official_one_step_ns) if {"memory", "store"} & set(only) else 0
    syn = None

    def synthetic_store() -> None:
        nonlocal syn
        from benchmarks.synthetic_store import write_synthetic_store

        counts = [plan.labelled_pixels] * n_memory + [plan.throughput_labelled_pixels] * plan.throughput_images
        log(f"writing the synthetic store: {len(counts)} images at {geo.name}, steps {list(geo.steps)}")
        syn = write_synthetic_store(workdir / "synthetic", geo, counts)
        details["synthetic_store_write_s"] = syn.seconds

    def memory_figure() -> None:
        from benchmarks import memory

        mem = memory.run_memory(workdir / "synthetic", geo.feature_dim, geo.step_dim, geo.image_size,
                                list(plan.ours_ns), list(plan.official_ns), list(plan.official_one_step_ns),
                                plan.official_cap_mb, runner=memory_runner)
        details["memory"] = mem
        for key in ("train_peak_rss_mb_n20", "train_rss_growth_n5_to_n20", "official_rss_mb_per_image",
                    "official_peak_rss_mb_n20_extrapolated", "ours_rss_mb_per_image"):
            results[key] = mem.get(key)

    def store_figure() -> None:
        from benchmarks.store_size import store_size
        from flows import stage_keys

        cfg = syn.cfg()
        st = store_size(syn.store_dir, [stage_keys.unit_for(cfg, t).path for t in geo.steps],
                        [r.image_id for r in syn.refs], geo, REAL)
        details["store_synthetic"] = st
        results["store_ratio_vs_upsampled_fp32"] = st["ratio_own_geometry"]

    def extraction_figure() -> None:
        from benchmarks.extraction import run_extraction
        from benchmarks.store_size import store_size

        ex = run_extraction(workdir / "extraction", plan.extraction_geometry, plan.extraction_images,
                            plan.extraction_repeats)
        details["extraction"] = _figures(ex)
        results["extraction_overhead_ratio"] = ex["extraction_overhead_ratio"]
        real_store = store_size(Path(ex["store_dir"]), ex["unit_paths"], ex["image_ids"], plan.extraction_geometry,
                                REAL)
        details["store_realistic"] = real_store
        results["store_ratio_vs_upsampled_fp32_realistic"] = real_store["ratio_at_real_geometry"]
        if plan.stress_extraction_geometry is not None:
            stress = run_extraction(workdir / "extraction-stress", plan.stress_extraction_geometry,
                                    2 * plan.extraction_images, plan.extraction_repeats + 1)
            details["extraction_stress"] = _figures(stress)
            results["extraction_overhead_ratio_stress"] = stress["extraction_overhead_ratio"]
        if plan.extraction_real_unet:
            real = run_extraction(workdir / "extraction-real-unet", REAL.with_steps(REAL.steps[:1]), 1, 1)
            details["extraction_real_unet"] = _figures(real)
            results["extraction_overhead_ratio_real_unet"] = real["extraction_overhead_ratio"]

    def throughput_figure() -> None:
        from benchmarks.throughput import run_throughput

        tp = run_throughput(syn, n_memory, plan.throughput_images)
        details["throughput"] = tp
        results["streaming_throughput_ratio"] = tp["streaming_throughput_ratio"]

    def ensemble_figure() -> None:
        from benchmarks.ensemble import run_ensemble

        en = run_ensemble(syn, n_memory, 1, members=10, iterations=plan.ensemble_iterations,
                          repeats=plan.ensemble_repeats)
        details["ensemble"] = en
        for key in ("ensemble_speedup_batched_vs_independent", "ensemble_speedup_vs_official",
                    "mlp_flops_utilisation"):
            results[key] = en[key]

    def noop_figure() -> None:
        from benchmarks.noop import run_noop

        nop = run_noop(workdir / "noop", running_server=plan.running_server)
        details["noop"] = nop
        results["noop_rerun_s"] = nop["noop_rerun_s"]

    def cli_figure() -> None:
        from benchmarks.cli import run_cli

        cli = run_cli(workdir / "cli")
        details["cli"] = cli["details"]
        for key in ("cli_help_s", "cli_status_s", "cli_help_cpu_s", "cli_status_cpu_s"):
            results[key] = cli[key]

    steps = [("synthetic store", synthetic_store, bool({"memory", "store", "throughput", "ensemble"} & set(only))),
             ("memory", memory_figure, "memory" in only), ("store", store_figure, "store" in only),
             ("extraction", extraction_figure, "extraction" in only),
             ("throughput", throughput_figure, "throughput" in only),
             ("ensemble", ensemble_figure, "ensemble" in only), ("noop", noop_figure, "noop" in only),
             ("cli", cli_figure, "cli" in only)]
    for name, run, wanted in steps:
        if not wanted:
            continue
        if syn is None and name in ("memory", "store", "throughput", "ensemble"):
            results["errors"][name] = "not run: the synthetic store could not be written"
            continue
        try:
            run()
        except Exception as err:  # noqa: BLE001 - record it, run the other figures, exit non-zero at the end
            results["errors"][name] = f"{type(err).__name__}: {err}"[-4000:]
            log(f"{name} FAILED: {type(err).__name__}: {str(err)[-2000:]}")

    results["goals"] = report.goals(results)
    results["notes"] = findings(results)
    results["wall_s"] = time.perf_counter() - start
    results["loadavg_end_1m"] = round(os.getloadavg()[0], 2)
    return results


def findings(results: dict[str, Any]) -> list[str]:
    """Plain-language notes computed from the measurements (why a goal holds or is missed)."""
    d, notes = results["details"], []
    mem = d.get("memory")
    if mem and mem.get("official_rss_mb_per_image"):
        notes.append(f"The official path holds the (N, D, H, W) float32 tensor AND its (N*H*W, D) reshaped copy at "
                     f"once (X.permute(1,0,2,3).reshape(d,-1) cannot be a view for N >= 2): "
                     f"{mem['official_rss_mb_per_image']:,.0f} MB per image measured, "
                     f"{mem['official_theory_mb_per_image']:,.0f} MB expected; only N <= "
                     f"{max([r['n'] for r in mem['official'] if r['dim'] == results['geometry']['feature_dim']] or [0])}"
                     f" was run at the full geometry, larger N are extrapolated.")
    if mem and len(mem.get("ours", [])) >= 2:
        pts = sorted((r["n"], r["peak_rss_mb"]) for r in mem["ours"])
        steps = ", ".join(f"N {a}->{b}: {vb - va:+.0f} MB" for (a, va), (b, vb) in zip(pts, pts[1:]))
        notes.append(f"Ours (one process per N, same labels): {steps}. The stage allocates once: the maps of one "
                     f"buffer of images (features.MapTables, images_per_buffer slots, float32 channels-last) and two "
                     f"slice buffers of 4096 pixels (the slice being trained and the one being prefetched); glibc "
                     f"serves buffers >= 16 MB with mmap (pipeline.memory), so what reads and sampling free leaves "
                     f"the process instead of fragmenting the heap as more images pass through.")
    tp = d.get("throughput")
    if tp:
        b = tp["breakdown_s"]
        share = b["sample_tables"] / tp["streaming_no_prefetch_s"]
        notes.append(f"Streaming: features.sample_tables takes {tp['sample_tables_us_per_px']:.0f} µs "
                     f"per trained pixel vs {tp['mlp_us_per_px']:.0f} µs for a whole in-memory MLP step "
                     f"({100 * share:.0f}% of the time without prefetch; read_maps "
                     f"{100 * b['read_maps'] / tp['streaming_no_prefetch_s']:.0f}%). With prefetch the data path runs "
                     f"in a second thread, hidden behind the MLP steps as long as a core is free for it: "
                     f"{tp['streaming_throughput_ratio']:.2f}x with it, "
                     f"{tp['streaming_throughput_ratio_no_prefetch']:.2f}x without.")
    for name, label in (("extraction", "Extraction"), ("extraction_stress", "Extraction, stress geometry")):
        ex = d.get(name)
        if not ex:
            continue
        mb_per_s = report.mb_per_forward_s(ex)
        notes.append(f"{label} ({ex['geometry']['name']}): per image and step, FeatureStore.write_features takes "
                     f"{ex['write_s_per_image_step']:.4f} s against {ex['forward_s_per_image_step']:.3f} s for the "
                     f"forward ({mb_per_s:.1f} MB of float16 per second of forward); the writes run in a writer "
                     f"thread beside the next forward, which hides them only where a core is free (a GPU); on this "
                     f"CPU-only machine the forward's torch threads use every core, so they add up: "
                     f"{ex['serial_writes_ratio']:.3f}x predicted serially, {ex['extraction_overhead_ratio']:.3f}x "
                     f"measured.")
    nop = d.get("noop")
    if nop:
        always = (f", {nop['noop_always_flow_s']:.1f} s with --always-flow"
                  if nop.get("noop_always_flow_s") is not None else "")
        notes.append(f"No-op re-run: {nop['noop_rerun_s']:.1f} s in all (the fast path: no flow run){always}; "
                     f"a process that only runs one empty Prefect "
                     f"flow takes {nop['prefect_empty_flow_process_s']:.1f} s (Prefect import "
                     f"{nop['prefect_import_s']:.1f} s, ephemeral server start + first flow "
                     f"{nop['prefect_first_flow_s']:.1f} s); our own freshness checks without Prefect take "
                     f"{nop['direct_noop_process_s']:.1f} s in a fresh process (imports "
                     f"{nop['direct_noop']['import_s']:.1f} s, checks {nop['direct_noop']['checks_s']:.2f} s)."
                     + (f" With --always-flow (a recorded flow run) against a running `prefect server start` it takes "
                        f"{nop['noop_with_running_server_s']:.1f} s." if "noop_with_running_server_s" in nop else ""))
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer points and images (a few minutes)")
    parser.add_argument("--toy", action="store_true", help="tiny shapes: checks the code paths in seconds")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown results file (default: benchmarks/results.md for a run of every benchmark, "
                             "benchmarks/results-<names>.md for --only / --toy)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument("--official-cap-mb", type=float, default=None,
                        help="largest predicted peak RSS an official-path run may have (default 11000)")
    args = parser.parse_args(argv)
    plan = TOY_PLAN if args.toy else QUICK if args.quick else FULL
    if args.official_cap_mb is not None:
        plan = Plan(**{**plan.__dict__, "official_cap_mb": args.official_cap_mb})
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown or not only:
        parser.error(f"--only {args.only!r}: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    command = "python benchmarks/run.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ddpmseg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = run_benchmarks(plan, workdir, only, command)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report.markdown(results)
    out = args.out or default_out(only, args.toy)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    log(f"wrote {out}")
    if not args.json:
        print(text)
    print(json.dumps(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

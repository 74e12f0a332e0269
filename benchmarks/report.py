"""The goals of issue 8, their pass/fail, and the markdown results table."""
from __future__ import annotations

from typing import Any

# key -> (goal text, test of the value)
GOALS: dict[str, tuple[str, Any]] = {
    "train_peak_rss_mb_n20": ("<= 2048 MB", lambda v: v <= 2048),
    "train_rss_growth_n5_to_n20": ("<= 1.10", lambda v: v <= 1.10),
    "store_ratio_vs_upsampled_fp32": ("<= 1/40 = 0.025", lambda v: v <= 1 / 40),
    "extraction_overhead_ratio": ("<= 1.10", lambda v: v <= 1.10),
    "streaming_throughput_ratio": (">= 0.80", lambda v: v >= 0.80),
    "noop_rerun_s": ("<= 10 s", lambda v: v <= 10),
    "ensemble_speedup_batched_vs_independent": (">= 1.5", lambda v: v >= 1.5),
    "ensemble_speedup_vs_official": (">= 1.5", lambda v: v >= 1.5),
    "cli_help_s": ("<= 1.0 s (idle machine)", lambda v: v <= 1.0),
    "cli_status_s": ("<= 2.0 s (idle machine)", lambda v: v <= 2.0),
}


def goals(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{key: {"value", "goal", "pass"}}; pass is None when the figure was not measured."""
    out = {}
    for key, (text, test) in GOALS.items():
        value = results.get(key)
        out[key] = {"value": value, "goal": text, "pass": None if value is None else bool(test(value))}
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _mark(ok: bool | None) -> str:
    return {True: "pass", False: "**miss**", None: "not run"}[ok]


def markdown(results: dict[str, Any]) -> str:
    """benchmarks/results.md: the command, the machine, the goals table and the detail tables."""
    m = results["machine"]
    d = results.get("details", {})
    lines = [
        "# Benchmarks: ddpmseg vs the official in-memory path",
        "",
        f"Command: `{results['command']}` ({results['plan']} mode, "
        f"{results['wall_s'] / 60:.1f} min wall time).",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_gb']} GB RAM, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}, CUDA {'yes' if m['cuda'] else 'no'}; "
        f"load average {m['loadavg_1m']} at the start and {results.get('loadavg_end_1m', '?')} at the end "
        f"(the machine may be shared: compare the ratios, each measured within one run, rather than the times).",
        "",
        "## Goals (issue 8)",
        "",
        "| figure | ours | official / baseline | ratio or value | goal | result |",
        "|---|---|---|---|---|---|",
    ]
    g = results["goals"]
    mem = d.get("memory", {})
    lines.append(f"| training peak RSS, N = 20 | {_fmt(results.get('train_peak_rss_mb_n20'))} MB | "
                 f"{_fmt(mem.get('official_peak_rss_mb_n20_extrapolated'))} MB (extrapolated) | "
                 f"{_fmt(results.get('train_peak_rss_mb_n20'))} MB | {g['train_peak_rss_mb_n20']['goal']} | "
                 f"{_mark(g['train_peak_rss_mb_n20']['pass'])} |")
    lines.append(f"| training RSS growth N = 5 → 20 | {_fmt(mem.get('ours_rss_mb_per_image'))} MB/image | "
                 f"{_fmt(results.get('official_rss_mb_per_image'))} MB/image | "
                 f"{_fmt(results.get('train_rss_growth_n5_to_n20'))}x | {g['train_rss_growth_n5_to_n20']['goal']} | "
                 f"{_mark(g['train_rss_growth_n5_to_n20']['pass'])} |")
    st = d.get("store_synthetic", {})
    lines.append(f"| store bytes per image and step (synthetic N(0,1) values) | "
                 f"{_fmt(st.get('store_bytes_per_image_step', 0) / 1e6 if st else None)} MB | "
                 f"{_fmt(st.get('upsampled_fp32_bytes_per_image_step', 0) / 1e6 if st else None)} MB upsampled fp32 | "
                 f"{_fmt(results.get('store_ratio_vs_upsampled_fp32'))} (1/{_fmt(_inv(results.get('store_ratio_vs_upsampled_fp32')))}) | "
                 f"{g['store_ratio_vs_upsampled_fp32']['goal']} | {_mark(g['store_ratio_vs_upsampled_fp32']['pass'])} |")
    real = results.get("store_ratio_vs_upsampled_fp32_realistic")
    lines.append(f"| store, realistic activations (real UNet forwards, carried to the 256 geometry) | "
                 f"{_fmt(d.get('store_realistic', {}).get('bytes_per_value'))} B/value | 4 B/value, upsampled | "
                 f"{_fmt(real)} (1/{_fmt(_inv(real))}) | (info) | |")
    ex = d.get("extraction", {})
    lines.append(f"| extraction time, {ex.get('geometry', {}).get('name', '?')} ({ex.get('forwards', '?')} forwards) | "
                 f"{_fmt(_min(ex.get('ours_s')))} s | "
                 f"{_fmt(_min(ex.get('bare_s')))} s bare forwards | {_fmt(results.get('extraction_overhead_ratio'))}x | "
                 f"{g['extraction_overhead_ratio']['goal']} | {_mark(g['extraction_overhead_ratio']['pass'])} |")
    sx = d.get("extraction_stress", {})
    if sx:
        lines.append(f"| extraction time, stress: {sx['geometry']['name']} ({sx['forwards']} forwards, "
                     f"{_fmt(mb_per_forward_s(sx))} MB written per second of forward vs "
                     f"{_fmt(mb_per_forward_s(ex))} above) | {_fmt(_min(sx['ours_s']))} s | "
                     f"{_fmt(_min(sx['bare_s']))} s bare forwards | "
                     f"{_fmt(results.get('extraction_overhead_ratio_stress'))}x | (info) | |")
    tp = d.get("throughput", {})
    lines.append(f"| training throughput | {_fmt(tp.get('streaming_px_per_s'))} px/s streaming | "
                 f"{_fmt(tp.get('in_memory_px_per_s'))} px/s in memory | "
                 f"{_fmt(results.get('streaming_throughput_ratio'))}x | {g['streaming_throughput_ratio']['goal']} | "
                 f"{_mark(g['streaming_throughput_ratio']['pass'])} |")
    np_ = d.get("noop", {})
    lines.append(f"| no-op re-run of `ddpmseg run` | {_fmt(results.get('noop_rerun_s'))} s | "
                 f"{_fmt(np_.get('prefect_empty_flow_process_s'))} s: a process running one empty Prefect flow | "
                 f"{_fmt(results.get('noop_rerun_s'))} s | {g['noop_rerun_s']['goal']} | "
                 f"{_mark(g['noop_rerun_s']['pass'])} |")
    en = d.get("ensemble", {})
    rates = en.get("member_px_per_s", {})
    for key, other, label in (("ensemble_speedup_batched_vs_independent", "independent", "members one after another"),
                              ("ensemble_speedup_vs_official", "official", "official loop, in memory")):
        lines.append(f"| ensemble training, {en.get('members', '?')} members | {_fmt(rates.get('batched'))} member-px/s "
                     f"batched | {_fmt(rates.get(other))} member-px/s {label} | {_fmt(results.get(key))}x | "
                     f"{g[key]['goal']} | {_mark(g[key]['pass'])} |")
    lines.append(f"| MLP FLOP/s utilisation (batched step / plain matmul) | {_fmt(en.get('batched_step_flop_per_s'))} "
                 f"FLOP/s | {_fmt(en.get('matmul_flop_per_s'))} FLOP/s | {_fmt(results.get('mlp_flops_utilisation'))} "
                 f"| (info) | |")
    lines += ["", *_memory_section(mem, results), *_store_section(d), *_extraction_section(ex, d.get("extraction_real_unet")),
              *_extraction_section(sx, None, "3b. Extraction overhead, stress geometry"),
              *_throughput_section(tp), *_noop_section(np_), *_notes(results)]
    return "\n".join(lines) + "\n"


def _inv(value: float | None) -> float | None:
    return None if not value else 1 / value


def _min(values: list[float] | None) -> float | None:
    return min(values) if values else None


def _memory_section(mem: dict[str, Any], results: dict[str, Any]) -> list[str]:
    if not mem:
        return []
    geo = results.get("geometry", {})
    lines = ["## 1. Training memory (peak RSS of a fresh process, VmHWM)", "",
             f"Geometry: {geo.get('name')}, {geo.get('image_size')}x{geo.get('image_size')}, blocks "
             f"{geo.get('blocks')}, steps {geo.get('steps')}, D = {geo.get('feature_dim')}; synthetic store, "
             f"{results.get('details', {}).get('labelled_pixels_per_image')} labelled pixels per image "
             f"(blob labels, the rest ignore), one member, one epoch.", "",
             "| path | N | D | peak RSS (MB) | RSS before training (MB) | labelled pixels | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in mem.get("ours", []):
        lines.append(f"| ours (flows.train.train_member) | {r['n']} | {results['geometry']['feature_dim']} | "
                     f"{_fmt(r['peak_rss_mb'])} | {_fmt(r['rss_before_training_mb'])} | {r['pixels']} trained | "
                     f"{_fmt(r['train_s'])} |")
    for r in mem.get("official", []):
        lines.append(f"| official (prepare_data + DataLoader) | {r['n']} | {r['dim']} | {_fmt(r['peak_rss_mb'])} | "
                     f"{_fmt(r['rss_before_training_mb'])} | {r['labelled_pixels']} | {_fmt(r['train_s'])} |")
    for r in mem.get("official_skipped", []):
        lines.append(f"| official | {r['n']} | {r['dim']} | {r['reason']} | | | |")
    for n, v in (mem.get("official_extrapolated_mb") or {}).items():
        lines.append(f"| official, **extrapolated** | {n} | {results['geometry']['feature_dim']} | {_fmt(v)} | | | |")
    lines += ["", f"Official slope: {_fmt(mem.get('official_rss_mb_per_image'))} MB per image "
              f"({mem.get('official_slope_method', 'not measured')}); expected from the buffers "
              f"(the (N, D, H, W) tensor and its reshaped copy coexist): "
              f"{_fmt(mem.get('official_theory_mb_per_image'))} MB per image. "
              f"Extrapolation: {mem.get('official_extrapolation', '—')}."]
    if mem.get("official_check_n2_predicted_mb") is not None:
        lines.append(f"Check: the scaled one-step line predicts {_fmt(mem['official_check_n2_predicted_mb'])} MB at "
                     f"N = 2 with the full D; measured {_fmt(mem['official_measured_full_geometry'].get(2))} MB.")
    return lines + [""]


def _store_section(d: dict[str, Any]) -> list[str]:
    rows = [(k, d[k]) for k in ("store_synthetic", "store_realistic") if d.get(k)]
    if not rows:
        return []
    lines = ["## 2. Store size per image and timestep", "",
             "| values | geometry | stored bytes | bytes/value | uncompressed fp16 | upsampled fp32 | "
             "ratio (own geometry) | ratio at the 256 geometry |", "|---|---|---|---|---|---|---|---|"]
    for name, s in rows:
        kind = "synthetic N(0,1)" if name == "store_synthetic" else "real UNet forwards (random init, generated images)"
        lines.append(f"| {kind} | {s['geometry']} | {s['store_bytes_per_image_step']:,.0f} | {s['bytes_per_value']:.3f} | "
                     f"{s['uncompressed_fp16_bytes_per_image_step']:,} | {s['upsampled_fp32_bytes_per_image_step']:,} | "
                     f"{s['ratio_own_geometry']:.4f} | {s['ratio_at_real_geometry']:.4f} |")
    return lines + [""]


def mb_per_forward_s(ex: dict[str, Any]) -> float | None:
    """float16 MB written per second of bare forward (what the writes must keep up with)."""
    if not ex or not ex.get("forward_s_per_image_step"):
        return None
    return ex["fp16_bytes_per_image_step"] / 1e6 / ex["forward_s_per_image_step"]


def _extraction_section(ex: dict[str, Any], real: dict[str, Any] | None = None,
                        title: str = "3. Extraction overhead") -> list[str]:
    if not ex:
        return []
    geo = ex["geometry"]
    real_lines = [] if not real else [
        f"Real UNet ({real['geometry']['name']}, random init, {real['images']} image x "
        f"{len(real['geometry']['steps'])} step, {real['device']}): ours {_fmt(min(real['ours_s']))} s, bare "
        f"{_fmt(min(real['bare_s']))} s, writes alone {_fmt(min(real['writes_only_s']))} s: "
        f"**{_fmt(real['extraction_overhead_ratio'])}x** (writes added serially predict "
        f"{_fmt(real['serial_writes_ratio'])}x).", ""]
    return [f"## {title}", "",
            f"{geo['name']}, blocks {geo['blocks']}, steps {geo['steps']}, {ex['images']} images, batch "
            f"{ex['batch_size']}, {ex['forwards']} forwards on {ex['device']} ({ex.get('torch_threads')} torch "
            f"threads, as extract_split); times per repetition (the ratio uses the minimum of each).", "",
            "| | seconds |", "|---|---|",
            f"| ours: flows.extract.extract_split | {', '.join(_fmt(s) for s in ex['ours_s'])} |",
            f"| bare: backbone build + extract_blocks, nothing written | {', '.join(_fmt(s) for s in ex['bare_s'])} |",
            f"| of which backbone build (the stage caches it per process; built in the warm-up) | "
            f"{', '.join(_fmt(s) for s in ex['build_s'])} |",
            f"| the writes alone (FeatureStore.write_features of the same activations) | "
            f"{', '.join(_fmt(s) for s in ex['writes_only_s'])} |",
            *([f"| ours / bare, per repetition (bare and ours run in alternating order) | "
               f"{', '.join(_fmt(r) for r in ex['ratio_per_repetition'])} |"] if ex.get("ratio_per_repetition") else []),
            "", f"Overhead {_fmt(ex['overhead_s'])} s. Per image and step: a forward "
            f"{_fmt(ex['forward_s_per_image_step'])} s, "
            f"its writes {_fmt(ex['write_s_per_image_step'])} s ({_fmt(ex['fp16_bytes_per_image_step'] / 1e6)} MB of "
            f"float16, {_fmt(mb_per_forward_s(ex))} MB per second of forward); writes added serially to the forwards predict "
            f"{_fmt(ex['serial_writes_ratio'])}x. The forward time varies several-fold with the load of a shared "
            f"machine (two torch threads on two cores), the write time much less: the ratio moves with it.", "",
            *real_lines]


def _throughput_section(tp: dict[str, Any]) -> list[str]:
    if not tp:
        return []
    b, pf = tp["breakdown_s"], tp["prefetch_thread_s"]
    return ["## 4. Training throughput (one member, one epoch)", "",
            f"{tp['images']} images, {tp['labelled_pixels']} labelled pixels, D = {tp['dim']}, "
            f"{tp['iterations']} iterations of batch 64, {tp.get('torch_threads')} torch thread(s) for every path "
            f"(the stage trains on one). With prefetch (the stage's default) a second thread reads and samples the "
            f"next slice of pixels while the MLP trains.", "",
            "| loader | seconds | labelled px/s |", "|---|---|---|",
            f"| streaming from the store (flows.train.train_member, prefetch) | {_fmt(tp['streaming_s'])} | "
            f"{_fmt(tp['streaming_px_per_s'])} |",
            f"| streaming from the store, prefetch=False (one thread) | {_fmt(tp['streaming_no_prefetch_s'])} | "
            f"{_fmt(tp['streaming_no_prefetch_px_per_s'])} |",
            f"| in memory, tensor-index shuffle (baseline of the ratio) | {_fmt(tp['in_memory_s'])} | "
            f"{_fmt(tp['in_memory_px_per_s'])} |",
            f"| in memory, official DataLoader(FeatureDataset) | {_fmt(tp['official_loader_s'])} | "
            f"{_fmt(tp['official_loader_px_per_s'])} |",
            "", f"Where the time goes without prefetch (the stage's own calls, timed inside that run): read_maps "
            f"{_fmt(b['read_maps'])} s, sample_tables {_fmt(b['sample_tables'])} s "
            f"({_fmt(tp['sample_tables_us_per_px'])} µs per trained pixel), the rest (MLP steps, shuffle, "
            f"batches) {_fmt(b['rest'])} s ({_fmt(tp['streaming_rest_us_per_px'])} µs per pixel; in memory the "
            f"whole step costs {_fmt(tp['mlp_us_per_px'])} µs per pixel). With prefetch the same calls took "
            f"{_fmt(pf['read_maps'])} s + {_fmt(pf['sample_tables'])} s in the prefetch thread.",
            "", f"Ratio without prefetch: {_fmt(tp['streaming_throughput_ratio_no_prefetch'])}x. "
            f"Ratio vs the official DataLoader: {_fmt(tp['streaming_throughput_ratio_vs_official_loader'])}x."
            + ("" if tp["labelled_pixels"] >= tp["images"] * tp.get("dense_pixels_per_image", 0) else
               f" Projected for fully labelled images (read_maps amortised over {tp.get('dense_pixels_per_image')} "
               f"pixels per image; a projection from the measured costs, not a measurement): "
               f"{_fmt(tp['streaming_throughput_ratio_projected_dense_labels'])}x with prefetch, "
               f"{_fmt(tp['streaming_throughput_ratio_projected_dense_labels_no_prefetch'])}x without."), ""]


def _noop_section(nop: dict[str, Any]) -> list[str]:
    if not nop:
        return []
    lines = ["## 5. No-op re-run", "",
             f"`{nop['command']}` on a small experiment (3 + 2 images of 32 px, tiny UNet), isolated PREFECT_HOME, "
             f"no PREFECT_API_URL (Prefect's ephemeral server, the embedded default).", "",
             "| process | seconds |", "|---|---|",
             f"| first run (cold) | {_fmt(nop['cold_run_s'])} |",
             f"| **second run (no-op)**: stages {nop.get('noop_stages')}, no flow run started (flows/fastpath.py) | "
             f"{_fmt(nop['noop_rerun_s'])} |",
             *([f"| second run with `--always-flow` (Prefect's ephemeral server + one flow run, recorded) | "
                f"{_fmt(nop['noop_always_flow_s'])} |"] if nop.get("noop_always_flow_s") is not None else []),
             f"| `python -c 'import flows.cli, flows.segment'` | {_fmt(nop['import_only_s'])} |",
             f"| a process running one empty Prefect flow (import {_fmt(nop['prefect_import_s'])} s, "
             f"ephemeral server start + first flow {_fmt(nop['prefect_first_flow_s'])} s) | "
             f"{_fmt(nop['prefect_empty_flow_process_s'])} |",
             f"| our freshness checks without Prefect (`python -m benchmarks.noop direct`, fresh = "
             f"{nop['direct_noop'].get('fresh')}) | {_fmt(nop['direct_noop_process_s'])} |"]
    if "noop_with_running_server_s" in nop:
        lines.append(f"| second run with `--always-flow` against a running `prefect server start` (PREFECT_API_URL set) | "
                     f"{_fmt(nop['noop_with_running_server_s'])} |")
    return lines + [""]


def _notes(results: dict[str, Any]) -> list[str]:
    notes = results.get("notes") or []
    lines = ["## Notes", "", *[f"- {n}" for n in notes], ""] if notes else []
    errors = results.get("errors") or {}
    if errors:
        lines += ["## Errors (these figures were not measured)", "",
                  *[f"- {name}: `{message.splitlines()[-1][:500] if message else ''}`" for name, message in errors.items()],
                  ""]
    return lines

"""Figure 1: peak RSS of the training stage vs the number of training images N, ours vs the official path.

Each (path, N) runs in a fresh child process (`python -m benchmarks.memory ours|official MANIFEST N`) that
reports its own peak RSS (VmHWM). Ours: the real stage, flows.train_stage.train_member, one member, one epoch over
every labelled pixel of the N images (streamed from the synthetic store). Official: benchmarks.official
(prepare_data: the (N, D, H, W) float32 tensor, its (N*H*W, D) copy, the labelled copy; then the DataLoader
training of one member for one epoch).

The official path's peak is ~2 x N x H x W x D x 4 bytes (the tensor and its reshaped copy coexist), 4.4 GB per
image at the real geometry: only N = 1 and 2 fit here. Its slope is therefore measured at the same image size
with ONE timestep (D = 2816, a third of every per-image buffer) for N >= 2, where the reshape copy exists, and
scaled by D / D_one_step; the full-geometry N = 2 point checks the scaled line.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import (MB, BenchmarkError, current_rss_mb, emit, linear_fit, log, mem_available_mb,
                               peak_rss_mb, run_child)

OFFICIAL_BASE_MB = 700  # interpreter + torch + stores, for the memory guard only (measured: ~450-600 MB)
MEMORY_MARGIN_MB = 3000  # left free on the machine when deciding whether an official run fits


# -- children -------------------------------------------------------------------------------------------------------
def ours_child(manifest_root: str, n: int) -> dict[str, Any]:
    """Train one member from the store with the real stage code; returns peak RSS and counts."""
    from benchmarks.synthetic_store import load_synthetic_store
    from flows import stage_keys
    from flows import train as train_stage

    syn = load_synthetic_store(Path(manifest_root))
    refs = syn.refs[:n]
    cfg = syn.cfg(n_images=n)
    store = syn.store()
    key = stage_keys.train_key(cfg, refs)
    base = current_rss_mb()
    start = time.perf_counter()
    info = train_stage.train_member(cfg, store, refs, key, 0, progress=False)
    seconds = time.perf_counter() - start
    if not info.get("ran"):
        raise BenchmarkError(f"member already committed for N={n}: the benchmark store is not fresh")
    return {"path": "ours", "n": n, "peak_rss_mb": peak_rss_mb(), "rss_before_training_mb": base,
            "train_s": seconds, "iterations": info["iterations"],
            "pixels": info["iterations"] * cfg.classifier.batch_size}


def official_child(manifest_root: str, n: int, n_steps: int) -> dict[str, Any]:
    """The official path on the first `n` images, using the first `n_steps` timesteps; returns peak RSS."""
    import torch

    from benchmarks import official
    from benchmarks.synthetic_store import load_synthetic_store
    from flows import stage_keys
    from flows import train as train_stage
    from pipeline import classifier as clf

    syn = load_synthetic_store(Path(manifest_root))
    refs = syn.refs[:n]
    cfg = syn.cfg(n_images=n)
    store = syn.store()
    steps = list(cfg.features.steps)[:n_steps]
    units = [stage_keys.unit_for(cfg, t) for t in steps]
    labels = {r.image_id: store.read_view_label(stage_keys.BASE_VIEW, r.image_id, r.label_hash) for r in refs}

    def maps_of(image_id: str) -> list[torch.Tensor]:
        return [torch.from_numpy(m) for m in store.read_maps(units, image_id, cfg.sorted_blocks)]

    dim = sum(int(a.shape[0]) for u in units for a in store.feature_arrays(u, refs[0].image_id, cfg.sorted_blocks))
    base = current_rss_mb()
    start = time.perf_counter()
    X, y = official.prepare_data([r.image_id for r in refs], maps_of, labels.__getitem__, cfg.image_size, dim,
                                 cfg.dataset.ignore_label)
    prepare_s = time.perf_counter() - start
    c = cfg.classifier
    settings = clf.TrainSettings(number_class=cfg.dataset.number_class, dim=dim, batch_size=c.batch_size,
                                 max_epochs=c.max_epochs)
    torch.manual_seed(0)
    _, info = official.train_member_in_memory(settings, official.official_loader_batches(X, y, c.batch_size),
                                              seed=train_stage.member_seed(cfg, 0))
    return {"path": "official", "n": n, "steps": len(steps), "dim": dim, "peak_rss_mb": peak_rss_mb(),
            "rss_before_training_mb": base, "prepare_s": prepare_s, "train_s": time.perf_counter() - start,
            "labelled_pixels": int(len(y)), "iterations": info["iterations"]}


# -- parent ---------------------------------------------------------------------------------------------------------
def official_predicted_mb(n: int, dim: int, size: int) -> float:
    """Expected peak of the official path: base + X + (for N >= 2) its reshaped copy."""
    per_copy = n * dim * size * size * 4 / MB
    return OFFICIAL_BASE_MB + per_copy * (2 if n >= 2 else 1)


def _official_fits(n: int, dim: int, size: int, cap_mb: float) -> tuple[bool, str]:
    predicted = official_predicted_mb(n, dim, size)
    available = mem_available_mb() - MEMORY_MARGIN_MB
    if predicted > min(cap_mb, available):
        return False, (f"skipped: needs ~{predicted:.0f} MB; cap {cap_mb:.0f} MB, "
                       f"{available:.0f} MB available after a {MEMORY_MARGIN_MB} MB margin")
    return True, ""


def run_memory(manifest_root: Path, geometry_dim: int, step_dim: int, size: int, ours_ns: list[int],
               official_ns: list[int], official_one_step_ns: list[int], official_cap_mb: float,
               runner: Callable[[str, list[str]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run every child (`runner(module, args)`; default: run_child, a fresh process); returns the per-run results,
    both slopes and the official extrapolation."""
    runner = runner or run_child
    ours = []
    for n in ours_ns:
        log(f"memory: ours, N={n}")
        ours.append(runner("benchmarks.memory", ["ours", str(manifest_root), str(n)]))
    official, skipped = [], []
    for n_steps, ns, dim in ((None, official_ns, geometry_dim), (1, official_one_step_ns, step_dim)):
        for n in ns:
            fits, why = _official_fits(n, dim, size, official_cap_mb)
            if not fits:
                log(f"memory: official N={n} D={dim} {why}")
                skipped.append({"n": n, "dim": dim, "reason": why})
                continue
            log(f"memory: official, N={n}, D={dim}")
            steps_arg = str(n_steps if n_steps is not None else geometry_dim // step_dim)
            official.append(runner("benchmarks.memory", ["official", str(manifest_root), str(n), steps_arg]))
    return summarise(ours, official, skipped, geometry_dim, step_dim, size)


def summarise(ours: list[dict], official: list[dict], skipped: list[dict], geometry_dim: int, step_dim: int,
              size: int) -> dict[str, Any]:
    """Slopes, the N=20 figures and the official extrapolation from the raw child results."""
    by_n = {r["n"]: r["peak_rss_mb"] for r in ours}
    out: dict[str, Any] = {"ours": ours, "official": official, "official_skipped": skipped}
    out["train_peak_rss_mb_n20"] = by_n.get(20)
    out["train_rss_growth_n5_to_n20"] = by_n[20] / by_n[5] if 5 in by_n and 20 in by_n else None
    if len(by_n) >= 2:
        out["ours_rss_mb_per_image"], _ = linear_fit(list(by_n), list(by_n.values()))
    full = {r["n"]: r["peak_rss_mb"] for r in official if r["dim"] == geometry_dim}
    one_step = {r["n"]: r["peak_rss_mb"] for r in official if r["dim"] == step_dim and r["n"] >= 2}
    slope = intercept = None
    if geometry_dim != step_dim and len(one_step) >= 2:
        s1, intercept = linear_fit(list(one_step), list(one_step.values()))
        slope = s1 * geometry_dim / step_dim
        out["official_slope_method"] = (f"measured for N in {sorted(one_step)} at {size}x{size} with one timestep "
                                        f"(D={step_dim}), scaled by {geometry_dim}/{step_dim}")
    elif len([n for n in full if n >= 2]) >= 2:
        pts = {n: v for n, v in full.items() if n >= 2}
        slope, intercept = linear_fit(list(pts), list(pts.values()))
        out["official_slope_method"] = f"measured for N in {sorted(pts)} at the full geometry"
    out["official_rss_mb_per_image"] = slope
    out["official_theory_mb_per_image"] = 2 * size * size * geometry_dim * 4 / MB
    out["official_measured_full_geometry"] = full
    if slope is not None:
        anchor_n = max(full) if full else None
        if anchor_n is not None and anchor_n >= 2:
            base_n, base_v = anchor_n, full[anchor_n]
        else:
            base_n, base_v = 0, intercept
        predict = {n: base_v + (n - base_n) * slope for n in (5, 10, 20, 50)}
        out["official_extrapolated_mb"] = {str(n): v for n, v in predict.items()}
        out["official_peak_rss_mb_n20_extrapolated"] = predict[20]
        out["official_extrapolation"] = (f"peak(N) = peak({base_n}) + (N - {base_n}) x slope, "
                                         f"from the measured point N={base_n}" if base_n else
                                         "peak(N) = intercept + N x slope (one-step fit intercept)")
        if 2 in full and intercept is not None and geometry_dim != step_dim:
            out["official_check_n2_predicted_mb"] = intercept + 2 * slope
    return out


def child_result(argv: list[str]) -> dict[str, Any]:
    """The result of one child given its arguments: `ours MANIFEST_DIR N` or `official MANIFEST_DIR N N_STEPS`."""
    if len(argv) == 3 and argv[0] == "ours":
        return ours_child(argv[1], int(argv[2]))
    if len(argv) == 4 and argv[0] == "official":
        return official_child(argv[1], int(argv[2]), int(argv[3]))
    raise ValueError(f"expected `ours MANIFEST_DIR N` or `official MANIFEST_DIR N N_STEPS`, got {argv}")


def main(argv: list[str]) -> int:
    if not (len(argv) == 3 and argv[0] == "ours" or len(argv) == 4 and argv[0] == "official"):
        print("usage: python -m benchmarks.memory ours MANIFEST_DIR N | official MANIFEST_DIR N N_STEPS",
              file=sys.stderr)
        return 2
    emit(child_result(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

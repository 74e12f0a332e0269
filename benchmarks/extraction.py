"""Figure 3: our extraction stage vs bare UNet forwards on the same inputs.

- bare: build the backbone as the stage does, then `pipeline.backbone.extract_blocks` for exactly the stage's
  forward jobs (same batches, timesteps, noise, blocks), inputs already in memory, nothing written;
- writes: `FeatureStore.write_features` of those activations into a fresh store (the write work alone);
- ours: `flows.extract_stage.extract_split` on a fresh store holding only the prepared views (plan, input reads, forwards,
  float16 cast, compression, zarr writes, commit markers).
One untimed forward warms torch up first; each repetition runs bare and ours, in alternating order; the figure
is min(ours) / min(bare) (the machine may be shared), and the per-repetition ratios are reported too.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import log
from pipeline.threads import torch_threads
from benchmarks.geometry import Geometry
from flows import extract as extract_stage
from flows import prepare as prepare_stage
from flows import stage_keys
from pipeline import backbone as bb
from pipeline import synthetic
from pipeline.config import ExperimentConfig
from storage.features import FeatureStore


def extraction_config(geometry: Geometry, data_dir: Path, n_images: int, store_dir: Path,
                      batch_size: int = 4) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "recipe": "paper",
        "dataset": {"name": "synthetic", "train_dir": str(data_dir / "train"), "test_dir": str(data_dir / "test"),
                    "number_class": len(synthetic.CLASS_NAMES), "ignore_label": synthetic.IGNORE_LABEL,
                    "training_number": n_images, "testing_number": 1},
        "model": {"random_init": True, "init_seed": 0, "flags": dict(geometry.flags)},
        "features": {"steps": list(geometry.steps), "blocks": list(geometry.blocks), "batch_size": batch_size},
        "classifier": {"model_num": 1},
        "store": str(store_dir),
        "output_dir": str(store_dir.parent / "outputs"),
    })


def extraction_threads(cfg: ExperimentConfig) -> int:
    """The torch thread count extract_split runs its forwards with."""
    return getattr(cfg.features, "cpu_threads", None) or os.cpu_count() or 1


def _bare(cfg: ExperimentConfig, jobs: list[extract_stage.ForwardJob], inputs: dict[str, torch.Tensor]):
    """Build + forwards only, on extract_split's thread count; returns (seconds, build s, [(job, activations)])."""
    with torch_threads(extraction_threads(cfg)):
        return _bare_forwards(cfg, jobs, inputs)


def _bare_forwards(cfg: ExperimentConfig, jobs: list[extract_stage.ForwardJob], inputs: dict[str, torch.Tensor]):
    start = time.perf_counter()
    device = bb.resolve_device(cfg.features.device)
    extractor = extract_stage.load_extractor(cfg, device)  # the stage's own (per-process cached) build
    model, diffusion = extractor.model, extractor.diffusion
    built = time.perf_counter()
    outputs = []
    for job in jobs:
        x0 = torch.stack([inputs[i] for i in job.image_ids]).to(device)
        noise = bb.make_noise(cfg.features.seed, cfg.image_size, device, mode="cpu")
        outputs.append((job, bb.extract_blocks(model, diffusion, x0, job.t, noise, list(job.blocks),
                                               cfg.features.input_activations)))
    end = time.perf_counter()
    return end - start, built - start, outputs


def _writes(cfg: ExperimentConfig, store: FeatureStore, outputs) -> float:
    start = time.perf_counter()
    for job, acts in outputs:
        unit = stage_keys.unit_for(cfg, job.t)
        store.ensure_unit(unit, {"t": job.t})
        for j, image_id in enumerate(job.image_ids):
            store.write_features(unit, image_id, {b: acts[b][j].numpy() for b in job.blocks})
    return time.perf_counter() - start


def run_extraction(workdir: Path, geometry: Geometry, n_images: int, repeats: int = 1) -> dict[str, Any]:
    workdir = Path(workdir)
    data_dir = workdir / "data"
    synthetic.write_dataset(data_dir, n_train=n_images, n_test=1, size=geometry.image_size, seed=0)
    prepared = workdir / "store-prepared"
    cfg = extraction_config(geometry, data_dir, n_images, prepared)
    refs = prepare_stage.prepare_split(cfg, FeatureStore(str(prepared)), "train")
    jobs = extract_stage.extract_plan(cfg, FeatureStore(str(prepared)), refs)
    inputs = {r.image_id: torch.from_numpy(FeatureStore(str(prepared)).read_view_input(stage_keys.BASE_VIEW, r.image_id))
              for r in refs}

    log("extraction: warm-up (one untimed forward)")
    _bare(cfg, jobs[:1], inputs)
    bare_s, build_s, ours_s, write_s, counts = [], [], [], [], {}
    ours_store = prepared
    for rep in range(repeats):
        # alternate which one runs first: a drift in the machine's speed then favours neither
        order = ("bare", "ours") if rep % 2 == 0 else ("ours", "bare")
        for which in order:
            if which == "bare":
                log(f"extraction: bare forwards ({len(jobs)} forwards), repetition {rep + 1}/{repeats}")
                seconds, build, outputs = _bare(cfg, jobs, inputs)
                bare_s.append(seconds)
                build_s.append(build)
                write_store = workdir / f"store-writes-{rep}"
                shutil.copytree(prepared, write_store)
                write_s.append(_writes(cfg, FeatureStore(str(write_store)), outputs))
                del outputs
            else:
                log(f"extraction: ours (flows.extract.extract_split), repetition {rep + 1}/{repeats}")
                ours_store = workdir / f"store-ours-{rep}"
                shutil.copytree(prepared, ours_store)
                start = time.perf_counter()
                counts = extract_stage.extract_split(cfg, FeatureStore(str(ours_store)), refs, progress=False)
                ours_s.append(time.perf_counter() - start)
    if counts.get("unet_forwards") != len(jobs):
        raise RuntimeError(f"extract_split ran {counts.get('unet_forwards')} forwards, expected {len(jobs)}")
    ours, bare = min(ours_s), min(bare_s)
    return {
        "geometry": geometry.describe(), "images": n_images, "forwards": len(jobs),
        "batch_size": cfg.features.batch_size, "device": str(bb.resolve_device(cfg.features.device)),
        "torch_threads": extraction_threads(cfg),
        "ours_s": ours_s, "bare_s": bare_s, "build_s": build_s, "writes_only_s": write_s,
        "extraction_overhead_ratio": ours / bare,
        "ratio_per_repetition": [o / b for o, b in zip(ours_s, bare_s)],
        "overhead_s": ours - bare,
        # the parts, each its minimum over repetitions (steadier than the difference of two noisy totals)
        "forward_s_per_image_step": (bare - min(build_s)) / (n_images * len(geometry.steps)),
        "write_s_per_image_step": min(write_s) / (n_images * len(geometry.steps)),
        "serial_writes_ratio": (bare + min(write_s)) / bare,
        "fp16_bytes_per_image_step": 2 * geometry.values_per_step,
        "store_dir": str(ours_store), "unit_paths": [stage_keys.unit_for(cfg, t).path for t in geometry.steps],
        "image_ids": [r.image_id for r in refs],
    }

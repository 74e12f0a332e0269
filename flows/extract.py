"""The extract stage: one forward of the config's feature extractor (pipeline/extractors) per (batch of images,
view, timestep) still missing in the store; the hooked layers' maps are written at native resolution, float16,
commit-last (a killed run resumes at exactly the unfinished (image, t) pairs). Kinds without timesteps run once
per image, at the pseudo-step 0."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import backbone as bb
from pipeline.config import ConfigError, ExperimentConfig, check_noise_device, noise_mode
from pipeline.extractors import FeatureExtractor
from pipeline.progress import progress_bar
from pipeline.threads import torch_threads
from storage.features import FeatureStore, UnitSpec, to_float16
from storage.keys import digest
from storage.location import StoreLocation
from flows.prepare import prepare
from flows.stage_keys import ImageRef, backbone_fingerprint, feature_spec, unit_for

def _noise_for(cfg: ExperimentConfig, image_ids: list[str], t: int, device: torch.device) -> torch.Tensor | None:
    f = cfg.features
    if f.share_noise:
        return bb.make_noise(f.seed, cfg.image_size, device, mode=noise_mode(cfg))
    # Not shared: still deterministic, from (seed, image, t), so a re-run or a teammate gets the same features.
    seeds = [int(digest([f.seed, i, t])[:8], 16) for i in image_ids]
    return torch.cat([bb.make_noise(s, cfg.image_size, device, mode=noise_mode(cfg)) for s in seeds])


@dataclass(frozen=True)
class ForwardJob:
    """One UNet forward: a batch of images at one timestep, and the blocks they still lack."""

    t: int
    view: str
    image_ids: tuple[str, ...]
    blocks: tuple[int, ...]


def extract_plan(cfg: ExperimentConfig, store: FeatureStore, refs: list[ImageRef]) -> list[ForwardJob]:
    """The forwards still needed: for each t, images grouped by the set of blocks they lack, in batches; a
    batch's jobs for all t are consecutive.

    Reads only the commit markers, so a killed run resumes at exactly the unfinished (image, t) pairs.
    """
    blocks = set(cfg.sorted_blocks)
    jobs: list[ForwardJob] = []
    views = list(dict.fromkeys(r.view for r in refs))
    for t in cfg.features.steps:
        for view in views:
            unit = unit_for(cfg, t, view)
            by_missing: dict[tuple[int, ...], list[str]] = {}
            for image_id in dict.fromkeys(r.image_id for r in refs if r.view == view):
                missing = tuple(sorted(blocks - store.committed_blocks(unit, image_id)))
                if missing:
                    by_missing.setdefault(missing, []).append(image_id)
            for missing, ids in by_missing.items():
                for i in range(0, len(ids), cfg.features.batch_size):
                    jobs.append(ForwardJob(t, view, tuple(ids[i:i + cfg.features.batch_size]), missing))
    # batch-major: a batch's forwards at every t run back to back (t ascending), so its inputs are read once
    first_seen: dict[tuple[str, tuple[str, ...]], int] = {}
    for job in jobs:
        first_seen.setdefault((job.view, job.image_ids), len(first_seen))
    return sorted(jobs, key=lambda job: first_seen[(job.view, job.image_ids)])


def check_extraction_device(cfg: ExperimentConfig, store_url: str) -> None:
    """ConfigError (pipeline.config.check_noise_device) when forwards are still to run and the noise generator
    cannot run on the device this machine resolves; reads only (for the CLI, before Prefect starts). A store that
    already holds every map trains and evaluates anywhere, so then nothing is raised."""
    if cfg.model.kind != "ddpm" or cfg.features.noise_generator == "cpu":
        return
    try:
        check_noise_device(cfg, bb.resolve_device(cfg.features.device))
    except ConfigError:
        location = StoreLocation.parse(store_url, read_only=True)
        if not location.is_remote and not Path(location.url).is_dir():
            raise  # no store yet: every forward is to run
        store = FeatureStore(location, read_only=True)
        for split in ("train", "test"):
            if extract_plan(cfg, store, prepare(cfg, store, split, write=False).extraction(cfg, split)):
                raise


def extract_split(cfg: ExperimentConfig, store: FeatureStore, refs: list[ImageRef], progress: bool = True,
                  desc: str = "extract") -> dict[str, int]:
    """Run the UNet only for the (image, timestep) pairs whose blocks are missing; write them to the store.

    One forward per (batch of images, t); returns {"unet_forwards", "images_written"}.
    """
    jobs = extract_plan(cfg, store, refs)
    counts = {"unet_forwards": 0, "images_written": 0}
    if not jobs:
        return counts
    device = bb.resolve_device(cfg.features.device)
    if cfg.model.kind == "ddpm":
        check_noise_device(cfg, device)  # before any forward: noise_generator cuda needs a CUDA device
    with torch_threads(cfg.features.cpu_threads or os.cpu_count() or 1):
        _extract_jobs(cfg, store, jobs, device, counts, progress, desc)
    return counts


def _extract_jobs(cfg: ExperimentConfig, store: FeatureStore, jobs: list[ForwardJob], device: torch.device,
                  counts: dict[str, int], progress: bool, desc: str) -> None:
    """Forwards in this thread; each forward's writes (compression, checksums, store I/O, commit markers) in one
    writer thread, so they overlap the next forward. At most one batch waits to be written (bounded memory); a
    write error stops the loop and is raised here, and an image counts as written only once its commit is done."""
    extractor = load_extractor(cfg, device)
    provenance = {"backbone": backbone_fingerprint(cfg), "features": feature_spec(cfg)}

    def write(unit: UnitSpec, ids: list[str], acts: dict[int, np.ndarray], blocks: list[int]) -> None:
        for j, image_id in enumerate(ids):
            store.write_features(unit, image_id, {b: acts[b][j] for b in blocks})
            counts["images_written"] += 1

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddpmseg-write") as writer:
        pending = None
        inputs_of = None  # (view, image ids) whose inputs x0 holds
        try:
            for job in progress_bar(jobs, desc=desc, unit="fwd", enabled=progress):
                unit = unit_for(cfg, job.t, job.view)
                store.ensure_unit(unit, {**provenance, "t": job.t, "view": job.view})
                ids = list(job.image_ids)
                if inputs_of != (job.view, job.image_ids):  # a batch's jobs are consecutive: read once per batch
                    x0 = torch.stack([torch.from_numpy(store.read_view_input(job.view, i)) for i in ids]).to(device)
                    inputs_of = (job.view, job.image_ids)
                noise = _noise_for(cfg, ids, job.t, device) if extractor.uses_timesteps else None
                acts = extractor.forward(x0, job.t, noise, list(job.blocks), cfg.features.input_activations)
                if extractor.uses_weights:
                    counts["unet_forwards"] += 1  # network forwards (the rgb baseline runs none)
                # float16 here, on the forward's threads (on a GPU: checked and cast there, half the copy to the
                # host); the writer only encodes and stores
                acts = {b: to_float16(a, f"{unit.path} images {', '.join(ids)} block {b}") for b, a in acts.items()}
                if pending is not None:
                    pending.result()  # the previous batch is committed (or its error raised) before queueing more
                pending = writer.submit(write, unit, ids, acts, list(job.blocks))
            if pending is not None:
                pending.result()
        except BaseException:
            if pending is not None:
                pending.result()  # an earlier failure (a write that could not finish) is the one to report
            raise


_EXTRACTOR_CACHE: dict[tuple[str, str], FeatureExtractor] = {}


def load_extractor(cfg: ExperimentConfig, device: torch.device) -> FeatureExtractor:
    """The config's feature extractor, built on ``device`` with its weights; one per process (e.g. a Dask worker
    running many extraction batches reuses it), keyed by the backbone fingerprint."""
    key = (digest(backbone_fingerprint(cfg)), str(device))
    if key not in _EXTRACTOR_CACHE:
        _EXTRACTOR_CACHE.clear()
        extractor = cfg.model.extractor()
        extractor.build(device, cfg.model.checkpoint, cfg.model.init_seed)
        _EXTRACTOR_CACHE[key] = extractor
    return _EXTRACTOR_CACHE[key]

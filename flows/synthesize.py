"""The synthesize stage (DatasetDDPM): images drawn from the config's ddpm backbone, stored as a `synthetic` split.

Samples are drawn in fixed-size batches; batch b holds the samples b * batch_size ... (b + 1) * batch_size - 1,
each seeded by (datasetddpm.seed, its index) (pipeline/sampling.py), so N = 1000 after N = 500 draws only the
batches 500 ... 999 lie in. Each sample is stored like a real image: its exact model input (float32 in [-1, 1], the
clamped sample the official code extracts features from) under its content id in views/base/; a batch counts once
its record (stages/sample-batch/<batch key>, listing its image ids) is written, after every image (commit-last):
a killed run resumes at the first batch without a record. The split is the first N samples of the batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline import backbone as bb
from pipeline import sampling
from pipeline.config import ConfigError, ExperimentConfig
from pipeline.progress import progress_bar
from storage import artifacts
from storage.features import FeatureStore, StoreError
from storage.keys import Key
from flows.stage_keys import BASE_VIEW, ImageRef, backbone_fingerprint, image_id_of

__all__ = ["SPLIT", "BATCH_STAGE", "SamplingPlan", "sampling_plan", "plan_from_dict", "samples_key", "batch_key",
           "missing_batches", "synthesize", "synthetic_refs"]

SPLIT = "synthetic"
BATCH_STAGE = "sample-batch"


@dataclass(frozen=True)
class SamplingPlan:
    """What to draw: the config's datasetddpm settings with the command line's overrides, checked."""

    samples: int
    batch_size: int
    respacing: str  # canonical timestep_respacing ("" = every step)
    ddim: bool
    clip_denoised: bool
    seed: int

    @property
    def batches(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    def sampler(self) -> dict[str, Any]:
        """What changes a batch's images besides the backbone and its index."""
        return {"respacing": self.respacing, "ddim": self.ddim, "clip_denoised": self.clip_denoised,
                "seed": self.seed, "batch_size": self.batch_size}


def sampling_plan(cfg: ExperimentConfig, samples: int | None = None, respacing: str | int | None = None,
                  ddim: bool | None = None) -> SamplingPlan:
    """The checked plan; ConfigError naming the setting for a model without a diffusion process (kind rgb, mae,
    ...), samples < 1, or a respacing the schedule cannot give."""
    d = cfg.datasetddpm
    source = cfg.source_path or "the config"
    if cfg.model.kind != "ddpm":
        raise ConfigError(f"{source}: model.kind is {cfg.model.kind!r}; DatasetDDPM samples images from a "
                          f"diffusion backbone: it needs model.kind ddpm")
    samples = d.samples if samples is None else samples
    if samples < 1:
        raise ConfigError(f"{source}: samples {samples}: expected at least 1 (--samples / datasetddpm.samples)")
    steps = int(cfg.model.full_flags()["diffusion_steps"])
    try:
        spacing = sampling.parse_respacing(d.respacing if respacing is None else respacing, steps)
    except sampling.SamplingError as err:
        raise ConfigError(f"{source}: datasetddpm.{err} (--respacing / datasetddpm.respacing)") from None
    return SamplingPlan(samples, d.batch_size, spacing, d.ddim if ddim is None else ddim, d.clip_denoised, d.seed)


def plan_from_dict(data: dict[str, Any]) -> SamplingPlan:
    """A plan as a task received it (dataclasses.asdict of one)."""
    return SamplingPlan(**data)


def batch_key(cfg: ExperimentConfig, plan: SamplingPlan, index: int) -> Key:
    return Key(BATCH_STAGE, {"backbone": backbone_fingerprint(cfg), "sampler": plan.sampler(), "batch": index})


def samples_key(cfg: ExperimentConfig, plan: SamplingPlan) -> Key:
    """The synthetic split: the backbone, the sampler and N (its image ids follow from these)."""
    return Key("synthesize", {"backbone": backbone_fingerprint(cfg), "sampler": plan.sampler(),
                              "samples": plan.samples})


def missing_batches(cfg: ExperimentConfig, store: FeatureStore, plan: SamplingPlan) -> list[int]:
    return [b for b in range(plan.batches)
            if artifacts.read_record(store.location, BATCH_STAGE, batch_key(cfg, plan, b).value) is None]


def synthesize(cfg: ExperimentConfig, store: FeatureStore, plan: SamplingPlan, progress: bool = True,
               desc: str = "synthesize") -> dict[str, int]:
    """Draw every batch of the plan without a record, on features.device (CUDA when present); returns
    {"batches_drawn", "samples_drawn"}."""
    todo = missing_batches(cfg, store, plan)
    counts = {"batches_drawn": 0, "samples_drawn": 0}
    if not todo:
        return counts
    from flows.extract import load_extractor

    device = bb.resolve_device(cfg.features.device)
    extractor = load_extractor(cfg, device)  # the backbone's UNet with its weights, shared with extraction
    diffusion = sampling.respaced_diffusion(bb.complete_flags(cfg.model.full_flags()), plan.respacing)
    size = cfg.image_size
    with progress_bar(desc=desc, total=len(todo) * diffusion.num_timesteps, unit="step", enabled=progress) as bar:
        for b in todo:
            indices = list(range(b * plan.batch_size, (b + 1) * plan.batch_size))
            images = sampling.sample_images(extractor.model, diffusion, indices, plan.seed, size, ddim=plan.ddim,
                                            clip_denoised=plan.clip_denoised, device=device,
                                            on_step=lambda: bar.update(1))
            ids = []
            for index, image in zip(indices, images):
                image_id = image_id_of(image)
                store.write_view_input(BASE_VIEW, image_id, image.numpy(), {
                    "image_size": size, "stem": stem_of(index), "split": SPLIT, "sample_index": index})
                ids.append(image_id)
            key = batch_key(cfg, plan, b)  # the batch's commit: after every image of it
            artifacts.write_record(store.location, key, {"image_ids": ids, "indices": indices})
            counts["batches_drawn"] += 1
            counts["samples_drawn"] += len(indices)
    return counts


def stem_of(index: int) -> str:
    return f"sample_{index:06d}"


def synthetic_refs(cfg: ExperimentConfig, store: FeatureStore, plan: SamplingPlan) -> list[ImageRef]:
    """The first plan.samples samples (no label yet); StoreError when a batch is not committed."""
    refs: list[ImageRef] = []
    for b in range(plan.batches):
        record = artifacts.read_record(store.location, BATCH_STAGE, batch_key(cfg, plan, b).value)
        if record is None:
            raise StoreError(f"{store.location.url}: sample batch {b} is not in the store (run `ddpmseg synthesize`)")
        result = record["result"]
        refs += [ImageRef(i, "", stem_of(n)) for i, n in zip(result["image_ids"], result["indices"])]
    return refs[:plan.samples]




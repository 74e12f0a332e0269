"""What a config uses: the lock file beside its outputs (for `ddpmseg status`), and everything it needs from
the store (for `ddpmseg store gc`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig
from storage.features import FeatureStore
from storage.keys import Key
from storage.maintenance import References
from flows.outputs import read_json
from flows.prepare import prepare
from flows.stage_keys import ImageRef, evaluate_key, members_key, train_key, unit_for

LOCK_NAME = "ddpmseg.lock.json"


def lock_path(cfg: ExperimentConfig) -> Path:
    return Path(cfg.output_dir) / LOCK_NAME


def write_lock(cfg: ExperimentConfig, keys: dict[str, Key], refs: list[ImageRef],
               datasetddpm_plan: dict[str, Any] | None = None) -> None:
    """Record each stage's key and inputs beside the outputs, like dvc.lock, merged with the previous lock;
    datasetddpm_plan: the sampling plan of the last DatasetDDPM run (samples, sampler), for `ddpmseg status`."""
    path = lock_path(cfg)
    previous = read_lock(cfg)
    stages_ = {**previous.get("stages", {}),
               **{name: {"key": k.value, "inputs": k.inputs} for name, k in keys.items()}}
    names = {**previous.get("names", {}), **{r.image_id: r.stem for r in refs}}
    lock: dict[str, Any] = {"stages": stages_, "names": names}
    plan = datasetddpm_plan if datasetddpm_plan is not None else previous.get("datasetddpm_plan")
    if plan is not None:
        lock["datasetddpm_plan"] = plan
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(lock, indent=1, sort_keys=True))
    tmp.replace(path)


def read_lock(cfg: ExperimentConfig) -> dict[str, Any]:
    return read_json(lock_path(cfg))


def add_references(cfg: ExperimentConfig, store: FeatureStore, refs: References) -> References:
    """Add everything `cfg` needs from the store to `refs` (for `ddpmseg store gc`)."""
    split_refs = {split: prepare(cfg, store, split, write=False) for split in ("train", "test")}
    for split, sr in split_refs.items():
        for r in sr.extraction(cfg, split):
            for t in cfg.features.steps:
                refs.units.setdefault(unit_for(cfg, t, r.view).path, set()).add(r.image_id)
        refs.view_images.update(r.image_id for r in sr.base + sr.views)
    train = train_key(cfg, split_refs["train"].base + split_refs["train"].views)
    refs.train_keys.add(train.value)
    refs.member_keys.add(members_key(train))
    refs.evaluate_keys.add(evaluate_key(cfg, train, split_refs["test"].base).value)
    if cfg.model.kind == "ddpm":
        add_synthetic_references(cfg, store, refs)
    return refs


def add_synthetic_references(cfg: ExperimentConfig, store: FeatureStore, refs: References) -> None:
    """DatasetDDPM: every sample batch drawn from this config's backbone (any N, any sampler: a batch's record
    must never outlive its images), their features at the config's steps, and the segmenter evaluations."""
    from storage import artifacts
    from storage.keys import digest
    from flows.stage_keys import backbone_fingerprint
    from flows.synthesize import BATCH_STAGE

    backbone = digest(backbone_fingerprint(cfg))
    for record in artifacts.list_records(store.location, BATCH_STAGE):
        if digest(record["inputs"].get("backbone")) != backbone:
            continue
        ids = record["result"]["image_ids"]
        refs.view_images.update(ids)
        for t in cfg.features.steps:
            refs.units.setdefault(unit_for(cfg, t).path, set()).update(ids)
    refs.evaluate_keys.update(artifacts.record_keys(store.location, "segmenter-evaluate"))

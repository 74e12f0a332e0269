"""The label stage (DatasetDDPM): the trained ensemble predicts every synthetic sample from its extracted
features (the sample noised with the config's shared noise, as the official generate_dataset.py does):
the mode-vote mask and the image's JS uncertainty (pipeline/predict.py, official predict_labels).

Per sample batch and train key: each mask is stored as the sample's label (views/base/<id>/label-<hash>), then
the batch's record (stages/label-batch/<key>: label hashes and uncertainties) is written last. A new train key
labels again from the stored features, without drawing a sample; a larger N labels only the new batches (and
the last one again when it grew).
"""
from __future__ import annotations

from typing import Any

from pipeline.backbone import resolve_device
from pipeline.config import ExperimentConfig
from pipeline.predict import predict_maps
from pipeline.progress import progress_bar
from storage import artifacts
from storage.features import FeatureStore, StoreError
from storage.keys import Key, array_digest
from flows.stage_keys import BASE_VIEW, ImageRef
from flows.synthesize import SamplingPlan, batch_key, samples_key, synthetic_refs
from flows.train import load_members, map_reader

LABEL_BATCH_STAGE = "label-batch"


def label_key(cfg: ExperimentConfig, plan: SamplingPlan, train: Key) -> Key:
    """The labelled synthetic split: (samples key, train key)."""
    return Key("label", {"samples": samples_key(cfg, plan).value, "train": train.value})


def _batches(plan: SamplingPlan, refs: list[ImageRef]) -> list[tuple[int, list[ImageRef]]]:
    return [(b, refs[b * plan.batch_size:(b + 1) * plan.batch_size]) for b in range(plan.batches)]


def label_batch_key(cfg: ExperimentConfig, plan: SamplingPlan, train: Key, index: int, count: int) -> Key:
    """The first `count` samples of batch `index` labelled by the members of `train`."""
    return Key(LABEL_BATCH_STAGE, {"batch": batch_key(cfg, plan, index).value, "count": count,
                                   "train": train.value})


def missing_label_batches(cfg: ExperimentConfig, store: FeatureStore, plan: SamplingPlan, train: Key,
                          refs: list[ImageRef]) -> list[int]:
    return [b for b, batch in _batches(plan, refs)
            if artifacts.read_record(store.location, LABEL_BATCH_STAGE,
                                     label_batch_key(cfg, plan, train, b, len(batch)).value) is None]


def label(cfg: ExperimentConfig, store: FeatureStore, plan: SamplingPlan, train: Key, progress: bool = True,
          desc: str = "label") -> dict[str, int]:
    """Predict every sample of the batches not yet labelled by `train`'s members; returns {"labelled"}."""
    refs = synthetic_refs(cfg, store, plan)
    todo = set(missing_label_batches(cfg, store, plan, train, refs))
    counts = {"labelled": 0}
    if not todo:
        return counts
    device = resolve_device(cfg.classifier.device)
    members = [member.to(device) for member in load_members(store.location, train, cfg.classifier.model_num)]
    maps_of = map_reader(cfg, store, cache_size=1, device=device)
    with progress_bar(desc=desc, total=sum(len(b) for i, b in _batches(plan, refs) if i in todo), unit="img",
                      enabled=progress) as bar:
        for index, batch in _batches(plan, refs):
            if index not in todo:
                continue
            hashes, uncertainties = [], []
            for ref in batch:
                prediction = predict_maps(members, maps_of(f"{BASE_VIEW}/{ref.image_id}"), cfg.image_size)
                label_hash = array_digest(prediction.mask)[:20]
                store.write_view_label(BASE_VIEW, ref.image_id, prediction.mask, label_hash,
                                       {"stem": ref.stem, "split": "synthetic", "train_key": train.value})
                hashes.append(label_hash)
                uncertainties.append(prediction.uncertainty)
                counts["labelled"] += 1
                bar.update(1)
            artifacts.write_record(store.location, label_batch_key(cfg, plan, train, index, len(batch)),
                                   {"label_hashes": hashes, "uncertainties": uncertainties})
    return counts


def labelled_samples(cfg: ExperimentConfig, store: FeatureStore, plan: SamplingPlan,
                     train: Key) -> tuple[list[ImageRef], list[float]]:
    """The synthetic split with its labels (refs carrying each mask's hash) and uncertainties, in sample order;
    StoreError when a batch is not labelled."""
    refs = synthetic_refs(cfg, store, plan)
    out_refs: list[ImageRef] = []
    uncertainties: list[float] = []
    for index, batch in _batches(plan, refs):
        key = label_batch_key(cfg, plan, train, index, len(batch))
        record = artifacts.read_record(store.location, LABEL_BATCH_STAGE, key.value)
        if record is None:
            raise StoreError(f"{store.location.url}: sample batch {index} is not labelled by train key "
                             f"{train.short} (run `ddpmseg segmenter train`)")
        result: dict[str, Any] = record["result"]
        out_refs += [ImageRef(r.image_id, h, r.stem) for r, h in zip(batch, result["label_hashes"])]
        uncertainties += [float(u) for u in result["uncertainties"]]
    return out_refs, uncertainties

"""The evaluate stage: predict every test image (each test-time view, merged), score it, persist masks and
metrics in the store under the evaluate key."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from pipeline import augment, metrics
from pipeline.backbone import resolve_device
from pipeline.config import ExperimentConfig
from pipeline.predict import merge_views, predict_maps, undo_view
from pipeline.progress import labelled, progress_bar
from storage import artifacts
from storage.features import FeatureStore
from storage.keys import Key
from flows.stage_keys import BASE_VIEW, ImageRef, tta_views
from flows.train import load_members, map_reader

def evaluate(cfg: ExperimentConfig, store: FeatureStore, refs: list[ImageRef], train: Key, key: Key,
             progress: bool = True, label: str = "") -> dict[str, Any]:
    """Predict every test image (each test-time view, merged), score it, persist masks and metrics.

    refs: the base test refs; test-time views are derived from cfg.tta (their features must be extracted).
    label: which run the progress bar belongs to (e.g. "ddpm s0")."""
    loc = store.location
    device = resolve_device(cfg.classifier.device)  # members and maps there: each image predicted on it
    members = [member.to(device) for member in load_members(loc, train, cfg.classifier.model_num)]
    maps_of = map_reader(cfg, store, cache_size=1, device=device)
    d = cfg.dataset
    views = ([(BASE_VIEW, [])] if cfg.tta.include_original else []) + [(t, s) for t, _, s in tta_views(cfg)]
    masks, gts, uncertainties = [], [], []
    for r in progress_bar(refs, desc=labelled(label, "evaluate"), unit="img", enabled=progress):
        preds = [undo_view(predict_maps(members, maps_of(f"{view}/{r.image_id}"), cfg.image_size), specs)
                 for view, specs in views]
        mask = merge_views(preds, cfg.tta.merge)
        if cfg.postprocess.closing:
            mask = augment.close_mask(mask)
        masks.append(mask)
        gts.append(store.read_view_label(BASE_VIEW, r.image_id, r.label_hash))
        uncertainties.append(preds[0].uncertainty)
    scores = metrics.score(masks, gts, d.number_class, d.ignore_label)
    mask_path = artifacts.write_masks(store.root, key.value, np.stack(masks), [r.image_id for r in refs],
                                      [r.stem for r in refs])
    result = {
        "miou": 100 * scores.official_miou, "miou_standard": 100 * scores.standard_miou,
        "pixel_accuracy": 100 * scores.pixel_accuracy, "uncertainty": float(np.mean(uncertainties)),
        "scores": scores.to_dict(), "images": [asdict(r) for r in refs], "uncertainties": uncertainties,
        "class_names": d.class_names, "masks_store_path": mask_path, "views": [v for v, _ in views],
    }
    artifacts.write_metrics(loc, key.value, result)
    return result

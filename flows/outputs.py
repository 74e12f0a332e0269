"""A run's outputs beside the config: masks (npy + palette PNG), metrics.json and the evaluation report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ExperimentConfig, config_to_dict
from storage import artifacts
from storage.features import FeatureStore, StoreError
from storage.location import StoreLocation
from flows.stage_keys import BASE_VIEW, ImageRef

def evaluation_metrics(loc: StoreLocation, eval_key: str) -> dict[str, Any]:
    """The committed evaluation's metrics; StoreError when its record exists but the metrics are gone."""
    result = artifacts.read_metrics(loc, eval_key)
    if result is None:
        raise StoreError(f"{loc.path(artifacts.metrics_path(eval_key))}: the evaluation is recorded but its metrics "
                         f"are missing; run `ddpmseg store verify {loc.url} --repair` to remove the evaluation (the "
                         f"next run recomputes it)")
    return result


def save_palette_png(mask: np.ndarray, palette: list[tuple[int, int, int]] | None, path: Path) -> None:
    from PIL import Image

    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = [v for rgb in (palette or []) for v in rgb]
    if not flat:  # a generic palette: distinct colours per class id
        rng = np.random.default_rng(0)
        flat = rng.integers(0, 256, size=256 * 3).tolist()
    img.putpalette(flat + [0] * (768 - len(flat)))
    img.save(path)


def write_outputs(cfg: ExperimentConfig, store: FeatureStore, result: dict[str, Any],
                  summary: dict[str, Any]) -> dict[str, str]:
    """Copy an evaluation's masks (PNG + npy) and metrics.json into cfg.output_dir; returns their paths."""
    out = Path(cfg.output_dir)
    mask_dir = out / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    masks = store.read_masks(result["masks_store_path"])
    for ref, mask in zip(result["images"], masks):
        np.save(mask_dir / f"{ref['stem']}.npy", mask)
        if cfg.evaluation.save_png:
            save_palette_png(mask, cfg.dataset.palette, mask_dir / f"{ref['stem']}.png")
    metrics_path = out / "metrics.json"
    report_path = out / "report" / "report.html"
    previous = read_json(metrics_path)
    if cfg.evaluation.gallery > 0 and (previous.get("evaluate_key") != summary.get("evaluate_key")
                                  or not report_path.is_file()):
        write_report(cfg, store, result, masks, out / "report")
    payload = {**summary, "config": config_to_dict(cfg), "result": result}
    metrics_path.write_text(json.dumps(payload, indent=1))
    paths = {"metrics_path": str(metrics_path), "masks_path": str(mask_dir)}
    if report_path.is_file():
        paths["report_path"] = str(report_path)
    return paths


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_report(cfg: ExperimentConfig, store: FeatureStore, result: dict[str, Any], masks: np.ndarray,
                 out: Path) -> dict[str, str]:
    """The evaluation report under `out`: scores, the worst images (image | ground truth | prediction | error
    map), IoU per class, mIoU per image ascending (pipeline.report.write_evaluation_report)."""
    from pipeline import report

    refs = [ImageRef(**r) for r in result["images"]]
    images = [store.read_view_input(BASE_VIEW, r.image_id) for r in refs]
    gts = [store.read_view_label(BASE_VIEW, r.image_id, r.label_hash) for r in refs]
    d = cfg.dataset
    return report.write_evaluation_report(out, images, gts, list(masks), result["scores"], [r.stem for r in refs],
                                          d.class_names, d.palette, d.ignore_label, k=cfg.evaluation.gallery,
                                          title=f"Evaluation report: {d.name}")

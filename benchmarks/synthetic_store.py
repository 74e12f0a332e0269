"""A feature store at a given geometry filled with synthetic values (no UNet forwards), and its experiment.

The store is written with the project's own writers (FeatureStore.write_view / write_features) under the unit
names the stages use (flows.stage_keys.unit_for), so flows.train_stage.train_member reads it exactly as it reads an
extracted store. A manifest (JSON beside the store) holds the experiment config and the image refs, so a child
process can rebuild both.

Labels: random blobs of `number_class` classes; only a given number of random pixels per image keep their class,
the others carry the ignore label (this bounds training time; both the streaming and the official path train on
exactly these labels). The small-annotation rule (< 20 pixels -> ignore) is applied when writing, as
pipeline.datasets does for training labels.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.geometry import Geometry
from flows import stage_keys
from flows import train as train_stage
from pipeline.config import ExperimentConfig
from pipeline.datasets import apply_small_annotation_rule
from storage.features import FeatureStore
from storage.keys import array_digest

IGNORE_LABEL = 255
MANIFEST = "benchmark-manifest.json"


def blob_label(rng: np.random.Generator, size: int, number_class: int, labelled_pixels: int) -> np.ndarray:
    """(size, size) uint8: class 0 background with random discs and rectangles of classes 1..number_class-1;
    all but `labelled_pixels` random pixels set to IGNORE_LABEL; then the small-annotation rule."""
    yy, xx = np.mgrid[0:size, 0:size]
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(number_class, 2 * number_class))):
        cls = int(rng.integers(1, number_class))
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(size / 16, size / 4)
        if rng.random() < 0.5:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r * rng.uniform(0.3, 1.0))
        label[inside] = cls
    keep = np.zeros(size * size, dtype=bool)
    keep[rng.choice(size * size, size=min(labelled_pixels, size * size), replace=False)] = True
    label = np.where(keep.reshape(size, size), label, IGNORE_LABEL).astype(np.uint8)
    return apply_small_annotation_rule(label, IGNORE_LABEL)


def experiment_dict(geometry: Geometry, n_images: int, number_class: int, store_dir: Path,
                    classifier: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config (plain dict) for `geometry` with a random-init backbone: the classifier trains one member for
    one epoch unless `classifier` says otherwise."""
    return {
        "recipe": "paper",
        "dataset": {"name": "benchmark-synthetic", "train_dir": str(store_dir / "unused-train"),
                    "test_dir": str(store_dir / "unused-test"), "number_class": number_class,
                    "ignore_label": IGNORE_LABEL, "training_number": n_images, "testing_number": 1},
        "model": {"random_init": True, "init_seed": 0, "flags": dict(geometry.flags)},
        "features": {"steps": list(geometry.steps), "blocks": list(geometry.blocks)},
        "classifier": {"model_num": 1, "max_epochs": 1, **(classifier or {})},
        "store": str(store_dir),
        "output_dir": str(store_dir.parent / "outputs"),
    }


@dataclass(frozen=True)
class SyntheticStore:
    """A written synthetic store: its directory, experiment config (dict) and image refs (all images)."""

    store_dir: Path
    config: dict[str, Any]
    refs: list[stage_keys.ImageRef]
    seconds: float

    def cfg(self, n_images: int | None = None, classifier: dict[str, Any] | None = None) -> ExperimentConfig:
        data = json.loads(json.dumps(self.config))
        if n_images is not None:
            data["dataset"]["training_number"] = n_images
        data["classifier"].update(classifier or {})
        return ExperimentConfig.model_validate(data)

    def store(self) -> FeatureStore:
        return FeatureStore(str(self.store_dir))


def write_synthetic_store(root: Path, geometry: Geometry, labelled_pixels: list[int], number_class: int = 20,
                          seed: int = 0) -> SyntheticStore:
    """Write one image per entry of `labelled_pixels` (random input; blob label keeping that many labelled
    pixels; random N(0, 1) block maps of the geometry's native shapes at every step) under root/store, in
    that order; returns the store and writes root/benchmark-manifest.json."""
    import time

    start = time.perf_counter()
    root = Path(root)
    store_dir = root / "store"
    n_images = len(labelled_pixels)
    config = experiment_dict(geometry, n_images, number_class, store_dir)
    cfg = ExperimentConfig.model_validate(config)
    store = FeatureStore(str(store_dir))
    size = geometry.image_size
    units = {t: stage_keys.unit_for(cfg, t) for t in geometry.steps}
    for t, unit in units.items():
        store.ensure_unit(unit, {"synthetic": True, "t": t})
    refs = []
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        image = torch.from_numpy(rng.uniform(-1, 1, size=(3, size, size)).astype(np.float32))
        image_id = stage_keys.image_id_of(image)
        label = blob_label(rng, size, number_class, labelled_pixels[i])
        label_hash = array_digest(label)[:20]
        store.write_view(stage_keys.BASE_VIEW, image_id, image.numpy(), label, label_hash, {"image_size": size})
        for t, unit in units.items():
            maps = {b: rng.standard_normal(shape, dtype=np.float32) for b, shape in geometry.block_shapes.items()}
            store.write_features(unit, image_id, maps)
        refs.append(stage_keys.ImageRef(image_id, label_hash, f"synthetic{i:03d}"))
    result = SyntheticStore(store_dir, config, refs, time.perf_counter() - start)
    (root / MANIFEST).write_text(json.dumps({"config": config, "refs": [asdict(r) for r in refs],
                                             "seconds": result.seconds}))
    return result


def load_synthetic_store(root: Path) -> SyntheticStore:
    """The SyntheticStore described by root/benchmark-manifest.json."""
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{path}: no benchmark manifest (write_synthetic_store writes it): {err}") from err
    refs = [stage_keys.ImageRef(**{k: v for k, v in r.items() if k in ("image_id", "label_hash", "stem")})
            for r in data["refs"]]
    return SyntheticStore(Path(data["config"]["store"]), data["config"], refs, data["seconds"])

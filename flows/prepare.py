"""The prepare stage: load a split from disk (validated), store each image's model input and label, derive and
store its augmented / test-time views. Returns ImageRefs; nothing else crosses to the next stage."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline import datasets
from pipeline.config import ExperimentConfig
from storage.features import FeatureStore, StoreError
from storage.keys import array_digest
from flows.stage_keys import BASE_VIEW, ImageRef, image_id_of, train_views, tta_views

def prepare_split(cfg: ExperimentConfig, store: FeatureStore, split: str, write: bool = True) -> list[ImageRef]:
    """Load a split from disk (validating it), store each image's model input and label; return the refs.

    With write=False nothing is written (for read-only questions such as `ddpmseg status`)."""
    d = cfg.dataset
    root, number = (d.train_dir, d.training_number) if split == "train" else (d.test_dir, d.testing_number)
    samples = datasets.load_split(root, number, cfg.image_size, d.number_class, d.ignore_label,
                                  train=(split == "train"), min_annotation_pixels=d.min_annotation_pixels,
                                  as_tensor=False)  # numpy: hashing and storing need no torch
    refs = []
    for s in samples:
        image_id, label_hash = image_id_of(s.image), array_digest(s.label)[:20]
        if write and not store.view_committed(BASE_VIEW, image_id, label_hash):
            store.write_view(BASE_VIEW, image_id, s.image, s.label, label_hash,
                             {"image_size": cfg.image_size, "stem": s.image_path.stem, "split": split})
        refs.append(ImageRef(image_id, label_hash, s.image_path.stem))
    return refs


def prepare_views(cfg: ExperimentConfig, store: FeatureStore, base: list[ImageRef],
                  views: list[tuple[str, int, list]], write: bool = True) -> list[ImageRef]:
    """Derive each view of each base image (deterministic from spec, seed, view index, image id) and store it."""
    if views:
        from pipeline import augment  # albumentations, OpenCV and torch: only a config with views needs them
    refs = []
    for ref in base:
        if views and not store.view_committed(BASE_VIEW, ref.image_id, ref.label_hash):
            if not write:
                continue
            raise StoreError(f"view {BASE_VIEW} image {ref.image_id} ({ref.stem}) is not in the store: "
                             f"prepare the base split first")
        image = label = None
        for tag, index, specs in views:
            if image is None:
                image = augment.to_uint8(store.read_view_input(BASE_VIEW, ref.image_id))
                label = store.read_view_label(BASE_VIEW, ref.image_id, ref.label_hash)
            seed = cfg.augmentation.seed if tag.startswith("aug-") else cfg.tta.seed
            aug_image, aug_label = augment.apply_view(image, label, specs, seed, index, ref.image_id,
                                                      cfg.dataset.ignore_label)
            label_hash = array_digest(aug_label)[:20]
            if write and not store.view_committed(tag, ref.image_id, label_hash):
                store.write_view(tag, ref.image_id, augment.from_uint8(aug_image), aug_label, label_hash,
                                 {"image_size": cfg.image_size, "view_index": index, "base_label": ref.label_hash,
                                  "stem": ref.stem})
            refs.append(ImageRef(ref.image_id, label_hash, ref.stem, tag))
    return refs


@dataclass(frozen=True)
class SplitRefs:
    """A split's base images and their derived views (augmented views for train, test-time views for test)."""

    base: list[ImageRef]
    views: list[ImageRef]

    def extraction(self, cfg: ExperimentConfig, split: str) -> list[ImageRef]:
        """The refs whose features this split needs."""
        if split == "test" and not cfg.tta.include_original:
            return list(self.views)
        return self.base + self.views


def prepare(cfg: ExperimentConfig, store: FeatureStore, split: str, write: bool = True) -> SplitRefs:
    base = prepare_split(cfg, store, split, write)
    views = train_views(cfg) if split == "train" else tta_views(cfg)
    return SplitRefs(base, prepare_views(cfg, store, base, views, write))

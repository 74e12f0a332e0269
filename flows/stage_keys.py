"""What the stages exchange and how they are keyed: image refs, fingerprints, views, units and stage keys.

Every key is a hash of exactly the inputs that change a stage's result (storage.keys.Key), machine-independent,
so a stage done once is found again by anyone with the same inputs. Arrays never cross a stage boundary: stages
exchange image ids (ImageRef) and keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import ExperimentConfig
from storage.features import UnitSpec
from storage.keys import Key, array_digest, digest, file_digest

if TYPE_CHECKING:
    import torch

BASE_VIEW = "base"


@dataclass(frozen=True)
class ImageRef:
    """One image of a split as the stages see it: a content id, its label's hash and a display name."""

    image_id: str  # content hash of the base image (the same in every view of it)
    label_hash: str  # hash of the label in this view
    stem: str
    view: str = BASE_VIEW

    @property
    def entry(self) -> str:
        """'<view>/<image_id>': one row of training data."""
        return f"{self.view}/{self.image_id}"


def backbone_fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """The extractor's fingerprint: kind, flags and the weights (checkpoint sha256, or the random-init seed)."""
    extractor = cfg.model.extractor()
    checkpoint_sha256 = None
    if extractor.uses_weights and cfg.model.checkpoint is not None:
        path = Path(cfg.model.checkpoint)
        if not path.is_file():
            from pipeline.backbone import BackboneError

            raise BackboneError(f"{path}: checkpoint not found (model.checkpoint)")
        checkpoint_sha256 = file_digest(path)
    return extractor.fingerprint(checkpoint_sha256, cfg.model.init_seed)


def backbone_tag(cfg: ExperimentConfig) -> str:
    """The store's readable backbone name: '<checkpoint stem or kind>-<12 hex of the fingerprint>'."""
    name = cfg.model.extractor().tag_name(cfg.model.checkpoint, cfg.model.init_seed)
    return f"{name}-{digest(backbone_fingerprint(cfg))[:12]}"


def feature_spec(cfg: ExperimentConfig) -> dict[str, Any]:
    """The activation settings that change the maps (for ddpm: the noise too)."""
    return cfg.model.extractor().feature_spec(cfg.features)


def train_views(cfg: ExperimentConfig) -> list[tuple[str, int, list]]:
    """(tag, view index, transform specs) of each train-time augmented view."""
    a = cfg.augmentation
    spec = [t.model_dump() for t in a.transforms]
    tag = digest({"transforms": spec, "seed": a.seed})[:8]
    return [(f"aug-{tag}-v{i:02d}", i, list(a.transforms)) for i in range(1, a.views + 1)]


def tta_views(cfg: ExperimentConfig) -> list[tuple[str, int, list]]:
    """(tag, view index, transform specs) of each test-time view (the original image is the base view)."""
    out = []
    for i, specs in enumerate(cfg.tta.specs(), start=1):
        tag = digest({"transforms": [t.model_dump() for t in specs], "seed": cfg.tta.seed})[:8]
        out.append((f"tta-{tag}", i, specs))
    return out


def unit_for(cfg: ExperimentConfig, t: int, view: str = BASE_VIEW) -> UnitSpec:
    return UnitSpec(backbone=backbone_tag(cfg), view=view, t=t, spec=digest(feature_spec(cfg))[:8])


def image_id_of(image: torch.Tensor | np.ndarray) -> str:
    """Content id of an image: hash of the exact model input (after the base transform; a CPU tensor or the
    numpy array of the same values give the same id)."""
    return array_digest(image if isinstance(image, np.ndarray) else image.numpy())[:20]


def train_key(cfg: ExperimentConfig, refs: list[ImageRef]) -> Key:
    """refs: the base training images and their augmented views."""
    c = cfg.classifier
    # device: where, not what (the same members to floating-point rounding). A batched ensemble draws its pixel
    # orders otherwise than independent members, so it is keyed; independent keeps the keys it always had.
    hyper = {k: v for k, v in c.model_dump().items() if k not in ("model_num", "device", "ensemble")}
    if c.ensemble != "independent":
        hyper["ensemble"] = c.ensemble
    base = [[r.image_id, r.label_hash] for r in refs if r.view == BASE_VIEW]
    views = sorted({r.view for r in refs if r.view != BASE_VIEW})
    augmented = [[r.view, r.image_id, r.label_hash] for r in refs if r.view != BASE_VIEW]
    return Key("train", {
        "backbone": backbone_fingerprint(cfg), "features": feature_spec(cfg),
        "steps": list(cfg.features.steps), "blocks": cfg.sorted_blocks,
        "images": base, "augmentation": {"views": views, "keep_iterations": cfg.augmentation.keep_iterations,
                                         "labels": digest(augmented)[:16]},
        "classifier": hyper, "model_num": c.model_num,
        "number_class": cfg.dataset.number_class, "ignore_label": cfg.dataset.ignore_label,
    })


def members_key(train: Key) -> str:
    """Where a train key's members live: its inputs without model_num, so growing the ensemble reuses members."""
    return digest({k: v for k, v in train.inputs.items() if k != "model_num"})[:32]


def evaluate_key(cfg: ExperimentConfig, train: Key, refs: list[ImageRef]) -> Key:
    """refs: the base test images (test-time views are named by the tta settings)."""
    return Key("evaluate", {"train": train.value,
                            "images": [[r.image_id, r.label_hash] for r in refs if r.view == BASE_VIEW],
                            "evaluation": cfg.evaluation.model_dump(),
                            "tta": {**cfg.tta.model_dump(), "views": [v[0] for v in tta_views(cfg)]},
                            "postprocess": cfg.postprocess.model_dump()})


def extract_key(cfg: ExperimentConfig, refs: list[ImageRef]) -> Key:
    """Key of extracting a split: backbone, feature spec, steps, blocks and the images' content ids."""
    return Key("extract", {"backbone": backbone_fingerprint(cfg), "features": feature_spec(cfg),
                           "steps": list(cfg.features.steps), "blocks": cfg.sorted_blocks,
                           "images": sorted({r.entry for r in refs})})

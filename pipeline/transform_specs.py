"""Augmentation specs as plain data (no torch, albumentations or OpenCV import): the transform names a config may
use and the later study's settings. pipeline/augment.py maps each name to its albumentations class
(tests/test_augment.py checks that both list the same names)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["TRANSFORM_NAMES", "GEOMETRIC_TRANSFORMS", "TransformSpec", "STUDY_TRAIN_TRANSFORMS", "STUDY_TTA_VIEWS"]

#: the transforms a view may use (albumentations names), see pipeline.augment.TRANSFORMS
TRANSFORM_NAMES = ("ColorJitter", "ToGray", "HorizontalFlip", "CoarseDropout", "RandomResizedCrop", "Rotate",
                   "ElasticTransform", "ChannelShuffle")
#: the transforms that move pixels (the label moves with them)
GEOMETRIC_TRANSFORMS = frozenset({"HorizontalFlip", "RandomResizedCrop", "Rotate", "ElasticTransform"})


class TransformSpec(BaseModel):
    """One transform of a view: its albumentations name, probability and parameters (defaults in
    pipeline.augment.TRANSFORMS)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    p: float = Field(0.4, ge=0.0, le=1.0)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in TRANSFORM_NAMES:
            raise ValueError(f"unknown transform {name!r}; expected one of {sorted(TRANSFORM_NAMES)}")
        return name


#: The later study's train-time augmentations, each with p = 0.4.
STUDY_TRAIN_TRANSFORMS = ["ColorJitter", "ToGray", "HorizontalFlip", "CoarseDropout", "RandomResizedCrop", "Rotate",
                          "ElasticTransform"]
#: The later study's four test-time views (all transforms applied, p = 1).
STUDY_TTA_VIEWS = [["ToGray", "CoarseDropout"], ["ToGray"], ["ColorJitter", "HorizontalFlip"],
                   ["ColorJitter", "HorizontalFlip", "ChannelShuffle"]]

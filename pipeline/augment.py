"""Augmentation views (albumentations): declarative specs, deterministic per (spec, seed, view index, image id).

A view turns a base image (the exact model input, (3, H, W) in [-1, 1]) and its label into an augmented pair:

    image_u8 = to_uint8(base_input)                       # exact inverse of the official ToTensor + 2x-1
    aug_u8, aug_label = apply_view(image_u8, label, spec, seed, view_index, image_id, ignore_label)

Geometric transforms move the label with nearest-neighbour interpolation; pixels that come from outside the image
(rotation corners, elastic borders) get the ignore label, never class 0. Test-time views use p = 1 transforms and
`undo_geometry` flips a predicted mask back.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any

import cv2
import numpy as np
import torch

from pipeline.transform_specs import STUDY_TRAIN_TRANSFORMS, STUDY_TTA_VIEWS, TransformSpec  # re-exported

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import albumentations as A

#: transform name -> (albumentations class, default parameters, moves pixels?)
TRANSFORMS: dict[str, tuple[type, dict[str, Any], bool]] = {
    "ColorJitter": (A.ColorJitter, {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.1}, False),
    "ToGray": (A.ToGray, {}, False),
    "HorizontalFlip": (A.HorizontalFlip, {}, True),
    "CoarseDropout": (A.CoarseDropout, {"num_holes_range": (1, 4), "hole_height_range": (0.1, 0.2),
                                        "hole_width_range": (0.1, 0.2)}, False),
    "RandomResizedCrop": (A.RandomResizedCrop, {"scale": (0.5, 1.0)}, True),
    "Rotate": (A.Rotate, {"limit": 30, "border_mode": cv2.BORDER_CONSTANT}, True),
    "ElasticTransform": (A.ElasticTransform, {"alpha": 20.0, "sigma": 4.0, "border_mode": cv2.BORDER_CONSTANT}, True),
    "ChannelShuffle": (A.ChannelShuffle, {}, False),
}


def is_geometric(specs: list[TransformSpec]) -> bool:
    return any(TRANSFORMS[s.name][2] and s.p > 0 for s in specs)


def build_transform(specs: list[TransformSpec], size: int, ignore_label: int, seed: int) -> A.Compose:
    """An albumentations pipeline for (size x size) images; out-of-image label pixels get `ignore_label`."""
    ops = []
    for s in specs:
        cls, defaults, geometric = TRANSFORMS[s.name]
        params = {**defaults, **s.params}
        if s.name == "RandomResizedCrop":
            params.setdefault("size", (size, size))
        if geometric and s.name in ("Rotate", "ElasticTransform"):
            params.setdefault("fill_mask", ignore_label)
        ops.append(cls(p=s.p, **params))
    return A.Compose(ops, seed=seed)


def view_seed(seed: int, view_index: int, image_id: str) -> int:
    """A 31-bit seed from (seed, view index, image id): the same view of the same image is always identical."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{view_index}/{image_id}".encode()).digest()[:4], "little") >> 1


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, the exact inverse of ToTensor() and 2x - 1."""
    x = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return np.clip(np.rint((x.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1], as the official transform computes it."""
    return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div(255.0) * 2 - 1).numpy()


def apply_view(image: np.ndarray, label: np.ndarray, specs: list[TransformSpec], seed: int, view_index: int,
               image_id: str, ignore_label: int) -> tuple[np.ndarray, np.ndarray]:
    """Augment one (H, W, 3) uint8 image and its (H, W) uint8 label, deterministically."""
    transform = build_transform(specs, image.shape[0], ignore_label, view_seed(seed, view_index, image_id))
    out = transform(image=np.ascontiguousarray(image), mask=np.ascontiguousarray(label))
    return out["image"].astype(np.uint8), out["mask"].astype(np.uint8)


def undo_geometry(mask: np.ndarray, specs: list[TransformSpec]) -> np.ndarray:
    """Map a mask predicted on a test-time view back to the original image (flips only; p must be 1)."""
    for s in reversed(specs):
        if s.name == "HorizontalFlip":
            mask = mask[..., ::-1]
        elif TRANSFORMS[s.name][2]:
            raise ValueError(f"test-time view transform {s.name} cannot be undone; only HorizontalFlip can")
    return np.ascontiguousarray(mask)


def close_mask(mask: np.ndarray) -> np.ndarray:
    """Morphological closing (dilation then erosion) of a label map with a 3x3 cross, as
    cv2.morphologyEx(mask, MORPH_CLOSE, cross) does on the label ids (the study's post-processing)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel)

"""Segmentation scores: the official mIoU, a standard mIoU, per-class and per-image IoU, pixel accuracy.

All values are fractions in [0, 1] (NaN where undefined: nothing to score).

official (compute_iou of yandex-research/ddpm-segmentation): for every class id in range(number_class) except the
ignore label, intersection and union are summed over all images; IoU = I / (1e-8 + U); mIoU = plain mean. A class
absent from both ground truth and predictions counts as 0. Ground-truth pixels carrying the ignore label are NOT
masked: predicting class c there adds to c's union.

standard: ground-truth pixels with the ignore label are masked out (they count for no class); classes absent from
both ground truth and predictions (after masking) are skipped (None per class), mIoU = mean of the others.

Both come from one confusion matrix, accumulated image by image (ConfusionAccumulator).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

OFFICIAL_EPSILON = 1e-8


@dataclass
class Scores:
    """Scores of a set of predictions; fractions in [0, 1]. Per-class lists follow class_ids."""

    official_miou: float
    standard_miou: float
    per_class_official: list[float]
    per_class_standard: list[float | None]
    pixel_accuracy: float
    per_image_miou: list[float]  # standard mIoU of each image, in the order added; NaN when nothing to score
    class_ids: list[int] = field(default_factory=list)  # the scored class ids: range(number_class) minus ignore

    def to_dict(self) -> dict:
        """Plain JSON-ready dict; NaN becomes None."""
        def clean(value):
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, list):
                return [clean(item) for item in value]
            return value

        return {key: clean(value) for key, value in asdict(self).items()}


def scored_classes(number_class: int, ignore_label: int) -> list[int]:
    """Class ids scored by both metrics: range(number_class) without the ignore label."""
    return [c for c in range(number_class) if c != ignore_label]


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, number_class: int, ignore_label: int) -> np.ndarray:
    """Confusion counts of one image: (number_class + 1, number_class) int64, rows = ground truth, cols = prediction.

    Row g < number_class holds ground-truth class g (the ignore label included when it is a class id, e.g. 0);
    row number_class holds ground-truth pixels equal to an ignore label outside range(number_class) (e.g. 255).
    Raises on predictions outside range(number_class) and on ground-truth values that are neither a class id nor
    the ignore label.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    pred = pred.astype(np.int64).reshape(-1)
    gt = gt.astype(np.int64).reshape(-1)
    bad_pred = (pred < 0) | (pred >= number_class)
    if bad_pred.any():
        raise ValueError(f"prediction values {np.unique(pred[bad_pred])[:10].tolist()} are outside "
                         f"range({number_class})")
    rows = gt.copy()
    if not 0 <= ignore_label < number_class:
        rows[gt == ignore_label] = number_class
    bad_gt = (rows < 0) | (rows > number_class)
    if bad_gt.any():
        raise ValueError(f"ground-truth values {np.unique(gt[bad_gt])[:10].tolist()} are neither in "
                         f"range({number_class}) nor the ignore label {ignore_label}")
    counts = np.bincount(rows * number_class + pred, minlength=(number_class + 1) * number_class)
    return counts.reshape(number_class + 1, number_class).astype(np.int64)


def _ignore_row(number_class: int, ignore_label: int) -> int:
    return ignore_label if 0 <= ignore_label < number_class else number_class


def official_ious(matrix: np.ndarray, number_class: int, ignore_label: int) -> list[float]:
    """Official IoU per scored class from a confusion matrix: I / (1e-8 + U), ignore-label pixels not masked."""
    ious = []
    for c in scored_classes(number_class, ignore_label):
        intersection = int(matrix[c, c])
        union = int(matrix[c, :].sum()) + int(matrix[:, c].sum()) - intersection
        ious.append(intersection / (OFFICIAL_EPSILON + union))
    return ious


def standard_ious(matrix: np.ndarray, number_class: int, ignore_label: int) -> list[float | None]:
    """IoU per scored class with ignore-label ground truth masked out; None for a class absent from both."""
    masked = matrix.copy()
    masked[_ignore_row(number_class, ignore_label), :] = 0
    ious: list[float | None] = []
    for c in scored_classes(number_class, ignore_label):
        intersection = int(masked[c, c])
        union = int(masked[c, :].sum()) + int(masked[:, c].sum()) - intersection
        ious.append(intersection / union if union > 0 else None)
    return ious


def mean_of_present(ious: list[float | None]) -> float:
    """Mean of the non-None values; NaN when there is none."""
    present = [iou for iou in ious if iou is not None]
    return float(np.mean(present)) if present else math.nan


def pixel_accuracy(matrix: np.ndarray, number_class: int, ignore_label: int) -> float:
    """Correct / total over ground-truth pixels that do not carry the ignore label; NaN when there is none."""
    classes = scored_classes(number_class, ignore_label)
    total = int(matrix[classes, :].sum())
    correct = int(sum(int(matrix[c, c]) for c in classes))
    return correct / total if total > 0 else math.nan


class ConfusionAccumulator:
    """Streaming scorer: add(pred, gt) per image, then scores().

    matrix: (number_class + 1, number_class) int64 (see confusion_matrix), summed over images.
    """

    def __init__(self, number_class: int, ignore_label: int) -> None:
        if number_class < 1:
            raise ValueError(f"number_class must be >= 1, got {number_class}")
        self.number_class = number_class
        self.ignore_label = ignore_label
        self.matrix = np.zeros((number_class + 1, number_class), dtype=np.int64)
        self.per_image_miou: list[float] = []

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: pred and gt are integer arrays of the same shape (H, W)."""
        image_matrix = confusion_matrix(pred, gt, self.number_class, self.ignore_label)
        self.matrix += image_matrix
        self.per_image_miou.append(mean_of_present(standard_ious(image_matrix, self.number_class, self.ignore_label)))

    def scores(self) -> Scores:
        per_class_official = official_ious(self.matrix, self.number_class, self.ignore_label)
        per_class_standard = standard_ious(self.matrix, self.number_class, self.ignore_label)
        return Scores(
            official_miou=float(np.array(per_class_official).mean()) if per_class_official else math.nan,
            standard_miou=mean_of_present(per_class_standard),
            per_class_official=per_class_official,
            per_class_standard=per_class_standard,
            pixel_accuracy=pixel_accuracy(self.matrix, self.number_class, self.ignore_label),
            per_image_miou=list(self.per_image_miou),
            class_ids=scored_classes(self.number_class, self.ignore_label),
        )


def score(preds: list[np.ndarray], gts: list[np.ndarray], number_class: int, ignore_label: int) -> Scores:
    """Score predicted masks against ground-truth masks (lists of (H, W) integer arrays, same order)."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground-truth masks")
    accumulator = ConfusionAccumulator(number_class, ignore_label)
    for pred, gt in zip(preds, gts):
        accumulator.add(pred, gt)
    return accumulator.scores()

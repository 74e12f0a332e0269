"""Representation analysis numerics: index lists, object-size groups, k-means cluster maps, sweep tables.

No Prefect, no store: plain numpy / torch / scikit-learn on arrays, so flows/sweep.py (and a notebook) compose them.

- `parse_index_list("0-17")`, `parse_index_list("0,50,...,950")`: the `--blocks` / `--steps` syntax;
- `class_mean_areas` / `size_groups`: classes grouped by their mean area in the training set (mean pixel count per
  image where the class is present), small / large split at the median or a given threshold;
- `group_miou`: the mIoU of a group of classes from per-class IoUs (official or standard);
- `cluster_map`: MiniBatchKMeans on one block's native-resolution map, upsampled (nearest) to the image;
- `SweepCell`, `sweep_grid`, `write_sweep_csv`: the per-(block, step) bookkeeping of a sweep;
- `worst_images`, `error_map`, `display_image`, `colorize`: what an evaluation gallery needs.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "parse_index_list", "class_mean_areas", "SizeGroups", "size_groups", "group_miou", "cluster_map",
    "SweepCell", "sweep_grid", "write_sweep_csv", "SWEEP_CSV_COLUMNS", "worst_images", "error_map",
    "display_image", "colorize", "generic_palette",
]


# -- "0-17", "5,6,12", "0,50,...,950", "0-950:50" ------------------------------------------------------------------
_RANGE = re.compile(r"^(-?\d+)-(-?\d+)(?::(\d+))?$")


def parse_index_list(text: str) -> list[int]:
    """Integers from a comma-separated list whose items are numbers, inclusive ranges `a-b` (optionally with a
    stride, `a-b:s`) or an ellipsis continuing the last two numbers' stride up to the next one:
    "0-17" -> 0..17, "5,6,12" -> [5, 6, 12], "0,50,...,950" -> 0, 50, ..., 950, "0-950:50" -> the same.

    Duplicates are dropped (first occurrence kept); ValueError naming the bad item otherwise."""
    items = [s.strip() for s in str(text).split(",")]
    if not items or any(s == "" for s in items):
        raise ValueError(f"{text!r}: empty item; expected e.g. '0-17', '5,6,12' or '0,50,...,950'")
    out: list[int] = []
    i = 0
    while i < len(items):
        item = items[i]
        if item in ("...", "…"):
            if len(out) < 2 or i + 1 >= len(items) or not re.fullmatch(r"-?\d+", items[i + 1]):
                raise ValueError(f"{text!r}: '...' needs two numbers before it and one after it (e.g. 0,50,...,950)")
            stride, end = out[-1] - out[-2], int(items[i + 1])
            if stride <= 0 or end <= out[-1]:
                raise ValueError(f"{text!r}: '...' continues an increasing sequence; got {out[-2]}, {out[-1]}, "
                                 f"..., {end}")
            out.extend(range(out[-1] + stride, end + 1, stride))
            if out[-1] != end:
                out.append(end)
            i += 2
            continue
        m = _RANGE.match(item)
        if m:
            a, b, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
            if b < a or s < 1:
                raise ValueError(f"{text!r}: range {item!r} must be a-b with a <= b (and a stride >= 1)")
            out.extend(range(a, b + 1, s))
        elif re.fullmatch(r"-?\d+", item):
            out.append(int(item))
        else:
            raise ValueError(f"{text!r}: {item!r} is not a number, a range a-b or '...'")
        i += 1
    return list(dict.fromkeys(out))


# -- object size -------------------------------------------------------------------------------------------------
def class_mean_areas(labels: Sequence[np.ndarray], class_ids: Sequence[int]) -> dict[int, float]:
    """Mean area (pixels) of each class over the images where it is present: {class id: mean count}, NaN for a
    class present in no image. labels: (H, W) integer arrays (training labels)."""
    totals = {c: 0 for c in class_ids}
    present = {c: 0 for c in class_ids}
    for label in labels:
        counts = np.bincount(np.asarray(label, dtype=np.int64).reshape(-1), minlength=256)
        for c in class_ids:
            if counts[c] > 0:
                totals[c] += int(counts[c])
                present[c] += 1
    return {c: totals[c] / present[c] if present[c] else math.nan for c in class_ids}


@dataclass(frozen=True)
class SizeGroups:
    """Classes split by mean area: small = area <= threshold, large = area > threshold; absent = never present
    in the training labels (in neither group)."""

    threshold: float
    small: list[int]
    large: list[int]
    absent: list[int]
    mean_area: dict[int, float]
    rule: str  # "median" or "threshold"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_area"] = {str(c): (None if math.isnan(a) else a) for c, a in self.mean_area.items()}
        return d


def size_groups(mean_area: dict[int, float], threshold: float | None = None) -> SizeGroups:
    """Split classes at `threshold` pixels, or at the median of the present classes' mean areas when None."""
    present = {c: a for c, a in mean_area.items() if not math.isnan(a)}
    absent = sorted(c for c in mean_area if c not in present)
    if not present:
        raise ValueError("no class is present in the training labels: cannot group classes by size")
    rule = "threshold" if threshold is not None else "median"
    cut = float(threshold) if threshold is not None else float(np.median(list(present.values())))
    small = sorted(c for c, a in present.items() if a <= cut)
    large = sorted(c for c, a in present.items() if a > cut)
    return SizeGroups(cut, small, large, absent, dict(mean_area), rule)


def group_miou(per_class: Sequence[float | None], class_ids: Sequence[int], group: Sequence[int]) -> float:
    """Mean IoU over the classes of `group` (per_class follows class_ids); None entries (a standard IoU of a class
    absent from ground truth and prediction) are skipped. NaN when nothing is left."""
    index = {c: i for i, c in enumerate(class_ids)}
    values = [per_class[index[c]] for c in group if c in index and per_class[index[c]] is not None]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


# -- k-means cluster maps ----------------------------------------------------------------------------------------
def cluster_map(fmap: np.ndarray | torch.Tensor, k: int, seed: int, size: int, n_init: int = 3,
                batch_size: int = 1024) -> np.ndarray:
    """MiniBatchKMeans clusters of one block's map, upsampled (nearest) to the image: (size, size) int64 in [0, k).

    fmap: (C, h, w), any float dtype (upcast to float32); each of the h*w native-resolution positions is a sample
    of C features. Deterministic for a seed (random_state=seed, n_init fixed). Cluster ids are relabelled by
    decreasing size (ties: first occurrence in raster order), so colours mean the same across maps.
    """
    from sklearn.cluster import MiniBatchKMeans

    x = torch.as_tensor(np.asarray(fmap)).float()
    if x.ndim != 3:
        raise ValueError(f"cluster_map: expected a (C, h, w) map, got shape {tuple(x.shape)}")
    c, h, w = x.shape
    if h * w < k:
        raise ValueError(f"cluster_map: a {h}x{w} map has {h * w} positions, fewer than k={k} clusters")
    samples = x.reshape(c, h * w).T.contiguous().numpy()  # (h*w, C) float32
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=n_init, batch_size=batch_size)
    labels = km.fit_predict(samples)
    counts = np.bincount(labels, minlength=k)
    first = np.array([np.argmax(labels == j) if counts[j] else h * w for j in range(k)])
    order = sorted(range(k), key=lambda j: (-counts[j], first[j]))
    relabel = np.empty(k, dtype=np.int64)
    relabel[order] = np.arange(k)
    small = torch.from_numpy(relabel[labels].reshape(1, 1, h, w).astype(np.float32))
    return F.interpolate(small, size=(size, size), mode="nearest")[0, 0].numpy().astype(np.int64)


# -- sweep bookkeeping -------------------------------------------------------------------------------------------
from pipeline.presets import SWEEP_DEFAULT_EPOCHS, SWEEP_DEFAULT_MEMBERS  # noqa: E402,F401 - defined without torch


@dataclass
class SweepCell:
    """The score of one classifier trained on one decoder block at one timestep; mIoU values in percent."""

    block: int
    step: int
    miou: float  # official
    miou_standard: float
    per_class_official: list[float]
    per_class_standard: list[float | None]
    class_ids: list[int]
    train_key: str = ""
    group_miou: dict[str, float] = field(default_factory=dict)  # "small" / "large" / "standard_small" / ...

    def add_groups(self, groups: SizeGroups) -> "SweepCell":
        """Fill group_miou (percent) for the small and large groups, official and standard."""
        for name, classes in (("small", groups.small), ("large", groups.large)):
            self.group_miou[name] = 100 * group_miou(self.per_class_official, self.class_ids, classes)
            self.group_miou[f"standard_{name}"] = 100 * group_miou(self.per_class_standard, self.class_ids, classes)
        return self

    def row(self) -> dict:
        return {"block": self.block, "step": self.step, "miou": self.miou, "miou_standard": self.miou_standard,
                "miou_small": self.group_miou.get("small", math.nan),
                "miou_large": self.group_miou.get("large", math.nan),
                "miou_standard_small": self.group_miou.get("standard_small", math.nan),
                "miou_standard_large": self.group_miou.get("standard_large", math.nan),
                "train_key": self.train_key}


SWEEP_CSV_COLUMNS = ("block", "step", "miou", "miou_standard", "miou_small", "miou_large", "miou_standard_small",
                     "miou_standard_large", "train_key")


def sweep_grid(cells: Sequence[SweepCell], blocks: Sequence[int], steps: Sequence[int],
               value: str = "miou") -> np.ndarray:
    """(len(blocks), len(steps)) float64 of a cell value ("miou", "miou_standard", or a group name such as
    "small"); NaN where no cell. Rows follow `blocks`, columns follow `steps`."""
    grid = np.full((len(blocks), len(steps)), np.nan)
    bi = {b: i for i, b in enumerate(blocks)}
    si = {t: j for j, t in enumerate(steps)}
    for cell in cells:
        if cell.block in bi and cell.step in si:
            v = getattr(cell, value) if value in ("miou", "miou_standard") else cell.group_miou.get(value, math.nan)
            grid[bi[cell.block], si[cell.step]] = v
    return grid


def write_sweep_csv(path: str | Path, cells: Sequence[SweepCell]) -> Path:
    """One row per cell (columns SWEEP_CSV_COLUMNS; mIoU in percent, 4 decimals; empty where NaN)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_CSV_COLUMNS)
        writer.writeheader()
        for cell in cells:
            row = cell.row()
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                                 round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return path


# -- evaluation gallery helpers ----------------------------------------------------------------------------------
def worst_images(per_image_miou: Sequence[float | None], k: int) -> list[int]:
    """Indices of the k images with the lowest mIoU, ascending; images with nothing to score (None/NaN) last."""
    def key(i: int):
        v = per_image_miou[i]
        bad = v is None or (isinstance(v, float) and math.isnan(v))
        return (bad, 0.0 if bad else float(v), i)

    return sorted(range(len(per_image_miou)), key=key)[:max(0, k)]


ERROR_CORRECT, ERROR_WRONG, ERROR_IGNORED = 0, 1, 2


def error_map(pred: np.ndarray, gt: np.ndarray, ignore_label: int) -> np.ndarray:
    """(H, W) uint8: 0 correct, 1 wrong, 2 ground truth carries the ignore label."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"error_map: prediction shape {pred.shape} differs from ground truth {gt.shape}")
    out = (pred != gt).astype(np.uint8)
    out[gt == ignore_label] = ERROR_IGNORED
    return out


def display_image(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 for display from a model input (3, H, W) float in [-1, 1], or an (H, W, 3) uint8 image."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.dtype != np.uint8:
        return np.clip((a.astype(np.float32).transpose(1, 2, 0) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 3:
        return a.astype(np.uint8)
    if a.ndim == 2:
        return np.repeat(a.astype(np.uint8)[..., None], 3, axis=2)
    raise ValueError(f"display_image: expected (3, H, W) in [-1, 1] or (H, W, 3) uint8, got shape {a.shape}")


def generic_palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct colours (tab20, then seeded random ones) for classes without a palette."""
    import matplotlib

    base = [tuple(int(255 * v) for v in matplotlib.colormaps["tab20"](i)[:3]) for i in range(20)]
    rng = np.random.default_rng(0)
    extra = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(max(0, n - 20))]
    return (base + extra)[:n]


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]] | None, ignore_label: int | None = None,
             ignore_colour: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """(H, W, 3) uint8 colours of a label mask (H, W): palette[c] for class c, ignore_colour for the ignore label,
    a generic palette when none is given."""
    mask = np.asarray(mask, dtype=np.int64)
    n = int(mask.max()) + 1 if mask.size else 1
    pal = list(palette) if palette else generic_palette(max(n, 1))
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:len(pal)] = np.asarray(pal, dtype=np.uint8)[:256]
    if ignore_label is not None and 0 <= ignore_label < 256:
        table[ignore_label] = ignore_colour
    return table[np.clip(mask, 0, 255)]

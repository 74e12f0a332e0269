"""Figure 2: bytes on disk per image and timestep in the store vs the upsampled float32 features of the official
path (size² x channels-per-step x 4 bytes).

Two measurements, labelled apart:
- `synthetic`: the synthetic store at the real geometry (N(0, 1) values: random mantissas compress poorly, so
  this is close to the uncompressed float16 size, a pessimistic bound);
- `realistic`: a store written by the real extraction stage from real UNet forwards (the CPU-sized UNet of the
  extraction benchmark, on generated images). Its compressed bytes per stored value, applied to the real
  geometry's 8,388,608 values per image and step, give the real-geometry ratio for activations of that kind; the
  store's own ratio at its own geometry is reported beside it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import dir_bytes
from benchmarks.geometry import Geometry


def feature_bytes(store_dir: Path, unit_paths: list[str], image_ids: list[str]) -> int:
    """Bytes on disk of these images' features (chunks + array metadata) in these units."""
    return sum(dir_bytes(Path(store_dir) / unit / image_id) for unit in unit_paths for image_id in image_ids)


def store_size(store_dir: Path, unit_paths: list[str], image_ids: list[str], geometry: Geometry,
               real: Geometry) -> dict[str, Any]:
    """Per image and step: stored bytes, bytes per value, the ratio to the upsampled float32 features at the
    store's own geometry, and that bytes-per-value carried to the `real` geometry."""
    total = feature_bytes(store_dir, unit_paths, image_ids)
    per_image_step = total / (len(unit_paths) * len(image_ids))
    bytes_per_value = per_image_step / geometry.values_per_step
    return {
        "geometry": geometry.name,
        "images": len(image_ids), "steps": len(unit_paths),
        "store_bytes_per_image_step": per_image_step,
        "bytes_per_value": bytes_per_value,
        "uncompressed_fp16_bytes_per_image_step": geometry.values_per_step * 2,
        "upsampled_fp32_bytes_per_image_step": geometry.upsampled_fp32_bytes_per_step,
        "ratio_own_geometry": per_image_step / geometry.upsampled_fp32_bytes_per_step,
        "ratio_at_real_geometry": bytes_per_value * real.values_per_step / real.upsampled_fp32_bytes_per_step,
    }

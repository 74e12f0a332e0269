"""Per-pixel features from native-resolution block activations.

The maps of one image come as a list of tensors in the official channel order (for t in steps, for block in
blocks ascending), each ``(C_i, h_i, w_i)`` float16 or float32. A pixel's feature vector is the
concatenation over maps of the map bilinearly upsampled to ``(size, size)`` with
``F.interpolate(mode="bilinear", align_corners=False)`` and read at that pixel: ``D = sum(C_i)`` values.

``upsample_concat`` is the official computation (whole maps); ``sample_pixel_features`` gives the same
values for chosen pixels only, without materialising the upsampled maps (``D x size x size`` float32 is
2.2 GB for the official 256x256 setting with 3 steps). ``MapTables`` hold the maps of several images (a training
buffer) so that ``sample_tables`` samples pixels of any of them in one pass per map, bit for bit the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["upsample_concat", "sampling_maps", "sample_pixel_features", "feature_dim", "image_features",
           "MapTables", "map_tables", "load_maps", "sample_tables"]


def _check_pixels(ys: torch.Tensor, xs: torch.Tensor, size: int) -> None:
    if ys.ndim != 1 or xs.ndim != 1 or ys.shape != xs.shape:
        raise ValueError(f"ys and xs must be 1-D of equal length, got {tuple(ys.shape)} and {tuple(xs.shape)}")
    if ys.is_floating_point() or xs.is_floating_point():
        raise ValueError("ys and xs must be integer pixel indices")
    if ys.numel() and (int(ys.min()) < 0 or int(ys.max()) >= size or int(xs.min()) < 0 or int(xs.max()) >= size):
        raise ValueError(f"pixel coordinates must lie in [0, {size})")


def _check_maps(maps: list[torch.Tensor]) -> None:
    if len(maps) == 0:
        raise ValueError("no feature maps given: expected a list of (C, h, w) tensors")
    for index, fmap in enumerate(maps):
        if fmap.ndim != 3:
            raise ValueError(f"feature map {index} must have shape (C, h, w), got {tuple(fmap.shape)}")


def feature_dim(channels: list[int]) -> int:
    """Length of a pixel's feature vector for maps with these channel counts: ``sum(channels)``."""
    return int(sum(channels))


def upsample_concat(maps: list[torch.Tensor], size: int) -> torch.Tensor:
    """``(D, size, size)`` float32: every map upcast to float32, bilinearly interpolated to
    ``(size, size)`` (align_corners=False), concatenated along channels — the official computation."""
    _check_maps(maps)
    resized = [
        F.interpolate(fmap.float()[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        for fmap in maps
    ]
    return torch.cat(resized, dim=0)


def image_features(maps: list[torch.Tensor], size: int) -> torch.Tensor:
    """``(D, size, size)`` float32 features of every pixel of one image (for evaluation)."""
    return upsample_concat(maps, size)


def _source_index(dst: torch.Tensor, in_size: int, out_size: int):
    """Bilinear source neighbours and weights of output coordinates ``dst`` (N,) along one axis.

    Same rule as ``F.interpolate(mode="bilinear", align_corners=False)`` given an output size:
    ``src = (dst + 0.5) * in / out - 0.5`` clamped at 0; ``i0 = floor(src)``; ``i1 = min(i0 + 1, in - 1)``;
    weights ``(1 - (src - i0), src - i0)``. Returns (i0, i1, w0, w1), indices long, weights float32.
    """
    scale = in_size / out_size
    src = ((dst.to(torch.float32) + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().to(torch.long).clamp_max(in_size - 1)
    i1 = torch.clamp(i0 + 1, max=in_size - 1)
    w1 = src - i0.to(torch.float32)
    w0 = 1.0 - w1
    return i0, i1, w0, w1


def sampling_maps(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """The maps as float32 ``(C, h, w)`` views of channels-last storage (exact upcast, same values).

    ``sample_pixel_features`` reads maps in this layout without a copy: each bilinear neighbour is one
    contiguous row of C float32 values. Convert once per image when the same maps are sampled many times
    (a training buffer, an evaluated image): 2x the float16 memory, no per-call work. All maps share one
    allocation (100 MB at the paper's geometry): glibc maps a buffer that large on its own and returns it to
    the OS when freed, where per-block buffers of a few MB would fragment its heap as images come and go.
    """
    _check_maps(maps)
    storage = torch.empty(sum(m.numel() for m in maps), dtype=torch.float32, device=maps[0].device)
    views, offset = [], 0
    for fmap in maps:
        channels, height, width = fmap.shape
        rows = storage[offset:offset + fmap.numel()].view(height, width, channels)
        rows.copy_(fmap.permute(1, 2, 0))
        views.append(rows.permute(2, 0, 1))
        offset += fmap.numel()
    return views


def sample_pixel_features(
    maps: list[torch.Tensor], ys: torch.Tensor, xs: torch.Tensor, size: int
) -> torch.Tensor:
    """``(N, D)`` float32 features of the pixels ``(ys[i], xs[i])`` of a ``size x size`` image.

    Each map ``(C, h, w)`` is sampled bilinearly at the exact source coordinates ``F.interpolate``
    (bilinear, align_corners=False) uses for those output pixels: the four neighbours, upcast to float32,
    weighted and summed in one fused op (``F.embedding_bag``). Equals ``upsample_concat(maps, size)[:, ys, xs].T``
    (to float32 rounding) without building the upsampled maps. ys, xs: (N,) integer tensors in [0, size).
    Maps from ``sampling_maps`` are read in place; any other layout or dtype is converted per call.
    """
    _check_maps(maps)
    _check_pixels(ys, xs, size)
    result = torch.empty((ys.numel(), sum(int(m.shape[0]) for m in maps)), dtype=torch.float32,
                         device=maps[0].device)
    offset = 0
    for fmap in maps:
        channels, height, width = fmap.shape
        # (h*w, C): a view for sampling_maps' layout, else one copy
        rows = fmap.permute(1, 2, 0).reshape(height * width, channels).to(torch.float32)
        result[:, offset:offset + channels] = _bilinear_rows(rows, height, width, None, ys.to(fmap.device),
                                                             xs.to(fmap.device), size)
        offset += channels
    return result


def _bilinear_rows(rows: torch.Tensor, height: int, width: int, first_row: torch.Tensor | None,
                   ys: torch.Tensor, xs: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C)`` float32: pixel i of a ``size x size`` image sampled bilinearly from the ``(height, width)``
    map whose row-major pixels are ``rows[first_row[i] : first_row[i] + height * width]`` (``rows``:
    ``(R, C)`` float32, one row of C values per map pixel; first_row None: 0). The four neighbours, weighted
    and summed in the order a, b, c, d in one fused op (``F.embedding_bag``)."""
    y0, y1, wy0, wy1 = _source_index(ys, height, size)
    x0, x1, wx0, wx1 = _source_index(xs, width, size)
    neighbours = torch.stack([y0 * width + x0, y0 * width + x1, y1 * width + x0, y1 * width + x1], 1)
    if first_row is not None:
        neighbours += first_row[:, None]
    weights = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], 1)
    return F.embedding_bag(neighbours, rows, per_sample_weights=weights, mode="sum")


@dataclass
class MapTables:
    """The maps of up to ``slots`` images, one float32 table per map: map i of the image in slot s is rows
    ``[s * h_i * w_i, (s + 1) * h_i * w_i)`` of ``tables[i]`` (``(slots * h_i * w_i, C_i)``, channels last).

    Training samples the pixels of a slice, which mixes the images of a buffer, with one fused op per map over
    all of them (``sample_tables``), in slice order: no per-image pieces to scatter afterwards. Allocated once
    and reused for every buffer (no allocation per image: glibc returns nothing to fragment)."""

    shapes: list[tuple[int, int, int]]  # (C, h, w) of each map
    tables: list[torch.Tensor]

    @property
    def slots(self) -> int:
        channels, height, width = self.shapes[0]
        return self.tables[0].shape[0] // (height * width)

    @property
    def dim(self) -> int:
        return feature_dim([c for c, _, _ in self.shapes])


def map_tables(shapes: list[tuple[int, int, int]], slots: int, device: str | torch.device = "cpu") -> MapTables:
    """Empty tables for ``slots`` images whose maps have these ``(C, h, w)`` shapes (official order), on
    ``device`` (where ``sample_tables`` then samples)."""
    if slots < 1 or not shapes:
        raise ValueError(f"map_tables needs slots >= 1 and at least one map shape, got slots={slots}, "
                         f"shapes={shapes}")
    return MapTables([tuple(int(v) for v in s) for s in shapes],
                     [torch.empty((slots * h * w, c), dtype=torch.float32, device=device) for c, h, w in shapes])


def load_maps(tables: MapTables, slot: int, maps: list[torch.Tensor]) -> None:
    """Copy one image's maps (``(C, h, w)`` each, any float dtype, the tables' shapes) into ``slot``: exact
    upcast to float32, channels last. Maps on another device than the tables are copied there as they are
    (float16 from the store: half the transfer of float32) and upcast there."""
    _check_maps(maps)
    if not 0 <= slot < tables.slots:
        raise ValueError(f"slot {slot} out of range: the tables hold {tables.slots} images")
    if [tuple(m.shape) for m in maps] != tables.shapes:
        raise ValueError(f"maps of shapes {[tuple(m.shape) for m in maps]} do not match the tables' "
                         f"{tables.shapes}")
    for table, fmap, (channels, height, width) in zip(tables.tables, maps, tables.shapes):
        rows = table[slot * height * width:(slot + 1) * height * width]
        # upcast first (a contiguous, vectorised pass), then one 2-D transposing copy: 2-4x faster on a CPU than
        # a transposing copy that converts float16 element by element; the same float32 values
        upcast = fmap.to(table.device, non_blocking=True).reshape(channels, height * width).to(torch.float32)
        rows.copy_(upcast.T)


def sample_tables(tables: MapTables, slots: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                  size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, D)`` float32 features of pixel ``(ys[i], xs[i])`` of the ``size x size`` image in slot
    ``slots[i]``: for each pixel exactly ``sample_pixel_features`` of that image's maps (bit for bit).
    slots, ys, xs: (N,) int64. out: a float32 ``(>= N, D)`` buffer to fill and return the first N rows of
    (a reused buffer spares the page faults of a fresh 138 MB allocation per 4096 pixels at D = 8448).
    Runs on the tables' device (slots, ys, xs are moved there); out must be on it too."""
    _check_pixels(ys, xs, size)
    device = tables.tables[0].device
    slots, ys, xs = slots.to(device), ys.to(device), xs.to(device)
    if slots.shape != ys.shape:
        raise ValueError(f"slots must have the shape of ys and xs {tuple(ys.shape)}, got {tuple(slots.shape)}")
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= tables.slots):
        raise ValueError(f"slots must lie in [0, {tables.slots})")
    if out is None:
        result = torch.empty((ys.numel(), tables.dim), dtype=torch.float32, device=device)
    elif (out.device != device or out.dtype != torch.float32 or out.ndim != 2 or out.shape[0] < ys.numel()
          or out.shape[1] != tables.dim):
        raise ValueError(f"out must be float32 of shape (>= {ys.numel()}, {tables.dim}) on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    else:
        result = out[:ys.numel()]
    offset = 0
    for table, (channels, height, width) in zip(tables.tables, tables.shapes):
        result[:, offset:offset + channels] = _bilinear_rows(table, height, width, slots * (height * width),
                                                             ys, xs, size)
        offset += channels
    return result


"""The feature store: zarr v3, native-resolution decoder activations, write-once and commit-last.

Layout (a plain zarr v3 hierarchy; open any array with `zarr.open_group(root)[path]`):

    <root>/
      views/<view>/<image_id>/input      (3, H, W) float32   the exact model input, in [-1, 1]
      views/<view>/<image_id>/label-<hash> (H, W) uint8     its label (after the view's transform)
      features/<backbone>/<view>/t<TTTT>-<spec>/<image_id>/b<BB>
                                         (1, C, h, w) float16  dims (image, channel, y, x)
      models/<train key>/member_<MM>.pt + .json               (storage.artifacts)
      evaluations/<evaluate key>/masks   (N, H, W) uint8       (storage.artifacts)
      stages/<stage>/<key>.json                                 committed stage records with their inputs

`<image_id>` is a content hash of the image (storage.keys), so rows are addressed by content: adding an image
adds a row, nothing else moves. Every array is one chunk, compressed with zstd and checked with crc32c;
every chunk is written even when it equals the fill value, so a lost chunk is detected, never read as plausible
zeros (float arrays: the NaN fill value shows it; integer arrays: the chunk count). An array counts only once its
`committed` attribute is set, which happens after its data is written (commit-last): a killed writer leaves
an uncommitted array that is simply rewritten by the next run; two writers of the same array write the same
bytes (same inputs, same content) and both commit.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Iterator

import dask
import dask.array as da
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.errors import ContainsArrayError, ContainsGroupError

from storage.location import StoreAccessError, StoreLocation, is_transient, with_retries

FEATURE_DTYPE = np.float16


class StoreError(RuntimeError):
    """A store that does not hold what a stage needs (missing, uncommitted or corrupted data)."""


class CorruptChunkError(StoreError):
    """A chunk whose checksum does not match, or a committed chunk that is missing."""


@dataclass(frozen=True)
class UnitSpec:
    """One extraction unit: backbone x view x timestep x (noise, activation) spec; rows are images."""

    backbone: str  # readable backbone tag incl. a short key, e.g. "ffhq-3fa2c1d09e4b"
    view: str  # e.g. "base"
    t: int
    spec: str  # short hash of the noise + activation spec

    @property
    def path(self) -> str:
        return f"features/{self.backbone}/{self.view}/t{self.t:04d}-{self.spec}"


def _compressors() -> list:
    return [ZstdCodec(level=3), Crc32cCodec()]


class FeatureStore:
    """Read and write views and native-resolution features of one store root."""

    def __init__(self, location: StoreLocation | str, read_only: bool = False):
        self.location = location if isinstance(location, StoreLocation) else StoreLocation.parse(location)
        if read_only and not self.location.read_only:
            self.location = dataclasses.replace(self.location, read_only=True)
        self.read_only = self.location.read_only
        self._root: zarr.Group | None = None

    @property
    def root(self) -> zarr.Group:
        if self._root is None:
            def open_root() -> zarr.Group:
                store = self.location.zarr_store(read_only=self.read_only)
                mode = "r" if self.read_only else "a"
                root = zarr.open_group(store=store, mode=mode, zarr_format=3)
                if not self.read_only and "ddpmseg" not in root.attrs:
                    root.attrs["ddpmseg"] = {"layout": 1}
                return root

            self._root = with_retries(open_root, f"open the store {self.location.url}")
        return self._root

    # -- generic write-once arrays ----------------------------------------------------------------------------
    def _group(self, path: str) -> zarr.Group:
        try:
            return self.root.require_group(path)
        except ContainsGroupError:  # created concurrently by another writer
            return self.root[path]

    def _write_array(self, path: str, data: np.ndarray, dims: tuple[str, ...], attrs: dict[str, Any]) -> None:
        """Create (or reuse) an array, write all its data, then mark it committed (last).

        A dropped connection is retried a bounded number of times, then is a StoreAccessError; in every case
        the array is committed only after its data is complete."""
        self.location.check_writable(self.location.path(path))
        with_retries(lambda: self._write_array_once(path, data, dims, attrs), f"write {self.location.path(path)}")

    def _write_array_once(self, path: str, data: np.ndarray, dims: tuple[str, ...], attrs: dict[str, Any]) -> None:
        parent, name = path.rsplit("/", 1)
        group = self._group(parent)
        fill = np.nan if np.issubdtype(data.dtype, np.floating) else 0
        config = {"write_empty_chunks": True}  # a chunk equal to the fill value is stored too: none may go missing
        try:
            arr = group.create_array(name, shape=data.shape, chunks=data.shape, dtype=data.dtype,
                                     compressors=_compressors(), fill_value=fill, dimension_names=dims,
                                     attributes={**attrs, "committed": None}, config=config)
        except (ContainsArrayError, ContainsGroupError):
            arr = group[name]
            if arr.shape != data.shape or arr.dtype != data.dtype:  # stale/torn metadata from an older writer
                arr = group.create_array(name, shape=data.shape, chunks=data.shape, dtype=data.dtype,
                                         compressors=_compressors(), fill_value=fill, dimension_names=dims,
                                         attributes={**attrs, "committed": None}, overwrite=True,
                                         config=config)
            else:
                arr = arr.with_config(config)
        arr[...] = data
        arr.attrs.update({**attrs, "committed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def _committed_array(self, path: str) -> zarr.Array | None:
        try:
            arr = self.root[path]
        except (KeyError, FileNotFoundError):
            return None
        except Exception as err:  # noqa: BLE001
            if is_transient(err):
                raise StoreAccessError(f"cannot read {self.location.path(path)}: {err}") from err
            raise
        if not isinstance(arr, zarr.Array) or not arr.attrs.get("committed"):
            return None
        return arr

    def _read(self, arr: zarr.Array, what: str) -> np.ndarray:
        try:
            data = arr[...]
        except Exception as err:  # noqa: BLE001 - zarr raises a plain RuntimeError on checksum mismatch
            if is_transient(err):
                raise StoreAccessError(f"{what}: cannot read from {self.location.url}: {err}") from err
            raise CorruptChunkError(f"{what}: chunk cannot be read ({err}); run `ddpmseg store verify "
                                    f"{self.location.url}` to find and repair corrupted units") from err
        if np.issubdtype(data.dtype, np.floating):
            missing = bool(np.isnan(data).any())  # the fill value: cheaper than listing the chunks
        else:  # integer arrays (labels, masks) would read a lost chunk as plausible zeros: count the chunks
            missing = arr.nchunks_initialized < arr.nchunks
        if missing:
            raise CorruptChunkError(f"{what}: committed but its chunk is missing or holds NaN; run "
                                    f"`ddpmseg store verify {self.location.url}`")
        return data

    # -- views: the exact model inputs and labels ---------------------------------------------------------------
    def view_committed(self, view: str, image_id: str, label_hash: str) -> bool:
        base = f"views/{view}/{image_id}"
        return (self._committed_array(f"{base}/input") is not None
                and self._committed_array(f"{base}/label-{label_hash}") is not None)

    def write_view(self, view: str, image_id: str, image: np.ndarray, label: np.ndarray, label_hash: str,
                   attrs: dict[str, Any]) -> None:
        """image (3, H, W) float32 in [-1, 1]; label (H, W) uint8, stored under its hash (an image may carry
        different labels in different splits or after a relabelling)."""
        base = f"views/{view}/{image_id}"
        if self._committed_array(f"{base}/input") is None:
            self._write_array(f"{base}/input", np.asarray(image, np.float32), ("channel", "y", "x"), attrs)
        self._write_array(f"{base}/label-{label_hash}", np.asarray(label, np.uint8), ("y", "x"), attrs)

    def read_view_input(self, view: str, image_id: str) -> np.ndarray:
        return self._read(self._require(f"views/{view}/{image_id}/input"), f"view {view} image {image_id} input")

    def read_view_label(self, view: str, image_id: str, label_hash: str) -> np.ndarray:
        return self._read(self._require(f"views/{view}/{image_id}/label-{label_hash}"),
                          f"view {view} image {image_id} label {label_hash}")

    def _require(self, path: str) -> zarr.Array:
        arr = self._committed_array(path)
        if arr is None:
            raise StoreError(f"{self.location.path(path)}: not in the store or not committed "
                             f"(run the extract stage first)")
        return arr

    # -- features ----------------------------------------------------------------------------------------------
    def ensure_unit(self, unit: UnitSpec, provenance: dict[str, Any]) -> None:
        group = self._group(unit.path)
        if "provenance" not in group.attrs:
            group.attrs.update({"provenance": provenance, "t": unit.t})

    def committed_blocks(self, unit: UnitSpec, image_id: str) -> set[int]:
        try:
            group = self.root[f"{unit.path}/{image_id}"]
        except (KeyError, FileNotFoundError):
            return set()
        except Exception as err:  # noqa: BLE001
            if is_transient(err):
                raise StoreAccessError(f"cannot read {self.location.path(unit.path)}: {err}") from err
            raise
        return {int(name[1:]) for name, arr in group.arrays() if arr.attrs.get("committed")}

    def write_features(self, unit: UnitSpec, image_id: str, maps: dict[int, np.ndarray]) -> int:
        """Write one image's block maps {block: (C, h, w)} as float16; returns bytes written (uncompressed)."""
        nbytes = 0
        for block, fmap in sorted(maps.items()):
            data = np.asarray(fmap, dtype=np.float32)
            with np.errstate(over="ignore"):
                half = data.astype(FEATURE_DTYPE)[None]
            if not np.isfinite(half).all():  # checked after the cast: |x| > 65504 becomes inf in float16
                bad = "not finite" if not np.isfinite(data).all() else "beyond the float16 range (|x| > 65504)"
                raise StoreError(f"{unit.path} image {image_id} block {block}: activations are {bad} "
                                 f"(fp16 overflow in the UNet or a broken checkpoint?)")
            self._write_array(f"{unit.path}/{image_id}/b{block:02d}", half, ("image", "channel", "y", "x"),
                              {"block": block, "t": unit.t})
            nbytes += half.nbytes
        return nbytes

    def feature_arrays(self, unit: UnitSpec, image_id: str, blocks: list[int]) -> list[da.Array]:
        """Lazy dask arrays (C, h, w) float16 of an image's blocks, in the given order."""
        out = []
        for b in blocks:
            path = f"{unit.path}/{image_id}/b{b:02d}"
            arr = self._committed_array(path)
            if arr is None:
                raise StoreError(f"{self.location.path(path)}: features not in the store (run extract first)")
            out.append(da.from_array(arr, chunks=arr.shape, asarray=True, name=f"{path}-{arr.attrs['committed']}")[0])
        return out

    def read_maps(self, units: list[UnitSpec], image_id: str, blocks: list[int]) -> list[np.ndarray]:
        """One image's maps in the official order (for unit/t in units, for block in blocks), float16.

        Reads through dask (one task per chunk, in parallel); a corrupted chunk raises CorruptChunkError
        naming the unit, image and block.
        """
        lazy = [(u, b, a) for u in units for b, a in zip(blocks, self.feature_arrays(u, image_id, blocks))]
        try:
            values = dask.compute(*[a for _, _, a in lazy], scheduler="threads")
        except Exception as err:  # noqa: BLE001
            for u, b, _ in lazy:  # find which one, to name it
                path = f"{u.path}/{image_id}/b{b:02d}"
                self._read(self.root[path], f"unit {u.path} image {image_id} block {b}")
            raise CorruptChunkError(f"image {image_id}: {err}") from err
        for (u, b, _), v in zip(lazy, values):
            if np.isnan(v).any():
                raise CorruptChunkError(f"unit {u.path} image {image_id} block {b}: committed but its chunk is "
                                        f"missing; run `ddpmseg store verify {self.location.url}`")
        return list(values)

    # -- listing and checking ------------------------------------------------------------------------------------
    def iter_units(self) -> Iterator[tuple[str, zarr.Group]]:
        """(path, group) of every extraction unit in the store."""
        if "features" not in self.root:
            return
        for bname, bgroup in self.root["features"].groups():
            for vname, vgroup in bgroup.groups():
                for uname, ugroup in vgroup.groups():
                    yield f"features/{bname}/{vname}/{uname}", ugroup

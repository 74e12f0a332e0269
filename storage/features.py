"""The feature store: zarr v3, native-resolution decoder activations, write-once and commit-last.

Layout (a plain zarr v3 hierarchy; open any array with `zarr.open_group(root)[path]`):

    <root>/
      views/<view>/<image_id>/input      (3, H, W) float32   the exact model input, in [-1, 1]; its attributes
                                                              name the image: stem (file name) and split
      views/<view>/<image_id>/label-<hash> (H, W) uint8     its label (after the view's transform)
      features/<backbone>/<view>/t<TTTT>-<spec>/<image_id>/b<BB>
                                         (1, C, h, w) float16  dims (image, channel_bBB, y_bBB, x_bBB)
      models/<members key>/member_<MM>   (n,) uint8            a classifier member's bytes (storage.artifacts)
      evaluations/<evaluate key>/masks   (N, H, W) uint8       (storage.artifacts)
      evaluations/<evaluate key>/metrics                       group: the metrics in its attributes
      stages/<stage>/<key>                                     group: a committed stage record with its inputs

`<image_id>` is a content hash of the image (storage.keys), so rows are addressed by content: adding an image
adds a row, nothing else moves. Every array is one chunk (the file `c.0.0...` beside its zarr.json), compressed
with zstd and checked with crc32c; every chunk is written even when it equals the fill value, so a lost chunk is
detected, never read as plausible zeros (float arrays: the NaN fill value shows it; integer arrays: the chunk
count). An array counts only once its `committed` attribute is set. Writers store every chunk of a call first
and the arrays' metadata documents, which carry `committed`, last (commit-last): a killed writer leaves chunk
files without metadata (or, from older versions, an array whose `committed` is null), which is simply rewritten by
the next run; two writers of the same array write the same bytes (same inputs, same content) and both commit.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import struct
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import MemoryStore, StorePath
from zarr.errors import ContainsGroupError

from storage.zarr_internals import (ZARR_JSON, ArrayV3Metadata, Buffer, GroupMetadata, SupportsSetSync,
                                    default_buffer_prototype, zarr_sync)
from storage.location import (CorruptObjectError, StoreAccessError, StoreLocation, corrupt_object_message,
                              is_transient, with_retries)

if TYPE_CHECKING:  # dask and torch are imported where features are read lazily or written
    import dask.array as da

FEATURE_DTYPE = np.float16
# An array's one chunk is the file `c.0.0.0.0` beside its zarr.json, not `c/0/0/0/0` (four directories per array).
# Readers follow each array's metadata: stores written with the default encoding read the same.
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}

# A writer killed between its chunks and its commit leaves a directory without zarr.json (see _write_arrays):
# not an array, as intended; zarr warns about it on every listing of the image's group.
warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component of a Zarr hierarchy")


def block_dims(block: int) -> tuple[str, str, str, str]:
    """Dimension names of a block's array: per block, because blocks differ in channels and size and xarray
    requires one size per dimension name in a group (`xr.open_zarr` on an image's group). Stores written before
    named every block (image, channel, y, x); readers here go by position, so both read the same."""
    return ("image", f"channel_b{block:02d}", f"y_b{block:02d}", f"x_b{block:02d}")


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


ZSTD_LEVEL = 3


def _compressors() -> list:
    return [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]


_METADATA: dict[tuple[tuple[int, ...], str, tuple[str, ...]], tuple[ArrayV3Metadata, dict[str, Any]]] = {}


def _array_metadata(shape: tuple[int, ...], dtype: np.dtype,
                    dims: tuple[str, ...]) -> tuple[ArrayV3Metadata, dict[str, Any]]:
    """The metadata of a one-chunk array (our codecs; fill NaN for floats, 0 for integers) and its zarr.json
    document as a dict, made by zarr itself once per (shape, dtype, dims) in memory and reused: per array, only
    the attributes differ."""
    key = (tuple(shape), np.dtype(dtype).str, tuple(dims))
    if key not in _METADATA:
        fill = np.nan if np.issubdtype(dtype, np.floating) else 0
        meta = zarr.create_array(MemoryStore(), shape=shape, chunks=shape, dtype=dtype, compressors=_compressors(),
                                 fill_value=fill, dimension_names=dims,
                                 chunk_key_encoding=CHUNK_KEY_ENCODING).metadata
        document = json.loads(meta.to_buffer_dict(default_buffer_prototype())[ZARR_JSON].to_bytes())
        _METADATA[key] = meta, document
    return _METADATA[key]


def to_float16(values: Any, what: str) -> np.ndarray:
    """Activations (numpy or torch on any device, any float dtype, any shape) as float16 numpy, as stored (a
    device tensor is checked and cast on its device, then copied to the host as float16): rounded to nearest
    even exactly like numpy's astype, with torch's vectorised cast (~30x faster). StoreError naming `what` when a
    value is not finite or beyond the float16 range (|x| > 65504 rounds to inf from 65520).

    Float16 input is only checked (an integer test of the exponent bits, no float conversion)."""
    import torch  # imported here: reading and listing a store need no torch (`ddpmseg status`, `store ls`)

    if isinstance(values, np.ndarray) and values.dtype == np.float16 or (
            isinstance(values, torch.Tensor) and values.dtype == torch.float16):
        half = values if isinstance(values, np.ndarray) else values.detach().cpu().numpy()
        if half.size and int((half.view(np.uint16) & 0x7FFF).max()) >= 0x7C00:  # exponent all ones: inf / NaN
            raise StoreError(f"{what}: activations are not finite (fp16 overflow in the UNet or a broken "
                             f"checkpoint?)")
        return half
    tensor = torch.as_tensor(values).detach()  # a GPU tensor is checked and cast there: half the copy to the host
    tensor = tensor if tensor.dtype == torch.float32 else tensor.float()
    lo, hi = torch.aminmax(tensor) if tensor.numel() else (torch.tensor(0.0), torch.tensor(0.0))
    bad = None
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):  # NaN propagates into both
        bad = "not finite"
    half = tensor.to(torch.float16)
    if bad is None and max(-float(lo), float(hi)) > 65504 and not bool(torch.isfinite(half).all()):
        bad = "beyond the float16 range (|x| > 65504)"
    if bad:
        raise StoreError(f"{what}: activations are {bad} (fp16 overflow in the UNet or a broken checkpoint?)")
    return half.cpu().numpy()


_ZSTD = numcodecs.Zstd(level=ZSTD_LEVEL)  # what zarr's ZstdCodec(level=3) runs (checksum off)
_PROTOTYPE = default_buffer_prototype()
_GROUP_DOCUMENT = GroupMetadata(zarr_format=3).to_buffer_dict(_PROTOTYPE)


def _chunk_bytes(data: np.ndarray) -> bytes:
    """The stored chunk of a one-chunk array with our codecs: little-endian bytes -> zstd -> crc32c of the
    compressed bytes appended (uint32, little-endian). The bytes zarr's own pipeline writes (tested), without its
    per-call indexing and event-loop machinery (~10 ms per image of 5 blocks)."""
    raw = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
    packed = _ZSTD.encode(raw)
    return packed + struct.pack("<I", google_crc32c.value(packed))


def _array_documents(path: str, data: np.ndarray, dims: tuple[str, ...], attrs: dict[str, Any],
                     stamp: str) -> tuple[list[tuple[str, Buffer]], list[tuple[str, Buffer]]]:
    """(chunk documents, metadata documents) of the one-chunk array at `path` (relative to the store root),
    its metadata carrying committed=stamp."""
    meta, document = _array_metadata(data.shape, data.dtype, dims)
    chunk_key = meta.encode_chunk_key((0,) * data.ndim)
    chunks = [(f"{path}/{chunk_key}", _PROTOTYPE.buffer.from_bytes(_chunk_bytes(data)))]
    committed = {**document, "attributes": {**attrs, "committed": stamp}}
    metadata = json.dumps(committed, indent=2, allow_nan=False).encode()
    return chunks, [(f"{path}/{ZARR_JSON}", _PROTOTYPE.buffer.from_bytes(metadata))]


def _store_documents(root: StorePath, documents: list[tuple[str, Buffer]]) -> None:
    """Store each (key below root, bytes): one by one through a store's synchronous API (LocalStore: no event
    loop round trip), else concurrently (S3)."""
    if isinstance(root.store, SupportsSetSync):
        for key, buf in documents:
            (root / key).set_sync(buf)
        return

    async def put_all() -> None:
        await asyncio.gather(*((root / key).set(buf) for key, buf in documents))

    zarr_sync(put_all())


class FeatureStore:
    """Read and write views and native-resolution features of one store root."""

    def __init__(self, location: StoreLocation | str, read_only: bool = False):
        self.location = location if isinstance(location, StoreLocation) else StoreLocation.parse(location)
        if read_only and not self.location.read_only:
            self.location = dataclasses.replace(self.location, read_only=True)
        self.read_only = self.location.read_only
        self._root: zarr.Group | None = None
        self._groups_made: set[str] = set()  # groups this instance created (or found): not checked again
        self._units_made: set[str] = set()  # units whose group and provenance this instance made or found

    @property
    def root(self) -> zarr.Group:
        if self._root is None:
            def open_root() -> zarr.Group:
                if self.read_only and not self.location.holds_store():
                    # reading never creates a store: one that does not exist reads as empty (commands that
                    # need an existing store check location.require_store first)
                    return zarr.open_group(store=MemoryStore(read_only=False), mode="w", zarr_format=3)
                store = self.location.zarr_store(read_only=self.read_only)
                mode = "r" if self.read_only else "a"
                with self._documents(""):
                    try:
                        root = zarr.open_group(store=store, mode=mode, zarr_format=3)
                    except ContainsGroupError:  # created by another writer between zarr's look and its create
                        root = zarr.open_group(store=store, mode=mode, zarr_format=3)
                if not self.read_only and "ddpmseg" not in root.attrs:
                    root.attrs["ddpmseg"] = {"layout": 1}
                return root

            self._root = with_retries(open_root, f"open the store {self.location.url}", writing=not self.read_only)
        return self._root

    # -- metadata documents -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _documents(self, prefix: str):
        """Turn a zarr.json below `prefix` that does not parse (zarr raises a bare JSONDecodeError) into a
        CorruptObjectError naming the file and `ddpmseg store verify --repair`."""
        try:
            yield
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError: raised by json.loads in zarr
            if not isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)):
                raise
            raise CorruptObjectError(corrupt_object_message(self.location.url, self._corrupt_document(prefix),
                                                            "not valid JSON (truncated or corrupted)")) from None

    def _corrupt_document(self, prefix: str) -> str:
        """The key of the first zarr.json at or below `prefix` that does not parse (the error path only)."""
        loc = self.location
        candidates = [f"{prefix}/{ZARR_JSON}".lstrip("/")] + [
            k for k in loc.find(prefix) if k.rsplit("/", 1)[-1] == ZARR_JSON]
        for key in dict.fromkeys(candidates):
            try:
                json.loads(loc.read_bytes(key))
            except FileNotFoundError:
                continue
            except ValueError:
                return key
        return f"{prefix}/{ZARR_JSON}".lstrip("/")

    # -- generic write-once arrays ----------------------------------------------------------------------------
    def _group(self, path: str) -> zarr.Group:
        with self._documents(path):
            if self.read_only:  # an existing group, else the error that says why it cannot be made
                try:
                    return self.root[path]
                except (KeyError, FileNotFoundError):
                    self.location.check_writable(self.location.path(path))
            try:
                return self.root.require_group(path)
            except ContainsGroupError:  # created concurrently by another writer
                return self.root[path]

    def _write_array(self, path: str, data: np.ndarray, dims: tuple[str, ...], attrs: dict[str, Any]) -> None:
        """Write one array and commit it (see _write_arrays)."""
        parent, name = path.rsplit("/", 1)
        self._write_arrays(parent, {name: (data, dims, attrs)})

    def _write_arrays(self, parent: str, arrays: dict[str, tuple[np.ndarray, tuple[str, ...], dict[str, Any]]]) -> None:
        """Write the arrays {name: (data, dimension names, attributes)} of group `parent`, each one chunk: every
        chunk first, then every array's metadata with its `committed` attribute (commit-last: a reader sees an
        array only once its data is complete). Each array is replaced whole (an uncommitted leftover of a killed
        writer, or a concurrent writer's identical copy).

        A dropped connection is retried a bounded number of times, then is a StoreAccessError."""
        where = self.location.path(f"{parent}/{next(iter(arrays))}" if len(arrays) == 1 else parent)
        self.location.check_writable(where)
        above = parent.rsplit("/", 1)[0] if "/" in parent else ""
        if above and above not in self._groups_made:  # e.g. the unit: made with all its parents, once
            with_retries(lambda: self._group(above), f"write {self.location.path(above)}")
            self._groups_made.add(above)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # The group's own document first (an empty group: ours never carry attributes), then every chunk, then
        # every array's metadata, which is its commit: a reader sees an array only once its data is complete.
        data_documents = [(f"{parent}/{key}", buf) for key, buf in _GROUP_DOCUMENT.items()]
        commits = []
        for name, (data, dims, attrs) in arrays.items():
            chunks, metadata = _array_documents(f"{parent}/{name}", data, dims, attrs, stamp)
            data_documents += chunks
            commits += metadata
        root = self.root.store_path

        def write() -> None:
            _store_documents(root, data_documents)
            _store_documents(root, commits)

        with_retries(write, f"write {where}")

    def _committed_array(self, path: str) -> zarr.Array | None:
        try:
            with self._documents(path):
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

    def view_input_committed(self, view: str, image_id: str) -> bool:
        return self._committed_array(f"views/{view}/{image_id}/input") is not None

    def write_view_input(self, view: str, image_id: str, image: np.ndarray, attrs: dict[str, Any]) -> None:
        """An image without a label yet (a sample drawn from the backbone): (3, H, W) float32 in [-1, 1]."""
        if self._committed_array(f"views/{view}/{image_id}/input") is None:
            self._write_array(f"views/{view}/{image_id}/input", np.asarray(image, np.float32), ("channel", "y", "x"),
                              attrs)

    def write_view_label(self, view: str, image_id: str, label: np.ndarray, label_hash: str,
                         attrs: dict[str, Any]) -> None:
        """A label (H, W) uint8 of an image already in the store (e.g. a sample's predicted mask), under its hash."""
        self._write_array(f"views/{view}/{image_id}/label-{label_hash}", np.asarray(label, np.uint8), ("y", "x"),
                          attrs)

    def read_view_input(self, view: str, image_id: str) -> np.ndarray:
        return self._read(self._require(f"views/{view}/{image_id}/input"), f"view {view} image {image_id} input")

    def read_view_label(self, view: str, image_id: str, label_hash: str) -> np.ndarray:
        return self._read(self._require(f"views/{view}/{image_id}/label-{label_hash}"),
                          f"view {view} image {image_id} label {label_hash}")

    def read_masks(self, path: str) -> np.ndarray:
        """An evaluation's (N, H, W) uint8 masks (storage.artifacts.write_masks), every chunk checked."""
        with self._documents(path):
            try:
                arr = self.root[path]
            except KeyError:
                raise StoreError(f"{self.location.path(path)}: masks not in the store; run `ddpmseg store verify "
                                 f"{self.location.url} --repair` to remove their evaluation") from None
        return self._read(arr, f"masks {path}")

    def _require(self, path: str) -> zarr.Array:
        arr = self._committed_array(path)
        if arr is None:
            raise StoreError(f"{self.location.path(path)}: not in the store or not committed "
                             f"(run the extract stage first)")
        return arr

    # -- features ----------------------------------------------------------------------------------------------
    def ensure_unit(self, unit: UnitSpec, provenance: dict[str, Any]) -> None:
        """Create the unit's group with its provenance, unless there (checked once per FeatureStore)."""
        if unit.path in self._units_made:
            return
        group = self._group(unit.path)
        if "provenance" not in group.attrs:  # a group rewritten empty by `store verify --repair` gets it back
            group.attrs.update({"provenance": provenance, "t": unit.t})
        self._units_made.add(unit.path)
        self._groups_made.add(unit.path)

    def committed_blocks(self, unit: UnitSpec, image_id: str) -> set[int]:
        path = f"{unit.path}/{image_id}"
        try:
            with self._documents(path):
                group = self.root[path]
                return {int(name[1:]) for name, arr in group.arrays() if arr.attrs.get("committed")}
        except (KeyError, FileNotFoundError):
            return set()
        except StoreAccessError:
            raise
        except Exception as err:  # noqa: BLE001
            if is_transient(err):
                raise StoreAccessError(f"cannot read {self.location.path(unit.path)}: {err}") from err
            raise

    def write_features(self, unit: UnitSpec, image_id: str, maps: dict[int, np.ndarray]) -> int:
        """Write one image's block maps {block: (C, h, w)} (numpy or torch, any float dtype; see to_float16) as
        float16; returns bytes written (uncompressed).

        All blocks go in one round trip (chunks first, then their commit marks): checked first, so a refused
        block writes nothing."""
        arrays = {}
        for block, fmap in sorted(maps.items()):
            half = to_float16(fmap, f"{unit.path} image {image_id} block {block}")[None]
            arrays[f"b{block:02d}"] = (half, block_dims(block), {"block": block, "t": unit.t})
        if arrays:
            self._write_arrays(f"{unit.path}/{image_id}", arrays)
        return sum(half.nbytes for half, _, _ in arrays.values())

    def feature_arrays(self, unit: UnitSpec, image_id: str, blocks: list[int]) -> list[da.Array]:
        """Lazy dask arrays (C, h, w) float16 of an image's blocks, in the given order."""
        import dask.array as da

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
        import dask

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
        with self._documents("features"):
            if "features" not in self.root:
                return
            units = [(f"features/{bname}/{vname}/{uname}", ugroup) for bname, bgroup in self.root["features"].groups()
                     for vname, vgroup in bgroup.groups() for uname, ugroup in vgroup.groups()]
        yield from units

"""Stage records, classifier members, evaluation metrics and masks: the non-feature contents of a store.

Each is a zarr v3 node, so plain zarr lists the whole store without a warning, and each carries a checksum that
every read and `ddpmseg store verify` check:

    stages/<stage>/<key>                  group; attributes {"record": {"stage", "key", "inputs", "result",
                                          "created"}, "sha256"}: written LAST, so a stage counts as done only
                                          when everything it produced is in place
    models/<members key>/member_<MM>      (n,) uint8 array, one chunk: the torch.save bytes of {"state_dict",
                                          "meta"} and their crc32c; attributes {"meta", "sha256", "committed"};
                                          its zarr.json, written after the chunk, is the member's commit marker
    evaluations/<evaluate key>/masks      (N, H, W) uint8 array, one chunk per image (zstd, crc32c), attrs
                                          image_ids, stems
    evaluations/<evaluate key>/metrics    group; attributes {"metrics": {...}, "sha256"}

`sha256` is the digest of the canonical JSON of the record / metrics (storage.keys.digest), or of a member's
bytes. A node that does not parse or whose checksum does not match raises CorruptObjectError naming the file;
`ddpmseg store verify --repair` removes it and the next run recomputes exactly that.

Stores written before this layout are still read: stages/<stage>/<key>.json, models/<key>/member_<MM>.pt with
its .json marker (checked by the CRC-32 of every record of the .pt zip), evaluations/<key>/metrics.json.
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import time
import zipfile
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np

from storage.keys import Key, digest, json_default
from storage.location import CorruptObjectError, StoreLocation, corrupt_object_message

if TYPE_CHECKING:  # torch is imported where a member is written: reading records needs none of it
    import torch

ZARR_JSON = "zarr.json"
MEMBER_CHUNK = "c.0"  # the one chunk of a member array (chunk key encoding "default", separator ".")


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _corrupt(loc: StoreLocation, key: str, what: str) -> CorruptObjectError:
    return CorruptObjectError(corrupt_object_message(loc.url, key, what))


def group_document(attributes: dict[str, Any] | None = None) -> bytes:
    """A zarr v3 group's zarr.json."""
    return json.dumps({"attributes": attributes or {}, "zarr_format": 3, "node_type": "group"}, indent=1,
                      sort_keys=True, default=json_default).encode()


def _ensure_groups(loc: StoreLocation, path: str) -> None:
    """Every group document from the root down to `path` itself: written where missing, identical whoever
    writes it (a FeatureStore adds its attributes to the root's)."""
    parts = path.split("/")
    if not loc.exists(ZARR_JSON):
        loc.write_bytes(ZARR_JSON, group_document())
    for depth in range(1, len(parts) + 1):
        key = "/".join(parts[:depth]) + f"/{ZARR_JSON}"
        if not loc.exists(key):
            loc.write_bytes(key, group_document())


def read_document(loc: StoreLocation, key: str) -> dict[str, Any] | None:
    """The JSON document at `key` (None when missing); CorruptObjectError naming it when it does not parse."""
    try:
        data = loc.read_bytes(key)
    except FileNotFoundError:
        return None
    try:
        document = json.loads(data)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise _corrupt(loc, key, "not valid JSON (truncated or corrupted)") from None
    if not isinstance(document, dict):
        raise _corrupt(loc, key, f"holds a JSON {type(document).__name__}, expected an object")
    return document


# -- JSON nodes: a group whose attributes hold a payload and its digest ----------------------------------------
def _write_json_node(loc: StoreLocation, path: str, name: str, payload: dict[str, Any]) -> None:
    _ensure_groups(loc, path.rsplit("/", 1)[0])
    text = json.dumps(payload, sort_keys=True, default=json_default)  # what digest() hashes: the same values
    plain = json.loads(text)
    loc.write_bytes(f"{path}/{ZARR_JSON}", group_document({name: plain, "sha256": digest(plain)}))


def _read_json_node(loc: StoreLocation, path: str, name: str) -> dict[str, Any] | None:
    key = f"{path}/{ZARR_JSON}"
    document = read_document(loc, key)
    if document is None:
        return None
    attributes = document.get("attributes")
    if not isinstance(attributes, dict) or not isinstance(attributes.get(name), dict) or "sha256" not in attributes:
        raise _corrupt(loc, key, f"holds no {name} with its checksum")
    if digest(attributes[name]) != attributes["sha256"]:
        raise _corrupt(loc, key, f"its {name} does not match its checksum (changed after it was written)")
    return attributes[name]


def _read_legacy_json(loc: StoreLocation, key: str) -> dict[str, Any] | None:
    return read_document(loc, key)


# -- stage records ---------------------------------------------------------------------------------------------
def record_path(stage: str, key_value: str) -> str:
    """The record's node (a group) in the store."""
    return f"stages/{stage}/{key_value}"


def legacy_record_path(stage: str, key_value: str) -> str:
    return f"stages/{stage}/{key_value}.json"


def write_record(loc: StoreLocation, key: Key, result: dict[str, Any]) -> None:
    record = {"stage": key.stage, "key": key.value, "inputs": key.inputs, "result": result, "created": _stamp()}
    _write_json_node(loc, record_path(key.stage, key.value), "record", record)


def read_record(loc: StoreLocation, stage: str, key_value: str) -> dict[str, Any] | None:
    """The committed record (None when there is none); CorruptObjectError naming a corrupted one."""
    record = _read_json_node(loc, record_path(stage, key_value), "record")
    if record is None:
        record = _read_legacy_json(loc, legacy_record_path(stage, key_value))
    return record


def delete_record(loc: StoreLocation, stage: str, key_value: str) -> None:
    loc.delete(record_path(stage, key_value))
    loc.delete(legacy_record_path(stage, key_value))


def record_keys(loc: StoreLocation, stage: str) -> list[str]:
    """Keys of the records of `stage` (either layout)."""
    names = [n for n in loc.list(f"stages/{stage}") if n != ZARR_JSON and not n.startswith(".")]
    return sorted({n[:-5] if n.endswith(".json") else n for n in names})


def list_records(loc: StoreLocation, stage: str) -> list[dict[str, Any]]:
    out = []
    for key_value in record_keys(loc, stage):
        rec = read_record(loc, stage, key_value)
        if rec is not None:
            out.append(rec)
    return out


# -- classifier members ----------------------------------------------------------------------------------------
def member_key(train_key: str, index: int) -> str:
    """The member's node (a uint8 array) in the store."""
    return f"models/{train_key}/member_{index:02d}"


def member_committed(loc: StoreLocation, train_key: str, index: int) -> bool:
    base = member_key(train_key, index)
    return loc.exists(f"{base}/{ZARR_JSON}") or loc.exists(base + ".json")


def _member_document(size: int, attributes: dict[str, Any]) -> bytes:
    """zarr.json of a (size,) uint8 array of one chunk, codecs bytes + crc32c (the zarr v3 spec's names)."""
    return json.dumps({
        "shape": [size], "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [size]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": 0, "codecs": [{"name": "bytes"}, {"name": "crc32c"}], "attributes": attributes,
        "dimension_names": ["byte"], "zarr_format": 3, "node_type": "array", "storage_transformers": [],
    }, indent=1, default=json_default).encode()


def write_member(loc: StoreLocation, train_key: str, index: int, state_dict: dict[str, torch.Tensor],
                 meta: dict[str, Any]) -> None:
    """The member's bytes (torch.save of {"state_dict", "meta"}) and their crc32c as the array's chunk, then its
    zarr.json (meta, sha256 of the bytes) as the commit marker."""
    import torch

    buf = io.BytesIO()
    torch.save({"state_dict": state_dict, "meta": meta}, buf)
    _write_payload(loc, member_key(train_key, index), f"models/{train_key}", buf.getvalue(), meta)


def _write_payload(loc: StoreLocation, base: str, parent: str, payload: bytes, meta: dict[str, Any]) -> None:
    """bytes + their crc32c as the one chunk of the (n,) uint8 array `base`, then its zarr.json (meta, sha256)."""
    loc.write_bytes(f"{base}/{MEMBER_CHUNK}", payload + struct.pack("<I", google_crc32c.value(payload)))
    _ensure_groups(loc, parent)
    plain_meta = json.loads(json.dumps(meta, default=json_default))
    attributes = {"meta": plain_meta, "sha256": hashlib.sha256(payload).hexdigest(), "committed": _stamp()}
    loc.write_bytes(f"{base}/{ZARR_JSON}", _member_document(len(payload), attributes))  # commit marker, last


def read_member(loc: StoreLocation, train_key: str, index: int) -> tuple[bytes, dict[str, Any]]:
    """The checked torch.save bytes of a committed member and its meta (load them with
    pipeline.torchfile / pipeline.classifier.load_member: storage never unpickles).

    FileNotFoundError when not committed; CorruptObjectError naming the member when a byte changed."""
    base = member_key(train_key, index)
    if read_document(loc, f"{base}/{ZARR_JSON}") is None and loc.exists(base + ".json"):
        return _read_legacy_member(loc, base)
    return _read_payload(loc, base, "member not committed (run the train stage)")


# -- segmenter checkpoints (DatasetDDPM): the member layout, one per epoch --------------------------------------
def checkpoint_key(segmenter_key: str, epoch: int) -> str:
    """A segmenter's checkpoint after `epoch` (0-based): a (n,) uint8 array like a member."""
    return f"segmenters/{segmenter_key}/epoch_{epoch:03d}"


def checkpoint_committed(loc: StoreLocation, segmenter_key: str, epoch: int) -> bool:
    return loc.exists(f"{checkpoint_key(segmenter_key, epoch)}/{ZARR_JSON}")


def write_checkpoint(loc: StoreLocation, segmenter_key: str, epoch: int, payload: bytes,
                     meta: dict[str, Any]) -> None:
    """A checkpoint's bytes (pipeline.segmenter.checkpoint_bytes), commit-last like a member."""
    _write_payload(loc, checkpoint_key(segmenter_key, epoch), f"segmenters/{segmenter_key}", payload, meta)


def read_checkpoint(loc: StoreLocation, segmenter_key: str, epoch: int) -> tuple[bytes, dict[str, Any]]:
    """The checked bytes and meta of a committed checkpoint (FileNotFoundError / CorruptObjectError)."""
    return _read_payload(loc, checkpoint_key(segmenter_key, epoch), "checkpoint not committed")


def _read_payload(loc: StoreLocation, base: str, missing: str) -> tuple[bytes, dict[str, Any]]:
    document = read_document(loc, f"{base}/{ZARR_JSON}")
    if document is None:
        raise FileNotFoundError(f"{loc.path(base)}: {missing}")
    attributes = document.get("attributes") or {}
    size = (document.get("shape") or [None])[0]
    if not isinstance(attributes.get("meta"), dict) or "sha256" not in attributes or not isinstance(size, int):
        raise _corrupt(loc, f"{base}/{ZARR_JSON}", "not the metadata of a member (meta, sha256, shape)")
    try:
        chunk = loc.read_bytes(f"{base}/{MEMBER_CHUNK}")
    except FileNotFoundError:
        raise _corrupt(loc, base, "committed, but its bytes are missing") from None
    payload, stored_crc = chunk[:-4], chunk[-4:]
    if (len(chunk) != size + 4 or struct.pack("<I", google_crc32c.value(payload)) != stored_crc
            or hashlib.sha256(payload).hexdigest() != attributes["sha256"]):
        raise _corrupt(loc, base, "bytes do not match their checksum (corrupted after they were written)")
    return payload, attributes["meta"]


def _read_legacy_member(loc: StoreLocation, base: str) -> tuple[bytes, dict[str, Any]]:
    """models/<key>/member_<MM>.pt + .json (earlier layout): the .pt's zip records carry a CRC-32 each."""
    meta = read_document(loc, base + ".json")
    try:
        payload = loc.read_bytes(base + ".pt")
    except FileNotFoundError:
        raise _corrupt(loc, base + ".pt", "committed member whose bytes are missing") from None
    problem = legacy_member_problem(payload)
    if problem:
        raise _corrupt(loc, base + ".pt", problem)
    return payload, meta


def legacy_member_problem(payload: bytes) -> str | None:
    """Why the bytes of an earlier-layout member .pt (a torch.save zip) are corrupt, or None: every record's
    CRC-32 is checked."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # zlib/struct errors are ValueError
        return f"not a torch.save zip ({err})"
    return f"record {bad} does not match its CRC-32 (corrupted after it was written)" if bad else None


def delete_member(loc: StoreLocation, members_key: str, index: int) -> None:
    """Remove one member (either layout) and the train records that use its member set (they would claim it)."""
    base = member_key(members_key, index)
    for key in (base, base + ".pt", base + ".json"):
        loc.delete(key)
    for key_value in record_keys(loc, "train"):
        try:
            record = read_record(loc, "train", key_value)
        except CorruptObjectError:
            continue  # removed on its own by verify --repair
        if record and record["result"].get("members_key") == members_key:
            delete_record(loc, "train", key_value)


# -- evaluations: masks and metrics ----------------------------------------------------------------------------
def write_masks(root, eval_key: str, masks: np.ndarray, image_ids: list[str], stems: list[str]) -> str:
    """Persist predicted masks (N, H, W) uint8 as one zarr array; returns its path in the store."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    path = f"evaluations/{eval_key}/masks"
    arr = root.create_array(path, shape=masks.shape, chunks=(1, *masks.shape[1:]), dtype=np.uint8,
                            compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=0,
                            dimension_names=("image", "y", "x"), overwrite=True,
                            attributes={"image_ids": image_ids, "stems": stems},
                            config={"write_empty_chunks": True})  # every chunk on disk: verify finds a lost one
    arr[...] = masks
    return path


def metrics_path(eval_key: str) -> str:
    return f"evaluations/{eval_key}/metrics"


def write_metrics(loc: StoreLocation, eval_key: str, metrics: dict[str, Any]) -> None:
    _write_json_node(loc, metrics_path(eval_key), "metrics", metrics)


def read_metrics(loc: StoreLocation, eval_key: str) -> dict[str, Any] | None:
    """An evaluation's metrics (None when there are none); CorruptObjectError naming a corrupted file."""
    metrics = _read_json_node(loc, metrics_path(eval_key), "metrics")
    if metrics is None:
        metrics = _read_legacy_json(loc, f"evaluations/{eval_key}/metrics.json")
    return metrics


def delete_evaluation(loc: StoreLocation, eval_key: str) -> None:
    loc.delete(f"evaluations/{eval_key}")
    delete_record(loc, "evaluate", eval_key)

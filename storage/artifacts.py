"""Stage records, classifier members and masks: the non-feature contents of a store.

    stages/<stage>/<key>.json      {"stage", "key", "inputs", "result", "created"}: written LAST, so a stage
                                   counts as done only when everything it produced is in place
    models/<train key>/member_<MM>.pt    state dict + plain meta (torch.load(weights_only=True) reads it)
    models/<train key>/member_<MM>.json  the member's commit marker (written after the .pt)
    evaluations/<evaluate key>/masks     (N, H, W) uint8 zarr array, one chunk per image, attrs image_ids
"""
from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np
import torch

from storage.keys import Key, json_default
from storage.location import StoreLocation


def record_path(stage: str, key_value: str) -> str:
    return f"stages/{stage}/{key_value}.json"


def write_record(loc: StoreLocation, key: Key, result: dict[str, Any]) -> None:
    record = {"stage": key.stage, "key": key.value, "inputs": key.inputs, "result": result,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = json.dumps(record, indent=1, sort_keys=True, default=json_default)  # the same inputs Key.value hashed
    loc.write_bytes(record_path(key.stage, key.value), text.encode())


def read_record(loc: StoreLocation, stage: str, key_value: str) -> dict[str, Any] | None:
    try:
        return json.loads(loc.read_bytes(record_path(stage, key_value)))
    except FileNotFoundError:
        return None


def list_records(loc: StoreLocation, stage: str) -> list[dict[str, Any]]:
    out = []
    for name in loc.list(f"stages/{stage}"):
        if name.endswith(".json"):
            rec = read_record(loc, stage, name[:-5])
            if rec is not None:
                out.append(rec)
    return out


# -- classifier members -------------------------------------------------------------------------------------------
def member_key(train_key: str, index: int) -> str:
    return f"models/{train_key}/member_{index:02d}"


def member_committed(loc: StoreLocation, train_key: str, index: int) -> bool:
    return loc.exists(member_key(train_key, index) + ".json")


def write_member(loc: StoreLocation, train_key: str, index: int, state_dict: dict[str, torch.Tensor],
                 meta: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"state_dict": state_dict, "meta": meta}, buf)
    base = member_key(train_key, index)
    loc.write_bytes(base + ".pt", buf.getvalue())
    marker = json.dumps(meta, indent=1, sort_keys=True, default=json_default)
    loc.write_bytes(base + ".json", marker.encode())  # commit marker, last


def read_member(loc: StoreLocation, train_key: str, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and meta of a committed member; never unpickles anything but tensors and plain types."""
    base = member_key(train_key, index)
    if not member_committed(loc, train_key, index):
        raise FileNotFoundError(f"{loc.path(base)}.pt: member not committed (run the train stage)")
    payload = torch.load(io.BytesIO(loc.read_bytes(base + ".pt")), map_location="cpu", weights_only=True)
    return payload["state_dict"], payload["meta"]


# -- masks --------------------------------------------------------------------------------------------------------
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

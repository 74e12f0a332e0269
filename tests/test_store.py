"""The feature store, the stage records / members / masks and store locations, on a real zarr store on disk."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from storage import artifacts
from storage.features import FEATURE_DTYPE, CorruptChunkError, FeatureStore, StoreError, UnitSpec
from pipeline.torchfile import load_tensors
from storage.keys import Key
from storage.location import StoreAccessError, StoreLocation

UNIT = UnitSpec(backbone="tiny-0123456789ab", view="base", t=50, spec="noise0")
IMAGE = "img-3fa2c1d09e4b"


def block_maps(seed: int = 0) -> dict[int, np.ndarray]:
    """Decoder-block-like maps {block: (C, h, w) float32}, deliberately of different shapes."""
    rng = np.random.default_rng(seed)
    return {5: rng.standard_normal((16, 4, 4)).astype(np.float32) * 3,
            8: rng.standard_normal((8, 8, 8)).astype(np.float32),
            12: rng.standard_normal((4, 16, 16)).astype(np.float32) * 100}


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return FeatureStore(str(tmp_path / "store"))


def array_dir(store: FeatureStore, path: str) -> Path:
    return Path(store.location.path(path))


def chunk_files(store: FeatureStore, path: str) -> list[Path]:
    return sorted(p for p in array_dir(store, path).rglob("c*") if p.is_file())


# -- features: layout, codecs, round trip --------------------------------------------------------------------------
def test_features_round_trip_as_float16_one_chunk_per_image_and_block(store):
    maps = block_maps()
    store.ensure_unit(UNIT, {"backbone": "abc", "t": 50})
    nbytes = store.write_features(UNIT, IMAGE, maps)
    assert nbytes == sum(m.size * 2 for m in maps.values())
    assert store.committed_blocks(UNIT, IMAGE) == {5, 8, 12}

    lazy = store.feature_arrays(UNIT, IMAGE, [12, 5])  # the order asked for, not the stored order
    assert [a.shape for a in lazy] == [maps[12].shape, maps[5].shape]
    assert all(a.dtype == FEATURE_DTYPE for a in lazy)
    values = store.read_maps([UNIT], IMAGE, [5, 8, 12])
    for b, v in zip([5, 8, 12], values):
        assert v.dtype == np.float16 and v.shape == maps[b].shape
        np.testing.assert_allclose(v.astype(np.float32), maps[b], rtol=1e-3, atol=1e-3)
        assert not np.array_equal(v.astype(np.float32), maps[b])  # really stored as float16

    for b, m in maps.items():
        path = f"{UNIT.path}/{IMAGE}/b{b:02d}"
        arr = store.root[path]
        assert arr.shape == (1, *m.shape) and arr.chunks == arr.shape and arr.nchunks == 1
        assert len(chunk_files(store, path)) == 1  # one chunk file on disk per image and block
        meta = json.loads((array_dir(store, path) / "zarr.json").read_text())
        assert meta["data_type"] == "float16"
        codecs = [c["name"] for c in meta["codecs"]]
        assert "zstd" in codecs and "crc32c" in codecs
        assert meta["dimension_names"] == ["image", f"channel_b{b:02d}", f"y_b{b:02d}", f"x_b{b:02d}"]
        assert meta["attributes"]["block"] == b and meta["attributes"]["t"] == 50
        assert meta["attributes"]["committed"]
    assert store.root[UNIT.path].attrs["provenance"] == {"backbone": "abc", "t": 50}


def test_documented_layout_opens_with_plain_zarr(store, tmp_path):
    maps = block_maps(1)
    store.write_features(UNIT, IMAGE, maps)
    root = zarr.open_group(str(tmp_path / "store"), mode="r")
    assert UNIT.path == "features/tiny-0123456789ab/base/t0050-noise0"
    arr = root[f"features/tiny-0123456789ab/base/t0050-noise0/{IMAGE}/b08"]
    assert isinstance(arr, zarr.Array)
    np.testing.assert_allclose(arr[0].astype(np.float32), maps[8], rtol=1e-3, atol=1e-3)
    assert arr.metadata.dimension_names == ("image", "channel_b08", "y_b08", "x_b08")  # per block: xarray opens it
    assert [path for path, _ in store.iter_units()] == [UNIT.path]


def test_read_maps_follows_the_official_order_units_then_blocks(store):
    u150 = UnitSpec(UNIT.backbone, UNIT.view, 150, UNIT.spec)
    store.write_features(UNIT, IMAGE, block_maps(0))
    store.write_features(u150, IMAGE, block_maps(1))
    values = store.read_maps([UNIT, u150], IMAGE, [8, 12])
    expected = [block_maps(0)[8], block_maps(0)[12], block_maps(1)[8], block_maps(1)[12]]
    assert len(values) == 4
    for v, e in zip(values, expected):
        np.testing.assert_allclose(v.astype(np.float32), e, rtol=1e-3, atol=1e-3)


def test_read_only_store_reads_what_a_writer_committed(store):
    store.write_features(UNIT, IMAGE, block_maps())
    reader = FeatureStore(store.location, read_only=True)
    assert reader.committed_blocks(UNIT, IMAGE) == {5, 8, 12}
    assert reader.read_maps([UNIT], IMAGE, [5])[0].shape == (16, 4, 4)


def test_activations_beyond_float16_range_are_refused(store):
    maps = {5: np.full((2, 2, 2), 1e5, np.float32)}  # finite in float32, inf in float16
    with pytest.raises(StoreError, match="float16"):
        store.write_features(UNIT, IMAGE, maps)
    with pytest.raises(StoreError, match="not finite"):
        store.write_features(UNIT, IMAGE, {5: np.array([[[np.nan]]], np.float32)})
    assert store.committed_blocks(UNIT, IMAGE) == set()


# -- commit marker ----------------------------------------------------------------------------------------------------
def test_array_without_commit_marker_does_not_count_and_is_rewritten(store):
    maps = block_maps()
    store.write_features(UNIT, IMAGE, {5: maps[5]})
    # A killed writer: the array of block 8 exists and holds data, but its `committed` attribute was never set.
    group = store._group(f"{UNIT.path}/{IMAGE}")
    torn = group.create_array("b08", shape=(1, *maps[8].shape), chunks=(1, *maps[8].shape), dtype="float16",
                              fill_value=np.nan, dimension_names=("image", "channel", "y", "x"),
                              attributes={"block": 8, "t": 50, "committed": None})
    torn[...] = np.zeros((1, *maps[8].shape), np.float16)
    assert store.committed_blocks(UNIT, IMAGE) == {5}
    fresh = FeatureStore(store.location)  # a new process sees the same
    assert fresh.committed_blocks(UNIT, IMAGE) == {5}
    with pytest.raises(StoreError, match=r"b08.*not in the store"):
        fresh.feature_arrays(UNIT, IMAGE, [5, 8])
    with pytest.raises(StoreError):
        fresh.read_maps([UNIT], IMAGE, [8])

    fresh.write_features(UNIT, IMAGE, {8: maps[8]})  # the next run rewrites it and commits
    assert fresh.committed_blocks(UNIT, IMAGE) == {5, 8}
    np.testing.assert_allclose(fresh.read_maps([UNIT], IMAGE, [8])[0].astype(np.float32), maps[8],
                               rtol=1e-3, atol=1e-3)


def test_writer_killed_between_chunks_and_commit_leaves_nothing_that_counts(store):
    # write_features stores every chunk first and the metadata documents (the commit) last: a writer killed in
    # between leaves chunk files without zarr.json. Simulated by storing only the chunk documents of a real write.
    from storage import features as store_features

    maps = block_maps()
    store.write_features(UNIT, IMAGE, {5: maps[5]})
    chunks, _ = store_features._array_documents(f"{UNIT.path}/{IMAGE}/b08", maps[8].astype(FEATURE_DTYPE)[None],
                                                ("image", "channel", "y", "x"), {"block": 8, "t": 50}, "stamp")
    store_features._store_documents(store.root.store_path, chunks)
    assert chunk_files(store, f"{UNIT.path}/{IMAGE}/b08")  # the data is there ...
    assert not (array_dir(store, f"{UNIT.path}/{IMAGE}/b08") / "zarr.json").exists()  # ... the commit is not
    fresh = FeatureStore(store.location)
    assert fresh.committed_blocks(UNIT, IMAGE) == {5}
    with pytest.raises(StoreError, match=r"b08.*not in the store"):
        fresh.feature_arrays(UNIT, IMAGE, [8])
    fresh.write_features(UNIT, IMAGE, {8: maps[8]})  # the next run writes it whole and commits
    assert fresh.committed_blocks(UNIT, IMAGE) == {5, 8}
    np.testing.assert_allclose(fresh.read_maps([UNIT], IMAGE, [8])[0].astype(np.float32), maps[8],
                               rtol=1e-3, atol=1e-3)


def test_float16_cast_rounds_like_numpy_and_refuses_what_float16_cannot_hold(store):
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.standard_normal(4096).astype(np.float32) * scale
                             for scale in (1e-7, 1e-4, 1.0, 1e3, 1.5e4)]
                            + [np.array([65504, 65519.99, -65519.99, 6e-8, 3e-8, 0.0, -0.0], np.float32)])
    fmap = values.reshape(1, 1, -1)
    store.write_features(UNIT, IMAGE, {5: fmap})
    stored = store.read_maps([UNIT], IMAGE, [5])[0]
    assert stored.view(np.uint16).tolist() == fmap.astype(np.float16).view(np.uint16).tolist()  # bit for bit
    with pytest.raises(StoreError, match=r"block 8: activations are beyond the float16 range"):
        store.write_features(UNIT, "other", {5: fmap, 8: np.full((1, 1, 2), 65520, np.float32)})
    assert store.committed_blocks(UNIT, "other") == set()  # the refused call wrote no block at all


@pytest.mark.parametrize("dtype", ["float16", "float32", "uint8"])
def test_chunks_are_the_bytes_zarr_itself_writes(tmp_path, dtype):
    # the write path encodes chunks itself (storage.features._chunk_bytes); zarr's own pipeline must agree byte
    # for byte, or a zarr upgrade changed the format under us
    from storage import features as store_features

    rng = np.random.default_rng(0)
    data = (rng.standard_normal((1, 6, 5, 7)) * 50).astype(dtype)
    own = FeatureStore(str(tmp_path / "own"))
    own._write_array("g/x/arr", data, ("image", "channel", "y", "x"), {"k": 1})
    reference = zarr.create_array(str(tmp_path / "zarr"), shape=data.shape, chunks=data.shape, dtype=dtype,
                                  compressors=store_features._compressors(), fill_value=0,
                                  chunk_key_encoding=store_features.CHUNK_KEY_ENCODING)
    reference[...] = data
    ours = (tmp_path / "own" / "g" / "x" / "arr" / "c.0.0.0.0").read_bytes()
    assert ours == (tmp_path / "zarr" / "c.0.0.0.0").read_bytes()
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "own" / "g" / "x" / "arr"))[...], data)
    assert zarr.open_group(str(tmp_path / "own"))["g/x/arr"].attrs["k"] == 1  # the hierarchy lists it


def test_arrays_written_by_earlier_versions_still_read(store):
    # before the '.' chunk keys and the commit in the metadata document: zarr's default `c/0/0/0/0` chunk key and a
    # `committed` attribute set after the data; such stores must read unchanged
    maps = block_maps()
    group = store._group(f"{UNIT.path}/{IMAGE}")
    old = group.create_array("b05", shape=(1, *maps[5].shape), chunks=(1, *maps[5].shape), dtype="float16",
                             fill_value=np.nan, dimension_names=("image", "channel", "y", "x"),
                             attributes={"block": 5, "t": 50, "committed": None})
    old[...] = maps[5].astype(np.float16)[None]
    old.attrs.update({"committed": "2026-11-01T00:00:00Z"})
    assert (array_dir(store, f"{UNIT.path}/{IMAGE}/b05") / "c" / "0" / "0" / "0" / "0").is_file()
    store.write_features(UNIT, IMAGE, {8: maps[8]})  # a new block beside it, in today's layout
    fresh = FeatureStore(store.location)
    assert fresh.committed_blocks(UNIT, IMAGE) == {5, 8}
    five, eight = fresh.read_maps([UNIT], IMAGE, [5, 8])
    np.testing.assert_array_equal(five, maps[5].astype(np.float16))
    np.testing.assert_allclose(eight.astype(np.float32), maps[8], rtol=1e-3, atol=1e-3)


def test_uncommitted_array_with_stale_shape_is_replaced(store):
    group = store._group(f"{UNIT.path}/{IMAGE}")
    group.create_array("b05", shape=(1, 2, 2, 2), chunks=(1, 2, 2, 2), dtype="float16", fill_value=np.nan)
    maps = block_maps()
    store.write_features(UNIT, IMAGE, {5: maps[5]})
    assert store.root[f"{UNIT.path}/{IMAGE}/b05"].shape == (1, 16, 4, 4)
    assert store.committed_blocks(UNIT, IMAGE) == {5}


def test_missing_image_is_a_store_error(store):
    assert store.committed_blocks(UNIT, "no-such-image") == set()
    with pytest.raises(StoreError, match="run extract first"):
        store.feature_arrays(UNIT, "no-such-image", [5])


# -- corruption ---------------------------------------------------------------------------------------------------------
def test_flipped_byte_in_a_chunk_names_unit_image_and_block(store):
    store.write_features(UNIT, IMAGE, block_maps())
    (chunk,) = chunk_files(store, f"{UNIT.path}/{IMAGE}/b08")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))

    assert store.read_maps([UNIT], IMAGE, [5])[0].shape == (16, 4, 4)  # the other blocks still read
    with pytest.raises(CorruptChunkError) as info:
        store.read_maps([UNIT], IMAGE, [5, 8, 12])
    message = str(info.value)
    assert UNIT.path in message and IMAGE in message and "block 8" in message
    assert "ddpmseg store verify" in message


def test_deleted_chunk_of_a_committed_array_is_an_error_not_nan(store):
    store.write_features(UNIT, IMAGE, block_maps())
    (chunk,) = chunk_files(store, f"{UNIT.path}/{IMAGE}/b12")
    chunk.unlink()
    assert store.committed_blocks(UNIT, IMAGE) == {5, 8, 12}  # the marker alone cannot tell
    assert np.isnan(store.feature_arrays(UNIT, IMAGE, [12])[0].compute()).all()  # what a naive reader sees
    with pytest.raises(CorruptChunkError) as info:
        store.read_maps([UNIT], IMAGE, [12])
    assert UNIT.path in str(info.value) and IMAGE in str(info.value) and "block 12" in str(info.value)
    assert "ddpmseg store verify" in str(info.value)


# -- views ------------------------------------------------------------------------------------------------------------
def test_views_round_trip_and_labels_are_keyed_by_their_hash(store):
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (3, 8, 8)).astype(np.float32)
    label_a = rng.integers(0, 5, (8, 8)).astype(np.uint8)
    label_b = np.full((8, 8), 255, np.uint8)
    assert not store.view_committed("base", IMAGE, "hash-a")

    store.write_view("base", IMAGE, image, label_a, "hash-a", {"spec": "base"})
    assert store.view_committed("base", IMAGE, "hash-a")
    assert not store.view_committed("base", IMAGE, "hash-b")
    assert not store.view_committed("flip", IMAGE, "hash-a")
    store.write_view("base", IMAGE, image, label_b, "hash-b", {"spec": "base"})

    got = store.read_view_input("base", IMAGE)
    assert got.dtype == np.float32 and np.array_equal(got, image)  # the exact model input, bit for bit
    for h, lab in (("hash-a", label_a), ("hash-b", label_b)):
        out = store.read_view_label("base", IMAGE, h)
        assert out.dtype == np.uint8 and np.array_equal(out, lab)
    arr = zarr.open_group(store.location.url, mode="r")[f"views/base/{IMAGE}/label-hash-a"]
    assert arr.metadata.dimension_names == ("y", "x") and arr.attrs["spec"] == "base"
    with pytest.raises(StoreError, match="not in the store or not committed"):
        store.read_view_label("base", IMAGE, "hash-c")


def test_all_background_label_round_trips_and_a_lost_label_chunk_is_detected(store):
    image = np.zeros((3, 4, 4), np.float32)
    label = np.zeros((4, 4), np.uint8)  # equals the fill value: must still be stored
    store.write_view("base", IMAGE, image, label, "zeros", {})
    assert np.array_equal(store.read_view_label("base", IMAGE, "zeros"), label)
    (chunk,) = chunk_files(store, f"views/base/{IMAGE}/label-zeros")
    chunk.unlink()
    with pytest.raises(CorruptChunkError, match="missing"):
        store.read_view_label("base", IMAGE, "zeros")
    (chunk,) = chunk_files(store, f"views/base/{IMAGE}/input")
    chunk.unlink()
    with pytest.raises(CorruptChunkError, match="ddpmseg store verify"):
        store.read_view_input("base", IMAGE)


# -- artifacts: records, members, masks -----------------------------------------------------------------------------
def test_records_round_trip_and_list(tmp_path):
    loc = StoreLocation.parse(tmp_path / "store")
    key_a = Key("train", {"images": ["a", "b"], "seed": np.int64(0), "blocks": {8, 5}})
    key_b = Key("train", {"images": ["a"], "seed": 1})
    assert artifacts.read_record(loc, "train", key_a.value) is None
    assert artifacts.list_records(loc, "train") == []

    artifacts.write_record(loc, key_a, {"members": 2})
    artifacts.write_record(loc, key_b, {"members": 3})
    rec = artifacts.read_record(loc, "train", key_a.value)
    assert rec["stage"] == "train" and rec["key"] == key_a.value and rec["result"] == {"members": 2}
    assert rec["inputs"] == {"images": ["a", "b"], "seed": 0, "blocks": [5, 8]}
    assert rec["created"].endswith("Z")
    # a zarr group whose attributes hold the record and its checksum
    node = json.loads((tmp_path / "store" / "stages" / "train" / key_a.value / "zarr.json").read_text())
    assert node["node_type"] == "group" and node["attributes"]["record"] == rec and node["attributes"]["sha256"]
    listed = artifacts.list_records(loc, "train")
    assert sorted(r["key"] for r in listed) == sorted([key_a.value, key_b.value])
    assert artifacts.list_records(loc, "evaluate") == []


def test_members_round_trip_and_load_with_weights_only(tmp_path):
    loc = StoreLocation.parse(tmp_path / "store")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    state = net.state_dict()
    meta = {"index": 1, "epochs": 5, "classes": 3, "loss": 0.25}
    assert not artifacts.member_committed(loc, "trainkey", 1)
    with pytest.raises(FileNotFoundError, match="not committed"):
        artifacts.read_member(loc, "trainkey", 1)

    artifacts.write_member(loc, "trainkey", 1, state, meta)
    assert artifacts.member_committed(loc, "trainkey", 1)
    payload, got_meta = artifacts.read_member(loc, "trainkey", 1)
    assert got_meta == meta
    got_state = load_tensors(payload, "member")["state_dict"]
    assert list(got_state) == list(state)
    for name, tensor in state.items():
        assert torch.equal(got_state[name], tensor)

    # plain zarr reads the member as a (n,) uint8 array holding the torch.save bytes
    arr = zarr.open_group(str(tmp_path / "store"), mode="r")["models/trainkey/member_01"]
    assert arr.dtype == np.uint8 and arr[...].tobytes() == payload and arr.attrs["meta"] == meta


def test_member_without_commit_marker_is_not_read(tmp_path):
    loc = StoreLocation.parse(tmp_path / "store")
    artifacts.write_member(loc, "k", 0, {"w": torch.ones(2)}, {"index": 0})
    (tmp_path / "store" / "models" / "k" / "member_00" / "zarr.json").unlink()  # killed between bytes and marker
    assert not artifacts.member_committed(loc, "k", 0)
    with pytest.raises(FileNotFoundError, match="member_00"):
        artifacts.read_member(loc, "k", 0)


def test_write_masks(store):
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 4, (3, 8, 8)).astype(np.uint8)
    masks[1] = 0  # an all-background image: its chunk is still stored
    path = artifacts.write_masks(store.root, "evalkey", masks, ["i0", "i1", "i2"], ["a", "b", "c"])
    assert path == "evaluations/evalkey/masks"
    arr = zarr.open_group(store.location.url, mode="r")[path]
    assert arr.dtype == np.uint8 and arr.chunks == (1, 8, 8) and arr.nchunks_initialized == 3
    assert np.array_equal(arr[...], masks)
    assert arr.attrs["image_ids"] == ["i0", "i1", "i2"] and arr.attrs["stems"] == ["a", "b", "c"]
    assert arr.metadata.dimension_names == ("image", "y", "x")
    artifacts.write_masks(store.root, "evalkey", masks[:2], ["i0", "i1"], ["a", "b"])  # overwrite
    assert zarr.open_group(store.location.url, mode="r")[path].shape == (2, 8, 8)


# -- locations --------------------------------------------------------------------------------------------------------
def test_location_parse_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = StoreLocation.parse("rel/store")
    assert loc.url == str(tmp_path.resolve() / "rel" / "store") and os.path.isabs(loc.url)
    assert not loc.is_remote
    assert StoreLocation.parse(f"file://{tmp_path}/x").url == str(tmp_path.resolve() / "x")
    assert StoreLocation.parse(tmp_path / "y").url == str(tmp_path.resolve() / "y")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert StoreLocation.parse("~/z").url == str(tmp_path.resolve() / "z")


def test_location_parse_keeps_s3_and_rejects_other_schemes(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://localhost:9000")
    loc = StoreLocation.parse("s3://bucket/prefix/")
    assert loc.url == "s3://bucket/prefix" and loc.is_remote
    assert loc.path("features/x") == "s3://bucket/prefix/features/x"
    assert loc.storage_options["client_kwargs"]["endpoint_url"] == "http://localhost:9000"
    assert loc == StoreLocation.parse("s3://bucket/prefix", {"anon": True})  # options do not change identity
    for bad in ("gs://bucket/x", "http://host/store"):
        with pytest.raises(StoreAccessError, match=r"expected a local path or s3://bucket/prefix") as info:
            StoreLocation.parse(bad)
        assert bad in str(info.value)
    for bad in ("", "s3://", "s3:///"):
        with pytest.raises(StoreAccessError):
            StoreLocation.parse(bad)


def test_write_bytes_is_atomic_and_leaves_no_temp_files(tmp_path):
    loc = StoreLocation.parse(tmp_path / "store")
    loc.write_bytes("stages/train/abc.json", b'{"a": 1}')
    loc.write_bytes("stages/train/abc.json", b'{"a": 2}')  # replace
    directory = tmp_path / "store" / "stages" / "train"
    assert [p.name for p in directory.iterdir()] == ["abc.json"]
    assert loc.read_bytes("stages/train/abc.json") == b'{"a": 2}'
    assert loc.exists("stages/train/abc.json") and not loc.exists("stages/train/nope.json")
    assert loc.list("stages/train") == ["abc.json"] and loc.list("stages/none") == []

    with pytest.raises(TypeError):  # a failing write keeps the old object and removes its temp file
        loc.write_bytes("stages/train/abc.json", "not bytes")  # type: ignore[arg-type]
    assert [p.name for p in directory.iterdir()] == ["abc.json"]
    assert loc.read_bytes("stages/train/abc.json") == b'{"a": 2}'

    with pytest.raises(FileNotFoundError):
        loc.read_bytes("stages/train/nope.json")
    loc.delete("stages/train")
    assert not directory.exists()
    loc.delete("stages/train")  # deleting what is gone is fine


def test_zarr_private_api_is_walled_off_and_the_pin_admits_only_checked_versions():
    """Every zarr.core import lives in storage/zarr_internals.py; the installed zarr is one it was checked
    against, and pyproject's lower bound is that module's (SupportsSetSync is new in zarr 3.1.6)."""
    import re
    from pathlib import Path

    import zarr
    from packaging.specifiers import SpecifierSet

    from storage import zarr_internals

    root = Path(__file__).resolve().parent.parent
    for path in [*root.glob("storage/*.py"), *root.glob("pipeline/*.py"), *root.glob("flows/*.py")]:
        if path.name != "zarr_internals.py":
            assert not re.search(r"^\s*(from|import) zarr\.core", path.read_text(), re.M), path
    assert zarr.__version__ in SpecifierSet(zarr_internals.CHECKED_ZARR_VERSIONS)
    pin = re.search(r'"zarr([^"]+)"', (root / "pyproject.toml").read_text()).group(1)
    assert SpecifierSet(pin) == SpecifierSet(zarr_internals.CHECKED_ZARR_VERSIONS)
    for name in zarr_internals.__all__:
        assert getattr(zarr_internals, name) is not None

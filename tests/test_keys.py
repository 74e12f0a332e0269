"""Content fingerprints and stage keys (storage.keys): machine-independent, order-independent, content-only."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from storage import keys
from storage.keys import SCHEMA_VERSION, Key, array_digest, canonical_json, digest, file_digest


# -- canonical JSON and digests ------------------------------------------------------------------------------------
def test_canonical_json_is_independent_of_dict_order():
    a = {"b": 1, "a": {"y": [1, 2], "x": "s"}}
    b = {"a": {"x": "s", "y": [1, 2]}, "b": 1}
    assert canonical_json(a) == canonical_json(b) == '{"a":{"x":"s","y":[1,2]},"b":1}'
    assert digest(a) == digest(b)


def test_digest_changes_when_a_value_changes():
    base = {"steps": [50, 150, 250], "blocks": [5, 6, 7, 8, 12], "lr": 0.001}
    assert digest(base) == digest(dict(base))
    assert digest({**base, "lr": 0.002}) != digest(base)
    assert digest({**base, "steps": [50, 150]}) != digest(base)
    assert digest({**base, "steps": [150, 50, 250]}) != digest(base)  # list order is meaningful
    assert len(digest(base)) == 64 and int(digest(base), 16) >= 0


def test_numpy_scalars_and_tuples_hash_like_plain_values():
    assert digest({"n": np.int64(3), "x": np.float32(0.5), "t": (1, 2)}) == digest({"n": 3, "x": 0.5, "t": [1, 2]})


def test_sets_are_canonical_across_processes():
    """A set's iteration order depends on PYTHONHASHSEED; its key must not."""
    code = ("from storage.keys import digest; "
            "print(digest({'ids': {'img-a', 'img-b', 'img-c', 'img-d', 'img-e'}}))")
    seen = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        seen.add(out.stdout.strip())
    assert seen == {digest({"ids": ["img-a", "img-b", "img-c", "img-d", "img-e"]})}


def test_path_inside_a_key_raises_type_error(tmp_path):
    with pytest.raises(TypeError, match="paths must not enter a key"):
        canonical_json({"checkpoint": tmp_path / "model.pt"})
    with pytest.raises(TypeError, match="paths must not enter a key"):
        Key("extract", {"nested": [{"p": Path("a/b")}]}).value
    with pytest.raises(TypeError, match="ndarray"):
        digest({"array": np.zeros(3)})


# -- arrays ----------------------------------------------------------------------------------------------------------
def test_array_digest_depends_on_dtype_shape_and_bytes():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    ref = array_digest(a)
    assert array_digest(a.copy()) == ref
    assert array_digest(a.astype(np.int16)) != ref  # same values, other dtype
    assert array_digest(a.reshape(4, 3)) != ref  # same bytes, other shape
    assert array_digest(a.reshape(12)) != ref
    b = a.copy()
    b[2, 3] += 1
    assert array_digest(b) != ref  # one value changed
    expected = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()
    assert ref == expected


def test_array_digest_of_a_view_equals_the_digest_of_its_c_order_copy():
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert array_digest(a.T) == array_digest(np.ascontiguousarray(a.T))
    assert array_digest(a[:, ::2]) == array_digest(a[:, ::2].copy())
    assert array_digest(a.T) != array_digest(a)


def test_array_digest_tells_a_scalar_array_from_a_one_element_vector():
    assert array_digest(np.array(3.0)) != array_digest(np.array([3.0]))


def test_array_digest_refuses_object_arrays():
    with pytest.raises(TypeError, match="object"):
        array_digest(np.array(["a", None], dtype=object))


# -- files -----------------------------------------------------------------------------------------------------------
def test_file_digest_is_sha256_of_the_bytes_and_uses_the_cache(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("DDPMSEG_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(keys, "RACY_WINDOW_NS", 0)  # trust a file changed before hashing began
    f = tmp_path / "checkpoint.pt"
    f.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(f.read_bytes()).hexdigest()
    time.sleep(0.05)  # the kernel's coarse file clock may lag time.time_ns() by a few ms
    assert file_digest(f) == expected

    cache_file = cache_dir / "file-digests.json"
    cache = json.loads(cache_file.read_text())
    assert list(cache.values()) == [expected]
    (marker,) = cache
    assert marker.startswith(f"{f.resolve()}|")

    # The cache is what answers while the file is unchanged: plant a value and get it back.
    cache_file.write_text(json.dumps({marker: "planted"}))
    assert file_digest(f) == "planted"

    # Modifying the file (new size and mtime) makes it hash the bytes again.
    f.write_bytes(b"other weights")
    time.sleep(0.05)
    new = file_digest(f)
    assert new == hashlib.sha256(b"other weights").hexdigest() != expected
    cache = json.loads(cache_file.read_text())
    assert list(cache.values()) == [new]  # the stale entry of that path is dropped


def test_file_digest_is_independent_of_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMSEG_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.pt").write_bytes(b"same bytes")
    (tmp_path / "b" / "y.pt").write_bytes(b"same bytes")
    assert file_digest(tmp_path / "a" / "x.pt") == file_digest(str(tmp_path / "b" / "y.pt"))


def test_file_digest_survives_an_unwritable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("DDPMSEG_CACHE_DIR", str(blocker))
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    assert file_digest(f) == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize("how", ["rewrite in place", "rename over"])
def test_file_digest_sees_a_replacement_with_the_same_size_and_mtime(tmp_path, monkeypatch, how):
    """A checkpoint replaced by another of the same size and mtime (cp -p, archives) must hash anew, whether it
    was rewritten in place (same inode, new ctime) or renamed over (new inode), even right after hashing."""
    monkeypatch.setenv("DDPMSEG_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "checkpoint.pt"
    old, new = b"A" * 4096, b"B" * 4096
    f.write_bytes(old)
    before = f.stat()
    assert file_digest(f) == hashlib.sha256(old).hexdigest()
    if how == "rewrite in place":
        with open(f, "r+b") as handle:
            handle.write(new)
    else:
        other = tmp_path / "incoming.pt"
        other.write_bytes(new)
        os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(other, f)
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = f.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert file_digest(f) == hashlib.sha256(new).hexdigest()


def test_file_digest_caches_only_files_older_than_the_racy_window(tmp_path, monkeypatch):
    """A file changed just before hashing may be changed again within the timestamp granularity with every stat
    field equal: such a digest is not cached; an older file's is."""
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("DDPMSEG_CACHE_DIR", str(cache_dir))
    f = tmp_path / "fresh.pt"
    f.write_bytes(b"fresh")
    file_digest(f)
    assert not (cache_dir / "file-digests.json").exists()
    monkeypatch.setattr(keys, "RACY_WINDOW_NS", 0)
    time.sleep(0.05)
    file_digest(f)
    assert list(json.loads((cache_dir / "file-digests.json").read_text()).values()) == [
        hashlib.sha256(b"fresh").hexdigest()]


# -- stage keys ------------------------------------------------------------------------------------------------------
def test_key_value_is_stable_and_depends_on_stage_and_inputs():
    inputs = {"backbone": "ab" * 32, "view": "base", "t": 50}
    key = Key("extract", inputs)
    assert key.value == Key("extract", dict(reversed(list(inputs.items())))).value
    assert key.value == digest({"stage": "extract", "schema": SCHEMA_VERSION, "inputs": inputs})
    assert key.value != Key("train", inputs).value
    assert key.value != Key("extract", {**inputs, "t": 150}).value
    assert key.short == key.value[:16] and len(key.short) == 16
    assert hash(key) == hash(Key("extract", {}))  # inputs are not part of the dataclass hash (dicts are unhashable)


def test_key_value_is_the_same_in_another_process():
    code = "from storage.keys import Key; print(Key('train', {'seed': 0, 'ids': ['a', 'b']}).value)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == Key("train", {"ids": ["a", "b"], "seed": 0}).value

"""Content fingerprints and stage keys: hashes of exactly the inputs that change a result.

Never paths, mtimes, hostnames or dict order: two teammates with the same inputs get the same keys.
A key is stored together with its inputs (`Key.inputs`) so `ddpmseg status` can say which input changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1  # bump when the numerics of a stage change: old results stop matching


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same mapping always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)` for key inputs: numpy scalars as numbers, sets sorted (their iteration order
    changes between processes), paths and anything else refused."""
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=canonical_json)
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, Path):
        raise TypeError(f"paths must not enter a key: {obj}")
    raise TypeError(f"cannot put {type(obj).__name__} into a key")


def digest(obj: Any) -> str:
    """sha256 hex digest of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (C order)."""
    a = np.asarray(array)
    if a.dtype.hasobject:
        raise TypeError("array_digest: object arrays hold pointers, not values; convert to a numeric dtype")
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes(order="C"))
    return h.hexdigest()


def _digest_cache_path() -> Path:
    base = os.environ.get("DDPMSEG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ddpmseg")
    return Path(base) / "file-digests.json"


#: a file changed this recently (mtime or ctime) before hashing began is not cached: a rewrite within the
#: timestamp granularity (coarse kernel clock, ~4 ms; whole seconds on some file systems) could leave every
#: stat field as it was.
RACY_WINDOW_NS = 2_000_000_000


def _stat_marker(p: Path, st: os.stat_result) -> str:
    """Identity of one version of a file: path, size, mtime, device, inode and ctime. A replacement with the same
    size and mtime (`cp -p`, an archive, a copy over the file) gets a new inode (rename) or a new ctime (rewrite
    in place): ctime cannot be set from user space."""
    return f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_dev}|{st.st_ino}|{st.st_ctime_ns}"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, cached locally by (absolute path, size, mtime, device, inode, ctime) so large
    checkpoints hash once; a file changed within RACY_WINDOW_NS of hashing is hashed again next time.

    The cache only avoids re-reading: the digest itself depends on the bytes alone.
    """
    p = Path(path).resolve()
    st = p.stat()
    cache_file = _digest_cache_path()
    marker = _stat_marker(p, st)
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(marker), str):
        return cache[marker]
    started = time.time_ns()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    value = h.hexdigest()
    after = p.stat()
    if _stat_marker(p, after) != marker or max(after.st_mtime_ns, after.st_ctime_ns) > started - RACY_WINDOW_NS:
        return value  # changed while or just before it was read: not cached
    cache = {k: v for k, v in (cache if isinstance(cache, dict) else {}).items() if not k.startswith(f"{p}|")}
    cache[marker] = value
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return value


@dataclass(frozen=True)
class Key:
    """A stage key: `value` is the hash of `inputs` (a JSON-able mapping of named input fingerprints)."""

    stage: str
    inputs: dict[str, Any] = field(hash=False)

    @property
    def value(self) -> str:
        return digest({"stage": self.stage, "schema": SCHEMA_VERSION, "inputs": self.inputs})

    @property
    def short(self) -> str:
        return self.value[:16]

"""Where a store lives: a local directory or `s3://bucket/prefix` (S3 / MinIO through fsspec), one code path.

S3 settings come from the environment, never from code: the usual AWS_* variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION / AWS_DEFAULT_REGION, AWS_PROFILE) and AWS_ENDPOINT_URL for MinIO or any
S3-compatible endpoint.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import zarr
import zarr.storage


class StoreAccessError(RuntimeError):
    """A store URL that cannot be opened, or an object that cannot be read or written."""


def s3_options_from_env() -> dict[str, Any]:
    """fsspec/s3fs options for the endpoint named in the environment (credentials stay with botocore)."""
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("DDPMSEG_S3_ENDPOINT")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts.setdefault("client_kwargs", {})["region_name"] = region
    return opts


@dataclass(frozen=True)
class StoreLocation:
    """A store root. `url` is an absolute local path or `s3://bucket/prefix`."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def parse(cls, url: str | Path, storage_options: dict[str, Any] | None = None) -> "StoreLocation":
        text = str(url).strip()
        if not text:
            raise StoreAccessError("store URL is empty: expected a local path or s3://bucket/prefix")
        if text.startswith("s3://"):
            if not text[len("s3://"):].strip("/"):
                raise StoreAccessError(f"store URL {text!r}: no bucket; expected s3://bucket/prefix")
            opts = {**s3_options_from_env(), **(storage_options or {})}
            return cls(text.rstrip("/"), opts)
        if "://" in text and not text.startswith("file://"):
            raise StoreAccessError(f"store URL {text!r}: expected a local path or s3://bucket/prefix")
        return cls(str(Path(text.removeprefix("file://")).expanduser().resolve()))

    @property
    def is_remote(self) -> bool:
        return self.url.startswith("s3://")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self.is_remote:
            return fsspec.filesystem("s3", **self.storage_options)
        return fsspec.filesystem("file")

    def path(self, key: str = "") -> str:
        return f"{self.url}/{key}".rstrip("/") if key else self.url

    def zarr_store(self, read_only: bool = False) -> zarr.abc.store.Store:
        if self.is_remote:
            return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options,
                                                     read_only=read_only)
        Path(self.url).mkdir(parents=True, exist_ok=True)
        return zarr.storage.LocalStore(self.url, read_only=read_only)

    # Plain objects (stage records, model members, metrics) beside the zarr hierarchy -------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object atomically: a reader sees the old object, nothing, or the whole new one."""
        if self.is_remote:
            try:
                self.fs.pipe_file(self.path(key), data)  # one PUT: atomic on S3
            except Exception as err:  # noqa: BLE001 - s3fs raises many kinds
                raise StoreAccessError(f"cannot write {self.path(key)}: {err}") from err
            return
        target = Path(self.path(key))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001
            raise StoreAccessError(f"cannot read {self.path(key)}: {err}") from err

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def list(self, prefix: str) -> list[str]:
        """Names directly below `prefix` (empty when it does not exist)."""
        try:
            entries = self.fs.ls(self.path(prefix), detail=False)
        except FileNotFoundError:
            return []
        return sorted(Path(e).name for e in entries)

    def delete(self, prefix: str) -> None:
        if self.exists(prefix):
            self.fs.rm(self.path(prefix), recursive=True)

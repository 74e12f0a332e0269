"""Where a store lives: a local directory or `s3://bucket/prefix` (S3 / MinIO through fsspec), one code path.

S3 settings come from the environment, never from code: the usual AWS_* variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION / AWS_DEFAULT_REGION, AWS_PROFILE) and AWS_ENDPOINT_URL for MinIO or any
S3-compatible endpoint.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import zarr
import zarr.storage


class StoreAccessError(RuntimeError):
    """A store URL that cannot be opened, or an object that cannot be read or written."""


class CorruptObjectError(StoreAccessError):
    """A stored object that does not parse (a truncated zarr.json, stage record or metrics) or whose checksum
    does not match (a member, a record); the message names the file and the command that removes it."""


def corrupt_object_message(url: str, key: str, what: str) -> str:
    """`<url>/<key>: <what>; run `ddpmseg store verify <url> --repair`: ...` (one line)."""
    return (f"{url}/{key}: {what}; run `ddpmseg store verify {url} --repair` to remove it (the next run "
            f"recomputes exactly what it held)")


#: attempts of one object/array write before a dropped connection becomes an error (each attempt itself
#: retried by botocore); nothing is committed by a failed write (commit markers come last).
WRITE_ATTEMPTS = int(os.environ.get("DDPMSEG_WRITE_ATTEMPTS", "3"))


def is_transient(err: BaseException) -> bool:
    """A connection-level failure worth retrying (not a permission or a programming error)."""
    try:
        import botocore.exceptions as bce
        if isinstance(err, bce.ClientError):
            return False
        if isinstance(err, bce.BotoCoreError):
            return True
    except ImportError:  # pragma: no cover - s3fs brings botocore
        pass
    return isinstance(err, (ConnectionError, TimeoutError)) or type(err).__name__ in (
        "ClientConnectorError", "ServerDisconnectedError", "ClientOSError")


def describe_error(err: BaseException) -> str:
    text = str(err)
    if "AccessDenied" in text or "Forbidden" in text or isinstance(err, PermissionError):
        return f"no permission ({text}); writing needs credentials with write access"
    return text


def with_retries(action, what: str, attempts: int | None = None, writing: bool = True):
    """Run `action()`; retry transient connection failures a bounded number of times, then raise
    StoreAccessError naming `what` (for a write, saying that nothing partial was committed)."""
    attempts = attempts or WRITE_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except StoreAccessError:
            raise
        except Exception as err:  # noqa: BLE001 - fsspec/s3fs/zarr raise many kinds
            if attempt < attempts and is_transient(err):
                time.sleep(0.5 * attempt)
                continue
            tried = f" after {attempt} attempts" if attempt > 1 else ""
            resume = ". Nothing partial was committed; re-run to resume" if writing else ""
            raise StoreAccessError(f"cannot {what}{tried}: {describe_error(err)}{resume}") from err


def s3_options_from_env() -> dict[str, Any]:
    """fsspec/s3fs options for the endpoint named in the environment (credentials stay with botocore)."""
    opts: dict[str, Any] = {"use_listings_cache": False,  # other writers change the store under us
                            "config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 2}}}
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
    read_only: bool = field(default=False, compare=False)

    @classmethod
    def parse(cls, url: str | Path, storage_options: dict[str, Any] | None = None,
              read_only: bool = False) -> "StoreLocation":
        text = str(url).strip()
        if not text:
            raise StoreAccessError("store URL is empty: expected a local path or s3://bucket/prefix")
        if text.startswith("s3://"):
            if not text[len("s3://"):].strip("/"):
                raise StoreAccessError(f"store URL {text!r}: no bucket; expected s3://bucket/prefix")
            opts = {**s3_options_from_env(), **(storage_options or {})}
            return cls(text.rstrip("/"), opts, read_only)
        if "://" in text and not text.startswith("file://"):
            raise StoreAccessError(f"store URL {text!r}: expected a local path or s3://bucket/prefix")
        return cls(str(Path(text.removeprefix("file://")).expanduser().resolve()), read_only=read_only)

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
        """The zarr store at this root; a local directory is created only when opened for writing."""
        if self.is_remote:
            return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options,
                                                     read_only=read_only)
        if not read_only:
            Path(self.url).mkdir(parents=True, exist_ok=True)
        return zarr.storage.LocalStore(self.url, read_only=read_only)

    def holds_store(self) -> bool:
        """A store exists here (its root group's zarr.json); nothing is created. Raises on an unreachable S3."""
        if not self.is_remote:
            return (Path(self.url) / "zarr.json").is_file()
        return self.fs.exists(self.path("zarr.json"))

    def require_store(self, hint: str = "") -> None:
        """StoreAccessError saying that no store exists here (for reads, which never create one)."""
        if not self.holds_store():
            raise StoreAccessError(f"no store exists at {self.url}{hint}")

    # Plain objects (stage records, model members, metrics) beside the zarr hierarchy -------------------------
    def check_writable(self, what: str) -> None:
        if self.read_only:
            raise StoreAccessError(f"{what}: the store {self.url} is opened read-only, and this run needs to write "
                                   f"it (a stage is missing from the store); run without --read-only with write "
                                   f"credentials, or ask a teammate who can write to run this config once")

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object atomically: a reader sees the old object, nothing, or the whole new one."""
        self.check_writable(self.path(key))
        if self.is_remote:
            with_retries(lambda: self.fs.pipe_file(self.path(key), data), f"write {self.path(key)}")  # one PUT
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

    def find(self, prefix: str = "") -> list[str]:
        """Keys (relative to the root) of every object below `prefix`, sorted."""
        base = self.path(prefix)
        try:
            found = self.fs.find(base, withdirs=False)
        except FileNotFoundError:
            return []
        root = self.url.removeprefix("s3://").rstrip("/") + "/"
        return sorted(str(f).removeprefix("s3://").removeprefix(root) for f in found)

    def delete(self, prefix: str) -> None:
        if self.exists(prefix):
            self.fs.rm(self.path(prefix), recursive=True)

"""Checks before a run: everything a run needs that can be checked without Prefect, so that bad input fails in
one line before an orchestrator starts (`flows.runner.run_config` calls `check_run`).

What is checked, each failure a user error naming the file / key / value and what was expected:
- the output directory (`output_dir`): a directory, or creatable, and writable; nothing in it that a run
  writes (masks/, report/, metrics.json, the lock file) is of the wrong kind;
- the store: a local directory that exists or can be created, writable (`--read-only`: one that exists, holding
  a store); an s3:// store reachable, its bucket existing, and writable (one probe object written and
  deleted) unless read-only;
- the backbone's checkpoint: exists and can be read (its digest, which the run needs anyway, is computed here;
  storage.keys caches it, so the run does not read the file again);
- both data set splits: directories, images and labels, as `ddpmseg status` reads them (flows.prepare with
  write=False).
Nothing here writes, except the S3 probe object; this module does not import Prefect.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from pipeline.backbone import BackboneError
from pipeline.config import ConfigError, ExperimentConfig
from storage.location import StoreAccessError, StoreLocation, describe_error

__all__ = ["check_run", "check_output_dir", "check_store", "check_checkpoint", "check_datasets"]

#: what a run writes into output_dir, and whether each is a directory (flows/outputs.py, flows/references.py)
_OUTPUTS = {"masks": True, "report": True, "metrics.json": False, "ddpmseg.lock.json": False}


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable_dir(path: Path, what: str) -> None:
    """`path` is a writable directory, or can be created as one (its nearest existing ancestor is a writable
    directory). ConfigError naming `what` otherwise."""
    existing = _nearest_existing(path)
    if not existing.is_dir():
        where = "is" if existing == path else f"is inside {existing}, which is"
        raise ConfigError(f"{what} {path} {where} a file, expected a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (its nearest existing parent {existing})"
        raise ConfigError(f"{what} {path}{where} is not writable")


def check_output_dir(cfg: ExperimentConfig) -> None:
    """output_dir, and what a run writes into it, can be written."""
    out = Path(cfg.output_dir)
    _check_creatable_dir(out, "output_dir:")
    for name, is_dir in _OUTPUTS.items():
        path = out / name
        if path.exists() and path.is_dir() != is_dir:
            kind, expected = ("a file", "a directory") if is_dir else ("a directory", "a file")
            raise ConfigError(f"output_dir: {path} is {kind}, expected {expected} (a run writes it)")
        if path.exists() and not os.access(path, os.W_OK | (os.X_OK if is_dir else 0)):
            raise ConfigError(f"output_dir: {path} is not writable (a run writes it)")


def check_store(loc: StoreLocation, write: bool) -> None:
    """The store can be read, and written when `write` (nothing is created). StoreAccessError otherwise."""
    if not loc.is_remote and write:
        try:
            _check_creatable_dir(Path(loc.url), "store")
        except ConfigError as err:
            raise StoreAccessError(str(err)) from None
        return
    try:
        if not write:
            loc.require_store(" (a read-only run reads an existing store)")
            return
        probe = loc.path(f".ddpmseg-write-check-{uuid.uuid4().hex[:12]}")
        loc.fs.pipe_file(probe, b"")
        loc.fs.rm_file(probe)
    except StoreAccessError:
        raise
    except FileNotFoundError as err:
        raise StoreAccessError(f"store {loc.url}: {err} (does the bucket exist?)") from err
    except Exception as err:  # noqa: BLE001 - s3fs/botocore/aiohttp raise many kinds for one outage
        doing = "write to" if write else "read"
        raise StoreAccessError(f"cannot {doing} the store {loc.url}: {describe_error(err)}"
                               f"{_endpoint_hint(loc)}") from err


def _endpoint_hint(loc: StoreLocation) -> str:
    endpoint = loc.storage_options.get("client_kwargs", {}).get("endpoint_url")
    return f" (endpoint {endpoint}, from AWS_ENDPOINT_URL)" if endpoint else ""


def check_checkpoint(cfg: ExperimentConfig) -> None:
    """model.checkpoint, when set, is a readable file (its digest is computed and cached for the run)."""
    from flows.stage_keys import backbone_fingerprint

    try:
        backbone_fingerprint(cfg)
    except OSError as err:
        raise BackboneError(f"model.checkpoint {cfg.model.checkpoint}: cannot read it "
                            f"({err.strerror or err}); expected a readable checkpoint file") from err


def check_datasets(cfg: ExperimentConfig, loc: StoreLocation) -> None:
    """Both splits load (directories, images, labels), as `ddpmseg status` reads them: nothing is written."""
    from flows.prepare import prepare_split
    from storage.features import FeatureStore

    store = FeatureStore(loc, read_only=True)  # not opened: prepare_split(write=False) reads only the disk
    for split in ("train", "test"):
        prepare_split(cfg, store, split, write=False)


def check_run(cfg: ExperimentConfig, store_url: str | None = None, read_only: bool = False) -> None:
    """Everything a run of `cfg` needs that can be checked without Prefect; raises the first user error
    (ConfigError, StoreAccessError, BackboneError, DatasetError)."""
    check_output_dir(cfg)
    loc = StoreLocation.parse(store_url or cfg.store, read_only=read_only)
    check_store(loc, write=not read_only)
    check_checkpoint(cfg)
    check_datasets(cfg, loc)

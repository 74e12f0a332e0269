"""Downloading the official assets: guided-diffusion (and MAE / SwAV) checkpoints and the labelled data sets.

The URLs are those of the official repository's scripts (yandex-research/ddpm-segmentation:
checkpoints/{ddpm,mae,swav,swav_w2}/download_checkpoint.sh, datasets/download_datasets.sh): one base URL, a file per
asset. A download

- goes to `<file>.part` beside its destination and continues from that file's size with an HTTP Range request
  (a server that ignores Range sends the whole file again, which is detected and restarts the part);
- is renamed into place only when complete and verified: its size equals the size the server announced (and the
  manifest's, when known) and its SHA-256 equals the manifest's digest, or the digest recorded by this cache's first
  download of that asset (`<home>/digests.json`) when the manifest has none. A mismatch deletes the part and
  raises AssetError; nothing is put in place;
- shows a progress bar (MB, MB/s, ETA) on stderr;
- fails with one AssetError line naming the URL, the reason and how to place the file by hand.

The base URL can be replaced by a mirror with $DDPMSEG_ASSETS_URL, one asset's URL with $DDPMSEG_URL_<NAME>
(e.g. DDPMSEG_URL_DDPM_FFHQ for "ddpm/ffhq"). Assets published elsewhere carry their own absolute URL (`Asset.url`):
torchvision's ImageNet ResNet weights ("imagenet/resnet101", "imagenet/resnet50", the backbone the official DatasetDDPM
segmenter starts from), which $DDPMSEG_ASSETS_URL does not move; their file names end in the first 8 hex digits of
the file's SHA-256 (torchvision's check_hash), checked after the download like a shipped digest. The data set
archive is unpacked into `<home>/datasets/`: each data set directory is extracted to a temporary directory first and
renamed into place whole.

Functions take the cache directory (`home`) as an argument; pipeline/fetched.py says where it is by default.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "OFFICIAL_BASE_URL", "BASE_URL_ENV", "Asset", "AssetError", "FetchResult", "MANIFEST", "CHECKPOINT_FAMILIES",
    "CHECKPOINT_NAMES",
    "IMAGENET_WEIGHTS", "torchvision_asset", "asset_url", "url_env_name", "checkpoint_asset", "is_present", "fetch",
    "recorded_digests", "sha256_of",
    "unpack_datasets", "DATASETS_MARKER",
]

OFFICIAL_BASE_URL = "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/"
BASE_URL_ENV = "DDPMSEG_ASSETS_URL"
DIGESTS_FILE = "digests.json"
DATASETS_MARKER = ".ddpmseg-unpacked.json"  # written last in <home>/datasets/ by unpack_datasets
_CHUNK = 1 << 20


class AssetError(RuntimeError):
    """A download or unpack that failed or was refused; the message (one line) names the URL or file and the fix."""


@dataclass(frozen=True)
class Asset:
    """One downloadable file of the official release."""

    name: str                      # "ddpm/ffhq", "mae/lsun_cat", "datasets"
    url_path: str                  # relative to the base URL
    local_path: str                # relative to the cache directory (the official repository's layout)
    sha256: str | None = None      # shipped digest, where established; None: recorded on first download
    size: int | None = None        # exact bytes, where established
    approx_bytes: int | None = None  # estimate for planning disk and time (see `size_source`)
    size_source: str = ""          # where approx_bytes comes from
    archive: bool = False          # a .tar.gz unpacked into local_path (a directory)
    also_at: tuple[str, ...] = ()  # other places the same file is published (named in errors; never fetched silently)
    url: str | None = None         # an absolute URL (not under the base URL; $DDPMSEG_ASSETS_URL does not apply)
    sha256_prefix: str | None = None  # leading hex digits the file's SHA-256 must have (torchvision's file names)

    @property
    def filename(self) -> str:
        return (self.url or self.url_path).rsplit("/", 1)[-1]

    def path(self, home: Path) -> Path:
        """Where the asset lives once fetched (for the archive: the directory it is unpacked into)."""
        return Path(home) / self.local_path

    def download_path(self, home: Path) -> Path:
        """Where the downloaded file is written (the archive goes to downloads/ and is deleted once unpacked)."""
        return Path(home) / "downloads" / self.filename if self.archive else self.path(home)


#: The guided-diffusion checkpoints hold the 552,814,086 float32 values of the official flags' state dict (counted on
#: a model built on the meta device): 2,211,256,344 bytes of tensor data, plus the file's small pickle overhead.
_DDPM_BYTES = 2_211_256_344
_DDPM_SOURCE = "estimated: the float32 tensor bytes of the official flags' state dict"
CHECKPOINT_NAMES = ("lsun_bedroom", "ffhq", "lsun_cat", "lsun_horse")
_GUIDED_DIFFUSION_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
#: family -> (URL folder under models/, file suffix); fetched to checkpoints/<family>/<name><suffix>
CHECKPOINT_FAMILIES: dict[str, tuple[str, str]] = {
    "ddpm": ("ddpm_checkpoints", ".pt"),
    "mae": ("mae_checkpoints", ".pth"),
    "swav": ("swav_checkpoints", ".pth"),
    "swav_w2": ("swav_w2_checkpoints", ".pth"),
}


#: torchvision's IMAGENET1K_V1 classification weights (ResNet101_Weights / ResNet50_Weights), the backbone
#: torchvision's deeplabv3_resnet101(pretrained=False) loads; pipeline/fetched.py names the same files.
_TORCHVISION_URL = "https://download.pytorch.org/models/"
IMAGENET_WEIGHTS: dict[str, str] = {"resnet101": "resnet101-63fe2227.pth", "resnet50": "resnet50-0676ba61.pth"}
#: 4 bytes per parameter of torchvision's resnet101 / resnet50 (its documented num_params; buffers not counted)
_IMAGENET_BYTES = {"resnet101": 44_549_160 * 4, "resnet50": 25_557_032 * 4}
_TORCHVISION_HASH = re.compile(r"-([a-f0-9]+)\.")  # torchvision.hub's HASH_REGEX


def torchvision_asset(name: str, url: str, local_path: str, approx_bytes: int | None = None) -> Asset:
    """An asset published by torchvision: `url` absolute, the SHA-256 prefix taken from its file name
    ("resnet101-63fe2227.pth" -> "63fe2227"); ValueError when the name carries none."""
    match = _TORCHVISION_HASH.search(url.rsplit("/", 1)[-1])
    if not match:
        raise ValueError(f"{url}: the file name carries no '-<sha256 prefix>.' as torchvision's do")
    return Asset(name=name, url_path="", url=url, local_path=local_path, sha256_prefix=match.group(1),
                 approx_bytes=approx_bytes, size_source="estimated: float32 parameters (torchvision's num_params)"
                 if approx_bytes else "unknown")


def _official_manifest() -> dict[str, Asset]:
    assets: dict[str, Asset] = {}
    for family, (folder, suffix) in CHECKPOINT_FAMILIES.items():
        for name in CHECKPOINT_NAMES:
            ddpm = family == "ddpm"
            # the official README links the LSUN DDPMs to guided-diffusion's own release
            also_at = (f"{_GUIDED_DIFFUSION_URL}{name}.pt",) if ddpm and name.startswith("lsun_") else ()
            assets[f"{family}/{name}"] = Asset(
                name=f"{family}/{name}", url_path=f"models/{folder}/{name}{suffix}",
                local_path=f"checkpoints/{family}/{name}{suffix}", also_at=also_at,
                approx_bytes=_DDPM_BYTES if ddpm else None, size_source=_DDPM_SOURCE if ddpm else "unknown")
    assets["datasets"] = Asset(name="datasets", url_path="datasets.tar.gz", local_path="datasets", archive=True,
                               approx_bytes=47_000_000, size_source="the official README: ~47 MB")
    for backbone, filename in IMAGENET_WEIGHTS.items():
        assets[f"imagenet/{backbone}"] = torchvision_asset(f"imagenet/{backbone}", _TORCHVISION_URL + filename,
                                                           f"checkpoints/imagenet/{filename}",
                                                           _IMAGENET_BYTES[backbone])
    return assets


#: name -> Asset. No SHA-256 digest of the official files could be established without downloading them, so every
#: digest is recorded by the first download into a cache (and shown by `ddpmseg fetch list`); add `sha256=` and
#: `size=` here once known. Tests register their own assets in this mapping.
MANIFEST: dict[str, Asset] = _official_manifest()


def checkpoint_asset(name: str, family: str = "ddpm") -> Asset:
    """The manifest entry for "ffhq", "ffhq.pt", "ddpm/ffhq" or "mae/ffhq"; AssetError listing the known names."""
    key = name if "/" in name else f"{family}/{name}"
    key = re.sub(r"\.pth?$", "", key)
    if key not in MANIFEST or MANIFEST[key].archive:
        known = sorted(n for n, a in MANIFEST.items() if not a.archive)
        raise AssetError(f"unknown checkpoint {name!r}; known: {', '.join(known)}")
    return MANIFEST[key]


def url_env_name(asset: Asset) -> str:
    """The environment variable that overrides one asset's URL: DDPMSEG_URL_DDPM_FFHQ for "ddpm/ffhq"."""
    return "DDPMSEG_URL_" + re.sub(r"[^A-Z0-9]", "_", asset.name.upper())


def asset_url(asset: Asset) -> str:
    """$DDPMSEG_URL_<NAME>, else the asset's absolute URL, else $DDPMSEG_ASSETS_URL + the asset's path, else the
    official URL."""
    own = os.environ.get(url_env_name(asset))
    if own:
        return own
    if asset.url:
        return asset.url
    base = os.environ.get(BASE_URL_ENV) or OFFICIAL_BASE_URL
    return base.rstrip("/") + "/" + asset.url_path


@dataclass
class FetchResult:
    """What fetch() did for one asset."""

    name: str
    path: str                # the file (or, for the archive, the directory it was unpacked into)
    url: str
    state: str               # "present" (nothing done) | "downloaded"
    bytes: int               # size of the downloaded file (0 when present)
    sha256: str | None       # its digest (None when present and not re-hashed)
    digest_source: str       # "manifest" | "recorded" (checked against an earlier download) | "first download" | ""
    resumed_from: int = 0    # bytes of an earlier .part continued with a Range request
    seconds: float = 0.0
    unpacked: tuple[str, ...] = ()  # data set directories unpacked from the archive


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def recorded_digests(home: Path) -> dict[str, dict[str, Any]]:
    """name -> {"sha256", "size", "url", "recorded"} from <home>/digests.json (empty when absent)."""
    try:
        data = json.loads((Path(home) / DIGESTS_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise AssetError(f"{Path(home) / DIGESTS_FILE}: unreadable ({err}); delete it to record digests again") from None
    return data if isinstance(data, dict) else {}


def _record_digest(home: Path, asset: Asset, digest: str, size: int, url: str) -> None:
    digests = recorded_digests(home)
    digests[asset.name] = {"sha256": digest, "size": size, "url": url,
                           "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = Path(home) / DIGESTS_FILE
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(digests, indent=1, sort_keys=True))
    os.replace(tmp, path)


def is_present(asset: Asset, home: Path) -> bool:
    """True when the asset is in place: the file, or for the archive the unpack marker written last."""
    if asset.archive:
        return (asset.path(home) / DATASETS_MARKER).is_file()
    return asset.path(home).is_file()


def _by_hand(asset: Asset, url: str, home: Path) -> str:
    target = asset.download_path(home)
    if asset.archive:
        how = f"download {url} and unpack it with `tar -xzf {asset.filename} -C {asset.path(home)}`"
    else:
        how = f"download {url} and save it as {target}"
    also = f" (also published at {', '.join(asset.also_at)})" if asset.also_at else ""
    if asset.url:  # not under the base URL: only its own variable moves it
        return f"to place it by hand: {how}{also}; or point ${url_env_name(asset)} at a mirror"
    return (f"to place it by hand: {how}{also}; or point ${BASE_URL_ENV} (all assets) or ${url_env_name(asset)} "
            f"(this one) at a mirror")


class _Cut(Exception):
    """The transfer stopped before the announced end; the part file holds what arrived."""


def _progress_bar(asset: Asset, total: int | None, initial: int, stream: IO[str] | None):
    from tqdm import tqdm

    # counted in MB (float) so the rate always reads MB/s
    return tqdm(total=None if total is None else total / 1e6, initial=initial / 1e6, unit="MB", file=stream or sys.stderr,
                desc=asset.filename, dynamic_ncols=True, mininterval=0.5,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} MB {rate_fmt} ETA {remaining}"
                if total is not None else "{desc}: {n:.1f} MB {rate_fmt}")


def _transfer(asset: Asset, url: str, part: Path, timeout: float, progress: bool,
              stream: IO[str] | None) -> tuple[int, int]:
    """Download `url` into `part`, continuing from its size. Returns (bytes continued from, announced total or -1).
    Raises _Cut when the connection ends early, urllib/OS errors when none could be opened."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "ddpmseg"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left to send: the part already holds the whole file
            match = re.search(r"/(\d+)$", err.headers.get("Content-Range", "") or "")
            return offset, int(match.group(1)) if match else -1
        raise
    with response:
        status = response.status
        if status == 206:
            match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise AssetError(f"{url}: the server answered the range request for bytes {offset}- with "
                                 f"Content-Range {response.headers.get('Content-Range')!r}; delete {part} to start "
                                 f"over")
            total = int(match.group(2)) if match.group(2) != "*" else -1
            mode = "ab"
        else:  # 200: the whole file (a server without Range support restarts the part)
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else -1
            mode = "wb"
        bar = _progress_bar(asset, total if total >= 0 else None, offset, stream) if progress else None
        written = offset
        try:
            with open(part, mode) as out:
                while True:
                    try:
                        block = response.read(_CHUNK)
                    except (http.client.IncompleteRead, OSError) as err:
                        raise _Cut(str(err) or type(err).__name__) from None
                    if not block:
                        break
                    out.write(block)
                    written += len(block)
                    if bar is not None:
                        bar.update(len(block) / 1e6)
        finally:
            if bar is not None:
                bar.close()
    if total >= 0 and written < total:
        raise _Cut(f"connection closed after {written} of {total} bytes")
    return offset, total


def _verify(asset: Asset, home: Path, part: Path, url: str, total: int) -> tuple[str, str]:
    """(digest, source) of a complete part; AssetError (after deleting the part) when size or digest is wrong."""
    size = part.stat().st_size
    expected_size = asset.size if asset.size is not None else (total if total >= 0 else None)
    recorded = recorded_digests(home).get(asset.name)
    digest = sha256_of(part)
    if asset.sha256:
        expected, source = asset.sha256, "manifest"
    elif recorded:
        expected, source = recorded.get("sha256"), "recorded"
    else:
        expected, source = None, "first download"
    problem = None
    if expected_size is not None and size != expected_size:
        problem = f"{size} bytes, expected {expected_size}"
    elif expected is not None and digest != expected:
        where = "the shipped manifest" if source == "manifest" else \
            f"the digest recorded by this cache's first download ({Path(home) / DIGESTS_FILE})"
        problem = f"sha256 {digest}, expected {expected} from {where}"
    elif asset.sha256_prefix and not digest.startswith(asset.sha256_prefix):
        problem = (f"sha256 {digest} does not start with {asset.sha256_prefix}, the prefix its file name "
                   f"{asset.filename} promises (torchvision's check)")
    if problem:
        part.unlink()
        raise AssetError(f"download of {url} refused: {problem}; the partial file was deleted and nothing was put "
                         f"in place (run the command again to download afresh)")
    return digest, source


class _DownloadLock:
    """`<file>.lock` holding the downloading process's id, created exclusively: two fetches of one asset never
    append to the same part. A lock whose process no longer runs (killed) is taken over."""

    def __init__(self, path: Path, url: str):
        self.path, self.url = path, url

    def __enter__(self) -> "_DownloadLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and _process_runs(pid):
                    raise AssetError(f"another ddpmseg fetch (process {pid}) is downloading {self.url} "
                                     f"(lock {self.path}); wait for it to finish") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise AssetError(f"cannot take the download lock {self.path}; delete it if no ddpmseg fetch is running")

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fetch(asset: Asset, home: Path, *, progress: bool = True, timeout: float = 60.0, attempts: int = 3,
          stream: IO[str] | None = None) -> FetchResult:
    """Download (resuming), verify and put one asset in place under `home`; unpack the data set archive.

    attempts: how many times a transfer that stopped midway is resumed within this call (a failure to connect is
    not retried). Raises AssetError (one line) for a network failure, a refused file or a bad archive."""
    home = Path(home)
    url = asset_url(asset)
    if is_present(asset, home):
        return FetchResult(asset.name, str(asset.path(home)), url, "present", 0, None, "")
    target = asset.download_path(home)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    with _DownloadLock(target.with_name(target.name + ".lock"), url):
        return _fetch_locked(asset, home, url, target, part, progress, timeout, attempts, stream)


def _fetch_locked(asset: Asset, home: Path, url: str, target: Path, part: Path, progress: bool, timeout: float,
                  attempts: int, stream: IO[str] | None) -> FetchResult:
    if is_present(asset, home):  # another fetch finished it between the caller's check and the lock
        return FetchResult(asset.name, str(asset.path(home)), url, "present", 0, None, "")
    resumed_from = 0
    started = time.perf_counter()
    total = -1
    for attempt in range(1, max(1, attempts) + 1):
        before = part.stat().st_size if part.exists() else 0
        try:
            continued, total = _transfer(asset, url, part, timeout, progress, stream)
            if attempt == 1:
                resumed_from = continued
            break
        except _Cut as cut:
            now = part.stat().st_size if part.exists() else 0
            if attempt == 1:
                resumed_from = before
            if attempt < attempts and now > before:
                continue  # progress was made: resume from the new end
            raise AssetError(f"download of {url} stopped at {now / 1e6:.1f} MB ({cut}); the part is kept at {part}: "
                             f"run the same command again to resume") from None
        except urllib.error.HTTPError as err:
            raise AssetError(f"cannot download {url}: HTTP {err.code} {err.reason}; "
                             f"{_by_hand(asset, url, home)}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise AssetError(f"cannot download {url}: {reason}; {_by_hand(asset, url, home)}") from None
    digest, source = _verify(asset, home, part, url, total)
    size = part.stat().st_size
    os.replace(part, target)
    if source == "first download":
        _record_digest(home, asset, digest, size, url)
    unpacked: tuple[str, ...] = ()
    if asset.archive:
        unpacked = tuple(unpack_datasets(target, asset.path(home), digest))
        target.unlink()
    return FetchResult(asset.name, str(asset.path(home)), url, "downloaded", size, digest, source,
                       resumed_from=resumed_from, seconds=time.perf_counter() - started, unpacked=unpacked)


def _dataset_root(extracted: Path) -> Path:
    """The directory holding the data set folders (<name>/real/...): the extraction root, or a single top folder
    such as datasets/ when the archive has one."""
    def holds_datasets(d: Path) -> bool:
        return any((c / "real").is_dir() for c in d.iterdir() if c.is_dir())

    if holds_datasets(extracted):
        return extracted
    children = [c for c in extracted.iterdir() if c.is_dir()]
    if len(children) == 1 and holds_datasets(children[0]):
        return children[0]
    raise AssetError(f"archive layout not recognised: expected folders <data set>/real/{{train,test}} at its top "
                     f"(or under one top folder); found {sorted(c.name for c in extracted.iterdir())[:10]}")


def unpack_datasets(archive: Path, target: Path, archive_sha256: str | None = None) -> list[str]:
    """Unpack the official data set archive into `target` (<home>/datasets) in the official layout; returns the
    data set names. Each data set folder is extracted to a temporary directory under `target`'s parent and renamed
    into place whole (an existing folder of the same name is replaced); the marker file is written last."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(scratch, filter="data")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise AssetError(f"{archive}: cannot unpack ({err}); delete it and fetch again") from None
        root = _dataset_root(scratch)
        names = sorted(c.name for c in root.iterdir() if c.is_dir() and (c / "real").is_dir())
        for name in names:
            destination = target / name
            if destination.exists():
                old = scratch / f".old-{name}"
                os.replace(destination, old)
            os.replace(root / name, destination)
        marker = target / DATASETS_MARKER
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps({"archive_sha256": archive_sha256, "datasets": names}, indent=1))
        os.replace(tmp, marker)
        return names
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

"""Where `ddpmseg fetch` puts the official assets: the cache directory and its layout (paths only, no network).

    $DDPMSEG_HOME (default: the platform's user cache directory + /ddpmseg, e.g. ~/.cache/ddpmseg)
        checkpoints/ddpm/<name>.pt          guided-diffusion checkpoints (lsun_bedroom, ffhq, lsun_cat, lsun_horse)
        checkpoints/{mae,swav,swav_w2}/<name>.pth
        checkpoints/imagenet/<torchvision file>  torchvision's ImageNet ResNets (resnet101-63fe2227.pth, ...)
        datasets/<preset>/real/{train,test} the labelled data sets, unpacked from the official archive

The layout under the cache directory is the official repository's (checkpoints/ddpm/ffhq.pt,
datasets/ffhq_34/real/train, ...), so a clone of that repository's asset folders can be used as $DDPMSEG_HOME.
The downloader (storage/assets.py) writes this layout; the config (pipeline/config.py) reads it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["HOME_ENV", "IMAGENET_WEIGHTS", "assets_home", "user_cache_dir", "checkpoint_path", "dataset_dirs",
           "imagenet_weights_path", "torch_hub_weights_path"]

HOME_ENV = "DDPMSEG_HOME"
#: DeepLabV3 backbone -> torchvision's IMAGENET1K_V1 file (storage/assets.py downloads the same names)
IMAGENET_WEIGHTS = {"resnet101": "resnet101-63fe2227.pth", "resnet50": "resnet50-0676ba61.pth"}


def user_cache_dir() -> Path:
    """The platform's per-user cache directory: ~/Library/Caches (macOS), %LOCALAPPDATA% (Windows),
    $XDG_CACHE_HOME or ~/.cache (elsewhere)."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        return Path(local) if local else Path.home() / "AppData" / "Local"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"


def assets_home() -> Path:
    """$DDPMSEG_HOME when set, else <user cache dir>/ddpmseg; absolute, not created."""
    env = os.environ.get(HOME_ENV)
    base = Path(env).expanduser() if env else user_cache_dir() / "ddpmseg"
    return base.resolve()


def checkpoint_path(filename: str, family: str = "ddpm", home: Path | None = None) -> Path:
    """The fetched checkpoint `filename` (e.g. "ffhq.pt") of a backbone family (ddpm, mae, swav, swav_w2)."""
    return (home or assets_home()) / "checkpoints" / family / filename


def dataset_dirs(preset: str, home: Path | None = None) -> tuple[Path, Path]:
    """(train, test) directories of a fetched data set: datasets/<preset>/real/{train,test}."""
    root = (home or assets_home()) / "datasets" / preset / "real"
    return root / "train", root / "test"


def imagenet_weights_path(backbone: str, home: Path | None = None) -> Path:
    """torchvision's fetched ImageNet weights of a DeepLabV3 backbone (a key of IMAGENET_WEIGHTS):
    checkpoints/imagenet/<file>, fetched by `ddpmseg fetch checkpoint imagenet/<backbone>`."""
    return checkpoint_path(IMAGENET_WEIGHTS[backbone], family="imagenet", home=home)


def torch_hub_weights_path(backbone: str) -> Path:
    """Where torchvision itself keeps the same file once it has downloaded it: $TORCH_HOME/hub/checkpoints/<file>
    ($TORCH_HOME defaults to <user cache dir>/torch, as torch.hub.get_dir() on Linux)."""
    env = os.environ.get("TORCH_HOME")
    torch_home = Path(env).expanduser() if env else user_cache_dir() / "torch"
    return torch_home / "hub" / "checkpoints" / IMAGENET_WEIGHTS[backbone]

"""`ddpmseg fetch`: download the official checkpoints and data sets into $DDPMSEG_HOME (wired by flows/cli.py).

    ddpmseg fetch checkpoint PRESET|NAME... [--family ddpm|mae|swav|swav_w2]   (also imagenet/resnet101|resnet50)
    ddpmseg fetch datasets
    ddpmseg fetch list [--json]

Also `require_assets(cfg)`: the check `ddpmseg run` / `status` make before starting, which names the fetch command
for a preset's missing checkpoint or data set.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_DESCRIPTION = """\
Download the official assets of yandex-research/ddpm-segmentation into the cache directory $DDPMSEG_HOME
(default: the platform's user cache dir + /ddpmseg, e.g. ~/.cache/ddpmseg), in the official layout:

  checkpoints/ddpm/{lsun_bedroom,ffhq,lsun_cat,lsun_horse}.pt   guided-diffusion UNets (~2.2 GB each, estimated)
  checkpoints/{mae,swav,swav_w2}/<name>.pth                     the paper's MAE / SwAV baselines
  checkpoints/imagenet/resnet{101-63fe2227,50-0676ba61}.pth     torchvision's ImageNet ResNets (DatasetDDPM's
                                                                segmenter backbone; from download.pytorch.org)
  datasets/<preset>/real/{train,test}                           the six labelled data sets (one ~47 MB archive)

Presets find what was fetched: `dataset.preset: ffhq_34` without train_dir/test_dir reads
datasets/ffhq_34/real/..., and a preset's default model.checkpoint is checkpoints/ddpm/<name>.pt (beside the config
when that file exists there, as in the official repository, else in $DDPMSEG_HOME).

Protocol: each file downloads to <file>.part and resumes from it with an HTTP Range request (re-run after an
interruption); it is renamed into place only when its size matches the server's and its SHA-256 matches the
digest shipped in the manifest or, where none is shipped, the one recorded by this cache's first download
($DDPMSEG_HOME/digests.json, shown by `ddpmseg fetch list`). A mismatch deletes the part; nothing is put in place.
The data set archive is unpacked (each data set folder renamed into place whole) and then deleted."""

_EPILOG = """\
mirrors: DDPMSEG_ASSETS_URL=https://mirror/ddpm-segmentation/ replaces the official base URL
  (https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/) for every asset;
  DDPMSEG_URL_<NAME> replaces one asset's URL, e.g. DDPMSEG_URL_DDPM_FFHQ=https://host/ffhq.pt.
  imagenet/* come from https://download.pytorch.org/models/ (not moved by DDPMSEG_ASSETS_URL); their SHA-256 must
  start with the 8 hex digits in the file name, as torchvision checks.
examples:
  ddpmseg fetch checkpoint ffhq_34            # the checkpoint of a preset: checkpoints/ddpm/ffhq.pt
  ddpmseg fetch checkpoint lsun_bedroom lsun_cat mae/ffhq
  ddpmseg fetch checkpoint imagenet/resnet101    # datasetddpm.backbone_weights: imagenet (resnet101, official)
  ddpmseg fetch datasets"""


def add_fetch_commands(subparsers: Any) -> None:
    """Add `fetch checkpoint|datasets|list` to an argparse subparsers object."""
    sp = subparsers.add_parser("fetch", help="download the official checkpoints and data sets into $DDPMSEG_HOME",
                               description=_DESCRIPTION, epilog=_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    fsub = sp.add_subparsers(dest="fetch_cmd", required=True)
    ck = fsub.add_parser("checkpoint", help="download checkpoints: a preset (ffhq_34), a name (ffhq) or "
                         "family/name (mae/ffhq)", description=_DESCRIPTION, epilog=_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    ck.add_argument("names", nargs="+", metavar="PRESET|NAME",
                    help="a data set preset (its backbone), lsun_bedroom|ffhq|lsun_cat|lsun_horse, or "
                         "FAMILY/NAME with FAMILY one of ddpm, mae, swav, swav_w2; 'all' for the four DDPMs; "
                         "imagenet/resnet101 or imagenet/resnet50 for DatasetDDPM's segmenter backbone")
    ck.add_argument("--family", default="ddpm", choices=("ddpm", "mae", "swav", "swav_w2"),
                    help="family of bare names and presets (default ddpm)")
    ds = fsub.add_parser("datasets", help="download and unpack the six labelled data sets (~47 MB archive)",
                         description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    for p in (ck, ds):
        p.add_argument("--attempts", type=int, default=3,
                       help="resume a transfer that stopped midway up to this many times per file (default 3)")
        p.add_argument("--json", action="store_true", help="print one JSON object per asset on stdout")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    ls = fsub.add_parser("list", help="the known assets: URL, local path, size, digest (shipped / recorded), present")
    ls.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_fetch)


def checkpoint_names(names: list[str], family: str = "ddpm") -> list[str]:
    """Manifest names for the command line's PRESET|NAME arguments (a preset stands for its backbone)."""
    from pipeline.presets import DATASET_PRESETS
    from storage.assets import CHECKPOINT_NAMES, checkpoint_asset

    out: list[str] = []
    for name in names:
        if name == "all":
            candidates = [f"{family}/{n}" for n in CHECKPOINT_NAMES]
        elif name in DATASET_PRESETS:
            candidates = [f"{family}/{Path(DATASET_PRESETS[name]['checkpoint']).stem}"]
        else:
            candidates = [name]
        for c in candidates:
            asset = checkpoint_asset(c, family)
            if asset.name not in out:
                out.append(asset.name)
    return out


def fetch_assets(names: list[str], progress: bool = True, attempts: int = 3) -> list[Any]:
    """Fetch manifest entries by name into $DDPMSEG_HOME; returns storage.assets.FetchResult per name."""
    from pipeline.fetched import assets_home
    from storage.assets import MANIFEST, fetch

    home = assets_home()
    return [fetch(MANIFEST[n], home, progress=progress, attempts=attempts) for n in names]


def _describe(result: Any) -> str:
    if result.state == "present":
        return f"{result.name:22s} present      {result.path}"
    digest = {"manifest": "matches the manifest", "recorded": "matches the digest recorded earlier",
              "first download": "recorded (first download; no digest shipped)"}[result.digest_source]
    resumed = f", resumed at {result.resumed_from / 1e6:.1f} MB" if result.resumed_from else ""
    line = (f"{result.name:22s} downloaded   {result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s{resumed}  "
            f"sha256 {result.sha256} {digest}\n{'':22s} -> {result.path}")
    if result.unpacked:
        line += f"\n{'':22s} data sets: {', '.join(result.unpacked)}"
    return line


def cmd_fetch(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    if args.fetch_cmd == "list":
        return _list(args.json)
    names = checkpoint_names(args.names, args.family) if args.fetch_cmd == "checkpoint" else ["datasets"]
    results = fetch_assets(names, progress=not args.quiet, attempts=args.attempts)
    for r in results:
        print(json.dumps(asdict(r), sort_keys=True) if args.json else _describe(r))
    return 0


def _list(as_json: bool) -> int:
    from pipeline.fetched import assets_home
    from storage.assets import MANIFEST, asset_url, is_present, recorded_digests

    home = assets_home()
    recorded = recorded_digests(home)
    rows = []
    for name, asset in MANIFEST.items():
        rec = recorded.get(name, {})
        rows.append({"name": name, "url": asset_url(asset), "path": str(asset.path(home)),
                     "present": is_present(asset, home), "size": asset.size or rec.get("size"),
                     "approx_bytes": asset.approx_bytes, "size_source": asset.size_source,
                     "sha256": asset.sha256 or rec.get("sha256"), "sha256_prefix": asset.sha256_prefix,
                     "digest_source": "manifest" if asset.sha256 else ("recorded" if rec else None)})
    if as_json:
        print(json.dumps({"home": str(home), "assets": rows}, sort_keys=True))
        return 0
    print(f"cache directory {home} ($DDPMSEG_HOME)")
    for r in rows:
        size = f"{r['size'] / 1e6:9.1f} MB" if r["size"] else (
            f"~{r['approx_bytes'] / 1e6:8.0f} MB" if r["approx_bytes"] else "   size unknown")
        digest = f"sha256 {r['sha256'][:16]}… ({r['digest_source']})" if r["sha256"] else (
            f"sha256 {r['sha256_prefix']}… (file name)" if r["sha256_prefix"] else "sha256 not known yet")
        print(f"{r['name']:20s} {'present' if r['present'] else 'missing':8s} {size}  {digest}  {r['url']}")
    return 0


def require_assets(cfg: Any) -> None:
    """Before running a preset's config: a missing default checkpoint or data set is an AssetError naming the
    `ddpmseg fetch` command (and the path where the file was expected)."""
    from pipeline.presets import DATASET_PRESETS
    from storage.assets import AssetError

    preset = cfg.dataset.preset
    if preset is None or preset not in DATASET_PRESETS:
        return
    from pipeline.extractors import extractor_class

    checkpoint = cfg.model.checkpoint
    default = Path(extractor_class(cfg.model.kind).default_checkpoint(DATASET_PRESETS[preset]["checkpoint"]))
    default_name, family = default.name, default.parent.name  # checkpoints/<kind>/<file>
    if checkpoint is not None and not Path(checkpoint).exists() and Path(checkpoint).name == default_name:
        asset = default.stem if family == "ddpm" else f"{family}/{default.stem}"
        raise AssetError(f"model.checkpoint {checkpoint} not found: run `ddpmseg fetch checkpoint "
                         f"{asset}` (or place the official {default_name} there)")
    for key in ("train_dir", "test_dir"):
        folder = Path(getattr(cfg.dataset, key))
        if not folder.exists() and folder.parent.name == "real" and folder.parent.parent.name == preset:
            raise AssetError(f"dataset.{key} {folder} not found: run `ddpmseg fetch datasets` (or set "
                             f"dataset.train_dir / test_dir to your copy)")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m flows.fetch_cli fetch ...`), same errors as `ddpmseg`."""
    from storage.assets import AssetError

    parser = argparse.ArgumentParser(prog="ddpmseg")
    add_fetch_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except AssetError as err:
        print(f"ddpmseg: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

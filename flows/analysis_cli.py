"""`ddpmseg sweep` and `ddpmseg clusters`: the representation-analysis commands (wired by flows/cli.py).

    ddpmseg sweep CONFIG [--blocks 0-17] [--steps 0,50,...,950] [--members 1] [--epochs 5]
                         [--size-threshold PX] [--workers N] [--out DIR] [--json]
    ddpmseg clusters CONFIG [--k 5] [--images N] [--split test] [--blocks ..] [--steps ..] [--seed 0] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Any


def _index_list(text: str) -> list[int]:
    from pipeline.analysis import parse_index_list

    try:
        return parse_index_list(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config", help="experiment YAML file")
    sp.add_argument("--store", help="feature store: a directory or s3://bucket/prefix (default: config's store)")
    sp.add_argument("--blocks", type=_index_list, help="decoder blocks: '0-17', '5,6,12' (default: every output "
                    "block of the model)")
    sp.add_argument("--steps", type=_index_list, help="timesteps: '50,150,250', '0,50,...,950', '0-950:50' "
                    "(default: the config's steps)")
    sp.add_argument("--out", help="output directory (default: <output_dir>/sweep or <output_dir>/clusters)")
    sp.add_argument("--json", action="store_true", help="print one JSON summary object on stdout at the end")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")


def add_analysis_commands(subparsers: Any) -> None:
    """Add the `sweep` and `clusters` subcommands to an argparse subparsers object."""
    from pipeline.presets import SWEEP_DEFAULT_EPOCHS as DEFAULT_EPOCHS
    from pipeline.presets import SWEEP_DEFAULT_MEMBERS as DEFAULT_MEMBERS

    sp = subparsers.add_parser("sweep", help="mIoU of one classifier per (decoder block, timestep), from the cache: "
                               "CSV/JSON, heatmap, small/large objects plot")
    _common(sp)
    sp.add_argument("--members", type=int, default=DEFAULT_MEMBERS,
                    help=f"ensemble members per (block, step) (default {DEFAULT_MEMBERS}: a lighter classifier)")
    sp.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                    help=f"max epochs per member (default {DEFAULT_EPOCHS}; the official early stop ends in the "
                         f"fifth epoch in practice)")
    sp.add_argument("--size-threshold", type=float, help="small/large split: mean class area in pixels "
                    "(default: the median over classes)")
    sp.add_argument("--workers", type=int, help="parallel worker processes for training/evaluation tasks "
                    "(default min(4, CPU count); 1 = one task at a time in-process)")
    sp.set_defaults(func=cmd_sweep)

    sp = subparsers.add_parser("clusters", help="k-means clusters of each (block, step)'s features of some images: "
                               "a grid PNG per image")
    _common(sp)
    sp.add_argument("--k", type=int, default=5, help="clusters (default 5)")
    sp.add_argument("--images", type=int, default=1, help="first N images of the split (default 1)")
    sp.add_argument("--split", choices=("train", "test"), default="test", help="split (default test)")
    sp.add_argument("--seed", type=int, default=0, help="k-means random_state (default 0)")
    sp.add_argument("--workers", type=int, default=1, help="images clustered in parallel threads (default 1)")
    sp.set_defaults(func=cmd_clusters)


def _prepare(args: argparse.Namespace):
    from flows.runner import prefect_defaults, start_embedded_prefect
    from pipeline.config import load_config

    prefect_defaults()
    cfg = load_config(args.config)  # validate before starting Prefect
    start_embedded_prefect()
    return cfg


def _fmt(v: float | None) -> str:
    return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:5.1f}"


def cmd_sweep(args: argparse.Namespace) -> int:
    from flows.sweep import default_workers, run_sweep

    cfg = _prepare(args)
    workers = args.workers if args.workers is not None else default_workers()
    summary = run_sweep(cfg, args.store, args.blocks, args.steps, args.members, args.epochs, args.size_threshold,
                        args.out, workers, progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return 0
    rows = {(c["block"], c["step"]): c for c in json.loads(open(summary["json"]).read())["cells"]}
    print(f"classifier  {summary['classifier']['note']}")
    print(f"forwards    {summary['unet_forwards']} UNet forwards ({summary['image_forwards']} image x step pairs "
          f"for {summary['images']} images x {len(summary['steps'])} steps)   classifiers trained "
          f"{summary['classifiers_trained']}   cells {summary['cells']} ({summary['cells_evaluated']} evaluated)")
    print("mIoU (official, %)   rows: block, columns: t")
    print("block " + "".join(f"{t:>7d}" for t in summary["steps"]))
    for b in summary["blocks"]:
        print(f"{b:5d} " + "".join(f"  {_fmt(rows[(b, t)]['miou'])}" for t in summary["steps"]))
    best = summary["best"]
    print(f"best        block {best['block']} at t={best['step']}: {best['miou']:.2f}")
    g = summary["size_groups"]
    print(f"size groups {g['rule']} {g['threshold']:.0f} px: small {', '.join(g['small'])}; large "
          f"{', '.join(g['large'])}")
    for name in ("csv", "json", "heatmap", "size_split"):
        print(f"{name:11s} {summary[name]}")
    return 0


def cmd_clusters(args: argparse.Namespace) -> int:
    from flows.sweep import run_clusters

    cfg = _prepare(args)
    summary = run_clusters(cfg, args.store, args.blocks, args.steps, args.k, args.images, args.seed, args.split,
                           args.out, args.workers, progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return 0
    print(f"forwards    {summary['unet_forwards']}   images {summary['images']} ({summary['split']})   "
          f"k {summary['k']}   seed {summary['seed']}")
    for png in summary["pngs"]:
        print(f"grid        {png}")
    return 0

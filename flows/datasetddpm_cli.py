"""`ddpmseg synthesize` and `ddpmseg segmenter train`: DatasetDDPM from the command line.

    ddpmseg synthesize CONFIG [--samples N] [--respacing K|ddimK] [--ddim]   draw N images into the store
    ddpmseg segmenter train CONFIG [--samples N] [--respacing K] [--ddim]   ensemble -> samples -> labels ->
                                                                             DeepLabV3 -> its test mIoU
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _plan(args: argparse.Namespace):
    from flows.fetch_cli import require_assets
    from flows.synthesize import sampling_plan
    from pipeline.config import load_config

    cfg = load_config(args.config)  # a bad file, kind or setting fails here, in one line, before Prefect
    plan = sampling_plan(cfg, args.samples, args.respacing, True if args.ddim else None)
    require_assets(cfg)
    return cfg, plan


def _run(args: argparse.Namespace, stages: list[str]) -> dict[str, Any]:
    from dataclasses import asdict

    from flows.runner import start_embedded_prefect, store_url

    cfg, plan = _plan(args)
    if "segmenter" in stages:
        from flows.segmenter import backbone_state, segmenter_settings

        segmenter_settings(cfg)  # an unknown backbone fails here, before Prefect
        backbone_state(cfg)  # so do missing (imagenet: names the fetch command) or mismatched backbone weights
    from flows.datasetddpm import datasetddpm

    start_embedded_prefect()
    url = store_url(args.store) if args.store else cfg.store
    return datasetddpm(str(Path(args.config).resolve()), url, asdict(plan), stages, progress=not args.quiet)


def cmd_synthesize(args: argparse.Namespace) -> int:
    summary = _run(args, ["synthesize"])
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return 0
    print(f"samples     {summary['samples']} ({summary['samples_drawn']} drawn now, the rest from the store)")
    print(f"store       {summary['store']}  (split 'synthetic', samples key {summary['samples_key'][:16]})")
    return 0


def cmd_segmenter(args: argparse.Namespace) -> int:
    summary = _run(args, ["synthesize", "segmenter"])
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return 0
    print(format_summary(summary))
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    seg, ens = summary["segmenter"], summary["ensemble"]
    stages = ", ".join(f"{k}: {v}" for k, v in summary["stages"].items())
    why = {"validation": "the best validation mIoU (the labelled real training images, as official)",
           "last": "the last epoch"}.get(seg["model_selection"], seg["model_selection"])
    chosen = f"epoch {seg['selected_epoch'] + 1}: {why}"
    return "\n".join([
        f"stages      {stages}",
        f"samples     {summary['samples']} ({summary['samples_drawn']} drawn now)   labelled now "
        f"{summary['labelled']}   segmenter epochs trained now {summary['segmenter_epochs_trained']}",
        f"mIoU        pixel ensemble {ens['miou']:.2f}   DatasetDDPM segmenter {seg['miou']:.2f} (official)   "
        f"standard {ens['miou_standard']:.2f} / {seg['miou_standard']:.2f}",
        f"segmenter   {chosen}",
        f"metrics     {seg['metrics_path']}",
        f"masks       {seg['masks_path']}",
    ])


def _sampling_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config", help="experiment YAML file (its datasetddpm section; model.kind ddpm)")
    sp.add_argument("--store", help="feature store: a directory or s3://bucket/prefix (default: config's store)")
    sp.add_argument("--samples", type=int, help="images to draw (default: datasetddpm.samples)")
    sp.add_argument("--respacing", help="timestep_respacing: K steps evenly strided, or ddimK "
                                        "(default: datasetddpm.respacing; '' = every step)")
    sp.add_argument("--ddim", action="store_true", help="DDIM sampling (eta 0) instead of ancestral p_sample")
    sp.add_argument("--json", action="store_true", help="print one JSON summary object on stdout at the end")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                    help="on an error, show the full traceback (also: DDPMSEG_DEBUG=1)")


def add_datasetddpm_commands(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("synthesize", help="draw images from the config's diffusion backbone into the store "
                                           "(DatasetDDPM's synthetic split)")
    _sampling_arguments(sp)
    sp.set_defaults(func=cmd_synthesize)
    sp = sub.add_parser("segmenter", help="DatasetDDPM: a DeepLabV3 trained on samples labelled by the ensemble")
    ssub = sp.add_subparsers(dest="segmenter_cmd", required=True)
    st = ssub.add_parser("train", help="ensemble -> synthesize -> extract -> label -> train the segmenter -> "
                                       "evaluate it on the test split beside the ensemble")
    _sampling_arguments(st)
    st.set_defaults(func=cmd_segmenter)

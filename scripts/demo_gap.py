"""Measure the demo's claim: diffusion features beat the `rgb` and `random-unet` baselines on the procedural data.

Two modes:

    python scripts/demo_gap.py quick --data DIR --checkpoint ckpt.pt [--blocks 1 2 3 4] [--steps 50 150 250]
        [--seeds 0 1 2] [--members 3] [--train 10] [--test 20]
    python scripts/demo_gap.py pipeline --data DIR --checkpoint ckpt.pt --work DIR [...same options...]

`quick` computes everything in memory with the pipeline's own pieces (backbone.extract_blocks with the shared
CPU noise of seed 0, float16 native maps, features.sample_pixel_features, classifier.train_member with the
stage's member seeds, pixels.epoch_batches, predict, metrics.score): for exploring data sets and backbones.
`pipeline` measures `ddpm` and `random-unet` with the real flow (`ddpmseg run CONFIG --json` on two configs that
differ only in model: checkpoint vs random_init) and `rgb` in memory (the flow has no rgb extractor yet).

`rgb` features per pixel: [r, g, b, y, x], colours in [-1, 1] as the UNet sees them, coordinates
(i + 0.5) / size * 2 - 1, fed to the same MLP ensemble. Prints a table (mean ± std of the official mIoU over
seeds, and per-class IoU) and, with --json-out, writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline import backbone as bb
from pipeline import classifier as clf
from pipeline import features, metrics, pixels, predict
from pipeline.datasets import load_split
from storage.keys import digest

DEFAULT_BLOCKS = [1, 2, 3, 4]
DEFAULT_STEPS = [50, 150, 250]


def member_seed(classifier_seed: int, index: int) -> int:
    """The flow's member seed (flows.stages.member_seed) for (classifier.seed, index)."""
    return int(digest(["member", classifier_seed, index])[:8], 16)


def read_dataset(data: Path, n_train: int, n_test: int, size: int) -> dict:
    """Train/test images (3, S, S) in [-1, 1] and labels (S, S) uint8 (train: small-annotation rule applied)."""
    description = json.loads((data / "dataset.json").read_text())
    number_class, ignore = description["number_class"], description["ignore_label"]
    train = load_split(data / "train", n_train, size, number_class, ignore, train=True)
    test = load_split(data / "test", n_test, size, number_class, ignore, train=False)
    return {"train": train, "test": test, "number_class": number_class, "ignore_label": ignore,
            "class_names": description["class_names"]}


def unet_maps(model, diffusion, images: list[torch.Tensor], steps: list[int], blocks: list[int],
              batch: int = 10) -> list[list[torch.Tensor]]:
    """Per image, the native block maps (C, h, w) float16 in the official order (t, then blocks ascending)."""
    noise = bb.make_noise(0, images[0].shape[-1], "cpu")
    out: list[list[torch.Tensor]] = [[] for _ in images]
    for start in range(0, len(images), batch):
        x0 = torch.stack(images[start:start + batch])
        for t in steps:
            acts = bb.extract_blocks(model, diffusion, x0, t, noise, sorted(blocks))
            for j in range(x0.shape[0]):
                out[start + j].extend(acts[b][j].to(torch.float16) for b in sorted(blocks))
    return out


def rgb_maps(images: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per image one (5, S, S) float32 map: r, g, b in [-1, 1], then y and x coordinates in (-1, 1)."""
    size = images[0].shape[-1]
    coordinate = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    ys, xs = torch.meshgrid(coordinate, coordinate, indexing="ij")
    return [[torch.cat([image.float(), ys[None], xs[None]])] for image in images]


def evaluate_maps(train_maps, train_labels, test_maps, test_labels, number_class: int, ignore_label: int,
                  size: int, model_num: int, seed: int) -> metrics.Scores:
    """Train an ensemble of `model_num` official MLPs on the train pixels, predict and score the test images."""
    ids = [str(i) for i in range(len(train_maps))]
    dim = sum(int(m.shape[0]) for m in train_maps[0])
    settings = clf.TrainSettings(number_class=number_class, dim=dim)

    def pixel_features(image_id: str, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return features.sample_pixel_features(train_maps[int(image_id)], ys, xs, size)

    members = []
    for index in range(model_num):
        s = member_seed(seed, index)

        def epoch_batches(epoch: int, s=s):
            return pixels.epoch_batches(ids, lambda i: train_labels[int(i)], pixel_features, ignore_label,
                                        settings.batch_size, epoch, s, images_per_buffer=4)

        model, _ = clf.train_member(settings, epoch_batches, seed=s)
        members.append(model)
    masks = [predict.predict_image(members, features.upsample_concat(maps, size))[0] for maps in test_maps]
    return metrics.score(masks, test_labels, number_class, ignore_label)


def summarise(name: str, runs: list[metrics.Scores]) -> dict:
    mious = [100 * s.official_miou for s in runs]
    per_class = np.array([[100 * v for v in s.per_class_official] for s in runs]).mean(axis=0)
    return {"features": name, "miou_mean": float(np.mean(mious)), "miou_std": float(np.std(mious)),
            "mious": mious, "per_class": per_class.round(1).tolist(),
            "pixel_accuracy": float(np.mean([100 * s.pixel_accuracy for s in runs]))}


def print_table(rows: list[dict], class_names: list[str]) -> None:
    print(f"{'features':14s} {'mIoU':>13s}  " + " ".join(f"{c[:9]:>9s}" for c in class_names) + "   seeds")
    for r in rows:
        print(f"{r['features']:14s} {r['miou_mean']:6.1f} ± {r['miou_std']:4.1f}  "
              + " ".join(f"{v:9.1f}" for v in r["per_class"]) + "   " + " ".join(f"{m:.1f}" for m in r["mious"]))


def load_backbone(flags: dict, checkpoint: str | None):
    torch.manual_seed(0)  # as flows.stages._load_backbone with init_seed 0
    model, diffusion = bb.build_backbone(flags, "cpu")
    if checkpoint:
        bb.load_checkpoint(model, checkpoint)
    else:
        bb.redraw_zero_initialised_convs(model)
    return model, diffusion


def quick(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    flags = json.loads(Path(args.checkpoint).with_suffix(".json").read_text()) if args.checkpoint else None
    size = int(flags["image_size"]) if flags else 32
    data = read_dataset(Path(args.data), args.train, args.test, size)
    train_images = [s.image for s in data["train"]]
    test_images = [s.image for s in data["test"]]
    train_labels = [s.label for s in data["train"]]
    test_labels = [s.label for s in data["test"]]
    common = dict(number_class=data["number_class"], ignore_label=data["ignore_label"], size=size,
                  model_num=args.members)
    sources = {"rgb": None}
    if flags:
        sources["random-unet"] = (flags, None)
        sources["ddpm"] = (flags, args.checkpoint)
    rows = []
    for name in args.features or list(sources):
        started = time.time()
        if name == "rgb":
            train_maps, test_maps = rgb_maps(train_images), rgb_maps(test_images)
        else:
            model, diffusion = load_backbone(*sources[name])
            train_maps = unet_maps(model, diffusion, train_images, args.steps, args.blocks)
            test_maps = unet_maps(model, diffusion, test_images, args.steps, args.blocks)
        runs = [evaluate_maps(train_maps, train_labels, test_maps, test_labels, seed=seed, **common)
                for seed in args.seeds]
        rows.append(summarise(name, runs))
        rows[-1]["seconds"] = round(time.time() - started, 1)
    print_table(rows, data["class_names"])
    return rows


def pipeline_config(data: Path, flags: dict, checkpoint: str | None, args, seed: int) -> dict:
    description = json.loads((data / "dataset.json").read_text())
    model = {"checkpoint": str(Path(checkpoint).resolve())} if checkpoint else {"random_init": True, "init_seed": 0}
    model["flags"] = {k: v for k, v in flags.items() if bb.OFFICIAL_MODEL_FLAGS.get(k) != v}
    return {
        "recipe": "paper",
        "dataset": {"name": "synthetic", "train_dir": str((data / "train").resolve()),
                    "test_dir": str((data / "test").resolve()), "number_class": description["number_class"],
                    "ignore_label": description["ignore_label"], "training_number": args.train,
                    "testing_number": args.test, "class_names": description["class_names"],
                    "palette": description["palette"]},
        "model": model,
        "features": {"steps": list(args.steps), "blocks": list(args.blocks), "batch_size": 10},
        "classifier": {"model_num": args.members, "seed": seed},
        "store": str((Path(args.work) / "store").resolve()),
    }


def run_pipeline(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    data, work = Path(args.data), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    flags = json.loads(Path(args.checkpoint).with_suffix(".json").read_text())
    size = int(flags["image_size"])
    rows = []
    for name, checkpoint in (("ddpm", args.checkpoint), ("random-unet", None)):
        runs, started = [], time.time()
        for seed in args.seeds:
            cfg = pipeline_config(data, flags, checkpoint, args, seed)
            cfg["output_dir"] = str((work / f"runs/{name}-seed{seed}").resolve())
            path = work / f"{name}-seed{seed}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
                   "PREFECT_HOME": str((work / "prefect-home").resolve())}
            done = subprocess.run(["ddpmseg", "run", str(path), "--json", "--quiet"], capture_output=True, text=True,
                                  env=env)
            if done.returncode != 0:
                sys.exit(f"ddpmseg run {path} failed:\n{done.stderr[-3000:]}")
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            result = json.loads(Path(summary["metrics_path"]).read_text())
            per_class = (result.get("result", result).get("scores") or {}).get("per_class_official")
            runs.append({"miou": summary["miou"], "per_class": per_class, "pixel_accuracy": summary["pixel_accuracy"]})
            print(f"{name} seed {seed}: mIoU {summary['miou']:.2f}", flush=True)
        mious = [r["miou"] for r in runs]
        per_class = (np.array([[100 * v for v in r["per_class"]] for r in runs]).mean(axis=0).round(1).tolist()
                     if all(r["per_class"] for r in runs) else [])
        rows.append({"features": name, "miou_mean": float(np.mean(mious)), "miou_std": float(np.std(mious)),
                     "mious": mious, "per_class": per_class,
                     "pixel_accuracy": float(np.mean([r["pixel_accuracy"] for r in runs])),
                     "seconds": round(time.time() - started, 1), "measured_with": "ddpmseg run"})
    args.features = ["rgb"]
    description = json.loads((data / "dataset.json").read_text())
    rgb = quick(args)
    rgb[0]["measured_with"] = "in-memory (pipeline classifier/predict/metrics)"
    rows = rows + rgb
    print_table(rows, description["class_names"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["quick", "pipeline"])
    parser.add_argument("--data", required=True, help="a synthetic.write_dataset directory")
    parser.add_argument("--checkpoint", help="trained backbone ckpt.pt (its flags in ckpt.json beside it)")
    parser.add_argument("--work", default="demo-gap-work", help="pipeline mode: configs, store and runs go here")
    parser.add_argument("--blocks", type=int, nargs="+", default=DEFAULT_BLOCKS)
    parser.add_argument("--steps", type=int, nargs="+", default=DEFAULT_STEPS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--train", type=int, default=10)
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--features", nargs="+", choices=["rgb", "random-unet", "ddpm"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: MLPs are small)")
    parser.add_argument("--json-out", help="write the table rows as JSON here")
    args = parser.parse_args(argv)
    rows = quick(args) if args.mode == "quick" else run_pipeline(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

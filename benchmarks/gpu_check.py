"""A GPU check for the day a GPU is there (issue 15): extraction, batched training and evaluation on CUDA.

    python benchmarks/gpu_check.py

On CUDA, in a temporary directory, and in well under 5 minutes on one GPU:
1. extraction: the official 256x256 UNet (random weights, the official flags, use_fp16 included: float16 torso
   on CUDA) over 8 images x 3 steps through flows.extract.extract_split into a feature store: forward s per
   batch and store MB/s (bytes written / wall s);
2. training: a batched 10-member pass (pipeline.ensemble.train_members) at D = 8448 for a fixed number of
   iterations on in-memory features, on CUDA and on the CPU: member-pixels/s of each and their ratio;
3. evaluation: 8 images predicted from native maps of the real shapes by the 10 members (pipeline.predict.
   predict_maps, features sampled on the device): images/s;
and prints one JSON line with these figures and the peak GPU memory. Without CUDA it prints
{"skipped": "no cuda"} and exits 0. Every function takes a device, so the tests run them with device="cpu"
at toy sizes.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/gpu_check.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

MB = 1024 * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _directory_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def extraction_check(workdir: Path, device: str | torch.device, flags: dict[str, Any] | None = None,
                     images: int = 8, steps: tuple[int, ...] = (50, 150, 250),
                     blocks: tuple[int, ...] = (5, 6, 7, 8, 12), batch_size: int = 8) -> dict[str, Any]:
    """Extract `images` synthetic images x `steps` with a random-init UNet of `flags` (default: the official
    256x256 flags) on `device` into a fresh store under workdir."""
    import yaml

    from flows import extract as extract_stage
    from flows.prepare import prepare
    from pipeline import synthetic
    from pipeline.backbone import OFFICIAL_MODEL_FLAGS
    from pipeline.config import load_config
    from storage.features import FeatureStore

    flags = dict(OFFICIAL_MODEL_FLAGS if flags is None else flags)
    size = int(flags["image_size"])
    workdir = Path(workdir)
    synthetic.write_dataset(workdir / "data", n_train=images, n_test=1, n_unlabelled=0, size=size, seed=0)
    config = {
        "dataset": {"name": "gpu-check", "train_dir": "data/train", "test_dir": "data/test",
                    "number_class": len(synthetic.CLASS_NAMES), "ignore_label": synthetic.IGNORE_LABEL,
                    "training_number": images, "testing_number": 1},
        "model": {"random_init": True, "init_seed": 0, "flags": flags},
        "features": {"steps": list(steps), "blocks": list(blocks), "batch_size": batch_size,
                     "device": str(device)},
        "store": "store", "output_dir": "outputs",
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cfg = load_config(path)
    store = FeatureStore(cfg.store)
    refs = prepare(cfg, store, "train").extraction(cfg, "train")
    extract_stage.load_extractor(cfg, torch.device(device))  # the UNet build is not part of the timing
    before = _directory_bytes(Path(cfg.store))
    start = time.perf_counter()
    counts = extract_stage.extract_split(cfg, store, refs, progress=False)
    _sync(torch.device(device))
    seconds = time.perf_counter() - start
    written = _directory_bytes(Path(cfg.store)) - before
    return {"images": images, "steps": list(steps), "unet_forwards": counts["unet_forwards"],
            "forward_s_per_batch": seconds / max(1, counts["unet_forwards"]), "extract_s": seconds,
            "store_mb": written / MB, "store_mb_per_s": written / MB / seconds}


def training_check(device: str | torch.device, members: int = 10, dim: int = 8448, number_class: int = 34,
                   iterations: int = 200) -> dict[str, Any]:
    """A batched pass of `members` members for `iterations` iterations on in-memory random features on
    `device`: member-pixels/s."""
    from pipeline import classifier as clf
    from pipeline import ensemble

    device = torch.device(device)
    settings = clf.TrainSettings(number_class=number_class, dim=dim, max_epochs=1,
                                 early_stop_start_epoch=2)  # no early stop: a fixed number of iterations
    features = torch.randn(iterations * settings.batch_size, dim, device=device)
    labels = torch.randint(0, number_class, (len(features),), device=device)

    def slices(epoch: int):
        return iter([(features, labels)])

    ensemble.train_members(settings, list(range(members)), slices, device=device, iterations_per_epoch=2)
    _sync(device)
    start = time.perf_counter()
    ensemble.train_members(settings, list(range(members)), slices, device=device, iterations_per_epoch=iterations)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"members": members, "iterations": iterations, "dim": dim, "train_s": seconds,
            "member_px_per_s": members * iterations * settings.batch_size / seconds}


def evaluation_check(device: str | torch.device, members: int = 10, images: int = 8, number_class: int = 34,
                     shapes: list[tuple[int, int, int]] | None = None, size: int = 256) -> dict[str, Any]:
    """Predict `images` images from random native maps of `shapes` (default: the official blocks 5, 6, 7, 8,
    12 at 3 steps, D = 8448) with `members` random members, on `device`: images/s."""
    from pipeline import classifier as clf
    from pipeline import features
    from pipeline.predict import predict_maps

    device = torch.device(device)
    shapes = shapes or [(1024, 32, 32), (512, 32, 32), (512, 32, 32), (512, 64, 64), (256, 128, 128)] * 3
    dim = sum(c for c, _, _ in shapes)
    torch.manual_seed(0)
    ensemble = [clf.build_classifier(number_class, dim).eval().to(device) for _ in range(members)]
    maps = [torch.randn(shape).to(torch.float16) for shape in shapes]
    predict_maps(ensemble, features.sampling_maps([m.to(device) for m in maps]), size)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(images):
        predict_maps(ensemble, features.sampling_maps([m.to(device) for m in maps]), size)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"images": images, "members": members, "dim": dim, "evaluate_s": seconds, "images_per_s": images / seconds}


def run_check(device: str | torch.device = "cuda", cpu_iterations: int = 20) -> dict[str, Any]:
    """Every check on `device`, plus the training on the CPU for the ratio; one JSON-able dict."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ddpmseg-gpu-check-") as workdir:
        extraction = extraction_check(Path(workdir), device)
    training = training_check(device)
    cpu_training = training_check("cpu", iterations=cpu_iterations)
    evaluation = evaluation_check(device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "forward_s_per_batch": extraction["forward_s_per_batch"], "store_mb_per_s": extraction["store_mb_per_s"],
        "member_px_per_s": training["member_px_per_s"], "member_px_per_s_cpu": cpu_training["member_px_per_s"],
        "train_speedup_vs_cpu": training["member_px_per_s"] / cpu_training["member_px_per_s"],
        "evaluated_images_per_s": evaluation["images_per_s"],
        "peak_gpu_memory_mb": (torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None),
        "details": {"extraction": extraction, "training": training, "training_cpu": cpu_training,
                    "evaluation": evaluation},
        "wall_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no cuda"}))
        return 0
    print(json.dumps(run_check("cuda")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

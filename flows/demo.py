"""`ddpmseg demo`: does the method work? Diffusion features against two baselines, on a procedural data set.

    ddpmseg demo [--out DIR] [--seeds 0,1,2] [--train 10] [--test 50] [--members 10] [--json]

The data (pipeline/synthetic.py) is written under DIR/data if absent. One experiment config per feature type,
all three on one feature store (DIR/store), each run by the same `segment` flow:

- `ddpm`: the bundled demo backbone (pipeline/assets/demo_backbone.pt, a guided-diffusion UNet trained by
  `ddpmseg backbone train` on the generator's unlabelled images);
- `rgb`: each pixel's colour and coordinates (what a pixel MLP sees without a backbone);
- `random-unet`: the same UNet with random weights.

Each seed is a classifier seed (`classifier.seed`): the features are extracted once and shared by every seed.
Writes DIR/config-<feature>[-s<seed>].yaml, DIR/runs/<feature>/s<seed>/ (masks, metrics.json, report/),
DIR/metrics.json ({feature: {miou, miou_std, per_seed, per_class_iou, pixel_accuracy, ...}}) and DIR/report.html.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

FEATURE_TYPES = ("ddpm", "rgb", "random-unet")
ASSETS_DIR = Path(__file__).resolve().parent.parent / "pipeline" / "assets"
DEMO_BACKBONE = ASSETS_DIR / "demo_backbone.pt"
DEMO_BACKBONE_FLAGS = ASSETS_DIR / "demo_backbone.json"
DEMO_BLOCKS = [1, 2, 3, 4]
DEMO_STEPS = [50, 150, 250]
#: `ddpmseg demo --datasetddpm`: DDIM with 20 of the 1000 steps (clean samples from few steps), the small
#: ddpmseg_resnet18 DeepLabV3 at the images' 32 px, the official 20 epochs (5 left it predicting background only,
#: measured: README); a few hundred samples are too few for the official
#: uncertainty rule (it keeps nothing unless int(N * 0.1) > 30), so the 10 % most uncertain are dropped
DEMO_DATASETDDPM: dict[str, Any] = {
    "samples": 256, "batch_size": 16, "respacing": "ddim20", "ddim": True, "backbone": "ddpmseg_resnet18",
    "epochs": 20, "segmenter_batch_size": 8, "uncertainty_portion": 0.1, "uncertainty_rule": "most_uncertain",
}


def demo_backbone_flags() -> dict[str, Any]:
    """The bundled demo backbone's complete guided-diffusion flags (written by `ddpmseg backbone train`)."""
    if not DEMO_BACKBONE.is_file() or not DEMO_BACKBONE_FLAGS.is_file():
        raise FileNotFoundError(f"the demo backbone is missing: expected {DEMO_BACKBONE} and {DEMO_BACKBONE_FLAGS} "
                                f"(shipped with the package; reinstall it)")
    return json.loads(DEMO_BACKBONE_FLAGS.read_text())


def demo_config(feature: str, seed: int = 0, n_train: int = 10, n_test: int = 50,
                members: int = 10) -> dict[str, Any]:
    """The demo experiment for one feature type and classifier seed (paths relative to the demo directory)."""
    from pipeline import synthetic

    if feature not in FEATURE_TYPES:
        raise ValueError(f"unknown demo feature type {feature!r}; expected one of {FEATURE_TYPES}")
    flags = demo_backbone_flags()
    model: dict[str, Any] = {
        "ddpm": {"checkpoint": str(DEMO_BACKBONE), "flags": flags},
        "rgb": {"kind": "rgb", "flags": flags},
        "random-unet": {"random_init": True, "init_seed": 0, "flags": flags},
    }[feature]
    return {
        "recipe": "paper",
        "dataset": {"name": "synthetic", "train_dir": "data/train", "test_dir": "data/test",
                    "number_class": len(synthetic.CLASS_NAMES), "ignore_label": synthetic.IGNORE_LABEL,
                    "training_number": n_train, "testing_number": n_test,
                    "class_names": list(synthetic.CLASS_NAMES), "palette": [list(c) for c in synthetic.PALETTE]},
        "model": model,
        "features": {"steps": list(DEMO_STEPS), "blocks": list(DEMO_BLOCKS), "batch_size": 10},
        "classifier": {"model_num": members, "seed": seed},
        "store": "store",
        "output_dir": f"runs/{feature}/s{seed}",
    }


def _summarise(feature: str, runs: list[dict[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """One feature type's entry of metrics.json from its per-seed run results (metrics.json of each run)."""
    mious = [r["miou"] for r in runs]
    per_class = np.array([[np.nan if v is None else 100 * v for v in r["scores"]["per_class_official"]]
                          for r in runs], dtype=np.float64)
    class_ids = runs[0]["scores"]["class_ids"]
    return {
        "feature": feature,
        "miou": float(np.mean(mious)),
        "miou_std": float(statistics.pstdev(mious)) if len(mious) > 1 else 0.0,
        "per_seed": {str(r["seed"]): r["miou"] for r in runs},
        "miou_standard": float(np.mean([r["miou_standard"] for r in runs])),
        "pixel_accuracy": float(np.mean([r["pixel_accuracy"] for r in runs])),
        "per_class_iou": {class_names[c]: float(np.nanmean(per_class[:, i])) for i, c in enumerate(class_ids)},
        "per_image_miou": [None if v is None else 100 * v for v in runs[0]["scores"]["per_image_miou"]],
        "unet_forwards": sum(r["unet_forwards"] for r in runs),
        "members_trained": sum(r["members_trained"] for r in runs),
        "runs": [r["output_dir"] for r in runs],
        **{k: runs[0][k] for k in ("samples", "selected_epoch", "model_selection") if k in runs[0]},
    }


def run_demo(out: str | Path, seeds: Sequence[int] = (0,), n_train: int = 10, n_test: int = 50, members: int = 10,
             features: Sequence[str] = FEATURE_TYPES, progress: bool = True,
             run: Callable[[Path, str], dict[str, Any]] | None = None,
             datasetddpm: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate the data if absent, run the flow for each feature type and seed, write metrics.json and
    report.html under `out`; returns {"features": {feature: entry}, "metrics_path", "report_path", ...}.

    run(config path, label): how a config is run (default: flows.runner.run_config, the segment flow, whose
    progress bars start with the label, e.g. "ddpm s0"); returns the flow's summary."""
    from pipeline import synthetic

    if run is None:
        from flows.runner import run_config

        def run(path: Path, label: str) -> dict[str, Any]:
            return run_config(path, None, progress=progress, label=label)

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    synthetic.write_dataset(out / "data", n_train=n_train, n_test=n_test, n_unlabelled=0, size=32, seed=0)
    results: dict[str, list[dict[str, Any]]] = {f: [] for f in features}
    for feature in features:
        for seed in seeds:
            cfg = demo_config(feature, seed, n_train, n_test, members)
            path = out / f"config-{feature}-s{seed}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            summary = run(path, f"{feature} s{seed}")
            evaluation = json.loads(Path(summary["metrics_path"]).read_text())["result"]
            results[feature].append({**summary, "seed": seed, "scores": evaluation["scores"],
                                     "output_dir": str(Path(summary["metrics_path"]).parent)})
    datasetddpm_wall = None
    if datasetddpm is not None:  # DatasetDDPM on the ddpm config of the first seed: its ensemble labels the samples
        datasetddpm_started = time.perf_counter()
        results["datasetddpm"] = [run_datasetddpm_demo(out, seeds[0], n_train, n_test, members, datasetddpm,
                                                       progress)]
        datasetddpm_wall = time.perf_counter() - datasetddpm_started
    entries = {f: _summarise(f, runs, synthetic.CLASS_NAMES) for f, runs in results.items()}
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(entries, indent=1))
    report_path = write_demo_report(out, entries, results, n_test)
    return {"features": entries, "metrics_path": str(metrics_path), "report_path": str(report_path),
            "seeds": list(seeds), "wall_s": time.perf_counter() - started, "datasetddpm_wall_s": datasetddpm_wall,
            "unet_forwards": sum(e["unet_forwards"] for e in entries.values()),
            "members_trained": sum(e["members_trained"] for e in entries.values())}


def run_datasetddpm_demo(out: Path, seed: int, n_train: int, n_test: int, members: int,
                         settings: dict[str, Any], progress: bool) -> dict[str, Any]:
    """DatasetDDPM on the demo: the ddpm config of classifier seed `seed` with a datasetddpm section (the same
    store and keys: its ensemble is the ddpm row's), run by the datasetddpm flow; returns a per-seed run entry."""
    from dataclasses import asdict

    from flows.datasetddpm import datasetddpm
    from flows.runner import start_embedded_prefect
    from flows.synthesize import sampling_plan
    from pipeline.config import load_config

    cfg = demo_config("ddpm", seed, n_train, n_test, members)
    cfg["datasetddpm"] = dict(settings)
    path = out / f"config-datasetddpm-s{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    plan = sampling_plan(load_config(path))
    start_embedded_prefect()
    summary = datasetddpm(str(path), None, asdict(plan), ["synthesize", "segmenter"], progress=progress)
    segmenter = summary["segmenter"]
    evaluation = json.loads(Path(segmenter["metrics_path"]).read_text())["result"]
    return {"miou": segmenter["miou"], "miou_standard": segmenter["miou_standard"],
            "pixel_accuracy": segmenter["pixel_accuracy"], "seed": seed, "scores": evaluation["scores"],
            "output_dir": str(Path(segmenter["metrics_path"]).parent), "masks_path": segmenter["masks_path"],
            "unet_forwards": summary.get("unet_forwards", 0), "members_trained": summary.get("members_trained", 0),
            "samples": plan.samples, "samples_drawn": summary["samples_drawn"],
            "selected_epoch": segmenter["selected_epoch"], "model_selection": segmenter["model_selection"]}


def _test_samples(out: Path, stems: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from PIL import Image

    images = [np.asarray(Image.open(out / "data" / "test" / f"{s}.png").convert("RGB")) for s in stems]
    labels = [np.load(out / "data" / "test" / f"{s}.npy") for s in stems]
    return images, labels


def write_demo_report(out: Path, entries: dict[str, dict[str, Any]], results: dict[str, list[dict[str, Any]]],
                      n_test: int) -> Path:
    """report.html: the table, per-class IoU bars per feature type, and every test image (worst first by the
    first feature type's mIoU): image | ground truth | one prediction per feature type (the first seed's)."""
    from pipeline import report, synthetic

    features = list(entries)
    first = results[features[0]][0]
    stems = [Path(p).stem for p in sorted((Path(first["masks_path"])).glob("*.npy"))][:n_test]
    images, labels = _test_samples(out, stems)
    preds = {f: [np.load(Path(results[f][0]["masks_path"]) / f"{s}.npy") for s in stems] for f in features}
    per_image = entries[features[0]]["per_image_miou"]
    ranked = sorted(range(len(stems)), key=lambda i: (np.inf if per_image[i] is None else per_image[i], i))
    figures = out / "report"

    def grid(order: list[int], name: str) -> Path:
        return report.plot_prediction_grid(
            [images[i] for i in order], [labels[i] for i in order],
            {f: [preds[f][i] for i in order] for f in features},
            [f"{stems[i]}  {features[0]} {per_image[i]:.0f}" if per_image[i] is not None else stems[i]
             for i in order], figures / name, synthetic.PALETTE, synthetic.CLASS_NAMES, synthetic.IGNORE_LABEL)

    worst = grid(ranked[:8], "predictions_worst8.png")
    gallery = grid(ranked, "predictions.png")
    bars = report.plot_iou_by_feature({f: entries[f]["per_class_iou"] for f in features},
                                      {f: entries[f]["miou"] for f in features}, figures / "per_class_iou.png")
    seeds = len(next(iter(results.values())))
    table = report.Table(
        ["features", "mIoU", "± (seeds)", "pixel accuracy", *synthetic.CLASS_NAMES],
        [[f, e["miou"], format_spread(e, 2), e["pixel_accuracy"], *[e["per_class_iou"].get(c) for c in synthetic.CLASS_NAMES]]
         for f, e in entries.items()],
        caption=f"official mIoU (%), mean over {seeds} classifier seed(s); per-class IoU (%)")
    return report.write_html_report(out / "report.html", "ddpmseg demo: diffusion features vs baselines", [
        report.ReportSection("Scores", "ddpm: the bundled demo backbone's decoder features; rgb: colour + pixel "
                             "coordinates; random-unet: the same UNet with random weights. Same data, same MLP "
                             "ensemble, same store.", tables=[table], images=[bars]),
        report.ReportSection("The 8 worst test images", f"by the {features[0]} prediction's mIoU; image | ground "
                             f"truth | prediction of each feature type", images=[worst]),
        report.ReportSection("Every test image, worst first",
                             f"ordered by the {features[0]} prediction's mIoU (standard, per image), ascending; "
                             f"predictions of classifier seed {results[features[0]][0]['seed']}",
                             images=[gallery]),
    ])


SPREAD_NONE = "–"  # the seed spread with one seed: there is none to state


def format_spread(entry: dict[str, Any], digits: int = 1) -> str:
    """The seed spread of one feature type's entry as text: the population std over its seeds, or "–" with one
    seed (a single run has no spread; metrics.json then holds miou_std 0.0)."""
    return f"{entry['miou_std']:.{digits}f}" if len(entry["per_seed"]) > 1 else SPREAD_NONE


def format_table(entries: dict[str, dict[str, Any]]) -> str:
    """The demo's table as text: mIoU ± seed spread ("–" with one seed), pixel accuracy and per-class IoU per
    feature type, each class under its full name."""
    from pipeline import synthetic

    names = list(synthetic.CLASS_NAMES)
    widths = [max(6, len(n)) for n in names]
    head = f"{'features':<12} {'mIoU':>6} {'±':>5} {'pix acc':>7}  " + " ".join(
        f"{n:>{w}}" for n, w in zip(names, widths))
    lines = [head, "-" * len(head)]
    for f, e in entries.items():
        per = " ".join(f"{e['per_class_iou'].get(n, float('nan')):{w}.1f}" for n, w in zip(names, widths))
        lines.append(f"{f:<12} {e['miou']:6.1f} {format_spread(e):>5} {e['pixel_accuracy']:7.1f}  {per}")
    return "\n".join(lines)

"""The `sweep` and `clusters` Prefect flows: representation analysis from the feature cache.

sweep: one classifier per (decoder block, timestep), as in the paper's analysis.
  1. extract what the store lacks for all requested blocks and steps: `extract_stage.extract_split` on the config with
     every requested block, so a missing (image, t) costs ONE UNet forward that yields all blocks at once
     (forwards = images x steps, never x blocks);
  2. for each cell (b, t): the config restricted to steps [t], blocks [b] with a lighter classifier (`members`
     members, `epochs` epochs; stated in the summary) -> its train key (members are reused like any train stage's)
     -> `members` train-member tasks, submitted in parallel;
  3. each cell's evaluation task (after its members): predict every test image from block b at t, score it
     (official + standard mIoU, per class); recorded under stages/sweep-cell/<key>.json;
  4. classes grouped by mean area in the training labels (small / large, median or a threshold), mIoU per group;
     sweep.csv, sweep.json, heatmap.png, size_split.png; the whole result recorded under stages/sweep/<key>.json.

Determinism: `train_stage.train_member` seeds torch's global RNG (torch.manual_seed) and draws the init (and any dropout
masks) from it, so two trainings in threads of one process would race on that RNG. Members therefore run either in
a process pool (`workers > 1`: Prefect's ProcessPoolTaskRunner, one RNG per process) or, in a thread runner, one at
a time under a process-wide lock. Training runs on one torch thread (train_stage.train_member) and so does a cell's
evaluation here, so no float result depends on the thread count either: members and scores are the same bits
whatever `workers` is (tested between workers=1 and workers=2).

clusters: MiniBatchKMeans (k, seed) on each (block, step)'s native-resolution features of the first N images of a
split, upsampled to the image; one grid PNG (+ .npz of the maps) per image; one task per image.
"""
from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from flows import extract as extract_stage
from flows import prefect_results
from flows import prepare as prepare_stage
from flows import stage_keys
from flows import train as train_stage
from pipeline import predict
from pipeline import threads
from pipeline import analysis, metrics
from pipeline.config import ConfigError, ExperimentConfig, config_to_dict
from pipeline.progress import labelled, progress_bar
from storage import artifacts
from storage.features import FeatureStore
from storage.keys import Key
from storage.location import StoreLocation

DEFAULT_MEMBERS = analysis.SWEEP_DEFAULT_MEMBERS
DEFAULT_EPOCHS = analysis.SWEEP_DEFAULT_EPOCHS
CELL_STAGE = "sweep-cell"
SWEEP_STAGE = "sweep"
_TRAIN_LOCK = threading.Lock()  # train_member seeds torch's global RNG: one training at a time per process


# -- configs and keys --------------------------------------------------------------------------------------------
def check_blocks_steps(cfg: ExperimentConfig, blocks: Sequence[int], steps: Sequence[int]) -> None:
    """ConfigError naming --blocks / --steps when a block is outside the model or a step outside the schedule
    (the config's extractor decides; kinds without timesteps have the single pseudo-step 0)."""
    if not blocks or not steps:
        raise ConfigError(f"--blocks / --steps: nothing to sweep (blocks {list(blocks)}, steps {list(steps)})")
    try:
        cfg.model.extractor().check_features(list(steps), list(blocks))
    except ValueError as err:
        raise ConfigError(str(err).replace("features.blocks:", "--blocks:").replace("features.steps:", "--steps:")) \
            from None


def _with(cfg: ExperimentConfig, **sections: dict[str, Any]) -> ExperimentConfig:
    data = config_to_dict(cfg)
    for name, values in sections.items():
        data[name] = {**data[name], **values}
    if "augmentation" in data:  # the sweep trains on the base view (the paper's analysis); no augmented views
        data["augmentation"] = {**data["augmentation"], "views": 0}
    return ExperimentConfig.model_validate(data)


def extraction_config(cfg: ExperimentConfig, blocks: Sequence[int], steps: Sequence[int]) -> ExperimentConfig:
    """cfg with every requested block and step: one forward per (image batch, t) writes all the blocks."""
    return _with(cfg, features={"blocks": sorted(blocks), "steps": list(steps)})


def cell_config(cfg: ExperimentConfig, block: int, step: int, members: int, epochs: int) -> ExperimentConfig:
    """cfg restricted to one block at one timestep, with `members` members trained for at most `epochs` epochs."""
    return _with(cfg, features={"blocks": [block], "steps": [step]},
                 classifier={"model_num": members, "max_epochs": epochs})


def cell_key(train: Key, test_refs: Sequence[stage_keys.ImageRef]) -> Key:
    """Key of one cell's evaluation: its train key and the test images (content ids + label hashes)."""
    return Key(CELL_STAGE, {"train": train.value, "images": [[r.image_id, r.label_hash] for r in test_refs],
                            "prediction": "mode-vote"})


# -- the evaluation of one cell (plain function) -----------------------------------------------------------------
def evaluate_cell(cfg_bt: ExperimentConfig, store: FeatureStore, test_refs: Sequence[stage_keys.ImageRef],
                  train: Key) -> dict[str, Any]:
    """Predict every test image from the cell's single (block, t) map with its members and score it.

    Returns {"block", "step", "miou", "miou_standard" (percent), "per_class_official", "per_class_standard"
    (fractions, following "class_ids"), "per_image_miou", "train_key"}."""
    (block,), (step,) = cfg_bt.features.blocks, cfg_bt.features.steps
    members = train_stage.load_members(store.location, train, cfg_bt.classifier.model_num)
    unit = stage_keys.unit_for(cfg_bt, step)
    d = cfg_bt.dataset
    masks, gts = [], []
    with threads.torch_threads(1):  # the same bits in any worker; cells run in parallel instead
        for r in test_refs:
            maps = [torch.from_numpy(m) for m in store.read_maps([unit], r.image_id, [block])]
            masks.append(predict.predict_maps(members, maps, cfg_bt.image_size).mask)
            gts.append(store.read_view_label(stage_keys.BASE_VIEW, r.image_id, r.label_hash))
    s = metrics.score(masks, gts, d.number_class, d.ignore_label).to_dict()
    return {"block": block, "step": step, "miou": 100 * s["official_miou"],
            "miou_standard": None if s["standard_miou"] is None else 100 * s["standard_miou"],
            "per_class_official": s["per_class_official"], "per_class_standard": s["per_class_standard"],
            "class_ids": s["class_ids"], "per_image_miou": s["per_image_miou"], "train_key": train.value}


def _cell_from_record(result: dict[str, Any]) -> analysis.SweepCell:
    return analysis.SweepCell(block=result["block"], step=result["step"], miou=result["miou"],
                              miou_standard=math.nan if result["miou_standard"] is None else result["miou_standard"],
                              per_class_official=result["per_class_official"],
                              per_class_standard=result["per_class_standard"], class_ids=result["class_ids"],
                              train_key=result["train_key"])


# -- tasks (descriptors in, descriptors out) ---------------------------------------------------------------------
def _open(config: dict[str, Any], store_url: str) -> tuple[ExperimentConfig, FeatureStore]:
    return ExperimentConfig.model_validate(config), FeatureStore(StoreLocation.parse(store_url))


def _refs(refs: list[dict[str, str]]) -> list[stage_keys.ImageRef]:
    return [stage_keys.ImageRef(**r) for r in refs]


def _key_dict(key: Key) -> dict[str, Any]:
    return {"stage": key.stage, "inputs": key.inputs}


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(config: dict[str, Any], store_url: str, split: str) -> list[dict[str, str]]:
    cfg, store = _open(config, store_url)
    return [asdict(r) for r in prepare_stage.prepare_split(cfg, store, split)]


@task(name="sweep-extract", cache_policy=NO_CACHE)
def extract_task(config: dict[str, Any], store_url: str, refs: list[dict[str, str]], split: str,
                 progress: bool = True, label: str = "") -> dict[str, int]:
    """Extract what the store lacks for config's blocks and steps; {"unet_forwards", "images_written"}."""
    cfg, store = _open(config, store_url)
    return extract_stage.extract_split(cfg, store, _refs(refs), progress=progress,
                                       desc=labelled(label, f"extract {split}"))


@task(name="sweep-train-member", cache_policy=NO_CACHE)
def train_member_task(config: dict[str, Any], store_url: str, refs: list[dict[str, str]], key: dict[str, Any],
                      index: int) -> dict[str, Any]:
    """Train one member of one cell (skipped when committed); under the process-wide training lock."""
    return train_member_locked(config, store_url, refs, key, index)


def train_member_locked(config: dict[str, Any], store_url: str, refs: list[dict[str, str]], key: dict[str, Any],
                        index: int) -> dict[str, Any]:
    """flows.train.train_member under the process-wide lock (a plain module function, so a process pool pickles it
    by reference, never the lock); returns the member's scalar info."""
    cfg, store = _open(config, store_url)
    with _TRAIN_LOCK:
        info = train_stage.train_member(cfg, store, _refs(refs), Key(**key), index, progress=False)
    return {k: v for k, v in info.items() if isinstance(v, (int, float, bool, str))}


@task(name="sweep-evaluate-cell", cache_policy=NO_CACHE)
def evaluate_cell_task(config: dict[str, Any], store_url: str, refs: list[dict[str, str]], train: dict[str, Any],
                       key: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one cell (read from its record when committed); returns {"ran", "result"}."""
    cfg, store = _open(config, store_url)
    k = Key(**key)
    record = artifacts.read_record(store.location, CELL_STAGE, k.value)
    if record is not None:
        return {"ran": False, "result": record["result"]}
    result = evaluate_cell(cfg, store, _refs(refs), Key(**train))
    artifacts.write_record(store.location, k, result)
    return {"ran": True, "result": result}


def task_runner(workers: int):
    """workers <= 1: one thread (tasks one at a time); workers > 1: a process pool of `workers` processes (each
    process has its own global RNG, so trainings cannot race)."""
    if workers <= 1:
        return ThreadPoolTaskRunner(max_workers=1)
    return ProcessPoolTaskRunner(max_workers=workers)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# -- the sweep flow ----------------------------------------------------------------------------------------------
def size_groups_of(cfg: ExperimentConfig, store: FeatureStore, train_refs: Sequence[stage_keys.ImageRef],
                   threshold: float | None) -> analysis.SizeGroups:
    """Classes grouped by mean area in the stored training labels."""
    d = cfg.dataset
    labels = [store.read_view_label(stage_keys.BASE_VIEW, r.image_id, r.label_hash) for r in train_refs]
    areas = analysis.class_mean_areas(labels, metrics.scored_classes(d.number_class, d.ignore_label))
    return analysis.size_groups(areas, threshold)


def class_name(cfg: ExperimentConfig, c: int) -> str:
    names = cfg.dataset.class_names
    return names[c] if names and c < len(names) else f"class {c}"


@flow(name="sweep", flow_run_name=prefect_results.sweep_run_name)
def sweep_flow(config: dict[str, Any], store_url: str, blocks: list[int], steps: list[int],
               members: int = DEFAULT_MEMBERS, epochs: int = DEFAULT_EPOCHS, size_threshold: float | None = None,
               out_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """The sweep for an already-validated config (as plain data); returns the summary (see module doc)."""
    cfg = ExperimentConfig.model_validate(config)
    check_blocks_steps(cfg, blocks, steps)
    loc = StoreLocation.parse(store_url)
    store = FeatureStore(loc)
    summary: dict[str, Any] = {"store": loc.url, "blocks": list(blocks), "steps": list(steps)}

    train_refs = prepare_task(config, loc.url, "train")
    test_refs = prepare_task(config, loc.url, "test")
    tr, te = _refs(train_refs), _refs(test_refs)
    summary["images"] = len({r.image_id for r in tr + te})

    ext = config_to_dict(extraction_config(cfg, blocks, steps))
    forwards = images_written = 0
    for split, refs in (("train", train_refs), ("test", test_refs)):
        counts = extract_task(ext, loc.url, refs, split, progress, SWEEP_STAGE)
        forwards += counts["unet_forwards"]
        images_written += counts["images_written"]
    summary.update(unet_forwards=forwards, image_forwards=images_written)

    # one classifier per (block, step): members in parallel, each cell's evaluation after its members
    cells = [(b, t) for b in sorted(blocks) for t in steps]
    member_futures, eval_futures, cached_results, keys = [], [], {}, {}
    for b, t in cells:
        cfg_bt = cell_config(cfg, b, t, members, epochs)
        conf_bt = config_to_dict(cfg_bt)
        train = stage_keys.train_key(cfg_bt, tr)
        ckey = keys[(b, t)] = cell_key(train, te)
        record = artifacts.read_record(loc, CELL_STAGE, ckey.value)
        if record is not None:
            cached_results[(b, t)] = record["result"]
            continue
        futures = [train_member_task.submit(conf_bt, loc.url, train_refs, _key_dict(train), i)
                   for i in range(members) if not artifacts.member_committed(loc, stage_keys.members_key(train), i)]
        member_futures += futures
        eval_futures.append(((b, t), evaluate_cell_task.submit(conf_bt, loc.url, test_refs, _key_dict(train),
                                                               _key_dict(ckey), wait_for=futures)))
    trained = sum(int(f.result()["ran"]) for f in progress_bar(member_futures, desc=labelled(SWEEP_STAGE, "train"),
                                                                unit="member",
                                                                enabled=progress and bool(member_futures)))
    results = dict(cached_results)
    evaluated = 0
    for cell, future in progress_bar(eval_futures, desc=labelled(SWEEP_STAGE, "evaluate"), unit="cell",
                                     enabled=progress and bool(eval_futures)):
        out = future.result()
        results[cell] = out["result"]
        evaluated += int(out["ran"])
    summary.update(cells=len(cells), classifiers_trained=trained, cells_evaluated=evaluated,
                   classifier={"model_num": members, "max_epochs": epochs,
                               "note": f"lighter than the config's ({cfg.classifier.model_num} members, "
                                       f"{cfg.classifier.max_epochs} epochs): {members} member(s), at most "
                                       f"{epochs} epochs per (block, step)"})

    groups = size_groups_of(cfg, store, tr, size_threshold)
    sweep_cells = [_cell_from_record(results[c]).add_groups(groups) for c in cells]
    best = max(sweep_cells, key=lambda c: c.miou)
    summary["best"] = {"block": best.block, "step": best.step, "miou": best.miou,
                       "miou_standard": best.miou_standard}
    summary["size_groups"] = {"threshold": groups.threshold, "rule": groups.rule,
                              "small": [class_name(cfg, c) for c in groups.small],
                              "large": [class_name(cfg, c) for c in groups.large],
                              "absent": [class_name(cfg, c) for c in groups.absent]}
    key = Key(SWEEP_STAGE, {"cells": [[b, t, keys[(b, t)].value] for b, t in cells],
                            "size_threshold": size_threshold})
    summary["sweep_key"] = key.value
    summary.update(write_sweep_outputs(cfg, sweep_cells, groups, sorted(blocks), list(steps),
                                       Path(out_dir) if out_dir else Path(cfg.output_dir) / "sweep", summary))
    artifacts.write_record(loc, key, {k: v for k, v in summary.items() if k not in ("store",)})
    rows = [c.row() for c in sweep_cells]
    prefect_results.publish_table(
        f"{cfg.dataset.name}-sweep", f"# Sweep: {cfg.dataset.name}\n\nbest: block {best.block}, t {best.step}, "
        f"mIoU {best.miou:.2f} (official)\n\n" + prefect_results.markdown_table(rows), rows,
        "mIoU of one classifier per (block, t)")
    return summary


def write_sweep_outputs(cfg: ExperimentConfig, cells: Sequence[analysis.SweepCell], groups: analysis.SizeGroups,
                        blocks: list[int], steps: list[int], out: Path, summary: dict[str, Any]) -> dict[str, str]:
    """sweep.csv, sweep.json, heatmap.png and size_split.png under `out`; returns their paths."""
    from pipeline import report

    out.mkdir(parents=True, exist_ok=True)
    csv_path = analysis.write_sweep_csv(out / "sweep.csv", cells)
    grid = analysis.sweep_grid(cells, blocks, steps, "miou")
    name = cfg.dataset.name
    heatmap = report.plot_heatmap(grid, blocks, steps, out / "heatmap.png",
                                  title=f"{name}: mIoU (official) of one classifier per (block, t)\n"
                                        f"{summary['classifier']['model_num']} member(s), "
                                        f"<= {summary['classifier']['max_epochs']} epochs each")
    split = report.plot_size_split(analysis.sweep_grid(cells, blocks, steps, "small"),
                                   analysis.sweep_grid(cells, blocks, steps, "large"), blocks, steps,
                                   out / "size_split.png", [class_name(cfg, c) for c in groups.small],
                                   [class_name(cfg, c) for c in groups.large], groups.threshold)
    json_path = out / "sweep.json"
    paths = {"csv": str(csv_path), "json": str(json_path), "heatmap": str(heatmap), "size_split": str(split)}
    payload = {**summary, **paths, "size_groups": {**groups.to_dict(), "names": {
        str(c): class_name(cfg, c) for c in groups.mean_area}},
        "cells": [{**c.row(), "group_miou": c.group_miou, "class_ids": c.class_ids,
                   "per_class_official": c.per_class_official, "per_class_standard": c.per_class_standard}
                  for c in cells]}
    json_path.write_text(json.dumps(_no_nan(payload), indent=1))
    return paths


def _no_nan(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def run_sweep(cfg: ExperimentConfig, store_url: str | None = None, blocks: Sequence[int] | None = None,
              steps: Sequence[int] | None = None, members: int = DEFAULT_MEMBERS, epochs: int = DEFAULT_EPOCHS,
              size_threshold: float | None = None, out_dir: str | Path | None = None, workers: int = 1,
              progress: bool = True) -> dict[str, Any]:
    """Run the sweep flow. Default blocks: every output block of the model; default steps: the config's."""
    blocks = list(blocks) if blocks is not None else list(range(cfg.model.extractor().num_layers()))
    steps = list(steps) if steps is not None else list(cfg.features.steps)
    check_blocks_steps(cfg, blocks, steps)
    if members < 1 or epochs < 1:
        raise ConfigError(f"--members and --epochs must be >= 1, got {members} and {epochs}")
    url = StoreLocation.parse(store_url or cfg.store).url
    runner = sweep_flow.with_options(task_runner=task_runner(workers))
    summary = runner(config_to_dict(cfg), url, blocks, steps, members, epochs, size_threshold,
                     str(out_dir) if out_dir else None, progress)
    summary["workers"] = workers
    return summary


# -- clusters ----------------------------------------------------------------------------------------------------
@task(name="clusters-image", cache_policy=NO_CACHE)
def cluster_image_task(config: dict[str, Any], store_url: str, ref: dict[str, str], blocks: list[int],
                       steps: list[int], k: int, seed: int, out_dir: str) -> dict[str, str]:
    """Cluster maps of one image for every (block, step); writes <stem>.png (grid) and <stem>.npz (maps)."""
    from pipeline import report

    cfg, store = _open(config, store_url)
    r = stage_keys.ImageRef(**ref)
    maps = cluster_maps(cfg, store, r, blocks, steps, k, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / f"{r.stem}.npz"
    np.savez_compressed(npz, maps=maps.astype(np.uint8), blocks=np.array(blocks), steps=np.array(steps), k=k,
                        seed=seed)
    png = report.plot_clusters_grid(store.read_view_input(stage_keys.BASE_VIEW, r.image_id), maps, blocks, steps,
                                    out / f"{r.stem}.png", k,
                                    title=f"{cfg.dataset.name} image {r.stem}: k-means (k = {k}, seed {seed}) "
                                          f"of each block's features",
                                    label=store.read_view_label(stage_keys.BASE_VIEW, r.image_id, r.label_hash),
                                    palette=cfg.dataset.palette, ignore_label=cfg.dataset.ignore_label)
    return {"image": r.stem, "png": str(png), "npz": str(npz)}


def cluster_maps(cfg: ExperimentConfig, store: FeatureStore, ref: stage_keys.ImageRef, blocks: Sequence[int],
                 steps: Sequence[int], k: int, seed: int) -> np.ndarray:
    """(len(blocks), len(steps), H, W) int64 cluster ids of one image (features must be in the store)."""
    out = np.zeros((len(blocks), len(steps), cfg.image_size, cfg.image_size), dtype=np.int64)
    for j, t in enumerate(steps):
        unit = stage_keys.unit_for(cfg, t)
        fmaps = store.read_maps([unit], ref.image_id, list(blocks))
        for i, fmap in enumerate(fmaps):
            out[i, j] = analysis.cluster_map(fmap, k, seed, cfg.image_size)
    return out


@flow(name="clusters")
def clusters_flow(config: dict[str, Any], store_url: str, blocks: list[int], steps: list[int], k: int = 5,
                  images: int = 1, seed: int = 0, split: str = "test", out_dir: str | None = None,
                  progress: bool = True) -> dict[str, Any]:
    cfg = ExperimentConfig.model_validate(config)
    check_blocks_steps(cfg, blocks, steps)
    loc = StoreLocation.parse(store_url)
    refs = prepare_task(config, loc.url, split)[:images]
    ext = config_to_dict(extraction_config(cfg, blocks, steps))
    counts = extract_task(ext, loc.url, refs, split, progress, "clusters")
    out = str(Path(out_dir) if out_dir else Path(cfg.output_dir) / "clusters")
    futures = [cluster_image_task.submit(ext, loc.url, r, list(blocks), list(steps), k, seed, out) for r in refs]
    files = [f.result() for f in futures]
    return {"store": loc.url, "unet_forwards": counts["unet_forwards"], "image_forwards": counts["images_written"],
            "images": len(refs), "split": split, "blocks": list(blocks), "steps": list(steps), "k": k, "seed": seed,
            "out_dir": out, "pngs": [f["png"] for f in files], "npz": [f["npz"] for f in files]}


def run_clusters(cfg: ExperimentConfig, store_url: str | None = None, blocks: Sequence[int] | None = None,
                 steps: Sequence[int] | None = None, k: int = 5, images: int = 1, seed: int = 0,
                 split: str = "test", out_dir: str | Path | None = None, workers: int = 1,
                 progress: bool = True) -> dict[str, Any]:
    """Run the clusters flow. Default blocks: every output block; default steps: the config's."""
    blocks = sorted(blocks) if blocks is not None else list(range(cfg.model.extractor().num_layers()))
    steps = list(steps) if steps is not None else list(cfg.features.steps)
    check_blocks_steps(cfg, blocks, steps)
    if k < 2 or images < 1:
        raise ConfigError(f"--k must be >= 2 and --images >= 1, got {k} and {images}")
    if split not in ("train", "test"):
        raise ConfigError(f"--split: expected train or test, got {split!r}")
    url = StoreLocation.parse(store_url or cfg.store).url
    runner = clusters_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(1, workers)))
    return runner(config_to_dict(cfg), url, list(blocks), steps, k, images, seed, split,
                  str(out_dir) if out_dir else None, progress)

"""The `datasetddpm` Prefect flow: (prepare -> extract -> train -> evaluate, the segment flow's stages) ->
synthesize -> extract the synthetic split -> label -> segmenter train -> segmenter evaluate.

Each stage is a cached task whose Prefect cache key is its stage key (flows/segment.py's rule); the store is the
source of truth: a stage the store lacks runs with refresh_cache=True, one it holds finds nothing to do.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, task

from flows import extract as extract_stage
from flows import label as label_stage
from flows import outputs
from flows import prepare as prepare_stage
from flows import references
from flows import segmenter as segmenter_stage
from flows import stage_keys
from flows import synthesize as synthesize_stage
from flows.segment import extract_task, run_segment
from flows.tasks import CACHED, call_task, image_refs, key_dict, open_store
from pipeline.config import ExperimentConfig, config_to_dict, load_config
from pipeline.progress import labelled
from storage import artifacts
from storage.features import FeatureStore
from storage.keys import Key
from storage.location import StoreLocation

STAGES = ("synthesize", "segmenter")


@task(name="synthesize", **CACHED)
def synthesize_task(config: dict[str, Any], store_url: str, plan: dict[str, Any], key: dict[str, Any],
                    progress: bool = True, label: str = "") -> dict[str, int]:
    cfg, store = open_store(config, store_url)
    return synthesize_stage.synthesize(cfg, store, synthesize_stage.plan_from_dict(plan), progress=progress,
                                       desc=labelled(label, "synthesize"))


@task(name="label", **CACHED)
def label_task(config: dict[str, Any], store_url: str, plan: dict[str, Any], train: dict[str, Any],
               key: dict[str, Any], progress: bool = True, label: str = "") -> dict[str, int]:
    cfg, store = open_store(config, store_url)
    return label_stage.label(cfg, store, synthesize_stage.plan_from_dict(plan), Key(**train), progress=progress,
                             desc=labelled(label, "label"))


@task(name="segmenter-train", **CACHED)
def segmenter_train_task(config: dict[str, Any], store_url: str, plan: dict[str, Any], train: dict[str, Any],
                         key: dict[str, Any], progress: bool = True, label: str = "") -> dict[str, Any]:
    cfg, store = open_store(config, store_url)
    return segmenter_stage.train(cfg, store, synthesize_stage.plan_from_dict(plan), Key(**train), progress=progress,
                                 desc=labelled(label, "segmenter train"))


@task(name="segmenter-evaluate", **CACHED)
def segmenter_evaluate_task(config: dict[str, Any], store_url: str, plan: dict[str, Any], train: dict[str, Any],
                            validation: list[dict[str, str]], test: list[dict[str, str]],
                            key: dict[str, Any]) -> dict[str, Any]:
    cfg, store = open_store(config, store_url)
    eval_key = Key(**key)
    if artifacts.read_record(store.location, eval_key.stage, eval_key.value) is not None:
        return {"ran": False}
    result = segmenter_stage.evaluate(cfg, store, synthesize_stage.plan_from_dict(plan), Key(**train),
                                      image_refs(validation), image_refs(test), eval_key)
    artifacts.write_record(store.location, eval_key, {"miou": result["miou"]})
    return {"ran": True}


def run_synthesize(cfg: ExperimentConfig, loc: StoreLocation, plan: synthesize_stage.SamplingPlan, key: Key,
                   summary: dict[str, Any], progress: bool, label: str) -> list[stage_keys.ImageRef]:
    """Draw the samples still missing (key: synthesize_stage.samples_key); returns the synthetic split's refs."""
    store = FeatureStore(loc)
    missing = synthesize_stage.missing_batches(cfg, store, plan)
    counts, cached = call_task(synthesize_task, bool(missing), summary, config=config_to_dict(cfg), store_url=loc.url,
                           plan=asdict(plan), key=key_dict(key), progress=progress, label=label)
    summary["samples_drawn"] = 0 if cached else counts["samples_drawn"]
    summary["samples_key"] = key.value
    summary["stages"]["synthesize"] = "ran" if summary["samples_drawn"] else "cached"
    return synthesize_stage.synthetic_refs(cfg, store, plan)


def run_datasetddpm(cfg: ExperimentConfig, store_url: str, plan: synthesize_stage.SamplingPlan,
                    stages: tuple[str, ...], progress: bool = True, label: str = "") -> dict[str, Any]:
    """The flow's body (must run inside a flow). stages: ("synthesize",) draws the samples only;
    ("synthesize", "segmenter") runs everything."""
    loc = StoreLocation.parse(store_url, read_only=cfg.store_read_only)
    summary: dict[str, Any] = {"store": loc.url, "stages": {}, "prefect_cache_hits": 0, "samples": plan.samples}
    samples = synthesize_stage.samples_key(cfg, plan)
    if "segmenter" not in stages:
        run_synthesize(cfg, loc, plan, samples, summary, progress, label)
        references.write_lock(cfg, {"synthesize": samples}, [], asdict(plan))
        return summary
    ensemble = run_segment(cfg, loc.url, ("extract", "train", "evaluate"), progress, label=label)
    summary["ensemble"] = {k: ensemble[k] for k in ("miou", "miou_standard", "pixel_accuracy", "metrics_path",
                                                    "train_key", "evaluate_key")}
    summary["unet_forwards"] = ensemble["unet_forwards"]
    summary["members_trained"] = ensemble["members_trained"]
    summary["stages"].update(ensemble["stages"])
    refs = run_synthesize(cfg, loc, plan, samples, summary, progress, label)
    store = FeatureStore(loc)
    config = config_to_dict(cfg)

    todo = extract_stage.extract_plan(cfg, store, refs)  # the synthetic split: extracted like any other
    extract_key = stage_keys.extract_key(cfg, refs)
    counts, cached = call_task(extract_task, bool(todo), summary, config=config, store_url=loc.url,
                           refs=[asdict(r) for r in refs], key=key_dict(extract_key),
                           split=synthesize_stage.SPLIT, progress=progress, label=label)
    summary["unet_forwards"] += 0 if cached else counts["unet_forwards"]
    summary["stages"]["extract synthetic"] = "ran" if todo else "cached"

    train_key = Key(**_train_key_dict(cfg, store))
    key = label_stage.label_key(cfg, plan, train_key)
    missing = label_stage.missing_label_batches(cfg, store, plan, train_key, refs)
    counts, cached = call_task(label_task, bool(missing), summary, config=config, store_url=loc.url, plan=asdict(plan),
                           train=key_dict(train_key), key=key_dict(key), progress=progress, label=label)
    summary["labelled"] = 0 if cached else counts["labelled"]
    summary["label_key"] = key.value
    summary["stages"]["label"] = "ran" if summary["labelled"] else "cached"

    seg_key = segmenter_stage.segmenter_key(cfg, plan, train_key)
    missing = artifacts.read_record(loc, "segmenter", seg_key.value) is None
    info, cached = call_task(segmenter_train_task, missing, summary, config=config, store_url=loc.url, plan=asdict(plan),
                         train=key_dict(train_key), key=key_dict(seg_key), progress=progress, label=label)
    summary["segmenter_epochs_trained"] = 0 if cached else info["epochs_trained"]
    summary["segmenter_key"] = seg_key.value
    summary["stages"]["segmenter"] = "ran" if summary["segmenter_epochs_trained"] else "cached"

    validation = prepare_stage.prepare(cfg, store, "train").base
    test = prepare_stage.prepare(cfg, store, "test").base
    eval_key = segmenter_stage.evaluate_key(cfg, seg_key, validation, test)
    missing = artifacts.read_record(loc, eval_key.stage, eval_key.value) is None
    info, cached = call_task(segmenter_evaluate_task, missing, summary, config=config, store_url=loc.url,
                         plan=asdict(plan), train=key_dict(train_key), validation=[asdict(r) for r in validation],
                         test=[asdict(r) for r in test], key=key_dict(eval_key))
    summary["stages"]["segmenter evaluate"] = "ran" if info["ran"] and not cached else "cached"
    references.write_lock(cfg, {"synthesize": samples, "extract_synthetic": extract_key, "label": key,
                                "segmenter": seg_key, "segmenter_evaluate": eval_key}, [], asdict(plan))
    result = outputs.evaluation_metrics(loc, eval_key.value)
    summary["segmenter"] = {k: result[k] for k in ("miou", "miou_standard", "pixel_accuracy", "model_selection",
                                                   "selected_epoch", "validation_miou")}
    summary["segmenter"]["evaluate_key"] = eval_key.value
    out_cfg = cfg.model_copy(update={"output_dir": str(Path(cfg.output_dir) / "datasetddpm")})
    summary["segmenter"].update(outputs.write_outputs(out_cfg, store, result, {**summary, "evaluate_key":
                                                                                 eval_key.value}))
    return summary


def _train_key_dict(cfg: ExperimentConfig, store: FeatureStore) -> dict[str, Any]:
    split = prepare_stage.prepare(cfg, store, "train", write=False)
    return key_dict(stage_keys.train_key(cfg, split.base + split.views))


@flow(name="datasetddpm")
def datasetddpm(config_path: str, store_url: str | None, plan: dict[str, Any], stages: list[str],
                progress: bool = True) -> dict[str, Any]:
    """DatasetDDPM for one experiment YAML file: stages ["synthesize"] or ["synthesize", "segmenter"]."""
    cfg = load_config(config_path)
    return run_datasetddpm(cfg, store_url or cfg.store, synthesize_stage.plan_from_dict(plan), tuple(stages),
                           progress, label=Path(config_path).stem)

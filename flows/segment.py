"""The `segment` Prefect flow: prepare views -> extract (train + test) -> train members -> evaluate.

Tasks are thin wrappers around flows/stages.py and exchange small descriptors (the config as plain data,
the store URL, image refs, keys), never arrays or store handles.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, task

from flows import stages
from pipeline.config import ExperimentConfig
from storage import artifacts
from storage.features import FeatureStore
from storage.keys import Key
from storage.location import StoreLocation


def _open(config: dict[str, Any], store_url: str) -> tuple[ExperimentConfig, FeatureStore]:
    return ExperimentConfig.model_validate(config), FeatureStore(StoreLocation.parse(store_url))


def _refs(refs: list[dict[str, str]]) -> list[stages.ImageRef]:
    return [stages.ImageRef(**r) for r in refs]


@task(name="prepare")
def prepare_task(config: dict[str, Any], store_url: str, split: str) -> list[dict[str, str]]:
    cfg, store = _open(config, store_url)
    return [asdict(r) for r in stages.prepare_split(cfg, store, split)]


@task(name="extract")
def extract_task(config: dict[str, Any], store_url: str, refs: list[dict[str, str]], split: str,
                 progress: bool = True) -> dict[str, int]:
    cfg, store = _open(config, store_url)
    return stages.extract_split(cfg, store, _refs(refs), progress=progress, desc=f"extract {split}")


@task(name="train-member")
def train_member_task(config: dict[str, Any], store_url: str, refs: list[dict[str, str]], key: dict[str, Any],
                      index: int, progress: bool = True) -> dict[str, Any]:
    cfg, store = _open(config, store_url)
    return stages.train_member(cfg, store, _refs(refs), Key(**key), index, progress=progress)


@task(name="evaluate")
def evaluate_task(config: dict[str, Any], store_url: str, refs: list[dict[str, str]], train: dict[str, Any],
                  key: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    cfg, store = _open(config, store_url)
    result = stages.evaluate(cfg, store, _refs(refs), Key(**train), Key(**key), progress=progress)
    artifacts.write_record(store.location, Key(**key), {"miou": result["miou"]})
    return result


def _key_dict(key: Key) -> dict[str, Any]:
    return {"stage": key.stage, "inputs": key.inputs}


@flow(name="segment")
def segment(config: dict[str, Any], store_url: str | None = None, stages_to_run: tuple[str, ...] = (
        "extract", "train", "evaluate"), progress: bool = True) -> dict[str, Any]:
    """Run the pipeline for one experiment config (a validated ExperimentConfig dumped to plain data)."""
    cfg = ExperimentConfig.model_validate(config)
    store_url = store_url or cfg.store
    loc = StoreLocation.parse(store_url)
    summary: dict[str, Any] = {"store": loc.url, "unet_forwards": 0, "members_trained": 0, "stages": {}}

    train_refs = prepare_task(config, loc.url, "train")
    test_refs = prepare_task(config, loc.url, "test")
    if "extract" in stages_to_run:
        ran = 0
        for split, refs in (("train", train_refs), ("test", test_refs)):
            counts = extract_task(config, loc.url, refs, split, progress)
            ran += counts["unet_forwards"]
        summary["unet_forwards"] = ran
        summary["stages"]["extract"] = "ran" if ran else "cached"

    train_key = stages.train_key(cfg, _refs(train_refs))
    summary["train_key"] = train_key.value
    if "train" in stages_to_run:
        if artifacts.read_record(loc, "train", train_key.value) is not None:
            summary["stages"]["train"] = "cached"
        else:
            infos = [train_member_task(config, loc.url, train_refs, _key_dict(train_key), i, progress)
                     for i in range(cfg.classifier.model_num)]
            summary["members_trained"] = sum(1 for i in infos if i["ran"])
            artifacts.write_record(loc, train_key, {"members": cfg.classifier.model_num})
            summary["stages"]["train"] = "ran" if summary["members_trained"] else "cached"

    if "evaluate" in stages_to_run:
        eval_key = stages.evaluate_key(cfg, train_key, _refs(test_refs))
        summary["evaluate_key"] = eval_key.value
        record = artifacts.read_record(loc, "evaluate", eval_key.value)
        if record is not None:
            import json

            result = json.loads(loc.read_bytes(f"evaluations/{eval_key.value}/metrics.json"))
            summary["stages"]["evaluate"] = "cached"
        else:
            result = evaluate_task(config, loc.url, test_refs, _key_dict(train_key), _key_dict(eval_key), progress)
            summary["stages"]["evaluate"] = "ran"
        summary.update({k: result[k] for k in ("miou", "miou_standard", "pixel_accuracy", "uncertainty")})
        summary.update(stages.write_outputs(cfg, FeatureStore(loc), eval_key, result, summary))
    return summary

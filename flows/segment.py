"""The `segment` Prefect flow: prepare views -> extract (train + test) -> train members -> evaluate.

Tasks are thin wrappers around the stage modules (flows/prepare.py, extract.py, train.py, evaluate.py, outputs.py) and exchange small descriptors (the config as plain data,
the store URL, image refs, stage keys), never arrays or store handles.

Caching: every cached task's Prefect cache key is its stage key, so a stage done before shows as `Cached`.
The store is the source of truth: before calling a task the flow checks the store, and when the store lacks
the stage (deleted, repaired, another machine's Prefect database) the task runs with `refresh_cache=True`;
when the store has it but Prefect does not, the task runs and finds nothing to do.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import evaluate as evaluate_stage
from flows import extract as extract_stage
from flows import outputs
from flows import prepare as prepare_stage
from flows import prefect_results
from flows import references
from flows import stage_keys
from flows import train as train_stage
from flows.tasks import CACHED, call_task, call_tasks, call_tasks_concurrently, image_refs, key_dict, open_store
from pipeline.config import ExperimentConfig, config_to_dict, load_config
from pipeline.progress import labelled, progress_bar
from pipeline.threads import torch_threads
from storage import artifacts
from storage.features import FeatureStore
from storage.keys import Key
from storage.location import StoreLocation

ALL_STAGES = ("extract", "train", "evaluate")


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(config: dict[str, Any], store_url: str, split: str) -> dict[str, list[dict[str, str]]]:
    """Validate and store a split's images, labels and derived views; returns {"base": refs, "views": refs}."""
    cfg, store = open_store(config, store_url)
    refs = prepare_stage.prepare(cfg, store, split)
    return {"base": [asdict(r) for r in refs.base], "views": [asdict(r) for r in refs.views]}


@task(name="extract", **CACHED)
def extract_task(config: dict[str, Any], store_url: str, refs: list[dict[str, str]], key: dict[str, Any],
                 split: str, progress: bool = True, label: str = "") -> dict[str, int]:
    cfg, store = open_store(config, store_url)
    return extract_stage.extract_split(cfg, store, image_refs(refs), progress=progress,
                                       desc=labelled(label, f"extract {split}"))


@task(name="train-member", **CACHED)
def train_member_task(config: dict[str, Any], store_url: str, refs: list[dict[str, str]], key: dict[str, Any],
                      index: int, progress: bool = True, label: str = "") -> dict[str, Any]:
    cfg, store = open_store(config, store_url)
    return train_stage.train_member(cfg, store, image_refs(refs), Key(**key), index, progress=progress, label=label)


@task(name="train-members", **CACHED)
def train_members_task(config: dict[str, Any], store_url: str, refs: list[dict[str, str]], key: dict[str, Any],
                       indices: list[int], progress: bool = True, label: str = "") -> list[dict[str, Any]]:
    """The members `indices` not yet committed, trained in one batched pass (classifier.ensemble: batched)."""
    cfg, store = open_store(config, store_url)
    return train_stage.train_members(cfg, store, image_refs(refs), Key(**key), indices, progress=progress, label=label)


@task(name="evaluate", **CACHED)
def evaluate_task(config: dict[str, Any], store_url: str, refs: list[dict[str, str]], train: dict[str, Any],
                  key: dict[str, Any], progress: bool = True, label: str = "") -> dict[str, Any]:
    cfg, store = open_store(config, store_url)
    eval_key = Key(**key)
    if artifacts.read_record(store.location, "evaluate", eval_key.value) is not None:
        return {"ran": False}
    result = evaluate_stage.evaluate(cfg, store, image_refs(refs), Key(**train), eval_key, progress=progress,
                                     label=label)
    artifacts.write_record(store.location, eval_key, {"miou": result["miou"]})
    return {"ran": True}


def run_segment(cfg: ExperimentConfig, store_url: str | None = None, stages_to_run: tuple[str, ...] = ALL_STAGES,
                progress: bool = True, parallel: bool = False, label: str = "",
                name: str | None = None) -> dict[str, Any]:
    """The body of the flow for an already-validated config (must run inside a flow).

    parallel: extraction per image batch and ensemble members as concurrent tasks (on a Dask cluster).
    label: which run the progress bars belong to (e.g. "ddpm s0"), first on each bar.
    name: of the evaluation's Prefect artifacts (default: the config file's stem, else the data set's name)."""
    config = config_to_dict(cfg)
    loc = StoreLocation.parse(store_url or cfg.store, read_only=cfg.store_read_only)
    store = FeatureStore(loc)
    summary: dict[str, Any] = {"store": loc.url, "unet_forwards": 0, "members_trained": 0, "stages": {},
                               "prefect_cache_hits": 0}

    prepared = {split: prepare_task(config, loc.url, split) for split in ("train", "test")}
    split_refs = {split: prepare_stage.SplitRefs(image_refs(p["base"]), image_refs(p["views"])) for split, p in prepared.items()}
    train_refs = [asdict(r) for r in split_refs["train"].extraction(cfg, "train")]
    test_refs = prepared["test"]["base"]
    keys: dict[str, Key] = {}
    if "extract" in stages_to_run:
        for split, sr in split_refs.items():
            refs = sr.extraction(cfg, split)
            keys[f"extract_{split}"] = stage_keys.extract_key(cfg, refs)
            step = cfg.features.batch_size if parallel else max(1, len(refs))
            calls = []
            for batch in (refs[i:i + step] for i in range(0, len(refs), step)):
                todo = extract_stage.extract_plan(cfg, store, batch)
                calls.append((bool(todo), dict(config=config, store_url=loc.url, refs=[asdict(r) for r in batch],
                                               key=key_dict(stage_keys.extract_key(cfg, batch)), split=split,
                                               progress=progress and not parallel, label=label)))
            for counts, cached in call_tasks(extract_task, calls, summary, parallel):
                summary["unet_forwards"] += 0 if cached else counts["unet_forwards"]
        summary["stages"]["extract"] = "ran" if summary["unet_forwards"] else "cached"

    train_key = keys["train"] = stage_keys.train_key(cfg, image_refs(train_refs))
    summary["train_key"] = train_key.value
    if "train" in stages_to_run:
        missing = [i for i in range(cfg.classifier.model_num)
                   if not artifacts.member_committed(loc, stage_keys.members_key(train_key), i)]
        if cfg.classifier.ensemble == "batched":  # one task: a pass over the missing members on every core
            infos, cached = call_task(train_members_task, bool(missing), summary, config=config, store_url=loc.url,
                                  refs=train_refs, key=key_dict(train_key),
                                  indices=missing or list(range(cfg.classifier.model_num)), progress=progress,
                                  label=label)
            summary["members_trained"] += 0 if cached else sum(int(info["ran"]) for info in infos)
        else:
            at_once = 1 if parallel else local_member_tasks(cfg, len(missing))
            calls = [(i in missing, dict(config=config, store_url=loc.url, refs=train_refs, key=key_dict(train_key),
                                         index=i, progress=progress and not parallel and at_once == 1, label=label))
                     for i in range(cfg.classifier.model_num)]
            if at_once > 1:  # members on one thread each, several at a time: the same members, sooner
                with torch_threads(torch.get_num_threads()), progress_bar(
                        desc=labelled(label, f"train {len(missing)} members, {at_once} at a time"),
                        total=len(calls), unit="member", enabled=progress) as bar:
                    results = call_tasks_concurrently(train_member_task, calls, summary, at_once, bar)
            else:
                results = call_tasks(train_member_task, calls, summary, parallel)
            for info, cached in results:
                summary["members_trained"] += int(info["ran"] and not cached)
        if artifacts.read_record(loc, "train", train_key.value) is None:
            artifacts.write_record(loc, train_key, {"members": cfg.classifier.model_num,
                                                   "members_key": stage_keys.members_key(train_key)})
        summary["stages"]["train"] = "ran" if summary["members_trained"] else "cached"

    if "evaluate" in stages_to_run:
        eval_key = keys["evaluate"] = stage_keys.evaluate_key(cfg, train_key, image_refs(test_refs))
        summary["evaluate_key"] = eval_key.value
        missing = artifacts.read_record(loc, "evaluate", eval_key.value) is None
        info, cached = call_task(evaluate_task, missing, summary, config=config, store_url=loc.url, refs=test_refs,
                             train=key_dict(train_key), key=key_dict(eval_key), progress=progress, label=label)
        summary["stages"]["evaluate"] = "ran" if info["ran"] and not cached else "cached"
        result = outputs.evaluation_metrics(loc, eval_key.value)
        summary.update({k: result[k] for k in ("miou", "miou_standard", "pixel_accuracy", "uncertainty")})
        summary.update(outputs.write_outputs(cfg, store, result, summary))
        name = name or (Path(cfg.source_path).stem if cfg.source_path else cfg.dataset.name)
        prefect_results.publish_evaluation(name, summary, result)

    if all(v == "cached" for v in summary["stages"].values()):
        summary["message"] = "nothing to do: every stage is fresh (0 forwards, 0 members trained)"
    references.write_lock(cfg, keys, split_refs["train"].base + split_refs["test"].base)
    return summary


def local_member_tasks(cfg: ExperimentConfig, missing: int) -> int:
    """How many independent members train at a time without a Dask cluster: on the CPU, one per core
    (features.cpu_threads or all cores; each member runs on one torch thread, so its values are those it gets
    alone: its init is drawn under pipeline.classifier.INIT_LOCK, its dropout masks from a generator of its own),
    at most the members missing; on a GPU one at a time."""
    from pipeline.backbone import resolve_device

    if missing <= 1 or resolve_device(cfg.classifier.device).type != "cpu":
        return 1
    return max(1, min(cfg.features.cpu_threads or os.cpu_count() or 1, missing))


@flow(name="segment", flow_run_name=prefect_results.segment_run_name)
def segment(config_path: str, store_url: str | None = None, stages_to_run: list[str] | None = None,
            progress: bool = True, read_only: bool = False, parallel: bool = False,
            label: str | None = None) -> dict[str, Any]:
    """Run the pipeline for one experiment YAML file (read at run time, so scheduled runs see its edits).

    label: first on each progress bar (default: the config file's stem)."""
    cfg = load_config(config_path)
    if read_only:
        cfg.store_read_only = True
    label = Path(config_path).stem if label is None else label
    summary = run_segment(cfg, store_url, tuple(stages_to_run or ALL_STAGES), progress, parallel, label)
    summary["flow_run"] = _flow_run_id()  # not in metrics.json (written before): the fast path's is None
    return summary


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def segment_on(dask_address: str | None):
    """The segment flow, on a Dask cluster's task runner when an address (tcp://host:8786) is given."""
    if not dask_address:
        return segment
    from prefect_dask import DaskTaskRunner

    return segment.with_options(task_runner=DaskTaskRunner(address=dask_address))

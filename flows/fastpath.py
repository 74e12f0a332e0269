"""The no-op fast path of `ddpmseg run`: decide, read-only and without Prefect, that the flow would do nothing.

Like `make` or `dvc repro`, a re-run of an unchanged config should cost about what checking it costs. Starting
Prefect's ephemeral server and running one flow takes seconds; the checks take milliseconds. So before starting
Prefect, `flows.runner.run_config` asks `check` whether the segment flow (flows/segment.py, `run_segment`) would
write anything at all. Only when it would not does it return the summary the flow would have returned (every
stage "cached", 0 forwards, 0 members, the same metrics and paths) with "flow_run": None; on anything else —
a view, a forward, a member, a stage record, an evaluation, an output file or the lock file that the flow would
write, or any error while checking — the caller runs the flow as before.

What the flow writes on a run, and what is checked here instead (mirroring run_segment step by step):
- prepare: each split's base images and derived views (augmented / test-time) -> every view is committed;
- extract: the missing (image, timestep, block) maps -> the extraction plan of both splits is empty;
- train: uncommitted members, then the train record -> every member is committed and the record exists;
- evaluate: the evaluation record, then write_outputs copies masks + metrics.json into output_dir (and the
  report when the evaluation changed or the report is missing) -> the record exists, metrics.json there holds
  this evaluation (same evaluate key, store, config and result), every mask file and the report exist;
- the lock file (<output_dir>/ddpmseg.lock.json) -> it already records these keys and image names.
What a no-op flow run would rewrite with the same content (masks, the lock) is left as it is; metrics.json keeps
the summary of the last run that did work (its "stages" say what ran then).

Nothing here writes: the store is opened read-only and a missing local store directory is not created. This
module must not import Prefect (the point is not to pay for it); the cheap output checks come first, so an
edited config falls through before the data set is even read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig, config_to_dict

ALL_STAGES = ("extract", "train", "evaluate")  # = flows.segment.ALL_STAGES (not imported: it imports Prefect)
NOTHING_TO_DO = "nothing to do: every stage is fresh (0 forwards, 0 members trained)"  # = run_segment's message
SKIPPED = "skipped: nothing to do (no flow run started; --always-flow runs and records one)"


class _Work(Exception):
    """The flow would do (or write) something: the reason."""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON text (NaN == NaN, as in the files)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _check_outputs_summary(cfg: ExperimentConfig, store_url: str) -> dict[str, Any]:
    """Cheap first look at <output_dir>/metrics.json (no data read): it must exist and be of this config and store."""
    previous = _read_json(Path(cfg.output_dir) / "metrics.json")
    if previous is None:
        raise _Work(f"{Path(cfg.output_dir) / 'metrics.json'} is missing or unreadable")
    if previous.get("store") != store_url:
        raise _Work("metrics.json was written for another store")
    if not _same(previous.get("config"), config_to_dict(cfg)):
        raise _Work("the config differs from the one metrics.json was written with")
    return previous


def _check_outputs(cfg: ExperimentConfig, previous: dict[str, Any], result: dict[str, Any],
                   summary: dict[str, Any]) -> dict[str, str]:
    """What outputs.write_outputs would write is already there; returns the paths it would return."""
    out = Path(cfg.output_dir)
    for key in ("train_key", "evaluate_key"):
        if previous.get(key) != summary[key]:
            raise _Work(f"metrics.json holds another evaluation ({key})")
    if not _same(previous.get("result"), result):
        raise _Work("metrics.json holds another result than the store's evaluation")
    mask_dir = out / "masks"
    suffixes = (".npy", ".png") if cfg.evaluation.save_png else (".npy",)
    for ref in result["images"]:
        for suffix in suffixes:
            if not (mask_dir / f"{ref['stem']}{suffix}").is_file():
                raise _Work(f"mask {mask_dir / (ref['stem'] + suffix)} is missing")
    report_path = out / "report" / "report.html"
    if cfg.evaluation.gallery > 0 and not report_path.is_file():
        raise _Work(f"{report_path} is missing")
    paths = {"metrics_path": str(out / "metrics.json"), "masks_path": str(mask_dir)}
    if report_path.is_file():
        paths["report_path"] = str(report_path)
    return paths


def _fresh_summary(cfg: ExperimentConfig, store_url: str | None, stages_to_run: tuple[str, ...]) -> dict[str, Any]:
    """The summary run_segment would return, or _Work when it would do anything."""
    from storage.location import StoreLocation

    loc = StoreLocation.parse(store_url or cfg.store, read_only=True)
    previous = _check_outputs_summary(cfg, loc.url) if "evaluate" in stages_to_run else None
    if not loc.is_remote and not Path(loc.url).is_dir():
        raise _Work(f"the store {loc.url} does not exist")

    from flows import extract as extract_stage
    from flows import prepare as prepare_stage
    from flows import references
    from flows import stage_keys
    from storage import artifacts
    from storage.features import FeatureStore

    lock = references.read_lock(cfg)
    if not lock:
        raise _Work(f"{references.lock_path(cfg)} is missing")
    store = FeatureStore(loc, read_only=True)
    summary: dict[str, Any] = {"store": loc.url, "unet_forwards": 0, "members_trained": 0, "stages": {},
                               "prefect_cache_hits": 0}

    split_refs = {}
    for split in ("train", "test"):  # prepare, read-only: every base image and derived view already stored
        sr = prepare_stage.prepare(cfg, store, split, write=False)
        for r in sr.base:
            if not store.view_committed(r.view, r.image_id, r.label_hash):
                raise _Work(f"{split} image {r.stem} is not in the store")
        expected = len(sr.base) * len(stage_keys.train_views(cfg) if split == "train" else stage_keys.tta_views(cfg))
        if len(sr.views) != expected:
            raise _Work(f"{split}: derived views missing")
        for r in sr.views:
            if not store.view_committed(r.view, r.image_id, r.label_hash):
                raise _Work(f"{split} view {r.view} of {r.stem} is not in the store")
        split_refs[split] = sr

    keys = {}
    if "extract" in stages_to_run:
        for split, sr in split_refs.items():
            refs = sr.extraction(cfg, split)
            keys[f"extract_{split}"] = stage_keys.extract_key(cfg, refs)
            if extract_stage.extract_plan(cfg, store, refs):
                raise _Work(f"{split}: forwards to run")
        summary["stages"]["extract"] = "cached"

    train_key = keys["train"] = stage_keys.train_key(cfg, split_refs["train"].extraction(cfg, "train"))
    summary["train_key"] = train_key.value
    if "train" in stages_to_run:
        members = stage_keys.members_key(train_key)
        if not all(artifacts.member_committed(loc, members, i) for i in range(cfg.classifier.model_num)):
            raise _Work("members to train")
        if artifacts.read_record(loc, "train", train_key.value) is None:
            raise _Work("the train record is missing")
        summary["stages"]["train"] = "cached"

    if "evaluate" in stages_to_run:
        eval_key = keys["evaluate"] = stage_keys.evaluate_key(cfg, train_key, split_refs["test"].base)
        summary["evaluate_key"] = eval_key.value
        if artifacts.read_record(loc, "evaluate", eval_key.value) is None:
            raise _Work("not evaluated")
        result = artifacts.read_metrics(loc, eval_key.value)
        if result is None:
            raise _Work("the evaluation's metrics are missing from the store")
        if not loc.exists(f"{result['masks_store_path']}/zarr.json"):
            raise _Work("the evaluation's masks are missing from the store")
        summary["stages"]["evaluate"] = "cached"
        summary.update({k: result[k] for k in ("miou", "miou_standard", "pixel_accuracy", "uncertainty")})
        summary.update(_check_outputs(cfg, previous, result, summary))

    recorded = lock.get("stages", {})
    for name, key in keys.items():
        if recorded.get(name, {}).get("key") != key.value:
            raise _Work(f"the lock file does not record stage {name} with this key")
    names = lock.get("names", {})
    for r in split_refs["train"].base + split_refs["test"].base:
        if names.get(r.image_id) != r.stem:
            raise _Work(f"the lock file does not name image {r.stem}")

    summary["message"] = NOTHING_TO_DO
    summary.update({"flow_run": None, "prefect": SKIPPED})
    return summary


def check(cfg: ExperimentConfig, store_url: str | None = None, stages_to_run: tuple[str, ...] = ALL_STAGES,
          read_only: bool = False) -> tuple[dict[str, Any] | None, str]:
    """(summary, "") when the segment flow would do nothing for this config, else (None, why not).

    cfg: the loaded config (not modified); store_url and read_only: as given to the flow."""
    cfg = cfg.model_copy(deep=True)
    if read_only:
        cfg.store_read_only = True  # as the flow does: it is part of the config written to metrics.json
    try:
        return _fresh_summary(cfg, store_url, tuple(stages_to_run)), ""
    except _Work as work:
        return None, str(work)
    except Exception as err:  # noqa: BLE001 - any doubt: the flow runs (and reports a real error properly)
        return None, f"check failed: {type(err).__name__}: {err}"

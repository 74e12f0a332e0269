"""`ddpmseg status`: every stage fresh or stale, and for stale ones which input changed (like `dvc status`).

Freshness comes from the store (the source of truth); the reason comes from comparing the current stage keys'
inputs with those recorded in the config's lock file (`<output_dir>/ddpmseg.lock.json`) by its last run.
DatasetDDPM's stages are listed once the config has run them (the lock holds their sampling plan); their keys come
from modules that import torch, loaded only then.
"""
from __future__ import annotations

from typing import Any

from flows import prepare as prepare_stage
from flows import references
from flows import stage_keys
from pipeline.config import ExperimentConfig
from storage import artifacts
from storage.features import FeatureStore
from storage.location import StoreLocation

_SHORT = 10
_LABELS = {
    "backbone.weights.checkpoint_sha256": "checkpoint bytes",
    "backbone.weights.random_init_seed": "model.init_seed",
    "backbone.kind": "model.kind",
    "features.noise_seed": "features.seed",
}
_STAGE_INPUTS = {"train": "train stage", "samples": "synthesize stage", "labels": "label stage",
                 "segmenter": "segmenter stage"}  # inputs that are another stage's key


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _show(value: Any) -> str:
    text = str(value)
    return text[:_SHORT] + "…" if isinstance(value, str) and len(text) > 24 else text


def _image_changes(old: list, new: list, names: dict[str, str]) -> list[str]:
    old_map, new_map = {i: h for i, h in old}, {i: h for i, h in new}
    added = [i for i in new_map if i not in old_map]
    removed = [i for i in old_map if i not in new_map]
    relabelled = [i for i in new_map if i in old_map and old_map[i] != new_map[i]]
    old_by_name = {names.get(i): i for i in removed}
    replaced = [i for i in added if names.get(i) in old_by_name]
    out = []
    if replaced:
        out.append(f"image bytes changed: {', '.join(sorted(names[i] for i in replaced))}")
    fresh = [i for i in added if i not in replaced]
    if fresh:
        out.append(f"+{len(fresh)} new image(s): {', '.join(sorted(names.get(i, i[:8]) for i in fresh))}")
    gone = len(removed) - len(replaced)
    if gone > 0:
        out.append(f"-{gone} image(s) removed")
    if relabelled:
        out.append(f"label changed: {', '.join(sorted(names.get(i, i[:8]) for i in relabelled))}")
    return out


def diff_inputs(old: dict[str, Any] | None, new: dict[str, Any], names: dict[str, str]) -> list[str]:
    """Human-readable differences between two key input mappings, e.g. 'classifier.dropout 0.0 → 0.4'."""
    if old is None:
        return ["never run with this config"]
    a, b = _flatten(old), _flatten(new)
    out = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) == b.get(path):
            continue
        if path == "images":
            out.extend(_image_changes(a.get(path, []), b.get(path, []), names))
        elif path in _STAGE_INPUTS:
            out.append(f"{_STAGE_INPUTS[path]} changed")
        else:
            out.append(f"{_LABELS.get(path, path)} {_show(a.get(path, '(none)'))} → {_show(b.get(path, '(none)'))}")
    return out or ["inputs unchanged but results missing from the store"]


def stage_status(cfg: ExperimentConfig, store_url: str | None = None) -> list[dict[str, Any]]:
    """One entry per stage (extract per split and timestep): {"stage", "state", "reasons"}."""
    store = FeatureStore(StoreLocation.parse(store_url or cfg.store), read_only=True)  # reading never creates
    lock = references.read_lock(cfg)
    old = lock.get("stages", {})
    prepared = {split: prepare_stage.prepare(cfg, store, split, write=False) for split in ("train", "test")}
    refs = {split: p.extraction(cfg, split) for split, p in prepared.items()}
    names = {**lock.get("names", {}), **{r.image_id: r.stem for rs in refs.values() for r in rs}}
    old_steps = set(old.get("extract_train", {}).get("inputs", {}).get("steps", []))
    old_blocks = set(old.get("extract_train", {}).get("inputs", {}).get("blocks", []))
    out: list[dict[str, Any]] = []

    for split, rs in refs.items():
        key = stage_keys.extract_key(cfg, rs)
        old_inputs = old.get(f"extract_{split}", {}).get("inputs")
        for t in cfg.features.steps:
            missing = _without_features(cfg, store, rs, t)
            name = f"extract {split}/t{t:04d}"
            if not missing:
                out.append({"stage": name, "state": "fresh", "reasons": [], "images": len(rs)})
                continue
            reasons = []
            if old_inputs is not None and old_inputs.get("backbone") != key.inputs["backbone"]:
                reasons += diff_inputs({"backbone": old_inputs["backbone"]}, {"backbone": key.inputs["backbone"]}, names)
            elif old_inputs is not None and old_inputs.get("features") != key.inputs["features"]:
                reasons += diff_inputs({"features": old_inputs["features"]}, {"features": key.inputs["features"]}, names)
            elif old_steps and t not in old_steps:
                reasons.append("new timestep")
            else:
                new_blocks = sorted(set(cfg.sorted_blocks) - old_blocks) if old_blocks else []
                if new_blocks:
                    reasons.append(f"new block(s) {new_blocks}")
                n_missing = len(missing)
                if not new_blocks or n_missing < len(rs):
                    shown = sorted({names.get(e.split("/")[1], e.split("/")[1][:8]) for e in missing})[:8]
                    reasons.append(f"{n_missing} of {len(rs)} image view(s) without features: {', '.join(shown)}")
            state = "missing" if len(missing) == len(rs) else "stale"
            out.append({"stage": name, "state": state, "reasons": reasons, "images": len(rs)})

    train_key = stage_keys.train_key(cfg, refs["train"])
    refs["test"] = prepared["test"].base
    fresh = artifacts.read_record(store.location, "train", train_key.value) is not None
    out.append({"stage": "train", "state": "fresh" if fresh else "stale", "key": train_key.short,
                "reasons": [] if fresh else diff_inputs(old.get("train", {}).get("inputs"), train_key.inputs, names)})
    eval_key = stage_keys.evaluate_key(cfg, train_key, refs["test"])
    fresh = artifacts.read_record(store.location, "evaluate", eval_key.value) is not None
    out.append({"stage": "evaluate", "state": "fresh" if fresh else "stale", "key": eval_key.short,
                "reasons": [] if fresh else diff_inputs(old.get("evaluate", {}).get("inputs"), eval_key.inputs,
                                                        names)})
    if lock.get("datasetddpm_plan") is not None and cfg.model.kind == "ddpm":
        out += datasetddpm_status(cfg, store, lock, train_key, prepared, names)
    return out


def _without_features(cfg: ExperimentConfig, store: FeatureStore, refs: list[stage_keys.ImageRef],
                      t: int) -> dict[str, set[int]]:
    """{entry: blocks not committed} of the refs lacking features at timestep t."""
    missing = {r.entry: set(cfg.sorted_blocks) - store.committed_blocks(stage_keys.unit_for(cfg, t, r.view), r.image_id)
               for r in refs}
    return {entry: blocks for entry, blocks in missing.items() if blocks}


def datasetddpm_status(cfg: ExperimentConfig, store: FeatureStore, lock: dict[str, Any], train_key: Any,
                       prepared: dict[str, Any], names: dict[str, str]) -> list[dict[str, Any]]:
    """DatasetDDPM's stages with the last run's sample count and sampler (its command line may have overridden the
    config's) and the config's other settings: synthesize, extract synthetic per timestep, label, segmenter,
    segmenter evaluate."""
    from flows import label as label_stage
    from flows import segmenter as segmenter_stage
    from flows import synthesize as synthesize_stage
    from pipeline.config import ConfigError
    from storage.features import StoreError

    old, recorded = lock.get("stages", {}), lock["datasetddpm_plan"]

    def entry(stage: str, fresh: bool, key: Any, lock_name: str, more: tuple[str, ...] | list[str] = (),
              state: str = "stale") -> dict[str, Any]:
        reasons = [] if fresh else [*diff_inputs(old.get(lock_name, {}).get("inputs"), key.inputs, names), *more]
        return {"stage": stage, "state": "fresh" if fresh else state, "key": key.short, "reasons": reasons}

    try:
        plan = synthesize_stage.sampling_plan(cfg, recorded["samples"], recorded["respacing"], recorded["ddim"])
        samples = synthesize_stage.samples_key(cfg, plan)
        undrawn = synthesize_stage.missing_batches(cfg, store, plan)
        out = [entry("synthesize", not undrawn, samples, "synthesize",
                     [f"{len(undrawn)} of {plan.batches} sample batch(es) not drawn"],
                     "missing" if len(undrawn) == plan.batches else "stale")]
        if undrawn:  # the samples' ids come from their batch records: nothing further can be checked
            later = ("extract synthetic", "label", "segmenter", "segmenter evaluate")
            return out + [{"stage": s, "state": "stale", "reasons": ["samples not drawn"]} for s in later]
        refs = synthesize_stage.synthetic_refs(cfg, store, plan)
        extract = stage_keys.extract_key(cfg, refs)
        for t in cfg.features.steps:
            lacking = _without_features(cfg, store, refs, t)
            out.append(entry(f"extract synthetic/t{t:04d}", not lacking, extract, "extract_synthetic",
                             [f"{len(lacking)} of {len(refs)} sample(s) without features"],
                             "missing" if len(lacking) == len(refs) else "stale"))
        label = label_stage.label_key(cfg, plan, train_key)
        unlabelled = label_stage.missing_label_batches(cfg, store, plan, train_key, refs)
        out.append(entry("label", not unlabelled, label, "label",
                         [f"{len(unlabelled)} of {plan.batches} batch(es) not labelled"]))
        segmenter = segmenter_stage.segmenter_key(cfg, plan, train_key)
        out.append(entry("segmenter", artifacts.read_record(store.location, "segmenter", segmenter.value) is not None,
                         segmenter, "segmenter"))
        evaluate = segmenter_stage.evaluate_key(cfg, segmenter, prepared["train"].base, prepared["test"].base)
        out.append(entry("segmenter evaluate",
                         artifacts.read_record(store.location, evaluate.stage, evaluate.value) is not None,
                         evaluate, "segmenter_evaluate"))
        return out
    except (ConfigError, StoreError, OSError) as err:  # e.g. backbone weights that cannot be read
        return [{"stage": "datasetddpm", "state": "unknown", "reasons": [str(err)]}]


def format_status(entries: list[dict[str, Any]]) -> str:
    lines = []
    for e in entries:
        reason = f" — {'; '.join(e['reasons'])}" if e["reasons"] else ""
        lines.append(f"{e['stage']:22s} {e['state']}{reason}")
    return "\n".join(lines)

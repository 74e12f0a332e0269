"""What the flows' Prefect tasks share: opening the store from a task's plain-data arguments, the cache key (the
stage key), and calling a cached task so that the store, not Prefect's database, decides whether it runs.

Tasks exchange small descriptors (the config as plain data, the store URL, image refs, stage keys as dicts), never
arrays or store handles: these turn them back into objects.
"""
from __future__ import annotations

from typing import Any

from flows import stage_keys
from pipeline.config import ExperimentConfig
from storage.features import FeatureStore
from storage.keys import Key, digest
from storage.location import StoreLocation


def open_store(config: dict[str, Any], store_url: str) -> tuple[ExperimentConfig, FeatureStore]:
    """The config and the store a task was given as plain data."""
    cfg = ExperimentConfig.model_validate(config)
    return cfg, FeatureStore(StoreLocation.parse(store_url, read_only=cfg.store_read_only))


def image_refs(refs: list[dict[str, str]]) -> list[stage_keys.ImageRef]:
    """Image refs from their dicts (dataclasses.asdict of each)."""
    return [stage_keys.ImageRef(**r) for r in refs]


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect's cache key = the stage key (+ member index, or the indices of a batched pass), per store: the
    Prefect cache is an accelerator of one store, never a claim about another."""
    key = Key(**parameters["key"])
    value = key.value
    if "index" in parameters:
        value = f"{stage_keys.members_key(key)}-m{parameters['index']:02d}"
    elif "indices" in parameters:
        value = f"{stage_keys.members_key(key)}-m{'-'.join(f'{i:02d}' for i in parameters['indices'])}"
    return f"ddpmseg-{key.stage}-{value}-{digest(parameters['store_url'])[:12]}"


CACHED = dict(cache_key_fn=stage_cache_key, persist_result=True)  # the options of every cached stage task


def key_dict(key: Key) -> dict[str, Any]:
    """A stage key as a task argument (Key(**it) turns it back)."""
    return {"stage": key.stage, "inputs": key.inputs}


def call_tasks(task_fn, calls: list[tuple[bool, dict[str, Any]]], summary: dict[str, Any],
               parallel: bool) -> list[tuple[Any, bool]]:
    """Run cached tasks, one per (refresh_cache, kwargs); returns [(result, came_from_prefect_cache)].

    parallel: submit them all to the flow's task runner (a Dask cluster); otherwise run them one after another
    in this process (one model in memory, readable progress bars)."""
    if parallel:
        futures = [task_fn.with_options(refresh_cache=refresh).submit(**kwargs) for refresh, kwargs in calls]
        for f in futures:
            f.wait()
        states = [f.state for f in futures]
    else:
        states = [task_fn.with_options(refresh_cache=refresh)(return_state=True, **kwargs) for refresh, kwargs in calls]
    return [_outcome(state, summary) for state in states]


def _outcome(state: Any, summary: dict[str, Any]) -> tuple[Any, bool]:
    """A finished task's (result, came_from_prefect_cache), counted in summary["prefect_cache_hits"]."""
    cached = state.name == "Cached"
    summary["prefect_cache_hits"] += int(cached)
    return state.result(), cached


def call_tasks_concurrently(task_fn, calls: list[tuple[bool, dict[str, Any]]], summary: dict[str, Any],
                            at_once: int, bar: Any = None) -> list[tuple[Any, bool]]:
    """call_tasks' results (in the calls' order), at most `at_once` tasks running at a time in the flow's thread
    pool task runner (Prefect's default); `bar` (a progress reporter) is advanced as each one ends."""
    from prefect.futures import as_completed

    results: list[tuple[Any, bool] | None] = [None] * len(calls)
    queued = iter(enumerate(calls))
    running: dict[Any, int] = {}

    def submit_next() -> None:
        position, (refresh, kwargs) = next(queued, (None, (False, {})))
        if position is not None:
            running[task_fn.with_options(refresh_cache=refresh).submit(**kwargs)] = position

    for _ in range(max(1, at_once)):
        submit_next()
    while running:
        done = next(as_completed(list(running)))
        done.wait()  # as_completed can yield a future whose state object still reads Running
        results[running.pop(done)] = _outcome(done.state, summary)
        if bar is not None:
            bar.update(1)
        submit_next()
    return [result for result in results if result is not None]


def call_task(task_fn, refresh: bool, summary: dict[str, Any], **kwargs) -> tuple[Any, bool]:
    """One cached task in this process: (result, came_from_prefect_cache)."""
    return call_tasks(task_fn, [(refresh, kwargs)], summary, parallel=False)[0]

"""Running a config: the Prefect defaults of the embedded mode and `run_config`, below every command that runs
the segment flow (the CLI, the demo, the analyses), so none of them imports another's command module."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def prefect_defaults() -> None:
    """Embedded default: Prefect's ephemeral local server, no telemetry, quiet unless asked."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")


def run_config(config_path: str | Path, store: str | None = None, stages: tuple[str, ...] = ("extract", "train",
               "evaluate"), progress: bool = True, read_only: bool = False,
               dask_address: str | None = None, always_flow: bool = False,
               label: str | None = None) -> dict[str, Any]:
    """Validate a config and run the segment flow on it; returns the flow's summary.

    When nothing would change (every stage fresh in the store, outputs and lock file up to date: see
    flows/fastpath.py) the flow is not started and the summary it would have returned comes back with
    "flow_run": None. always_flow: run the flow anyway (so the run is recorded in Prefect). label: first on each
    progress bar, to tell runs apart (default: the config file's stem)."""
    prefect_defaults()
    from pipeline.config import load_config

    cfg = load_config(config_path)  # validate before starting Prefect: a bad file fails fast
    url = store_url(store) if store else cfg.store
    if not always_flow:
        from flows import fastpath

        summary, _ = fastpath.check(cfg, url, tuple(stages), read_only)
        if summary is not None:
            return summary
    from flows.segment import segment_on

    dask_address = dask_address or os.environ.get("DDPMSEG_DASK_ADDRESS") or None
    return segment_on(dask_address)(str(Path(config_path).resolve()), url, list(stages), progress, read_only,
                                    parallel=bool(dask_address), label=label)


def store_url(url: str) -> str:
    """A store URL in its canonical form (a local path made absolute, s3:// kept)."""
    from storage.location import StoreLocation

    return StoreLocation.parse(url).url

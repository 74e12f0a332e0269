"""Running a config: the Prefect defaults of the embedded mode and `run_config`, below every command that runs
the segment flow (the CLI, the demo, the analyses), so none of them imports another's command module."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


#: How long to wait for Prefect's ephemeral server to answer (Prefect's own default: 20 s). Its start costs about
#: 10 CPU seconds on a fresh PREFECT_HOME (5.5 s on an existing one), so at load 10 on 2 cores it needs about 50 s;
#: measured on the shared 2-core machine: 43 s at load 22, and over 130 s with 10 extra busy loops (load 24).
PREFECT_STARTUP_TIMEOUT_S = 180
PREFECT_STARTUP_TIMEOUT_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def prefect_defaults() -> None:
    """Embedded default: Prefect's ephemeral local server, no telemetry, quiet unless asked, a start-up wait that
    survives a loaded machine. A variable the user set wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault(PREFECT_STARTUP_TIMEOUT_VAR, str(PREFECT_STARTUP_TIMEOUT_S))


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
    from flows.fetch_cli import require_assets
    from pipeline.config import load_config

    cfg = load_config(config_path)  # validate before starting Prefect: a bad file fails fast
    require_assets(cfg)  # a preset's missing checkpoint / data set: names the `ddpmseg fetch` command
    url = store_url(store) if store else cfg.store
    if not always_flow:
        from flows import fastpath

        summary, _ = fastpath.check(cfg, url, tuple(stages), read_only)
        if summary is not None:
            return summary
    from flows.preflight import check_run

    check_run(cfg, url, read_only or cfg.store_read_only)  # bad input fails here, in one line, before Prefect
    if "extract" in stages:  # a device the config cannot know: a one-line ConfigError before Prefect starts
        from flows.extract import check_extraction_device

        check_extraction_device(cfg, url)
    from flows.segment import segment_on

    start_embedded_prefect()

    dask_address = dask_address or os.environ.get("DDPMSEG_DASK_ADDRESS") or None
    return segment_on(dask_address)(str(Path(config_path).resolve()), url, list(stages), progress, read_only,
                                    parallel=bool(dask_address), label=label)


def debug_enabled() -> bool:
    """Full tracebacks and Prefect's own error logs: `--verbose` or DDPMSEG_DEBUG=1."""
    return os.environ.get("DDPMSEG_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def start_embedded_prefect() -> None:
    """Before a command runs a flow: Prefect's temporary server ends with this process (flows/embedded.py), and
    a failed run is reported by the command line alone (one line) unless debug_enabled()."""
    from flows import embedded

    embedded.bind_server_to_this_process()
    if not debug_enabled():
        embedded.leave_errors_to_the_cli()


def store_url(url: str) -> str:
    """A store URL in its canonical form (a local path made absolute, s3:// kept)."""
    from storage.location import StoreLocation

    return StoreLocation.parse(url).url


def seed_list(text: str) -> list[int]:
    """argparse type of --seeds: '0,1,2' -> [0, 1, 2]."""
    import argparse

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds

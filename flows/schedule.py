"""Scheduled runs: serve the `segment` flow for configs as Prefect deployments on a cron schedule.

Needs a real Prefect server (the ephemeral one runs no scheduler):

    prefect server start                                   # or the docker-compose service
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    ddpmseg serve configs/ffhq.yaml configs/cat.yaml --cron "0 3 * * *"

Each config becomes the deployment `segment/<prefix>-<config stem>`; its file is read at every run, so edits take
effect at the next scheduled run, and unchanged stages are skipped as in `ddpmseg run`.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import ConfigError, load_config


def deployment_name(config_path: str | Path, prefix: str = "ddpmseg") -> str:
    return f"{prefix}-{Path(config_path).stem}"


def build_deployments(configs: list[str], cron: str, store: str | None = None, name_prefix: str = "ddpmseg"):
    """One RunnerDeployment per config (validated now, so a broken config fails before serving)."""
    from flows.segment import segment_on

    dask_address = os.environ.get("DDPMSEG_DASK_ADDRESS") or None  # scheduled runs use the team's cluster
    flow = segment_on(dask_address)
    deployments = []
    for c in configs:
        load_config(c)
        deployments.append(flow.to_deployment(
            name=deployment_name(c, name_prefix), cron=cron,
            parameters={"config_path": str(Path(c).resolve()), "store_url": store, "progress": False,
                        "parallel": bool(dask_address)}))
    return deployments


def serve_configs(configs: list[str], cron: str, store: str | None = None, name_prefix: str = "ddpmseg") -> None:
    """Register the deployments with the server at PREFECT_API_URL and execute their runs until interrupted."""
    from prefect import serve

    for c in configs:
        load_config(c)
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise ConfigError("ddpmseg serve needs a Prefect server: start one (`prefect server start` or the "
                              "docker-compose service) and set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api")
    serve(*build_deployments(configs, cron, store, name_prefix))

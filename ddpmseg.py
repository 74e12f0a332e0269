"""ddpmseg from Python: load a config, run it, open its features and masks as xarray, load its ensemble.

    import ddpmseg
    cfg = ddpmseg.load_config("experiment.yaml")
    summary = ddpmseg.run(cfg)                    # what `ddpmseg run --json` prints
    feats = ddpmseg.open_features(cfg, "train", t=50, block=4)   # lazy (image, channel, y, x)

A thin module over the pipeline's own functions (flows.runner, flows.notebook); importing it loads neither
Prefect nor the UNet (only `run` starts Prefect).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.notebook import Ensemble, load_ensemble, open_features, open_masks
from pipeline.config import ExperimentConfig, load_config

__all__ = ["Ensemble", "ExperimentConfig", "RunSummary", "load_config", "load_ensemble", "open_features",
           "open_masks", "run"]


class RunSummary(dict):
    """The summary of a run: the keys of `ddpmseg run --json` (stages, unet_forwards, members_trained, miou,
    miou_standard, pixel_accuracy, metrics_path, ...), also readable as attributes (summary.miou)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"RunSummary has no key {name!r} (keys: {', '.join(sorted(self))})") from None


def run(config: ExperimentConfig | str | Path, store: str | None = None, *,
        stages: tuple[str, ...] = ("extract", "train", "evaluate"), progress: bool = False, read_only: bool = False,
        dask_address: str | None = None, always_flow: bool = False) -> RunSummary:
    """Run a config's stages (each only when not in the store already), as `ddpmseg run`; returns its summary.

    config: a path, or an ExperimentConfig loaded from one (its file is what the flow reads)."""
    from flows.runner import run_config

    path = config.source_path if isinstance(config, ExperimentConfig) else config
    if path is None:
        raise ValueError("run: this ExperimentConfig was not loaded from a file; pass the YAML path")
    return RunSummary(run_config(path, store, tuple(stages), progress=progress, read_only=read_only,
                                 dask_address=dask_address, always_flow=always_flow))

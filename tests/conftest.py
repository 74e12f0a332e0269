"""Shared pytest fixtures (real components, small sizes)."""

from __future__ import annotations

import pytest
import torch

from pipeline.backbone import TINY_MODEL_FLAGS, build_backbone, redraw_zero_initialised_convs


@pytest.fixture(scope="session")
def tiny_backbone():
    """(model, diffusion, flags): the TINY_MODEL_FLAGS UNet (32x32, 6 decoder blocks) on the CPU, random
    weights from torch.manual_seed(0), eval mode. Shared by the whole session: do not modify it."""
    torch.manual_seed(0)
    model, diffusion = build_backbone(TINY_MODEL_FLAGS, device="cpu")
    with torch.no_grad():
        redraw_zero_initialised_convs(model)
    return model, diffusion, dict(TINY_MODEL_FLAGS)


# -- pipeline fixtures: Prefect server, tiny experiments ---------------------------------------------------------
@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real temporary Prefect server (SQLite) for the session, with its own PREFECT_HOME."""
    import os

    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_tiny_experiment(root, n_train: int = 4, n_test: int = 3, **overrides) -> "Path":
    """A generated data set + a config for the tiny random UNet under `root`; returns the config path."""
    from pathlib import Path

    import yaml

    from tests.tiny import tiny_config
    from pipeline import synthetic

    root = Path(root)
    synthetic.write_dataset(root / "data", n_train=n_train, n_test=n_test, size=32, seed=0)
    cfg = tiny_config(root)
    cfg["dataset"].update(training_number=n_train, testing_number=n_test)
    cfg["features"].update(steps=[50, 150], blocks=[2, 3, 4], batch_size=4)
    cfg["classifier"].update(model_num=2, max_epochs=2)
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values) if isinstance(values, dict) else cfg.__setitem__(section, values)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def tiny_experiment(tmp_path):
    """Factory: tiny_experiment(**overrides) -> path of a ready tiny experiment config in a fresh directory."""
    counter = iter(range(1000))

    def make(**overrides):
        return write_tiny_experiment(tmp_path / f"exp{next(counter)}", **overrides)

    return make


def latest_artifact(key: str):
    """The newest Prefect artifact with this key on the test server (its data: a str, or rows for tables)."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    assert found, f"no Prefect artifact with key {key!r}"
    data = found[0].data
    return json.loads(data) if isinstance(data, str) and found[0].type == "table" else data

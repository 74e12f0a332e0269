"""docker-compose.yml: parsed and checked against the CLI (no Docker engine here to run it)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SECRET_NAMES = re.compile(r"(PASSWORD|SECRET|ACCESS_KEY|TOKEN)", re.I)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(env) if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_the_team_services_are_there():
    assert {"postgres", "prefect-server", "minio", "minio-create-bucket", "dask-scheduler", "dask-worker",
            "flow-worker"} <= set(SERVICES)
    assert "postgresql+asyncpg://" in _env(SERVICES["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "mc mb" in " ".join(SERVICES["minio-create-bucket"]["command"])
    assert "ddpmseg serve" in " ".join(SERVICES["flow-worker"]["command"])
    assert set(COMPOSE["volumes"]) >= {"postgres-data", "minio-data"}
    for name in ("postgres", "prefect-server", "minio", "dask-scheduler"):
        assert "healthcheck" in SERVICES[name], name


def test_every_published_port_is_bound_to_localhost():
    published = [p for s in SERVICES.values() for p in s.get("ports", [])]
    assert published
    assert all(str(p).startswith("127.0.0.1:") for p in published), published


def test_no_secret_is_hard_coded():
    for name, service in SERVICES.items():
        for key, value in _env(service).items():
            if SECRET_NAMES.search(key):
                assert str(value).startswith("${"), f"{name}.{key} must come from .env, got {value!r}"
        for value in _env(service).values():
            assert "change-me" not in str(value)
    example = (ROOT / ".env.example").read_text()
    for var in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert f"{var}=" in example
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_the_pipeline_services_get_the_variables_the_cli_reads():
    from storage.location import s3_options_from_env

    for name in ("dask-worker", "flow-worker"):
        env = _env(SERVICES[name])
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["DDPMSEG_DASK_ADDRESS"] == "tcp://dask-scheduler:8786"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    # and the CLI does read them
    import os

    os.environ["AWS_ENDPOINT_URL"], saved = "http://minio:9000", os.environ.get("AWS_ENDPOINT_URL")
    try:
        assert s3_options_from_env()["client_kwargs"]["endpoint_url"] == "http://minio:9000"
    finally:
        if saved is None:
            del os.environ["AWS_ENDPOINT_URL"]
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved
    cli = (ROOT / "flows" / "cli.py").read_text() + (ROOT / "flows" / "schedule.py").read_text()
    assert "DDPMSEG_DASK_ADDRESS" in cli and "PREFECT_API_URL" in cli


def test_the_gpu_reservation_is_there_commented():
    text = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"#\s*capabilities: \[gpu\]", text)

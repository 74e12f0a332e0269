"""`ddpmseg serve`: a real served deployment on a cron schedule, run once against a real Prefect server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def test_served_deployment_runs_once(tiny_experiment, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    config = tiny_experiment(classifier={"model_num": 1, "max_epochs": 1})
    api = PREFECT_API_URL.value()
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PYTHONWARNINGS": "ignore"}
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(config), "--cron", "0 3 * * *",
                              "--name", "test"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=Path(__file__).parent.parent)
    try:
        name = f"segment/test-{config.stem}"
        deadline = time.time() + 120
        with get_client(sync_client=True) as client:
            while True:
                try:
                    deployment = client.read_deployment_by_name(name)
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    assert serve.poll() is None, serve.stdout.read()
                    assert time.time() < deadline, "deployment was never registered"
                    time.sleep(1)
        assert deployment.schedules and deployment.schedules[0].schedule.cron == "0 3 * * *"
        run = run_deployment(name, timeout=240)
        assert run.state.is_completed(), run.state
        metrics = json.loads((config.parent / "metrics.json").read_text())
        assert metrics["members_trained"] == 1 and 0 <= metrics["miou"] <= 100
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()


def test_serve_without_a_server_is_a_clear_error(tiny_experiment, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}):
        assert main(["serve", str(tiny_experiment()), "--cron", "0 3 * * *"]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["not a cron"])
def test_serve_rejects_a_bad_config_before_serving(tmp_path, bad, capsys):
    from flows.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: {preset: cat_15, train_dir: a, test_dir: b}\nmodel: {}\nfeatures: {steps: [2000]}\n")
    assert main(["serve", str(cfg), "--cron", bad]) == 2
    assert "features.steps" in capsys.readouterr().err

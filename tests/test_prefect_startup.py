"""Prefect's ephemeral server on a loaded machine: a start-up wait that survives load, one line when it is not enough."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flows.runner import PREFECT_STARTUP_TIMEOUT_S, PREFECT_STARTUP_TIMEOUT_VAR, prefect_defaults
from tests.conftest import write_tiny_experiment

ROOT = Path(__file__).parent.parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment with a fresh PREFECT_HOME, no Prefect API (the embedded ephemeral server) and no
    start-up wait set."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", PREFECT_STARTUP_TIMEOUT_VAR)}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT), **extra)
    return env


def test_the_start_up_wait_is_raised_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv(PREFECT_STARTUP_TIMEOUT_VAR, raising=False)
    prefect_defaults()
    assert os.environ[PREFECT_STARTUP_TIMEOUT_VAR] == str(PREFECT_STARTUP_TIMEOUT_S)
    assert PREFECT_STARTUP_TIMEOUT_S > 20  # Prefect's own default, too short on a loaded 2-core machine

    monkeypatch.setenv(PREFECT_STARTUP_TIMEOUT_VAR, "45")
    prefect_defaults()
    assert os.environ[PREFECT_STARTUP_TIMEOUT_VAR] == "45"


def test_prefect_reads_the_default(tmp_path):
    """Set before Prefect is imported, so Prefect's settings see it (in a fresh process, as the CLI runs)."""
    code = ("from flows.runner import prefect_defaults; prefect_defaults()\n"
            "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s; print(s.value())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path),
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(PREFECT_STARTUP_TIMEOUT_S)]


def test_a_server_that_does_not_start_in_time_is_one_line_and_exit_2(tmp_path):
    """`ddpmseg run` with a 1 s wait (the server needs several): Prefect's RuntimeError becomes one line."""
    config = write_tiny_experiment(tmp_path / "exp", n_train=2, n_test=1)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config), "--quiet"], capture_output=True,
                          text=True, env=_env(tmp_path, **{PREFECT_STARTUP_TIMEOUT_VAR: "1"}), cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("ddpmseg: error: Prefect's local server did not start within 1 s (load ")
    assert lines[0].endswith(f"raise {PREFECT_STARTUP_TIMEOUT_VAR}")

"""Figure 5: wall time of a second `ddpmseg run CONFIG --json` of an unchanged small config, and where it goes.

All in fresh processes with an isolated PREFECT_HOME and no PREFECT_API_URL (the embedded default: Prefect's
ephemeral server, as a user without a server gets it; its start-up timeout raised from Prefect's 20 s to 180 s,
which a first start on a loaded 2-core machine can exceed):
- cold: the first run (extract, train, evaluate);
- no-op: the second run (every stage cached) -> `noop_rerun_s`: `run_config`'s fast path (flows/fastpath.py)
  sees that nothing would change and returns without starting Prefect (`noop_flow_run` is None);
- no-op with `--always-flow`: the same re-run through the Prefect flow (ephemeral server start + one flow run)
  -> `noop_always_flow_s`, the cost of recording an unchanged run in Prefect;
- imports: `python -c "import flows.cli, flows.segment"`;
- Prefect start-up: a process that imports Prefect and runs one empty flow (ephemeral server start + one run);
- direct: `python -m benchmarks.noop direct CONFIG`: the same freshness checks in a plain process without
  Prefect (prepare both splits, extract plans, member markers, evaluation record): what a no-op costs us;
- optionally, with a running `prefect server start` (PREFECT_API_URL set): the no-op run with `--always-flow`
  (a flow run) without the ephemeral server start.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import REPO_ROOT, BenchmarkError, child_env, emit, log

EPHEMERAL_STARTUP_TIMEOUT_S = 180

EMPTY_FLOW = """
import json, time
start = time.perf_counter()
from prefect import flow

@flow(name="benchmark-empty")
def empty() -> int:
    return 1

imported = time.perf_counter()
empty()
print(json.dumps({"import_s": imported - start, "first_flow_s": time.perf_counter() - imported}))
"""


def write_small_experiment(root: Path) -> Path:
    """The demo data set (3 train, 2 test images, 32 px), the tiny random UNet, one step, one member."""
    from tests.tiny import tiny_config
    from pipeline import synthetic

    root = Path(root)
    synthetic.write_dataset(root / "data", n_train=3, n_test=2, size=32, seed=0)
    cfg = tiny_config(root)
    cfg["dataset"].update(training_number=3, testing_number=2)
    cfg["features"].update(steps=[50], blocks=[2, 3, 4], batch_size=4)
    cfg["classifier"].update(model_num=1, max_epochs=1)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ddpmseg_command() -> list[str]:
    script = Path(sys.executable).parent / "ddpmseg"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "flows.cli"]


def prefect_env(prefect_home: Path, api_url: str | None = None) -> dict[str, str]:
    env = child_env()
    env.pop("PREFECT_API_URL", None)
    env.update({"PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": "WARNING"})
    # Prefect gives its ephemeral server 20 s to answer; a first start (fresh database, migrations) on a loaded
    # 2-core machine takes longer and `ddpmseg run` then fails. The benchmark measures, it does not fail on it.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _timed(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchmarkError(f"{' '.join(cmd)} exited with status {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def _last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def direct_noop(config_path: str) -> dict[str, Any]:
    """The no-op freshness checks of `ddpmseg run` without Prefect; returns what is left to do."""
    start = time.perf_counter()
    from flows import extract as extract_stage
    from flows import prepare as prepare_stage
    from flows import stage_keys
    from pipeline.config import load_config
    from storage import artifacts
    from storage.features import FeatureStore
    from storage.location import StoreLocation

    imported = time.perf_counter()
    cfg = load_config(config_path)
    loc = StoreLocation.parse(cfg.store)
    store = FeatureStore(loc)
    train = prepare_stage.prepare_split(cfg, store, "train")
    test = prepare_stage.prepare_split(cfg, store, "test")
    forwards = len(extract_stage.extract_plan(cfg, store, train)) + len(extract_stage.extract_plan(cfg, store, test))
    tkey = stage_keys.train_key(cfg, train)
    members = sum(not artifacts.member_committed(loc, stage_keys.members_key(tkey), i)
                  for i in range(cfg.classifier.model_num))
    ekey = stage_keys.evaluate_key(cfg, tkey, test)
    evaluated = artifacts.read_record(loc, "evaluate", ekey.value) is not None
    return {"import_s": imported - start, "checks_s": time.perf_counter() - imported,
            "forwards_left": forwards, "members_left": members, "evaluated": evaluated,
            "fresh": forwards == 0 and members == 0 and evaluated}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_running_server(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 180) -> dict[str, Any]:
    """Start `prefect server start` (ours, stopped at the end), then time the no-op run against it."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        start = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.perf_counter() - start > timeout:
                raise BenchmarkError(f"prefect server start did not answer on {api} within {timeout} s")
            time.sleep(0.5)
        server_start_s = time.perf_counter() - start
        seconds, stdout = _timed([*cmd, "--always-flow"], {**env, "PREFECT_API_URL": api}, cwd)
        return {"noop_with_running_server_s": seconds, "server_start_s": server_start_s,
                "stages": _last_json(stdout).get("stages")}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_noop(workdir: Path, running_server: bool = False) -> dict[str, Any]:
    workdir = Path(workdir)
    config = write_small_experiment(workdir / "experiment")
    env = prefect_env(workdir / "prefect-home")
    cmd = [*ddpmseg_command(), "run", str(config), "--json", "--quiet"]
    log("no-op: first (cold) run of the small experiment")
    cold_s, _ = _timed(cmd, env, workdir)
    log("no-op: second run (nothing to do)")
    noop_s, stdout = _timed(cmd, env, workdir)
    summary = _last_json(stdout)
    log("no-op: second run again with --always-flow (through Prefect)")
    always_s, always_stdout = _timed([*cmd, "--always-flow"], env, workdir)
    always = _last_json(always_stdout)
    log("no-op: imports alone, Prefect start-up alone, our checks without Prefect")
    import_s, _ = _timed([sys.executable, "-c", "import flows.cli, flows.segment"], env, REPO_ROOT)
    empty_s, empty_out = _timed([sys.executable, "-c", EMPTY_FLOW], env, workdir)
    direct_s, direct_out = _timed([sys.executable, "-m", "benchmarks.noop", "direct", str(config)], env, REPO_ROOT)
    empty, direct = _last_json(empty_out), _last_json(direct_out)
    out: dict[str, Any] = {
        "command": " ".join([Path(cmd[0]).name, *cmd[1:]]).replace(str(config), "CONFIG"),
        "cold_run_s": cold_s, "noop_rerun_s": noop_s,
        "noop_stages": summary.get("stages"), "noop_unet_forwards": summary.get("unet_forwards"),
        "noop_members_trained": summary.get("members_trained"),
        "noop_flow_run": summary.get("flow_run"),
        "noop_always_flow_s": always_s, "always_flow_stages": always.get("stages"),
        "always_flow_run": always.get("flow_run"),
        "import_only_s": import_s,
        "prefect_empty_flow_process_s": empty_s,
        "prefect_import_s": empty["import_s"],
        "prefect_first_flow_s": empty["first_flow_s"],
        "direct_noop_process_s": direct_s,
        "direct_noop": direct,
        "prefect_share_s": always_s - direct_s,  # what a flow run adds to our checks
    }
    if running_server:
        log("no-op: against a running `prefect server start`")
        out.update(_with_running_server(cmd, env, workdir))
    return out


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "direct":
        emit(direct_noop(argv[1]))
        return 0
    print("usage: python -m benchmarks.noop direct CONFIG", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

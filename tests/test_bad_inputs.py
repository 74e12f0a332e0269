"""Bad input and faults end in one line: `ddpmseg run` as a user runs it (a subprocess), stderr and exit code.

Inputs that can be checked before Prefect starts (flows/preflight.py) fail there: no Prefect server is started.
Errors raised inside the flow (a bad checkpoint, a read-only store missing a stage, an S3 outage) reach the
terminal as one line too, and leave the store as it was (nothing half-written). The runs that need a flow share
the session's Prefect server (PREFECT_API_URL), so each costs no server start-up.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_tiny_experiment

ROOT = Path(__file__).resolve().parent.parent
EXIT_USER_ERROR = 2
PREFLIGHT_LIMIT_S = 300  # all cases at once; alone, one takes seconds (imports), more on a loaded machine
RUN_LIMIT_S = 300


def _env(prefect_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "DDPMSEG_"))}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", **extra)
    return env


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, limit_s: float) -> tuple[int, list[str], float]:
    """(exit code, stderr lines, seconds from now) of a started run, killed after limit_s."""
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"ddpmseg ran longer than {limit_s} s")
    return proc.returncode, err.splitlines(), time.monotonic() - started


def _one_line(rc: int, lines: list[str], *expected: str) -> str:
    assert rc == EXIT_USER_ERROR, lines
    assert len(lines) == 1, "\n".join(lines)
    line = lines[0]
    assert line.startswith("ddpmseg: error: ")
    for text in expected:
        assert text in line, line
    return line


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _closed_port() -> int:
    """A 127.0.0.1 port that nothing listens on (bound, then closed): connections to it are refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _variant(config: Path, name: str, edit) -> Path:
    data = yaml.safe_load(config.read_text())
    edit(data)
    path = config.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- before Prefect --------------------------------------------------------------------------------------------
def test_bad_inputs_fail_in_one_line_before_prefect_starts(tmp_path):
    """(a) a missing train_dir, (b) a missing checkpoint, (c) an unknown key, (d) an unreachable S3 endpoint:
    one stderr line each, exit 2, no Prefect server started."""
    config = write_tiny_experiment(tmp_path / "exp", n_train=2, n_test=1)
    port = _closed_port()
    cases = {
        "train_dir": (_variant(config, "no-train", lambda c: c["dataset"].update(train_dir="data/missing")),
                      [], {}, ["data/missing", "does not exist"]),
        "checkpoint": (_variant(config, "no-ckpt", lambda c: c["model"].update(random_init=False,
                                                                              checkpoint="missing.pt")),
                       [], {}, ["missing.pt", "checkpoint not found", "model.checkpoint"]),
        "key": (_variant(config, "bad-key", lambda c: c["classifier"].update(learning_rte=0.1)),
                [], {}, ["classifier.learning_rte", "unknown key"]),
        "s3": (_variant(config, "s3", lambda c: c.update(store="s3://bucket/run")), [],
               {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"},
               ["s3://bucket/run", f"127.0.0.1:{port}"]),
    }
    home = tmp_path / "prefect-home"
    procs = {name: (_start(["run", str(path), "--quiet", *args], _env(home, **extra)), expected)
             for name, (path, args, extra, expected) in cases.items()}
    deadline = time.monotonic() + PREFLIGHT_LIMIT_S  # run at once: each pays seconds of imports
    for name, (proc, expected) in procs.items():
        rc, lines, _ = _finish(proc, max(1.0, deadline - time.monotonic()))
        _one_line(rc, lines, *expected)
        assert not any("prefect" in line.lower() for line in lines), (name, lines)
    assert not list(home.rglob("*.db")), "a Prefect server was started"  # its database lives in PREFECT_HOME
    assert not (config.parent / "store").exists(), "a failed check wrote the store"


def _main_error(capsys, *argv: str) -> list[str]:
    """stderr lines of `ddpmseg ARGV` run in this process, which must exit 2."""
    from flows.cli import main

    assert main(list(argv)) == EXIT_USER_ERROR
    return capsys.readouterr().err.splitlines()


def test_outputs_and_read_only_stores_are_checked_before_computing(tmp_path, capsys):
    """output_dir a file (was a raw NotADirectoryError after all the compute), masks/ a file, --read-only,
    `store ls`, `store verify` or `status` on a path without a store (created an empty directory there)."""
    config = write_tiny_experiment(tmp_path / "exp", n_train=2, n_test=1)
    (config.parent / "a-file").write_text("not a directory")
    out_file = _variant(config, "out-file", lambda c: c.update(output_dir="a-file"))
    _one_line(2, _main_error(capsys, "run", str(out_file), "--quiet"), "output_dir", "a-file",
              "is a file, expected a directory")
    (config.parent / "out").mkdir()
    (config.parent / "out" / "masks").write_text("")
    masks_file = _variant(config, "masks-file", lambda c: c.update(output_dir="out"))
    _one_line(2, _main_error(capsys, "run", str(masks_file), "--quiet"), "masks", "expected a directory")
    missing = tmp_path / "no-store"
    _one_line(2, _main_error(capsys, "run", str(config), "--quiet", "--read-only", "--store", str(missing)),
              "no store exists at", str(missing))
    for command in ("ls", "verify"):
        _one_line(2, _main_error(capsys, "store", command, str(missing)), f"no store exists at {missing}")
    from flows.cli import main

    assert main(["status", str(config), "--store", str(missing)]) == 0  # every stage missing, nothing created
    assert "missing" in capsys.readouterr().out
    assert not missing.exists(), "a read created the store directory"
    assert not (config.parent / "store").exists(), "a failed check wrote the store"


def test_store_ls_without_url_names_the_demo_store(tmp_path, capsys, monkeypatch):
    import zarr

    zarr.open_group(tmp_path / "ddpmseg-demo" / "store", mode="w", zarr_format=3)
    monkeypatch.chdir(tmp_path)
    line = _one_line(2, _main_error(capsys, "store", "ls"), f"no store exists at {tmp_path / 'ddpmseg-store'}",
                     "ddpmseg-demo/store")
    assert "re-run" not in line
    assert not (tmp_path / "ddpmseg-store").exists()


def test_verbose_shows_the_traceback(tmp_path, capsys):
    config = write_tiny_experiment(tmp_path / "exp", n_train=2, n_test=1)
    bad = _variant(config, "bad-key", lambda c: c["classifier"].update(learning_rte=0.1))
    lines = _main_error(capsys, "run", str(bad), "--quiet", "--verbose")
    assert lines[0].startswith("Traceback (most recent call last):") and len(lines) > 3
    assert lines[-1].startswith("ddpmseg: error: ") and "classifier.learning_rte" in lines[-1]
    assert "DDPMSEG_DEBUG" not in os.environ  # --verbose holds for its command only


# -- inside the flow -------------------------------------------------------------------------------------------
def _api_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment of a run against the session's Prefect server (no server start-up per run)."""
    from prefect.settings import PREFECT_API_URL

    return _env(tmp_path / "prefect-home", PREFECT_API_URL=PREFECT_API_URL.value(), **extra)


def _prepared_store(config: Path) -> Path:
    """The config's store holding every image and view of both splits (what prepare writes), nothing else."""
    from flows import prepare as prepare_stage
    from pipeline.config import load_config
    from storage.features import FeatureStore
    from storage.location import StoreLocation

    cfg = load_config(config)
    store = FeatureStore(StoreLocation.parse(cfg.store))
    for split in ("train", "test"):
        prepare_stage.prepare(cfg, store, split)
    return Path(cfg.store)


def test_errors_inside_the_flow_are_one_line_and_leave_the_store_unchanged(tmp_path, prefect_server):
    """A checkpoint that is not a checkpoint (found by the extract task), and a --read-only run on a store that
    lacks the features (found by the extract task): one stderr line, exit 2, the store byte for byte as before."""
    config = write_tiny_experiment(tmp_path / "exp", n_train=2, n_test=1)
    store = _prepared_store(config)
    (config.parent / "garbage.pt").write_bytes(b"this is not a torch checkpoint\n" * 10)
    bad_ckpt = _variant(config, "bad-ckpt", lambda c: c["model"].update(random_init=False,
                                                                        checkpoint="garbage.pt"))
    before = _snapshot(store)
    env = _api_env(tmp_path)
    runs = {"checkpoint": (_start(["run", str(bad_ckpt), "--quiet"], env), ["garbage.pt", "checkpoint"]),
            "read_only": (_start(["run", str(config), "--quiet", "--read-only"], env), ["read-only"])}
    deadline = time.monotonic() + RUN_LIMIT_S
    for name, (proc, expected) in runs.items():
        rc, lines, _ = _finish(proc, max(1.0, deadline - time.monotonic()))
        _one_line(rc, lines, *expected)
    assert _snapshot(store) == before


def test_s3_outage_inside_the_flow_is_one_line(tmp_path, prefect_server):
    """The S3 endpoint goes away while the run writes the store: one line naming the store, exit 2 (not the
    unrelated `ValueError: Token var ... created in a different Context` that followed it), and what the run
    committed before the outage verifies clean once the endpoint is back."""
    import boto3

    from storage import maintenance
    from storage.features import FeatureStore
    from storage.location import StoreLocation
    from tests.test_s3 import BUCKET, S3Server

    server = S3Server()
    server.start()
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": server.endpoint}
    s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    url = f"s3://{BUCKET}/outage"
    config = write_tiny_experiment(tmp_path / "exp", n_train=2, n_test=1, store=url)
    proc = _start(["run", str(config), "--quiet"], _api_env(tmp_path, **aws))
    deadline = time.monotonic() + RUN_LIMIT_S
    try:
        while not s3.list_objects_v2(Bucket=BUCKET, Prefix="outage/views/").get("KeyCount"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run wrote nothing to the store"
            time.sleep(0.1)
        server.stop()  # the run is writing its first views
        rc, lines, _ = _finish(proc, max(1.0, deadline - time.monotonic()))
        _one_line(rc, lines, url)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.start()
    old = {k: os.environ.get(k) for k in aws}
    os.environ.update(aws)
    try:
        assert maintenance.verify(FeatureStore(StoreLocation.parse(url), read_only=True)) == []
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        server.stop()


# -- a killed run leaves no Prefect server behind --------------------------------------------------------------
def _children(pid: int) -> dict[int, str]:
    """{pid: command line} of the live processes whose parent is `pid` (Linux /proc)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended (nobody may reap an orphan in a container)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux /proc")
def test_killed_run_leaves_no_prefect_server(tmp_path):
    """SIGKILL of `ddpmseg run` while its temporary Prefect server runs: the server (and its watcher) end within
    seconds, not minutes."""
    from flows.embedded import WATCHER_GRACE_S

    config = write_tiny_experiment(tmp_path / "exp", n_train=2, n_test=1)
    home = tmp_path / "prefect-home"
    proc = _start(["run", str(config), "--quiet"], _env(home))
    deadline = time.monotonic() + RUN_LIMIT_S
    children: dict[int, str] = {}
    try:
        while True:  # the server is up once it made its database
            children = _children(proc.pid)
            servers = [p for p, cmd in children.items() if "uvicorn" in cmd]
            if servers and list(home.rglob("prefect.db")):
                watcher_by = time.monotonic() + 5  # the watcher starts right after the server
                while len(_children(proc.pid)) < 2 and time.monotonic() < watcher_by:
                    time.sleep(0.1)
                children = _children(proc.pid)
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no Prefect server started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        gone_by = time.monotonic() + WATCHER_GRACE_S + 10
        killed = time.monotonic()
        while any(_alive(p) for p in children) and time.monotonic() < gone_by:
            time.sleep(0.2)
        assert not [cmd for p, cmd in children.items() if _alive(p)], "outlived the killed run"
        print(f"server and watcher gone {time.monotonic() - killed:.1f} s after the SIGKILL")
    finally:
        proc.kill()
        for p in children:
            if _alive(p):
                os.kill(p, signal.SIGKILL)

"""The no-op fast path of `ddpmseg run` (flows/fastpath.py): an unchanged config returns the flow's summary
without starting Prefect; any pending work (or doubt) runs the flow; `--always-flow` always runs it."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows import fastpath
from flows.cli import main
from pipeline import synthetic
from pipeline.config import load_config
from tests.conftest import write_tiny_experiment

SMALL = dict(n_train=3, n_test=2, features={"steps": [50], "blocks": [2, 3], "batch_size": 4},
             classifier={"model_num": 1, "max_epochs": 1})
ALL_CACHED = {"extract": "cached", "train": "cached", "evaluate": "cached"}


def run_json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: any write shows."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


def flow_runs() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.count_flow_runs()


def edit(config_path: Path, section: str, **values) -> None:
    cfg = yaml.safe_load(config_path.read_text())
    cfg.setdefault(section, {}).update(values)
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.fixture(scope="module")
def done(tmp_path_factory, prefect_server):
    """A tiny experiment run once through the flow: (config path, the flow's summary)."""
    config = write_tiny_experiment(tmp_path_factory.mktemp("fastpath"), **SMALL)
    assert main(["run", str(config), "--json", "--quiet"]) == 0
    return config


def test_unchanged_rerun_skips_prefect_and_returns_the_flows_summary(done, capsys):
    before, runs = snapshot(done.parent), flow_runs()
    fast = run_json(capsys, "run", str(done))
    assert fast["flow_run"] is None and fast["prefect"].startswith("skipped: nothing to do")
    assert fast["stages"] == ALL_CACHED and (fast["unet_forwards"], fast["members_trained"]) == (0, 0)
    assert "nothing to do" in fast["message"]
    assert flow_runs() == runs  # no flow run recorded in Prefect
    assert snapshot(done.parent) == before  # nothing written: not the store, not the outputs, not the lock

    flow = run_json(capsys, "run", str(done), "--always-flow")
    assert flow["flow_run"] and flow_runs() == runs + 1
    assert flow["stages"] == ALL_CACHED
    assert set(fast) == set(flow) | {"prefect"}
    differ = {"flow_run", "prefect_cache_hits"}  # Prefect's own: its run id, its cache hits
    assert {k: v for k, v in fast.items() if k in flow and k not in differ} == \
           {k: v for k, v in flow.items() if k not in differ}
    assert json.loads(Path(fast["metrics_path"]).read_text())["miou"] == fast["miou"]

    # the human-readable summary says it in one line
    assert main(["run", str(done), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert [line for line in text.splitlines() if "no flow run started" in line] == \
           ["prefect     skipped: nothing to do (no flow run started; --always-flow runs and records one)"]


def test_fast_path_process_never_imports_prefect(done):
    """The real command in a fresh process: Prefect is neither imported nor contacted (an unreachable API)."""
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.cli", "run", str(done), "--json",
                           "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["flow_run"] is None and summary["stages"] == ALL_CACHED
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported  # the parsing works
    assert not {m for m in imported if m == "prefect" or m.startswith("prefect.")}


def test_always_flow_runs_the_flow_when_fresh(done, capsys):
    runs = flow_runs()
    out = run_json(capsys, "run", str(done), "--always-flow")
    assert out["flow_run"] and "prefect" not in out and flow_runs() == runs + 1
    assert out["stages"] == ALL_CACHED and out["prefect_cache_hits"] == 4  # extract train/test, 1 member, evaluate
    # single stages too
    out = run_json(capsys, "evaluate", str(done), "--always-flow")
    assert out["flow_run"] and out["stages"] == {"evaluate": "cached"}
    out = run_json(capsys, "evaluate", str(done))
    assert out["flow_run"] is None and out["stages"] == {"evaluate": "cached"}


def _pending(config: Path, **kwargs) -> str:
    summary, why = fastpath.check(load_config(config), **kwargs)
    assert summary is None, "the fast path fired although the flow has work to do"
    return why


@contextlib.contextmanager
def _moved(path: Path, aside_dir: Path):
    """`path` moved out of the experiment (as if deleted), then back."""
    aside = aside_dir / path.name
    path.rename(aside)
    try:
        yield
    finally:
        aside.rename(path)


def test_any_pending_work_falls_through_to_the_flow(tiny_experiment, prefect_server, capsys):
    config = tiny_experiment(**SMALL)
    first = run_json(capsys, "run", str(config))
    root, store = config.parent, Path(first["store"])
    assert fastpath.check(load_config(config))[0] is not None
    before = snapshot(root)

    # each thing the flow would write -> no fast path (checked without running the flow; then restored)
    train_key, eval_key = first["train_key"], first["evaluate_key"]
    members = next((store / "models").iterdir())
    unit = next(store.glob("features/*/base/t0050-*"))
    image = next(p for p in unit.iterdir() if p.is_dir())
    for path, reason in [
        (root / "metrics.json", "metrics.json"),
        (root / "masks" / "00000.png", "mask"),
        (root / "report" / "report.html", "report.html"),
        (root / "ddpmseg.lock.json", "lock"),
        (members / "member_00" / "zarr.json", "members to train"),
        (store / "stages" / "train" / train_key, "train record"),
        (store / "stages" / "evaluate" / eval_key, "not evaluated"),
        (store / "evaluations" / eval_key / "metrics", "metrics are missing"),
        (image / "b03", "forwards to run"),
        (store / "views" / "base" / image.name, "not in the store"),
    ]:
        with _moved(path, root.parent):
            assert reason in _pending(config), path
    assert "another store" in _pending(config, store_url=str(root / "elsewhere"))
    assert not (root / "elsewhere").exists()
    assert "config differs" in _pending(config, read_only=True)  # the flow writes its config into metrics.json
    original = config.read_text()
    edit(config, "classifier", dropout=0.3)
    assert "config differs" in _pending(config)
    config.write_text(original)
    label_file = root / "data" / "train" / "00001.npy"
    label = np.load(label_file)
    np.save(label_file, np.where(label == 0, 1, label).astype(np.uint8))  # relabelled: config and outputs as before
    assert "not in the store" in _pending(config)
    np.save(label_file, label)
    after, edited = snapshot(root), {"config.yaml", "data/train/00001.npy"}
    assert set(after) == set(before)  # the checks wrote nothing (only the test's own edits changed files)
    assert {k: v for k, v in after.items() if k not in edited} == {k: v for k, v in before.items() if k not in edited}
    assert fastpath.check(load_config(config))[0] is not None  # all restored: fresh again

    # and the flow runs and does the work: outputs deleted -> rewritten (stages cached)
    (root / "metrics.json").unlink()
    out = run_json(capsys, "run", str(config))
    assert out["flow_run"] and out["stages"] == ALL_CACHED and (root / "metrics.json").is_file()
    assert run_json(capsys, "run", str(config))["flow_run"] is None

    # + a training image -> its forward, a member, a new evaluation
    synthetic.write_dataset(root / "data", n_train=4, n_test=2, size=32, seed=0)
    edit(config, "dataset", training_number=4)
    out = run_json(capsys, "run", str(config))
    assert out["flow_run"] and (out["unet_forwards"], out["members_trained"]) == (1, 1)
    assert out["stages"] == {"extract": "ran", "train": "ran", "evaluate": "ran"}
    again = run_json(capsys, "run", str(config))
    assert again["flow_run"] is None and again["evaluate_key"] == out["evaluate_key"] and again["miou"] == out["miou"]

    # the store lost a member (repaired by `store verify`): retrained by the flow
    shutil.rmtree(store / "models")
    out = run_json(capsys, "run", str(config))
    assert out["flow_run"] and out["members_trained"] == 1 and out["stages"]["train"] == "ran"


def test_fast_path_with_augmented_and_test_time_views(tiny_experiment, prefect_server, capsys):
    config = tiny_experiment(**SMALL)
    edit(config, "augmentation", views=1)
    edit(config, "tta", views=[["HorizontalFlip"]])
    first = run_json(capsys, "run", str(config))
    assert first["flow_run"] and first["stages"]["extract"] == "ran"
    out = run_json(capsys, "run", str(config))
    assert out["flow_run"] is None and out["stages"] == ALL_CACHED and out["miou"] == first["miou"]
    store = Path(first["store"])
    for prefix in ("aug-", "tta-"):  # a derived view the flow would write again
        view = next(p for p in (store / "views").iterdir() if p.name.startswith(prefix))
        with _moved(next(p for p in view.iterdir() if p.is_dir()), config.parent.parent):
            assert "not in the store" in _pending(config)
    assert fastpath.check(load_config(config))[0] is not None

"""Shared S3 stores against a real S3 endpoint (moto's server on 127.0.0.1, started here)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest

from flows import extract as extract_stage
from flows import prepare as prepare_stage
from flows import stage_keys
from flows.cli import main
from pipeline.config import load_config
from storage.features import FeatureStore
from storage.location import StoreLocation
from tests.conftest import write_tiny_experiment

BUCKET = "ddpmseg-team"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server on 127.0.0.1; its state survives stop/start (same process), like a restarted MinIO."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = _free_port()
        self._cls = ThreadedMotoServer
        self.server = None

    def start(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": server.endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _run(capsys, *argv) -> dict:
    assert main([*argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_full_run_into_s3_then_a_teammate_reuses_everything(s3, tmp_path, prefect_server, capsys):
    url = f"s3://{BUCKET}/shared/run1"
    alice = write_tiny_experiment(tmp_path / "alice", store=url)
    first = _run(capsys, "run", str(alice))
    assert first["store"] == url and first["unet_forwards"] > 0 and first["members_trained"] == 2
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="shared/run1/")["Contents"]}
    assert any("/features/" in k and k.endswith("/c.0.0.0.0") for k in keys)
    assert any(k.startswith("shared/run1/models/") and k.endswith("/member_00/c.0") for k in keys)

    # teammate B: other directory, other config path, same content -> nothing recomputed
    bob_dir = tmp_path / "elsewhere" / "bob"
    shutil.copytree(alice.parent / "data", bob_dir / "datasets")
    data = (alice.read_text().replace("data/train", "datasets/train").replace("data/test", "datasets/test"))
    bob = bob_dir / "experiment-b.yaml"
    bob.write_text(data)
    second = _run(capsys, "run", str(bob))
    assert (second["unet_forwards"], second["members_trained"]) == (0, 0)
    assert second["miou"] == first["miou"]

    # a read-only consumer works while nothing needs writing, and says so when something would
    third = _run(capsys, "run", str(bob), "--read-only")
    assert (third["unet_forwards"], third["members_trained"]) == (0, 0)
    again = _run(capsys, "run", str(bob), "--read-only")  # unchanged: the fast path, reading S3 only, no flow
    assert again["flow_run"] is None and again["miou"] == first["miou"] and again["store"] == url
    bob.write_text(data.replace("model_num: 2", "model_num: 3"))
    assert main(["run", str(bob), "--read-only", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and url in err


def test_server_stopped_mid_extraction(s3, tmp_path, prefect_server, capsys, monkeypatch):
    url = f"s3://{BUCKET}/shared/outage"
    config = write_tiny_experiment(tmp_path, n_train=4, n_test=2, store=url,
                                   features={"steps": [50, 150], "blocks": [2, 3], "batch_size": 1},
                                   classifier={"model_num": 1, "max_epochs": 1})
    writes = {"n": 0}
    original = FeatureStore.write_features

    def write_then_fail(self, unit, image_id, maps):
        writes["n"] += 1
        if writes["n"] == 4:
            s3.stop()  # the connection drops in the middle of this image's write
        return original(self, unit, image_id, maps)

    monkeypatch.setattr(FeatureStore, "write_features", write_then_fail)
    monkeypatch.setenv("DDPMSEG_WRITE_ATTEMPTS", "2")
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and url in err and "re-run" in err
    monkeypatch.setattr(FeatureStore, "write_features", original)

    s3.start()
    cfg = load_config(config)
    store = FeatureStore(StoreLocation.parse(url))
    refs = prepare_stage.prepare(cfg, store, "train").base
    for t in cfg.features.steps:  # whatever is committed is whole; the interrupted image is not committed
        unit = stage_keys.unit_for(cfg, t)
        for r in refs:
            blocks = sorted(store.committed_blocks(unit, r.image_id))
            for m in store.read_maps([unit], r.image_id, blocks) if blocks else []:
                assert np.isfinite(m).all()
    done = sum(len(store.committed_blocks(stage_keys.unit_for(cfg, t), r.image_id)) == 2
               for t in cfg.features.steps for r in refs)
    assert done == 3  # three images finished before the outage

    out = _run(capsys, "run", str(config))
    assert out["unet_forwards"] == 12 - 3 and out["stages"]["evaluate"] == "ran"
    assert main(["store", "verify", url]) == 0


def test_two_concurrent_writers_to_s3_leave_one_good_copy(s3, tmp_path):
    url = f"s3://{BUCKET}/shared/concurrent"
    config = write_tiny_experiment(tmp_path, n_train=4, n_test=1, store=url,
                                   features={"steps": [50, 150], "blocks": [2, 3, 4], "batch_size": 1})
    script = ("import sys\nfrom flows import prepare as prepare_stage, extract as extract_stage\nfrom pipeline.config import load_config\n"
              "from storage.features import FeatureStore\nfrom storage.location import StoreLocation\n"
              "cfg = load_config(sys.argv[1]); store = FeatureStore(StoreLocation.parse(cfg.store))\n"
              "refs = prepare_stage.prepare(cfg, store, 'train').base\n"
              "print(extract_stage.extract_split(cfg, store, refs, progress=False)['unet_forwards'])\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(config)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert main(["store", "verify", url]) == 0

    cfg = load_config(config)
    shared = FeatureStore(StoreLocation.parse(url))
    local = FeatureStore(StoreLocation.parse(tmp_path / "reference"))
    refs = prepare_stage.prepare(cfg, local, "train").base
    extract_stage.extract_split(cfg, local, refs, progress=False)
    units = [stage_keys.unit_for(cfg, t) for t in cfg.features.steps]
    for r in refs:
        for a, b in zip(shared.read_maps(units, r.image_id, cfg.sorted_blocks),
                        local.read_maps(units, r.image_id, cfg.sorted_blocks)):
            np.testing.assert_array_equal(a, b)

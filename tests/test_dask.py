"""The flow on a real dask.distributed LocalCluster through --dask-address: same metrics as the local run."""
from __future__ import annotations

import json

import pytest

from flows.cli import main
from tests.conftest import write_tiny_experiment


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as c:
        yield c


def test_dask_cluster_run_matches_local_run(cluster, tmp_path, prefect_server, capsys):
    overrides = dict(n_train=4, n_test=3, features={"steps": [50, 150], "blocks": [2, 3, 4], "batch_size": 2},
                     classifier={"model_num": 3, "max_epochs": 1})
    local_cfg = write_tiny_experiment(tmp_path / "local", **overrides)
    dask_cfg = write_tiny_experiment(tmp_path / "dask", **overrides)

    assert main(["run", str(local_cfg), "--json", "--quiet"]) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["run", str(dask_cfg), "--json", "--quiet", "--dask-address", cluster.scheduler_address]) == 0
    remote = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert remote["members_trained"] == local["members_trained"] == 3
    # per image batch on the cluster (2 images a batch): 2 + 2 batches x 2 steps
    assert remote["unet_forwards"] == local["unet_forwards"] == 8
    assert remote["miou"] == local["miou"]
    assert remote["miou_standard"] == local["miou_standard"]
    assert remote["pixel_accuracy"] == local["pixel_accuracy"]
    # the work really ran on the cluster: its scheduler saw extraction batches and ensemble members
    prefixes = set(cluster.scheduler.task_prefixes)
    assert {"extract_task", "train_member_task"} <= prefixes, prefixes

"""`ddpmseg sweep` / `ddpmseg clusters` on the tiny UNet through a real Prefect server: bookkeeping and caching."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import latest_artifact
from PIL import Image

from flows import sweep
from flows.analysis_cli import add_analysis_commands
from pipeline.config import ConfigError, load_config
from storage import artifacts
from storage.location import StoreLocation


def cli(argv: list[str]) -> int:
    """`ddpmseg` with the analysis commands (added here unless flows/cli.py already wires them)."""
    from flows.cli import _user_errors, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "sweep" not in subparsers.choices:
        add_analysis_commands(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"ddpmseg: error: {err}", file=sys.stderr)
        return 2


def _png(path) -> Image.Image:
    img = Image.open(path)
    img.load()
    assert img.size[0] > 200 and img.size[1] > 150
    assert np.asarray(img.convert("L")).std() > 5
    return img


def _mious(summary) -> dict:
    return {(c["block"], c["step"]): c["miou"] for c in json.loads(Path(summary["json"]).read_text())["cells"]}


def test_sweep_bookkeeping_and_caching(tiny_experiment, prefect_server):
    # batch_size 1: one UNet forward per (image, t), so the count reads directly as images x steps
    cfg = load_config(tiny_experiment(features={"batch_size": 1}))
    n_images = cfg.dataset.training_number + cfg.dataset.testing_number  # 4 + 3, all distinct
    first = sweep.run_sweep(cfg, blocks=[2, 3, 4], steps=[50, 150], epochs=1, progress=False)
    first_mious = _mious(first)  # sweep.json is rewritten by the next runs (same output directory)
    assert first["unet_forwards"] == n_images * 2  # images x steps, not x 3 blocks
    assert first["image_forwards"] == n_images * 2
    assert first["cells"] == 6 and first["classifiers_trained"] == 6 and first["cells_evaluated"] == 6
    assert first["classifier"]["model_num"] == 1 and first["classifier"]["max_epochs"] == 1
    rows = list(csv.DictReader(open(first["csv"])))
    assert [(int(r["block"]), int(r["step"])) for r in rows] == [(b, t) for b in (2, 3, 4) for t in (50, 150)]
    assert all(0 <= float(r["miou"]) <= 100 and r["miou_small"] != "" and r["miou_large"] != "" for r in rows)
    groups = first["size_groups"]
    assert groups["rule"] == "median" and groups["small"] and groups["large"]
    _png(first["heatmap"])
    _png(first["size_split"])
    loc = StoreLocation.parse(first["store"])
    record = artifacts.read_record(loc, "sweep", first["sweep_key"])
    assert record is not None and record["result"]["cells"] == 6
    table = latest_artifact(f"ddpmseg-{cfg.dataset.name}-sweep-table")  # published to Prefect too
    assert [(r["block"], r["step"]) for r in table] == [(int(r["block"]), int(r["step"])) for r in rows]
    assert [r["miou"] for r in table] == pytest.approx([float(r["miou"]) for r in rows], abs=1e-3)
    summary_text = latest_artifact(f"ddpmseg-{cfg.dataset.name}-sweep-summary")
    assert f"mIoU {first['best']['miou']:.2f} (official)" in summary_text

    again = sweep.run_sweep(cfg, blocks=[2, 3, 4], steps=[50, 150], epochs=1, progress=False)
    assert (again["unet_forwards"], again["classifiers_trained"], again["cells_evaluated"]) == (0, 0, 0)
    assert _mious(again) == first_mious and again["sweep_key"] == first["sweep_key"]

    # one more block: the missing block costs one forward per (image, t) again; only its cells are trained
    more = sweep.run_sweep(cfg, blocks=[1, 2, 3, 4], steps=[50, 150], epochs=1, progress=False)
    assert more["unet_forwards"] == n_images * 2
    assert more["cells"] == 8 and more["classifiers_trained"] == 2 and more["cells_evaluated"] == 2
    assert {k: v for k, v in _mious(more).items() if k[0] != 1} == first_mious


def test_sweep_cli_json_and_errors(tiny_experiment, prefect_server, capsys, tmp_path):
    config = str(tiny_experiment())
    out = tmp_path / "sweep-out"
    assert cli(["sweep", config, "--blocks", "3-4", "--steps", "50", "--epochs", "1", "--size-threshold", "100",
                "--workers", "1", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["cells"] == 2 and summary["blocks"] == [3, 4] and summary["steps"] == [50]
    assert summary["unet_forwards"] == 2 * 1  # 4 train images in one batch + 3 test images in one batch, 1 step
    assert summary["image_forwards"] == 7
    assert summary["size_groups"]["threshold"] == 100 and summary["size_groups"]["rule"] == "threshold"
    assert Path(summary["heatmap"]).parent == out and (out / "sweep.csv").is_file()
    assert "lighter" in summary["classifier"]["note"]

    assert cli(["sweep", config, "--blocks", "3,99", "--json"]) == 2
    assert "--blocks: block 99 is outside the model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["sweep", config, "--steps", "50-x"])


def test_clusters_are_deterministic_for_a_seed(tiny_experiment, prefect_server, tmp_path):
    cfg = load_config(tiny_experiment())
    kwargs = dict(blocks=[2, 4], steps=[50, 150], k=3, images=2, progress=False)
    a = sweep.run_clusters(cfg, seed=0, out_dir=tmp_path / "a", **kwargs)
    assert a["unet_forwards"] == 2 and a["image_forwards"] == 4  # 2 images (one batch) x 2 steps
    b = sweep.run_clusters(cfg, seed=0, out_dir=tmp_path / "b", **kwargs)
    assert b["unet_forwards"] == 0
    assert len(a["pngs"]) == 2
    for npz_a, npz_b in zip(a["npz"], b["npz"]):
        maps_a, maps_b = np.load(npz_a)["maps"], np.load(npz_b)["maps"]
        assert maps_a.shape == (2, 2, 32, 32)
        assert np.array_equal(maps_a, maps_b)
        assert set(np.unique(maps_a)) <= {0, 1, 2} and len(np.unique(maps_a[0, 0])) == 3
    for png in a["pngs"]:
        _png(png)
    with pytest.raises(ConfigError, match="--k"):
        sweep.run_clusters(cfg, k=1, progress=False)


@pytest.mark.slow  # spawns a process pool: ~50 s on 2 busy cores
def test_sweep_members_do_not_depend_on_the_runner(tiny_experiment, prefect_server):
    """Dropout draws from torch's global RNG during training: in a process pool (workers=2) and in-process
    (workers=1) every member must come out bit for bit the same."""
    from flows import prepare as prepare_stage
    from flows import stage_keys
    from storage.features import FeatureStore

    runs = []
    for workers in (1, 2):
        cfg = load_config(tiny_experiment(classifier={"dropout": 0.4}))
        summary = sweep.run_sweep(cfg, blocks=[3, 4], steps=[50], members=2, epochs=1, workers=workers,
                                  progress=False)
        assert summary["classifiers_trained"] == 4
        runs.append((cfg, summary))
    (cfg, first), (_, second) = runs
    assert _mious(first) == _mious(second)
    refs = prepare_stage.prepare_split(cfg, FeatureStore(first["store"]), "train", write=False)
    for block in (3, 4):
        train = stage_keys.train_key(sweep.cell_config(cfg, block, 50, members=2, epochs=1), refs)
        for index in range(2):
            a, _ = artifacts.read_member(StoreLocation.parse(first["store"]), stage_keys.members_key(train), index)
            b, _ = artifacts.read_member(StoreLocation.parse(second["store"]), stage_keys.members_key(train), index)
            assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


_WORK_DONE = ("unet_forwards", "image_forwards", "classifiers_trained", "cells_evaluated")


def _forget_cells(cfg, summary, members: int, epochs: int) -> None:
    """Delete the sweep's records and its cells' members, keeping the features: the next sweep trains and
    evaluates every cell again."""
    from flows import prepare as prepare_stage
    from flows import stage_keys
    from storage.features import FeatureStore

    loc = StoreLocation.parse(summary["store"])
    record = artifacts.read_record(loc, sweep.SWEEP_STAGE, summary["sweep_key"])
    refs = prepare_stage.prepare_split(cfg, FeatureStore(loc), "train", write=False)
    for block, step, cell_key in record["inputs"]["cells"]:
        artifacts.delete_record(loc, sweep.CELL_STAGE, cell_key)
        train = stage_keys.train_key(sweep.cell_config(cfg, block, step, members, epochs), refs)
        for index in range(members):
            artifacts.delete_member(loc, stage_keys.members_key(train), index)
            assert not artifacts.member_committed(loc, stage_keys.members_key(train), index)
    artifacts.delete_record(loc, sweep.SWEEP_STAGE, summary["sweep_key"])


def test_sweep_twice_on_one_store_gives_identical_json(tiny_experiment, prefect_server, tmp_path):
    """The sweep's cells are a function of the store and the code: retraining and re-evaluating every cell from the
    same features gives the same sweep.json (bar the counts of work done), and so does a fresh store.
    Block 1 is at 16 px (features interpolated to the 32 px image), block 4 at 32 px."""
    cfg = load_config(tiny_experiment())
    kwargs = dict(blocks=[1, 4], steps=[50], members=1, epochs=1, workers=1, progress=False)
    runs = []
    for attempt in range(2):
        summary = sweep.run_sweep(cfg, out_dir=tmp_path / "sweep", **kwargs)
        assert (summary["classifiers_trained"], summary["cells_evaluated"]) == (2, 2)
        assert summary["unet_forwards"] == (2 if attempt == 0 else 0)  # a train and a test batch, both blocks
        runs.append(json.loads(Path(summary["json"]).read_text()))
        _forget_cells(cfg, summary, kwargs["members"], kwargs["epochs"])
    fresh = load_config(tiny_experiment())  # the same data and config in a new directory: a new store
    summary = sweep.run_sweep(fresh, out_dir=tmp_path / "sweep", **kwargs)
    runs.append(json.loads(Path(summary["json"]).read_text()))

    first, *others = [{k: v for k, v in run.items() if k not in _WORK_DONE + ("store",)} for run in runs]
    assert len(first["cells"]) == 2 and len({c["miou"] for c in first["cells"]}) > 1
    for other in others:
        assert other == first

"""End to end: `ddpmseg run` on a tiny config and generated data, through a real Prefect server."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from flows.cli import main
from pipeline.config import load_config


def test_run_produces_masks_pngs_and_metrics(tiny_experiment, prefect_server, capsys):
    config_path = tiny_experiment()
    assert main(["run", str(config_path), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = load_config(config_path)

    assert summary["stages"] == {"extract": "ran", "train": "ran", "evaluate": "ran"}
    # 4 train + 3 test images, batch 4 -> 1 + 1 forwards per timestep, 2 timesteps
    assert summary["unet_forwards"] == 4
    assert summary["members_trained"] == cfg.classifier.model_num
    assert 0.0 <= summary["miou"] <= 100.0

    metrics = json.loads(Path(summary["metrics_path"]).read_text())
    assert metrics["miou"] == pytest.approx(summary["miou"])
    per_class = metrics["result"]["scores"]["per_class_official"]
    assert len(per_class) == cfg.dataset.number_class - (1 if cfg.dataset.ignore_label < cfg.dataset.number_class else 0)
    assert len(metrics["result"]["scores"]["per_image_miou"]) == 3

    mask_dir = Path(summary["masks_path"])
    pngs = sorted(mask_dir.glob("*.png"))
    npys = sorted(mask_dir.glob("*.npy"))
    assert len(pngs) == 3 and len(npys) == 3
    png = Image.open(pngs[0])
    assert png.mode == "P" and png.size == (32, 32)
    assert np.array_equal(np.array(png), np.load(npys[0]))

    root = zarr.open_group(summary["store"], mode="r")
    masks = root[f"evaluations/{summary['evaluate_key']}/masks"]
    assert masks.shape == (3, 32, 32) and masks.dtype == np.uint8
    assert np.array_equal(masks[0], np.load(npys[0]))


def test_second_run_is_fully_cached(tiny_experiment, prefect_server, capsys):
    config_path = tiny_experiment()
    assert main(["run", str(config_path), "--json", "--quiet"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["run", str(config_path), "--json", "--quiet"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["unet_forwards"] == 0
    assert second["members_trained"] == 0
    assert second["stages"] == {"extract": "cached", "train": "cached", "evaluate": "cached"}
    assert second["miou"] == pytest.approx(first["miou"])


def test_single_stages_in_order(tiny_experiment, prefect_server, capsys):
    config_path = tiny_experiment()
    assert main(["train", str(config_path), "--quiet"]) == 2  # nothing extracted yet: a clear error, not a traceback
    err = capsys.readouterr().err
    assert "not in the store" in err and "extract" in err
    assert main(["extract", str(config_path), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["unet_forwards"] == 4 and out["stages"] == {"extract": "ran"}
    assert main(["train", str(config_path), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["unet_forwards"] == 0 and out["members_trained"] == 2
    assert main(["evaluate", str(config_path), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["stages"] == {"evaluate": "ran"} and Path(out["metrics_path"]).is_file()


def test_bad_config_is_a_clear_cli_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: {preset: ffhq_34, train_dir: a, test_dir: b}\nmodel: {}\nclassifier: {lr: fast}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "classifier.lr" in err


def test_rgb_baseline_runs_through_the_same_store(tiny_experiment, prefect_server, capsys):
    import yaml

    config_path = tiny_experiment()
    data = yaml.safe_load(config_path.read_text())
    data["model"] = {"kind": "rgb", "flags": data["model"]["flags"]}
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["run", str(config_path), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["unet_forwards"] == 0 and summary["members_trained"] == 2
    root = zarr.open_group(summary["store"], mode="r")
    units = [k for k in root["features"].group_keys()]
    assert len(units) == 1 and units[0].startswith("rgb-")
    unit = root[f"features/{units[0]}/base"]
    (name,) = list(unit.group_keys())
    assert name.startswith("t0000-")
    image = next(iter(unit[name].group_keys()))
    assert unit[f"{name}/{image}/b00"].shape == (1, 5, 32, 32)

"""Re-run only what changed: exact forward / member counts from `ddpmseg run --json`, status, Prefect caching."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from flows.cli import main
from pipeline import synthetic


def run_json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def edit(config_path: Path, section: str, **values) -> None:
    cfg = yaml.safe_load(config_path.read_text())
    cfg.setdefault(section, {}).update(values)
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_each_change_reruns_exactly_what_it_invalidates(tiny_experiment, prefect_server, capsys):
    # 4 train + 2 test images, batch 1: one forward per (image, t)
    cfg = tiny_experiment(n_train=4, n_test=2, features={"steps": [50, 150], "blocks": [2, 3], "batch_size": 1},
                          classifier={"model_num": 1, "max_epochs": 1})
    first = run_json(capsys, "run", str(cfg))
    assert (first["unet_forwards"], first["members_trained"]) == (6 * 2, 1)

    # +1 training image -> exactly 1 image x 2 steps forwards; the classifier retrains, evaluation re-runs
    synthetic.write_dataset(cfg.parent / "data", n_train=5, n_test=2, size=32, seed=0)
    edit(cfg, "dataset", training_number=5)
    out = run_json(capsys, "run", str(cfg))
    assert (out["unet_forwards"], out["members_trained"]) == (2, 1)

    # + a timestep -> forwards only for that timestep (7 images)
    edit(cfg, "features", steps=[50, 150, 250])
    out = run_json(capsys, "run", str(cfg))
    assert out["unet_forwards"] == 7

    # + a block -> forwards for every (image, t) missing it; existing block arrays untouched
    store = Path(out["store"])
    old_chunks = {p: p.stat().st_mtime_ns for p in store.glob("features/**/b02/c*") if p.is_file()}
    assert old_chunks
    edit(cfg, "features", blocks=[2, 3, 4])
    out = run_json(capsys, "run", str(cfg))
    assert out["unet_forwards"] == 7 * 3
    assert {p: p.stat().st_mtime_ns for p in old_chunks} == old_chunks

    # classifier settings, seed, ensemble size -> retrain + re-evaluate, zero forwards
    for change in ({"dropout": 0.4}, {"seed": 3}, {"model_num": 2}):
        edit(cfg, "classifier", **change)
        out = run_json(capsys, "run", str(cfg))
        assert out["unet_forwards"] == 0, change
        assert out["stages"]["train"] == "ran" and out["stages"]["evaluate"] == "ran", change
    assert out["members_trained"] == 1  # model_num 1 -> 2: member 0 is reused, only member 1 trains

    # evaluation settings only -> re-evaluate, no forwards, no training
    edit(cfg, "evaluation", save_png=False)
    out = run_json(capsys, "run", str(cfg))
    assert (out["unet_forwards"], out["members_trained"]) == (0, 0)
    assert out["stages"] == {"extract": "cached", "train": "cached", "evaluate": "ran"}

    # unchanged -> nothing runs, and it says so, without starting Prefect (the fast path)
    out = run_json(capsys, "run", str(cfg))
    assert (out["unet_forwards"], out["members_trained"]) == (0, 0)
    assert out["stages"] == {"extract": "cached", "train": "cached", "evaluate": "cached"}
    assert "nothing to do" in out["message"] and out["flow_run"] is None
    # through the flow (--always-flow): Prefect shows the stages as Cached
    out = run_json(capsys, "run", str(cfg), "--always-flow")
    assert (out["unet_forwards"], out["members_trained"]) == (0, 0)
    assert out["stages"] == {"extract": "cached", "train": "cached", "evaluate": "cached"}
    assert "nothing to do" in out["message"] and out["flow_run"]
    assert out["prefect_cache_hits"] == 2 + 2 + 1  # extract train/test, 2 members, evaluate


def test_store_is_the_source_of_truth_without_prefect_cache(tiny_experiment, prefect_server, capsys, tmp_path):
    cfg = tiny_experiment()
    first = run_json(capsys, "run", str(cfg))
    copy = tmp_path / "copied-store"
    shutil.copytree(first["store"], copy)  # a store Prefect has never seen: no cache records for it
    out = run_json(capsys, "run", str(cfg), "--store", str(copy))
    assert (out["unet_forwards"], out["members_trained"], out["prefect_cache_hits"]) == (0, 0, 0)
    assert out["miou"] == first["miou"]
    # and the other way round: Prefect has records, the store lost a unit -> it is recomputed, not trusted
    shutil.rmtree(next(Path(first["store"]).glob("features/*/base/t0050-*")))
    out = run_json(capsys, "run", str(cfg))
    assert out["unet_forwards"] == 2  # 4 train + 3 test images at t=50, batch 4 -> 1 + 1 forwards


def test_status_names_the_changed_input(tiny_experiment, prefect_server, capsys, tiny_backbone):
    import torch

    model, _, flags = tiny_backbone
    root = Path(tiny_experiment().parent)
    ckpt = root / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    cfg = root / "config.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["model"] = {"checkpoint": "tiny.pt", "flags": data["model"]["flags"]}
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    run_json(capsys, "run", str(cfg))

    def status() -> dict[str, dict]:
        assert main(["status", str(cfg), "--json"]) == 0
        return {e["stage"]: e for e in json.loads(capsys.readouterr().out)}

    assert all(e["state"] == "fresh" for e in status().values())

    edit(cfg, "classifier", dropout=0.4)
    st = status()
    assert st["train"]["state"] == "stale" and "classifier.dropout 0.0 → 0.4" in st["train"]["reasons"]
    assert st["extract train/t0050"]["state"] == "fresh"
    edit(cfg, "classifier", dropout=0.0)

    edit(cfg, "features", steps=[50, 150, 350])
    st = status()
    assert st["extract test/t0350"]["state"] == "missing" and "new timestep" in st["extract test/t0350"]["reasons"]
    assert any("steps" in r for r in st["train"]["reasons"])
    edit(cfg, "features", steps=[50, 150])

    edit(cfg, "features", blocks=[2, 3, 4, 5])
    st = status()
    assert any("new block(s) [5]" in r for r in st["extract train/t0050"]["reasons"])
    edit(cfg, "features", blocks=[2, 3, 4])

    label_file = root / "data" / "train" / "00001.npy"
    label = np.load(label_file)
    np.save(label_file, np.where(label == 0, 1, label).astype(np.uint8))
    st = status()
    assert any(r.startswith("label changed: 00001") for r in st["train"]["reasons"]), st["train"]
    assert st["extract train/t0050"]["state"] == "fresh"  # a label needs no forward

    image_file = root / "data" / "test" / "00002.png"
    pixels = np.array(Image.open(image_file))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image_file)
    st = status()
    assert st["extract test/t0050"]["state"] == "stale"
    assert any("image bytes changed: 00002" in r for r in st["evaluate"]["reasons"]), st["evaluate"]

    torch.manual_seed(1)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, ckpt)
    st = status()
    assert st["extract train/t0050"]["state"] == "missing"
    assert any(r.startswith("checkpoint bytes") for r in st["extract train/t0050"]["reasons"])
    assert any(r.startswith("checkpoint bytes") for r in st["train"]["reasons"])


def test_demo_twice_second_run_is_free(tmp_path, prefect_server, capsys):
    out_dir = tmp_path / "demo"
    args = ("demo", "--out", str(out_dir), "--train", "3", "--test", "2", "--members", "1")
    first = run_json(capsys, *args)
    # ddpm and random-unet: one forward per (split batch, step): 2 splits x 3 steps each; rgb runs no UNet;
    # one member per feature type
    assert first["unet_forwards"] == 2 * 2 * 3 and first["members_trained"] == 3
    second = run_json(capsys, *args)
    assert (second["unet_forwards"], second["members_trained"]) == (0, 0)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert sorted(metrics) == ["ddpm", "random-unet", "rgb"]
    assert all(0 <= metrics[f]["miou"] <= 100 for f in metrics)
    assert metrics == second["features"]  # metrics.json describes the latest run
    assert {f: e["miou"] for f, e in first["features"].items()} == {f: e["miou"] for f, e in metrics.items()}
    report = (out_dir / "report.html").read_text()
    assert "predictions.png" in report and "per_class_iou.png" in report
    assert (out_dir / "report" / "predictions.png").stat().st_size > 1000
    # every run also writes its own evaluation report (worst images, per-class and per-image bars)
    assert "gallery.png" in (out_dir / "runs" / "ddpm" / "s0" / "report" / "report.html").read_text()

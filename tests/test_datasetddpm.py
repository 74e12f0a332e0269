"""DatasetDDPM (#19): samples drawn into the store, labelled by the ensemble, a segmenter trained on them.

Tiny: the random tiny UNet at 32 px, 5 respaced steps, a few samples, ddpmseg_resnet18 for 2 epochs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows import synthesize as synthesize_stage
from flows.cli import main
from pipeline.config import load_config
from storage import artifacts
from storage.features import FeatureStore
from storage.location import StoreLocation
from tests.conftest import write_tiny_experiment

DATASETDDPM = {"respacing": "5", "batch_size": 2, "samples": 6, "backbone": "ddpmseg_resnet18", "epochs": 2,
               "segmenter_batch_size": 2, "resolution": 16, "uncertainty_rule": "most_uncertain",
               "uncertainty_portion": 0.34}


def _experiment(root: Path, **datasetddpm) -> Path:
    return write_tiny_experiment(root, n_train=3, n_test=2, datasetddpm={**DATASETDDPM, **datasetddpm})


def _json_run(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _edit(config: Path, section: str, **values) -> None:
    data = yaml.safe_load(config.read_text())
    data.setdefault(section, {}).update(values)
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def test_synthesize_more_samples_draws_only_the_new_batches(tmp_path, prefect_server, capsys):
    config = _experiment(tmp_path)
    first = _json_run(capsys, ["synthesize", str(config), "--samples", "3"])
    assert first["samples_drawn"] == 4  # two whole batches of 2 for 3 samples
    cfg = load_config(config)
    store = FeatureStore(StoreLocation.parse(cfg.store))
    three = synthesize_stage.synthetic_refs(cfg, store, synthesize_stage.sampling_plan(cfg, 3))
    assert len(three) == 3 and len({r.image_id for r in three}) == 3

    more = _json_run(capsys, ["synthesize", str(config), "--samples", "6"])
    assert more["samples_drawn"] == 2 and more["stages"]["synthesize"] == "ran"
    six = synthesize_stage.synthetic_refs(cfg, store, synthesize_stage.sampling_plan(cfg, 6))
    assert six[:3] == three  # the first samples are the same images (content ids)
    for ref in six:  # stored like a real image: a checked float32 model input in [-1, 1], split "synthetic"
        image = store.read_view_input("base", ref.image_id)
        assert image.shape == (3, 32, 32) and np.isfinite(image).all() and -1 <= image.min() <= image.max() <= 1
    again = _json_run(capsys, ["synthesize", str(config), "--samples", "6"])
    assert again["samples_drawn"] == 0 and again["stages"]["synthesize"] == "cached"


SYNTHESIZE = """
import sys
from flows import synthesize as synthesize_stage
from pipeline.config import load_config
from storage.features import FeatureStore
from storage.location import StoreLocation
cfg = load_config(sys.argv[1])
store = FeatureStore(StoreLocation.parse(sys.argv[2]))
plan = synthesize_stage.sampling_plan(cfg, int(sys.argv[3]))
print(synthesize_stage.synthesize(cfg, store, plan, progress=False))
"""


def _batch_records(store_dir: Path) -> int:
    return len(list(store_dir.glob(f"stages/{synthesize_stage.BATCH_STAGE}/*/zarr.json")))


def test_sigkill_during_synthesis_resumes_at_the_next_unfinished_batch(tmp_path):
    config = _experiment(tmp_path, batch_size=1, respacing="10")
    cfg = load_config(config)
    plan = synthesize_stage.sampling_plan(cfg, 5)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-c", SYNTHESIZE, str(config), cfg.store, "5"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    deadline = time.time() + 180
    while _batch_records(Path(cfg.store)) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sampler finished before it could be killed"

    store = FeatureStore(StoreLocation.parse(cfg.store))
    left = synthesize_stage.missing_batches(cfg, store, plan)
    assert 0 < len(left) < plan.batches
    assert left == list(range(plan.batches - len(left), plan.batches))  # committed batches are a prefix
    counts = synthesize_stage.synthesize(cfg, store, plan, progress=False)
    assert counts["batches_drawn"] == len(left)
    assert synthesize_stage.missing_batches(cfg, store, plan) == []
    resumed = synthesize_stage.synthetic_refs(cfg, store, plan)

    # the killed process's batches hold the samples this one draws (each sample seeded by its index). Compared by
    # value, not by content id: the UNet's float32 sums round differently with another torch thread count (1 vs 2
    # threads: up to 1.4e-6 apart, other ids; seen in the full suite), which changes the hash.
    clean = FeatureStore(StoreLocation.parse(tmp_path / "clean-store"))
    first = synthesize_stage.sampling_plan(cfg, plan.batches - len(left))
    synthesize_stage.synthesize(cfg, clean, first, progress=False)
    fresh = synthesize_stage.synthetic_refs(cfg, clean, first)
    assert len(fresh) == first.samples
    for a, b in zip(fresh, resumed[:first.samples]):
        np.testing.assert_allclose(clean.read_view_input("base", a.image_id),
                                   store.read_view_input("base", b.image_id), atol=1e-4)
    assert main(["store", "verify", cfg.store]) == 0


def test_segmenter_relabels_on_a_new_train_key_and_retrains_only_on_a_new_portion(tmp_path, prefect_server,
                                                                                     capsys):
    from pipeline.segmenter import kept_indices

    config = _experiment(tmp_path)
    first = _json_run(capsys, ["segmenter", "train", str(config)])
    assert first["samples_drawn"] == 6 and first["labelled"] == 6 and first["segmenter_epochs_trained"] == 2
    seg, ensemble = first["segmenter"], first["ensemble"]
    assert 0 <= seg["miou"] <= 100 and 0 <= ensemble["miou"] <= 100
    assert seg["model_selection"] == "validation" and set(seg["validation_miou"]) == {"0", "1"}
    metrics = json.loads(Path(seg["metrics_path"]).read_text())
    assert metrics["result"]["miou"] == seg["miou"] and len(list(Path(seg["masks_path"]).glob("*.npy"))) == 2

    # the stored segmenter trained on exactly kept_indices of the stored uncertainties
    cfg = load_config(config)
    loc = StoreLocation.parse(cfg.store)
    record = artifacts.read_record(loc, "segmenter", first["segmenter_key"])["result"]
    uncertainties = np.array(record["uncertainties"])
    kept = kept_indices(uncertainties, 0.34, 0, "most_uncertain")
    assert len(kept) == 4 and record["kept_indices"] == kept.tolist()
    plan = synthesize_stage.sampling_plan(cfg)
    refs = synthesize_stage.synthetic_refs(cfg, FeatureStore(loc), plan)
    assert record["kept_image_ids"] == [refs[i].image_id for i in kept]
    assert max(uncertainties[kept]) <= min(np.delete(uncertainties, kept))  # the 2 most uncertain are out
    assert all(artifacts.checkpoint_committed(loc, record["checkpoints"], e) for e in range(2))

    # `ddpmseg status` lists DatasetDDPM's stages once they have run: all fresh
    from flows.status import stage_status

    def datasetddpm_states() -> dict[str, tuple[str, list[str]]]:
        later = ("synthesize", "extract synthetic", "label", "segmenter")
        return {e["stage"]: (e["state"], e["reasons"]) for e in stage_status(load_config(config))
                if e["stage"].startswith(later)}

    states = datasetddpm_states()
    assert set(states) == {"synthesize", "extract synthetic/t0050", "extract synthetic/t0150", "label", "segmenter",
                           "segmenter evaluate"}
    assert {state for state, _ in states.values()} == {"fresh"}

    # a new train key (another classifier seed): labelled again from the stored features, no sample drawn
    _edit(config, "classifier", seed=1)
    states = datasetddpm_states()
    assert states["synthesize"][0] == states["extract synthetic/t0050"][0] == "fresh"
    assert states["label"][0] == "stale" and "train stage changed" in states["label"][1]
    assert states["segmenter"] == ("stale", ["label stage changed"])
    relabel = _json_run(capsys, ["segmenter", "train", str(config)])
    assert relabel["samples_drawn"] == 0 and relabel["stages"]["extract synthetic"] == "cached"
    assert relabel["labelled"] == 6 and relabel["members_trained"] == 2
    assert relabel["label_key"] != first["label_key"]

    # a new uncertainty portion: the segmenter only
    _edit(config, "datasetddpm", uncertainty_portion=0.5)
    states = datasetddpm_states()
    assert states["label"][0] == "fresh"
    assert states["segmenter"] == ("stale", ["settings.uncertainty_portion 0.34 → 0.5"])
    assert states["segmenter evaluate"] == ("stale", ["segmenter stage changed"])
    portion = _json_run(capsys, ["segmenter", "train", str(config)])
    assert portion["samples_drawn"] == 0 and portion["labelled"] == 0 and portion["members_trained"] == 0
    assert portion["unet_forwards"] == 0 and portion["segmenter_epochs_trained"] == 2
    assert portion["label_key"] == relabel["label_key"] and portion["segmenter_key"] != relabel["segmenter_key"]
    assert main(["store", "verify", cfg.store]) == 0

    # a run killed after epoch 0 (no record, no checkpoint of epoch 1) resumes after epoch 0, bit for bit
    from flows import segmenter as segmenter_stage
    from flows import prepare as prepare_stage
    from flows.stage_keys import train_key
    from pipeline.segmenter import load_checkpoint

    cfg = load_config(config)
    store = FeatureStore(loc)
    split = prepare_stage.prepare(cfg, store, "train", write=False)
    train = train_key(cfg, split.base + split.views)
    key = segmenter_stage.segmenter_key(cfg, plan, train)
    assert key.value == portion["segmenter_key"]
    where = segmenter_stage.checkpoints_key(key)
    uninterrupted = load_checkpoint(artifacts.read_checkpoint(loc, where, 1)[0])
    artifacts.delete_record(loc, "segmenter", key.value)
    loc.delete(artifacts.checkpoint_key(where, 1))
    assert segmenter_stage.train(cfg, store, plan, train, progress=False) == {"ran": True, "epochs_trained": 1,
                                                                             "kept": 3}
    resumed = load_checkpoint(artifacts.read_checkpoint(loc, where, 1)[0])
    for name, tensor in uninterrupted["model"].items():
        assert (tensor == resumed["model"][name]).all(), name

    # gc keeps the samples, their features and labels, and the segmenter's evaluation
    capsys.readouterr()
    assert main(["store", "gc", str(config), "--dry-run", "--json"]) == 0
    removed = json.loads(capsys.readouterr().out)
    paths = [r["path"] for r in removed]
    assert paths, "the first train key's members and evaluation are garbage"
    assert not [p for p in paths if any(r.image_id in p for r in refs)]
    assert not [p for p in paths if portion["segmenter"]["evaluate_key"] in p]

    # other backbone weights (none -> a .pth state dict): the segmenter only, from those weights
    import hashlib

    import torch

    from pipeline.deeplab import create_segmenter

    assert "backbone_weights_sha256" not in key.inputs  # none: the key of the runs before backbone_weights existed
    torch.manual_seed(7)
    weights = {**create_segmenter("ddpmseg_resnet18", 3).backbone.state_dict(), "fc.weight": torch.zeros(1000, 512),
               "fc.bias": torch.zeros(1000)}  # a classification ResNet's layout, fc unused
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(weights, path)
    _edit(config, "datasetddpm", backbone_weights=str(path))
    pretrained = _json_run(capsys, ["segmenter", "train", str(config)])
    assert pretrained["samples_drawn"] == 0 and pretrained["labelled"] == 0 and pretrained["members_trained"] == 0
    assert pretrained["unet_forwards"] == 0 and pretrained["segmenter_epochs_trained"] == 2
    assert pretrained["label_key"] == portion["label_key"] and pretrained["segmenter_key"] != portion["segmenter_key"]
    record = artifacts.read_record(loc, "segmenter", pretrained["segmenter_key"])["result"]
    assert record["backbone_weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    started = load_checkpoint(artifacts.read_checkpoint(loc, record["checkpoints"], 0)[0])["model"]
    random_start = load_checkpoint(artifacts.read_checkpoint(loc, where, 0)[0])["model"]
    assert not (started["backbone.conv1.weight"] == random_start["backbone.conv1.weight"]).all()  # weights were used


@pytest.mark.parametrize("argv_tail, datasetddpm, model, expected", [
    (["--samples", "0"], {}, None, "samples 0: expected at least 1"),
    (["--respacing", "2000"], {}, None, "2000 steps; the schedule has 1000"),
    ([], {"respacing": "ddim7x"}, None, "expected '' (the full schedule), an integer K or 'ddimK'"),
    ([], {}, "rgb", "model.kind is 'rgb'; DatasetDDPM samples images from a diffusion backbone"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv_tail, datasetddpm, model, expected):
    config = _experiment(tmp_path, **datasetddpm)
    if model:
        data = yaml.safe_load(config.read_text())
        data["model"] = {"kind": model, "flags": data["model"]["flags"]}
        config.write_text(yaml.safe_dump(data, sort_keys=False))
    for command in (["synthesize"], ["segmenter", "train"]):
        capsys.readouterr()
        assert main([*command, str(config), *argv_tail]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ddpmseg: error: ") and expected in err and len(err.splitlines()) == 1, err
    assert not Path(load_config(config).store).exists()  # refused before anything was written


def test_backbone_weights_default_per_backbone_and_imagenet_needs_the_fetched_file(tmp_path, capsys, monkeypatch):
    """imagenet (the official start) is the default for torchvision's backbones and resolves to the fetched file;
    missing, it is one line naming the fetch command and `none`, before anything runs; ddpmseg_resnet18 defaults
    to none and refuses imagenet."""
    from pipeline import fetched
    from pipeline.config import segmenter_backbone_weights

    home = tmp_path / "home"
    monkeypatch.setenv("DDPMSEG_HOME", str(home))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert load_config(_experiment(tmp_path / "a")).datasetddpm.backbone_weights == "none"  # ddpmseg_resnet18
    config = _experiment(tmp_path / "b", backbone="resnet50")
    cfg = load_config(config)
    assert cfg.datasetddpm.backbone_weights == "imagenet"
    hub = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"  # torchvision downloaded it before
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"torchvision's copy")
    assert segmenter_backbone_weights(cfg) == hub
    hub.unlink()
    assert main(["segmenter", "train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "datasetddpm.backbone_weights: imagenet" in err, err
    assert "`ddpmseg fetch checkpoint imagenet/resnet50`" in err and "backbone_weights: none" in err
    assert not Path(cfg.store).exists()  # refused before anything ran
    path = fetched.imagenet_weights_path("resnet50")
    assert path == home.resolve() / "checkpoints" / "imagenet" / "resnet50-0676ba61.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"fetched")
    assert segmenter_backbone_weights(cfg) == path
    assert main(["segmenter", "train", str(config)]) == 2  # found, but no torch.save file: named, before any compute
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "not a file written by torch.save" in err, err
    import torch

    from pipeline.deeplab import create_segmenter

    other = tmp_path / "resnet18.pth"  # another backbone's layout
    torch.save(create_segmenter("ddpmseg_resnet18", 3).backbone.state_dict(), other)
    _edit(config, "datasetddpm", backbone_weights=str(other))
    assert main(["segmenter", "train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(other) in err and "is not a ResNet backbone state dict" in err, err
    assert not Path(cfg.store).exists()

    _edit(config, "datasetddpm", backbone_weights="weights/r50.pth")  # relative to the config's folder
    assert load_config(config).datasetddpm.backbone_weights == str(config.parent.resolve() / "weights" / "r50.pth")
    _edit(config, "datasetddpm", backbone="ddpmseg_resnet18", backbone_weights="imagenet")
    assert main(["segmenter", "train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no ImageNet weights for backbone 'ddpmseg_resnet18'" in err and "none" in err


def test_unknown_segmenter_backbone_is_one_line(tmp_path, capsys):
    config = _experiment(tmp_path, backbone="resnet9000")
    assert main(["segmenter", "train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "datasetddpm" in err and "resnet9000" in err and "ddpmseg_resnet18" in err


def test_a_corrupted_segmenter_checkpoint_is_found_and_repaired(tmp_path, capsys):
    loc = StoreLocation.parse(tmp_path / "store")
    FeatureStore(loc).root  # an empty store
    artifacts.write_checkpoint(loc, "k" * 32, 0, b"checkpoint bytes of epoch 0", {"epoch": 0})
    artifacts.write_checkpoint(loc, "k" * 32, 1, b"checkpoint bytes of epoch 1", {"epoch": 1})
    assert artifacts.read_checkpoint(loc, "k" * 32, 1) == (b"checkpoint bytes of epoch 1", {"epoch": 1})
    chunk = tmp_path / "store" / artifacts.checkpoint_key("k" * 32, 1) / artifacts.MEMBER_CHUNK
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception, match="do not match their checksum"):
        artifacts.read_checkpoint(loc, "k" * 32, 1)
    assert main(["store", "verify", str(tmp_path / "store")]) == 1
    out = capsys.readouterr().out
    assert "epoch_001" in out and "1 problem" in out
    assert main(["store", "verify", str(tmp_path / "store"), "--repair"]) == 0
    assert not artifacts.checkpoint_committed(loc, "k" * 32, 1) and artifacts.checkpoint_committed(loc, "k" * 32, 0)

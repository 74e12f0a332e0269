"""Backbone training (pipeline.diffusion_training, `ddpmseg backbone train`): a few real steps of a small
guided-diffusion UNet on generated images; files, resume, determinism, loading, errors."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from flows.backbone_cli import add_backbone_commands
from pipeline import synthetic
from pipeline.backbone import TINY_MODEL_FLAGS, BackboneError, build_backbone, complete_flags, load_checkpoint
from pipeline.diffusion_training import (
    TrainingError,
    TrainSettings,
    flags_path_for,
    resolve_flags,
    resume_path_for,
    train_backbone,
)

# A smaller UNet than TINY_MODEL_FLAGS (16 px, 2 levels) so a step takes tens of milliseconds (GroupNorm needs 32 | num_channels); dropout on, so the
# resume test also covers the model's own random draws.
SMALL_FLAGS = {**TINY_MODEL_FLAGS, "image_size": 16, "num_channels": 32, "channel_mult": "1,2",
               "attention_resolutions": "8", "dropout": 0.1, "diffusion_steps": 100}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on the shared 2-core machine a contended second thread makes these tiny steps ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.write_dataset(root, n_train=0, n_test=0, n_unlabelled=6, size=16, seed=1)
    return root / "unlabelled"


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def settings(**overrides) -> TrainSettings:
    return TrainSettings(**{"steps": 4, "batch_size": 2, "lr": 1e-3, "save_every": 2, **overrides})


def test_few_steps_write_checkpoint_flags_and_resume_file(images_dir, tmp_path):
    out = tmp_path / "ckpt.pt"
    info = train_backbone(images_dir, SMALL_FLAGS, out, settings(steps=3), progress=False)
    assert info["steps"] == 3 and info["start_step"] == 0 and info["images"] == 6
    assert info["final_loss"] is not None and 0 < info["final_loss"] < 10 and len(info["loss_history"]) == 1
    assert out.is_file() and flags_path_for(out) == tmp_path / "ckpt.json"
    assert resume_path_for(out) == tmp_path / "ckpt.resume.pt" and resume_path_for(out).is_file()

    flags = json.loads(flags_path_for(out).read_text())
    assert flags == complete_flags(SMALL_FLAGS)
    state = load_state(out)  # a plain state dict of tensors, as the official checkpoints
    assert isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values())
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    model, _ = build_backbone(flags, "cpu")
    load_checkpoint(model, out)
    assert torch.equal(model.out[-1].weight, state["out.2.weight"])
    assert model.out[-1].weight.abs().sum() > 0  # trained away from guided-diffusion's zero init
    model.load_state_dict(torch.load(out, weights_only=True))  # what the official code does

    resume = load_state(resume_path_for(out))
    assert resume["step"] == 3 and len(resume["losses"]) == 3
    assert all(torch.isfinite(torch.tensor(resume["losses"])))
    assert resume["optimizer"]["state"][0]["step"].item() == 3
    # ckpt.pt holds the EMA weights, not the raw ones
    assert not torch.equal(resume["ema"]["out.2.weight"], resume["model"]["out.2.weight"])
    assert torch.equal(resume["ema"]["out.2.weight"], state["out.2.weight"])


def test_resume_continues_the_step_count_and_equals_an_uninterrupted_run(images_dir, tmp_path):
    straight = tmp_path / "straight.pt"
    info_straight = train_backbone(images_dir, SMALL_FLAGS, straight, settings(steps=4), progress=False)

    interrupted = tmp_path / "interrupted.pt"
    train_backbone(images_dir, SMALL_FLAGS, interrupted, settings(steps=2), progress=False)
    assert load_state(resume_path_for(interrupted))["step"] == 2
    info = train_backbone(images_dir, SMALL_FLAGS, interrupted, settings(steps=4), resume=True, progress=False)
    assert info["start_step"] == 2 and info["steps"] == 4

    resumed = load_state(resume_path_for(interrupted))
    assert resumed["step"] == 4 and resumed["optimizer"]["state"][0]["step"].item() == 4
    assert resumed["losses"] == load_state(resume_path_for(straight))["losses"]
    assert info["final_loss"] == info_straight["final_loss"]
    a, b = load_state(straight), load_state(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # resuming at the target step does nothing; a different seed gives other weights
    again = train_backbone(images_dir, SMALL_FLAGS, interrupted, settings(steps=4), resume=True, progress=False)
    assert again["start_step"] == 4 and all(torch.equal(a[k], v) for k, v in load_state(interrupted).items())
    other = tmp_path / "other.pt"
    train_backbone(images_dir, SMALL_FLAGS, other, settings(steps=4, seed=1), progress=False)
    assert not torch.equal(load_state(other)["out.2.weight"], a["out.2.weight"])


def test_resume_refuses_other_settings_or_a_missing_file(images_dir, tmp_path):
    out = tmp_path / "ckpt.pt"
    with pytest.raises(TrainingError, match="ckpt.resume.pt not found"):
        train_backbone(images_dir, SMALL_FLAGS, out, settings(), resume=True, progress=False)
    train_backbone(images_dir, SMALL_FLAGS, out, settings(steps=2), progress=False)
    with pytest.raises(TrainingError, match=r"lr=0.001.*lr=0.002"):
        train_backbone(images_dir, SMALL_FLAGS, out, settings(lr=2e-3), resume=True, progress=False)
    with pytest.raises(TrainingError, match=r"flags differ in \['num_channels'\]"):
        train_backbone(images_dir, {**SMALL_FLAGS, "num_channels": 64}, out, settings(), resume=True,
                       progress=False)
    with pytest.raises(TrainingError, match="step 2, beyond steps=1"):
        train_backbone(images_dir, SMALL_FLAGS, out, settings(steps=1), resume=True, progress=False)


def test_float16_checkpoint_loads_with_a_cast(images_dir, tmp_path):
    out = tmp_path / "half.pt"
    train_backbone(images_dir, SMALL_FLAGS, out, settings(steps=1, save_dtype="float16", ema_rate=0.0),
                   progress=False)
    state = load_state(out)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert torch.equal(state["out.2.weight"], load_state(resume_path_for(out))["model"]["out.2.weight"].half())
    model, _ = build_backbone(json.loads(flags_path_for(out).read_text()), "cpu")
    load_checkpoint(model, out)
    assert model.out[-1].weight.dtype == torch.float32
    assert torch.equal(model.out[-1].weight, state["out.2.weight"].float())


def test_flags_presets_files_and_input_errors(images_dir, tmp_path):
    assert resolve_flags("tiny") == complete_flags(TINY_MODEL_FLAGS)
    path = tmp_path / "flags.json"
    path.write_text(json.dumps(SMALL_FLAGS))
    assert resolve_flags(str(path)) == complete_flags(SMALL_FLAGS)
    with pytest.raises(TrainingError, match="neither a preset"):
        resolve_flags("no-such-preset")
    path.write_text("[1, 2]")
    with pytest.raises(TrainingError, match="expected a JSON object"):
        resolve_flags(path)
    with pytest.raises(BackboneError, match="unknown model flag"):
        resolve_flags({"num_chanels": 8})
    with pytest.raises(TrainingError, match="batch size 7 exceeds the 6 image"):
        train_backbone(images_dir, SMALL_FLAGS, tmp_path / "x.pt", settings(batch_size=7), progress=False)
    with pytest.raises(TrainingError, match="holds no image"):
        train_backbone(tmp_path, SMALL_FLAGS, tmp_path / "x.pt", settings(), progress=False)
    with pytest.raises(TrainingError, match="ema_rate must be"):
        TrainSettings(ema_rate=1.0)


def test_cli_backbone_train(images_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="ddpmseg")
    add_backbone_commands(parser.add_subparsers(dest="command", required=True))
    flags_file = tmp_path / "small.json"
    flags_file.write_text(json.dumps(SMALL_FLAGS))
    out = tmp_path / "cli.pt"
    argv = ["backbone", "train", str(images_dir), "--flags", str(flags_file), "--out", str(out), "--steps", "2",
            "--batch-size", "3", "--save-every", "1", "--seed", "3", "--json", "--quiet"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["steps"] == 2 and info["out"] == str(out) and out.is_file()
    assert load_state(resume_path_for(out))["settings"]["seed"] == 3
    args = parser.parse_args(argv[:-2] + ["--steps", "3", "--resume", "--quiet"])
    assert args.func(args) == 0
    assert "steps 2 -> 3" in capsys.readouterr().out
    help_text = parser._subparsers._group_actions[0].choices["backbone"]._subparsers._group_actions[0] \
        .choices["train"].format_help()
    assert "tiny" in help_text and "--resume" in help_text and "ckpt.json" in help_text

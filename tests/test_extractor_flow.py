"""End to end with the paper's baselines: `ddpmseg run` on reduced MAE and SwAV configs (random weights, the
official checkpoint format), on the same store and images as the tiny DDPM experiment."""
from __future__ import annotations

import json

import torch
import yaml

from flows.cli import main
from pipeline.config import load_config
from pipeline.extractors.mae_network import MaskedAutoencoderViT
from storage import maintenance
from storage.features import FeatureStore
from storage.location import StoreLocation
from tests.conftest import write_tiny_experiment

TINY_MAE = {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2,
            "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}


def _variant(ddpm_config, name: str, model: dict, features: dict) -> str:
    data = yaml.safe_load(ddpm_config.read_text())
    data["model"] = model
    data["features"] = {"batch_size": 4, **features}
    path = ddpm_config.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _run(args, capsys) -> dict:
    assert main([*args, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_mae_and_swav_run_end_to_end_beside_ddpm_on_one_store(tmp_path, prefect_server, capsys):
    ddpm = write_tiny_experiment(tmp_path)  # 4 train + 3 test images, tiny random UNet, steps 50 and 150
    torch.manual_seed(1)
    checkpoint = tmp_path / "lsun_bedroom.pth"  # the official MAE format: {"model": state_dict}
    torch.save({"model": MaskedAutoencoderViT(**{**TINY_MAE, "mlp_ratio": 4.0}).state_dict(), "epoch": 1}, checkpoint)
    mae = _variant(ddpm, "mae", {"kind": "mae", "checkpoint": str(checkpoint), "flags": TINY_MAE},
                   {"blocks": [1, 2]})
    swav = _variant(ddpm, "swav", {"kind": "swav", "random_init": True, "flags": {"image_size": 32,
                                                                                   "width_per_group": 8}}, {})

    stores = set()
    for config in (mae, swav):
        summary = _run(["run", config], capsys)
        assert summary["stages"] == {"extract": "ran", "train": "ran", "evaluate": "ran"}
        assert summary["unet_forwards"] == 2  # one forward per batch: no timesteps (the pseudo-step 0)
        assert 0.0 <= summary["miou"] <= 100.0
        stores.add(summary["store"])
    assert stores == {StoreLocation.parse(load_config(ddpm).store).url}
    again = _run(["run", mae], capsys)
    assert again["unet_forwards"] == 0 and again["members_trained"] == 0
    assert again["stages"] == {"extract": "cached", "train": "cached", "evaluate": "cached"}

    assert _run(["extract", str(ddpm)], capsys)["unet_forwards"] == 4  # 2 batches x 2 timesteps
    store = FeatureStore(StoreLocation.parse(stores.pop()), read_only=True)
    listed = maintenance.list_units(store)
    assert [u.path for u in listed] == sorted(u.path for u in listed)  # `store ls` prints a stable order
    units = {u.path.split("/")[1]: u for u in listed}
    kinds = sorted(tag.rsplit("-", 1)[0] for tag in units)
    assert kinds == ["mae-lsun_bedroom", "random0", "swav-random0"]  # one store, one backbone tag per extractor
    mae_unit = next(u for tag, u in units.items() if tag.startswith("mae-"))
    assert "/t0000-" in mae_unit.path and mae_unit.images == 7 and sorted(mae_unit.blocks) == [1, 2]
    swav_cfg = load_config(swav)
    assert swav_cfg.features.blocks == [0, 2, 3, 5, 7, 9, 11, 13, 15] and swav_cfg.features.input_activations

    # the analysis commands take the hooked layers as blocks and refuse timesteps
    sweep = _run(["sweep", mae, "--blocks", "1,2", "--members", "1", "--epochs", "1", "--workers", "1"], capsys)
    assert sweep["cells"] == 2 and sweep["unet_forwards"] == 0 and sweep["steps"] == [0]
    assert main(["sweep", mae, "--steps", "50", "--json"]) == 2
    assert "--steps: kind mae has no timesteps" in capsys.readouterr().err
    assert main(["sweep", mae, "--blocks", "3", "--json"]) == 2
    assert "--blocks: block 3 is outside the model; allowed 0..2 (3 encoder blocks)" in capsys.readouterr().err

    # changing the MAE checkpoint invalidates its features only
    torch.save({"model": MaskedAutoencoderViT(**{**TINY_MAE, "mlp_ratio": 4.0}).state_dict()}, checkpoint)
    assert _run(["extract", mae], capsys)["unet_forwards"] == 2

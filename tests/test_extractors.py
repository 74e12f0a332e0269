"""Feature extractors (pipeline/extractors): the registry, the official MAE / SwAV layouts, dims and extraction.

Real weights cannot be downloaded here: networks carry random weights; the official architectures are checked
by their state-dict layouts (built on the meta device, no memory) and channel arithmetic, forwards run on
reduced configurations (a 3-block ViT, a ResNet with 8 stem channels at 32x32).
"""
from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch

from pipeline.config import ConfigError, feature_channels, parse_config
from pipeline.extractors import EXTRACTORS, KINDS, ExtractorError, create_extractor, official_settings
from pipeline.extractors.base import IMAGENET_MEAN, IMAGENET_STD, imagenet_input
from pipeline.extractors.mae import OFFICIAL_MAE_FLAGS
from pipeline.extractors.mae_network import MaskedAutoencoderViT
from pipeline.extractors.swav_network import ResNet
from pipeline.official_import import import_official

TINY_MAE = {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2,
            "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
TINY_SWAV = {"image_size": 32, "width_per_group": 8}
CPU = torch.device("cpu")


def _inputs(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Stored view inputs: uint8 pixels through ToTensor and 2x - 1, as the prepare stage stores them."""
    pixels = torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(seed))
    return pixels.to(torch.float32).div(255) * 2 - 1


# -- official state-dict layouts, written from the official model definitions (not from our modules) -----------
def official_mae_layout(f: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of MaskedAutoencoderViT's state dict (models_mae.py with timm's PatchEmbed and Block)."""
    d, dd, p = f["embed_dim"], f["decoder_embed_dim"], f["patch_size"]
    tokens = (f["image_size"] // p) ** 2 + 1

    def block(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
        hidden = int(dim * f["mlp_ratio"])
        return {f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,),
                f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.qkv.bias": (3 * dim,),
                f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
                f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
                f"{prefix}.mlp.fc1.weight": (hidden, dim), f"{prefix}.mlp.fc1.bias": (hidden,),
                f"{prefix}.mlp.fc2.weight": (dim, hidden), f"{prefix}.mlp.fc2.bias": (dim,)}

    layout = {"cls_token": (1, 1, d), "pos_embed": (1, tokens, d), "mask_token": (1, 1, dd),
              "decoder_pos_embed": (1, tokens, dd), "patch_embed.proj.weight": (d, 3, p, p),
              "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,),
              "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,), "decoder_norm.weight": (dd,),
              "decoder_norm.bias": (dd,), "decoder_pred.weight": (p * p * 3, dd), "decoder_pred.bias": (p * p * 3,)}
    for i in range(f["depth"]):
        layout.update(block(f"blocks.{i}", d))
    for i in range(f["decoder_depth"]):
        layout.update(block(f"decoder_blocks.{i}", dd))
    return layout


def official_resnet_layout(widen: int, width_per_group: int = 64, layers=(3, 4, 6, 3)) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's resnet50 (widen 1) / swav's resnet50w2 (widen 2) without fc."""
    def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}

    base = width_per_group * widen
    layout = {"conv1.weight": (base, 3, 7, 7), **bn("bn1", base)}
    inplanes = base
    for s, count in enumerate(layers):
        planes = base * 2 ** s
        for i in range(count):
            pre = f"layer{s + 1}.{i}"
            layout.update({f"{pre}.conv1.weight": (planes, inplanes, 1, 1), **bn(f"{pre}.bn1", planes),
                           f"{pre}.conv2.weight": (planes, planes, 3, 3), **bn(f"{pre}.bn2", planes),
                           f"{pre}.conv3.weight": (planes * 4, planes, 1, 1), **bn(f"{pre}.bn3", planes * 4)})
            if i == 0:
                layout.update({f"{pre}.downsample.0.weight": (planes * 4, inplanes, 1, 1),
                               **bn(f"{pre}.downsample.1", planes * 4)})
            inplanes = planes * 4
    return layout


def _layout(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _random_state(layout: dict[str, tuple[int, ...]], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.tensor(7) if not shape else torch.rand(shape, generator=g) + 0.5) for k, shape in layout.items()}


# -- registry -------------------------------------------------------------------------------------------------
def test_registry_names_every_kind_and_refuses_unknown_ones():
    assert KINDS == ("ddpm", "rgb", "mae", "swav", "swav_w2")
    for kind in KINDS:
        assert create_extractor(kind).kind == kind == EXTRACTORS[kind].kind
    with pytest.raises(ValueError, match=r"unknown model.kind 'vit'; expected one of \['ddpm', 'rgb', 'mae'"):
        create_extractor("vit")
    with pytest.raises(ValueError, match=r"model.flags: unknown model flag\(s\) \['channel_mult'\]"):
        create_extractor("swav", {"channel_mult": "1,2"})
    with pytest.raises(ValueError, match="model.flags.depth: expected an integer"):
        create_extractor("mae", {"depth": "deep"})


def test_plain_settings_table_equals_what_the_extractor_classes_report():
    """pipeline/extractors/kinds.py (what `ddpmseg config presets` lists without importing torch) holds each kind's
    official settings exactly as its extractor class computes them (layer shapes of the official flags)."""
    from pipeline.extractors.kinds import EXTRACTOR_CLASSES, OFFICIAL_SETTINGS

    assert tuple(OFFICIAL_SETTINGS) == KINDS == tuple(EXTRACTOR_CLASSES)
    for kind in KINDS:
        assert OFFICIAL_SETTINGS[kind] == official_settings(kind), kind
        module, name = EXTRACTOR_CLASSES[kind]
        assert (EXTRACTORS[kind].__module__, EXTRACTORS[kind].__name__) == (module, name)


# -- official architectures: layouts and channels --------------------------------------------------------------
def test_full_size_networks_have_the_official_state_dict_layouts():
    with torch.device("meta"):
        mae = MaskedAutoencoderViT(**OFFICIAL_MAE_FLAGS)
        resnet50 = ResNet([3, 4, 6, 3], widen=1)
        resnet50w2 = ResNet([3, 4, 6, 3], widen=2)
    assert _layout(mae) == official_mae_layout(OFFICIAL_MAE_FLAGS)
    assert _layout(resnet50) == official_resnet_layout(1)
    assert _layout(resnet50w2) == official_resnet_layout(2)
    # ResNet-50 without fc: 23.5 M parameters (torchvision resnet50 25.6 M less fc 2.05 M); ResNet-50w2 93.9 M
    assert sum(p.numel() for p in resnet50.parameters()) == 23_508_032
    assert sum(p.numel() for p in resnet50w2.parameters()) == 93_907_072


@pytest.mark.parametrize("kind, dim", [("mae", 12288), ("swav", 6720), ("swav_w2", 13440), ("ddpm", 8448)])
def test_official_channels_equal_the_experiment_files_dim(kind, dim):
    """experiments/<dataset>/{mae,swav,swav_w2,ddpm}.json state dim [256, 256, D]."""
    settings = official_settings(kind)
    assert settings["channels"] == dim
    if kind == "mae":
        assert settings["layers"] == [f"blocks.{i}" for i in range(12, 24)]
        assert create_extractor("mae").layer_shapes(settings["blocks"])[12] == (1024, 32, 32)
    if kind.startswith("swav"):
        assert settings["layers"] == ["layer1.0", "layer1.2", "layer2.0", "layer2.2", "layer3.0", "layer3.2",
                                      "layer3.4", "layer4.0", "layer4.2"]  # layer[::2] of each stage
        widen = 2 if kind == "swav_w2" else 1
        shapes = create_extractor(kind).layer_shapes(settings["blocks"], input_activations=True)
        assert [c for c, _, _ in shapes.values()] == [widen * c for c in (64, 256, 256, 512, 512, 1024, 1024,
                                                                           1024, 2048)]
        assert [h for _, h, _ in shapes.values()] == [64, 64, 64, 32, 32, 16, 16, 16, 8]


# -- input transform --------------------------------------------------------------------------------------------
def test_imagenet_input_is_bit_identical_to_the_official_transform():
    """make_transform('mae'|'swav', 256): ToTensor (uint8 / 255) then Normalize(mean, std), from the same pixels."""
    pixels = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    unit = pixels.to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    official = unit.sub(mean).div(std)
    stored = unit * 2 - 1  # what the prepare stage stores
    assert torch.equal(imagenet_input(stored), official)
    assert torch.equal(pixels, torch.round((stored + 1) * 127.5).to(pixels.dtype))


# -- forwards on reduced networks ------------------------------------------------------------------------------
def test_mae_maps_are_the_official_unshuffled_tokens_in_any_patch_order():
    extractor = create_extractor("mae", TINY_MAE)
    extractor.build(CPU, None, init_seed=0)
    x = _inputs()
    maps = extractor.forward(x, 0, None, [1, 2])
    assert {b: tuple(m.shape) for b, m in maps.items()} == {1: (2, 32, 4, 4), 2: (2, 32, 4, 4)}
    assert extractor.layer_shapes([1, 2]) == {1: (32, 4, 4), 2: (32, 4, 4)}

    # the official way, written out: random patch order (mask ratio 0), hooks saving block outputs, class token
    # dropped, gather with ids_restore, (B, D, L) viewed as (B, D, 4, 4)
    model = extractor.model
    saved = {}
    handles = [model.blocks[i].register_forward_hook(lambda m, inp, out, i=i: saved.__setitem__(i, out))
               for i in (1, 2)]
    ids_shuffle = torch.argsort(torch.rand(2, 16, generator=torch.Generator().manual_seed(5)), dim=1)
    with torch.no_grad():
        _, ids_restore = model.encode(imagenet_input(x), ids_shuffle)
    for h in handles:
        h.remove()
    assert not torch.equal(ids_restore, torch.arange(16).expand(2, 16))
    for i in (1, 2):
        a = saved[i][:, 1:]
        a = torch.gather(a, 1, ids_restore.unsqueeze(-1).repeat(1, 1, a.shape[2])).permute(0, 2, 1)
        official = a.reshape(*a.shape[:2], 4, 4)
        torch.testing.assert_close(maps[i], official, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(maps[1], maps[2])

    # the early stop after the last needed block changes nothing
    assert torch.equal(extractor.forward(x, 0, None, [1])[1], maps[1])


@pytest.mark.parametrize("kind", ["swav", "swav_w2"])
def test_swav_maps_are_the_inputs_of_every_other_bottleneck(kind):
    extractor = create_extractor(kind, TINY_SWAV)
    extractor.build(CPU, None, init_seed=0)
    blocks = type(extractor).feature_defaults(TINY_SWAV)["blocks"]
    assert blocks == [0, 2, 3, 5, 7, 9, 11, 13, 15]
    x = _inputs()
    maps = extractor.forward(x, 0, None, blocks, input_activations=True)
    assert {b: tuple(m.shape[1:]) for b, m in maps.items()} == extractor.layer_shapes(blocks, True)
    every = list(range(16))
    assert {b: tuple(m.shape[1:]) for b, m in extractor.forward(x, 0, None, every, False).items()} == \
        extractor.layer_shapes(every, False)

    # the official way: forward hooks on layer[::2] of each stage saving inp[0], a full forward
    model = extractor.model
    saved = []
    hooked = [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage[::2]]
    handles = [b.register_forward_hook(lambda m, inp, out: saved.append(inp[0].detach().float())) for b in hooked]
    with torch.no_grad():
        model(imagenet_input(x))
    for h in handles:
        h.remove()
    assert len(saved) == 9
    for official, b in zip(saved, blocks):
        assert torch.equal(maps[b], official)
    assert maps[0].shape[1] == 8 * (2 if kind == "swav_w2" else 1)  # the stem's width: widen x width_per_group


# -- checkpoints ------------------------------------------------------------------------------------------------
def test_mae_checkpoint_in_the_official_format_loads_every_key(tmp_path):
    state = _random_state(official_mae_layout({**OFFICIAL_MAE_FLAGS, **TINY_MAE}))
    path = tmp_path / "lsun_bedroom.pth"
    torch.save({"model": state, "epoch": 799, "args": argparse.Namespace(model="mae_vit_large_patch8")}, path)
    extractor = create_extractor("mae", TINY_MAE)
    extractor.build(CPU, str(path))
    loaded = extractor.model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    torch.save(state, tmp_path / "plain.pth")
    with pytest.raises(ExtractorError, match=r"under 'model'"):
        create_extractor("mae", TINY_MAE).build(CPU, str(tmp_path / "plain.pth"))
    torch.save({"model": {k: v for k, v in state.items() if k != "norm.weight"}}, tmp_path / "partial.pth")
    with pytest.raises(ExtractorError, match=r"1 missing key\(s\), first: \['norm.weight'\]"):
        create_extractor("mae", TINY_MAE).build(CPU, str(tmp_path / "partial.pth"))
    torch.save({"model": state, "optimizer": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)},
               tmp_path / "pickled.pth")
    with pytest.raises(ExtractorError, match="torch.optim.sgd.SGD.*refused for safety"):
        create_extractor("mae", TINY_MAE).build(CPU, str(tmp_path / "pickled.pth"))


def test_swav_checkpoint_with_module_prefix_loads_and_reports_unused_keys(tmp_path, caplog):
    layout = official_resnet_layout(1, 8)
    state = _random_state(layout)
    extra = {"projection_head.0.weight": torch.rand(4, 256), "prototypes.weight": torch.rand(3, 4)}
    path = tmp_path / "swav.pth"
    torch.save({"epoch": 800, "state_dict": {f"module.{k}": v for k, v in {**state, **extra}.items()}}, path)
    extractor = create_extractor("swav", TINY_SWAV)
    extractor.build(CPU, str(path))
    report = extractor.load_report
    assert report.missing == [] and sorted(report.unexpected) == sorted(extra)
    assert len(report.loaded) == len(layout)
    loaded = extractor.model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    # a checkpoint of the wrong network loads nothing: an error, not a silently random network
    torch.save({"state_dict": {"module.encoder.weight": torch.rand(2)}}, tmp_path / "other.pth")
    with pytest.raises(ExtractorError, match="none of its 1 tensors match the model"):
        create_extractor("swav", TINY_SWAV).build(CPU, str(tmp_path / "other.pth"))
    # keys the checkpoint lacks are loaded non-strictly (as the official code) but reported
    partial = {f"module.{k}": v for k, v in state.items() if not k.startswith("layer4.2.")}
    torch.save({"state_dict": partial}, tmp_path / "partial.pth")
    with caplog.at_level(logging.WARNING, logger="ddpmseg.extractors"):
        extractor = create_extractor("swav", TINY_SWAV)
        extractor.build(CPU, str(tmp_path / "partial.pth"))
    assert len(extractor.load_report.missing) == sum(1 for k in layout if k.startswith("layer4.2."))
    assert "left parts of the model at their random init" in caplog.text
    # the wrong width: a shape mismatch names the key
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "narrow.pth")
    with pytest.raises(ExtractorError, match="shape mismatch.*conv1.weight: checkpoint \\(8, 3, 7, 7\\) vs model "
                                             "\\(16, 3, 7, 7\\)"):
        create_extractor("swav_w2", TINY_SWAV).build(CPU, str(tmp_path / "narrow.pth"))


def test_library_networks_have_our_keys_where_they_import():
    """torchvision's resnet50 and timm's ViT Block, when importable (the CUDA torchvision wheel cannot be
    imported beside the CPU torch of this machine; timm imports torchvision)."""
    try:
        import torchvision
        from timm.models.vision_transformer import Block
    except Exception as err:  # noqa: BLE001 - a broken torchvision raises RuntimeError at import
        pytest.skip(f"torchvision/timm not importable here: {type(err).__name__}")
    reference = {k: tuple(v.shape) for k, v in torchvision.models.resnet50().state_dict().items()
                 if not k.startswith("fc.")}
    assert reference == official_resnet_layout(1)
    block = Block(64, 4, 4.0, qkv_bias=True)
    mae = official_mae_layout({**OFFICIAL_MAE_FLAGS, "embed_dim": 64, "depth": 1})
    assert {f"blocks.0.{k}": tuple(v.shape) for k, v in block.state_dict().items()} == \
        {k: v for k, v in mae.items() if k.startswith("blocks.0.")}


# -- configs ----------------------------------------------------------------------------------------------------
def _official_json(tmp_path, kind: str, dim: int, input_activations: bool):
    """experiments/bedroom_28/<kind>.json of the official repository (values as published)."""
    opts = {"exp_dir": f"pixel_classifiers/bedroom_28/{kind}", "model_type": kind, "category": "bedroom_28",
            "number_class": 29, "ignore_label": 0, "training_path": "datasets/bedroom_28/real/train",
            "validation_path": "datasets/bedroom_28/ddpm", "testing_path": "datasets/bedroom_28/real/test",
            "model_path": f"checkpoints/{kind}/lsun_bedroom.pth", "dim": [256, 256, dim], "steps": [],
            "blocks": [], "model_num": 10, "batch_size": 64, "max_training": 30, "training_number": 40,
            "testing_number": 20, "upsample_mode": "bilinear", "input_activations": input_activations}
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(opts))
    return path


@pytest.mark.parametrize("kind, dim, input_activations", [("mae", 12288, False), ("swav", 6720, True),
                                                         ("swav_w2", 13440, True)])
def test_import_of_the_official_experiment_files(tmp_path, kind, dim, input_activations):
    data = import_official(_official_json(tmp_path, kind, dim, input_activations))
    cfg = parse_config(data, base_dir=tmp_path)
    assert cfg.model.kind == kind and cfg.model.checkpoint == str(tmp_path / f"checkpoints/{kind}/lsun_bedroom.pth")
    assert cfg.features.steps == [0] and cfg.features.input_activations is input_activations
    assert cfg.image_size == 256 and feature_channels(cfg) == dim

    bad = _official_json(tmp_path, kind, dim + 1, input_activations)
    with pytest.raises(ConfigError, match=f"dim \\[256, 256, {dim + 1}\\] says {dim + 1} channels per pixel; the "
                                          f"{kind} extractor's layers give {dim}"):
        import_official(bad)
    with pytest.raises(ConfigError, match="--model-flags are guided-diffusion flags"):
        import_official(_official_json(tmp_path, kind, dim, input_activations), "--image_size 256")


def test_configs_of_the_new_kinds_get_their_defaults_and_checks(tmp_path):
    base = {"dataset": {"preset": "bedroom_28", "train_dir": "a", "test_dir": "b"}}
    cfg = parse_config({**base, "model": {"kind": "mae"}}, base_dir=tmp_path)
    assert cfg.model.checkpoint.endswith("/checkpoints/mae/lsun_bedroom.pth")  # beside the config, else fetched
    assert cfg.features.blocks == list(range(12, 24)) and cfg.features.steps == [0]
    assert feature_channels(cfg) == 12288
    cfg = parse_config({**base, "model": {"kind": "swav_w2"}, "features": {"steps": [50, 150]}}, base_dir=tmp_path)
    assert cfg.features.steps == [0] and cfg.features.input_activations is True  # a single pseudo-step
    assert cfg.model.checkpoint.endswith("checkpoints/swav_w2/lsun_bedroom.pth")
    cfg = parse_config({**base, "model": {"kind": "swav", "random_init": True},
                        "features": {"blocks": [15], "input_activations": False}}, base_dir=tmp_path)
    assert cfg.model.checkpoint is None and feature_channels(cfg) == 2048

    with pytest.raises(ConfigError, match=r"features.blocks: block 24 is outside the model; allowed 0..23 "
                                          r"\(24 encoder blocks\)"):
        parse_config({**base, "model": {"kind": "mae"}, "features": {"blocks": [23, 24]}})
    with pytest.raises(ConfigError, match=r"model.flags: unknown model flag\(s\) \['num_channels'\]"):
        parse_config({**base, "model": {"kind": "swav", "flags": {"num_channels": 3}}})
    with pytest.raises(ConfigError, match="model.flags.layers: expected four"):
        parse_config({**base, "model": {"kind": "swav", "flags": {"layers": "3,4"}}})
    with pytest.raises(ConfigError, match="model.kind"):
        parse_config({**base, "model": {"kind": "dino"}})
    with pytest.raises(ConfigError, match="checkpoint is required .*randomly initialised mae network"):
        parse_config({"dataset": {**base["dataset"], "preset": None, "number_class": 3, "training_number": 1,
                                  "testing_number": 1}, "model": {"kind": "mae"}})


# -- keys of existing stores ---------------------------------------------------------------------------------------
# Measured on the code before feature extractors existed (commit 407aa6a): the demo's three configs. A change here
# would orphan every store written before.
PINNED_KEYS = {
    "ddpm": ("features/demo_backbone-34a97fb9c7fe/base/t0050-8eb954bf",
             "3d45f5d42f6c0dfe1c15145aa94f1a4b588cac416760b9fa62f27d81327cee6b"),
    "random-unet": ("features/random0-05015811dd5b/base/t0050-8eb954bf",
                    "438b07b820d9f487be706c9ac845ddb8d8cf6ca48c51e41cdda775b02423cec7"),
    "rgb": ("features/rgb-a25ff3fa2aa1/base/t0000-8eb954bf",
            "73ac6367189d7a401dc3b5001c342cdccb29b594a051c9a326dae724dc0ca6a0"),
}


@pytest.mark.parametrize("feature", sorted(PINNED_KEYS))
def test_stage_keys_of_ddpm_and_rgb_configs_are_those_of_earlier_versions(feature, tmp_path):
    from flows import stage_keys
    from flows.demo import demo_config

    data = demo_config(feature, 0, 3, 2, 2)
    data["features"]["batch_size"] = 2
    cfg = parse_config(data, base_dir=tmp_path)
    refs = [stage_keys.ImageRef(f"img{i:02d}", f"lab{i:02d}", f"s{i}") for i in range(3)]
    unit, extract = PINNED_KEYS[feature]
    assert stage_keys.unit_for(cfg, cfg.features.steps[0]).path == unit
    assert stage_keys.extract_key(cfg, refs).value == extract


def test_mae_and_swav_units_are_keyed_by_kind_and_weights(tmp_path):
    from flows import stage_keys

    base = {"dataset": {"preset": "cat_15", "train_dir": "a", "test_dir": "b"}}
    checkpoint = tmp_path / "lsun_cat.pth"
    checkpoint.write_bytes(b"weights")
    tags = {}
    for kind in ("mae", "swav", "swav_w2"):
        cfg = parse_config({**base, "model": {"kind": kind, "checkpoint": str(checkpoint)}}, base_dir=tmp_path)
        tags[kind] = stage_keys.backbone_tag(cfg)
        assert tags[kind].startswith(f"{kind}-lsun_cat-")
        assert stage_keys.unit_for(cfg, 0).path.startswith(f"features/{tags[kind]}/base/t0000-")
        assert stage_keys.backbone_fingerprint(cfg)["kind"] == kind
    assert len(set(tags.values())) == 3
    cfg = parse_config({**base, "model": {"kind": "mae", "checkpoint": str(checkpoint)}}, base_dir=tmp_path)
    checkpoint.write_bytes(b"other weights")
    assert stage_keys.backbone_tag(cfg) != tags["mae"]


def test_a_presets_missing_mae_or_swav_checkpoint_names_its_fetch_command(tmp_path, monkeypatch):
    from flows.fetch_cli import require_assets
    from storage.assets import AssetError, checkpoint_asset

    monkeypatch.setenv("DDPMSEG_HOME", str(tmp_path / "home"))
    for kind in ("mae", "swav", "swav_w2"):
        cfg = parse_config({"dataset": {"preset": "horse_21", "train_dir": "a", "test_dir": "b"},
                            "model": {"kind": kind}}, base_dir=tmp_path)
        assert cfg.model.checkpoint == str(tmp_path / "home" / "checkpoints" / kind / "lsun_horse.pth")
        assert checkpoint_asset(f"{kind}/lsun_horse").local_path == f"checkpoints/{kind}/lsun_horse.pth"
        with pytest.raises(AssetError, match=f"run `ddpmseg fetch checkpoint {kind}/lsun_horse`"):
            require_assets(cfg)

"""The DatasetDDPM segmenter (pipeline/deeplab.py, pipeline/segmenter.py): torchvision's DeepLabV3 layout, the
official uncertainty filter, training with bit-identical resume, prediction and checkpoints. Tiny: 32 px images,
the ddpmseg_resnet18 backbone, a few steps; the ResNet-101 / ResNet-50 layouts are built on the meta device."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.deeplab import BACKBONES, create_segmenter, load_backbone_weights, segmenter_parameter_count
from pipeline.segmenter import (SegmenterSettings, checkpoint_bytes, kept_indices, load_checkpoint, load_segmenter,
                                predict_segmenter, segmenter_labels, segmenter_transform, select_checkpoint,
                                train_segmenter)
from pipeline.torchfile import TorchFileError

TINY = SegmenterSettings(backbone="ddpmseg_resnet18", resolution=32, batch_size=4, epochs=2)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models: one intra-op thread avoids OpenMP oversubscription stalls on a busy 2-core machine (and CPU
    float results depend on the thread count, so both runs of a resume comparison use the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quadrant_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, 32, 32, 3) uint8 images of four flat 16x16 quadrants of random colours; mask 1 where red > 127."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (count, 2, 2, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(colours, 16, axis=1), 16, axis=2)
    return images, (images[..., 0] > 127).astype(np.uint8)


# -- the network: torchvision's layout -----------------------------------------------------------------------------
def torchvision_deeplab_keys(layers: tuple[int, ...], num_classes: int) -> dict[str, tuple[int, ...]]:
    """torchvision's deeplabv3_resnet{50,101}(aux_loss=None) state dict, written out from its architecture (not
    from our module): Bottleneck ResNet with downsample on each stage's first block, DeepLabHead(2048, C)."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{name}"] = (channels,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    keys["backbone.conv1.weight"] = (64, 3, 7, 7)
    bn("backbone.bn1", 64)
    in_channels = 64
    for stage, blocks in enumerate(layers):
        width = 64 * 2 ** stage
        for i in range(blocks):
            p = f"backbone.layer{stage + 1}.{i}"
            keys[f"{p}.conv1.weight"] = (width, in_channels, 1, 1)
            bn(f"{p}.bn1", width)
            keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}.bn2", width)
            keys[f"{p}.conv3.weight"] = (4 * width, width, 1, 1)
            bn(f"{p}.bn3", 4 * width)
            if i == 0:
                keys[f"{p}.downsample.0.weight"] = (4 * width, in_channels, 1, 1)
                bn(f"{p}.downsample.1", 4 * width)
            in_channels = 4 * width
    keys["classifier.0.convs.0.0.weight"] = (256, 2048, 1, 1)
    bn("classifier.0.convs.0.1", 256)
    for branch in (1, 2, 3):
        keys[f"classifier.0.convs.{branch}.0.weight"] = (256, 2048, 3, 3)
        bn(f"classifier.0.convs.{branch}.1", 256)
    keys["classifier.0.convs.4.1.weight"] = (256, 2048, 1, 1)
    bn("classifier.0.convs.4.2", 256)
    keys["classifier.0.project.0.weight"] = (256, 1280, 1, 1)
    bn("classifier.0.project.1", 256)
    keys["classifier.1.weight"] = (256, 256, 3, 3)
    bn("classifier.2", 256)
    keys["classifier.4.weight"] = (num_classes, 256, 1, 1)
    keys["classifier.4.bias"] = (num_classes,)
    return keys


@pytest.mark.parametrize("backbone, layers, params_21", [
    # torchvision's docs: DeepLabV3_ResNet101 COCO weights (21 classes, with the aux FCNHead) 60,996,202 params,
    # ResNet50 42,004,074; the aux head is conv3x3 1024->256 + BN + conv1x1 256->21: 2,365,205 params
    ("resnet101", (3, 4, 23, 3), 60_996_202 - 2_365_205),
    ("resnet50", (3, 4, 6, 3), 42_004_074 - 2_365_205),
])
def test_torchvision_layout(backbone, layers, params_21):
    model = create_segmenter(backbone, 7, device="meta")
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert state == torchvision_deeplab_keys(layers, 7)
    assert list(state) == list(torchvision_deeplab_keys(layers, 7))  # torchvision's order too
    assert state["backbone.layer4.2.conv2.weight"] == (512, 512, 3, 3)
    assert state["classifier.0.convs.4.1.weight"] == (256, 2048, 1, 1)
    assert state["classifier.4.weight"] == (7, 256, 1, 1)
    assert segmenter_parameter_count(backbone, 21) == params_21
    assert segmenter_parameter_count(backbone, 7) == params_21 - 257 * 14  # the last 1x1 conv: 256 C + C
    assert len(state) == {"resnet101": 668, "resnet50": 362}[backbone]
    # dilation as replace_stride_with_dilation=[False, True, True]: layer3/4's first block keeps the previous one
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert (convs["backbone.layer3.0.conv2"].stride, convs["backbone.layer3.0.conv2"].dilation) == ((1, 1), (1, 1))
    assert convs["backbone.layer3.1.conv2"].dilation == (2, 2)
    assert (convs["backbone.layer4.0.conv2"].dilation, convs["backbone.layer4.1.conv2"].dilation) == ((2, 2), (4, 4))
    assert [convs[f"classifier.0.convs.{i}.0"].dilation for i in (1, 2, 3)] == [(12, 12), (24, 24), (36, 36)]


def test_forward_shapes_on_meta_and_cpu():
    model = create_segmenter("resnet101", 29, device="meta").eval()
    out = model(torch.empty(2, 3, 256, 256, device="meta"))
    assert list(out) == ["out"] and out["out"].shape == (2, 29, 256, 256)
    torch.manual_seed(0)
    small = create_segmenter("ddpmseg_resnet18", 5).eval()
    for side in (32, 44):  # 44: not a multiple of the output stride 8
        with torch.no_grad():
            logits = small(torch.randn(3, 3, side, side))["out"]
        assert logits.shape == (3, 5, side, side) and torch.isfinite(logits).all()
    assert segmenter_parameter_count("ddpmseg_resnet18", 5) < segmenter_parameter_count("resnet50", 5) / 2


def test_against_torchvision_source_when_present():
    """torchvision's own model (its Python source, loaded without its C++ ops, which a CUDA wheel lacks on a CPU
    machine): same keys, shapes, initial weights under one seed and forward. Run in a subprocess so the stand-in
    torchvision package never reaches this process."""
    code = textwrap.dedent("""
        import importlib.util, os, sys, types
        spec = importlib.util.find_spec("torchvision")
        if spec is None:
            sys.exit(3)
        package = types.ModuleType("torchvision")
        package.__path__ = [os.path.dirname(spec.origin)]
        sys.modules["torchvision"] = package
        import torch
        torch.set_num_threads(1)
        from torchvision.models.segmentation import deeplabv3 as tv
        from pipeline.deeplab import create_segmenter
        with torch.device("meta"):
            theirs = tv.deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=29, aux_loss=None)
        ours = create_segmenter("resnet101", 29, device="meta")
        assert [(k, v.shape) for k, v in theirs.state_dict().items()] == \\
            [(k, v.shape) for k, v in ours.state_dict().items()]
        torch.manual_seed(4)
        theirs = tv.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=None)
        torch.manual_seed(4)
        ours = create_segmenter("resnet50", 3)
        a, b = theirs.state_dict(), ours.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), "initial weights differ"
        x = torch.randn(2, 3, 24, 24)
        with torch.no_grad():
            assert torch.equal(theirs.eval()(x)["out"], ours.eval()(x)["out"]), "forward differs"
        ours.load_state_dict(a, strict=True)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode == 3:
        pytest.skip("torchvision is not installed")
    assert done.returncode == 0, done.stderr[-3000:]


def test_load_backbone_weights_from_a_classification_resnet():
    torch.manual_seed(1)
    donor = create_segmenter("ddpmseg_resnet18", 2)
    classification = {k[len("backbone."):]: v for k, v in donor.state_dict().items() if k.startswith("backbone.")}
    classification |= {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    model = create_segmenter("ddpmseg_resnet18", 2)
    assert load_backbone_weights(model, classification, "resnet18.pth") == ["fc.bias", "fc.weight"]
    assert torch.equal(model.backbone.layer4[1].conv2.weight, donor.backbone.layer4[1].conv2.weight)
    del classification["layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match=r"resnet18.pth .*1 missing .*layer1.0.conv1.weight"):
        load_backbone_weights(model, classification, "resnet18.pth")


def test_unknown_backbone():
    with pytest.raises(ValueError, match=r"unknown segmenter backbone 'resnet18'; expected one of .*ddpmseg_resnet18"):
        create_segmenter("resnet18", 3)
    with pytest.raises(ValueError, match=r"backbone: unknown 'vgg'"):
        SegmenterSettings(backbone="vgg")
    assert set(BACKBONES) == {"resnet101", "resnet50", "ddpmseg_resnet18"}


# -- the uncertainty filter -----------------------------------------------------------------------------------------
def test_kept_indices_official_rule():
    rng = np.random.default_rng(0)
    uncertainty = rng.permutation(400).astype(np.float64)  # sample i has rank uncertainty[i]
    kept = kept_indices(uncertainty, 0.1, 0)
    # n_out = 40: sorted[30 : -10]: the 30 most certain and the 10 most uncertain are dropped, in sorted order
    assert np.array_equal(kept, np.argsort(uncertainty)[30:-10])
    assert np.array_equal(uncertainty[kept], np.arange(30, 390))
    # max_data: the first 350 samples, then the filter (n_out = 35: sorted[30 : -5])
    kept = kept_indices(uncertainty, 0.1, 350)
    assert np.array_equal(kept, np.argsort(uncertainty[:350])[30:-5]) and len(kept) == 315
    # portion 0: no filter, original order
    assert np.array_equal(kept_indices(uncertainty, 0.0, 100), np.arange(100))
    # the plain rule drops exactly the n_out most uncertain
    plain = kept_indices(uncertainty, 0.1, 0, rule="most_uncertain")
    assert np.array_equal(uncertainty[plain], np.arange(360))
    # the smallest count at which the official keeps anything: int(310 * 0.1) = 31 -> sorted[30:-1], 279 kept
    assert len(kept_indices(uncertainty[:310], 0.1, 0)) == 279


@pytest.mark.parametrize("count, n_out", [(300, 30), (200, 20), (40, 4)])
def test_kept_indices_official_quirk_keeps_nothing(count, n_out):
    uncertainty = np.linspace(0, 1, count)
    assert len(np.argsort(uncertainty)[30:-n_out + 30]) == 0  # the official slice itself
    with pytest.raises(ValueError, match=rf"{count} samples, uncertainty_portion 0.1 -> n_out = int\({count} \* 0.1\) "
                                         rf"= {n_out}.*at least 310 samples"):
        kept_indices(uncertainty, 0.1, 0)


def test_kept_indices_bad_inputs():
    with pytest.raises(ValueError, match="non-finite value.*sample 2"):
        kept_indices(np.array([0.1, 0.2, np.nan]), 0.1, 0)
    with pytest.raises(ValueError, match="0 <= portion < 1"):
        kept_indices(np.zeros(5), 1.0, 0)
    with pytest.raises(ValueError, match="uncertainty_rule: unknown 'best'"):
        kept_indices(np.zeros(5), 0.1, 0, rule="best")


# -- input transform and prediction ---------------------------------------------------------------------------------
def test_segmenter_transform_is_the_official_deeplab_transform():
    images, masks = quadrant_images(2, 3)
    noisy = (images.astype(np.int16) + np.random.default_rng(0).integers(-9, 9, images.shape)).clip(0, 255)
    big = np.repeat(np.repeat(noisy.astype(np.uint8), 2, axis=1), 2, axis=2)  # 64 px
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for source in (noisy.astype(np.uint8), big):
        resized = [np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in source]
        expected = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float().div(255)
        expected = (expected - torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)) / \
            torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        assert torch.equal(segmenter_transform(source, 32), expected)
    labels = segmenter_labels(np.repeat(np.repeat(masks, 2, axis=1), 2, axis=2), 32)
    assert labels.dtype == torch.int64 and torch.equal(labels, torch.from_numpy(masks).long())


# -- training, resume, checkpoints ----------------------------------------------------------------------------------
def test_resume_is_bit_identical(capsys):
    images, masks = quadrant_images(8, 0)
    rng_before = torch.get_rng_state()
    straight: list[dict] = []
    model = train_segmenter(images, masks, 2, TINY, on_epoch=lambda e, c: straight.append(c), progress=True)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left as it was
    assert [c["epoch"] for c in straight] == [0, 1]
    assert "segmenter train: 4/4 it (100%)" in capsys.readouterr().err

    first = load_checkpoint(checkpoint_bytes(straight[0]))
    resumed: list[dict] = []
    again = train_segmenter(images, masks, 2, TINY, start=first, on_epoch=lambda e, c: resumed.append(c))
    assert [c["epoch"] for c in resumed] == [1]
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert resumed[0]["losses"] == straight[1]["losses"]
    assert checkpoint_bytes(resumed[0]) == checkpoint_bytes(straight[1])

    with pytest.raises(ValueError, match=r"another run: learning_rate 0.001 != 0.002"):
        train_segmenter(images, masks, 2, SegmenterSettings(**{**TINY.__dict__, "learning_rate": 2e-3}), start=first)
    with pytest.raises(ValueError, match=r"another run: training data \(8 samples"):
        train_segmenter(images[::-1].copy(), masks[::-1].copy(), 2, TINY, start=first)


def test_training_learns_a_colour_rule():
    images, masks = quadrant_images(16, 0)
    test_images, test_masks = quadrant_images(8, 1)
    losses: list[float] = []
    settings = SegmenterSettings(backbone="ddpmseg_resnet18", resolution=32, batch_size=4, epochs=4)
    model = train_segmenter(images, masks, 2, settings, on_epoch=lambda e, c: losses.append(c["epoch_loss"]))
    assert losses[-1] < 0.6 * losses[0]
    predicted = predict_segmenter(model, test_images, 32)
    chance = max(test_masks.mean(), 1 - test_masks.mean())
    assert predicted.shape == test_masks.shape and predicted.dtype == np.uint8
    assert (predicted == test_masks).mean() > chance + 0.1


def test_checkpoint_round_trip_and_prediction_sizes():
    images, masks = quadrant_images(4, 2)
    saved: list[dict] = []
    settings = SegmenterSettings(backbone="ddpmseg_resnet18", resolution=32, batch_size=4, epochs=1)
    model = train_segmenter(images, masks, 3, settings, on_epoch=lambda e, c: saved.append(c))
    data = checkpoint_bytes(saved[0])
    plain = torch.load(io.BytesIO(data), weights_only=True)  # tensors and plain containers only
    assert plain["format"] == "ddpmseg-segmenter-1" and plain["num_classes"] == 3
    restored = load_segmenter(load_checkpoint(data))
    assert np.array_equal(predict_segmenter(restored, images, 32), predict_segmenter(model, images, 32))
    # an official train_deeplab.py file: {'model_state_dict': ...}, backbone and classes read from the shapes
    official = torch.load(io.BytesIO(checkpoint_bytes({"model_state_dict": model.state_dict()})), weights_only=True)
    assert np.array_equal(predict_segmenter(load_segmenter(official), images, 32), predict_segmenter(model, images, 32))
    # images larger than the resolution: predicted at 32, mapped back to 64 by nearest neighbour
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
    at_resolution = predict_segmenter(model, big, 32, at_resolution=True)
    assert at_resolution.shape == (4, 32, 32)
    assert np.array_equal(predict_segmenter(model, big, 32), np.repeat(np.repeat(at_resolution, 2, 1), 2, 2))
    with pytest.raises(TorchFileError, match="segmenter checkpoint is not a file written by torch.save"):
        load_checkpoint(data[:1000])
    with pytest.raises(ValueError, match="not a train_segmenter checkpoint"):
        load_checkpoint(checkpoint_bytes({"weights": torch.zeros(1)}))


def test_select_checkpoint_visits_epochs_in_file_name_order():
    # official: sorted(glob) visits deeplab_epoch_0, _1, _10, _11, ..., _2; the first strictly better one wins
    assert select_checkpoint({0: 0.1, 2: 0.5, 10: 0.5, 1: 0.3}) == 10
    assert select_checkpoint({0: 0.4, 1: 0.2}) == 0
    with pytest.raises(ValueError, match="no epoch has a validation mIoU above 0"):
        select_checkpoint({0: 0.0, 1: 0.0})


def test_training_bad_inputs():
    images, masks = quadrant_images(8, 0)
    with pytest.raises(ValueError, match=r"masks: expected a uint8 array of shape \(8, 32, 32\).*got shape "
                                         r"\(8, 16, 16\)"):
        train_segmenter(images, masks[:, :16, :16].copy(), 2, TINY)
    bad = masks.copy()
    bad[5, 0, 0] = 7
    with pytest.raises(ValueError, match=r"labels >= num_classes 2, first: mask 5 with label 7"):
        train_segmenter(images, bad, 2, TINY)
    with pytest.raises(ValueError, match=r"images: expected a uint8 array \(N, H, W, 3\).*float32"):
        train_segmenter(images.astype(np.float32), masks, 2, TINY)
    with pytest.raises(ValueError, match=r"only square images"):
        train_segmenter(images[:, :, :30].copy(), masks[:, :, :30].copy(), 2, TINY)
    with pytest.raises(ValueError, match=r"3 sample\(s\) < batch_size 4"):
        train_segmenter(images[:3], masks[:3], 2, TINY)
    with pytest.raises(ValueError, match=r"uncertainty_portion: expected 0 <= portion < 1"):
        SegmenterSettings(uncertainty_portion=1.5)

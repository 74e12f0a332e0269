"""DeepLabV3 segmentation networks in torchvision's module layout, for the DatasetDDPM segmenter.

The official DatasetDDPM (train_deeplab.py) trains ``torchvision.models.segmentation.deeplabv3_resnet101(
pretrained=False, num_classes=C, aux_loss=None)``. torchvision is not importable everywhere ddpmseg runs (a CUDA
wheel on a CPU machine fails at ``import torchvision``), so the network is written here with exactly torchvision's
module names, state-dict keys and shapes: a checkpoint of torchvision's model loads with ``strict=True`` and a
checkpoint from here loads into torchvision's.

    DeepLabV3
      backbone     ResNet with replace_stride_with_dilation=[False, True, True] (output stride 8), without avgpool
                   and fc (torchvision's IntermediateLayerGetter keeps conv1 .. layer4; layer4 is the 'out' map)
      classifier   DeepLabHead(channels of layer4, C): 0 ASPP (convs.0 1x1, convs.1-3 3x3 at rates 12/24/36,
                   convs.4 image pooling; project 1x1 + BN + ReLU + Dropout(0.5)), 1 conv 3x3 256, 2 BN, 3 ReLU,
                   4 conv 1x1 to C (with bias)
      forward(x)   {'out': classifier(backbone(x)) bilinearly upsampled (align_corners=False) to x's size}

Backbones (BACKBONES): ``resnet101`` (official; torchvision's deeplabv3_resnet101 without aux classifier),
``resnet50`` (torchvision's deeplabv3_resnet50 layout) and ``ddpmseg_resnet18``, ddpmseg's own small network for
CPUs: a ResNet-18 of BasicBlocks dilated in layers 3-4 as the others (torchvision's BasicBlock refuses dilation),
ASPP from 512 channels. The modules are created and initialised in torchvision's order (a throwaway ``fc`` included),
so under the same ``torch.manual_seed`` the random initial weights equal torchvision's ``weights=None,
weights_backbone=None`` model.

Pretrained backbone: torchvision's ``deeplabv3_resnet101(pretrained=False)`` still loads ImageNet ResNet-101 weights
into the backbone (``pretrained_backbone`` / ``weights_backbone`` default to ``ResNet101_Weights.IMAGENET1K_V1``),
so the official run starts from an ImageNet backbone. ``load_backbone_weights`` loads such a classification
checkpoint (torchvision's resnet101 state dict, ``fc.*`` unused) into ``model.backbone``.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.resnet import BasicBlock, Bottleneck, conv3x3, init_like_torchvision, make_stage

__all__ = ["BACKBONES", "BackboneSpec", "DeepLabV3", "ResNetBackbone", "DeepLabHead", "create_segmenter",
           "load_backbone_weights", "segmenter_parameter_count"]

ATROUS_RATES = (12, 24, 36)  # torchvision's DeepLabHead default
ASPP_CHANNELS = 256  # width of every ASPP branch, of its projection and of the head's 3x3 conv
_IMAGENET_CLASSES = 1000  # the fc of torchvision's ResNet, built only to consume the RNG as torchvision does


@dataclass(frozen=True)
class BackboneSpec:
    """One DeepLabV3 backbone: a ResNet of ``block`` ("bottleneck" or "basic") with ``layers`` blocks per stage."""

    block: str  # "bottleneck" (1x1-3x3-1x1, 4x expansion) or "basic" (3x3-3x3)
    layers: tuple[int, int, int, int]  # blocks in layer1..layer4
    layout: str  # whose layout and initialisation this is


BACKBONES: dict[str, BackboneSpec] = {
    "resnet101": BackboneSpec("bottleneck", (3, 4, 23, 3), "torchvision deeplabv3_resnet101 (official)"),
    "resnet50": BackboneSpec("bottleneck", (3, 4, 6, 3), "torchvision deeplabv3_resnet50"),
    "ddpmseg_resnet18": BackboneSpec("basic", (2, 2, 2, 2), "ddpmseg's own: dilated BasicBlock ResNet-18"),
}


_BLOCKS: dict[str, type[Bottleneck] | type[BasicBlock]] = {"bottleneck": Bottleneck, "basic": BasicBlock}


class ResNetBackbone(nn.Module):
    """torchvision's ResNet with replace_stride_with_dilation=[False, True, True], cut after layer4.

    Input (B, 3, H, W) -> layer4's map (B, out_channels, ceil(H / 8), ceil(W / 8)) (output stride 8: the strides of
    layer3 and layer4 are replaced by dilation 2 and 4; each of those stages' first block keeps the previous
    dilation, as torchvision's ``_make_layer``)."""

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        block = _BLOCKS[spec.block]
        self.in_channels, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, spec.layers[0])
        self.layer2 = self._make_layer(block, 128, spec.layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, spec.layers[2], stride=2, dilate=True)
        self.layer4 = self._make_layer(block, 512, spec.layers[3], stride=2, dilate=True)
        self.out_channels = 512 * block.expansion
        # torchvision builds the classifier's fc here (its default init draws from the RNG) and drops it in
        # IntermediateLayerGetter; built and dropped the same way so that a seed gives torchvision's weights
        nn.Linear(self.out_channels, _IMAGENET_CLASSES)
        init_like_torchvision(self)

    def _make_layer(self, block: type[Bottleneck] | type[BasicBlock], width: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        stage = make_stage(block, self.in_channels, width, blocks, stride, previous_dilation, self.dilation)
        self.in_channels = width * block.expansion
        return stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ASPPPooling(nn.Sequential):
    """Image pooling branch: global average -> 1x1 conv -> BN -> ReLU, broadcast back to the map's size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and the pooling branch, concatenated and projected."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = ASPP_CHANNELS):
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                                   nn.BatchNorm2d(out_channels), nn.ReLU())]
        for rate in atrous_rates:
            branches.append(nn.Sequential(conv3x3(in_channels, out_channels, dilation=rate),
                                          nn.BatchNorm2d(out_channels), nn.ReLU()))
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """ASPP -> 3x3 conv 256 -> BN -> ReLU -> 1x1 conv to ``num_classes`` logits (torchvision's DeepLabHead)."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = ATROUS_RATES):
        super().__init__(ASPP(in_channels, atrous_rates),
                         nn.Conv2d(ASPP_CHANNELS, ASPP_CHANNELS, 3, padding=1, bias=False),
                         nn.BatchNorm2d(ASPP_CHANNELS), nn.ReLU(),
                         nn.Conv2d(ASPP_CHANNELS, num_classes, 1))


class DeepLabV3(nn.Module):
    """Backbone + DeepLabHead; forward (B, 3, H, W) -> {'out': logits (B, num_classes, H, W)}."""

    def __init__(self, backbone: ResNetBackbone, classifier: DeepLabHead):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = None  # torchvision's attribute; aux_loss=None builds none (nothing in the state dict)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        logits = self.classifier(self.backbone(x))
        return OrderedDict(out=F.interpolate(logits, size=size, mode="bilinear", align_corners=False))


def _spec(backbone: str) -> BackboneSpec:
    try:
        return BACKBONES[backbone]
    except KeyError:
        raise ValueError(f"unknown segmenter backbone {backbone!r}; expected one of {sorted(BACKBONES)}") from None


def create_segmenter(backbone: str, num_classes: int, *, device: str | torch.device | None = None) -> DeepLabV3:
    """A randomly initialised DeepLabV3 with ``num_classes`` output channels on ``backbone`` (a key of BACKBONES).

    device: where the parameters are created ("meta": shapes only, no memory). The initialisation draws from the
    global torch RNG in torchvision's order: seed it (``torch.manual_seed``) for reproducible weights."""
    spec = _spec(backbone)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"segmenter num_classes: expected an integer >= 1, got {num_classes!r}")
    with torch.device(device) if device is not None else nullcontext():
        resnet = ResNetBackbone(spec)
        return DeepLabV3(resnet, DeepLabHead(resnet.out_channels, num_classes))


def segmenter_parameter_count(backbone: str, num_classes: int) -> int:
    """Trainable parameters of ``create_segmenter(backbone, num_classes)`` (counted on the meta device)."""
    model = create_segmenter(backbone, num_classes, device="meta")
    return sum(p.numel() for p in model.parameters())


def load_backbone_weights(model: DeepLabV3, state_dict: Mapping[str, torch.Tensor], what: str) -> list[str]:
    """Load an ImageNet classification ResNet's state dict (torchvision's layout: ``conv1.weight``, ``layer4.2.bn3
    .running_var`` ...; a ``backbone.`` prefix is accepted) into ``model.backbone``; ``what`` names it in errors.

    Every backbone tensor must be present with its shape; the classifier's ``fc.*`` is unused. Returns the unused
    keys. Raises ValueError naming the missing, unexpected or mis-shaped keys."""
    stripped = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in state_dict.items()}
    unused = sorted(k for k in stripped if k.startswith("fc."))
    wanted = {k: v for k, v in stripped.items() if not k.startswith("fc.")}
    expected = model.backbone.state_dict()
    missing = sorted(set(expected) - set(wanted))
    unexpected = sorted(set(wanted) - set(expected))
    shapes = sorted(f"{k}: {tuple(wanted[k].shape)} (expected {tuple(expected[k].shape)})"
                    for k in set(wanted) & set(expected) if tuple(wanted[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"shapes differ: {shapes[:3]}" if shapes else ""]
        raise ValueError(f"{what} is not a ResNet backbone state dict for this segmenter: "
                         f"{'; '.join(p for p in parts if p)}. Expected torchvision's classification ResNet layout "
                         f"(conv1.weight, bn1.*, layer1.0.conv1.weight, ...) of the same depth")
    model.backbone.load_state_dict(wanted, strict=True)
    return unused

"""ResNet pieces in torchvision's module layout, shared by DeepLabV3's backbone (pipeline/deeplab.py) and the SwAV
extractor's ResNet (pipeline/extractors/swav_network.py): the blocks, a stage of blocks, torchvision's init.

A stage builds its projection (``downsample``) before its first block, as torchvision's ``_make_layer`` does; each
block registers it last, so state-dict keys and ``modules()`` order are torchvision's."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bottleneck", "BasicBlock", "conv3x3", "make_stage", "init_like_torchvision"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: stride on the 3x3): 1x1 -> 3x3 (stride, dilation) -> 1x1 (4x width)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock layout (3x3 -> 3x3), here also dilated (both convs at the block's dilation)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, width, stride, dilation)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def make_stage(block: type[Bottleneck] | type[BasicBlock], in_channels: int, width: int, blocks: int,
               stride: int = 1, first_dilation: int = 1, dilation: int = 1) -> nn.Sequential:
    """torchvision's ``_make_layer``: the first block takes the stride (and the previous stage's dilation) and,
    where the shape changes, a 1x1 projection with batch norm; the others run at ``dilation``."""
    out_channels = width * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(out_channels))
    layers = [block(in_channels, width, stride, downsample, first_dilation)]
    layers += [block(out_channels, width, dilation=dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


@torch.no_grad()
def init_like_torchvision(network: nn.Module) -> None:
    """torchvision's ResNet initialisation: kaiming-normal convs (fan out, relu), batch norms weight 1 and bias 0."""
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)

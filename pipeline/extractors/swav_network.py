"""The ResNet of the `swav` / `swav_w2` extractors (pipeline/extractors/swav.py, which documents the official
extraction): written to torchvision's / swav's state-dict layout. Imported where the network is built or run (it
imports torch): validating a config of kind swav needs none of it."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.extractors.base import LoadReport, load_partial_state_dict, read_checkpoint
from pipeline.extractors.swav import EXPANSION
from pipeline.resnet import Bottleneck, init_like_torchvision, make_stage

__all__ = ["ResNet", "load_swav_checkpoint"]


class ResNet(nn.Module):
    """A Bottleneck ResNet without its classifier: stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool) and four stages
    of inner widths ``base, 2 base, 4 base, 8 base`` (``base = width_per_group * widen``), the first block of
    stages 2-4 with stride 2."""

    def __init__(self, layers: list[int], widen: int = 1, width_per_group: int = 64):
        super().__init__()
        base = width_per_group * widen
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = base
        for stage, blocks in enumerate(layers):
            width = base * 2 ** stage
            setattr(self, f"layer{stage + 1}", make_stage(Bottleneck, in_channels, width, blocks, 1 if stage == 0 else 2))
            in_channels = width * EXPANSION
        init_like_torchvision(self)  # torchvision's / swav's initialisation

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def bottlenecks(self) -> list[nn.Module]:
        """Every Bottleneck in forward order: the hookable layers."""
        return [block for stage in self.stages() for block in stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return x


def load_swav_checkpoint(model: ResNet, path: str) -> LoadReport:
    """The official SwAV checkpoint ``{"state_dict": {"module.<key>": tensor}}`` into ``model``: the ``module.``
    prefix (DataParallel) removed, loaded non-strictly as the official extractor does (the projection head and
    prototypes of the SwAV training model and any ``fc`` are unused), with the report of what did not load."""
    state = read_checkpoint(path, "state_dict")
    stripped = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    return load_partial_state_dict(model, stripped, str(path))

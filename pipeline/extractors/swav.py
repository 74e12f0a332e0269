"""`swav` / `swav_w2`: the paper's SwAV baselines, a ResNet-50 (as facebookresearch/swav's hubconf: torchvision's
ResNet-50) and a ResNet-50w2 (swav's own ResNet with widen=2: every width doubled, stem included), ``fc`` removed.

The official extraction (src/feature_extractors.py, FeatureExtractorSwAV / SwAVw2): hooks on every other
Bottleneck of each stage (``layer[::2]`` of layer1..layer4: 9 blocks), saving the blocks' *inputs*
(experiments/*/swav*.json: ``input_activations: true``): 64+256+256+512+512+1024+1024+1024+2048 = 6720 channels
for ResNet-50, twice that (13440) for ResNet-50w2. Layers here are numbered over ALL Bottlenecks in forward
order (layer1.0 = 0 ... layer4.2 = 15), so the official set is 0, 2, 3, 5, 7, 9, 11, 13, 15.

Checkpoints: ``{"state_dict": ...}`` saved from a DataParallel model (keys ``module.conv1.weight`` ...), loaded
``strict=False`` as the official code does; the keys that did not load are reported and a checkpoint that loads
nothing is an error. swav's ResNet pads its input by 1 before a 7x7 stride-2 conv with padding 2: the same
values as torchvision's padding 3 (zeros either way), so both kinds use the torchvision stem here.

The network (pipeline/extractors/swav_network.py, imported where it is built) is written to torchvision's /
swav's state-dict layout (``conv1 bn1 layerN.i.{conv1..3, bn1..3, downsample.0, downsample.1}``); a test checks a
state dict in that layout loads with nothing missing or unused.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from pipeline.extractors.base import ActivationHooks, FeatureExtractor, LoadReport, imagenet_input

if TYPE_CHECKING:  # the network (pipeline/extractors/swav_network.py) and torch: imported where it is built or run
    import torch

    from pipeline.extractors.swav_network import ResNet

__all__ = ["SwAVExtractor", "SwAVw2Extractor", "OFFICIAL_SWAV_FLAGS", "official_swav_blocks"]

OFFICIAL_SWAV_FLAGS: dict[str, Any] = {
    "image_size": 256,  # the data set's resolution (dim[0] of the experiment file)
    "widen": 1,  # width multiplier of every stage and the stem (swav's ResNet-50w2: 2)
    "width_per_group": 64,  # channels of the stem at widen 1
    "layers": "3,4,6,3",  # Bottlenecks per stage (ResNet-50)
}
EXPANSION = 4  # a Bottleneck's output has 4x its inner width


def _layers(flags: Mapping[str, Any]) -> list[int]:
    try:
        layers = [int(v) for v in str(flags["layers"]).split(",")]
    except ValueError:
        raise ValueError(f"model.flags.layers: expected four comma-separated block counts like '3,4,6,3', "
                         f"got {flags['layers']!r}") from None
    if len(layers) != 4 or min(layers) < 1:
        raise ValueError(f"model.flags.layers: expected four block counts >= 1 like '3,4,6,3', got {flags['layers']!r}")
    return layers


def official_swav_blocks(layers: list[int]) -> list[int]:
    """Layer numbers of ``layer[::2]`` for each stage (the official hooks), over all Bottlenecks in order."""
    blocks, start = [], 0
    for count in layers:
        blocks += list(range(start, start + count, 2))
        start += count
    return blocks


class SwAVExtractor(FeatureExtractor):
    """Bottlenecks of a SwAV ResNet-50; layer i is the i-th Bottleneck in forward order."""

    kind = "swav"
    widen = 1

    def __init__(self, flags: Mapping[str, Any]):
        super().__init__(flags)
        self.layers = _layers(self.flags)
        if self.flags["widen"] < 1 or self.flags["width_per_group"] < 1 or self.flags["image_size"] < 32:
            raise ValueError(f"model.flags: widen and width_per_group must be >= 1 and image_size >= 32, "
                             f"got {self.flags}")
        self.model: ResNet | None = None
        self.load_report: LoadReport | None = None

    @classmethod
    def default_flags(cls) -> dict[str, Any]:
        return {**OFFICIAL_SWAV_FLAGS, "widen": cls.widen}

    @classmethod
    def feature_defaults(cls, flags: Mapping[str, Any]) -> dict[str, Any]:
        return {"blocks": official_swav_blocks(_layers({**cls.default_flags(), **flags})), "input_activations": True}

    def layer_description(self) -> str:
        return f"{self.num_layers()} Bottlenecks of layer1..layer4 ({self.flags['layers']})"

    def num_layers(self) -> int:
        return sum(self.layers)

    def layer_names(self) -> list[str]:
        return [f"layer{s + 1}.{i}" for s, count in enumerate(self.layers) for i in range(count)]

    def layer_shapes(self, blocks: list[int], input_activations: bool = False) -> dict[int, tuple[int, int, int]]:
        base = int(self.flags["width_per_group"]) * int(self.flags["widen"])
        side = self.image_size
        side = (side + 2 * 3 - 7) // 2 + 1  # conv1 7x7/2, padding 3
        side = (side + 2 - 3) // 2 + 1  # max pool 3x3/2, padding 1
        shapes, index, channels = {}, 0, base
        for stage, count in enumerate(self.layers):
            width = base * 2 ** stage
            for i in range(count):
                in_side = side
                if stage > 0 and i == 0:
                    side = (side + 2 - 3) // 2 + 1  # the 3x3/2 conv of the stage's first block
                shapes[index] = (channels, in_side, in_side) if input_activations else (width * EXPANSION, side, side)
                channels = width * EXPANSION
                index += 1
        return {b: shapes[b] for b in sorted(blocks)}

    def input_transform(self, x: torch.Tensor) -> torch.Tensor:
        return imagenet_input(x)

    def build(self, device: torch.device, checkpoint: str | None, init_seed: int = 0) -> None:
        import torch

        from pipeline.extractors.swav_network import ResNet, load_swav_checkpoint

        torch.manual_seed(init_seed)
        model = ResNet(self.layers, int(self.flags["widen"]), int(self.flags["width_per_group"]))
        if checkpoint is not None:
            self.load_report = load_swav_checkpoint(model, checkpoint)
        self.model = model.to(device).eval()

    def forward(self, x: torch.Tensor, t: int, noise: torch.Tensor | None, blocks: list[int],
                input_activations: bool = False) -> dict[int, torch.Tensor]:
        import torch

        if self.model is None:
            raise RuntimeError("SwAVExtractor.forward before build()")
        with torch.no_grad():
            device = next(self.model.parameters()).device
            x = self.input_transform(x.to(device))
            bottlenecks = self.model.bottlenecks()
            with ActivationHooks({b: bottlenecks[b] for b in blocks}, input_activations) as hooks:
                acts = hooks.run(self.model, x)
            return {b: acts[b].cpu() for b in sorted(blocks)}


class SwAVw2Extractor(SwAVExtractor):
    """Bottlenecks of a SwAV ResNet-50w2 (every width doubled)."""

    kind = "swav_w2"
    widen = 2

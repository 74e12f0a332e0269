"""The feature extractor kinds as plain data (no torch import): their names, where each kind's class lives, and
each kind's official feature settings at its official flags (what `ddpmseg config presets` lists).
tests/test_extractors.py checks that OFFICIAL_SETTINGS equals what the extractor classes report
(pipeline.extractors.official_settings)."""
from __future__ import annotations

from typing import Any

__all__ = ["KINDS", "EXTRACTOR_CLASSES", "OFFICIAL_SETTINGS"]

#: kind -> (module, class name) of its FeatureExtractor; a kind's module is imported when the kind is first used
EXTRACTOR_CLASSES: dict[str, tuple[str, str]] = {
    "ddpm": ("pipeline.extractors.ddpm", "DDPMExtractor"),
    "rgb": ("pipeline.extractors.rgb", "RGBExtractor"),
    "mae": ("pipeline.extractors.mae", "MAEExtractor"),
    "swav": ("pipeline.extractors.swav", "SwAVExtractor"),
    "swav_w2": ("pipeline.extractors.swav", "SwAVw2Extractor"),
}
KINDS: tuple[str, ...] = tuple(EXTRACTOR_CLASSES)

_SWAV_BLOCKS = [0, 2, 3, 5, 7, 9, 11, 13, 15]  # every other Bottleneck (official_swav_blocks)
_SWAV_LAYERS = ["layer1.0", "layer1.2", "layer2.0", "layer2.2", "layer3.0", "layer3.2", "layer3.4", "layer4.0",
                "layer4.2"]
#: kind -> official steps, blocks (layer numbers and names), input_activations, channels per pixel (all steps)
#: and a preset's default checkpoint ('<dataset>': the preset's checkpoint name; None: no weights)
OFFICIAL_SETTINGS: dict[str, dict[str, Any]] = {
    "ddpm": {"steps": [50, 150, 250], "blocks": [5, 6, 7, 8, 12], "input_activations": False,
             "layers": ["output_blocks.5", "output_blocks.6", "output_blocks.7", "output_blocks.8",
                        "output_blocks.12"],
             "channels": 8448, "checkpoint": "checkpoints/ddpm/<dataset>.pt"},
    "rgb": {"steps": [0], "blocks": [0], "input_activations": False, "layers": ["rgb+yx"], "channels": 5,
            "checkpoint": None},
    "mae": {"steps": [0], "blocks": list(range(12, 24)), "input_activations": False,
            "layers": [f"blocks.{i}" for i in range(12, 24)], "channels": 12288,
            "checkpoint": "checkpoints/mae/<dataset>.pth"},
    "swav": {"steps": [0], "blocks": _SWAV_BLOCKS, "input_activations": True, "layers": _SWAV_LAYERS,
             "channels": 6720, "checkpoint": "checkpoints/swav/<dataset>.pth"},
    "swav_w2": {"steps": [0], "blocks": _SWAV_BLOCKS, "input_activations": True, "layers": _SWAV_LAYERS,
                "channels": 13440, "checkpoint": "checkpoints/swav_w2/<dataset>.pth"},
}

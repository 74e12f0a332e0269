"""Feature extractors: one interface (`FeatureExtractor`), one named factory (`create_extractor`).

    kind      network                                   hookable layers (numbered in forward order)
    ddpm      guided-diffusion UNet at timesteps t       decoder blocks output_blocks[i]
    rgb       none: colour + (y, x) of each pixel         one map, layer 0
    mae       MAE ViT-L/8 encoder (256x256)              encoder blocks blocks[i]
    swav      SwAV ResNet-50                             Bottlenecks layer1.0 ... layer4.2
    swav_w2   SwAV ResNet-50w2                           Bottlenecks layer1.0 ... layer4.2

A new kind is one module with a `FeatureExtractor` subclass, registered in `kinds.EXTRACTOR_CLASSES` (with its
official settings in `kinds.OFFICIAL_SETTINGS`).
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from pipeline.extractors.base import ExtractorError, FeatureExtractor, LoadReport
from pipeline.extractors.kinds import EXTRACTOR_CLASSES, KINDS, OFFICIAL_SETTINGS

__all__ = ["EXTRACTORS", "KINDS", "OFFICIAL_SETTINGS", "ExtractorError", "FeatureExtractor", "LoadReport",
           "create_extractor", "extractor_class", "official_settings"]


def extractor_class(kind: str) -> type[FeatureExtractor]:
    """The extractor class registered under ``kind`` (its module imported on first use: mae and swav import
    torch, ddpm and rgb only when they build or run); ValueError naming the known kinds otherwise."""
    try:
        module, name = EXTRACTOR_CLASSES[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model.kind {kind!r}; expected one of {list(KINDS)}") from None
    return getattr(importlib.import_module(module), name)


def __getattr__(name: str) -> Any:
    """``EXTRACTORS``: kind -> class, for every kind (imports every kind's module)."""
    if name == "EXTRACTORS":
        return {kind: extractor_class(kind) for kind in KINDS}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_extractor(kind: str, flags: Mapping[str, Any] | None = None) -> FeatureExtractor:
    """The extractor of ``kind`` for these model flags (the official ones where a flag is left out); nothing
    is built yet (``build`` makes the network)."""
    return extractor_class(kind)(flags or {})


def official_settings(kind: str) -> dict[str, Any]:
    """A kind's official feature settings at its official flags: steps, blocks (layer numbers and names),
    input_activations, channels per pixel (all steps) and the default checkpoint of a preset."""
    cls = extractor_class(kind)
    extractor = cls({})
    settings = {"steps": [0], "blocks": [0], "input_activations": False, **cls.feature_defaults({}),
                **cls.fixed_features()}
    shapes = extractor.layer_shapes(settings["blocks"], settings["input_activations"])
    names = extractor.layer_names()
    return {**settings, "layers": [names[b] for b in settings["blocks"]],
            "channels": len(settings["steps"]) * sum(c for c, _, _ in shapes.values()),
            "checkpoint": cls.default_checkpoint("<dataset>.pt") if cls.uses_weights else None}

"""Feature geometries: which UNet, which decoder blocks, which timesteps -> which native map shapes.

`REAL` is the paper's setting (the official 256x256 UNet, blocks 5, 6, 7, 8, 12, steps 50, 150, 250:
per step 1024x32², 512x32², 512x32², 512x64², 256x128², D = 3 x 2816 = 8448). Shapes are computed by
`pipeline.backbone.block_shapes` on a UNet built on the meta device (no memory, no weights), so they are the
shapes the real backbone produces.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from pipeline import backbone as bb
from pipeline.config import OFFICIAL_FLAGS


def _overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags that differ from the official ones (what a config's model.flags holds)."""
    return {k: v for k, v in flags.items() if OFFICIAL_FLAGS.get(k) != v}


@dataclass(frozen=True)
class Geometry:
    """A UNet (flags as overrides of the official flags) with the hooked blocks and timesteps."""

    name: str
    flags: dict[str, Any] = field(hash=False)
    blocks: tuple[int, ...]
    steps: tuple[int, ...]

    @property
    def full_flags(self) -> dict[str, Any]:
        return {**OFFICIAL_FLAGS, **self.flags}

    @property
    def image_size(self) -> int:
        return int(self.full_flags["image_size"])

    @cached_property
    def block_shapes(self) -> dict[int, tuple[int, int, int]]:
        """{block: (C, h, w)} of one image at one timestep (a meta-device UNet: no memory, no weights)."""
        from guided_diffusion.script_util import create_model_and_diffusion

        with torch.device("meta"):
            model, _ = create_model_and_diffusion(**bb.complete_flags(self.full_flags))
        return bb.block_shapes(model, self.image_size, list(self.blocks))

    @property
    def step_dim(self) -> int:
        """Channels of one timestep (2816 for REAL)."""
        return sum(c for c, _, _ in self.block_shapes.values())

    @property
    def feature_dim(self) -> int:
        """D: length of a pixel's feature vector over all steps (8448 for REAL)."""
        return self.step_dim * len(self.steps)

    @property
    def values_per_step(self) -> int:
        """Native-resolution values stored per image and timestep (8,388,608 for REAL)."""
        return sum(c * h * w for c, h, w in self.block_shapes.values())

    @property
    def upsampled_fp32_bytes_per_step(self) -> int:
        """What the official path holds per image and timestep: size² x step_dim float32."""
        return self.image_size ** 2 * self.step_dim * 4

    def with_steps(self, steps: tuple[int, ...]) -> "Geometry":
        return Geometry(self.name, self.flags, self.blocks, tuple(steps))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "image_size": self.image_size, "blocks": list(self.blocks),
                "steps": list(self.steps), "block_shapes": {str(b): list(s) for b, s in self.block_shapes.items()},
                "feature_dim": self.feature_dim}


REAL = Geometry("official 256x256 UNet", {}, (5, 6, 7, 8, 12), (50, 150, 250))

TOY = Geometry("tiny 32x32 UNet (TINY_MODEL_FLAGS)", _overrides(bb.TINY_MODEL_FLAGS), (2, 3, 4), (50, 150))

# The CPU-sized UNet of the extraction benchmark: the official 256x256 network itself (552.8 M parameters, the
# same layers, channels and attention levels: attention_resolutions scaled with the input) run on 64x64 inputs.
# Every conv does 1/16 of its work and every hooked block writes 1/16 of its values, so the float16 written per
# second of forward is the real backbone's (measured on 2 cores: 1.0 MB per image and step, ~0.6 s per image
# forward, ~1.8 MB/s, against 16.8 MB per ~20 s forward, ~0.84 MB/s, at 256x256; attention costs relatively
# less at 64x64).
OFFICIAL_AT_64 = Geometry(
    "official UNet on 64x64 inputs (552.8 M parameters)",
    _overrides({**OFFICIAL_FLAGS, "image_size": 64, "channel_mult": "1,1,2,2,4,4", "attention_resolutions": "8,4,2"}),
    (5, 6, 7, 8, 12), (50, 150, 250))

# A stress geometry for extraction: 64x64, 4 levels, 19.4 M parameters, ~0.06 s per image forward on 2 cores,
# 1.5 MB of float16 per image and step: ~25 MB written per second of forward, ~25x the real backbone's rate on
# the same CPU (the rate a GPU forward of the real backbone would write at is higher still).
MID_EXTRACTION = Geometry(
    "mid 64x64 UNet (19.4 M parameters)",
    _overrides({**bb.TINY_MODEL_FLAGS, "image_size": 64, "num_channels": 64, "channel_mult": "1,2,2,4",
                "num_res_blocks": 2, "attention_resolutions": "16,8", "num_head_channels": 32}),
    (2, 3, 4, 5, 8), (50, 150, 250))

TOY_EXTRACTION = Geometry("tiny 32x32 UNet (TINY_MODEL_FLAGS)", _overrides(bb.TINY_MODEL_FLAGS), (2, 3, 4), (50,))

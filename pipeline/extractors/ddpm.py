"""`ddpm`: a guided-diffusion UNet run on a noised image; the hooked layers are its decoder blocks
(``model.output_blocks[i]``). The numerics live in pipeline/backbone.py; this module is its extractor face."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from pipeline.extractors.base import FeatureExtractor
from pipeline.model_flags import OFFICIAL_MODEL_FLAGS
from pipeline.presets import PAPER_BLOCKS, PAPER_STEPS

if TYPE_CHECKING:  # torch and guided_diffusion (pipeline.backbone) are imported where the UNet is built or run
    import torch

__all__ = ["DDPMExtractor", "num_output_blocks"]

_DEFAULT_CHANNEL_MULT = {512: 7, 256: 6, 128: 5, 64: 4}  # levels guided-diffusion builds for each image_size


def num_output_blocks(flags: Mapping[str, Any]) -> int:
    """Number of decoder blocks (`model.output_blocks`) the flags build, without building the model."""
    mult = flags.get("channel_mult", "")
    if mult:
        levels = len(str(mult).split(","))
    else:
        size = int(flags["image_size"])
        if size not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(f"model.flags.image_size {size} needs an explicit channel_mult "
                             f"(defaults exist for {sorted(_DEFAULT_CHANNEL_MULT)})")
        levels = _DEFAULT_CHANNEL_MULT[size]
    return levels * (int(flags["num_res_blocks"]) + 1)


class DDPMExtractor(FeatureExtractor):
    """Decoder blocks of a guided-diffusion UNet at timesteps t: ``x_t = q_sample(x_0, t, noise)``, one UNet
    forward per (batch, t). Flags: guided-diffusion's (the official 256x256 ones by default)."""

    kind = "ddpm"
    uses_timesteps = True

    def __init__(self, flags: Mapping[str, Any]):
        super().__init__(flags)
        self.model = self.diffusion = None

    @classmethod
    def default_flags(cls) -> dict[str, Any]:
        return dict(OFFICIAL_MODEL_FLAGS)

    @classmethod
    def feature_defaults(cls, flags: Mapping[str, Any]) -> dict[str, Any]:
        return {"steps": list(PAPER_STEPS), "blocks": list(PAPER_BLOCKS)}

    @classmethod
    def default_checkpoint(cls, dataset_checkpoint: str) -> str:
        return f"checkpoints/ddpm/{dataset_checkpoint}"

    def check_features(self, steps: list[int], blocks: list[int]) -> None:
        super().check_features(steps, blocks)
        n_steps = int(self.flags["diffusion_steps"])
        for t in steps:
            if not 0 <= t < n_steps:
                raise ValueError(f"features.steps: timestep {t} is outside [0, {n_steps}) "
                                 f"(model.flags.diffusion_steps)")

    def layer_description(self) -> str:
        return f"{self.num_layers()} output blocks for image_size {self.image_size}"

    def num_layers(self) -> int:
        return num_output_blocks(self.flags)

    def layer_names(self) -> list[str]:
        return [f"output_blocks.{i}" for i in range(self.num_layers())]

    def layer_shapes(self, blocks: list[int], input_activations: bool = False) -> dict[int, tuple[int, int, int]]:
        import torch
        from guided_diffusion.script_util import create_model_and_diffusion

        from pipeline import backbone as bb

        with torch.device("meta"):  # structure only: no memory, no weights
            model, _ = create_model_and_diffusion(**bb.complete_flags(self.flags))
        return bb.block_shapes(model, self.image_size, list(blocks), input_activations)

    def build(self, device: torch.device, checkpoint: str | None, init_seed: int = 0) -> None:
        import torch

        from pipeline import backbone as bb

        torch.manual_seed(init_seed)
        self.model, self.diffusion = bb.build_backbone(self.flags, device)
        if checkpoint is not None:
            bb.load_checkpoint(self.model, checkpoint)
        else:
            bb.redraw_zero_initialised_convs(self.model)

    def forward(self, x: torch.Tensor, t: int, noise: torch.Tensor | None, blocks: list[int],
                input_activations: bool = False) -> dict[int, torch.Tensor]:
        if self.model is None:
            raise RuntimeError("DDPMExtractor.forward before build()")
        from pipeline import backbone as bb

        # maps stay on the model's device: the extraction stage checks and casts them to float16 there (on a GPU,
        # half the copy to the host); on the CPU this is the same as a host copy
        return bb.extract_blocks(self.model, self.diffusion, x, t, noise, list(blocks), input_activations,
                                 to_host=False)

    def fingerprint(self, checkpoint_sha256: str | None, init_seed: int = 0) -> dict[str, Any]:
        # no "kind" entry: the key layout of stores written before extractors existed
        weights = ({"checkpoint_sha256": checkpoint_sha256} if checkpoint_sha256 is not None
                   else {"random_init_seed": init_seed, "zero_convs_redrawn": True})
        return {"weights": weights, "flags": dict(self.flags)}

    def tag_name(self, checkpoint: str | None, init_seed: int) -> str:
        from pathlib import Path

        return Path(checkpoint).stem if checkpoint else f"random{init_seed}"

    def feature_spec(self, features: Any) -> dict[str, Any]:
        return {"share_noise": features.share_noise, "noise_seed": features.seed,
                "noise_generator": features.noise_generator, "input_activations": features.input_activations,
                "image_size": self.image_size}

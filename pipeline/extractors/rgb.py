"""`rgb`: the no-backbone baseline, each pixel's colour and (y, x) coordinates as one map "layer" 0."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.extractors.base import FeatureExtractor
from pipeline.model_flags import OFFICIAL_MODEL_FLAGS

if TYPE_CHECKING:  # torch is imported where the maps are made
    import torch

__all__ = ["RGBExtractor", "rgb_features"]


def rgb_features(x0: torch.Tensor) -> torch.Tensor:
    """The rgb baseline's map: (B, 3, H, W) images in [-1, 1] -> (B, 5, H, W): r, g, b, y, x (coordinates in [-1, 1])."""
    import torch

    b, _, h, w = x0.shape
    ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x0.float(), ys, xs], dim=1)


class RGBExtractor(FeatureExtractor):
    """What a pixel MLP sees without a backbone. Accepts the ddpm flags (only image_size is read), so a ddpm
    config becomes its rgb baseline by changing the kind."""

    kind = "rgb"
    uses_weights = False

    @classmethod
    def default_flags(cls) -> dict[str, Any]:
        return dict(OFFICIAL_MODEL_FLAGS)

    @classmethod
    def fixed_features(cls) -> dict[str, Any]:
        return {"steps": [0], "blocks": [0]}

    def num_layers(self) -> int:
        return 1

    def layer_names(self) -> list[str]:
        return ["rgb+yx"]

    def layer_shapes(self, blocks: list[int], input_activations: bool = False) -> dict[int, tuple[int, int, int]]:
        return {0: (5, self.image_size, self.image_size)}

    def build(self, device: torch.device, checkpoint: str | None, init_seed: int = 0) -> None:
        pass  # nothing to build

    def forward(self, x: torch.Tensor, t: int, noise: torch.Tensor | None, blocks: list[int],
                input_activations: bool = False) -> dict[int, torch.Tensor]:
        return {0: rgb_features(x.cpu())}

    def fingerprint(self, checkpoint_sha256: str | None, init_seed: int = 0) -> dict[str, Any]:
        return {"kind": "rgb", "image_size": self.image_size}

    def tag_name(self, checkpoint: str | None, init_seed: int) -> str:
        return "rgb"

    def feature_spec(self, features: Any) -> dict[str, Any]:
        # the noise entries do not change rgb maps; kept so stores written before extractors existed stay valid
        return {"share_noise": features.share_noise, "noise_seed": features.seed,
                "noise_generator": features.noise_generator, "input_activations": features.input_activations,
                "image_size": self.image_size}

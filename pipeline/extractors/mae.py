"""`mae`: the paper's MAE baseline, a ViT-L/8 masked autoencoder at 256x256 (the official extractor's
``MaskedAutoencoderViT(img_size=256, patch_size=8, embed_dim=1024, depth=24, num_heads=16, decoder 512/8/16,
mlp_ratio=4, LayerNorm eps 1e-6)``); the hooked layers are the encoder blocks.

The official extraction (src/feature_extractors.py, FeatureExtractorMAE): ``forward_encoder(x, mask_ratio=0)``,
hooks on the last ``num_blocks`` (12) encoder blocks, and of each block's tokens ``(B, 1 + L, D)``: the class
token dropped, the patches put back in image order with ``ids_restore``, reshaped to ``(B, D, sqrt L, sqrt L)``.
With mask ratio 0 every patch is kept but the official encoder visits them in a random order (``torch.rand``);
self-attention, LayerNorm and the MLP treat tokens alike, so the un-shuffled maps do not depend on that order
(up to float summation order). The extractor keeps the patches in image order, so the maps are deterministic as
the feature cache needs; ``MaskedAutoencoderViT.encode`` takes a permutation, and a test checks that a random
order, un-shuffled with ``ids_restore``, gives the same maps.

The network (pipeline/extractors/mae_network.py, imported where it is built) is written to the official
checkpoint's state-dict layout (``{"model": state_dict}`` of the MAE training script: encoder, decoder and the
fixed sin-cos position embeddings); a test loads a state dict with every official key and checks nothing is
missing or left over. ``norm_pix_loss`` only changes the training
loss and has no parameters, so it is not a flag here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from pipeline.extractors.base import ActivationHooks, FeatureExtractor, imagenet_input

if TYPE_CHECKING:  # the network (pipeline/extractors/mae_network.py) and torch: imported where it is built or run
    import torch

    from pipeline.extractors.mae_network import MaskedAutoencoderViT

__all__ = ["MAEExtractor", "OFFICIAL_MAE_FLAGS", "OFFICIAL_NUM_BLOCKS"]

OFFICIAL_NUM_BLOCKS = 12  # FeatureExtractorMAE(num_blocks=12): the last 12 encoder blocks are hooked
OFFICIAL_MAE_FLAGS: dict[str, Any] = {
    "image_size": 256,  # img_size
    "patch_size": 8,
    "embed_dim": 1024,
    "depth": 24,
    "num_heads": 16,
    "decoder_embed_dim": 512,
    "decoder_depth": 8,
    "decoder_num_heads": 16,
    "mlp_ratio": 4.0,
}
class MAEExtractor(FeatureExtractor):
    """Encoder blocks of an MAE ViT; layer i is ``blocks[i]``. Official: the last 12 of 24 (12 x 1024 = 12288
    channels at 32x32 for 256x256 inputs)."""

    kind = "mae"

    def __init__(self, flags: Mapping[str, Any]):
        super().__init__(flags)
        f = self.flags
        if f["image_size"] % f["patch_size"] or f["embed_dim"] % f["num_heads"] or \
                f["decoder_embed_dim"] % f["decoder_num_heads"] or min(f["depth"], f["patch_size"]) < 1:
            raise ValueError(f"model.flags: an MAE needs image_size divisible by patch_size and embed dims divisible "
                             f"by the head counts, got {f}")
        self.model: MaskedAutoencoderViT | None = None

    @classmethod
    def default_flags(cls) -> dict[str, Any]:
        return dict(OFFICIAL_MAE_FLAGS)

    @classmethod
    def feature_defaults(cls, flags: Mapping[str, Any]) -> dict[str, Any]:
        depth = int(flags.get("depth", OFFICIAL_MAE_FLAGS["depth"]))
        return {"blocks": list(range(max(0, depth - OFFICIAL_NUM_BLOCKS), depth)), "input_activations": False}

    def layer_description(self) -> str:
        return f"{self.num_layers()} encoder blocks"

    def num_layers(self) -> int:
        return int(self.flags["depth"])

    def layer_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(self.num_layers())]

    def layer_shapes(self, blocks: list[int], input_activations: bool = False) -> dict[int, tuple[int, int, int]]:
        grid = self.image_size // int(self.flags["patch_size"])
        return {b: (int(self.flags["embed_dim"]), grid, grid) for b in sorted(blocks)}

    def input_transform(self, x: torch.Tensor) -> torch.Tensor:
        return imagenet_input(x)

    def build(self, device: torch.device, checkpoint: str | None, init_seed: int = 0) -> None:
        import torch

        from pipeline.extractors.mae_network import MaskedAutoencoderViT, load_mae_checkpoint

        torch.manual_seed(init_seed)
        model = MaskedAutoencoderViT(**self.flags)
        if checkpoint is not None:
            load_mae_checkpoint(model, checkpoint)
        self.model = model.to(device).eval()

    def forward(self, x: torch.Tensor, t: int, noise: torch.Tensor | None, blocks: list[int],
                input_activations: bool = False) -> dict[int, torch.Tensor]:
        import torch

        from pipeline.extractors.mae_network import token_maps

        if self.model is None:
            raise RuntimeError("MAEExtractor.forward before build()")
        with torch.no_grad():
            device = next(self.model.parameters()).device
            x = self.input_transform(x.to(device))
            batch, length = x.shape[0], self.model.grid ** 2
            ids_restore = torch.arange(length, device=device).expand(batch, length)  # image order: nothing to undo
            modules = {b: self.model.blocks[b] for b in blocks}
            with ActivationHooks(modules, input_activations) as hooks:
                acts = hooks.run(self.model.encode, x)
            return {b: token_maps(acts[b], ids_restore, self.model.grid).cpu() for b in sorted(blocks)}

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

The module below is written to the official checkpoint's state-dict layout (``{"model": state_dict}`` of the
MAE training script: encoder, decoder and the fixed sin-cos position embeddings); a test loads a state dict
with every official key and checks nothing is missing or left over. ``norm_pix_loss`` only changes the training
loss and has no parameters, so it is not a flag here.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.extractors.base import (ActivationHooks, ExtractorError, FeatureExtractor, imagenet_input,
                                      read_checkpoint)

__all__ = ["MAEExtractor", "MaskedAutoencoderViT", "OFFICIAL_MAE_FLAGS", "OFFICIAL_NUM_BLOCKS"]

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
_LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: ``(B, 3, H, W)`` -> ``(B, (H/p) * (W/p), D)`` (row-major)."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one qkv projection (bias) and an output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # softmax(q k^T / sqrt(d)) v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """``(1, 1 + grid**2, dim)`` fixed 2-D sin-cos position embedding with a zero row for the class token (as
    MAE initialises and freezes it): half the channels encode the row, half the column."""
    def encode(positions: np.ndarray, channels: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(channels // 2, dtype=np.float64) / (channels / 2.0))
        angles = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    table = np.concatenate([encode(cols, dim // 2), encode(rows, dim // 2)], axis=1)
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return torch.from_numpy(table).float()[None]


class MaskedAutoencoderViT(nn.Module):
    """MAE encoder + decoder with the official parameter names; only the encoder runs here."""

    def __init__(self, image_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int, mlp_ratio: float):
        super().__init__()
        self.grid = image_size // patch_size
        patches = self.grid ** 2
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.grid), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_embed_dim, self.grid), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=_LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3)
        self._init_random()
        assert self.pos_embed.shape[1] == patches + 1

    @torch.no_grad()
    def _init_random(self) -> None:
        """MAE's initialisation: xavier-uniform linears and patch projection, zero biases, N(0, 0.02) tokens."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def encode(self, x: torch.Tensor, ids_shuffle: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder with mask ratio 0: ``(B, 3, H, W)`` -> ``(tokens (B, 1 + L, D), ids_restore (B, L))``.
        ids_shuffle ``(B, L)``: the order the patches are visited in (default: image order)."""
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        batch, length, dim = tokens.shape
        if ids_shuffle is None:
            ids_restore = torch.arange(length, device=x.device).expand(batch, length)
        else:
            tokens = torch.gather(tokens, 1, ids_shuffle[..., None].expand(batch, length, dim))
            ids_restore = torch.argsort(ids_shuffle, dim=1)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(batch, -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens), ids_restore


def token_maps(tokens: torch.Tensor, ids_restore: torch.Tensor, grid: int) -> torch.Tensor:
    """A block's tokens ``(B, 1 + L, D)`` -> ``(B, D, grid, grid)``: class token dropped, patches put back in image
    order (``ids_restore``), channels first."""
    patches = tokens[:, 1:]
    patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, patches.shape[2]))
    return patches.permute(0, 2, 1).reshape(patches.shape[0], patches.shape[2], grid, grid)


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
        torch.manual_seed(init_seed)
        model = MaskedAutoencoderViT(**self.flags)
        if checkpoint is not None:
            load_mae_checkpoint(model, checkpoint)
        self.model = model.to(device).eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: int, noise: torch.Tensor | None, blocks: list[int],
                input_activations: bool = False) -> dict[int, torch.Tensor]:
        if self.model is None:
            raise RuntimeError("MAEExtractor.forward before build()")
        device = next(self.model.parameters()).device
        x = self.input_transform(x.to(device))
        batch, length = x.shape[0], self.model.grid ** 2
        ids_restore = torch.arange(length, device=device).expand(batch, length)  # image order: no shuffle to undo
        modules = {b: self.model.blocks[b] for b in blocks}
        with ActivationHooks(modules, input_activations) as hooks:
            acts = hooks.run(self.model.encode, x)
        return {b: token_maps(acts[b], ids_restore, self.model.grid).cpu() for b in sorted(blocks)}


def load_mae_checkpoint(model: MaskedAutoencoderViT, path: str) -> None:
    """The official MAE checkpoint ``{"model": state_dict, ...}`` into ``model``, strictly (as the official
    extractor loads it): missing or unexpected keys and shape mismatches are ExtractorErrors naming them."""
    state = read_checkpoint(path, "model")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = [f"{len(missing)} missing key(s), first: {missing[:5]}" if missing else "",
                 f"{len(unexpected)} unexpected key(s), first: {unexpected[:5]}" if unexpected else "",
                 "shape mismatches: " + "; ".join(f"{k}: checkpoint {tuple(state[k].shape)} vs model "
                                                  f"{tuple(own[k].shape)}" for k in mismatched[:5])
                 if mismatched else ""]
        raise ExtractorError(f"checkpoint {path} does not match the MAE built from the flags (wrong flags for this "
                             f"checkpoint?): " + " | ".join(p for p in parts if p))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)

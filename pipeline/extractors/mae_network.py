"""The MAE ViT network of the `mae` extractor (pipeline/extractors/mae.py, which documents the official
extraction): written to the official checkpoint's state-dict layout. Imported where the network is built or run
(it imports torch): validating a config of kind mae needs none of it."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.extractors.base import ExtractorError, read_checkpoint

__all__ = ["MaskedAutoencoderViT", "token_maps", "load_mae_checkpoint", "sincos_pos_embed"]

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

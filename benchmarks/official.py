"""A faithful CPU re-implementation of the official in-memory training path (train_interpreter.py).

`prepare_data` does what the official prepare_data does, step by step:
  X = zeros(N, D, H, W) float32; y = zeros(N, H, W) uint8
  for each image: X[row] = upsample (bilinear, align_corners False) + concatenate its block maps; small-annotation
      rule on its label; y[row] = label
  X = X.permute(1, 0, 2, 3).reshape(D, -1).permute(1, 0)      # (N*H*W, D): a full copy for N >= 2
  y = y.flatten();  return X[y != ignore], y[y != ignore]       # another copy, of the labelled rows
and `train_member_in_memory` trains on it as train() does: FeatureDataset + DataLoader(batch 64, shuffle=True).

One deliberate difference: the block maps come from the feature store (the same native maps our path reads)
instead of UNet forwards, and each block is upsampled straight into its slice of X[row]. In the official code the
forward and `collect_features` (upsampled list + torch.cat, 2 x 2.2 GB at 256x256) run on the GPU, so they are
not host memory; writing block by block keeps that transient out of the host figure here too (it is one block,
at most 1024 x 256 x 256 float32 = 268 MB).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pipeline import classifier as clf
from pipeline.datasets import apply_small_annotation_rule


def prepare_data(image_ids: list[str], maps_of: Callable[[str], list[torch.Tensor]],
                 label_of: Callable[[str], np.ndarray], size: int, dim: int,
                 ignore_label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official prepare_data on already-computed block maps.

    maps_of(image_id) -> the image's maps [(C_i, h_i, w_i)] in the official order (sum C_i = dim);
    label_of(image_id) -> (size, size) integer label. Returns X (P, dim) float32 and y (P,) uint8 of the P
    labelled pixels, in the official (image-major, then pixel) order.
    """
    n = len(image_ids)
    X = torch.zeros((n, dim, size, size), dtype=torch.float)
    y = torch.zeros((n, size, size), dtype=torch.uint8)
    for row, image_id in enumerate(image_ids):
        c0 = 0
        for fmap in maps_of(image_id):
            c = fmap.shape[0]
            X[row, c0:c0 + c] = F.interpolate(fmap.float()[None], size=(size, size), mode="bilinear")[0]
            c0 += c
        if c0 != dim:
            raise ValueError(f"image {image_id}: maps have {c0} channels in all, expected dim={dim}")
        label = apply_small_annotation_rule(np.asarray(label_of(image_id)), ignore_label)
        y[row] = torch.from_numpy(label.astype(np.uint8))
    d = X.shape[1]
    X = X.permute(1, 0, 2, 3).reshape(d, -1).permute(1, 0)
    y = y.flatten()
    return X[y != ignore_label], y[y != ignore_label]


class FeatureDataset(Dataset):
    """The official FeatureDataset: (X[i], y[i]) per index; the DataLoader collates 64 of them per batch."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor):
        self.X_data, self.y_data = X, y

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X_data[index], self.y_data[index]

    def __len__(self) -> int:
        return len(self.X_data)


def official_loader_batches(X: torch.Tensor, y: torch.Tensor, batch_size: int) -> Callable[[int], DataLoader]:
    """epoch -> DataLoader(FeatureDataset(X, y), batch_size, shuffle=True), as the official train().

    drop_last=True here (the official loader keeps a last partial batch; a batch of one pixel would stop
    BatchNorm1d in train mode), so both paths run the same number of iterations per epoch."""
    loader = DataLoader(FeatureDataset(X, y), batch_size=batch_size, shuffle=True, drop_last=True)
    return lambda epoch: loader


def in_memory_batches(X: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Callable[[int], object]:
    """epoch -> a global shuffle of (X, y) cut into batches by tensor indexing: the fastest in-memory loader
    (no per-item Python), the strictest baseline for the streaming path."""
    def batches(epoch: int):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            yield X[idx], y[idx].long()

    return batches


def train_member_in_memory(settings: clf.TrainSettings, batches: Callable[[int], object],
                           seed: int) -> tuple[torch.nn.Module, dict]:
    """One member trained from in-memory batches with the same loop as ours (pipeline.classifier.train_member:
    the official MLP, init, Adam, loss and early-stopping rule)."""
    return clf.train_member(settings, batches, seed=seed)

"""Ensemble prediction: members' logits, mode vote, Jensen-Shannon uncertainty (official predict_labels).

Official computation per image (src/pixel_classifier.py, predict_labels):
- each member's label is the argmax of its logits; the final label is the mode over members, ties going to the
  smallest label (CPU torch.mode);
- JS = entropy(mean over members of softmax) - mean over members of entropy(member), natural log, entropies as
  torch.distributions.Categorical computes them;
- image uncertainty = mean of the top int(N / 10) JS values of the image's N pixels (all of them when that is 0,
  as the official slice `[-0:]` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical

from pipeline import augment
from pipeline.features import sample_pixel_features


def _members_device(members: list[nn.Module]) -> torch.device:
    for member in members:
        for parameter in member.parameters():
            return parameter.device
    return torch.device("cpu")


@torch.no_grad()
def member_logits(members: list[nn.Module], features: Tensor, chunk: int = 65536) -> Tensor:
    """Logits of every member for features (N, D): returns (M, N, C) float32 on the CPU.

    Members are put in eval mode and run on the device of their parameters; features are moved there and
    upcast to float32 `chunk` rows at a time.
    """
    if not members:
        raise ValueError("member_logits: the ensemble is empty")
    if features.ndim != 2:
        raise ValueError(f"member_logits: expected features of shape (N, D), got {tuple(features.shape)}")
    device = _members_device(members)
    for member in members:
        member.eval()
    outputs: list[Tensor] = []
    for start in range(0, features.shape[0], chunk):
        x = features[start:start + chunk].to(device=device, dtype=torch.float32)
        outputs.append(torch.stack([member(x).float() for member in members]).cpu())
    if not outputs:
        return torch.empty((len(members), 0, 0), dtype=torch.float32)
    return torch.cat(outputs, dim=1)


def mode_vote(preds: Tensor) -> Tensor:
    """Mode over members of labels preds (M, N) int -> (N,) int64; ties go to the smallest label."""
    if preds.ndim != 2:
        raise ValueError(f"mode_vote: expected preds of shape (M, N), got {tuple(preds.shape)}")
    preds = preds.long()
    if preds.numel() == 0:
        return torch.empty(preds.shape[1], dtype=torch.long)
    if int(preds.min()) < 0:
        raise ValueError(f"mode_vote: labels must be >= 0, got {int(preds.min())}")
    number_of_labels = int(preds.max()) + 1
    counts = torch.zeros((preds.shape[1], number_of_labels), dtype=torch.int32, device=preds.device)
    counts.scatter_add_(1, preds.T.contiguous(), torch.ones_like(preds.T, dtype=torch.int32).contiguous())
    return counts.argmax(dim=1)  # argmax returns the first (smallest) label among the maxima


def js_uncertainty(logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence of the ensemble per pixel: logits (M, N, C) -> (N,) float32.

    entropy(mean_m softmax(logits[m])) - mean_m entropy(softmax(logits[m])), natural log. Zero when all members
    agree.
    """
    if logits.ndim != 3:
        raise ValueError(f"js_uncertainty: expected logits of shape (M, N, C), got {tuple(logits.shape)}")
    logits = logits.float()
    member_entropy = Categorical(logits=logits, validate_args=False).entropy()  # (M, N)
    mean_probs = torch.softmax(logits, dim=-1).mean(dim=0)  # (N, C)
    full_entropy = Categorical(probs=mean_probs, validate_args=False).entropy()  # (N,)
    return full_entropy - member_entropy.mean(dim=0)


def image_uncertainty(js: Tensor, top_fraction: float = 0.1) -> float:
    """Mean of the top int(N * top_fraction) values of js (N,), or of all N when that count is 0 (official)."""
    js = js.reshape(-1).float()
    if js.numel() == 0:
        raise ValueError("image_uncertainty: js is empty")
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"image_uncertainty: top_fraction must be in (0, 1], got {top_fraction}")
    count = int(js.numel() * top_fraction)
    ordered = js.sort().values
    return float(ordered[-count:].mean() if count > 0 else ordered.mean())


@torch.no_grad()
def predict_image(
    members: list[nn.Module], features: Tensor, chunk: int = 16384, top_fraction: float = 0.1
) -> tuple[np.ndarray, float]:
    """Predict one image from its full-resolution features (D, H, W).

    Pixels are processed `chunk` at a time (memory ~ chunk x (D + M x C) floats). Returns the mode-vote mask
    (H, W) (uint8 when the classes fit, int64 otherwise) and the image's uncertainty (image_uncertainty of the
    per-pixel JS).
    """
    if features.ndim != 3:
        raise ValueError(f"predict_image: expected features of shape (D, H, W), got {tuple(features.shape)}")
    dim, height, width = features.shape
    flat = features.reshape(dim, height * width)
    labels: list[Tensor] = []
    js_values: list[Tensor] = []
    number_class = 0
    for start in range(0, height * width, chunk):
        logits = member_logits(members, flat[:, start:start + chunk].T, chunk=chunk)  # (M, n, C)
        number_class = logits.shape[-1]
        labels.append(mode_vote(logits.argmax(dim=-1)))
        js_values.append(js_uncertainty(logits))
    mask = torch.cat(labels).reshape(height, width).numpy()
    mask = mask.astype(np.uint8 if number_class <= 256 else np.int64)
    return mask, image_uncertainty(torch.cat(js_values), top_fraction)


@dataclass
class Prediction:
    mask: np.ndarray  # (H, W) uint8: mode over members
    probs: np.ndarray  # (C, H, W) float32: members' mean softmax
    uncertainty: float  # mean of the top 10% JS values


def predict_maps(members: list[nn.Module], maps: list[torch.Tensor], size: int,
                 pixels_per_chunk: int = 16384) -> Prediction:
    """Predict one image from its native maps (official order, see pipeline.features), building pixel features
    chunk by chunk (bounded memory). Features are sampled on the maps' device and the members run on theirs (on
    a GPU: both there); each chunk's logits come back to the CPU for the vote and the uncertainty."""
    device = maps[0].device
    ys, xs = torch.meshgrid(torch.arange(size, device=device), torch.arange(size, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    labels, js, probs = [], [], []
    for i in range(0, ys.numel(), pixels_per_chunk):
        feats = sample_pixel_features(maps, ys[i:i + pixels_per_chunk], xs[i:i + pixels_per_chunk], size)
        logits = member_logits(members, feats)
        labels.append(mode_vote(logits.argmax(-1)))
        js.append(js_uncertainty(logits))
        probs.append(torch.softmax(logits, -1).mean(0))
    mask = torch.cat(labels).reshape(size, size).numpy().astype(np.uint8)
    prob = torch.cat(probs).T.reshape(-1, size, size).numpy()
    return Prediction(mask, prob, image_uncertainty(torch.cat(js)))


def merge_views(predictions: list[Prediction], how: str) -> np.ndarray:
    """Per-pixel merge of (geometry-undone) view predictions: majority vote (ties -> smallest label) or mean prob."""
    if len(predictions) == 1:
        return predictions[0].mask
    if how == "vote":
        return mode_vote(torch.from_numpy(np.stack([p.mask for p in predictions]).astype(np.int64)
                                                  .reshape(len(predictions), -1))).reshape(
            predictions[0].mask.shape).numpy().astype(np.uint8)
    return np.mean([p.probs for p in predictions], axis=0).argmax(0).astype(np.uint8)


def undo_view(pred: Prediction, specs: list) -> Prediction:
    """A test-time view's prediction in the original image's geometry (flips etc. undone)."""
    return Prediction(augment.undo_geometry(pred.mask, specs), augment.undo_geometry(pred.probs, specs),
                      pred.uncertainty)

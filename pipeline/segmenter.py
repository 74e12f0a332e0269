"""The DatasetDDPM segmenter: DeepLabV3 trained on synthetic images labelled by the pixel ensemble.

The official protocol (train_deeplab.py of yandex-research/ddpm-segmentation), reproduced here:

- data: the synthetic images (N, H, W, 3) uint8, their ensemble masks (N, H, W) and per-image uncertainty; the
  first ``max_data`` samples (0: all), then the uncertainty filter (``kept_indices``);
- input: ``make_transform('deeplab', deeplab_res)``: PIL bilinear resize to (R, R), ToTensor (/255), Normalize
  with ImageNet's mean and std; masks resized to (R, R) by nearest neighbour (OpenCV's INTER_NEAREST);
- network: torchvision's deeplabv3_resnet101 without aux classifier (pipeline/deeplab.py);
- training: CrossEntropyLoss, Adam lr 1e-3, batch 8, shuffled, drop_last, 20 epochs, the model in train mode
  throughout, one checkpoint per epoch;
- prediction: ``argmax(log_softmax(model(x)['out']))`` at (R, R) in eval mode;
- test: the checkpoint with the best validation mIoU (``select_checkpoint``) is scored on the test split.

What differs, by design: the shuffle and the dropout masks of epoch e follow a seed derived from (seed, e), not
one RNG stream, so a run resumed from the checkpoint of epoch e (``start``) continues bit for bit as the
uninterrupted run would (on CPU); the official starts its stream anew on resume.

The caller's choice: the official backbone starts from torchvision's ImageNet ResNet-101 weights (see
pipeline/deeplab.py); pass them as ``backbone_state`` (the segmenter stage does, from datasetddpm.backbone_weights).
Without them the backbone is randomly initialised.
"""
from __future__ import annotations

import enum
import hashlib
import io
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.datasets import resize_label_nearest
from pipeline.deeplab import BACKBONES, DeepLabV3, create_segmenter, load_backbone_weights
from pipeline.torchfile import load_tensors

__all__ = ["SegmenterSettings", "UncertaintyRule", "kept_indices", "segmenter_transform", "segmenter_labels",
           "train_segmenter", "predict_segmenter", "select_checkpoint", "load_segmenter", "checkpoint_bytes",
           "load_checkpoint", "epoch_order", "CHECKPOINT_FORMAT", "OFFICIAL_MOST_CERTAIN_DROPPED"]

CHECKPOINT_FORMAT = "ddpmseg-segmenter-1"  # the "format" entry of every checkpoint written by train_segmenter
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # make_transform('deeplab', ...)'s Normalize (as for mae / swav)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_MOST_CERTAIN_DROPPED = 30  # the official filter's slice starts at 30: the 30 most certain samples go too


class UncertaintyRule(str, enum.Enum):
    """Which samples the uncertainty filter keeps (``n_out = int(N * portion)``, samples sorted by uncertainty)."""

    OFFICIAL = "official"  # sorted[30 : -n_out + 30]: drops the 30 most certain and n_out - 30 most uncertain
    MOST_UNCERTAIN = "most_uncertain"  # sorted[: N - n_out]: drops exactly the n_out most uncertain


@dataclass(frozen=True)
class SegmenterSettings:
    """The segmenter's training settings; defaults are the official ones (train_deeplab.py's arguments)."""

    backbone: str = "resnet101"  # a key of pipeline.deeplab.BACKBONES (official: resnet101)
    resolution: int = 256  # network input and training-mask side (official: the data set's deeplab_res, 256)
    learning_rate: float = 1e-3  # Adam's learning rate (--learning_rate)
    batch_size: int = 8  # images per step, shuffled, last partial batch dropped (--batch_size)
    epochs: int = 20  # passes over the kept samples, one checkpoint each (--num_epoch)
    seed: int = 0  # initial weights, per-epoch shuffle and dropout (--seed)
    uncertainty_portion: float = 0.1  # share of samples the filter removes; 0: no filter (--uncertainty_portion)
    max_data: int = 0  # the first max_data samples are used, before the filter; 0: all (--max_data)
    uncertainty_rule: str = UncertaintyRule.OFFICIAL.value  # see UncertaintyRule

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"segmenter backbone: unknown {self.backbone!r}; expected one of {sorted(BACKBONES)}")
        for name, low in (("resolution", 8), ("batch_size", 1), ("epochs", 1), ("seed", 0), ("max_data", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"segmenter {name}: expected an integer >= {low}, got {value!r}")
        if not 0 < float(self.learning_rate) < 1:
            raise ValueError(f"segmenter learning_rate: expected 0 < lr < 1, got {self.learning_rate!r}")
        if not 0 <= float(self.uncertainty_portion) < 1:
            raise ValueError(f"segmenter uncertainty_portion: expected 0 <= portion < 1, "
                             f"got {self.uncertainty_portion!r}")
        _rule(self.uncertainty_rule)


def _rule(rule: str | UncertaintyRule) -> UncertaintyRule:
    try:
        return UncertaintyRule(rule)
    except ValueError:
        raise ValueError(f"segmenter uncertainty_rule: unknown {rule!r}; expected one of "
                         f"{[r.value for r in UncertaintyRule]}") from None


def _smallest_official_count(portion: float) -> int:
    """The fewest samples for which the official filter keeps any (int(N * portion) > 30)."""
    count = max(OFFICIAL_MOST_CERTAIN_DROPPED + 1, int((OFFICIAL_MOST_CERTAIN_DROPPED + 1) / portion) - 2)
    while int(count * portion) <= OFFICIAL_MOST_CERTAIN_DROPPED or count - int(count * portion) < 1:
        count += 1
    return count


def kept_indices(uncertainty: np.ndarray, portion: float, max_data: int,
                 rule: str | UncertaintyRule = UncertaintyRule.OFFICIAL) -> np.ndarray:
    """Indices (K,) int64 of the samples the segmenter trains on, in the official order.

    uncertainty: (N,) per-sample uncertainty (higher: less certain). The first ``max_data`` samples are taken
    (0: all); with ``portion`` 0 they are all kept in their order; otherwise ``np.argsort(uncertainty)`` (the
    official call: NumPy's default sort, most certain first) is cut by ``rule`` with ``n_out = int(N * portion)``:
    official ``[30 : -n_out + 30]``, which keeps N - n_out samples when n_out > 30 and none when n_out <= 30.

    Raises ValueError when nothing would be kept, naming the numbers and the fewest samples that work."""
    rule = _rule(rule)
    scores = np.asarray(uncertainty)
    if scores.ndim != 1 or scores.dtype.kind not in "fiu":
        raise ValueError(f"uncertainty: expected a 1-D array of numbers, got shape {scores.shape} dtype {scores.dtype}")
    if scores.dtype.kind == "f" and not np.all(np.isfinite(scores)):
        raise ValueError(f"uncertainty: {int(np.sum(~np.isfinite(scores)))} non-finite value(s), first at sample "
                         f"{int(np.flatnonzero(~np.isfinite(scores))[0])}")
    if isinstance(max_data, bool) or not isinstance(max_data, (int, np.integer)) or max_data < 0:
        raise ValueError(f"max_data: expected an integer >= 0 (0: all samples), got {max_data!r}")
    if not 0 <= portion < 1:
        raise ValueError(f"uncertainty_portion: expected 0 <= portion < 1, got {portion!r}")
    if max_data > 0:
        scores = scores[:max_data]
    count = len(scores)
    if count == 0:
        raise ValueError("uncertainty filter: no samples")
    if portion == 0:
        return np.arange(count, dtype=np.int64)
    order = np.argsort(scores)
    n_out = int(count * portion)
    if rule is UncertaintyRule.OFFICIAL:
        kept = order[OFFICIAL_MOST_CERTAIN_DROPPED: -n_out + OFFICIAL_MOST_CERTAIN_DROPPED]
        if len(kept) == 0:
            raise ValueError(
                f"the official uncertainty filter keeps no sample: {count} samples, uncertainty_portion {portion} "
                f"-> n_out = int({count} * {portion}) = {n_out}, and it keeps sorted[30 : {-n_out + 30}] (the 30 "
                f"most certain are dropped too), empty unless n_out > 30. Use at least "
                f"{_smallest_official_count(portion)} samples at this portion, uncertainty_portion 0 (no filter), "
                f"or uncertainty_rule 'most_uncertain'")
    else:
        kept = order[:count - n_out]
    return np.ascontiguousarray(kept, dtype=np.int64)


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        raise ValueError(f"segmenter images: expected a uint8 array (N, H, W, 3), got "
                         f"{type(images).__name__} shape {shape} dtype {getattr(images, 'dtype', None)}")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"segmenter images are {images.shape[2]}x{images.shape[1]} (width x height); only square "
                         f"images are supported (as officially)")
    if images.shape[0] == 0:
        raise ValueError("segmenter images: no images (N = 0)")


def _check_masks(masks: np.ndarray, images: np.ndarray, num_classes: int) -> None:
    if not isinstance(masks, np.ndarray) or masks.dtype != np.uint8 or masks.shape != images.shape[:3]:
        raise ValueError(f"segmenter masks: expected a uint8 array of shape {images.shape[:3]} (N, H, W) like the "
                         f"images, got shape {getattr(masks, 'shape', None)} dtype {getattr(masks, 'dtype', None)}")
    per_image = masks.reshape(len(masks), -1).max(axis=1)
    bad = np.flatnonzero(per_image >= num_classes)
    if len(bad):
        raise ValueError(f"segmenter masks: {len(bad)} mask(s) hold labels >= num_classes {num_classes}, first: "
                         f"mask {int(bad[0])} with label {int(per_image[bad[0]])}; expected class ids "
                         f"0..{num_classes - 1} (the ensemble's predictions, no ignore label)")


def segmenter_transform(images: np.ndarray, resolution: int) -> torch.Tensor:
    """The official ``make_transform('deeplab', resolution)`` on (N, S, S, 3) uint8 images -> (N, 3, R, R) float32.

    PIL bilinear resize to (R, R) when S != R, then ToTensor (uint8 / 255) and Normalize(ImageNet mean, std)."""
    _check_images(images)
    if images.shape[1] != resolution:
        images = np.stack([np.asarray(Image.fromarray(image).resize((resolution, resolution), Image.BILINEAR))
                           for image in images])
    unit = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (unit - mean) / std


def segmenter_labels(masks: np.ndarray, resolution: int) -> torch.Tensor:
    """(N, S, S) uint8 masks -> (N, R, R) int64 class ids, resized by nearest neighbour (OpenCV INTER_NEAREST)."""
    if masks.shape[1] != resolution or masks.shape[2] != resolution:
        masks = np.stack([resize_label_nearest(mask, resolution) for mask in masks])
    return torch.from_numpy(np.ascontiguousarray(masks)).to(torch.int64)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one epoch's draws: stream 0 the shuffle, stream 1 the dropout masks."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0]) >> 1


def epoch_order(seed: int, epoch: int, count: int) -> torch.Tensor:
    """The sample order (count,) of epoch ``epoch``: a permutation seeded by (seed, epoch)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch, 0)))


def _data_digest(images: np.ndarray, masks: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (images, masks):
        digest.update(str(array.shape).encode())
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def _to_cpu(value: Any) -> Any:
    """A copy of ``value`` with every tensor detached and on the CPU (containers rebuilt, scalars kept)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _check_start(start: Mapping[str, Any], settings: SegmenterSettings, num_classes: int, count: int,
                 digest: str) -> None:
    """Refuse to resume from a checkpoint of another run (anything but the number of epochs differs)."""
    if start.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"segmenter start: not a checkpoint of train_segmenter (format {start.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    theirs = dict(start["settings"])
    ours = asdict(settings)
    differ = [f"{name} {theirs.get(name)!r} != {ours[name]!r}" for name in ours
              if name != "epochs" and theirs.get(name) != ours[name]]
    if int(start["num_classes"]) != num_classes:
        differ.append(f"num_classes {start['num_classes']} != {num_classes}")
    if int(start["samples"]) != count or start["data_sha256"] != digest:
        differ.append(f"training data ({start['samples']} samples, sha256 {str(start['data_sha256'])[:12]}... != "
                      f"{count} samples, {digest[:12]}...)")
    if differ:
        raise ValueError(f"segmenter start: the checkpoint of epoch {start['epoch']} comes from another run: "
                         f"{'; '.join(differ)}")


def train_segmenter(images: np.ndarray, masks: np.ndarray, num_classes: int, settings: SegmenterSettings, *,
                    device: str | torch.device = "cpu", start: Mapping[str, Any] | None = None,
                    on_epoch: Callable[[int, dict], None] | None = None,
                    backbone_state: Mapping[str, torch.Tensor] | None = None,
                    progress: bool = False, desc: str = "segmenter train") -> DeepLabV3:
    """Train DeepLabV3 on the kept samples with the official settings; returns the last epoch's model (eval mode,
    on ``device``).

    images: (N, S, S, 3) uint8, masks: (N, S, S) uint8 class ids < num_classes: the samples kept by
    ``kept_indices`` (in its order; the filter is the caller's). ``torch.manual_seed(settings.seed)`` precedes the
    model's construction (the caller's RNG state is restored afterwards); ``backbone_state``: ImageNet ResNet weights
    for the backbone (official; see pipeline/deeplab.py), loaded unless resuming.

    on_epoch(epoch, checkpoint) is called after each epoch (0-based) with a dict of plain values and CPU tensors
    (torch.save-able, loadable with weights_only=True): {"format", "epoch", "model" (state dict), "optimizer"
    (Adam's state dict), "settings" (asdict), "num_classes", "samples", "data_sha256", "epoch_loss" (mean loss
    of its steps), "losses" (mean loss of every epoch so far)}. ``start``: such a checkpoint; training continues
    after its epoch, bit for bit as an uninterrupted run on CPU (only settings.epochs may differ).
    """
    _check_images(images)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"segmenter num_classes: expected an integer >= 1, got {num_classes!r}")
    _check_masks(masks, images, num_classes)
    count = len(images)
    steps_per_epoch = count // settings.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"segmenter: {count} sample(s) < batch_size {settings.batch_size}: with drop_last "
                         f"(official) no step would run; use more samples or a smaller batch_size")
    device = torch.device(device)
    digest = _data_digest(images, masks)
    if start is not None:
        _check_start(start, settings, num_classes, count, digest)

    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        model = create_segmenter(settings.backbone, num_classes)
        if backbone_state is not None and start is None:
            load_backbone_weights(model, backbone_state, "segmenter backbone_state")
        model.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
        first_epoch, losses = 0, []
        if start is not None:
            model.load_state_dict(start["model"], strict=True)
            optimizer.load_state_dict(start["optimizer"])
            first_epoch, losses = int(start["epoch"]) + 1, [float(x) for x in start["losses"]]
        _run_epochs(model, optimizer, images, masks, settings, device, first_epoch, losses,
                    {"num_classes": num_classes, "samples": count, "data_sha256": digest}, on_epoch, progress, desc)
    return model.eval()


def _run_epochs(model: DeepLabV3, optimizer: torch.optim.Optimizer, images: np.ndarray, masks: np.ndarray,
                settings: SegmenterSettings, device: torch.device, first_epoch: int, losses: list[float],
                identity: dict, on_epoch: Callable[[int, dict], None] | None, progress: bool, desc: str) -> None:
    from pipeline.progress import progress_bar

    criterion = nn.CrossEntropyLoss()
    count, batch = len(images), settings.batch_size
    steps_per_epoch = count // batch
    bar = progress_bar(desc=desc, total=(settings.epochs - first_epoch) * steps_per_epoch, unit="it",
                       enabled=progress, leave=False)
    pin = device.type == "cuda"
    try:
        for epoch in range(first_epoch, settings.epochs):
            order = epoch_order(settings.seed, epoch, count).numpy()
            torch.manual_seed(_epoch_seed(settings.seed, epoch, 1))  # the dropout masks of this epoch
            model.train()
            total = torch.zeros((), dtype=torch.float64, device=device)
            for step in range(steps_per_epoch):
                chosen = order[step * batch:(step + 1) * batch]
                inputs = segmenter_transform(images[chosen], settings.resolution)
                labels = segmenter_labels(masks[chosen], settings.resolution)
                if pin:
                    inputs, labels = inputs.pin_memory(), labels.pin_memory()
                inputs = inputs.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                optimizer.zero_grad()
                loss = criterion(model(inputs)["out"], labels)
                loss.backward()
                optimizer.step()
                total += loss.detach()
                bar.update(1)
                if step % 10 == 0:  # the official prints the loss every 10 steps
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            losses.append(float(total.item()) / steps_per_epoch)
            if on_epoch is not None:
                checkpoint = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": _to_cpu(model.state_dict()),
                              "optimizer": _to_cpu(optimizer.state_dict()), "settings": asdict(settings),
                              **identity, "epoch_loss": losses[-1], "losses": list(losses)}
                on_epoch(epoch, checkpoint)
    finally:
        bar.close()


@torch.no_grad()
def predict_segmenter(model: nn.Module, images: np.ndarray, resolution: int, device: str | torch.device = "cpu",
                      batch_size: int = 8, *, at_resolution: bool = False) -> np.ndarray:
    """Masks (N, S, S) uint8 (int64 for more than 256 classes) of (N, S, S, 3) uint8 images.

    As officially: the model in eval mode (moved to ``device``), input ``segmenter_transform(images, resolution)``,
    ``argmax(log_softmax(logits))`` at (R, R). The official scores at (R, R) against labels resized to (R, R) by
    nearest neighbour (ImageLabelDataset); ``at_resolution=True`` returns those (N, R, R) masks. By default a
    mask is mapped back to the images' side S by nearest neighbour (the same as the official when S == R, as
    for all four official data sets)."""
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"predict_segmenter batch_size: expected >= 1, got {batch_size}")
    device = torch.device(device)
    model.to(device).eval()
    masks = []
    for begin in range(0, len(images), batch_size):
        inputs = segmenter_transform(images[begin:begin + batch_size], resolution).to(device)
        logits = model(inputs)["out"]
        masks.append(torch.max(torch.log_softmax(logits, dim=1), dim=1)[1].cpu())
    classes = logits.shape[1]
    predicted = torch.cat(masks).numpy().astype(np.uint8 if classes <= 256 else np.int64)
    side = images.shape[1]
    if at_resolution or side == resolution:
        return predicted
    return np.stack([resize_label_nearest(mask, side) for mask in predicted])


def select_checkpoint(validation_miou: Mapping[int, float]) -> int:
    """The epoch whose checkpoint the official test scores: the best validation mIoU, checkpoints visited as the
    official ``sorted(glob('*.pth'))`` does (file names ``deeplab_epoch_<e>.pth`` in string order: 0, 1, 10, 11,
    ..., 19, 2, 3, ...), the first strictly better than the best so far (starting at 0) winning ties.

    The official validation split is the real labelled training split (``validation_path``: real/train). Raises
    ValueError when no epoch has a validation mIoU above 0 (the official then fails: no test mIoU)."""
    best, chosen = 0.0, None
    for epoch in sorted(validation_miou, key=lambda e: f"deeplab_epoch_{e}.pth"):
        if validation_miou[epoch] > best:
            best, chosen = validation_miou[epoch], epoch
    if chosen is None:
        raise ValueError(f"select_checkpoint: no epoch has a validation mIoU above 0 ({dict(validation_miou)}); "
                         f"the official selection has no checkpoint to test")
    return int(chosen)


def _backbone_of(state: Mapping[str, torch.Tensor], what: str) -> str:
    """The BACKBONES key whose layout ``state`` has (block type and layer3 depth)."""
    bottleneck = "backbone.layer1.0.conv3.weight" in state
    depth = len({k.split(".")[2] for k in state if k.startswith("backbone.layer3.")})
    for name, spec in BACKBONES.items():
        if (spec.block == "bottleneck") == bottleneck and spec.layers[2] == depth:
            return name
    raise ValueError(f"{what}: no segmenter backbone has its layout ({'Bottleneck' if bottleneck else 'BasicBlock'}, "
                     f"{depth} blocks in layer3); expected one of {sorted(BACKBONES)}")


def load_segmenter(checkpoint: Mapping[str, Any], device: str | torch.device = "cpu",
                   what: str = "segmenter checkpoint") -> DeepLabV3:
    """The model (eval mode, on ``device``) of a checkpoint from train_segmenter, or of the official
    train_deeplab.py (``{"model_state_dict": ...}``: backbone and classes read from its shapes)."""
    if "model" in checkpoint and "format" in checkpoint:
        state, backbone, classes = checkpoint["model"], checkpoint["settings"]["backbone"], checkpoint["num_classes"]
    elif "model_state_dict" in checkpoint:
        state = checkpoint["model_state_dict"]
        if "classifier.4.weight" not in state:
            raise ValueError(f"{what}: model_state_dict has no classifier.4.weight; not a DeepLabV3 state dict")
        backbone, classes = _backbone_of(state, what), int(state["classifier.4.weight"].shape[0])
    else:
        raise ValueError(f"{what}: expected a train_segmenter checkpoint (format {CHECKPOINT_FORMAT!r}) or the "
                         f"official {{'model_state_dict': ...}}, got entries {sorted(checkpoint)[:8]}")
    model = create_segmenter(backbone, int(classes), device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def checkpoint_bytes(checkpoint: Mapping[str, Any]) -> bytes:
    """``torch.save`` of a checkpoint from train_segmenter's on_epoch, as bytes."""
    buffer = io.BytesIO()
    torch.save(dict(checkpoint), buffer)
    return buffer.getvalue()


def load_checkpoint(data: bytes, what: str = "segmenter checkpoint") -> dict:
    """The checkpoint in ``data`` (``torch.load(weights_only=True)``; pipeline/torchfile.py's errors name ``what``)."""
    checkpoint = load_tensors(data, what)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{what} is not a train_segmenter checkpoint (expected a dict with format "
                         f"{CHECKPOINT_FORMAT!r})")
    return checkpoint

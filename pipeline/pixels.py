"""Streaming the labelled pixels of the training images into shuffled batches.

The official code builds the upsampled feature of every labelled pixel of every training image (2.2 GB per
256x256 image), pools them and shuffles (DataLoader batch 64, shuffle, drop_last). Here memory is bounded by a
few images: each epoch visits the images in a seeded random order, `images_per_buffer` at a time; the labelled
pixels of a buffer are pooled and shuffled, their features are built only for those pixels, `slice_pixels` at a
time, and cut into batches. The remainder that does not fill a batch is carried to the next buffer, so only the
epoch's last partial batch is dropped, as with DataLoader(drop_last=True).

While the batches of one slice train, the next slice's features are built in a second thread (reading the
maps of the next buffer's images included), so reading and sampling overlap the MLP steps on a second core;
the batches are the same, bit for bit, with prefetch=False.

The shuffle is local to a buffer (a batch mixes pixels of at most `images_per_buffer` consecutive images of the
epoch's random order), where the official shuffle is global; images_per_buffer >= the number of training images
gives the global shuffle.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.threads import one_thread_here


def labelled_pixels(label: np.ndarray, ignore_label: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates and classes of the pixels of `label` (H, W) whose value is not ignore_label.

    Returns ys, xs, classes: three (N,) int64 arrays in row-major order.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be a 2-D (H, W) array, got shape {label.shape}")
    ys, xs = np.nonzero(label != ignore_label)
    return ys.astype(np.int64), xs.astype(np.int64), label[ys, xs].astype(np.int64)


def count_labelled(labels: Iterable[np.ndarray], ignore_label: int) -> int:
    """Number of pixels whose label is not ignore_label, over all the given (H, W) label arrays."""
    return int(sum(int(np.count_nonzero(np.asarray(label) != ignore_label)) for label in labels))


def iterations_per_epoch(labelled_count: int, batch_size: int) -> int:
    """Batches per epoch with drop_last: labelled_count // batch_size."""
    return labelled_count // batch_size


SLICE_PIXELS = 4096  # pixels whose features are built at once (138 MB at D = 8448)


@dataclass(frozen=True)
class PixelSlice:
    """The pixels of one slice of an epoch, in training order, all from the images of one buffer."""

    images: tuple[str, ...]  # the buffer's image ids
    image: Tensor  # (n,) int64: index into `images` of each pixel's image
    ys: Tensor  # (n,) int64 row of each pixel
    xs: Tensor  # (n,) int64 column of each pixel
    labels: Tensor  # (n,) int64 class of each pixel


def plan_slices(image_ids: list[str], load_label: Callable[[str], np.ndarray], ignore_label: int,
                rng: np.random.Generator, images_per_buffer: int, slice_pixels: int) -> Iterator[PixelSlice]:
    """The slices of one epoch, in order. Draws the image order, then one shuffle per buffer, from `rng`."""
    image_order = rng.permutation(len(image_ids))
    for buffer_start in range(0, len(image_order), images_per_buffer):
        buffer_images = tuple(image_ids[i] for i in image_order[buffer_start:buffer_start + images_per_buffer])
        pooled = [labelled_pixels(load_label(image_id), ignore_label) for image_id in buffer_images]
        pool_image = np.concatenate([np.full(len(ys), k, dtype=np.int64) for k, (ys, _, _) in enumerate(pooled)])
        pool_ys = np.concatenate([ys for ys, _, _ in pooled])
        pool_xs = np.concatenate([xs for _, xs, _ in pooled])
        pool_classes = np.concatenate([classes for _, _, classes in pooled])
        shuffle = rng.permutation(len(pool_classes))
        for slice_start in range(0, len(shuffle), slice_pixels):
            picked = shuffle[slice_start:slice_start + slice_pixels]
            yield PixelSlice(buffer_images, torch.from_numpy(pool_image[picked]), torch.from_numpy(pool_ys[picked]),
                             torch.from_numpy(pool_xs[picked]), torch.from_numpy(pool_classes[picked]))


def per_image(pixel_features: Callable[[str, Tensor, Tensor], Tensor]) -> Callable[[PixelSlice], Tensor]:
    """A slice_features function for epoch_batches from pixel_features(image_id, ys, xs) -> (N, D): one call
    per image present in the slice, each image's rows put back in slice order (float32)."""

    def slice_features(pixels: PixelSlice) -> Tensor:
        features: Tensor | None = None
        for k in torch.unique(pixels.image).tolist():
            rows = torch.nonzero(pixels.image == k)[:, 0]
            image_id = pixels.images[k]
            piece = pixel_features(image_id, pixels.ys[rows], pixels.xs[rows])
            if piece.ndim != 2 or piece.shape[0] != len(rows) or (features is not None and
                                                                    piece.shape[1] != features.shape[1]):
                expected = f"({len(rows)}, {features.shape[1] if features is not None else 'D'})"
                raise ValueError(f"pixel_features({image_id!r}, ...) returned shape {tuple(piece.shape)}, "
                                 f"expected {expected}")
            if features is None:
                features = torch.empty((len(pixels.labels), piece.shape[1]), dtype=torch.float32)
            features[rows] = piece.detach().to("cpu", torch.float32)
        assert features is not None  # a slice is never empty
        return features

    return slice_features


def epoch_slices(
    image_ids: list[str],
    load_label: Callable[[str], np.ndarray],
    slice_features: Callable[[PixelSlice], Tensor],
    ignore_label: int,
    epoch: int,
    seed: int,
    images_per_buffer: int = 4,
    slice_pixels: int = SLICE_PIXELS,
    prefetch: bool = True,
    device: str | torch.device = "cpu",
    max_pixels: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield the slices of one epoch in order: (features (n, D) float32 on `device`, labels (n,) int64).

    slice_features(pixels) -> (n, D) features of the n pixels of a PixelSlice, in its order; called once per
    slice, the slices of a buffer one after the other, so it should hold the buffer's images (`per_image` adapts
    a per-image function). With prefetch it runs in one worker thread (always the same one), one slice ahead of
    the slice yielded. It may return the same memory every other call (a ring of two buffers): a slice's
    features are no longer read once slice_features is called for the slice after the next one, so a consumer
    copies what it keeps beyond the next slice. Deterministic for (seed, epoch).
    max_pixels: the epoch ends after the first slices that hold at least that many pixels (an epoch cut at a number
    of batches: the slices after them are neither read nor built, not even by the prefetch); None: all.
    """
    if images_per_buffer < 1:
        raise ValueError(f"images_per_buffer must be >= 1, got {images_per_buffer}")
    if slice_pixels < 1:
        raise ValueError(f"slice_pixels must be >= 1, got {slice_pixels}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    device = torch.device(device)
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
    slices = plan_slices(image_ids, load_label, ignore_label, np.random.default_rng([seed, epoch]),
                         images_per_buffer, slice_pixels)
    if max_pixels is not None:
        slices = _first_pixels(slices, max_pixels)
    # the prefetching thread builds on one torch thread (pipeline.threads.one_thread_here: a thread team of its
    # own would slow every parallel op of the training loop beside it)
    workers = ThreadPoolExecutor(1, "slice-features", initializer=one_thread_here) if prefetch else None
    with workers if workers is not None else contextlib.nullcontext() as pool:

        def features_of(pixels: PixelSlice) -> Tensor:
            features = slice_features(pixels)
            if features.ndim != 2 or features.shape[0] != len(pixels.labels):
                raise ValueError(f"slice_features returned shape {tuple(features.shape)} for a slice of "
                                 f"{len(pixels.labels)} pixels, expected ({len(pixels.labels)}, D)")
            return features.detach().to(device, torch.float32)

        def start(pixels: PixelSlice | None):
            """(labels, something whose .result() is the slice's features), built in the pool when prefetching."""
            if pixels is None:
                return None
            if pool is not None:
                return pixels.labels, pool.submit(features_of, pixels)
            done: Future = Future()
            done.set_result(features_of(pixels))
            return pixels.labels, done

        pending = start(next(slices, None))
        while pending is not None:
            labels, job = pending
            pending = start(next(slices, None))  # the next slice builds while this one's batches train
            yield job.result(), labels


def _first_pixels(slices: Iterator[PixelSlice], max_pixels: int) -> Iterator[PixelSlice]:
    """The first slices of `slices` that hold at least max_pixels pixels together."""
    total = 0
    for part in slices:
        if total >= max_pixels:
            return
        yield part
        total += len(part.labels)


def epoch_batches(
    image_ids: list[str],
    load_label: Callable[[str], np.ndarray],
    slice_features: Callable[[PixelSlice], Tensor],
    ignore_label: int,
    batch_size: int,
    epoch: int,
    seed: int,
    images_per_buffer: int = 4,
    slice_pixels: int = SLICE_PIXELS,
    drop_last: bool = True,
    prefetch: bool = True,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield the shuffled labelled pixels of one epoch as batches (features (B, D) float32 on `device`, labels
    (B,) int64), cut from the slices of `epoch_slices` (same arguments). The batches yielded are copies (the
    slice's memory may be reused).

    load_label(image_id) -> (H, W) integer array (training labels, small classes already set to ignore_label).
    Deterministic for (seed, epoch); every labelled pixel appears exactly once per epoch, except the final
    partial batch (< batch_size pixels) which is dropped when drop_last (the official setting).
    max_batches: only the first that many batches (the same ones), building only the slices they need.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    batches = _cut_batches(epoch_slices(image_ids, load_label, slice_features, ignore_label, epoch, seed,
                                        images_per_buffer, slice_pixels, prefetch, device,
                                        None if max_batches is None else max_batches * batch_size),
                           batch_size, drop_last)
    yield from batches if max_batches is None else itertools.islice(batches, max_batches)


def _cut_batches(slices: Iterator[tuple[Tensor, Tensor]], batch_size: int,
                 drop_last: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """epoch_batches' batches from an epoch's slices (the remainder of a slice carried into the next)."""
    carry_features: Tensor | None = None
    carry_labels: Tensor | None = None
    for features, labels in slices:
        if carry_features is not None and carry_features.shape[1] != features.shape[1]:
            raise ValueError(f"slice_features returned {features.shape[1]} features per pixel after "
                             f"{carry_features.shape[1]} for earlier pixels of the epoch")
        labels = labels.to(features.device)
        first = 0
        if carry_labels is not None:  # complete the batch begun by the previous slices
            first = min(batch_size - len(carry_labels), len(labels))
            carry_features = torch.cat([carry_features, features[:first]])
            carry_labels = torch.cat([carry_labels, labels[:first]])
            if len(carry_labels) < batch_size:
                continue
            yield carry_features, carry_labels
            carry_features, carry_labels = None, None
        n_full = (len(labels) - first) // batch_size
        for b in range(n_full):
            rows = slice(first + b * batch_size, first + (b + 1) * batch_size)
            yield features[rows].clone(), labels[rows]  # the caller's own copy: `features` may be reused
        rest = first + n_full * batch_size
        if rest < len(labels):
            carry_features, carry_labels = features[rest:].clone(), labels[rest:].clone()

    if not drop_last and carry_labels is not None:
        yield carry_features, carry_labels

"""Tests of pipeline.pixels: streaming labelled pixels into shuffled batches."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.pixels import count_labelled, epoch_batches, iterations_per_epoch, labelled_pixels, per_image

IGNORE = 255
IMAGE_IDS = [f"img{i}" for i in range(7)]


def make_labels(ignore_label: int = IGNORE) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = {}
    for index, image_id in enumerate(IMAGE_IDS):
        size = 10 + index  # images of different sizes
        label = rng.integers(0, 5, size=(size, size)).astype(np.uint8)
        label[rng.random((size, size)) < 0.3] = ignore_label
        labels[image_id] = label
    labels["img3"][:] = ignore_label  # an image without any labelled pixel
    return labels


LABELS = make_labels()


def pixel_features(image_id: str, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Features that identify the pixel: (image index, y, x, its label), float16 like the store."""
    index = IMAGE_IDS.index(image_id)
    label = torch.from_numpy(LABELS[image_id].astype(np.int64))[ys, xs]
    return torch.stack([torch.full_like(ys, index), ys, xs, label], dim=1).to(torch.float16)


def run_epoch(epoch: int = 0, seed: int = 0, batch_size: int = 32, **kwargs):
    return list(epoch_batches(IMAGE_IDS, LABELS.__getitem__, per_image(pixel_features), IGNORE, batch_size, epoch,
                              seed, **kwargs))


def pixel_keys(batches) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in row[:3]) for features, _ in batches for row in features]


def all_labelled_keys() -> set[tuple[int, int, int]]:
    keys = set()
    for index, image_id in enumerate(IMAGE_IDS):
        ys, xs, _ = labelled_pixels(LABELS[image_id], IGNORE)
        keys.update((index, int(y), int(x)) for y, x in zip(ys, xs))
    return keys


def test_labelled_pixels_and_count():
    label = np.array([[0, 255, 2], [255, 1, 1]], dtype=np.uint8)
    ys, xs, classes = labelled_pixels(label, 255)
    assert ys.tolist() == [0, 0, 1, 1] and xs.tolist() == [0, 2, 1, 2] and classes.tolist() == [0, 2, 1, 1]
    assert classes.dtype == np.int64
    assert count_labelled([label, label], 255) == 8
    assert count_labelled([label], 0) == 5
    assert iterations_per_epoch(8, 3) == 2
    with pytest.raises(ValueError, match="2-D"):
        labelled_pixels(np.zeros((2, 2, 3)), 255)


@pytest.mark.parametrize("images_per_buffer, slice_pixels", [(4, 4096), (2, 50), (1, 7), (10, 1000)])
def test_every_labelled_pixel_once_minus_tail(images_per_buffer, slice_pixels):
    batch_size = 32
    batches = run_epoch(batch_size=batch_size, images_per_buffer=images_per_buffer, slice_pixels=slice_pixels)
    total = count_labelled(LABELS.values(), IGNORE)
    assert len(batches) == total // batch_size == iterations_per_epoch(total, batch_size)
    for features, labels in batches:
        assert features.shape == (batch_size, 4) and features.dtype == torch.float32
        assert labels.shape == (batch_size,) and labels.dtype == torch.int64
    keys = pixel_keys(batches)
    counts = Counter(keys)
    assert max(counts.values()) == 1  # never twice
    expected = all_labelled_keys()
    assert set(keys) <= expected  # ignore pixels never appear
    assert len(expected) - len(keys) == total % batch_size  # only the tail is dropped
    assert all(LABELS[IMAGE_IDS[i]][y, x] != IGNORE for i, y, x in keys)


def test_features_match_their_pixel_and_label():
    for features, labels in run_epoch(slice_pixels=37):
        assert torch.equal(features[:, 3].long(), labels)
        for row, label in zip(features, labels):
            index, y, x = (int(v) for v in row[:3])
            assert LABELS[IMAGE_IDS[index]][y, x] == int(label)


def test_deterministic_per_seed_and_epoch():
    first = run_epoch(epoch=2, seed=5)
    again = run_epoch(epoch=2, seed=5)
    assert len(first) == len(again)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other_epoch = pixel_keys(run_epoch(epoch=3, seed=5))
    other_seed = pixel_keys(run_epoch(epoch=2, seed=6))
    assert other_epoch != pixel_keys(first)
    assert other_seed != pixel_keys(first)


def test_batches_mix_images_within_a_buffer():
    batches = run_epoch(images_per_buffer=4)
    images_per_batch = [len(set(features[:, 0].tolist())) for features, _ in batches]
    assert max(images_per_batch) > 1


def test_keep_last_partial_batch():
    batches = run_epoch(batch_size=32, drop_last=False)
    total = count_labelled(LABELS.values(), IGNORE)
    assert sum(len(labels) for _, labels in batches) == total
    assert len(batches[-1][1]) == total % 32
    assert set(pixel_keys(batches)) == all_labelled_keys()


def test_ignore_label_zero():
    labels = {image_id: np.where(label == IGNORE, 0, label + 1).astype(np.uint8) for image_id, label in LABELS.items()}
    batches = list(epoch_batches(IMAGE_IDS, labels.__getitem__,
                                 per_image(lambda image_id, ys, xs: torch.zeros(len(ys), 2)), 0, 16, 0, 0))
    classes = torch.cat([labels_b for _, labels_b in batches])
    assert int(classes.min()) >= 1
    assert len(classes) == count_labelled(labels.values(), 0) // 16 * 16


def test_bad_feature_shape_is_reported():
    def wrong(image_id, ys, xs):
        return torch.zeros(len(ys) + 1, 3)

    with pytest.raises(ValueError, match="pixel_features"):
        run_epoch_with(wrong)


def run_epoch_with(function):
    return list(epoch_batches(IMAGE_IDS, LABELS.__getitem__, per_image(function), IGNORE, 32, 0, 0))


@pytest.mark.parametrize("slice_pixels", [7, 50, 4096])
def test_prefetch_gives_the_same_batches(slice_pixels):
    ahead = run_epoch(epoch=1, seed=3, slice_pixels=slice_pixels, images_per_buffer=2, prefetch=True)
    inline = run_epoch(epoch=1, seed=3, slice_pixels=slice_pixels, images_per_buffer=2, prefetch=False)
    assert len(ahead) == len(inline) > 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ahead, inline))


def test_prefetch_builds_in_one_other_thread_and_stops_when_abandoned():
    import threading

    threads = set()

    def recording(image_id, ys, xs):
        threads.add(threading.get_ident())
        return pixel_features(image_id, ys, xs)

    before = threading.active_count()
    batches = epoch_batches(IMAGE_IDS, LABELS.__getitem__, per_image(recording), IGNORE, 8, 0, 0, slice_pixels=16)
    next(batches)  # the first batch, then the consumer stops (as early stopping does)
    batches.close()
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert threading.active_count() == before  # the worker is gone


def test_prefetch_thread_builds_on_one_torch_thread_and_leaves_the_others_alone():
    """The slice builder beside a training loop runs torch on one thread (a thread team of its own would slow the
    loop's parallel ops: pipeline.threads.one_thread_here); the caller's count and the count a thread started
    afterwards begins with are untouched."""
    import threading

    from pipeline.threads import torch_threads

    counts = []

    def recording(image_id, ys, xs):
        counts.append(torch.get_num_threads())
        return pixel_features(image_id, ys, xs)

    with torch_threads(2):
        batches = epoch_batches(IMAGE_IDS, LABELS.__getitem__, per_image(recording), IGNORE, 8, 0, 0,
                                slice_pixels=16)
        next(batches)
        batches.close()
        later = []
        started = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        started.start()
        started.join()
        assert counts and set(counts) == {1}
        assert torch.get_num_threads() == 2 and later == [2]


def test_error_in_the_prefetch_thread_reaches_the_consumer():
    def failing(image_id, ys, xs):
        raise OSError(f"store unreachable while reading {image_id}")

    with pytest.raises(OSError, match="store unreachable while reading img"):
        run_epoch_with(failing)


@pytest.mark.parametrize("prefetch", [True, False])
def test_slice_features_may_reuse_a_ring_of_two_buffers(prefetch):
    # epoch_batches' contract: the batches are copies, and a slice's features are not read any more once
    # slice_features is called for the slice after the next one; a ring of two output buffers is safe
    fresh = per_image(pixel_features)
    ring, calls = [torch.empty(0, 4), torch.empty(0, 4)], [0]

    def reusing(pixels):
        k = calls[0] % 2
        calls[0] += 1
        if ring[k].shape[0] < len(pixels.labels):
            ring[k] = torch.empty(len(pixels.labels), 4)
        out = ring[k][:len(pixels.labels)]
        out.copy_(fresh(pixels))
        return out

    expected = list(epoch_batches(IMAGE_IDS, LABELS.__getitem__, fresh, IGNORE, 8, 2, 1, slice_pixels=20,
                                  images_per_buffer=3, prefetch=prefetch))
    batches = list(epoch_batches(IMAGE_IDS, LABELS.__getitem__, reusing, IGNORE, 8, 2, 1, slice_pixels=20,
                                 images_per_buffer=3, prefetch=prefetch))
    assert calls[0] > 4 and len(batches) == len(expected) > 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, expected))

"""The seeded procedural data set (pipeline.synthetic): determinism, valid labels, colour-independent classes,
idempotent writes, and compatibility with the official layout reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets import load_split
from pipeline.synthetic import CLASS_NAMES, IGNORE_LABEL, PALETTE, render_sample, write_dataset

NUMBER_CLASS = len(CLASS_NAMES)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def samples(seed: int, count: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(count, size, size, 3) images and (count, size, size) labels, image i from rng [seed, 9, i]."""
    pairs = [render_sample(np.random.default_rng([seed, 9, i]), size) for i in range(count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def test_class_names_and_palette():
    assert CLASS_NAMES[0] == "background" and len(CLASS_NAMES) == len(PALETTE) == 5
    assert len(set(PALETTE)) == len(PALETTE)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTE)


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    first = write_dataset(tmp_path / "a", n_train=3, n_test=2, n_unlabelled=2, seed=7)
    write_dataset(tmp_path / "b", n_train=3, n_test=2, n_unlabelled=2, seed=7)
    write_dataset(tmp_path / "c", n_train=3, n_test=2, n_unlabelled=2, seed=8)
    a, b, c = (file_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert sorted(a) == sorted(c)
    assert all(a[name] != c[name] for name in a if name.endswith(".png"))
    assert first["seed"] == 7 and json.loads((tmp_path / "a" / "dataset.json").read_text()) == first
    assert sorted(name for name in a if name.startswith("unlabelled")) == ["unlabelled/00000.png",
                                                                          "unlabelled/00001.png"]
    image, label = render_sample(np.random.default_rng(3))
    again = render_sample(np.random.default_rng(3))
    assert np.array_equal(image, again[0]) and np.array_equal(label, again[1])


def test_splits_come_from_independent_streams(tmp_path):
    write_dataset(tmp_path / "a", n_train=2, n_test=1, seed=0)
    write_dataset(tmp_path / "b", n_train=3, n_test=4, n_unlabelled=1, seed=0)
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    for name in ["train/00000.png", "train/00000.npy", "train/00001.png", "train/00001.npy", "test/00000.png"]:
        assert a[name] == b[name], name
    assert a["train/00000.png"] != a["test/00000.png"]


@pytest.mark.parametrize("size", [32, 64])
def test_labels_are_valid_and_every_class_appears(size):
    images, labels = samples(seed=0, count=20, size=size)
    assert images.dtype == np.uint8 and images.shape == (20, size, size, 3)
    assert labels.dtype == np.uint8 and labels.shape == (20, size, size)
    assert labels.max() < NUMBER_CLASS and not (labels == IGNORE_LABEL).any()
    assert set(np.unique(labels).tolist()) == set(range(NUMBER_CLASS))
    for label in labels:
        assert (label != 0).any(), "every image has at least one object"
        assert ((label != 0) == (label == 4) | np.isin(label, [1, 2, 3])).all()


def test_objects_are_visible_against_the_background():
    """Colour changes across object outlines are much larger than inside the background."""
    images, labels = samples(seed=1, count=20)
    pixels = images.astype(np.float64)
    step = np.linalg.norm(pixels[:, :, 1:] - pixels[:, :, :-1], axis=-1)
    left, right = labels[:, :, :-1], labels[:, :, 1:]
    across = step[(left == 0) != (right == 0)].mean()
    within_background = step[(left == 0) & (right == 0)].mean()
    assert across > 2 * within_background


def test_colour_does_not_determine_class():
    """An RGB-only nearest-centroid classifier (fit on 20 images, scored on 20 others) is near chance on the
    object classes. Measured: mean recall over classes 1-4 = 0.11-0.26 (chance 0.2) over 8 seed pairs."""
    train_images, train_labels = samples(seed=10, count=20)
    test_images, test_labels = samples(seed=11, count=20)
    train_rgb, train_y = train_images.reshape(-1, 3).astype(np.float64), train_labels.reshape(-1)
    test_rgb, test_y = test_images.reshape(-1, 3).astype(np.float64), test_labels.reshape(-1)
    centroids = np.stack([train_rgb[train_y == c].mean(axis=0) for c in range(NUMBER_CLASS)])
    predicted = np.argmin(((test_rgb[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    object_recall = [(predicted[test_y == c] == c).mean() for c in range(1, NUMBER_CLASS)]
    assert np.mean(object_recall) < 0.35, object_recall
    # The class centroids are close together compared with the spread of colours.
    spread = train_rgb.std(axis=0).mean()
    assert np.abs(centroids - centroids.mean(axis=0)).max() < spread


def test_write_is_idempotent_and_rewrites_when_parameters_change(tmp_path):
    description = write_dataset(tmp_path, n_train=2, n_test=2, seed=3)
    assert description["number_class"] == NUMBER_CLASS and description["ignore_label"] == 255
    assert description["class_names"] == CLASS_NAMES and description["palette"] == [list(c) for c in PALETTE]
    marker = tmp_path / "train" / "00000.png"
    marker.write_bytes(b"tampered")  # an idempotent call does not touch existing files
    assert write_dataset(tmp_path, n_train=2, n_test=2, seed=3) == description
    assert marker.read_bytes() == b"tampered"
    smaller = write_dataset(tmp_path, n_train=1, n_test=2, seed=3)
    assert smaller["n_train"] == 1
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["00000.npy", "00000.png"]
    assert marker.read_bytes().startswith(b"\x89PNG")


def test_refuses_to_mix_with_foreign_files(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="photo.jpg"):
        write_dataset(tmp_path, n_train=1, n_test=1)


def test_written_splits_load_with_the_official_reader(tmp_path):
    description = write_dataset(tmp_path, n_train=4, n_test=3, n_unlabelled=1, size=32, seed=5)
    train = load_split(tmp_path / "train", description["n_train"], 32, description["number_class"],
                       description["ignore_label"], train=True)
    test = load_split(tmp_path / "test", 0, 64, description["number_class"], description["ignore_label"],
                      train=False)
    assert len(train) == 4 and len(test) == 3
    first_image, first_label = render_sample(np.random.default_rng([5, 0, 0]), 32)
    assert np.array_equal(np.load(tmp_path / "train" / "00000.npy"), first_label)
    expected = 2 * (first_image.astype(np.float32) / 255) - 1
    np.testing.assert_allclose(train[0].image.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert test[0].image.shape == (3, 64, 64) and test[0].label.shape == (64, 64)
    assert all(s.label.max() < NUMBER_CLASS or s.label.max() == 255 for s in train)

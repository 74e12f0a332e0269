"""A seeded procedural labelled data set: the demo data.

The class of a pixel depends on shape and context, not on colour: every image has a random-colour textured
background and 1-3 objects (disc, square, triangle; random colour, texture, size and rotation; later objects
drawn over earlier ones). Each object's outer band (within ``border_width`` pixels of its own outline) is
labelled ``border``; its inside is labelled with its shape. The border band is painted like the rest of the
object, so only the position relative to the outline tells border from inside, and only the outline's shape
tells disc from square from triangle. Colours are drawn independently of classes, so an RGB-only pixel
classifier is near chance on the object classes.

Written in the official layout (see ``pipeline.datasets``): ``<split>/<00000>.png`` (lossless) beside
``<00000>.npy`` ((H, W) uint8 class ids). Deterministic from the seed: image i of split s is drawn from its
own stream ``np.random.default_rng([seed, s, i])`` (no global RNG), so adding images or changing another
split's count never changes existing images.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES: list[str] = ["background", "disc", "square", "triangle", "border"]
PALETTE: list[tuple[int, int, int]] = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
]
IGNORE_LABEL = 255
BACKGROUND, DISC, SQUARE, TRIANGLE, BORDER = range(len(CLASS_NAMES))
SHAPE_CLASSES = (DISC, SQUARE, TRIANGLE)

GENERATOR_VERSION = 1  # bump when render_sample changes, so an old dataset.json no longer matches
SPLITS = ("train", "test", "unlabelled")  # split index = position: stream default_rng([seed, index, i])
DATASET_JSON = "dataset.json"
_FILE_NAME = re.compile(r"^\d{5}\.(png|npy)$")

_MIN_OBJECT_BACKGROUND_DISTANCE = 110.0  # RGB L2 distance so that an object stands out from the background
_MIN_OBJECT_OBJECT_DISTANCE = 70.0  # and from objects drawn before it (their overlap stays visible)
OBJECT_RADIUS = (1 / 8, 1 / 4)  # an object's radius is uniform in this range times the image size
MAX_OBJECTS = 3  # objects per image: uniform in 1..MAX_OBJECTS


def border_width(size: int) -> float:
    """Width in pixels of the ``border`` band at image size ``size`` (1.33 px at 32, 2.67 px at 64)."""
    return max(1.0, size / 24)


def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) coordinates of pixel centres, each (size, size) float64."""
    coordinates = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(coordinates, coordinates, indexing="ij")


def _depth_inside(shape_class: int, y: np.ndarray, x: np.ndarray, cy: float, cx: float, radius: float,
                  angle: float) -> np.ndarray:
    """Signed distance from each pixel centre to the shape's outline, positive inside; (size, size)."""
    dy, dx = y - cy, x - cx
    if shape_class == DISC:
        return radius - np.hypot(dy, dx)
    if shape_class == SQUARE:
        half_side = 0.85 * radius
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        return half_side - np.maximum(np.abs(u), np.abs(v))
    if shape_class == TRIANGLE:
        # Equilateral, circumradius 1.3 * radius; inside depth of a convex polygon = min over its edges
        # of the distance to the edge line (the inradius is half the circumradius).
        inradius = 0.5 * 1.3 * radius
        depths = [inradius - (dx * np.cos(angle + k * 2 * np.pi / 3) + dy * np.sin(angle + k * 2 * np.pi / 3))
                  for k in range(3)]
        return np.minimum.reduce(depths)
    raise ValueError(f"unknown shape class {shape_class}; expected one of {SHAPE_CLASSES}")


def _texture(rng: np.random.Generator, size: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A random zero-mean texture, (size, size, 3) float64: stripes, checks or noise, random amplitude."""
    kind = rng.integers(3)
    amplitude = rng.uniform(10.0, 45.0)
    if kind == 0:  # stripes of random orientation, period and phase
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(size / 10, size / 3)
        pattern = np.sign(np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period
                                 + rng.uniform(0, 2 * np.pi)))
        tint = rng.uniform(-1.0, 1.0, size=3)
        return amplitude * pattern[..., None] * tint
    if kind == 1:  # checks
        cell = rng.uniform(size / 12, size / 5)
        pattern = ((np.floor(x / cell) + np.floor(y / cell)) % 2) * 2 - 1
        tint = rng.uniform(-1.0, 1.0, size=3)
        return amplitude * pattern[..., None] * tint
    return rng.normal(0.0, amplitude / 2, size=(size, size, 3))  # per-pixel noise


def _random_colour(rng: np.random.Generator, avoid: list[np.ndarray], min_distances: list[float]) -> np.ndarray:
    """A uniform random RGB colour (3,) float64 at least ``min_distances[i]`` away from ``avoid[i]``."""
    colour = rng.uniform(0, 255, size=3)
    for _ in range(100):
        if all(np.linalg.norm(colour - other) >= distance for other, distance in zip(avoid, min_distances)):
            break
        colour = rng.uniform(0, 255, size=3)
    return colour


def render_sample(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One image and its label drawn from ``rng``.

    Returns image (size, size, 3) uint8 and label (size, size) uint8 with values in range(len(CLASS_NAMES)).
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    y, x = _pixel_centres(size)
    background_colour = _random_colour(rng, [], [])
    image = background_colour + _texture(rng, size, y, x)
    label = np.full((size, size), BACKGROUND, dtype=np.uint8)
    band = border_width(size)
    object_colours: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        shape_class = int(rng.choice(SHAPE_CLASSES))
        radius = rng.uniform(OBJECT_RADIUS[0] * size, OBJECT_RADIUS[1] * size)
        cy, cx = rng.uniform(radius, size - radius, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        depth = _depth_inside(shape_class, y, x, cy, cx, radius, angle)
        colour = _random_colour(
            rng,
            [background_colour, *object_colours],
            [_MIN_OBJECT_BACKGROUND_DISTANCE] + [_MIN_OBJECT_OBJECT_DISTANCE] * len(object_colours),
        )
        object_colours.append(colour)
        inside = depth >= 0
        image[inside] = (colour + _texture(rng, size, y, x))[inside]
        label[inside] = np.where(depth[inside] < band, BORDER, shape_class)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _parameters(size: int, seed: int, n_train: int, n_test: int, n_unlabelled: int) -> dict:
    return {
        "size": size,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "n_unlabelled": n_unlabelled,
        "class_names": list(CLASS_NAMES),
        "palette": [list(colour) for colour in PALETTE],
        "ignore_label": IGNORE_LABEL,
        "number_class": len(CLASS_NAMES),
        "generator_version": GENERATOR_VERSION,
    }


def _clear_split(directory: Path) -> None:
    """Delete the files this module wrote in ``directory``; refuse when other files are there."""
    if not directory.is_dir():
        return
    foreign = sorted(p.name for p in directory.iterdir() if not _FILE_NAME.match(p.name))
    if foreign:
        raise FileExistsError(
            f"{directory} holds files not written by the synthetic generator ({', '.join(foreign[:5])}); "
            f"expected only 00000.png / 00000.npy style files: choose an empty out_dir"
        )
    for path in directory.iterdir():
        path.unlink()


def write_dataset(out_dir: str | Path, n_train: int = 10, n_test: int = 20, n_unlabelled: int = 0,
                  size: int = 32, seed: int = 0) -> dict:
    """Write the synthetic data set under ``out_dir`` and return its description (also in dataset.json).

    Layout: ``train/`` and ``test/`` hold ``00000.png`` + ``00000.npy`` pairs, ``unlabelled/`` holds PNGs only,
    ``dataset.json`` = {size, seed, n_train, n_test, n_unlabelled, class_names, palette, ignore_label,
    number_class, generator_version}. When ``dataset.json`` already describes these parameters nothing is
    written (idempotent). Otherwise the splits are rewritten and ``dataset.json`` is written last, so an
    interrupted run is redone next time.
    """
    for name, value in (("n_train", n_train), ("n_test", n_test), ("n_unlabelled", n_unlabelled), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an integer of at least 16 pixels, got {size!r}")
    parameters = _parameters(int(size), int(seed), int(n_train), int(n_test), int(n_unlabelled))
    out_dir = Path(out_dir)
    description_path = out_dir / DATASET_JSON
    if description_path.is_file():
        try:
            existing = json.loads(description_path.read_text())
        except (OSError, ValueError):
            existing = None
        if existing == parameters:
            return existing
        description_path.unlink()

    counts = {"train": n_train, "test": n_test, "unlabelled": n_unlabelled}
    for split_index, split in enumerate(SPLITS):
        directory = out_dir / split
        _clear_split(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(counts[split]):
            image, label = render_sample(np.random.default_rng([seed, split_index, i]), size)
            Image.fromarray(image).save(directory / f"{i:05d}.png")
            if split != "unlabelled":
                np.save(directory / f"{i:05d}.npy", label)

    temporary = out_dir / (DATASET_JSON + ".tmp")
    temporary.write_text(json.dumps(parameters, indent=2) + "\n")
    os.replace(temporary, description_path)
    return parameters

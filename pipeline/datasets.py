"""The official on-disk data set layout and input transforms.

A split directory holds images (``.png``, ``.jpg``, ``.jpeg``, ``.gif``, any case, as the official listing;
searched recursively, sorted by path string) and, beside each image, a ``.npy`` label with the same stem: an (H, W) array of class ids.

Files and directories whose name starts with ``.`` (``._00001.png`` from macOS, ``.ipynb_checkpoints``) are not
part of a split. Two images of one directory with the same stem (``00001.png`` and ``00001.jpg``) are refused:
a label is found, and an output mask written, by stem.

Image transform (as the official code: PIL + torchvision ``Resize(resolution)``, ``ToTensor``, ``2x - 1``):
PIL ``open``, ``convert("RGB")`` (a GIF's first frame), must be square, PIL bilinear resize to (resolution, resolution),
``/255``, ``2x - 1`` -> float32 (3, R, R) in [-1, 1].
8-bit modes (``EIGHT_BIT_MODES``: RGB, L, P, 1, RGBA, LA, CMYK, ...) go through ``convert("RGB")`` exactly as
the official code does. 16-bit grayscale (PNG: mode ``I;16``, ``I;16B``, ``I``), which ``convert("RGB")`` would
clip to white, keeps its high byte (``v >> 8``: what PIL itself does to 16-bit RGB PNGs), then ``L -> RGB``.
Any other mode (32-bit float, ...) is refused with a DatasetError naming the file and its mode.

Label transform (as the official code: ``np.load(...).astype("uint8")`` then OpenCV ``INTER_NEAREST``
resize): nearest neighbour with OpenCV's sampling, source index = floor(dst_index * src / dst).
It is computed with numpy (no OpenCV needed) and equals ``cv2.resize(..., interpolation=INTER_NEAREST)``.
Nearest neighbour only copies values, so the resized label holds a subset of the original's values.

Training labels only: the small-annotation rule sets every class (other than the ignore label) with
0 < pixel count < ``min_annotation_pixels`` (official: 20) in an image to the ignore label, computed on the
resized label.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where a tensor is made: listing and hashing a split needs none of it
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif")  # the official listing (guided-diffusion's)
LABEL_SUFFIX = ".npy"
SMALL_ANNOTATION_MIN_PIXELS = 20  # the official rule (dataset.min_annotation_pixels)


class DatasetError(ValueError):
    """A data set file or directory is missing or does not hold what is expected (the message names it)."""


@dataclass(frozen=True, eq=False)
class Sample:
    """One image and its label after the official transforms.

    image: (3, R, R) float32 in [-1, 1] (a tensor; the same values as a numpy array when loaded with
    ``as_tensor=False``).
    label: (R, R) uint8 class ids (small-annotation rule applied when loaded with ``train=True``).
    """

    image_path: Path
    label_path: Path
    image: torch.Tensor | np.ndarray
    label: np.ndarray


def _check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise DatasetError(f"resolution must be a positive integer, got {resolution!r}")


def _list_images_recursively(directory: Path) -> list[Path]:
    """Image files under ``directory`` (following directory links, like the official listing); hidden names
    (starting with ``.``) are skipped."""
    found: list[Path] = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.extend(_list_images_recursively(Path(entry.path)))
        elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            found.append(Path(entry.path))
    return found


def label_path_for(image_path: Path) -> Path:
    """The label file expected beside ``image_path``: same stem, ``.npy`` suffix."""
    return Path(image_path).with_suffix(LABEL_SUFFIX)


def list_pairs(root: str | Path) -> list[tuple[Path, Path]]:
    """(image path, label path) for every image under ``root``, recursively, sorted by path string.

    Raises DatasetError when ``root`` is not a directory or an image has no label beside it.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"split directory {root} does not exist or is not a directory")
    images = sorted(_list_images_recursively(root), key=str)
    _refuse_shared_stems(images)
    pairs: list[tuple[Path, Path]] = []
    for image_path in images:
        label_path = label_path_for(image_path)
        if not label_path.is_file():
            raise DatasetError(
                f"image {image_path} has no label: expected {label_path} "
                f"(an (H, W) uint8 .npy array with the image's stem)"
            )
        pairs.append((image_path, label_path))
    return pairs


def _refuse_shared_stems(images: list[Path]) -> None:
    """DatasetError naming both files when two images of one directory share a stem (``00001.png`` and
    ``00001.jpg``): both would be paired with the one label ``00001.npy``, and their output masks share a name."""
    first_of: dict[Path, Path] = {}
    for path in images:
        other = first_of.setdefault(path.with_suffix(""), path)
        if other != path:
            raise DatasetError(
                f"images {other} and {path} have the same stem {path.stem!r}: labels ({path.stem}{LABEL_SUFFIX}) "
                f"and output masks are named by stem; keep one of them or rename the other"
            )


#: modes whose ``convert("RGB")`` is the official decoding (8 bits per channel, palettes, bilevel)
EIGHT_BIT_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LA", "La", "PA"})
#: single-channel 16-bit modes (PNG 16-bit grayscale): decoded by their high byte
SIXTEEN_BIT_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _to_rgb(opened: Image.Image, path: Path) -> Image.Image:
    """A decoded PIL image as 8-bit RGB: the official ``convert("RGB")`` for 8-bit modes, the high byte of
    16-bit grayscale; DatasetError naming the file and mode for anything else."""
    mode = opened.mode
    if mode in EIGHT_BIT_MODES:
        return opened.convert("RGB")
    if mode in SIXTEEN_BIT_GRAY_MODES:
        values = np.asarray(opened).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DatasetError(
                f"image {path} has mode {mode} with values in [{values.min()}, {values.max()}]; expected "
                f"16-bit grayscale 0..65535"
            )
        return Image.fromarray((values >> 8).astype(np.uint8), mode="L").convert("RGB")
    raise DatasetError(
        f"image {path} has mode {mode}, which cannot be decoded to 8-bit RGB without guessing its range; "
        f"expected 8-bit (RGB, L, P, RGBA, LA, CMYK, 1) or 16-bit grayscale/RGB"
    )


def _open_rgb(path: Path) -> Image.Image:
    """The image at ``path`` decoded and converted to 8-bit RGB (see ``_to_rgb``; a GIF's first frame, as the
    official ``Image.open(path).convert("RGB")``); DatasetError names the file and PIL's reason."""
    try:
        with Image.open(path) as opened:
            opened.load()
            rgb = _to_rgb(opened, path)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        if isinstance(error, DatasetError):
            raise
        raise DatasetError(f"cannot read image {path}: {error}") from error
    return rgb


def _rgb_to_array(rgb: Image.Image, path: Path, resolution: int) -> np.ndarray:
    """Square RGB PIL image -> (3, R, R) float32 in [-1, 1] (bilinear resize, /255, 2x - 1): bit for bit what
    torchvision's ToTensor then ``2x - 1`` give (float32 division and subtraction round the same way)."""
    width, height = rgb.size
    if width != height:
        raise DatasetError(
            f"image {path} is {width}x{height} (width x height); only square images are supported"
        )
    if rgb.size != (resolution, resolution):
        rgb = rgb.resize((resolution, resolution), Image.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)  # (3, R, R) uint8
    unit = pixels.astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(2 * unit - 1)


def _rgb_to_tensor(rgb: Image.Image, path: Path, resolution: int) -> torch.Tensor:
    """Square RGB PIL image -> (3, R, R) float32 tensor in [-1, 1] (``_rgb_to_array``)."""
    import torch

    return torch.from_numpy(_rgb_to_array(rgb, path, resolution))


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """The official image transform: returns (3, resolution, resolution) float32 in [-1, 1].

    Raises DatasetError when the file cannot be decoded (naming the file and PIL's reason) or is not square.
    """
    _check_resolution(resolution)
    path = Path(path)
    return _rgb_to_tensor(_open_rgb(path), path, resolution)


def _read_label(path: Path) -> np.ndarray:
    """The (H, W) uint8 array stored at ``path``; DatasetError when unreadable, not 2-D or not class ids."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DatasetError(f"cannot read label {path}: {error}") from error
    if not isinstance(array, np.ndarray):
        array.close()
        raise DatasetError(f"label {path} holds several arrays (.npz); expected one (H, W) .npy array")
    if array.ndim != 2:
        raise DatasetError(f"label {path} has shape {array.shape}; expected a 2-D (H, W) array of class ids")
    if array.size == 0:
        raise DatasetError(f"label {path} is empty (shape {array.shape}); expected a 2-D (H, W) array")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "biuf":
        raise DatasetError(f"label {path} has dtype {array.dtype}; expected uint8 class ids")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array) & (array == np.round(array))):
        raise DatasetError(f"label {path} has non-integer values (dtype {array.dtype}); expected uint8 class ids")
    low, high = array.min(), array.max()
    if low < 0 or high > 255:
        raise DatasetError(
            f"label {path} has values in [{low}, {high}] (dtype {array.dtype}); expected uint8 class ids 0..255"
        )
    return array.astype(np.uint8)


def resize_label_nearest(label: np.ndarray, resolution: int) -> np.ndarray:
    """(H, W) label -> (resolution, resolution) by nearest neighbour, exactly as OpenCV ``INTER_NEAREST``.

    Source row of output row y: min(floor(y * (1 / (resolution / H))), H - 1); same for columns.
    """
    height, width = label.shape
    if (height, width) == (resolution, resolution):
        return label.copy()
    targets = np.arange(resolution, dtype=np.float64)
    rows = np.minimum(np.floor(targets * (1.0 / (resolution / height))).astype(np.int64), height - 1)
    cols = np.minimum(np.floor(targets * (1.0 / (resolution / width))).astype(np.int64), width - 1)
    return np.ascontiguousarray(label[rows[:, None], cols[None, :]])


def _check_label_shape(label: np.ndarray, path: Path, image_size: tuple[int, int] | None) -> None:
    if image_size is not None and tuple(label.shape) != tuple(image_size):
        raise DatasetError(
            f"label {path} has shape {tuple(label.shape)} (H, W) but its image is "
            f"{tuple(image_size)} (H, W); the label must have the image's original size"
        )


def load_label(path: Path, resolution: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The official label transform: returns (resolution, resolution) uint8 class ids.

    ``image_size`` is the image's original (H, W); when given, the label must have that shape.
    Raises DatasetError when the file is unreadable, not 2-D, not class ids, or of the wrong shape.
    """
    _check_resolution(resolution)
    path = Path(path)
    label = _read_label(path)
    _check_label_shape(label, path, image_size)
    return resize_label_nearest(label, resolution)


def apply_small_annotation_rule(
    label: np.ndarray, ignore_label: int, min_pixels: int = SMALL_ANNOTATION_MIN_PIXELS
) -> np.ndarray:
    """A copy of the (H, W) ``label`` where every class other than ``ignore_label`` with
    0 < pixel count < ``min_pixels`` is set to ``ignore_label`` (official training-label rule)."""
    result = label.copy()
    values, counts = np.unique(label, return_counts=True)
    for value, count in zip(values.tolist(), counts.tolist()):
        if value != ignore_label and 0 < count < min_pixels:
            result[label == value] = ignore_label
    return result


def validate_label_values(label: np.ndarray, number_class: int, ignore_label: int, path: Path) -> None:
    """Raise DatasetError when ``label`` holds a value >= ``number_class`` other than ``ignore_label``."""
    values = np.unique(label)
    bad = [int(v) for v in values if v >= number_class and v != ignore_label]
    if bad:
        raise DatasetError(
            f"label {path} has class ids {bad} outside the allowed range 0..{number_class - 1} "
            f"(number_class={number_class}; ignore label {ignore_label} is also allowed)"
        )


def _select_pairs(root: str | Path, number: int | None) -> list[tuple[Path, Path]]:
    pairs = list_pairs(root)
    if not pairs:
        raise DatasetError(
            f"split directory {root} holds no images (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    if number is None or number <= 0:
        return pairs
    if len(pairs) < number:
        raise DatasetError(f"split directory {root}: found {len(pairs)} images, config asks {number}")
    return pairs[:number]


def _load_sample(
    image_path: Path, label_path: Path, resolution: int, number_class: int, ignore_label: int, train: bool,
    min_annotation_pixels: int, as_tensor: bool = True,
) -> Sample:
    rgb = _open_rgb(image_path)
    image = (_rgb_to_tensor if as_tensor else _rgb_to_array)(rgb, image_path, resolution)
    raw_label = _read_label(label_path)
    width, height = rgb.size
    _check_label_shape(raw_label, label_path, (height, width))
    validate_label_values(raw_label, number_class, ignore_label, label_path)
    label = resize_label_nearest(raw_label, resolution)
    if train:
        label = apply_small_annotation_rule(label, ignore_label, min_annotation_pixels)
    return Sample(image_path=image_path, label_path=label_path, image=image, label=label)


def _check_split_arguments(number_class: int, ignore_label: int, resolution: int) -> None:
    _check_resolution(resolution)
    if number_class <= 0:
        raise DatasetError(f"number_class must be positive, got {number_class}")
    if not 0 <= ignore_label <= 255:
        raise DatasetError(f"ignore_label must be a uint8 value 0..255, got {ignore_label}")


def iter_split(
    root: str | Path, number: int | None, resolution: int, number_class: int, ignore_label: int, train: bool,
    min_annotation_pixels: int = SMALL_ANNOTATION_MIN_PIXELS, as_tensor: bool = True,
) -> Iterator[Sample]:
    """Like ``load_split`` but decodes one Sample at a time (listing and count checks happen first)."""
    _check_split_arguments(number_class, ignore_label, resolution)
    if isinstance(min_annotation_pixels, bool) or not isinstance(min_annotation_pixels, (int, np.integer)) \
            or min_annotation_pixels < 0:
        raise DatasetError(f"min_annotation_pixels must be an integer >= 0, got {min_annotation_pixels!r}")
    pairs = _select_pairs(root, number)

    def generate() -> Iterator[Sample]:
        for image_path, label_path in pairs:
            yield _load_sample(image_path, label_path, resolution, number_class, ignore_label, train,
                               int(min_annotation_pixels), as_tensor)

    return generate()


def load_split(
    root: str | Path, number: int | None, resolution: int, number_class: int, ignore_label: int, train: bool,
    min_annotation_pixels: int = SMALL_ANNOTATION_MIN_PIXELS, as_tensor: bool = True,
) -> list[Sample]:
    """The first ``number`` (all when None or <= 0) samples of the split directory ``root``.

    Each Sample: image (3, R, R) float32 in [-1, 1], label (R, R) uint8; with ``train=True`` the
    small-annotation rule (classes with fewer than ``min_annotation_pixels`` pixels -> ignore label) is applied to
    the label. Raises DatasetError for an empty split, fewer images
    than ``number``, a missing / unreadable / mis-shaped label, label values >= ``number_class`` other than
    ``ignore_label``, and unreadable or non-square images. With ``as_tensor=False`` the images are numpy arrays
    of the same values (no torch import).
    """
    return list(iter_split(root, number, resolution, number_class, ignore_label, train, min_annotation_pixels,
                           as_tensor))

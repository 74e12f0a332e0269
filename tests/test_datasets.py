"""The official on-disk layout and transforms (pipeline.datasets), on small data sets built in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.datasets import (
    DatasetError,
    apply_small_annotation_rule,
    iter_split,
    list_pairs,
    load_image,
    load_label,
    load_split,
    resize_label_nearest,
    validate_label_values,
)


def write_image(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
    return path


def write_pair(directory: Path, stem: str, size: int = 16, label: np.ndarray | None = None,
               seed: int = 0, suffix: str = ".png") -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    image_path = write_image(directory / f"{stem}{suffix}", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    if label is None:
        label = rng.integers(0, 3, (size, size), dtype=np.uint8)
    label_path = directory / f"{stem}.npy"
    np.save(label_path, label)
    return image_path, label_path


def hand_transform(image: Image.Image, resolution: int) -> np.ndarray:
    """torchvision's Resize(resolution) + ToTensor + 2x-1, written out by hand: (3, R, R) float32."""
    resized = image.convert("RGB").resize((resolution, resolution), Image.BILINEAR)
    unit = np.asarray(resized).astype(np.float32) / np.float32(255)
    return (2 * unit - 1).transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------- listing


def test_list_pairs_is_recursive_sorted_by_path_string_and_filters_extensions(tmp_path):
    for relative in ["b.png", "a.jpg", "sub/c.PNG", "sub/d.JpEg", "a/b.png", "a-c/x.png"]:
        stem = relative.rsplit(".", 1)[0]
        write_pair(tmp_path, stem, suffix="." + relative.rsplit(".", 1)[1])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "e.bmp").write_bytes(b"BM")  # not in the official listing's extensions
    pairs = list_pairs(tmp_path)
    images = [str(image.relative_to(tmp_path)) for image, _ in pairs]
    # Sorted by the path *string* (as the official code): "a-c/..." < "a.jpg" < "a/..." since '-' < '.' < '/'.
    assert images == ["a-c/x.png", "a.jpg", "a/b.png", "b.png", "sub/c.PNG", "sub/d.JpEg"]
    for image, label in pairs:
        assert label == image.with_suffix(".npy")


def test_first_number_files_are_used_and_zero_or_none_means_all(tmp_path):
    for index in range(5):
        write_pair(tmp_path, f"{index:03d}", seed=index)
    first_three = load_split(tmp_path, 3, 8, number_class=3, ignore_label=255, train=False)
    assert [s.image_path.name for s in first_three] == ["000.png", "001.png", "002.png"]
    assert len(load_split(tmp_path, 0, 8, 3, 255, False)) == 5
    assert len(load_split(tmp_path, None, 8, 3, 255, False)) == 5
    lazy = iter_split(tmp_path, 2, 8, 3, 255, False)
    assert [s.image_path.name for s in lazy] == ["000.png", "001.png"]


# ------------------------------------------------------------------------------------------ transforms


def test_image_transform_equals_official_bilinear_resize_then_2x_minus_1(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    path = write_image(tmp_path / "img.png", pixels)
    tensor = load_image(path, 32)
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (3, 32, 32)
    np.testing.assert_allclose(tensor.numpy(), hand_transform(Image.open(path), 32), rtol=0, atol=1e-6)
    assert tensor.min() >= -1 and tensor.max() <= 1
    # Same size: no resampling, exactly 2 * v / 255 - 1.
    same = load_image(path, 48)
    expected = (2 * (pixels.astype(np.float32) / 255) - 1).transpose(2, 0, 1)
    np.testing.assert_allclose(same.numpy(), expected, rtol=0, atol=1e-6)
    # Upsampling too.
    np.testing.assert_allclose(load_image(path, 64).numpy(), hand_transform(Image.open(path), 64), atol=1e-6)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_rgba_greyscale_and_palette_images_are_converted_to_rgb(tmp_path, mode):
    pixels = np.random.default_rng(2).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    path = write_image(tmp_path / f"img_{mode}.png", pixels, mode=mode)
    assert Image.open(path).mode == mode
    tensor = load_image(path, 20)
    assert tuple(tensor.shape) == (3, 20, 20)
    np.testing.assert_allclose(tensor.numpy(), hand_transform(Image.open(path), 20), atol=1e-6)
    if mode == "L":
        assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])
    else:
        assert not torch.equal(tensor[0], tensor[1])


def test_gif_images_are_listed_and_read_as_their_first_frame_in_rgb(tmp_path):
    """The official listing takes .gif; Image.open(path).convert("RGB") reads the first frame."""
    rng = np.random.default_rng(3)
    frames = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P") for _ in range(2)]
    gif = tmp_path / "b.GIF"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(gif).n_frames == 2
    np.save(tmp_path / "b.npy", np.zeros((16, 16), dtype=np.uint8))
    write_pair(tmp_path, "a", size=16)
    assert [image.name for image, _ in list_pairs(tmp_path)] == ["a.png", "b.GIF"]
    sample = load_split(tmp_path, 2, 16, number_class=3, ignore_label=255, train=True)[1]
    first_frame = np.asarray(Image.open(gif).convert("RGB"))
    expected = (2 * (first_frame.astype(np.float32) / 255) - 1).transpose(2, 0, 1)
    np.testing.assert_array_equal(sample.image.numpy(), expected)
    second = Image.open(gif)
    second.seek(1)
    assert not np.array_equal(np.asarray(second.convert("RGB")), first_frame)  # the frames differ: frame 0 read
    np.testing.assert_allclose(load_image(gif, 32).numpy(), hand_transform(Image.open(gif), 32), atol=1e-6)


def test_nearest_label_resize_keeps_only_existing_values(tmp_path):
    label = np.random.default_rng(3).choice(np.array([0, 3, 7], dtype=np.uint8), size=(50, 50))
    path = tmp_path / "label.npy"
    np.save(path, label)
    for resolution in (16, 32, 50, 80):
        resized = load_label(path, resolution)
        assert resized.dtype == np.uint8 and resized.shape == (resolution, resolution)
        assert set(np.unique(resized).tolist()) <= {0, 3, 7}
    assert np.array_equal(load_label(path, 50), label)
    # Exact block replication for an integer factor: OpenCV INTER_NEAREST takes source index floor(y * src / dst).
    small = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert np.array_equal(resize_label_nearest(small, 8), small.repeat(2, 0).repeat(2, 1))
    assert np.array_equal(resize_label_nearest(small, 2), small[::2, ::2])


def test_nearest_label_resize_equals_opencv_inter_nearest():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(4)
    for source in (7, 50, 255, 256, 300, 512, 768):
        label = rng.integers(0, 256, (source, source), dtype=np.uint8)
        for resolution in (5, 32, 64, 128, 256, 512):
            expected = cv2.resize(label, (resolution, resolution), interpolation=cv2.INTER_NEAREST)
            assert np.array_equal(resize_label_nearest(label, resolution), expected), (source, resolution)


def test_label_of_another_integer_dtype_is_read_as_uint8(tmp_path):
    path = tmp_path / "label.npy"
    np.save(path, np.array([[0, 1], [2, 255]], dtype=np.int64))
    loaded = load_label(path, 2)
    assert loaded.dtype == np.uint8 and loaded.tolist() == [[0, 1], [2, 255]]
    np.save(path, np.array([[0, 1], [2, 256]], dtype=np.int64))
    with pytest.raises(DatasetError, match="label.npy.*0..255"):
        load_label(path, 2)


# ----------------------------------------------------------------------------------- small annotations


def small_annotation_label() -> np.ndarray:
    label = np.zeros((32, 32), dtype=np.uint8)
    label[0, :5] = 1  # 5 pixels: dropped in training labels
    label[10:15, 10:15] = 2  # 25 pixels: kept
    label[31, :3] = 255  # the ignore label itself, 3 pixels: untouched
    return label


def test_small_annotation_rule_sets_rare_classes_to_ignore():
    label = small_annotation_label()
    result = apply_small_annotation_rule(label, ignore_label=255)
    assert (result == 1).sum() == 0
    assert (result == 2).sum() == 25
    assert (result == 255).sum() == 5 + 3
    assert (result == 0).sum() == (label == 0).sum()
    assert (label == 1).sum() == 5, "the input is not modified"
    # Boundary: 19 pixels dropped, 20 kept.
    boundary = np.zeros((10, 10), dtype=np.uint8)
    boundary[0, :10], boundary[1, :9] = 1, 1  # 19 pixels
    boundary[5:7, :10] = 2  # 20 pixels
    result = apply_small_annotation_rule(boundary, ignore_label=0)
    assert (result == 1).sum() == 0 and (result == 2).sum() == 20


def test_small_annotation_rule_applied_only_to_training_labels(tmp_path):
    write_pair(tmp_path, "x", size=32, label=small_annotation_label())
    train = load_split(tmp_path, 1, 32, number_class=3, ignore_label=255, train=True)[0]
    test = load_split(tmp_path, 1, 32, number_class=3, ignore_label=255, train=False)[0]
    assert np.array_equal(train.label, apply_small_annotation_rule(small_annotation_label(), 255))
    assert np.array_equal(test.label, small_annotation_label())
    assert train.label.dtype == np.uint8 and train.image.shape == (3, 32, 32)


def test_small_annotation_threshold_is_the_given_min_annotation_pixels(tmp_path):
    write_pair(tmp_path, "x", size=32, label=small_annotation_label())  # class 1: 5 pixels, class 2: 25 pixels
    labels = {n: load_split(tmp_path, 1, 32, 3, 255, train=True, min_annotation_pixels=n)[0].label
              for n in (0, 5, 6, 20, 26)}
    assert np.array_equal(labels[0], small_annotation_label())  # 0: the rule drops nothing
    assert (labels[5] == 1).sum() == 5 and (labels[6] == 1).sum() == 0  # a class is kept from n pixels on
    assert np.array_equal(labels[20], apply_small_annotation_rule(small_annotation_label(), 255))
    assert (labels[26] == 2).sum() == 0 and (labels[26] == 255).sum() == 5 + 25 + 3
    assert np.array_equal(load_split(tmp_path, 1, 32, 3, 255, train=False, min_annotation_pixels=26)[0].label,
                          small_annotation_label())  # test labels never
    with pytest.raises(DatasetError, match="min_annotation_pixels must be an integer >= 0, got -1"):
        load_split(tmp_path, 1, 32, 3, 255, train=True, min_annotation_pixels=-1)


def test_small_annotation_rule_uses_the_resized_label(tmp_path):
    label = np.zeros((64, 64), dtype=np.uint8)
    label[:8, :8] = 1  # 64 pixels at 64 px, 16 pixels at 32 px
    write_pair(tmp_path, "x", size=64, label=label)
    assert (load_split(tmp_path, 1, 64, 2, 255, train=True)[0].label == 1).sum() == 64
    at_32 = load_split(tmp_path, 1, 32, 2, 255, train=True)[0].label
    assert (at_32 == 1).sum() == 0 and (at_32 == 255).sum() == 16


# ---------------------------------------------------------------------------------------------- errors


def test_missing_label_names_the_image_and_the_expected_label(tmp_path):
    write_pair(tmp_path, "good")
    write_image(tmp_path / "orphan.png", np.zeros((16, 16, 3), dtype=np.uint8))
    with pytest.raises(DatasetError) as error:
        list_pairs(tmp_path)
    assert str(tmp_path / "orphan.png") in str(error.value)
    assert str(tmp_path / "orphan.npy") in str(error.value)


def test_label_shape_not_matching_the_image_names_both_shapes(tmp_path):
    write_pair(tmp_path, "x", size=16, label=np.zeros((16, 12), dtype=np.uint8))
    with pytest.raises(DatasetError) as error:
        load_split(tmp_path, 1, 16, 3, 255, train=False)
    message = str(error.value)
    assert str(tmp_path / "x.npy") in message and "(16, 12)" in message and "(16, 16)" in message
    with pytest.raises(DatasetError, match="x.npy"):
        load_label(tmp_path / "x.npy", 16, image_size=(16, 16))


def test_label_values_out_of_range_name_the_file_values_and_range(tmp_path):
    label = np.zeros((16, 16), dtype=np.uint8)
    label[0, 0], label[0, 1], label[0, 2] = 3, 7, 255
    write_pair(tmp_path, "x", label=label)
    with pytest.raises(DatasetError) as error:
        load_split(tmp_path, 1, 16, number_class=3, ignore_label=255, train=False)
    message = str(error.value)
    assert str(tmp_path / "x.npy") in message and "[3, 7]" in message and "0..2" in message
    # The ignore label itself is accepted, also when it is >= number_class.
    label[0, 0] = label[0, 1] = 2
    np.save(tmp_path / "x.npy", label)
    assert (load_split(tmp_path, 1, 16, 3, 255, train=False)[0].label == 255).sum() == 1
    validate_label_values(label, 3, 255, tmp_path / "x.npy")
    with pytest.raises(DatasetError, match="255"):
        validate_label_values(label, 3, 0, tmp_path / "x.npy")


def test_non_square_image_names_the_file_and_size(tmp_path):
    path = write_image(tmp_path / "wide.png", np.zeros((16, 24, 3), dtype=np.uint8))
    np.save(tmp_path / "wide.npy", np.zeros((16, 24), dtype=np.uint8))
    with pytest.raises(DatasetError) as error:
        load_image(path, 16)
    assert str(path) in str(error.value) and "24x16" in str(error.value)
    with pytest.raises(DatasetError, match="wide.png"):
        load_split(tmp_path, 1, 16, 3, 255, train=False)


def test_unreadable_image_names_the_file_and_the_reason(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not a png at all" * 10)
    np.save(tmp_path / "garbage.npy", np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(DatasetError) as error:
        load_split(tmp_path, 1, 16, 3, 255, train=True)
    assert str(path) in str(error.value) and "cannot identify image file" in str(error.value)
    # A truncated PNG fails on decoding, not on opening.
    good = write_image(tmp_path / "sub" / "trunc.png", np.random.default_rng(0).integers(0, 256, (32, 32, 3),
                                                                                          dtype=np.uint8))
    good.write_bytes(good.read_bytes()[:100])
    with pytest.raises(DatasetError, match="trunc.png"):
        load_image(good, 16)


def test_unreadable_or_not_2d_label_names_the_file(tmp_path):
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"\x00garbage bytes")
    with pytest.raises(DatasetError, match="garbage.npy"):
        load_label(garbage, 8)
    cube = tmp_path / "cube.npy"
    np.save(cube, np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"cube.npy has shape \(4, 4, 3\)"):
        load_label(cube, 8)


def test_empty_split_names_the_directory(tmp_path):
    (tmp_path / "nested").mkdir()
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError) as error:
        load_split(tmp_path, 0, 16, 3, 255, train=False)
    assert str(tmp_path) in str(error.value) and "no images" in str(error.value)
    with pytest.raises(DatasetError, match="does not exist"):
        load_split(tmp_path / "missing", 0, 16, 3, 255, train=False)


def test_fewer_images_than_asked_says_found_and_asked(tmp_path):
    for index in range(3):
        write_pair(tmp_path, f"{index}", seed=index)
    with pytest.raises(DatasetError) as error:
        load_split(tmp_path, 5, 16, 3, 255, train=True)
    assert str(tmp_path) in str(error.value) and "found 3" in str(error.value) and "config asks 5" in str(error.value)


# ------------------------------------------------------------------------------- image modes, odd files


def _png16(path: Path, values: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG written byte by byte (PIL cannot write 16-bit RGB): values (H, W[, C]) uint16;
    color_type 0 gray, 2 RGB, 4 gray + alpha, 6 RGBA."""
    import struct
    import zlib

    height, width = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def test_16_bit_grayscale_png_decodes_like_its_8_bit_original(tmp_path):
    """PIL's convert("RGB") clips 16-bit values to 255 (an all-white input); the high byte is the image."""
    eight = np.random.default_rng(3).integers(0, 256, (16, 16), dtype=np.uint8)
    reference = load_image(write_image(tmp_path / "gray8.png", eight), 16)
    path = _png16(tmp_path / "gray16.png", eight.astype(np.uint16) * 257, color_type=0)
    assert Image.open(path).mode == "I;16"
    tensor = load_image(path, 16)
    assert torch.equal(tensor, reference)
    assert tensor.min() < 0  # not saturated to white


@pytest.mark.parametrize("color_type", [2, 4, 6])
def test_16_bit_colour_pngs_decode_like_their_8_bit_originals(tmp_path, color_type):
    channels = {2: 3, 4: 2, 6: 4}[color_type]
    eight = np.random.default_rng(4).integers(0, 256, (16, 16, channels), dtype=np.uint8)
    path = _png16(tmp_path / f"c{color_type}.png", eight.astype(np.uint16) * 257, color_type)
    expected = Image.fromarray(eight if channels != 2 else eight[..., 0], mode={3: "RGB", 2: "L", 4: "RGBA"}[channels])
    np.testing.assert_array_equal(load_image(path, 16).numpy(), hand_transform(expected, 16))


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "1", "LA", "RGBA", "CMYK"])
def test_8_bit_modes_decode_exactly_as_pil_convert_rgb(tmp_path, mode):
    """The official decoding (PIL convert("RGB")) for every 8-bit mode: recipe paper stays identical."""
    pixels = np.random.default_rng(5).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = write_image(tmp_path / f"img_{mode}{suffix}", pixels, mode=mode)
    assert Image.open(path).mode == mode
    np.testing.assert_array_equal(load_image(path, 12).numpy(), hand_transform(Image.open(path), 12))


def test_image_mode_that_cannot_be_decoded_is_refused_by_name(tmp_path):
    """A float image (a TIFF behind a .png name: PIL opens by content) has no known range: refused, naming the
    file and its mode, not clipped."""
    path = tmp_path / "float.png"
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(path, format="TIFF")
    with pytest.raises(DatasetError) as caught:
        load_image(path, 8)
    message = str(caught.value)
    assert str(path) in message and "mode F" in message and "\n" not in message


def test_same_stem_with_two_extensions_is_refused_naming_both(tmp_path):
    write_pair(tmp_path, "00001", suffix=".png")
    write_pair(tmp_path, "00001", suffix=".jpg", seed=1)
    write_pair(tmp_path, "00002")
    with pytest.raises(DatasetError) as caught:
        list_pairs(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "00001.png") in message and str(tmp_path / "00001.jpg") in message
    assert "\n" not in message


def test_hidden_files_and_directories_are_not_images(tmp_path):
    """macOS leaves ._00001.png (AppleDouble metadata, not a PNG) beside each file; notebooks leave
    .ipynb_checkpoints/: neither is part of the split."""
    write_pair(tmp_path, "00001")
    (tmp_path / "._00001.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_pair(tmp_path / ".ipynb_checkpoints", "00001-checkpoint")
    assert [image.name for image, _ in list_pairs(tmp_path)] == ["00001.png"]
    assert len(load_split(tmp_path, None, 16, 3, 255, train=False)) == 1

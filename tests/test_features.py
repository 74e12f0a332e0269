"""Pixel features: sampling at points equals the official upsample + concatenate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.backbone import extract_blocks, make_noise
from pipeline.features import feature_dim, image_features, sample_pixel_features, upsample_concat


def _random_maps(sizes: list[int], channels: int = 4, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(channels + i, s, s, generator=generator).to(dtype) for i, s in enumerate(sizes)]


def _pixels(size: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random pixels plus the four corners and edge midpoints (where the clamping happens)."""
    generator = torch.Generator().manual_seed(seed)
    ys = torch.randint(0, size, (n,), generator=generator)
    xs = torch.randint(0, size, (n,), generator=generator)
    edge_ys = torch.tensor([0, 0, size - 1, size - 1, 0, size // 2, size - 1])
    edge_xs = torch.tensor([0, size - 1, 0, size - 1, size // 2, 0, size // 2])
    return torch.cat([ys, edge_ys]), torch.cat([xs, edge_xs])


@pytest.mark.parametrize(
    ("sizes", "size"),
    [
        ([8, 16, 32], 32),  # the tiny UNet's resolutions, including the identity 32 -> 32
        ([8, 16, 32, 64, 128, 256], 256),  # the official ratios up to 32x
        ([5, 7, 33], 40),  # non-integer ratios
        ([64], 32),  # downsampling
    ],
)
def test_sampled_pixels_equal_upsample_concat(sizes, size):
    maps = _random_maps(sizes)
    ys, xs = _pixels(size, 400)
    expected = upsample_concat(maps, size)[:, ys, xs].T
    sampled = sample_pixel_features(maps, ys, xs, size)
    assert sampled.shape == (len(ys), feature_dim([m.shape[0] for m in maps]))
    assert sampled.dtype == torch.float32
    torch.testing.assert_close(sampled, expected, atol=1e-5, rtol=1e-5)


def test_every_pixel_of_a_small_image():
    maps = _random_maps([3, 8, 13, 16], seed=1)
    size = 16
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    sampled = sample_pixel_features(maps, ys.flatten(), xs.flatten(), size)
    full = image_features(maps, size)
    assert full.shape == (feature_dim([4, 5, 6, 7]), size, size)
    torch.testing.assert_close(sampled, full.flatten(1).T, atol=1e-5, rtol=1e-5)


def test_identity_size_returns_the_map_values():
    (fmap,) = _random_maps([32])
    ys, xs = _pixels(32, 100)
    assert torch.equal(sample_pixel_features([fmap], ys, xs, 32), fmap[:, ys, xs].T)
    assert torch.equal(upsample_concat([fmap], 32), fmap)


def test_channel_order_follows_the_list():
    maps = _random_maps([8, 32])
    ys, xs = _pixels(32, 10)
    sampled = sample_pixel_features(maps, ys, xs, 32)
    assert torch.equal(sampled[:, maps[0].shape[0] :], maps[1][:, ys, xs].T)


def test_float16_maps_are_upcast():
    maps16 = _random_maps([8, 16, 32], dtype=torch.float16)
    ys, xs = _pixels(32, 300)
    sampled = sample_pixel_features(maps16, ys, xs, 32)
    assert sampled.dtype == torch.float32
    torch.testing.assert_close(sampled, upsample_concat(maps16, 32)[:, ys, xs].T, atol=1e-5, rtol=1e-5)


def test_bad_pixel_indices_are_refused():
    maps = _random_maps([8])
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        sample_pixel_features(maps, torch.tensor([32]), torch.tensor([0]), 32)
    with pytest.raises(ValueError, match="equal length"):
        sample_pixel_features(maps, torch.tensor([1, 2]), torch.tensor([0]), 32)
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        sample_pixel_features([torch.zeros(1, 2, 8, 8)], torch.tensor([1]), torch.tensor([0]), 32)


def test_feature_dim():
    assert feature_dim([1024, 512, 512, 512, 256]) == 2816
    assert feature_dim([]) == 0


def test_real_unet_maps_through_float16_store(tiny_backbone):
    """Features of real tiny-UNet maps kept as float16 (as the store does) match the official in-memory
    float32 computation to float16 precision, and exactly when both sides use the same float16 maps."""
    model, diffusion, flags = tiny_backbone
    size = flags["image_size"]
    steps, blocks = [50, 150], [0, 2, 3, 5]  # 8x8, 16x16, 32x32 (identity), 32x32
    generator = torch.Generator().manual_seed(7)
    x0 = torch.rand(2, 3, size, size, generator=generator) * 2 - 1
    noise = make_noise(0, size, torch.device("cpu"))
    per_step = [extract_blocks(model, diffusion, x0, t, noise, blocks) for t in steps]
    ys, xs = _pixels(size, 500, seed=3)
    for image in range(2):
        maps32 = [per_step[s][b][image] for s in range(len(steps)) for b in blocks]  # official order
        maps16 = [m.half() for m in maps32]
        official = upsample_concat(maps32, size)[:, ys, xs].T
        assert official.shape[1] == 2 * feature_dim([64, 64, 64, 32])
        from_store = sample_pixel_features(maps16, ys, xs, size)
        scale = official.abs().max().item()
        assert scale > 0.1  # real, non-degenerate activations
        torch.testing.assert_close(from_store, official, atol=1e-2 * scale, rtol=0)
        assert (from_store - official).abs().max() > 0  # the float16 rounding is really there
        same16 = upsample_concat(maps16, size)[:, ys, xs].T
        torch.testing.assert_close(from_store, same16, atol=1e-5, rtol=1e-5)


def test_map_tables_sample_every_image_of_a_buffer_exactly_like_per_image_sampling():
    from pipeline.features import load_maps, map_tables, sample_tables

    rng = np.random.default_rng(5)
    shapes = [(6, 4, 4), (3, 8, 8), (2, 16, 16)]
    images = [[torch.from_numpy(rng.standard_normal(s).astype(np.float16)) for s in shapes] for _ in range(3)]
    tables = map_tables(shapes, slots=4)
    assert tables.slots == 4 and tables.dim == 11
    for slot, maps in zip((2, 0, 3), images):  # any slot: the image -> slot mapping is the caller's
        load_maps(tables, slot, maps)
    n = 500
    which = torch.from_numpy(rng.integers(0, 3, n))
    ys, xs = torch.from_numpy(rng.integers(0, 32, n)), torch.from_numpy(rng.integers(0, 32, n))
    slots = torch.tensor([2, 0, 3])[which]
    sampled = sample_tables(tables, slots, ys, xs, 32)
    for k, maps in enumerate(images):
        rows = which == k
        assert torch.equal(sampled[rows], sample_pixel_features(maps, ys[rows], xs[rows], 32))  # bit for bit


def test_map_tables_refuse_what_they_cannot_hold():
    from pipeline.features import load_maps, map_tables, sample_tables

    tables = map_tables([(2, 4, 4)], slots=2)
    with pytest.raises(ValueError, match="slot 2 out of range"):
        load_maps(tables, 2, [torch.zeros(2, 4, 4)])
    with pytest.raises(ValueError, match=r"do not match the tables' \[\(2, 4, 4\)\]"):
        load_maps(tables, 0, [torch.zeros(3, 4, 4)])
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 2\)"):
        sample_tables(tables, torch.tensor([2]), torch.tensor([0]), torch.tensor([0]), 16)
    with pytest.raises(ValueError, match=r"pixel coordinates must lie in \[0, 16\)"):
        sample_tables(tables, torch.tensor([0]), torch.tensor([16]), torch.tensor([0]), 16)

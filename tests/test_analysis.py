"""Analysis numerics (index lists, size groups, k-means maps, sweep tables) and the report figures."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image

from pipeline import analysis, report


# -- index lists -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("0-17", list(range(18))),
    ("5,6,12", [5, 6, 12]),
    ("0,50,...,950", list(range(0, 951, 50))),
    ("0-950:50", list(range(0, 951, 50))),
    ("0,100,...,250", [0, 100, 200, 250]),  # the end is always included
    ("3, 1-2, 3", [3, 1, 2]),  # order kept, duplicates dropped
])
def test_parse_index_list(text, expected):
    assert analysis.parse_index_list(text) == expected


@pytest.mark.parametrize("text", ["", "a", "5-2", "1,,2", "...,5", "0,...,5", "10,5,...,20", "0,50,...,x"])
def test_parse_index_list_rejects_bad_input(text):
    with pytest.raises(ValueError):
        analysis.parse_index_list(text)


# -- size groups -------------------------------------------------------------------------------------------------
def _label(counts: dict[int, int], size: int = 10, fill: int = 0) -> np.ndarray:
    flat = np.full(size * size, fill, dtype=np.uint8)
    i = 0
    for c, n in counts.items():
        flat[i:i + n] = c
        i += n
    return flat.reshape(size, size)


def test_class_mean_areas_average_over_images_where_present():
    # class 1: 10 px in image a, absent in b -> mean 10 (not 5); class 2: 4 and 8 -> 6; class 3 never present
    a = _label({1: 10, 2: 4, 255: 6})
    b = _label({2: 8, 255: 2})
    areas = analysis.class_mean_areas([a, b], [0, 1, 2, 3])
    assert areas[1] == 10 and areas[2] == 6
    assert areas[0] == pytest.approx((80 + 90) / 2)
    assert math.isnan(areas[3])


def test_size_groups_median_and_threshold():
    areas = {0: 500.0, 1: 10.0, 2: 40.0, 3: 200.0, 4: math.nan}
    median = analysis.size_groups(areas)
    assert median.rule == "median" and median.threshold == pytest.approx(120.0)
    assert median.small == [1, 2] and median.large == [0, 3] and median.absent == [4]
    fixed = analysis.size_groups(areas, threshold=40)
    assert fixed.small == [1, 2] and fixed.large == [0, 3]  # small is <= threshold
    assert analysis.size_groups(areas, threshold=5).small == []
    with pytest.raises(ValueError):
        analysis.size_groups({0: math.nan})


def test_group_miou_official_and_standard():
    class_ids = [0, 1, 2, 3]
    assert analysis.group_miou([0.2, 0.4, 0.6, 0.0], class_ids, [1, 3]) == pytest.approx(0.2)
    assert analysis.group_miou([0.2, None, 0.6, 0.0], class_ids, [1, 2]) == pytest.approx(0.6)  # None skipped
    assert math.isnan(analysis.group_miou([0.2, None, 0.6, 0.0], class_ids, [1]))


# -- k-means -----------------------------------------------------------------------------------------------------
def _two_region_map(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fmap = rng.normal(0, 0.05, size=(6, 8, 8)).astype(np.float16)
    fmap[:, :, :3] += 3.0  # 24 positions far from the other 40
    return fmap


def test_cluster_map_is_deterministic_and_upsampled():
    fmap = _two_region_map()
    a = analysis.cluster_map(fmap, k=2, seed=0, size=32)
    b = analysis.cluster_map(fmap, k=2, seed=0, size=32)
    assert a.shape == (32, 32) and a.dtype == np.int64
    assert np.array_equal(a, b)
    # two well-separated regions; relabelled by size: the larger region (40 positions) is cluster 0
    assert (a[:, 12:] == 0).all() and (a[:, :12] == 1).all()
    five = analysis.cluster_map(np.random.default_rng(1).normal(size=(16, 8, 8)), k=5, seed=3, size=16)
    assert set(np.unique(five)) == set(range(5))
    counts = np.bincount(five.reshape(-1), minlength=5)
    assert list(counts) == sorted(counts, reverse=True)
    assert np.array_equal(five, analysis.cluster_map(np.random.default_rng(1).normal(size=(16, 8, 8)), 5, 3, 16))


def test_cluster_map_rejects_too_few_positions():
    with pytest.raises(ValueError, match="fewer than k"):
        analysis.cluster_map(np.zeros((4, 2, 2)), k=5, seed=0, size=8)


# -- sweep tables ------------------------------------------------------------------------------------------------
def _cells() -> list[analysis.SweepCell]:
    cells = []
    for b in (3, 5):
        for t in (50, 150):
            iou = 0.1 * b + t / 1000
            cells.append(analysis.SweepCell(b, t, 100 * iou, 100 * iou, [iou, iou / 2, 0.0], [iou, None, 0.0],
                                            [0, 1, 2], train_key=f"k{b}-{t}"))
    return cells


def test_sweep_grid_and_csv(tmp_path):
    groups = analysis.size_groups({0: 100.0, 1: 10.0, 2: 20.0}, threshold=50)
    cells = [c.add_groups(groups) for c in _cells()]
    grid = analysis.sweep_grid(cells, [3, 5, 7], [50, 150])
    assert grid.shape == (3, 2)
    assert grid[0, 1] == pytest.approx(45.0) and grid[1, 0] == pytest.approx(55.0)
    assert np.isnan(grid[2]).all()  # no cell for block 7
    small = analysis.sweep_grid(cells, [3, 5], [50, 150], "small")
    assert small[0, 0] == pytest.approx(100 * (0.35 / 2 + 0.0) / 2)
    std_small = analysis.sweep_grid(cells, [3, 5], [50, 150], "standard_small")
    assert std_small[0, 0] == pytest.approx(0.0)  # class 1's None is skipped, class 2 counts 0
    rows = list(csv.DictReader(analysis.write_sweep_csv(tmp_path / "s.csv", cells).open()))
    assert len(rows) == 4 and tuple(rows[0]) == analysis.SWEEP_CSV_COLUMNS
    assert float(rows[0]["miou"]) == pytest.approx(35.0) and rows[0]["train_key"] == "k3-50"


def test_worst_images_and_error_map():
    assert analysis.worst_images([0.5, None, 0.1, math.nan, 0.3], 3) == [2, 4, 0]
    assert analysis.worst_images([0.5, None], 5) == [0, 1]
    gt = np.array([[0, 1], [255, 2]])
    pred = np.array([[0, 2], [1, 2]])
    assert analysis.error_map(pred, gt, 255).tolist() == [[0, 1], [2, 0]]


def test_display_image_and_colorize():
    x = np.stack([np.full((4, 4), -1.0), np.zeros((4, 4)), np.ones((4, 4))]).astype(np.float32)
    img = analysis.display_image(x)
    assert img.shape == (4, 4, 3) and img.dtype == np.uint8 and tuple(img[0, 0]) == (0, 128, 255)
    mask = np.array([[0, 1], [255, 1]])
    coloured = analysis.colorize(mask, [(1, 2, 3), (4, 5, 6)], ignore_label=255)
    assert tuple(coloured[0, 0]) == (1, 2, 3) and tuple(coloured[1, 1]) == (4, 5, 6)
    assert tuple(coloured[1, 0]) == (255, 255, 255)


# -- figures -----------------------------------------------------------------------------------------------------
def _png(path, min_w=200, min_h=150) -> Image.Image:
    img = Image.open(path)
    img.load()
    assert img.size[0] >= min_w and img.size[1] >= min_h, img.size
    assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas
    return img


def test_sweep_figures(tmp_path):
    blocks, steps = [0, 1, 2, 3], [50, 150, 250]
    grid = np.arange(12, dtype=float).reshape(4, 3)
    grid[1, 2] = np.nan
    _png(report.plot_heatmap(grid, blocks, steps, tmp_path / "h.png"))
    _png(report.plot_size_split(grid, grid + 5, blocks, steps, tmp_path / "s.png", ["a"], ["b", "c"], 88.0),
         min_w=600)
    _png(report.plot_size_split(grid[:, :1], grid[:, :1], blocks, [50], tmp_path / "s1.png"))
    with pytest.raises(ValueError, match="does not match"):
        report.plot_heatmap(grid, blocks, steps[:2], tmp_path / "bad.png")


def test_clusters_grid_figure(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 5, size=(3, 2, 32, 32))
    image = rng.uniform(-1, 1, size=(3, 32, 32)).astype(np.float32)
    label = rng.integers(0, 3, size=(32, 32))
    path = report.plot_clusters_grid(image, maps, [1, 2, 3], [50, 150], tmp_path / "c.png", k=5, label=label,
                                     palette=[(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    _png(path, min_w=300, min_h=300)


def test_gallery_bars_and_html_report(tmp_path):
    rng = np.random.default_rng(0)
    n = 5
    images = [rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8) for _ in range(n)]
    gts = [rng.integers(0, 3, size=(16, 16)) for _ in range(n)]
    preds = [np.where(rng.uniform(size=(16, 16)) < 0.2 * i, (g + 1) % 3, g) for i, g in enumerate(gts)]
    per_image = [1.0, 0.8, 0.6, None, 0.2]
    gallery = report.write_gallery(images, gts, preds, tmp_path / "g.png", per_image, k=3,
                                   names=[f"img{i}" for i in range(n)], class_names=["bg", "a", "b"])
    assert _png(gallery, min_w=400, min_h=300).size[1] > _png(gallery).size[0] * 0.5  # three rows, 4 columns
    with pytest.raises(ValueError, match="same number"):
        report.write_gallery(images, gts[:2], preds, tmp_path / "x.png", per_image)
    bars = report.plot_per_class_iou([0.5, None, 0.25], ["bg", "a", "b"], tmp_path / "b.png", second=[0.6, 0.1, None])
    _png(bars)
    scores = {"class_ids": [0, 1, 2], "official_miou": 0.4, "standard_miou": 0.5, "pixel_accuracy": 0.7,
              "per_class_official": [0.5, 0.0, 0.7], "per_class_standard": [0.5, None, 0.7],
              "per_image_miou": per_image}
    paths = report.write_evaluation_report(tmp_path / "rep", images, gts, preds, scores,
                                           [f"img{i}" for i in range(n)], ["bg", "a", "b"], k=2)
    html = open(paths["report"]).read()
    for key in ("gallery", "per_class", "per_image"):
        _png(paths[key])
        assert f"src='{key.replace('per_class', 'per_class_iou').replace('per_image', 'per_image_miou')}.png'" in html
    assert html.index("img4") < html.index("img2") < html.index("img0")  # per-image table ascending
    assert "n/a" in html  # the None entries


def test_html_report_rejects_ragged_tables(tmp_path):
    table = report.Table(["a", "b"], [[1]], caption="t")
    with pytest.raises(ValueError, match="1 cells for 2 columns"):
        report.write_html_report(tmp_path / "r.html", "x", [report.ReportSection("s", tables=[table])])

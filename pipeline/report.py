"""Figures and an HTML report (matplotlib, Agg backend: no display needed).

Every function takes plain numpy arrays / lists (plus palette, class names and an output path), writes one file
and returns its path, so the sweep, the clusters command and the evaluation report share them:

- `plot_heatmap`: a value per (block, step), blocks as rows, steps as columns, labelled axes and colour bar;
- `plot_size_split`: two panels, mIoU of small and of large classes against the timestep, a line per block;
- `plot_clusters_grid`: k-means cluster maps, rows blocks, columns steps, the input image (and label) beside;
- `write_gallery`: the worst k images by mIoU, columns image | ground truth | prediction | error map;
- `plot_per_class_iou`, `plot_per_image_miou`: bar charts;
- `write_html_report`: sections of text, PNGs and tables in one self-contained report.html (images linked
  relatively); `write_evaluation_report` assembles the evaluation report from masks and scores.
"""
from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from pipeline import analysis  # noqa: E402

__all__ = ["plot_heatmap", "plot_size_split", "plot_clusters_grid", "cluster_colours", "write_gallery",
           "plot_per_class_iou", "plot_per_image_miou",
           "plot_prediction_grid", "plot_iou_by_feature", "Table", "ReportSection", "write_html_report",
           "write_evaluation_report"]

DPI = 110


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


# -- sweep figures -----------------------------------------------------------------------------------------------
def plot_heatmap(grid: np.ndarray, blocks: Sequence[int], steps: Sequence[int], path: str | Path,
                 title: str = "mIoU per decoder block and timestep", colorbar_label: str = "mIoU (%)",
                 annotate: bool | None = None) -> Path:
    """Heatmap of grid (len(blocks), len(steps)): rows = decoder blocks (model.output_blocks index), columns =
    timesteps t. NaN cells are left blank. Values are written in the cells when annotate (default: up to 400
    cells); the best cell is outlined."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.shape != (len(blocks), len(steps)):
        raise ValueError(f"plot_heatmap: grid shape {grid.shape} does not match {len(blocks)} blocks x "
                         f"{len(steps)} steps")
    nb, ns = grid.shape
    fig, ax = plt.subplots(figsize=(2.4 + 0.62 * ns, 1.5 + 0.42 * nb))
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(ns), [str(t) for t in steps], rotation=45 if ns > 8 else 0)
    ax.set_yticks(range(nb), [str(b) for b in blocks])
    ax.set_xlabel("diffusion timestep t")
    ax.set_ylabel("decoder block (output_blocks index)")
    ax.set_title(title)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    bar.set_label(colorbar_label)
    if annotate is None:
        annotate = nb * ns <= 400
    if annotate:
        mid = (vmin + vmax) / 2
        for i in range(nb):
            for j in range(ns):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                            color="black" if grid[i, j] > mid else "white")
    if finite.size:
        bi, bj = np.unravel_index(np.nanargmax(grid), grid.shape)
        ax.add_patch(plt.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    return _save(fig, path)


def plot_size_split(small: np.ndarray, large: np.ndarray, blocks: Sequence[int], steps: Sequence[int],
                    path: str | Path, small_classes: Sequence[str] = (), large_classes: Sequence[str] = (),
                    threshold: float | None = None, metric: str = "official") -> Path:
    """Two panels, small and large classes: mIoU (%) against the timestep, one line per block (against the
    block when there is a single timestep). small / large: (len(blocks), len(steps)); the classes of each group
    are listed under its panel."""
    small, large = np.asarray(small, np.float64), np.asarray(large, np.float64)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.92, max(len(blocks), 1)))
    both = np.concatenate([small[np.isfinite(small)], large[np.isfinite(large)]])
    for ax, grid, name, classes in ((axes[0], small, "small", small_classes), (axes[1], large, "large",
                                                                                 large_classes)):
        if len(steps) > 1:
            for i, b in enumerate(blocks):
                ax.plot(list(steps), grid[i], marker="o", color=colours[i], label=f"block {b}")
            ax.set_xlabel("diffusion timestep t")
            ax.set_xticks(list(steps), [str(t) for t in steps], rotation=45 if len(steps) > 8 else 0)
        else:
            ax.plot(list(blocks), grid[:, 0], marker="o", color=colours[0], label=f"t={steps[0]}")
            ax.set_xlabel("decoder block (output_blocks index)")
            ax.set_xticks(list(blocks))
        shown = ", ".join(classes) if classes else "none"
        if len(shown) > 90:
            shown = shown[:87] + "..."
        if threshold is None:
            area = ""
        else:
            area = f", mean area {'<=' if name == 'small' else '>'} {threshold:.0f} px"
        ax.set_title(f"{name} objects ({len(classes)} classes{area})\n{shown}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mIoU (%) of the group, {metric}")
    if both.size:
        pad = max(1.0, 0.05 * (both.max() - both.min()))
        axes[0].set_ylim(both.min() - pad, both.max() + pad)
    fig.suptitle("mIoU by object size (classes grouped by mean area in the training labels): "
                 "one classifier per (block, timestep)")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), title="block" if len(steps) > 1
               else None, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# -- clusters ----------------------------------------------------------------------------------------------------
def cluster_colours(k: int) -> ListedColormap:
    """k qualitative colours (tab10 / tab20) for cluster ids 0..k-1."""
    base = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return ListedColormap([base(i % base.N) for i in range(k)])


def plot_clusters_grid(image: np.ndarray, maps: np.ndarray, blocks: Sequence[int], steps: Sequence[int],
                       path: str | Path, k: int, title: str = "", label: np.ndarray | None = None,
                       palette: Sequence[Sequence[int]] | None = None, ignore_label: int | None = None) -> Path:
    """The input image (and its label, coloured by palette) on the left; on the right a grid of cluster maps,
    rows = blocks, columns = steps. image: (H, W, 3) uint8 or (3, H, W) in [-1, 1]; maps: (len(blocks),
    len(steps), H, W) integer cluster ids in [0, k)."""
    maps = np.asarray(maps)
    if maps.shape[:2] != (len(blocks), len(steps)):
        raise ValueError(f"plot_clusters_grid: maps shape {maps.shape} does not match {len(blocks)} blocks x "
                         f"{len(steps)} steps")
    nb, ns = len(blocks), len(steps)
    left = 2 if label is not None else 1
    rows = max(nb, left)
    cell = 1.6
    height = cell * 1.12 * rows + 1.3  # inches: the grid, plus ~0.6 in for the title and ~0.7 in for the legend
    fig = plt.figure(figsize=(cell * (ns + 1.5), height))
    outer = fig.add_gridspec(1, 2, width_ratios=[1.0, ns], wspace=0.25 / max(ns, 1) + 0.12,
                             top=1 - 0.6 / height, bottom=0.7 / height, left=0.04, right=0.98)
    left_grid = outer[0].subgridspec(rows, 1, hspace=0.25)
    right_grid = outer[1].subgridspec(rows, ns, wspace=0.06, hspace=0.12)
    ax = fig.add_subplot(left_grid[0])
    ax.imshow(analysis.display_image(image))
    ax.set_title("input image", fontsize=9)
    ax.axis("off")
    if label is not None:
        ax = fig.add_subplot(left_grid[1])
        ax.imshow(analysis.colorize(label, palette, ignore_label), interpolation="nearest")
        ax.set_title("ground truth", fontsize=9)
        ax.axis("off")
    cmap = cluster_colours(k)
    for i, b in enumerate(blocks):
        for j, t in enumerate(steps):
            ax = fig.add_subplot(right_grid[i, j])
            ax.imshow(maps[i, j], cmap=cmap, vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"t = {t}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"block {b}", fontsize=9)
    fig.suptitle(title or f"k-means clusters (k = {k}) of each block's features", y=1 - 0.12 / height,
                 va="top")
    fig.legend(handles=[Patch(color=cmap(c), label=f"cluster {c}") for c in range(k)], loc="lower center",
               ncol=min(k, 5), fontsize=8, bbox_to_anchor=(0.5, 0.0), frameon=False,
               title="clusters, numbered by size (0 = largest)", title_fontsize=8)
    return _save(fig, path)


# -- evaluation figures ------------------------------------------------------------------------------------------
def _class_legend(palette, class_names, number: int):
    pal = list(palette) if palette else analysis.generic_palette(number)
    names = list(class_names) if class_names else [f"class {c}" for c in range(number)]
    return [Patch(color=np.asarray(pal[c]) / 255, label=names[c]) for c in range(min(number, len(pal), len(names)))]


def write_gallery(images: Sequence[np.ndarray], gts: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                  path: str | Path, per_image_miou: Sequence[float | None], k: int = 8,
                  names: Sequence[str] | None = None, palette: Sequence[Sequence[int]] | None = None,
                  class_names: Sequence[str] | None = None, ignore_label: int | None = None) -> Path:
    """The k images with the lowest mIoU, ascending, one row each: image | ground truth | prediction | error map
    (red = wrong, light green = right, grey = ignore label in the ground truth).

    images: (H, W, 3) uint8 or (3, H, W) model inputs in [-1, 1]; gts, preds: (H, W) integer masks;
    per_image_miou: fractions in [0, 1] or None/NaN (nothing to score), same order."""
    if not (len(images) == len(gts) == len(preds) == len(per_image_miou)):
        raise ValueError(f"write_gallery: {len(images)} images, {len(gts)} ground truths, {len(preds)} "
                         f"predictions, {len(per_image_miou)} scores: expected the same number")
    order = analysis.worst_images(per_image_miou, k)
    if not order:
        raise ValueError("write_gallery: no images")
    names = list(names) if names else [f"image {i}" for i in range(len(images))]
    ignore = -1 if ignore_label is None else ignore_label
    error_cmap = ListedColormap([(0.88, 0.95, 0.88), (0.85, 0.1, 0.1), (0.6, 0.6, 0.6)])
    rows = len(order)
    fig, axes = plt.subplots(rows, 4, figsize=(9.5, 2.3 * rows + 0.8), squeeze=False)
    for r, i in enumerate(order):
        miou = per_image_miou[i]
        shown = "n/a" if miou is None or (isinstance(miou, float) and math.isnan(miou)) else f"{100 * miou:.1f}"
        err = analysis.error_map(preds[i], gts[i], ignore)
        scored = err != analysis.ERROR_IGNORED
        wrong = 100 * float((err == analysis.ERROR_WRONG).sum()) / max(1, int(scored.sum()))
        panels = [(analysis.display_image(images[i]), f"{names[i]}\nmIoU {shown} (rank {r + 1})"),
                  (analysis.colorize(gts[i], palette, ignore_label), "ground truth"),
                  (analysis.colorize(preds[i], palette, ignore_label), "prediction"),
                  (None, f"error map ({wrong:.1f}% wrong)")]
        for c, (img, text) in enumerate(panels):
            ax = axes[r, c]
            if img is None:
                ax.imshow(err, cmap=error_cmap, vmin=-0.5, vmax=2.5, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_title(text, fontsize=8)
            ax.axis("off")
    number = int(max(max(int(np.max(g)) for g in gts if np.size(g)), max(int(np.max(p)) for p in preds))) + 1
    number = min(number, len(class_names) if class_names else number)
    handles = _class_legend(palette, class_names, number)
    handles += [Patch(color=(0.88, 0.95, 0.88), label="correct"), Patch(color=(0.85, 0.1, 0.1), label="wrong"),
                Patch(color=(0.6, 0.6, 0.6), label="ignore label")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(f"worst {rows} of {len(images)} test images by mIoU (standard, per image)")
    fig.tight_layout(rect=(0, 0.04, 1, 0.98))
    return _save(fig, path)


def plot_per_class_iou(per_class: Sequence[float | None], class_names: Sequence[str], path: str | Path,
                       title: str = "IoU per class", second: Sequence[float | None] | None = None,
                       labels: tuple[str, str] = ("official", "standard")) -> Path:
    """Horizontal bars of IoU (%) per class; values are fractions in [0, 1], None = not scored (shown as n/a).
    With `second`, two bars per class (e.g. official and standard)."""
    if len(per_class) != len(class_names):
        raise ValueError(f"plot_per_class_iou: {len(per_class)} values for {len(class_names)} class names")
    series = [per_class] + ([second] if second is not None else [])
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.32 * n * len(series)))
    height = 0.8 / len(series)
    for s, values in enumerate(series):
        vals = np.array([np.nan if v is None else 100 * v for v in values], dtype=np.float64)
        ys = np.arange(n) + (s - (len(series) - 1) / 2) * height
        ax.barh(ys, np.nan_to_num(vals), height=height, label=labels[s] if second is not None else None,
                color=("tab:blue", "tab:orange")[s])
        for y, v in zip(ys, vals):
            ax.text((0 if np.isnan(v) else v) + 1, y, "n/a" if np.isnan(v) else f"{v:.1f}", va="center",
                    fontsize=7)
    ax.set_yticks(range(n), list(class_names))
    ax.invert_yaxis()
    ax.set_xlim(0, 108)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title)
    if second is not None:
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_per_image_miou(per_image_miou: Sequence[float | None], names: Sequence[str], path: str | Path,
                        title: str = "mIoU per test image, ascending") -> Path:
    """Bars of per-image mIoU (%) sorted ascending (images with nothing to score omitted)."""
    order = [i for i in analysis.worst_images(per_image_miou, len(per_image_miou))
             if per_image_miou[i] is not None and not math.isnan(per_image_miou[i])]
    vals = [100 * per_image_miou[i] for i in order]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(order) + 1.5), 3.8))
    ax.bar(range(len(order)), vals, color="tab:blue")
    ax.set_xticks(range(len(order)), [names[i] for i in order], rotation=90, fontsize=7)
    if vals:
        ax.axhline(float(np.mean(vals)), color="tab:red", linestyle="--", linewidth=1,
                   label=f"mean {np.mean(vals):.1f}")
        ax.legend(fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.set_xlabel("test image")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_prediction_grid(images: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                         preds: dict[str, Sequence[np.ndarray]], titles: Sequence[str], path: str | Path,
                         palette: Sequence[Sequence[int]] | None = None, class_names: Sequence[str] | None = None,
                         ignore_label: int | None = None, per_row: int = 2) -> Path:
    """Every image in the given order, `per_row` per figure row, each as image | ground truth | one prediction
    per entry of `preds` (name -> masks, same order as images). images: (H, W, 3) uint8 or (3, H, W) in [-1, 1];
    gts, masks: (H, W) integer."""
    n = len(images)
    if not (n == len(gts) == len(titles)) or any(len(p) != n for p in preds.values()):
        raise ValueError(f"plot_prediction_grid: {n} images, {len(gts)} ground truths, {len(titles)} titles, "
                         f"predictions {[len(p) for p in preds.values()]}: expected the same number")
    if n == 0:
        raise ValueError("plot_prediction_grid: no images")
    columns = ["image", "ground truth", *preds]
    rows = math.ceil(n / per_row)
    width = len(columns) * per_row
    fig, axes = plt.subplots(rows, width, figsize=(1.25 * width, 1.45 * rows + 0.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c0 = divmod(i, per_row)
        panels = [analysis.display_image(images[i]), analysis.colorize(gts[i], palette, ignore_label),
                  *[analysis.colorize(p[i], palette, ignore_label) for p in preds.values()]]
        for c, (panel, name) in enumerate(zip(panels, columns)):
            ax = axes[r, c0 * len(columns) + c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_title(f"{titles[i]}\n{name}" if c == 0 else f"\n{name}", fontsize=6)
    number = len(class_names) if class_names else int(max(int(np.max(g)) for g in gts)) + 1
    fig.legend(handles=_class_legend(palette, class_names, number), loc="lower center", ncol=min(number, 8),
               fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.5 / (1.45 * rows + 0.7), 1, 1))
    return _save(fig, path)


def plot_iou_by_feature(per_class: dict[str, dict[str, float | None]], miou: dict[str, float], path: str | Path,
                        title: str = "IoU per class (%)") -> Path:
    """Grouped bars: one group per class, one bar per feature type (values in %, None = not scored); the legend
    gives each feature type's mIoU."""
    features = list(per_class)
    classes = list(next(iter(per_class.values())))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(classes) + 2), 3.6))
    width = 0.8 / len(features)
    for k, f in enumerate(features):
        values = np.array([np.nan if per_class[f].get(c) is None else per_class[f][c] for c in classes], dtype=float)
        xs = np.arange(len(classes)) + (k - (len(features) - 1) / 2) * width
        ax.bar(xs, np.nan_to_num(values), width=width, label=f"{f} (mIoU {miou[f]:.1f})")
        for x, v in zip(xs, values):
            ax.text(x, (0 if np.isnan(v) else v) + 1, "n/a" if np.isnan(v) else f"{v:.0f}", ha="center",
                    fontsize=6)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_ylim(0, 105)
    ax.set_ylabel("IoU (%)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# -- HTML --------------------------------------------------------------------------------------------------------
@dataclass
class Table:
    """A table for the HTML report: column names and rows (each a sequence of cells, same length)."""

    columns: list[str]
    rows: list[Sequence[Any]]
    caption: str = ""


@dataclass
class ReportSection:
    """One section: a heading, optional text (plain, escaped), PNGs (paths) and tables, in that order."""

    heading: str
    text: str = ""
    images: list[str | Path] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}"
    return html.escape(str(value))


def write_html_report(path: str | Path, title: str, sections: Sequence[ReportSection]) -> Path:
    """report.html with the sections in order; images are linked by their path relative to the report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
             "text-align:right}th{background:#eee}img{max-width:100%;display:block;margin:1em 0}"
             "caption{text-align:left;font-weight:bold}</style>", "</head><body>", f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        if section.text:
            parts.extend(f"<p>{html.escape(p)}</p>" for p in section.text.split("\n\n"))
        for img in section.images:
            rel = os.path.relpath(Path(img).resolve(), path.parent.resolve())
            parts.append(f"<img src='{html.escape(Path(rel).as_posix())}' alt='{html.escape(Path(img).name)}'>")
        for table in section.tables:
            parts.append("<table>")
            if table.caption:
                parts.append(f"<caption>{html.escape(table.caption)}</caption>")
            parts.append("<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns) + "</tr>")
            for row in table.rows:
                if len(row) != len(table.columns):
                    raise ValueError(f"write_html_report: a row of table {table.caption!r} has {len(row)} cells "
                                     f"for {len(table.columns)} columns")
                parts.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path


def write_evaluation_report(out_dir: str | Path, images: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                            preds: Sequence[np.ndarray], scores: dict[str, Any], names: Sequence[str],
                            class_names: Sequence[str] | None = None,
                            palette: Sequence[Sequence[int]] | None = None, ignore_label: int | None = None,
                            k: int = 8, title: str = "Evaluation report") -> dict[str, str]:
    """gallery.png (worst k), per_class_iou.png, per_image_miou.png and report.html under out_dir.

    scores: `pipeline.metrics.Scores.to_dict()` (per_class_official / per_class_standard follow class_ids,
    per_image_miou follows the images; fractions). Returns {"report", "gallery", "per_class", "per_image"}."""
    out = Path(out_dir)
    class_ids = list(scores["class_ids"])
    cnames = [class_names[c] if class_names and c < len(class_names) else f"class {c}" for c in class_ids]
    per_image = [None if v is None else float(v) for v in scores["per_image_miou"]]
    gallery = write_gallery(images, gts, preds, out / "gallery.png", per_image, k, names, palette, class_names,
                            ignore_label)
    per_class = plot_per_class_iou(scores["per_class_official"], cnames, out / "per_class_iou.png",
                                   second=scores["per_class_standard"])
    per_image_png = plot_per_image_miou(per_image, names, out / "per_image_miou.png")
    order = analysis.worst_images(per_image, len(per_image))
    summary = Table(["metric", "value (%)"], [
        ["mIoU (official)", 100 * scores["official_miou"]],
        ["mIoU (standard)", None if scores["standard_miou"] is None else 100 * scores["standard_miou"]],
        ["pixel accuracy", None if scores["pixel_accuracy"] is None else 100 * scores["pixel_accuracy"]]])
    classes = Table(["class", "IoU official (%)", "IoU standard (%)"], [
        [n, 100 * o, None if s is None else 100 * s]
        for n, o, s in zip(cnames, scores["per_class_official"], scores["per_class_standard"])])
    ranked = Table(["rank", "image", "mIoU (%)"], [[r + 1, names[i], None if per_image[i] is None else
                                                    100 * per_image[i]] for r, i in enumerate(order)],
                   caption="per-image mIoU (standard), ascending")
    report = write_html_report(out / "report.html", title, [
        ReportSection("Scores", tables=[summary]),
        ReportSection(f"Worst {min(k, len(images))} images", "image | ground truth | prediction | error map "
                      "(red = wrong, grey = ignore label)", images=[gallery]),
        ReportSection("Per class", images=[per_class], tables=[classes]),
        ReportSection("Per image", images=[per_image_png], tables=[ranked]),
    ])
    return {"report": str(report), "gallery": str(gallery), "per_class": str(per_class),
            "per_image": str(per_image_png)}

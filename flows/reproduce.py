"""`ddpmseg reproduce`: run a paper preset over several seeds and compare with the published mIoU.

    ddpmseg reproduce PRESET... [--seeds 0,1,2] [--recipe paper|improved] [--model ddpm|mae|swav|swav_w2]
                      [--out DIR] [--store URL] [--json]

For each preset: fetch what is missing (its checkpoint, the data set archive), write one experiment config per
seed under DIR/configs/ and run it with the segment flow (`ddpmseg run`), all seeds on one feature store. A seed sets
the shared noise (`features.seed`) and the MLP seeds (`classifier.seed`), as `--seed` does in the official
train_interpreter.py, so each seed extracts its own features. The table compares ours (mean ± population std over
the seeds, official mIoU in %) with the paper's row of the model (DDPM, or with `--model` the MAE / SwAV baselines:
value ± its published spread) and, for `--recipe improved`, with the later study's improved figure; written to DIR/reproduce.md, DIR/reproduce.json and
DIR/report.html.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

RECIPES = ("paper", "improved")
MODELS = ("ddpm", "mae", "swav", "swav_w2")  # model.kind values with published figures


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def reproduce_config(preset: str, seed: int, recipe: str, store: str, output_dir: str,
                     model: str = "ddpm") -> dict[str, Any]:
    """The experiment of one (preset, seed): the preset's defaults (data set and the model's checkpoint as fetched),
    the recipe, the seed in features.seed and classifier.seed, and the preset's own "reproduce" sections, if any."""
    from pipeline.presets import DATASET_PRESETS

    if preset not in DATASET_PRESETS:
        from pipeline.config import ConfigError

        raise ConfigError(f"unknown preset {preset!r}; expected one of {sorted(DATASET_PRESETS)}")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    cfg: dict[str, Any] = {"recipe": recipe, "dataset": {"preset": preset}, "features": {"seed": seed},
                           "classifier": {"seed": seed}, "store": store, "output_dir": output_dir}
    if model != "ddpm":
        cfg["model"] = {"kind": model}  # the kind's official features and default checkpoint (pipeline/extractors)
    return _merge(cfg, DATASET_PRESETS[preset].get("reproduce", {}))


def fetch_missing(config_path: Path, progress: bool = True) -> list[str]:
    """Fetch the preset checkpoint and data sets a config needs but cannot find; returns the fetched names."""
    from flows.fetch_cli import checkpoint_names, fetch_assets, require_assets
    from pipeline.config import load_config

    cfg = load_config(config_path)
    names = []
    if cfg.model.checkpoint is not None and not Path(cfg.model.checkpoint).exists():
        names += checkpoint_names([cfg.dataset.preset], family=cfg.model.kind)  # ddpm, mae, swav, swav_w2
    if not Path(cfg.dataset.train_dir).exists() or not Path(cfg.dataset.test_dir).exists():
        names.append("datasets")
    fetch_assets(names, progress=progress)
    require_assets(load_config(config_path))
    return names


def compare(preset: str, recipe: str, per_seed: dict[int, float], model: str = "ddpm") -> dict[str, Any]:
    """One row of the table: ours (mean, population std over seeds) against the published figures of `model`
    (the paper's DDPM row, or its MAE / SwAV baseline row)."""
    from pipeline.presets import PUBLISHED_MIOU

    values = list(per_seed.values())
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    published = PUBLISHED_MIOU.get(preset, {})
    row: dict[str, Any] = {"preset": preset, "recipe": recipe, "model": model, "seeds": list(per_seed),
                           "per_seed": per_seed,
                           "miou": mean, "miou_std": std, "paper": None, "paper_pm": None, "diff_paper": None,
                           "within_paper": None}
    paper_row = "paper" if model == "ddpm" else model
    if paper_row in published:
        value, pm = published[paper_row]
        row.update(paper=value, paper_pm=pm, diff_paper=mean - value,
                   within_paper=None if pm is None else abs(mean - value) <= pm)
    if recipe == "improved" and model == "ddpm":
        value = published.get("improved", (None, None))[0]
        row.update(study_improved=value, diff_study=None if value is None else mean - value)
    return row


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def _within(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(columns, cells) of the comparison table, shared by the terminal, markdown and HTML outputs."""
    improved = any(r["recipe"] == "improved" for r in rows)
    models = sorted({r.get("model", "ddpm") for r in rows})
    columns = ["preset", "recipe", "seeds", "ours (mean ± std)", f"paper ({', '.join(models).upper()})", "difference",
               "within paper ±"]
    if improved:
        columns += ["study (improved)", "difference vs study"]
    cells = []
    for r in rows:
        paper = "n/a" if r["paper"] is None else f"{r['paper']:.1f} ± {_fmt(r['paper_pm'])}"
        line = [r["preset"], r["recipe"], ",".join(str(s) for s in r["seeds"]), f"{r['miou']:.1f} ± {r['miou_std']:.1f}",
                paper, _fmt(r["diff_paper"], "+.1f"), _within(r["within_paper"])]
        if improved:
            line += [_fmt(r.get("study_improved"), ".2f"), _fmt(r.get("diff_study"), "+.1f")]
        cells.append(line)
    return columns, cells


def format_table(rows: list[dict[str, Any]]) -> str:
    """The table as aligned text for the terminal."""
    columns, cells = table_rows(rows)
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    columns, cells = table_rows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join(lines) + "\n"


_NOTE = ("official mIoU (%); ours: mean ± population std over the seeds (each seed sets the shared noise and the MLP "
         "seeds); paper: the model's row of the paper's table (DDPM, or the MAE / SwAV baseline) with its published "
         "±; within paper ±: |ours − paper| ≤ the published ±; study (improved): the later study's figure for its improved recipe (published without ±).")


def run_reproduce(presets: Sequence[str], seeds: Sequence[int] = (0, 1, 2), recipe: str = "paper",
                  out: str | Path = "ddpmseg-reproduce", store: str | None = None, progress: bool = True,
                  run: Callable[[Path], dict[str, Any]] | None = None, model: str = "ddpm") -> dict[str, Any]:
    """Fetch, run every (preset, seed), write the comparison; returns {"rows", "table_path", "json_path",
    "report_path", ...}. run: how one config is run (default flows.runner.run_config)."""
    from pipeline import report

    if run is None:
        from flows.runner import run_config

        def run(path: Path) -> dict[str, Any]:
            return run_config(path, None, progress=progress)

    out = Path(out).resolve()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    store_url = store or str(out / "store")
    started = time.perf_counter()
    rows, runs = [], []
    for preset in presets:
        per_seed: dict[int, float] = {}
        for seed in seeds:
            name = recipe if model == "ddpm" else f"{model}-{recipe}"
            path = out / "configs" / f"{preset}-{name}-s{seed}.yaml"
            cfg = reproduce_config(preset, seed, recipe, store_url, str(out / "runs" / preset / name / f"s{seed}"),
                                   model=model)
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            fetch_missing(path, progress=progress)
            run_started = time.perf_counter()
            summary = run(path)
            per_seed[seed] = float(summary["miou"])
            runs.append({"preset": preset, "seed": seed, "config": str(path), "miou": summary["miou"],
                         "miou_standard": summary.get("miou_standard"), "metrics_path": summary.get("metrics_path"),
                         "unet_forwards": summary.get("unet_forwards", 0),
                         "members_trained": summary.get("members_trained", 0),
                         "wall_s": time.perf_counter() - run_started})
        rows.append(compare(preset, recipe, per_seed, model=model))
    table_path = out / "reproduce.md"
    table_path.write_text(format_markdown(rows) + "\n" + _NOTE + "\n")
    result = {"rows": rows, "runs": runs, "recipe": recipe, "seeds": list(seeds), "store": store_url,
              "wall_s": time.perf_counter() - started, "table_path": str(table_path),
              "json_path": str(out / "reproduce.json"), "report_path": str(out / "report.html")}
    Path(result["json_path"]).write_text(json.dumps(result, indent=1))
    columns, cells = table_rows(rows)
    report.write_html_report(out / "report.html", "ddpmseg reproduce: ours vs published", [
        report.ReportSection("mIoU against the published figures", _NOTE,
                             tables=[report.Table(columns, cells, caption=f"recipe {recipe}, seeds {list(seeds)}")]),
        report.ReportSection("Runs", "one run per (preset, seed); configs under configs/, outputs under runs/",
                             tables=[report.Table(["preset", "seed", "mIoU", "mIoU (standard)", "UNet forwards",
                                                   "members trained", "wall (s)", "metrics"],
                                                  [[r["preset"], r["seed"], r["miou"], r["miou_standard"],
                                                    r["unet_forwards"], r["members_trained"], r["wall_s"],
                                                    r["metrics_path"]] for r in runs])]),
    ])
    return result


_HELP = """\
Reproduce the paper's table for data set presets (bedroom_28, ffhq_34, cat_15, horse_21, celeba_19, ade_bedroom_30):
fetch the preset's checkpoint and the data sets when missing (see `ddpmseg fetch --help`), run the preset once per
seed (each seed sets the shared noise, features.seed, and the MLP ensemble's seeds, classifier.seed, as --seed does
in the official train_interpreter.py), then print ours (mean ± population std over the seeds, official mIoU in %)
against the paper's DDPM row with the difference and whether it lies within the published ±; with --recipe
improved, also against the later study's improved figure. All runs share one feature store (DIR/store); a re-run
reuses what is cached."""

_EPILOG = """\
writes DIR/configs/<preset>-<recipe>-s<seed>.yaml, DIR/runs/<preset>/<recipe>/s<seed>/ (masks, metrics.json,
report), DIR/reproduce.md, DIR/reproduce.json and DIR/report.html.
example (GPU machine): ddpmseg reproduce ffhq_34 --seeds 0,1,2 --out repro"""


def add_reproduce_command(subparsers: Any) -> None:
    """Add `reproduce` to an argparse subparsers object."""
    import argparse

    from flows.runner import seed_list

    sp = subparsers.add_parser("reproduce", help="run paper presets over seeds and compare with the published mIoU",
                               description=_HELP, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("presets", nargs="+", metavar="PRESET", help="data set preset(s), e.g. ffhq_34")
    sp.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="seeds, e.g. 0,1,2 (default)")
    sp.add_argument("--recipe", choices=RECIPES, default="paper",
                    help="paper (the official behaviour, default) or improved (the later study's recipe)")
    sp.add_argument("--model", choices=MODELS, default="ddpm",
                    help="feature extractor (model.kind): ddpm (default) or the paper's baselines mae, swav "
                         "(ResNet-50), swav_w2 (ResNet-50w2); compared with that model's published row")
    sp.add_argument("--out", default="ddpmseg-reproduce", help="output directory (default ./ddpmseg-reproduce)")
    sp.add_argument("--store", help="feature store for every run: a directory or s3://bucket/prefix "
                                    "(default DIR/store)")
    sp.add_argument("--json", action="store_true", help="print one JSON object (rows, runs, paths) at the end")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: Any) -> int:
    from flows.runner import prefect_defaults, store_url

    prefect_defaults()
    result = run_reproduce(args.presets, seeds=args.seeds, recipe=args.recipe, out=args.out, model=args.model,
                           store=store_url(args.store) if args.store else None, progress=not args.quiet)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    print(format_table(result["rows"]))
    print(f"wall        {result['wall_s']:.0f} s")
    print(f"table       {result['table_path']}")
    print(f"report      {result['report_path']}")
    return 0

"""`ddpmseg ablate CONFIG`: paper -> +augs -> +anti-overfit -> +TTA (-> +closing) on the same cached features.

Every row is a full `segment` run of a variant of the config; stages shared between rows (features of the base
views, members of an earlier row) come from the store, and each row reports what it recomputed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow

from flows import prefect_results
from flows.segment import run_segment
from pipeline.config import ExperimentConfig, config_to_dict, improved_defaults, load_config

ROWS = ("paper", "+augs", "+anti-overfit", "+TTA", "+closing")


def ablation_configs(cfg: ExperimentConfig, closing: bool = True) -> list[tuple[str, ExperimentConfig]]:
    """The cumulative variants of `cfg`, each written to its own output directory."""
    improved = improved_defaults(cfg.dataset.preset)
    base = config_to_dict(cfg)
    base.update(recipe="paper", augmentation={"views": 0}, tta={"views": []}, postprocess={"closing": False})
    base["classifier"].update(optimizer="adam", weight_decay=0.0, dropout=0.0, early_stopping=True)
    if cfg.recipe == "improved":  # the paper's epochs; a paper config keeps its own (e.g. a shortened demo)
        base["classifier"]["max_epochs"] = 100
    steps = [
        ("paper", {}),
        ("+augs", {"augmentation": improved["augmentation"]}),
        ("+anti-overfit", {"classifier": improved["classifier"]}),
        ("+TTA", {"tta": improved["tta"]}),
    ] + ([("+closing", {"postprocess": {"closing": True}})] if closing else [])
    out, current = [], base
    for name, change in steps:
        current = json.loads(json.dumps(current))
        for section, values in change.items():
            current[section] = {**current.get(section, {}), **values}
        current["output_dir"] = str(Path(cfg.output_dir) / "ablation" / name.strip("+"))
        out.append((name, ExperimentConfig.model_validate(current)))
    return out


@flow(name="ablate", flow_run_name=prefect_results.ablate_run_name)
def ablate(config_path: str, store_url: str | None = None, closing: bool = True,
           progress: bool = True) -> dict[str, Any]:
    cfg = load_config(config_path)
    rows = []
    for name, variant in ablation_configs(cfg, closing):
        s = run_segment(variant, store_url, progress=progress, label=f"ablate {name}",
                        name=f"{Path(config_path).stem}-{name}")
        rows.append({"row": name, "miou": s["miou"], "miou_standard": s["miou_standard"],
                     "unet_forwards": s["unet_forwards"], "members_trained": s["members_trained"],
                     "recomputed": [k for k, v in s["stages"].items() if v == "ran"]})
    out_dir = Path(cfg.output_dir) / "ablation"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "ablation.md").write_text(format_table(rows))
    prefect_results.publish_table(f"{Path(config_path).stem}-ablation", format_table(rows), rows,
                                  "mIoU per ablation row")
    return {"rows": rows, "table_path": str(out_dir / "ablation.md"), "json_path": str(out_dir / "ablation.json")}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| row | mIoU (official) | mIoU (standard) | Δ vs previous | UNet forwards | members trained | recomputed |",
             "|---|---|---|---|---|---|---|"]
    prev = None
    for r in rows:
        delta = "" if prev is None else f"{r['miou'] - prev:+.2f}"
        lines.append(f"| {r['row']} | {r['miou']:.2f} | {r['miou_standard']:.2f} | {delta} | {r['unet_forwards']} | "
                     f"{r['members_trained']} | {', '.join(r['recomputed']) or 'nothing'} |")
        prev = r["miou"]
    return "\n".join(lines) + "\n"

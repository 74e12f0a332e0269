"""Results in the Prefect UI: readable flow run names and the artifacts each flow publishes (a markdown summary,
tables of per-image and per-row numbers). Formatting only: the numbers are the stages' own (metrics.json)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact


def _slug(text: str) -> str:
    """An artifact key: lowercase letters, digits and dashes (Prefect's rule)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "ddpmseg"


def _config_name(config_path: str) -> str:
    """'<config stem> · <recipe> · seed <classifier seed>' (the stem alone when the file does not validate)."""
    from pipeline.config import ConfigError, load_config

    stem = Path(config_path).stem
    try:
        cfg = load_config(config_path)
    except (ConfigError, OSError):
        return stem
    return f"{stem} · {cfg.recipe} · seed {cfg.classifier.seed}"


def segment_run_name() -> str:
    """flow_run_name of the segment flow: the config's stem, recipe and classifier seed."""
    from prefect.runtime import flow_run

    return _config_name(flow_run.parameters.get("config_path", "segment"))


def ablate_run_name() -> str:
    from prefect.runtime import flow_run

    return f"ablate · {_config_name(flow_run.parameters.get('config_path', 'ablate'))}"


def sweep_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    config = params.get("config") or {}
    name = (config.get("dataset") or {}).get("name") or "sweep"
    return f"sweep · {name} · blocks {params.get('blocks')} · steps {params.get('steps')}"


def _number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def evaluation_markdown(name: str, summary: dict[str, Any], result: dict[str, Any]) -> str:
    """The evaluation's summary as markdown: mIoU (official, standard), per-class IoU, the work done per stage."""
    scores = result["scores"]
    names = result.get("class_names") or []
    lines = [f"# {name}", "",
             f"**mIoU {_number(result['miou'])}** (official) · {_number(result['miou_standard'])} (standard) · "
             f"pixel accuracy {_number(result['pixel_accuracy'])}", "",
             "| stage | this run |", "|---|---|"]
    lines += [f"| {stage} | {state} |" for stage, state in summary.get("stages", {}).items()]
    lines += ["", f"UNet forwards: {summary.get('unet_forwards', 0)} · members trained: "
                  f"{summary.get('members_trained', 0)}", "",
              "| class | IoU (official) | IoU (standard) |", "|---|---|---|"]
    for c, official, standard in zip(scores["class_ids"], scores["per_class_official"], scores["per_class_standard"]):
        label = names[c] if c < len(names) else f"class {c}"
        lines.append(f"| {label} | {_number(None if official is None else 100 * official)} | "
                     f"{_number(None if standard is None else 100 * standard)} |")
    lines += ["", f"Report: `{summary['report_path']}`" if summary.get("report_path") else "Report: none written",
              f"Metrics: `{summary.get('metrics_path', '-')}` · store: `{summary.get('store', '-')}` · "
              f"evaluate key `{summary.get('evaluate_key', '-')}`"]
    return "\n".join(lines) + "\n"


def per_image_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per test image: its stem, id and standard mIoU (percent; None when nothing to score)."""
    rows = []
    for image, value in zip(result["images"], result["scores"]["per_image_miou"]):
        score = None if value is None or (isinstance(value, float) and math.isnan(value)) else round(100 * value, 4)
        rows.append({"image": image["stem"], "image_id": image["image_id"], "miou": score})
    return rows


def publish_evaluation(name: str, summary: dict[str, Any], result: dict[str, Any]) -> None:
    """The evaluation's markdown summary and per-image table, on the current flow run (keys from `name`)."""
    key = _slug(f"ddpmseg-{name}")
    create_markdown_artifact(evaluation_markdown(name, summary, result), key=f"{key}-evaluation",
                             description=f"mIoU {_number(result['miou'])} (official)")
    create_table_artifact(per_image_rows(result), key=f"{key}-per-image", description="standard mIoU of each image")


def publish_table(name: str, markdown: str, rows: list[dict[str, Any]], description: str) -> None:
    """A flow's table (sweep, ablate) as markdown and as a table artifact."""
    key = _slug(f"ddpmseg-{name}")
    create_markdown_artifact(markdown, key=f"{key}-summary", description=description)
    def plain(value: Any) -> Any:  # JSON without NaN (the API refuses it); lists as text
        if isinstance(value, list):
            return ", ".join(map(str, value))
        return None if isinstance(value, float) and math.isnan(value) else value

    cells = [{k: plain(v) for k, v in row.items() if not isinstance(v, dict)} for row in rows]
    create_table_artifact(cells, key=f"{key}-table", description=description)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of plain values as a markdown table (columns of the first row; floats with 2 decimals)."""
    if not rows:
        return "(no rows)\n"
    columns = [k for k, v in rows[0].items() if not isinstance(v, dict)]

    def cell(value: Any) -> str:
        return _number(value) if isinstance(value, float) or value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"

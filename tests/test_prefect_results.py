"""Results in the Prefect UI: the segment flow run's name and its artifacts, read back from a real Prefect server."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from flows.prefect_results import evaluation_markdown, markdown_table, per_image_rows


def _artifacts(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(flow_run_id))
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))
    return run, {a.key: a for a in found}


def test_segment_run_is_named_and_publishes_its_results(tiny_experiment, prefect_server):
    from flows.runner import run_config

    path = tiny_experiment(classifier={"model_num": 2, "max_epochs": 2, "seed": 7})
    summary = run_config(path, progress=False)
    run, artifacts = _artifacts(summary["flow_run"])
    assert run.name == f"{Path(path).stem} · paper · seed 7"
    key = f"ddpmseg-{Path(path).stem}"
    markdown = artifacts[f"{key}-evaluation"].data
    metrics = json.loads(Path(summary["metrics_path"]).read_text())["result"]
    assert f"**mIoU {metrics['miou']:.2f}** (official) · {metrics['miou_standard']:.2f} (standard)" in markdown
    assert "| extract | ran |" in markdown and "| evaluate | ran |" in markdown
    assert f"UNet forwards: {summary['unet_forwards']} · members trained: 2" in markdown
    names = metrics["class_names"]
    first = metrics["scores"]["class_ids"][0]
    assert f"| {names[first]} | {100 * metrics['scores']['per_class_official'][0]:.2f} |" in markdown
    assert (f"Report: `{summary['report_path']}`" if "report_path" in summary else "Report: none written") in markdown
    table = artifacts[f"{key}-per-image"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["image"] for r in rows] == [i["stem"] for i in metrics["images"]]
    for row, value in zip(rows, metrics["scores"]["per_image_miou"]):
        assert row["miou"] == (None if value is None else pytest.approx(100 * value, abs=1e-3))
    # a re-run that runs the flow: the same keys, a new version saying what was cached
    again = run_config(path, progress=False, always_flow=True)
    _, artifacts = _artifacts(again["flow_run"])
    assert "| extract | cached |" in artifacts[f"{key}-evaluation"].data


def test_markdown_helpers_show_missing_values_as_dashes():
    result = {"miou": 50.0, "miou_standard": 40.0, "pixel_accuracy": 90.0, "class_names": ["a", "b"],
              "scores": {"class_ids": [0, 1], "per_class_official": [0.5, 0.0], "per_class_standard": [0.5, None],
                         "per_image_miou": [float("nan")]},
              "images": [{"stem": "x", "image_id": "abc"}]}
    text = evaluation_markdown("demo", {"stages": {"evaluate": "ran"}}, result)
    assert "| b | 0.00 | – |" in text and "Report: none written" in text
    assert per_image_rows(result) == [{"image": "x", "image_id": "abc", "miou": None}]
    assert markdown_table([{"row": "paper", "miou": 1.234}]) == "| row | miou |\n|---|---|\n| paper | 1.23 |\n"

"""A quick CLI: `ddpmseg --help` (and every subcommand's help) imports neither torch nor Prefect (fresh processes);
benchmarks/cli.py measures the start-up of `--help` and `status`."""
from __future__ import annotations

import pytest

from benchmarks.cli import run_cli, time_command


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["sweep", "--help"], ["config", "--help"],
                                  ["store", "ls", "--help"]])
def test_help_imports_neither_torch_nor_prefect(args):
    result = time_command(args, repeats=1)
    assert not {"torch", "prefect", "zarr", "dask"} & set(result["heavy_imports"]), result["heavy_imports"]
    assert result["import_time_s"] > 0


def test_config_presets_imports_no_orchestration():
    """`config presets` lists the model kinds' channel counts from the extractor classes (pipeline/extractors, which
    import torch); it starts neither Prefect nor the store's libraries."""
    result = time_command(["config", "presets"], repeats=1)
    assert not {"prefect", "zarr", "dask"} & set(result["heavy_imports"]), result["heavy_imports"]


def test_cli_benchmark_measures_help_and_status(tmp_path):
    out = run_cli(tmp_path, repeats=1)
    assert out["cli_help_s"] > 0 and out["cli_status_s"] > 0
    assert "torch" not in out["details"]["help"]["heavy_imports"]
    assert "prefect" not in out["details"]["status"]["heavy_imports"]  # status reads the store, runs nothing

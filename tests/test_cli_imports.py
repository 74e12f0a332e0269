"""A quick CLI: `ddpmseg --help` (and every subcommand's help), `config presets|show`, `status` and `store ls` import
neither torch nor Prefect (fresh processes); benchmarks/cli.py measures the start-up of `--help` and `status`."""
from __future__ import annotations

import json

import pytest
import yaml

from benchmarks.cli import run_cli, time_command
from flows.cli import main


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["sweep", "--help"], ["config", "--help"],
                                  ["store", "ls", "--help"]])
def test_help_imports_neither_torch_nor_prefect(args):
    result = time_command(args, repeats=1)
    assert not {"torch", "prefect", "zarr", "dask"} & set(result["heavy_imports"]), result["heavy_imports"]
    assert result["import_time_s"] > 0


def test_config_presets_imports_no_orchestration():
    """`config presets` lists the model kinds' channel counts from a plain table (pipeline/extractors/kinds.py,
    checked against the extractor classes in tests/test_extractors.py); it starts neither Prefect nor the store's
    libraries, nor torch."""
    result = time_command(["config", "presets"], repeats=1)
    assert not {"prefect", "zarr", "dask"} & set(result["heavy_imports"]), result["heavy_imports"]
    assert not {"torch", "guided_diffusion", "albumentations"} & set(result["heavy_imports"]), result["heavy_imports"]


def test_config_show_imports_neither_torch_nor_prefect(tiny_experiment):
    """Loading and validating a ddpm config uses the extractors' config face and plain data only."""
    result = time_command(["config", "show", str(tiny_experiment())], repeats=1)
    assert not {"torch", "prefect", "zarr", "dask", "guided_diffusion", "albumentations"} & \
        set(result["heavy_imports"]), result["heavy_imports"]


def test_status_and_store_ls_on_a_demo_store_import_neither_torch_nor_prefect(tmp_path, prefect_server, capsys):
    """`status` on a store a run of the demo's ddpm config filled (stage keys: config sections, image hashes, the
    bundled checkpoint's digest; committed blocks and records read from the store) and `store ls` of it start
    neither torch nor Prefect (nor dask); they read the store with zarr."""
    from flows.demo import demo_config
    from pipeline import synthetic

    synthetic.write_dataset(tmp_path / "data", n_train=2, n_test=1, size=32, seed=0)
    data = demo_config("ddpm", n_train=2, n_test=1, members=1)
    data["features"].update(steps=[50], batch_size=2)
    data["classifier"]["max_epochs"] = 1
    cfg = tmp_path / "config-ddpm.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["run", str(cfg), "--json", "--quiet"]) == 0
    store = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["store"]
    assert main(["status", str(cfg), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(e["stage"], e["state"]) for e in entries] == [
        ("extract train/t0050", "fresh"), ("extract test/t0050", "fresh"), ("train", "fresh"), ("evaluate", "fresh")]
    for args in (["status", str(cfg)], ["store", "ls", store]):
        heavy = set(time_command(args, repeats=1)["heavy_imports"])
        assert not {"torch", "prefect", "dask", "guided_diffusion", "albumentations"} & heavy, (args, heavy)
        assert "zarr" in heavy, (args, heavy)  # it did read the store


def test_cli_benchmark_measures_help_and_status(tmp_path):
    out = run_cli(tmp_path, repeats=1)
    assert out["cli_help_s"] > 0 and out["cli_status_s"] > 0
    assert "torch" not in out["details"]["help"]["heavy_imports"]
    assert "prefect" not in out["details"]["status"]["heavy_imports"]  # status reads the store, runs nothing
    assert "torch" not in out["details"]["status"]["heavy_imports"]  # stage keys are hashes: no network, no tensor

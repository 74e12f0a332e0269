"""Killed runs, concurrent writers, corrupted chunks, store tools: the store never reads anything half-written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr

from flows import extract as extract_stage
from flows import prepare as prepare_stage
from flows import stage_keys
from flows.cli import main
from pipeline.config import load_config
from storage.features import FeatureStore
from storage.location import StoreLocation
from tests.conftest import write_tiny_experiment

EXTRACT = """
import sys
from flows import extract as extract_stage
from flows import prepare as prepare_stage
from flows import stage_keys
from pipeline.config import load_config
from storage.features import FeatureStore
from storage.location import StoreLocation
cfg = load_config(sys.argv[1])
store = FeatureStore(StoreLocation.parse(sys.argv[2]))
refs = prepare_stage.prepare_split(cfg, store, "train")
print(extract_stage.extract_split(cfg, store, refs, progress=False)["unet_forwards"])
"""


def _extract_process(config: Path, store: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-c", EXTRACT, str(config), str(store)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parent.parent)


def _setup(tmp_path: Path, n_train: int = 8):
    config = write_tiny_experiment(tmp_path, n_train=n_train, n_test=1,
                                   features={"steps": [50, 150, 250], "blocks": [2, 3, 4], "batch_size": 1})
    cfg = load_config(config)
    store = FeatureStore(StoreLocation.parse(cfg.store))
    refs = prepare_stage.prepare_split(cfg, store, "train")
    return config, cfg, store, refs


def _committed_images(store_dir: Path) -> int:
    return sum(1 for p in store_dir.glob("features/*/base/*/*/b04/zarr.json") if '"committed": "' in p.read_text())


def test_sigkill_mid_extraction_then_resume_redoes_only_unfinished(tmp_path):
    config, cfg, store, refs = _setup(tmp_path)
    total = len(refs) * len(cfg.features.steps)
    proc = _extract_process(config, Path(cfg.store))
    deadline = time.time() + 120
    while _committed_images(Path(cfg.store)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extractor finished before it could be killed"

    left = extract_stage.extract_plan(cfg, store, refs)
    assert 0 < len(left) < total
    # nothing uncommitted is trusted: every committed block reads back as finite data
    for t in cfg.features.steps:
        unit = stage_keys.unit_for(cfg, t)
        for r in refs:
            blocks = sorted(store.committed_blocks(unit, r.image_id))
            for m in store.read_maps([unit], r.image_id, blocks):
                assert np.isfinite(m).all()
    counts = extract_stage.extract_split(cfg, store, refs, progress=False)
    assert counts["unet_forwards"] == len(left)
    assert extract_stage.extract_plan(cfg, store, refs) == []


def test_two_concurrent_extractions_end_with_one_good_copy(tmp_path):
    config, cfg, store, refs = _setup(tmp_path, n_train=6)
    procs = [_extract_process(config, Path(cfg.store)) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert main(["store", "verify", cfg.store]) == 0

    reference = FeatureStore(StoreLocation.parse(tmp_path / "reference-store"))
    prepare_stage.prepare_split(cfg, reference, "train")
    extract_stage.extract_split(cfg, reference, refs, progress=False)
    units = [stage_keys.unit_for(cfg, t) for t in cfg.features.steps]
    for r in refs:
        got = store.read_maps(units, r.image_id, cfg.sorted_blocks)
        want = reference.read_maps(units, r.image_id, cfg.sorted_blocks)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_flipped_byte_is_reported_and_repaired_by_recomputing_that_image(tmp_path, capsys):
    config, cfg, store, refs = _setup(tmp_path, n_train=3)
    extract_stage.extract_split(cfg, store, refs, progress=False)
    victim = refs[1].image_id
    unit = stage_keys.unit_for(cfg, 150)
    chunk = next(p for p in Path(cfg.store, unit.path, victim, "b03").rglob("c*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))

    assert main(["store", "verify", cfg.store]) == 1
    out = capsys.readouterr().out
    assert "corrupt" in out and unit.path in out and victim in out and "1 problem" in out

    # a run that reads the chunk names unit, image and block, and says to run verify
    fresh = FeatureStore(StoreLocation.parse(cfg.store))
    try:
        fresh.read_maps([unit], victim, cfg.sorted_blocks)
        raise AssertionError("corruption went unnoticed")
    except Exception as err:  # noqa: BLE001
        msg = str(err)
        assert unit.path in msg and victim in msg and "block 3" in msg and "store verify" in msg

    assert main(["store", "verify", cfg.store, "--repair"]) == 0
    capsys.readouterr()
    repaired = FeatureStore(StoreLocation.parse(cfg.store))
    assert extract_stage.extract_split(cfg, repaired, refs, progress=False)["unet_forwards"] == 1
    assert main(["store", "verify", cfg.store]) == 0


def test_store_ls_and_gc(tmp_path, capsys):
    config, cfg, store, refs = _setup(tmp_path, n_train=3)
    extract_stage.extract_split(cfg, store, refs, progress=False)
    assert main(["store", "ls", cfg.store, "--json"]) == 0
    units = json.loads(capsys.readouterr().out)
    assert len(units) == 3 and all(u["images"] == 3 and u["bytes"] > 0 for u in units)
    assert sorted(u["t"] for u in units) == [50, 150, 250]

    # a config that keeps only t=50 and 2 of the 3 images: gc removes the rest (dry run first)
    keep = write_tiny_experiment(tmp_path / "keep", n_train=2, n_test=1,
                                 features={"steps": [50], "blocks": [2, 3, 4], "batch_size": 1},
                                 store=str(Path(cfg.store)))
    assert main(["store", "gc", str(keep), "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert len(list(Path(cfg.store).glob("features/*/base/t0150-*"))) == 1  # nothing deleted yet
    assert main(["store", "gc", str(keep), "--json"]) == 0
    removed = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in removed] == [p["path"] for p in planned]
    assert not list(Path(cfg.store).glob("features/*/base/t0150-*"))
    kept = zarr.open_group(cfg.store, mode="r")
    t50 = next(Path(cfg.store).glob("features/*/base/t0050-*"))
    assert len([p for p in t50.iterdir() if p.is_dir()]) == 2  # the third image's row is gone
    assert kept is not None
    assert main(["store", "verify", cfg.store]) == 0

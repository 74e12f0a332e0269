"""The Python API (ddpmseg.py, flows/notebook.py) and the store read by plain xarray, on a tiny experiment."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import ddpmseg
from flows.stage_keys import unit_for
from pipeline.features import upsample_concat
from storage import features as store_features
from storage.features import FeatureStore, StoreError, UnitSpec
from tests.conftest import write_tiny_experiment

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, prefect_server):
    """(config path, run summary) of a tiny experiment run through extract, train and evaluate."""
    path = write_tiny_experiment(tmp_path_factory.mktemp("notebook"), n_train=3, n_test=2)
    return path, ddpmseg.run(ddpmseg.load_config(path))


def _readme_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_readme_from_a_notebook_runs_as_written(evaluated, capsys):
    path, _ = evaluated
    blocks = _readme_blocks("From a notebook")
    assert len(blocks) >= 4
    code = "\n".join(blocks)
    assert 'config_path = "experiments/my-experiment.yaml"' in code
    code = code.replace('config_path = "experiments/my-experiment.yaml"', f"config_path = {str(path)!r}")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert re.search(r"mIoU \d+\.\d \(official\)", out)
    assert out.strip().splitlines()[-1] == "1.0"  # the ensemble reproduces the stored mask exactly
    assert namespace["image"][f"b{namespace['block']:02d}"].dims[1] == f"channel_b{namespace['block']:02d}"
    assert namespace["stem"] in set(namespace["masks"].image.values) | set(namespace["feats"].image.values)
    assert len(namespace["tree"].children) == 5  # a unit holds both splits' images: 3 train + 2 test


def test_run_returns_the_json_summary_keys(evaluated):
    _, summary = evaluated
    assert isinstance(summary, ddpmseg.RunSummary)
    assert summary.stages == {"extract": "ran", "train": "ran", "evaluate": "ran"}
    assert summary.miou == summary["miou"] and 0 <= summary.miou <= 100
    with pytest.raises(AttributeError, match="no key 'nope'"):
        summary.nope


def test_open_features_is_the_stored_maps_with_stems(evaluated):
    path, _ = evaluated
    cfg = ddpmseg.load_config(path)
    feats = ddpmseg.open_features(cfg, "train", t=150, block=3)
    assert feats.dims == ("image", "channel", "y", "x") and feats.dtype == np.float16
    assert feats.chunks is not None  # lazy
    assert list(feats.image.values) == sorted(p.stem for p in Path(cfg.dataset.train_dir).glob("*.png"))[:3]
    assert int(feats.t) == 150 and int(feats.block) == 3
    store = FeatureStore(cfg.store, read_only=True)
    for i, image_id in enumerate(feats.image_id.values):
        native = store.read_maps([unit_for(cfg, 150)], str(image_id), [3])[0]
        np.testing.assert_array_equal(feats.isel(image=i).values, native)
        full = ddpmseg.open_features(cfg, "train", t=150, block=3, upsample=True).isel(image=i).values
        np.testing.assert_array_equal(full, upsample_concat([torch.from_numpy(native)], cfg.image_size).numpy())
    with pytest.raises(ValueError, match=r"block=9: not a block of this config"):
        ddpmseg.open_features(cfg, block=9)


def test_open_masks_and_ensemble_match_the_evaluation(evaluated):
    path, _ = evaluated
    cfg = ddpmseg.load_config(path)
    masks = ddpmseg.open_masks(cfg)
    assert masks.dims == ("image", "y", "x") and masks.shape == (2, 32, 32)
    ensemble = ddpmseg.load_ensemble(cfg)
    assert len(ensemble.members) == cfg.classifier.model_num
    stem = str(masks.image.values[1])
    full = [upsample_concat([torch.from_numpy(ddpmseg.open_features(cfg, "test", t=t, block=b).sel(image=stem)
                                              .values)], cfg.image_size)
            for t in cfg.features.steps for b in cfg.sorted_blocks]
    features = torch.cat(full)
    assert features.shape[0] == ensemble.dim
    np.testing.assert_array_equal(ensemble.predict(features), masks.sel(image=stem).values)


def test_missing_stage_is_an_error_naming_the_command(tiny_experiment):
    path = tiny_experiment()
    with pytest.raises(StoreError, match="no feature store there"):
        ddpmseg.open_features(path)
    FeatureStore(ddpmseg.load_config(path).store).root  # an empty store
    with pytest.raises(StoreError, match="ddpmseg train"):
        ddpmseg.load_ensemble(path)
    with pytest.raises(StoreError, match="ddpmseg run"):
        ddpmseg.open_masks(path)


def test_image_groups_open_with_plain_xarray(evaluated):
    path, _ = evaluated
    cfg = ddpmseg.load_config(path)
    unit = unit_for(cfg, 50)
    image_id = str(ddpmseg.open_features(cfg, "test").image_id.values[0])
    group = xr.open_zarr(cfg.store, group=f"{unit.path}/{image_id}", consolidated=False)
    assert set(group.data_vars) == {"b02", "b03", "b04"}
    for b in (2, 3, 4):
        assert group[f"b{b:02d}"].dims == ("image", f"channel_b{b:02d}", f"y_b{b:02d}", f"x_b{b:02d}")
    root = zarr.open_group(cfg.store, mode="r")
    attrs = root[f"views/base/{image_id}/input"].attrs
    assert attrs["split"] == "test" and attrs["stem"] == str(ddpmseg.open_features(cfg, "test").image.values[0])


def test_a_store_written_with_shared_dimension_names_still_reads(tmp_path, monkeypatch):
    """Stores written before per-block dimension names: every block (image, channel, y, x)."""
    monkeypatch.setattr(store_features, "block_dims", lambda block: ("image", "channel", "y", "x"))
    store = FeatureStore(str(tmp_path / "old"))
    unit = UnitSpec("rgb-000000000000", "base", 50, "abcd1234")
    maps = {2: np.random.default_rng(0).normal(size=(8, 4, 4)), 3: np.random.default_rng(1).normal(size=(4, 8, 8))}
    store.write_features(unit, "img0", maps)
    meta = zarr.open_group(str(tmp_path / "old"), mode="r")[f"{unit.path}/img0/b03"].metadata
    assert meta.dimension_names == ("image", "channel", "y", "x")
    with pytest.raises(ValueError, match="conflicting sizes"):  # what plain xarray makes of the old layout
        xr.open_zarr(str(tmp_path / "old"), group=f"{unit.path}/img0", consolidated=False)
    monkeypatch.undo()
    reread = FeatureStore(str(tmp_path / "old"), read_only=True).read_maps([unit], "img0", [2, 3])
    for got, want in zip(reread, (maps[2], maps[3])):
        np.testing.assert_array_equal(got, want.astype(np.float16))
    # new blocks beside old ones: each array keeps its own names, reads the same
    FeatureStore(str(tmp_path / "old")).write_features(unit, "img0", {4: np.ones((2, 16, 16))})
    assert FeatureStore(str(tmp_path / "old"), read_only=True).committed_blocks(unit, "img0") == {2, 3, 4}

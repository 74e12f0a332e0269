"""The official protocol where a config asks for it (issue 17): the CUDA-generator noise, the small-annotation
threshold, the top-level seed, and stage keys that stay those of existing stores."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from flows import extract, stage_keys
from flows.cli import main
from flows.prepare import prepare
from pipeline import datasets
from pipeline.config import ConfigError, load_config
from storage.features import FeatureStore

from conftest import write_tiny_experiment

# Stage keys of write_tiny_experiment(n_train=3, n_test=2), computed with the code before the top-level seed,
# the min_annotation_pixels setting and the noise mode mapping existed (main at aec4b5c): the stores written
# then must stay valid.
KEYS_BEFORE = {
    "extract": "d41d80e5bbe6ffbcc26eee591017ff2ee8a2e090090c010f735cb4fb4b9e96f7",
    "train": "26e278cae7c7b6a96ee6683bc8599109388e4b03886576ad0a26b6e9780b48bb",
    "members": "924f48b186638615d8a5b991b4cb51b3",
    "evaluate": "de399c7899fdb6ed08fa4bf1a60aeff6a4ab53a3cd961650f20f89111634d568",
    "unit": "features/random0-05015811dd5b/base/t0050-8eb954bf",
}


def keys_of(config_path) -> dict[str, str]:
    """The stage keys of a config, read-only (nothing is written; the store need not exist)."""
    cfg = load_config(config_path)
    store = FeatureStore(str(config_path.parent / "no-store"))
    train = prepare(cfg, store, "train", write=False)
    test = prepare(cfg, store, "test", write=False)
    key = stage_keys.train_key(cfg, train.extraction(cfg, "train"))
    return {"extract": stage_keys.extract_key(cfg, train.extraction(cfg, "train")).value, "train": key.value,
            "members": stage_keys.members_key(key), "evaluate": stage_keys.evaluate_key(cfg, key, test.base).value,
            "unit": stage_keys.unit_for(cfg, 50).path}


def edit(path, **top):
    data = yaml.safe_load(path.read_text())
    for name, value in top.items():
        if isinstance(value, dict):
            data.setdefault(name, {}).update(value)
        else:
            data[name] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_stage_keys_of_an_existing_config_are_unchanged(tmp_path):
    assert keys_of(write_tiny_experiment(tmp_path / "a", n_train=3, n_test=2)) == KEYS_BEFORE
    # the official defaults written out, or seed 0 given once at the top: the same keys
    explicit = write_tiny_experiment(tmp_path / "b", n_train=3, n_test=2, features={"seed": 0},
                                     dataset={"min_annotation_pixels": 20})
    assert keys_of(edit(explicit, seed=0)) == KEYS_BEFORE


def test_top_level_seed_gives_the_keys_of_both_section_seeds(tmp_path):
    top = keys_of(edit(write_tiny_experiment(tmp_path / "a", n_train=3, n_test=2), seed=5))
    sections = keys_of(write_tiny_experiment(tmp_path / "b", n_train=3, n_test=2, features={"seed": 5},
                                                classifier={"seed": 5}))
    assert top == sections
    assert top["extract"] != KEYS_BEFORE["extract"] and top["train"] != KEYS_BEFORE["train"]
    # an override keeps its own value: classifier seed 0 under a top-level 5 -> only the noise seed differs
    override = keys_of(edit(write_tiny_experiment(tmp_path / "c", n_train=3, n_test=2,
                                                     classifier={"seed": 0}), seed=5))
    assert override["extract"] == top["extract"] and override["train"] != top["train"]
    noise_only = keys_of(write_tiny_experiment(tmp_path / "d", n_train=3, n_test=2, features={"seed": 5}))
    assert override == noise_only


def test_min_annotation_pixels_sets_the_training_labels_and_the_train_key(tmp_path):
    path = write_tiny_experiment(tmp_path / "a", n_train=3, n_test=2)
    cfg = load_config(path)
    store = FeatureStore(str(tmp_path / "store"))
    official = prepare(cfg, store, "train")  # written: the stored labels are the ones trained on
    raw = [datasets.load_split(cfg.dataset.train_dir, 3, 32, 5, 255, train=False)[i].label for i in range(3)]
    counts = [np.unique(label[label != 255], return_counts=True)[1] for label in raw]
    threshold = int(max(c.min() for c in counts)) + 1  # above the smallest class of every image
    assert threshold > 20
    edit(path, dataset={"min_annotation_pixels": threshold})
    stricter_cfg = load_config(path)
    stricter = prepare(stricter_cfg, store, "train")
    for ref_20, ref_n, label in zip(official.base, stricter.base, raw):
        assert ref_20.image_id == ref_n.image_id and ref_20.label_hash != ref_n.label_hash
        stored = store.read_view_label("base", ref_n.image_id, ref_n.label_hash)
        np.testing.assert_array_equal(stored, datasets.apply_small_annotation_rule(label, 255, threshold))
        assert (stored == 255).sum() > (store.read_view_label("base", ref_20.image_id, ref_20.label_hash)
                                        == 255).sum()
    assert stage_keys.train_key(stricter_cfg, stricter.base).value != stage_keys.train_key(cfg, official.base).value
    # features do not depend on labels: the extraction is shared
    assert stage_keys.extract_key(stricter_cfg, stricter.base).value == stage_keys.extract_key(cfg, official.base).value
    # test labels are scored as they are
    test_before = prepare(cfg, store, "test", write=False).base
    assert test_before == prepare(stricter_cfg, store, "test", write=False).base


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_cuda_noise_without_cuda_is_a_one_line_error_before_prefect(tmp_path, capsys, monkeypatch):
    import flows.segment

    def no_flow(*args, **kwargs):
        raise AssertionError("the segment flow must not start")

    monkeypatch.setattr(flows.segment, "segment_on", no_flow)
    path = write_tiny_experiment(tmp_path, n_train=3, n_test=2, features={"noise_generator": "cuda"})
    assert main(["run", str(path), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ddpmseg: error: features.noise_generator: 'cuda'")
    assert "CUDA is not available here" in err
    assert not (tmp_path / "store").exists()  # no work at all


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_cuda_noise_is_checked_where_extraction_resolves_its_device(tmp_path):
    """A task on a worker (no CLI in front): the same ConfigError, before any forward or write."""
    path = write_tiny_experiment(tmp_path, n_train=3, n_test=2, features={"noise_generator": "cuda"})
    cfg = load_config(path)
    store = FeatureStore(cfg.store)
    refs = prepare(cfg, store, "train")
    with pytest.raises(ConfigError, match=r"^features\.noise_generator: 'cuda'"):
        extract.extract_split(cfg, store, refs.extraction(cfg, "train"), progress=False)
    assert not list((tmp_path / "store").glob("features/**/zarr.json"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_noise_is_the_official_cuda_generator_noise(tmp_path):
    path = write_tiny_experiment(tmp_path, n_train=3, n_test=2, features={"noise_generator": "cuda",
                                                                           "device": "cuda", "seed": 3})
    cfg = load_config(path)
    noise = extract._noise_for(cfg, ["a"], 50, torch.device("cuda"))
    official = torch.randn((1, 3, 32, 32), generator=torch.Generator(device="cuda").manual_seed(3), device="cuda")
    assert torch.equal(noise, official)

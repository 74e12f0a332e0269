"""The improved recipe: augmentation views, TTA, closing, and their place in the stage keys."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import latest_artifact
import yaml

from flows import prepare as prepare_stage
from flows import stage_keys
from flows.cli import main
from pipeline import augment
from pipeline.augment import TransformSpec
from pipeline.config import ConfigError, load_config, parse_config
from storage.features import FeatureStore
from storage.location import StoreLocation


def _image_and_label(size: int = 32):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (size, size), dtype=np.uint8)
    return image, label


def test_plain_transform_names_match_the_albumentations_table():
    """pipeline/transform_specs.py (what configs are validated against, without albumentations) lists exactly the
    transforms pipeline.augment can build, and the same ones as moving pixels."""
    from pipeline.transform_specs import GEOMETRIC_TRANSFORMS, TRANSFORM_NAMES

    assert tuple(augment.TRANSFORMS) == TRANSFORM_NAMES
    assert {name for name, (_, _, moves) in augment.TRANSFORMS.items() if moves} == GEOMETRIC_TRANSFORMS


def test_a_view_is_bit_identical_across_runs_and_differs_between_views():
    image, label = _image_and_label()
    specs = [TransformSpec(name=n) for n in augment.STUDY_TRAIN_TRANSFORMS]
    a = augment.apply_view(image, label, specs, seed=0, view_index=1, image_id="abc", ignore_label=255)
    b = augment.apply_view(image, label, specs, seed=0, view_index=1, image_id="abc", ignore_label=255)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    others = [augment.apply_view(image, label, specs, 0, i, "abc", 255)[0] for i in range(2, 6)]
    assert any(not np.array_equal(a[0], o) for o in others)
    by_image = [augment.apply_view(image, label, specs, 0, 1, i, 255)[0] for i in ("abd", "abe", "abf", "abg")]
    assert any(not np.array_equal(a[0], o) for o in by_image)


def test_flip_undo_restores_pixel_positions_exactly():
    image, label = _image_and_label()
    specs = [TransformSpec(name="HorizontalFlip", p=1.0)]
    flipped, flipped_label = augment.apply_view(image, label, specs, 0, 1, "x", 255)
    assert np.array_equal(flipped, image[:, ::-1]) and np.array_equal(flipped_label, label[:, ::-1])
    assert np.array_equal(augment.undo_geometry(flipped_label, specs), label)
    probs = np.random.default_rng(1).random((5, 32, 32)).astype(np.float32)
    assert np.array_equal(augment.undo_geometry(augment.undo_geometry(probs, specs), specs), probs)


@pytest.mark.parametrize("name, params", [("Rotate", {"limit": (40, 40)}),
                                          ("ElasticTransform", {"alpha": 200.0, "sigma": 3.0})])
def test_pixels_from_outside_the_image_get_the_ignore_label_never_class_0(name, params):
    image = np.full((32, 32, 3), 200, np.uint8)
    label = np.full((32, 32), 3, np.uint8)  # no class 0 anywhere in the source
    specs = [TransformSpec(name=name, p=1.0, params=params)]
    out_image, out_label = augment.apply_view(image, label, specs, 0, 1, "x", ignore_label=255)
    assert set(np.unique(out_label)) <= {3, 255}
    assert (out_label == 255).sum() > 0 and 0 not in out_label
    # where the label says "outside", the image is padding
    assert (out_image[out_label == 255] < 200).all()


def test_crop_moves_label_with_nearest_neighbour():
    image, _ = _image_and_label()
    label = np.zeros((32, 32), np.uint8)
    label[:, 16:] = 4
    specs = [TransformSpec(name="RandomResizedCrop", p=1.0)]
    _, out = augment.apply_view(image, label, specs, 0, 3, "x", 255)
    assert set(np.unique(out)) <= {0, 4}  # nearest neighbour: no blended label values


def test_closing_fills_a_one_pixel_hole():
    mask = np.full((9, 9), 2, np.uint8)
    mask[4, 4] = 0
    assert augment.close_mask(mask)[4, 4] == 2


def test_tta_config_rejects_views_that_cannot_be_undone():
    with pytest.raises(ConfigError, match="Rotate cannot be undone"):
        parse_config({"dataset": {"preset": "cat_15", "train_dir": "a", "test_dir": "b"}, "model": {},
                      "tta": {"views": [["Rotate"]]}})


def test_improved_recipe_fills_the_study_settings():
    cfg = parse_config({"recipe": "improved", "dataset": {"preset": "bedroom_28", "train_dir": "a", "test_dir": "b"},
                        "model": {}})
    assert cfg.augmentation.views == 3  # 4x set for Bedroom-28
    assert (cfg.classifier.optimizer, cfg.classifier.weight_decay, cfg.classifier.dropout) == ("adamw", 1e-4, 0.4)
    assert cfg.classifier.max_epochs == 11 and not cfg.classifier.early_stopping
    assert cfg.tta.views == [list(v) for v in augment.STUDY_TTA_VIEWS] and cfg.tta.merge == "vote"
    assert [t.p for t in cfg.augmentation.transforms] == [0.4] * 7


def _run(capsys, config: Path) -> dict:
    assert main(["run", str(config), "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _edit(config: Path, section: str, **values) -> None:
    data = yaml.safe_load(config.read_text())
    data.setdefault(section, {}).update(values)
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def test_new_options_invalidate_only_what_they_should(tiny_experiment, prefect_server, capsys):
    config = tiny_experiment(n_train=3, n_test=2, features={"steps": [50], "blocks": [2, 3], "batch_size": 1},
                             classifier={"model_num": 1, "max_epochs": 1})
    assert _run(capsys, config)["unet_forwards"] == 5

    _edit(config, "augmentation", views=2)  # 2 views x 3 train images at 1 step: 6 forwards, retrain
    out = _run(capsys, config)
    assert (out["unet_forwards"], out["members_trained"]) == (6, 1)
    cfg = load_config(config)
    store = FeatureStore(StoreLocation.parse(cfg.store))
    train = prepare_stage.prepare(cfg, store, "train")
    assert len(train.views) == 6 and {r.view for r in train.views} == {v[0] for v in stage_keys.train_views(cfg)}

    _edit(config, "classifier", optimizer="adamw", weight_decay=1e-4)  # anti-overfit: retrain only
    out = _run(capsys, config)
    assert (out["unet_forwards"], out["members_trained"]) == (0, 1)

    _edit(config, "tta", views=[["ColorJitter", "HorizontalFlip"]])  # TTA: test view forwards, no training
    out = _run(capsys, config)
    assert (out["unet_forwards"], out["members_trained"]) == (2, 0)
    assert out["stages"]["evaluate"] == "ran"

    _edit(config, "tta", merge="mean")  # merge rule: re-evaluate only
    out = _run(capsys, config)
    assert (out["unet_forwards"], out["members_trained"], out["stages"]["evaluate"]) == (0, 0, "ran")

    _edit(config, "postprocess", closing=True)
    out = _run(capsys, config)
    assert (out["unet_forwards"], out["members_trained"], out["stages"]["evaluate"]) == (0, 0, "ran")

    _edit(config, "augmentation", seed=7)  # another augmentation seed: new views, new training
    out = _run(capsys, config)
    assert (out["unet_forwards"], out["members_trained"]) == (6, 1)


def test_tta_with_an_identity_view_equals_no_tta(tiny_experiment, prefect_server, capsys):
    config = tiny_experiment(n_train=3, n_test=3, features={"steps": [50], "blocks": [2, 3]},
                             classifier={"model_num": 2, "max_epochs": 1})
    plain = _run(capsys, config)
    _edit(config, "tta", views=[[]], include_original=False)
    identity = _run(capsys, config)
    assert identity["stages"]["train"] == "cached" and identity["stages"]["evaluate"] == "ran"
    assert identity["miou"] == plain["miou"]
    masks_plain = np.load(sorted(Path(plain["masks_path"]).glob("*.npy"))[0])
    masks_identity = np.load(sorted(Path(identity["masks_path"]).glob("*.npy"))[0])
    assert np.array_equal(masks_plain, masks_identity)


def test_ablate_writes_a_table_with_every_row(tiny_experiment, prefect_server, capsys):
    config = tiny_experiment(n_train=2, n_test=2, features={"steps": [50], "blocks": [2, 3], "batch_size": 4},
                             classifier={"model_num": 1, "max_epochs": 1})
    data = yaml.safe_load(config.read_text())
    data["augmentation"] = {"views": 1}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["ablate", str(config), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = out["rows"]
    assert [r["row"] for r in rows] == ["paper", "+augs", "+anti-overfit", "+TTA", "+closing"]
    assert rows[2]["unet_forwards"] == 0  # anti-overfit reuses the +augs features
    assert rows[4]["unet_forwards"] == 0 and rows[4]["members_trained"] == 0  # closing: evaluation only
    table = Path(out["table_path"]).read_text()
    assert table.count("\n") == 2 + 5 and "+TTA" in table
    assert latest_artifact(f"ddpmseg-{config.stem}-ablation-summary") == table  # published to Prefect too
    published = latest_artifact(f"ddpmseg-{config.stem}-ablation-table")
    assert [(r["row"], r["miou"]) for r in published] == [(r["row"], pytest.approx(r["miou"])) for r in rows]

"""Experiment configs (pipeline.config): presets, validation messages, path resolution, official imports."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import OFFICIAL_FLAGS, ConfigError, config_to_dict, load_config, num_output_blocks, parse_config
from pipeline.official_import import import_official, parse_model_flags

# experiments/*/ddpm.json of the official code (reference/official-behaviour.md):
# name: (number_class, ignore_label, training_number, testing_number, checkpoint)
OFFICIAL_TABLE = {
    "bedroom_28": (29, 0, 40, 20, "lsun_bedroom.pt"),
    "ffhq_34": (34, 255, 20, 20, "ffhq.pt"),
    "cat_15": (15, 255, 30, 20, "lsun_cat.pt"),
    "horse_21": (21, 255, 30, 30, "lsun_horse.pt"),
    "celeba_19": (19, 255, 20, 500, "ffhq.pt"),
    "ade_bedroom_30": (30, 255, 50, 650, "lsun_bedroom.pt"),
}
# scripts/ddpm/train_interpreter.sh
OFFICIAL_MODEL_FLAGS_STRING = (
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)
OFFICIAL_256_FLAGS = {
    "attention_resolutions": "32,16,8", "class_cond": False, "diffusion_steps": 1000, "dropout": 0.1,
    "image_size": 256, "learn_sigma": True, "noise_schedule": "linear", "num_channels": 256,
    "num_head_channels": 64, "num_res_blocks": 2, "resblock_updown": True, "use_fp16": True,
    "use_scale_shift_norm": True,
}


def minimal(preset: str = "ffhq_34", **sections) -> dict:
    """The smallest valid config of a preset, with sections overridden."""
    return {"dataset": {"preset": preset, "train_dir": "data/train", "test_dir": "data/test"}, **sections}


def config_error(data, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, **kwargs)
    return str(info.value)


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- presets -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OFFICIAL_TABLE))
def test_preset_loads_with_train_and_test_dirs_only(tmp_path, name, monkeypatch):
    number_class, ignore_label, n_train, n_test, checkpoint = OFFICIAL_TABLE[name]
    monkeypatch.setenv("DDPMSEG_HOME", str(tmp_path / "home"))
    cfg = load_config(write_yaml(tmp_path / "exp.yaml", minimal(name)))
    ds = cfg.dataset
    assert ds.name == name and ds.preset == name
    assert (ds.number_class, ds.ignore_label, ds.training_number, ds.testing_number) == \
        (number_class, ignore_label, n_train, n_test)
    assert len(ds.class_names) == number_class and len(ds.palette) == number_class
    assert all(len(rgb) == 3 and all(0 <= c <= 255 for c in rgb) for rgb in ds.palette)
    assert ds.class_names[0] in ("background", "wall")
    # the default checkpoint: checkpoints/ddpm/<name> beside the config if there, else the fetched one
    assert cfg.model.checkpoint == str(tmp_path.resolve() / "home" / "checkpoints" / "ddpm" / checkpoint)
    assert not cfg.model.random_init
    assert cfg.features.steps == [50, 150, 250] and cfg.features.blocks == [5, 6, 7, 8, 12]
    assert cfg.features.share_noise and not cfg.features.input_activations
    assert cfg.classifier.model_num == 10 and cfg.classifier.batch_size == 64 and cfg.classifier.lr == 1e-3
    assert cfg.recipe == "paper"
    flags = cfg.model.full_flags()
    assert {k: flags[k] for k in OFFICIAL_256_FLAGS} == OFFICIAL_256_FLAGS
    assert cfg.image_size == 256


def test_official_flags_build_18_decoder_blocks():
    assert num_output_blocks(OFFICIAL_FLAGS) == 18
    assert num_output_blocks({**OFFICIAL_FLAGS, "image_size": 64}) == 12
    assert num_output_blocks({**OFFICIAL_FLAGS, "image_size": 32, "channel_mult": "1,2,2",
                              "num_res_blocks": 1}) == 6


def test_preset_values_can_be_overridden_and_blocks_are_sorted():
    cfg = parse_config({"dataset": {"preset": "cat_15", "train_dir": "a", "test_dir": "b", "training_number": 5},
                        "features": {"blocks": [12, 5, 8]}})
    assert cfg.dataset.training_number == 5 and cfg.dataset.number_class == 15
    assert cfg.features.blocks == [12, 5, 8] and cfg.sorted_blocks == [5, 8, 12]


def test_config_to_dict_is_plain_json_and_validates_again(tmp_path):
    cfg = parse_config(minimal("horse_21"), base_dir=tmp_path)
    data = config_to_dict(cfg)
    json.dumps(data)  # JSON-able
    assert data["dataset"]["palette"][1] == list(cfg.dataset.palette[1])
    again = parse_config(data, base_dir="/somewhere/else")
    assert config_to_dict(again) == data  # absolute paths stay as they are


# -- errors: each names the key and what was expected ----------------------------------------------------------------
def test_unknown_keys_are_named_top_level_and_nested():
    msg = config_error({**minimal(), "learning_rate": 0.1})
    assert "learning_rate: unknown key" in msg
    msg = config_error(minimal(classifier={"lrate": 0.1}))
    assert "classifier.lrate: unknown key" in msg
    msg = config_error({"dataset": {"preset": "ffhq_34", "train_dir": "a", "test_dir": "b", "colour": 1}})
    assert "dataset.colour: unknown key" in msg


def test_wrong_type_names_the_key_and_the_value():
    msg = config_error(minimal(features={"steps": "fifty"}))
    assert "features.steps" in msg and "list" in msg and "'fifty'" in msg
    msg = config_error(minimal(classifier={"model_num": "ten"}))
    assert "classifier.model_num" in msg and "integer" in msg
    msg = config_error(minimal(model="ffhq.pt"))
    assert "model:" in msg and "'ffhq.pt'" in msg
    msg = config_error(minimal(recipe="fancy"))
    assert "recipe" in msg and "'paper'" in msg and "'improved'" in msg


def test_wrong_flag_types_name_the_flag():
    assert "model.flags.use_fp16: expected true/false, got 'maybe'" in \
        config_error(minimal(model={"flags": {"use_fp16": "maybe"}}))
    assert "model.flags.image_size: expected an integer, got 'big'" in \
        config_error(minimal(model={"flags": {"image_size": "big"}}))
    assert "model.flags.attention_resolutions: expected a string" in \
        config_error(minimal(model={"flags": {"attention_resolutions": 16}}))
    cfg = parse_config(minimal(model={"flags": {"dropout": 0, "use_fp16": "False"}}))
    assert cfg.model.flags == {"dropout": 0.0, "use_fp16": False}
    assert isinstance(cfg.model.full_flags()["dropout"], float)


def test_block_outside_the_model_names_the_allowed_range():
    msg = config_error(minimal(features={"blocks": [5, 18]}))
    assert "features.blocks" in msg and "18" in msg and "0..17" in msg
    msg = config_error(minimal(features={"blocks": [-1]}))
    assert "0..17" in msg
    tiny = {"image_size": 32, "channel_mult": "1,2,2", "num_res_blocks": 1, "attention_resolutions": "16"}
    msg = config_error(minimal(model={"random_init": True, "flags": tiny}, features={"blocks": [6]}))
    assert "0..5" in msg
    assert parse_config(minimal(model={"random_init": True, "flags": tiny}, features={"blocks": [0, 5]}))


def test_timestep_outside_the_diffusion_names_the_range():
    for bad in (1000, 1500, -1):
        msg = config_error(minimal(features={"steps": [50, bad]}))
        assert "features.steps" in msg and str(bad) in msg and "[0, 1000)" in msg
    msg = config_error(minimal(model={"flags": {"diffusion_steps": 100}}, features={"steps": [50, 150]}))
    assert "150" in msg and "[0, 100)" in msg
    assert parse_config(minimal(features={"steps": [0, 999]})).features.steps == [0, 999]


def test_duplicate_steps_and_blocks():
    msg = config_error(minimal(features={"steps": [50, 150, 50]}))
    assert "features.steps" in msg and "duplicate" in msg
    msg = config_error(minimal(features={"blocks": [5, 5]}))
    assert "features.blocks" in msg and "duplicate" in msg
    assert "features.steps" in config_error(minimal(features={"steps": []}))


def test_unknown_preset_lists_the_presets():
    msg = config_error(minimal("ffhq_35"))
    assert "unknown preset 'ffhq_35'" in msg
    for name in OFFICIAL_TABLE:
        assert name in msg
    assert "unknown preset" in config_error(minimal(["ffhq_34"]))  # a wrong type is a ConfigError, too


def test_unknown_model_flag_lists_the_flags():
    msg = config_error(minimal(model={"flags": {"image_sise": 256}}))
    assert "model.flags" in msg and "image_sise" in msg and "image_size" in msg and "num_channels" in msg


def test_checkpoint_xor_random_init():
    custom = {"dataset": {"train_dir": "a", "test_dir": "b", "number_class": 3, "training_number": 2,
                          "testing_number": 2}}
    msg = config_error(custom)
    assert "model" in msg and "checkpoint is required" in msg and "random_init" in msg
    msg = config_error({**custom, "model": {"checkpoint": "m.pt", "random_init": True}})
    assert "not both" in msg
    assert parse_config({**custom, "model": {"random_init": True}}).model.checkpoint is None
    assert parse_config(minimal(model={"random_init": True})).model.checkpoint is None  # preset: no default then


def test_dataset_lists_and_ranges():
    msg = config_error({"dataset": {"preset": "cat_15", "train_dir": "a", "test_dir": "b",
                                    "class_names": ["bg", "cat"]}})
    assert "class_names has 2 entries" in msg and "(15)" in msg
    msg = config_error({"dataset": {"preset": "cat_15", "train_dir": "a", "test_dir": "b",
                                    "palette": [[0, 0, 300]] * 15}})
    assert "dataset.palette.0.2" in msg and "255" in msg and "... and 5 more" in msg
    assert "dataset.number_class" in config_error({"dataset": {"train_dir": "a", "test_dir": "b",
                                                               "number_class": 1, "training_number": 1,
                                                               "testing_number": 1}, "model": {"random_init": True}})


def test_missing_required_key_is_named():
    msg = config_error({"dataset": {"preset": "ffhq_34", "train_dir": "a"}})
    assert "dataset.test_dir: Field required" in msg
    msg = config_error({"model": {"random_init": True}})
    assert "dataset: Field required" in msg


def test_load_config_errors_name_the_file(tmp_path):
    bad = write_yaml(tmp_path / "bad-block.yaml", minimal(features={"blocks": [18]}))
    with pytest.raises(ConfigError, match=r"bad-block\.yaml[\s\S]*0\.\.17"):
        load_config(bad)

    listing = write_yaml(tmp_path / "a-list.yaml", [1, 2, 3])
    with pytest.raises(ConfigError, match=r"a-list\.yaml: expected a mapping at the top level, got list"):
        load_config(listing)

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"empty\.yaml: expected a mapping"):
        load_config(empty)

    broken = tmp_path / "broken.yaml"
    broken.write_text("dataset: {preset: ffhq_34\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(broken)

    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")

    unknown = write_yaml(tmp_path / "unknown.yaml", {**minimal(), "stroe": "x"})
    with pytest.raises(ConfigError, match=r"unknown\.yaml[\s\S]*stroe: unknown key"):
        load_config(unknown)


# -- paths ---------------------------------------------------------------------------------------------------------------
def test_relative_paths_resolve_against_the_config_directory(tmp_path, monkeypatch):
    exp = tmp_path / "experiments" / "ffhq"
    exp.mkdir(parents=True)
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # the working directory does not matter
    path = write_yaml(exp / "exp.yaml", {
        "dataset": {"preset": "ffhq_34", "train_dir": "../../data/train", "test_dir": str(tmp_path / "abs-test")},
        "model": {"checkpoint": "ckpt/ffhq.pt"},
        "store": "store", "output_dir": "out"})
    cfg = load_config(path)
    root = tmp_path.resolve()
    assert cfg.dataset.train_dir == str(root / "data" / "train")
    assert cfg.dataset.test_dir == str(root / "abs-test")
    assert cfg.model.checkpoint == str(root / "experiments" / "ffhq" / "ckpt" / "ffhq.pt")
    assert cfg.store == str(root / "experiments" / "ffhq" / "store")
    assert cfg.output_dir == str(root / "experiments" / "ffhq" / "out")

    default = load_config(write_yaml(exp / "default.yaml", minimal("celeba_19")))
    assert default.store == str(root / "experiments" / "ffhq" / "ddpmseg-store")
    assert default.output_dir == str(root / "experiments" / "ffhq" / "runs" / "celeba_19")


def test_s3_store_url_is_kept(tmp_path):
    cfg = parse_config({**minimal(), "store": "s3://bucket/team/ddpmseg"}, base_dir=tmp_path)
    assert cfg.store == "s3://bucket/team/ddpmseg"
    assert Path(cfg.dataset.train_dir).is_absolute()


# -- the official experiment files --------------------------------------------------------------------------------------
def official_ffhq_json(tmp_path: Path, **changes) -> Path:
    """experiments/ffhq_34/ddpm.json of the official repository (with `changes` applied)."""
    opts = {
        "exp_dir": "pixel_classifiers/ffhq_34/datasetDDPM",
        "model_type": "ddpm",
        "category": "ffhq_34",
        "number_class": 34,
        "ignore_label": 255,
        "training_path": "datasets/ffhq_34/real/train",
        "validation_path": "datasets/ffhq_34/real/val",
        "testing_path": "datasets/ffhq_34/real/test",
        "model_path": "checkpoints/ddpm/ffhq.pt",
        "dim": [256, 256, 8448],
        "steps": [50, 150, 250],
        "blocks": [5, 6, 7, 8, 12],
        "model_num": 10,
        "batch_size": 64,
        "max_training": 20,
        "training_number": 20,
        "testing_number": 20,
        "upsample_mode": "bilinear",
        "share_noise": True,
        "input_activations": False,
    }
    opts.update(changes)
    path = tmp_path / "experiments" / "ffhq_34" / "ddpm.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(opts, indent=2))
    return path


def test_parse_model_flags_reads_the_official_string():
    flags = parse_model_flags(OFFICIAL_MODEL_FLAGS_STRING)
    assert flags == OFFICIAL_256_FLAGS
    assert type(flags["dropout"]) is float and type(flags["image_size"]) is int and flags["class_cond"] is False


@pytest.mark.parametrize("flags, expected", [
    ("--image_size", "pairs"),
    ("image_size 256", "expected '--name'"),
    ("--image_size big", "--image_size: expected an integer, got 'big'"),
    ("--use_fp16 yes", "--use_fp16: expected true/false"),
    ("--dropout lots", "--dropout: expected a number"),
    ("--image_sise 256", "unknown flag --image_sise"),
])
def test_bad_flag_strings_name_the_flag(flags, expected):
    with pytest.raises(ConfigError, match="model flags") as info:
        parse_model_flags(flags)
    assert expected in str(info.value)


def test_import_official_validates_and_carries_the_same_values(tmp_path):
    path = official_ffhq_json(tmp_path)
    data = import_official(path, OFFICIAL_MODEL_FLAGS_STRING)
    cfg = parse_config(data, base_dir=tmp_path, source=str(path))
    opts = json.loads(path.read_text())
    ds = cfg.dataset
    assert ds.preset == "ffhq_34" and ds.name == "ffhq_34"
    assert (ds.number_class, ds.ignore_label, ds.training_number, ds.testing_number) == (34, 255, 20, 20)
    assert ds.train_dir == str(tmp_path.resolve() / opts["training_path"])
    assert ds.test_dir == str(tmp_path.resolve() / opts["testing_path"])
    assert cfg.model.checkpoint == str(tmp_path.resolve() / opts["model_path"])
    assert cfg.features.steps == opts["steps"] and cfg.features.blocks == opts["blocks"]
    assert cfg.features.share_noise is True and cfg.features.input_activations is False
    assert cfg.classifier.model_num == 10 and cfg.classifier.batch_size == 64
    assert cfg.recipe == "paper"
    assert {k: cfg.model.full_flags()[k] for k in OFFICIAL_256_FLAGS} == OFFICIAL_256_FLAGS
    assert cfg.model.flags == OFFICIAL_256_FLAGS  # the imported flags are written out explicitly


def test_import_official_seed_seeds_the_noise_and_the_classifier(tmp_path):
    data = import_official(official_ffhq_json(tmp_path, seed=3))
    assert data["seed"] == 3 and "seed" not in data["features"]
    cfg = parse_config(data, base_dir=tmp_path)
    assert (cfg.features.seed, cfg.classifier.seed) == (3, 3)
    assert parse_config(import_official(official_ffhq_json(tmp_path)), base_dir=tmp_path).classifier.seed == 0


def test_import_official_without_flags_takes_the_image_size_from_dim(tmp_path):
    data = import_official(official_ffhq_json(tmp_path, dim=[128, 128, 8448], category="my_faces",
                                              number_class=5, steps=[10, 20], blocks=[3, 4]))
    assert data["model"]["flags"] == {"image_size": 128}
    assert data["dataset"]["name"] == "my_faces" and "preset" not in data["dataset"]
    cfg = parse_config(data, base_dir=tmp_path)
    assert cfg.image_size == 128 and cfg.dataset.number_class == 5 and cfg.dataset.class_names is None
    assert cfg.features.steps == [10, 20]


def test_cli_config_import_writes_a_loadable_yaml(tmp_path):
    from flows.cli import main

    path = official_ffhq_json(tmp_path)
    out = tmp_path / "ffhq_34.yaml"
    assert main(["config", "import", str(path), "--model-flags", OFFICIAL_MODEL_FLAGS_STRING, "--out", str(out)]) == 0
    cfg = load_config(out)
    assert cfg.dataset.preset == "ffhq_34" and cfg.features.blocks == [5, 6, 7, 8, 12]
    assert cfg.model.checkpoint == str(tmp_path.resolve() / "checkpoints" / "ddpm" / "ffhq.pt")
    assert cfg.model.full_flags()["num_channels"] == 256


def test_cli_config_import_reports_a_bad_flag_string(tmp_path, capsys):
    from flows.cli import main

    path = official_ffhq_json(tmp_path)
    out = tmp_path / "never.yaml"
    code = main(["config", "import", str(path), "--model-flags", "--num_chanels 256", "--out", str(out)])
    assert code != 0 and not out.exists()
    assert "num_chanels" in capsys.readouterr().err


def test_import_official_errors_name_the_key_and_the_file(tmp_path):
    path = official_ffhq_json(tmp_path, proj_dim=128)
    with pytest.raises(ConfigError, match=r"ddpm\.json: unknown key\(s\) \['proj_dim'\]"):
        import_official(path)

    path = official_ffhq_json(tmp_path)
    opts = json.loads(path.read_text())
    del opts["testing_path"]
    path.write_text(json.dumps(opts))
    with pytest.raises(ConfigError, match=r"ddpm\.json: missing key\(s\) \['testing_path'\]"):
        import_official(path)

    with pytest.raises(ConfigError, match="model_type 'mae'"):
        import_official(official_ffhq_json(tmp_path, model_type="mae"))
    with pytest.raises(ConfigError, match="upsample_mode 'nearest'"):
        import_official(official_ffhq_json(tmp_path, upsample_mode="nearest"))
    with pytest.raises(ConfigError, match=r"nope\.json: cannot read"):
        import_official(tmp_path / "nope.json")
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        import_official(path)
    with pytest.raises(ConfigError, match="--image_size: expected an integer"):
        import_official(official_ffhq_json(tmp_path), "--image_size big")


def test_every_classifier_section_the_config_accepts_builds_training_settings():
    """One source of the classifier's bounds: a value the config accepts always trains, and the config refuses
    (naming the key) what TrainSettings would refuse after extraction."""
    from pipeline.classifier import MIN_BATCH_SIZE, MIN_EPOCHS, train_settings

    msg = config_error(minimal(classifier={"batch_size": MIN_BATCH_SIZE - 1}))
    assert "classifier.batch_size" in msg and str(MIN_BATCH_SIZE) in msg
    msg = config_error(minimal(classifier={"max_epochs": MIN_EPOCHS - 1}))
    assert "classifier.max_epochs" in msg
    cfg = parse_config(minimal(classifier={"batch_size": MIN_BATCH_SIZE, "max_epochs": MIN_EPOCHS,
                                           "optimizer": "adamw", "weight_decay": 1e-4, "dropout": 0.4,
                                           "early_stopping": False}))
    settings = train_settings(cfg, dim=12)
    assert (settings.batch_size, settings.max_epochs, settings.optimizer, settings.dropout) == (2, 1, "adamw", 0.4)
    assert settings.number_class == 34 and settings.dim == 12
    assert settings.early_stop_start_epoch > settings.max_epochs  # early stopping off: the rule never starts
    paper = train_settings(parse_config(minimal()), dim=8448)
    assert (paper.lr, paper.batch_size, paper.early_stop_start_epoch, paper.patience) == (1e-3, 64, 4, 50)


# -- seeds: the official --seed sets the shared noise and the MLPs; ours inherit a top-level seed --------------------
def test_top_level_seed_is_inherited_by_features_and_classifier_unless_set():
    assert (lambda c: (c.seed, c.features.seed, c.classifier.seed))(parse_config(minimal())) == (None, 0, 0)
    cfg = parse_config(minimal(seed=7))
    assert (cfg.seed, cfg.features.seed, cfg.classifier.seed) == (7, 7, 7)
    cfg = parse_config(minimal(seed=7, features={"seed": 1}))  # a section's own seed overrides
    assert (cfg.features.seed, cfg.classifier.seed) == (1, 7)
    cfg = parse_config(minimal(seed=7, classifier={"seed": 0, "lr": 0.01}))
    assert (cfg.features.seed, cfg.classifier.seed, cfg.classifier.lr) == (7, 0, 0.01)
    cfg = parse_config(minimal(seed=3, recipe="improved"))  # the recipe's defaults and the seed both apply
    assert (cfg.classifier.seed, cfg.classifier.optimizer, cfg.features.seed) == (3, "adamw", 3)
    assert "seed" in config_error(minimal(seed="x")) and "got 'x'" in config_error(minimal(seed="x"))


def test_a_config_without_top_level_seed_validates_to_the_same_sections():
    """The sections (which the stage keys hash) are what they were before the top-level seed existed."""
    plain = config_to_dict(parse_config(minimal(features={"seed": 4}, classifier={"seed": 5})))
    inherited = config_to_dict(parse_config(minimal(seed=4, classifier={"seed": 5})))
    assert plain["features"] == inherited["features"] and plain["classifier"] == inherited["classifier"]
    assert config_to_dict(parse_config(minimal()))["classifier"] == \
        config_to_dict(parse_config(minimal(classifier={"seed": 0})))["classifier"]


# -- the noise generator -------------------------------------------------------------------------------------------
def test_noise_generator_maps_to_a_make_noise_mode():
    from pipeline.backbone import NOISE_MODES
    from pipeline.config import NOISE_GENERATOR_MODES, noise_mode

    assert NOISE_GENERATOR_MODES == {"cpu": "cpu", "cuda": "cuda-generator"}
    assert set(NOISE_GENERATOR_MODES.values()) <= set(NOISE_MODES)
    assert noise_mode(parse_config(minimal())) == "cpu"
    assert noise_mode(parse_config(minimal(features={"noise_generator": "cuda"}))) == "cuda-generator"
    assert "features.noise_generator" in config_error(minimal(features={"noise_generator": "cuda-generator"}))


def test_cuda_noise_on_a_cpu_device_is_a_one_line_error_naming_the_key():
    import torch

    from pipeline.config import check_noise_device

    cfg = parse_config(minimal(features={"noise_generator": "cuda"}))
    with pytest.raises(ConfigError) as info:
        check_noise_device(cfg, torch.device("cpu"))
    message = str(info.value)
    assert message.startswith("features.noise_generator: 'cuda'") and "\n" not in message
    assert "'cpu'" in message and "noise_generator: cpu" in message
    check_noise_device(parse_config(minimal()), torch.device("cpu"))  # cpu noise: any device
    check_noise_device(cfg, torch.device("cuda"))  # the generator runs where the forwards run

"""Importing the official experiment files: experiments/<name>/{ddpm,mae,swav,swav_w2}.json of
yandex-research/ddpm-segmentation (+ the MODEL_FLAGS string of its scripts) into our config mapping
(`ddpmseg config import`)."""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from pipeline.config import OFFICIAL_FLAGS, ConfigError, coerce_flag, feature_channels, parse_config
from pipeline.extractors import KINDS, extractor_class
from pipeline.presets import DATASET_PRESETS

__all__ = ["parse_model_flags", "import_official"]

_OFFICIAL_KEYS = {
    "exp_dir", "model_type", "category", "number_class", "ignore_label", "training_path", "validation_path",
    "testing_path", "model_path", "dim", "steps", "blocks", "model_num", "batch_size", "max_training",
    "training_number", "testing_number", "upsample_mode", "share_noise", "input_activations", "seed",
}


def parse_model_flags(flag_string: str) -> dict[str, Any]:
    """'--attention_resolutions 32,16,8 --class_cond False ...' -> {"attention_resolutions": "32,16,8", ...}."""
    tokens = shlex.split(flag_string)
    if len(tokens) % 2:
        raise ConfigError(f"model flags: expected '--name value' pairs, got {flag_string!r}")
    flags: dict[str, Any] = {}
    for name, raw in zip(tokens[::2], tokens[1::2]):
        if not name.startswith("--"):
            raise ConfigError(f"model flags: expected '--name', got {name!r}")
        key = name[2:]
        if key not in OFFICIAL_FLAGS:
            raise ConfigError(f"model flags: unknown flag --{key}; allowed: {sorted(OFFICIAL_FLAGS)}")
        try:
            flags[key] = coerce_flag(key, raw)
        except ConfigError as err:
            raise ConfigError(f"model flags: --{key}: {str(err).split(': ', 1)[1]}") from None
    return flags


def import_official(json_path: str | Path, model_flags: str | None = None) -> dict[str, Any]:
    """Turn an official experiments/<name>/{ddpm,mae,swav,swav_w2}.json (+ the MODEL_FLAGS string for ddpm) into
    our config mapping. For mae / swav / swav_w2 (whose files list no steps and no blocks) the layers are the
    official extractor's, and the feature length is checked against the file's `dim`."""
    json_path = Path(json_path)
    try:
        opts = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{json_path}: cannot read official experiment file: {err}") from None
    if not isinstance(opts, dict):
        raise ConfigError(f"{json_path}: expected a JSON object, got {type(opts).__name__}")
    unknown = sorted(set(opts) - _OFFICIAL_KEYS)
    if unknown:
        raise ConfigError(f"{json_path}: unknown key(s) {unknown}; expected keys of an official ddpm.json")
    missing = sorted({"training_path", "testing_path", "model_path", "number_class", "training_number",
                      "testing_number", "steps", "blocks"} - set(opts))
    if missing:
        raise ConfigError(f"{json_path}: missing key(s) {missing}; an official ddpm.json has them all")
    kind = opts.get("model_type", "ddpm")
    if kind not in KINDS or not extractor_class(kind).uses_weights:
        raise ConfigError(f"{json_path}: model_type {kind!r} is not supported; expected one of "
                          f"{[k for k in KINDS if extractor_class(k).uses_weights]}")
    if model_flags and kind != "ddpm":
        raise ConfigError(f"{json_path}: --model-flags are guided-diffusion flags; model_type {kind!r} takes none")
    if opts.get("upsample_mode", "bilinear") != "bilinear":
        raise ConfigError(f"{json_path}: upsample_mode {opts['upsample_mode']!r}; only 'bilinear' is supported")
    category = opts.get("category")
    known = isinstance(category, str) and category in DATASET_PRESETS
    dataset: dict[str, Any] = {"preset": category} if known else {"name": category or "custom"}
    dataset.update({
        "train_dir": opts["training_path"], "test_dir": opts["testing_path"],
        "number_class": opts["number_class"], "ignore_label": opts.get("ignore_label", 255),
        "training_number": opts["training_number"], "testing_number": opts["testing_number"],
    })
    flags = parse_model_flags(model_flags) if model_flags else {}
    if "dim" in opts and "image_size" not in flags:
        flags["image_size"] = int(opts["dim"][0])
    model: dict[str, Any] = {"checkpoint": opts["model_path"]}
    if kind != "ddpm":
        model = {"kind": kind, **model}
    if flags:
        model["flags"] = flags
    input_activations = bool(opts.get("input_activations", False))
    if extractor_class(kind).uses_timesteps:
        features: dict[str, Any] = {
            "steps": list(opts["steps"]), "blocks": list(opts["blocks"]), "input_activations": input_activations,
            "share_noise": bool(opts.get("share_noise", True)),
        }
    elif opts["steps"] or opts["blocks"]:
        raise ConfigError(f"{json_path}: model_type {kind!r} with steps {opts['steps']} / blocks {opts['blocks']}; "
                          f"the official {kind} extractor uses neither (expected empty lists)")
    else:
        features = {"blocks": extractor_class(kind).feature_defaults(flags)["blocks"],
                    "input_activations": input_activations}
    data = {
        "recipe": "paper",
        "seed": int(opts.get("seed", 0)),  # the official seed sets the noise and the MLPs
        "dataset": dataset,
        "model": model,
        "features": features,
        "classifier": {"model_num": int(opts.get("model_num", 10)), "batch_size": int(opts.get("batch_size", 64))},
    }
    if not extractor_class(kind).uses_timesteps and "dim" in opts:
        try:
            channels = feature_channels(parse_config(data, source=str(json_path)))
        except ConfigError:
            channels = None  # reported when the imported config is loaded
        if channels is not None and channels != int(opts["dim"][-1]):
            raise ConfigError(f"{json_path}: dim {opts['dim']} says {opts['dim'][-1]} channels per pixel; the "
                              f"{kind} extractor's layers give {channels}")
    return data

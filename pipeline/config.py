"""One experiment = one YAML file, validated on load.

    recipe: paper                      # paper | improved
    dataset: {preset: ffhq_34, train_dir: data/train, test_dir: data/test}
    model: {checkpoint: checkpoints/ddpm/ffhq.pt, flags: {...}}   # flags default to the official 256x256 ones
                                       # kind: ddpm (default) | rgb | mae | swav | swav_w2 (pipeline/extractors)
    features: {steps: [50, 150, 250], blocks: [5, 6, 7, 8, 12]}
    classifier: {model_num: 10, batch_size: 64, lr: 0.001}
    evaluation: {}
    store: ./ddpmseg-store             # or s3://bucket/prefix
    output_dir: runs/ffhq_34

Relative paths are resolved against the directory of the config file. A preset's defaults: with neither
dataset.train_dir nor test_dir, datasets/<preset>/real/{train,test}; without model.checkpoint,
checkpoints/<kind>/<its checkpoint> (.pth for mae / swav / swav_w2); each beside the config file when it exists
there (the official repository's layout), else in the cache `ddpmseg fetch` fills (pipeline/fetched.py). Unknown
keys, wrong types, a block outside the model and a timestep outside [0, diffusion_steps) are `ConfigError`s naming
the key and the range.
What a kind accepts (its flags, layers, steps, defaults) comes from its extractor (pipeline/extractors).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

# plain data and the extractors' config face only: loading a config imports no torch (`ddpmseg status` stays quick)
from pipeline import fetched
from pipeline.classifier_bounds import MIN_BATCH_SIZE, MIN_EPOCHS, OPTIMIZERS
from pipeline.extractors import KINDS, FeatureExtractor, create_extractor, extractor_class
from pipeline.extractors import base as extractor_base
from pipeline.extractors.ddpm import num_output_blocks as _num_output_blocks
from pipeline.model_flags import OFFICIAL_MODEL_FLAGS
from pipeline.presets import DATASET_PRESETS, PAPER_BLOCKS, PAPER_STEPS
from pipeline.transform_specs import STUDY_TRAIN_TRANSFORMS, STUDY_TTA_VIEWS, TransformSpec

if TYPE_CHECKING:
    import torch

#: The official 256x256 model flags (scripts/ddpm/train_interpreter.sh) on top of guided-diffusion's defaults.
OFFICIAL_FLAGS: dict[str, Any] = dict(OFFICIAL_MODEL_FLAGS)
#: preset entries that are not dataset fields (see pipeline.presets.DATASET_PRESETS)
_PRESET_NON_DATASET_KEYS = ("checkpoint", "reproduce")
#: features.noise_generator -> the pipeline.backbone.make_noise mode that draws it
NOISE_GENERATOR_MODES: dict[str, str] = {"cpu": "cpu", "cuda": "cuda-generator"}
#: sections whose `seed` inherits the top-level `seed` when not set (the official --seed sets both)
SEEDED_SECTIONS = ("features", "classifier")


class ConfigError(ValueError):
    """An experiment file that does not validate; the message names the file, the key and what was expected."""


def coerce_flag(name: str, value: Any) -> Any:
    """A ddpm model flag value of the type of its official default (bool, int, float or str); ConfigError naming
    `model.flags.<name>` otherwise. Strings are parsed for non-string flags ('True', '256', '0.1'), as on the
    official command line; an int is accepted for a float flag."""
    try:
        return extractor_base.coerce_flag(OFFICIAL_FLAGS, name, value)
    except ValueError as err:
        raise ConfigError(str(err)) from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_Channel = Annotated[int, Field(ge=0, le=255)]


class DatasetConfig(_Strict):
    preset: str | None = None
    name: str = "custom"
    train_dir: str
    test_dir: str
    number_class: int = Field(ge=2, le=255)
    ignore_label: int = Field(255, ge=0, le=255)
    training_number: int = Field(ge=1)
    testing_number: int = Field(ge=1)
    class_names: list[str] | None = None
    palette: list[tuple[_Channel, _Channel, _Channel]] | None = None
    min_annotation_pixels: int = Field(20, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if not isinstance(name, str) or name not in DATASET_PRESETS:
                raise ValueError(f"unknown preset {name!r}; expected one of {sorted(DATASET_PRESETS)}")
            preset = {k: v for k, v in DATASET_PRESETS[name].items() if k not in _PRESET_NON_DATASET_KEYS}
            if "train_dir" not in data and "test_dir" not in data:  # resolved in parse_config (official or fetched)
                preset.update(train_dir=f"datasets/{name}/real/train", test_dir=f"datasets/{name}/real/test")
            data = {**preset, "name": name, **data}
        return data

    @model_validator(mode="after")
    def _check_lists(self) -> "DatasetConfig":
        for key in ("class_names", "palette"):
            value = getattr(self, key)
            if value is not None and len(value) < self.number_class:
                raise ValueError(f"{key} has {len(value)} entries; expected one per class ({self.number_class})")
        return self


class ModelConfig(_Strict):
    #: ddpm: a guided-diffusion UNet (checkpoint, or random_init for the `random-unet` baseline);
    #: rgb: the `rgb` baseline, each pixel's colour and (y, x) coordinates (what a pixel MLP sees without a backbone);
    #: mae, swav, swav_w2: the paper's self-supervised baselines (MAE ViT-L/8, SwAV ResNet-50 / ResNet-50w2)
    kind: Literal[KINDS] = "ddpm"
    checkpoint: str | None = None
    random_init: bool = False
    init_seed: int = 0
    flags: dict[str, Any] = Field(default_factory=dict)  # the kind's architecture flags over its official ones

    @model_validator(mode="before")
    @classmethod
    def _check_flags(cls, data: Any) -> Any:
        """The kind's extractor checks and coerces the flags (unknown names, wrong types)."""
        if not isinstance(data, dict) or not isinstance(data.get("flags"), dict):
            return data
        kind = data.get("kind", "ddpm")
        if kind not in KINDS:
            return data  # reported by the kind field's own validation
        return {**data, "flags": extractor_class(kind).check_flags(data["flags"])}

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if not extractor_class(self.kind).uses_weights:
            if self.checkpoint is not None or self.random_init:
                raise ValueError(f"kind {self.kind} uses no network: give neither checkpoint nor random_init")
            return self
        network = "UNet" if self.kind == "ddpm" else f"{self.kind} network"
        if self.checkpoint is None and not self.random_init:
            raise ValueError(f"checkpoint is required (or set random_init: true for a randomly initialised {network})")
        if self.checkpoint is not None and self.random_init:
            raise ValueError("give either checkpoint or random_init: true, not both")
        self.extractor()  # flags that cannot build the kind's network (e.g. a patch size that does not divide)
        return self

    def full_flags(self) -> dict[str, Any]:
        """The kind's official flags overridden by the config's flags."""
        return {**extractor_class(self.kind).default_flags(), **self.flags}

    def extractor(self) -> FeatureExtractor:
        """The feature extractor of this model section (nothing built yet)."""
        return create_extractor(self.kind, self.flags)


class FeaturesConfig(_Strict):
    steps: list[int] = Field(default_factory=lambda: list(PAPER_STEPS), min_length=1)
    blocks: list[int] = Field(default_factory=lambda: list(PAPER_BLOCKS), min_length=1)
    input_activations: bool = False
    share_noise: bool = True
    seed: int = 0  # the shared noise's seed; default: the top-level `seed`, else 0
    noise_generator: Literal["cpu", "cuda"] = "cpu"  # cpu: device-independent; cuda: the official CUDA generator
    batch_size: int = Field(4, ge=1)
    device: str = "auto"
    cpu_threads: int | None = Field(None, ge=1)  # torch threads for CPU extraction (default: all cores)


class ClassifierConfig(_Strict):
    model_num: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=MIN_BATCH_SIZE)
    lr: float = Field(1e-3, gt=0)
    max_epochs: int = Field(100, ge=MIN_EPOCHS)
    optimizer: Literal[OPTIMIZERS] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    early_stopping: bool = True  # the official rule; off: train exactly max_epochs (the study's 11 epochs)
    early_stop_start_epoch: int = Field(4, ge=0)
    patience: int = Field(50, ge=0)
    seed: int = 0  # the members' seeds derive from it; default: the top-level `seed`, else 0
    images_per_buffer: int = Field(4, ge=1)
    #: where members train and predict: auto (CUDA when available) | cpu | cuda | cuda:N; in no stage key (the
    #: result does not depend on it beyond floating-point rounding)
    device: str = "auto"
    #: batched: every member still to train in one pass over shared slices (pipeline/ensemble.py);
    #: independent: one task per member, each with its own pixel stream (Dask-parallel)
    ensemble: Literal["batched", "independent"] = "independent"  # pipeline.classifier.ENSEMBLE_MODES

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"classifier.device: expected auto, cpu, cuda or cuda:N, got {device!r}")
        return device


class EvaluationConfig(_Strict):
    save_png: bool = True
    gallery: int = Field(8, ge=0)  # worst images shown in <output_dir>/report/report.html; 0: no report


class AugmentationConfig(_Strict):
    """Train-time augmented views (the later study): `views` extra views per training image."""

    views: int = Field(0, ge=0)
    seed: int = 0
    transforms: list[TransformSpec] = Field(
        default_factory=lambda: [TransformSpec(name=n, p=0.4) for n in STUDY_TRAIN_TRANSFORMS])
    keep_iterations: bool = True  # iterations per epoch as without augmentation (the study)


class TTAConfig(_Strict):
    """Test-time augmentation: fixed views (p = 1 transforms), predictions merged per pixel."""

    views: list[list[str]] = Field(default_factory=list)
    include_original: bool = True
    merge: Literal["vote", "mean"] = "vote"
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "TTAConfig":
        for view in self.views:
            for name in view:
                TransformSpec(name=name, p=1.0)
                if name in ("RandomResizedCrop", "Rotate", "ElasticTransform"):
                    raise ValueError(f"tta.views: {name} cannot be undone on a predicted mask; "
                                     f"allowed geometric transform: HorizontalFlip")
        if not self.views and not self.include_original:
            raise ValueError("tta: no views at all (views is empty and include_original is false)")
        return self

    def specs(self) -> list[list[TransformSpec]]:
        return [[TransformSpec(name=n, p=1.0) for n in view] for view in self.views]


class PostprocessConfig(_Strict):
    closing: bool = False  # 3x3-cross morphological closing of predicted masks (hurt on 3 of 4 data sets)


class DatasetDDPMConfig(_Strict):
    """DatasetDDPM (the official generate_dataset.py + train_deeplab.py): samples drawn from the ddpm backbone,
    labelled by the trained ensemble, a segmentation network trained on the kept ones."""

    samples: int = Field(1000, ge=1)  # images drawn (official 10000); `ddpmseg synthesize --samples` overrides
    batch_size: int = Field(8, ge=1)  # samples drawn together (official 100); part of each batch's key
    respacing: str = ""  # timestep_respacing: "" every step (official), "K" evenly strided, "ddimK"
    ddim: bool = False  # ddim_sample_loop (eta 0) instead of p_sample_loop (official: False)
    clip_denoised: bool = True  # clip each step's x_0 prediction to [-1, 1] (official: True)
    seed: int = 0  # each sample's noise comes from (seed, its index)
    uncertainty_portion: float = Field(0.1, ge=0, lt=1)  # share of most uncertain samples dropped (official 0.1)
    max_data: int = Field(0, ge=0)  # use only the first max_data samples; 0: all (official script: 50000)
    #: official: sorted by uncertainty, [30 : -int(N * portion) + 30] kept (needs int(N * portion) > 30, so
    #: N > 300 at 0.1); most_uncertain: only the int(N * portion) most uncertain dropped (pipeline/segmenter.py)
    uncertainty_rule: Literal["official", "most_uncertain"] = "official"
    backbone: str = "resnet101"  # DeepLabV3's backbone (pipeline/deeplab.py): resnet101 | resnet50 | ddpmseg_resnet18
    resolution: int | None = Field(None, ge=8)  # segmenter input size; default: the image size (official 256)
    learning_rate: float = Field(1e-3, gt=0)  # Adam (official)
    segmenter_batch_size: int = Field(8, ge=1)  # official 8
    epochs: int = Field(20, ge=1)  # official 20, a checkpoint per epoch
    model_selection: Literal["validation", "last"] = "validation"  # best mIoU on the labelled training images
    #                                                 (the official validation_path is real/train), or the last epoch
    #: the backbone's initial weights: imagenet (torchvision's ImageNet ResNet, fetched by `ddpmseg fetch checkpoint
    #: imagenet/<backbone>`; the official start, default for resnet101 / resnet50), none (random; the default for
    #: ddpmseg_resnet18, which has no ImageNet weights) or the path of a .pth classification-ResNet state dict
    backbone_weights: str | None = None

    @model_validator(mode="after")
    def _backbone_weights_default(self) -> "DatasetDDPMConfig":
        if self.backbone_weights is None:
            self.backbone_weights = "imagenet" if self.backbone in fetched.IMAGENET_WEIGHTS else "none"
        elif self.backbone_weights == "imagenet" and self.backbone not in fetched.IMAGENET_WEIGHTS:
            raise ValueError(f"datasetddpm.backbone_weights: imagenet: there are no ImageNet weights for backbone "
                             f"{self.backbone!r} (only for {', '.join(fetched.IMAGENET_WEIGHTS)}); use none or the "
                             f"path of a .pth state dict")
        elif not self.backbone_weights.strip():
            raise ValueError("datasetddpm.backbone_weights: expected imagenet, none or the path of a .pth file, "
                             "got ''")
        return self

    @field_validator("respacing", mode="before")
    @classmethod
    def _respacing_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ExperimentConfig(_Strict):
    recipe: Literal["paper", "improved"] = "paper"
    seed: int | None = None  # the official --seed: features.seed and classifier.seed inherit it unless set
    dataset: DatasetConfig
    model: ModelConfig
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    tta: TTAConfig = Field(default_factory=TTAConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    datasetddpm: DatasetDDPMConfig = Field(default_factory=DatasetDDPMConfig)
    store: str = "ddpmseg-store"
    store_read_only: bool = False  # consumers of a shared store: any stage that would need writing is an error
    output_dir: str | None = None
    _source_path: str | None = PrivateAttr(default=None)  # the YAML file it was loaded from (load_config)

    @property
    def source_path(self) -> str | None:
        """The absolute path of the YAML file this config was loaded from; None when built from a mapping."""
        return self._source_path

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        """`recipe: improved` fills what the config leaves out with the later study's settings."""
        if isinstance(data, dict) and data.get("recipe") == "improved":
            data = {**data}
            preset = (data.get("dataset") or {}).get("preset") if isinstance(data.get("dataset"), dict) else None
            for section, values in improved_defaults(preset).items():
                given = data.get(section) or {}
                if isinstance(given, dict):
                    data[section] = {**values, **given}
        return data

    @model_validator(mode="before")
    @classmethod
    def _inherit_seed(cls, data: Any) -> Any:
        """features.seed and classifier.seed default to the top-level seed (the official --seed sets the shared
        noise and the MLPs' seed); a seed given in a section overrides it."""
        if isinstance(data, dict) and data.get("seed") is not None:
            data = {**data}
            for section in SEEDED_SECTIONS:
                given = data.get(section, {})
                if isinstance(given, dict) and "seed" not in given:
                    data[section] = {**given, "seed": data["seed"]}
        return data

    @model_validator(mode="before")
    @classmethod
    def _kind_features(cls, data: Any) -> Any:
        """The kind's feature defaults where the config leaves them out (mae: the last 12 encoder blocks; swav: every
        other Bottleneck, input activations), and what the kind fixes: kinds without timesteps have the single
        pseudo-step 0 (whatever features.steps says), the rgb baseline the single map 0."""
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and data["model"].get("kind") in KINDS:
            kind_class = extractor_class(data["model"]["kind"])
            features = data.get("features") or {}
            flags = data["model"].get("flags") or {}
            if isinstance(features, dict) and isinstance(flags, dict):
                defaults = kind_class.feature_defaults(flags)
                data = {**data, "features": {**defaults, **features, **kind_class.fixed_features()}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _default_checkpoint(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("dataset"), dict):
            preset = data["dataset"].get("preset")
            if data.get("model") is not None and not isinstance(data["model"], dict):
                return data  # a wrong type: reported by the field's own validation
            model = dict(data.get("model") or {})
            kind = model.get("kind", "ddpm")
            if (isinstance(preset, str) and preset in DATASET_PRESETS and "checkpoint" not in model
                    and not model.get("random_init") and kind in KINDS and extractor_class(kind).uses_weights):
                model["checkpoint"] = extractor_class(kind).default_checkpoint(DATASET_PRESETS[preset]["checkpoint"])
            data = {**data, "model": model}
        return data

    @model_validator(mode="after")
    def _check_against_model(self) -> "ExperimentConfig":
        self.model.extractor().check_features(list(self.features.steps), list(self.features.blocks))
        for key in ("steps", "blocks"):
            values = getattr(self.features, key)
            if len(set(values)) != len(values):
                raise ValueError(f"features.{key}: duplicate entries in {values}")
        return self

    @property
    def image_size(self) -> int:
        return int(self.model.full_flags()["image_size"])

    @property
    def sorted_blocks(self) -> list[int]:
        """Blocks ascending: the official channel order within a timestep."""
        return sorted(self.features.blocks)


def improved_defaults(preset: str | None = None) -> dict[str, dict[str, Any]]:
    """The later study's settings: 5x augmented training set (4x for Bedroom-28), AdamW 1e-4, dropout 0.4,
    11 epochs (no early stop), test-time augmentation with its four views merged by voting."""
    return {
        "augmentation": {"views": 3 if preset == "bedroom_28" else 4},
        "classifier": {"optimizer": "adamw", "weight_decay": 1e-4, "dropout": 0.4, "max_epochs": 11,
                       "early_stopping": False},
        "tta": {"views": [list(v) for v in STUDY_TTA_VIEWS], "merge": "vote"},
    }


def noise_mode(cfg: ExperimentConfig) -> str:
    """The pipeline.backbone.make_noise mode of `features.noise_generator`."""
    return NOISE_GENERATOR_MODES[cfg.features.noise_generator]


def check_noise_device(cfg: ExperimentConfig, device: torch.device) -> None:
    """ConfigError when the noise generator cannot run on the `device` the forwards run on (the config cannot
    know the machine: call this where the device is resolved, before any forward)."""
    import torch

    if cfg.features.noise_generator == "cuda" and torch.device(device).type != "cuda":
        why = "CUDA is not available here" if not torch.cuda.is_available() else \
            f"features.device is {cfg.features.device!r}"
        raise ConfigError(f"features.noise_generator: 'cuda' (the official CUDA-generator noise) needs a CUDA "
                          f"device, but the forwards run on {str(device)!r} ({why}); use noise_generator: cpu "
                          f"or run on a GPU")


def num_output_blocks(flags: dict[str, Any]) -> int:
    """Number of decoder blocks (`model.output_blocks`) the ddpm flags build, without building the model."""
    try:
        return _num_output_blocks(flags)
    except ValueError as err:
        raise ConfigError(str(err)) from None


_MAX_ERROR_LINES = 10


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    errors = err.errors()
    for e in errors[:_MAX_ERROR_LINES]:
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(got, dict) else f" (got {got!r})"
        if msg.startswith(f"{loc}.") or (loc == "(top level)" and re.match(r"[\w.]+: ", msg)):
            lines.append(f"  {msg}{shown}")  # the message already names its key
        else:
            lines.append(f"  {loc}: {msg}{shown}")
    if len(errors) > _MAX_ERROR_LINES:
        lines.append(f"  ... and {len(errors) - _MAX_ERROR_LINES} more")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], base_dir: str | Path = ".", source: str = "<config>") -> ExperimentConfig:
    """Validate a config mapping; relative paths are made absolute against `base_dir`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid experiment config\n{_format_validation_error(err)}") from None
    base = Path(base_dir).resolve()

    def resolve(p: str | None) -> str | None:
        if p is None or "://" in p:
            return p
        return str((base / Path(p).expanduser()).resolve())

    def official_or_fetched(relative: str, fetched_path: Path) -> str:
        """A preset's default path: the official repository's layout beside the config when it exists there,
        else the copy `ddpmseg fetch` puts in $DDPMSEG_HOME."""
        local = base / relative
        return str(local.resolve()) if local.exists() else str(fetched_path)

    dataset_given, model_given = data.get("dataset"), data.get("model") or {}
    preset = cfg.dataset.preset
    if preset is not None and "train_dir" not in dataset_given and "test_dir" not in dataset_given:
        train, test = fetched.dataset_dirs(preset)
        cfg.dataset.train_dir = official_or_fetched(cfg.dataset.train_dir, train)
        cfg.dataset.test_dir = official_or_fetched(cfg.dataset.test_dir, test)
    else:
        cfg.dataset.train_dir = resolve(cfg.dataset.train_dir)
        cfg.dataset.test_dir = resolve(cfg.dataset.test_dir)
    if preset is not None and cfg.model.checkpoint is not None and "checkpoint" not in model_given:
        default = Path(cfg.model.checkpoint)  # checkpoints/<kind>/<file>: the kind's official script's layout
        cfg.model.checkpoint = official_or_fetched(
            cfg.model.checkpoint, fetched.checkpoint_path(default.name, family=default.parent.name))
    else:
        cfg.model.checkpoint = resolve(cfg.model.checkpoint)
    if cfg.datasetddpm.backbone_weights not in ("imagenet", "none"):
        cfg.datasetddpm.backbone_weights = resolve(cfg.datasetddpm.backbone_weights)
    cfg.store = resolve(cfg.store)
    cfg.output_dir = resolve(cfg.output_dir or f"runs/{cfg.dataset.name}")
    return cfg


def segmenter_backbone_weights(cfg: ExperimentConfig) -> Path | None:
    """The file datasetddpm.backbone_weights names (imagenet: the fetched torchvision weights of the backbone), or
    None for `none`. ConfigError (one line) when the file is missing, naming the fetch command for `imagenet`."""
    d, source = cfg.datasetddpm, cfg.source_path or "the config"
    if d.backbone_weights == "none":
        return None
    if d.backbone_weights == "imagenet":
        path, hub = fetched.imagenet_weights_path(d.backbone), fetched.torch_hub_weights_path(d.backbone)
        if not path.is_file() and hub.is_file():
            return hub  # torchvision downloaded the same file before (its sha256 is in the key either way)
        if not path.is_file():
            raise ConfigError(f"{source}: datasetddpm.backbone_weights: imagenet: {path} not found (nor {hub}); run "
                              f"`ddpmseg fetch checkpoint imagenet/{d.backbone}` (torchvision's ImageNet "
                              f"{d.backbone}, the official start), or set datasetddpm.backbone_weights: none to start "
                              f"from random weights")
        return path
    path = Path(d.backbone_weights)
    if not path.is_file():
        raise ConfigError(f"{source}: datasetddpm.backbone_weights: {path} not found; expected imagenet, none or "
                          f"the path of a .pth classification-ResNet state dict")
    return path


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    cfg = parse_config(data, base_dir=path.parent, source=str(path))
    cfg._source_path = str(path.resolve())
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain JSON-able mapping of a config (the canonical form hashed into stage keys)."""
    return json.loads(cfg.model_dump_json())


def feature_channels(cfg: ExperimentConfig) -> int:
    """Length of a pixel's feature vector for a config: the hooked layers' channels, for every step."""
    shapes = cfg.model.extractor().layer_shapes(cfg.sorted_blocks, cfg.features.input_activations)
    return len(cfg.features.steps) * sum(c for c, _, _ in shapes.values())

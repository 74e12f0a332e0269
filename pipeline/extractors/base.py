"""The interface every feature extractor implements, and the helpers they share.

A feature extractor turns a batch of model inputs (the stored view input: ``(B, 3, H, W)`` float32 in [-1, 1],
the official DDPM transform of the image) into native-resolution maps of some hooked layers:
``{layer: (B, C, h, w) float32 CPU}``. The stages never look inside: they ask the extractor for its
defaults, its validation, its fingerprint and its maps.

Layers are numbered ``0 .. num_layers() - 1`` in forward order (``layer_names()`` says what each is), so the
official channel order (layers ascending) is the order of sorted layer numbers. Kinds without timesteps
(``uses_timesteps`` False) are run once per image: the stages use a single pseudo-step 0 for them.
"""
from __future__ import annotations

import argparse
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch is imported where a network is built or run: validating a config needs none of it
    import torch
    from torch import nn

__all__ = ["ExtractorError", "FeatureExtractor", "LoadReport", "coerce_flag", "coerce_flags", "read_checkpoint",
           "load_partial_state_dict", "IMAGENET_MEAN", "IMAGENET_STD", "imagenet_input", "ActivationHooks"]

LOG = logging.getLogger("ddpmseg.extractors")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the official make_transform for mae / swav / swav_w2
IMAGENET_STD = (0.229, 0.224, 0.225)
_MAX_LISTED = 5  # how many keys a checkpoint message lists per kind


class ExtractorError(ValueError):
    """A feature extractor could not be built, loaded or run as asked (bad flag, checkpoint, layer...)."""


def coerce_flag(defaults: Mapping[str, Any], name: str, value: Any) -> Any:
    """``value`` as the type of ``defaults[name]`` (bool, int, float or str); ValueError naming
    ``model.flags.<name>`` otherwise. Strings are parsed for non-string flags ('True', '256', '0.1'), as on
    the official command line; an int is accepted for a float flag."""
    if name not in defaults:
        raise ValueError(f"model.flags: unknown flag {name!r}; allowed: {sorted(defaults)}")
    default = defaults[name]
    where = f"model.flags.{name}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if isinstance(default, int):
        return _number(value, int, (int,), where, "an integer")
    if isinstance(default, float):
        return _number(value, float, (int, float), where, "a number")
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string (e.g. {default!r}), got {value!r}")
    return value


def _number(value: Any, kind: type, accepted: tuple[type, ...], where: str, what: str) -> Any:
    """`value` as `kind` when it is one of `accepted` (never a bool) or a string `kind` parses; else ValueError."""
    if isinstance(value, accepted) and not isinstance(value, bool):
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ValueError(f"{where}: expected {what}, got {value!r}")


def coerce_flags(defaults: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """Every flag checked and coerced by ``coerce_flag``; unknown names listed together."""
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise ValueError(f"model.flags: unknown model flag(s) {unknown}; allowed: {sorted(defaults)}")
    return {name: coerce_flag(defaults, name, value) for name, value in flags.items()}


class FeatureExtractor(ABC):
    """One kind of feature extractor: built from the config's model section (kind, flags), it knows its
    defaults and checks, its input transform, the layers it can hook, its fingerprint, and runs a forward that
    gives native-resolution maps per hooked layer.

    Construction only reads flags (cheap, no network): ``build`` makes the network and loads its weights.
    """

    kind: ClassVar[str]
    uses_timesteps: ClassVar[bool] = False  # False: one forward per image, the stages' pseudo-step 0
    uses_weights: ClassVar[bool] = True  # False: no network, no checkpoint (rgb)

    def __init__(self, flags: Mapping[str, Any]):
        self.flags = {**self.default_flags(), **self.check_flags(flags)}

    # -- the config -------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def default_flags(cls) -> dict[str, Any]:
        """The official architecture's flags; a config's ``model.flags`` overrides some of them."""

    @classmethod
    def check_flags(cls, flags: Mapping[str, Any]) -> dict[str, Any]:
        """The config's flags checked and coerced to the defaults' types (ValueError naming the flag)."""
        return coerce_flags(cls.default_flags(), flags)

    @classmethod
    def feature_defaults(cls, flags: Mapping[str, Any]) -> dict[str, Any]:
        """``features`` keys a config of this kind gets when it leaves them out (the official settings)."""
        return {}

    @classmethod
    def fixed_features(cls) -> dict[str, Any]:
        """``features`` keys this kind always has, whatever the config says (kinds without timesteps: steps [0])."""
        return {} if cls.uses_timesteps else {"steps": [0]}

    def check_features(self, steps: list[int], blocks: list[int]) -> None:
        """ValueError naming features.steps / features.blocks when a layer or step is outside this extractor."""
        n = self.num_layers()
        for b in blocks:
            if not 0 <= b < n:
                raise ValueError(f"features.blocks: block {b} is outside the model; allowed 0..{n - 1} "
                                 f"({self.layer_description()})")
        if not self.uses_timesteps and list(steps) != [0]:
            raise ValueError(f"features.steps: kind {self.kind} has no timesteps (a single pseudo-step 0), "
                             f"got {list(steps)}")

    def layer_description(self) -> str:
        return f"{self.num_layers()} hookable layers of {self.kind}"

    @property
    def image_size(self) -> int:
        """Side of the square model input (the data set's resolution)."""
        return int(self.flags["image_size"])

    # -- the network -------------------------------------------------------------------------------------------
    @abstractmethod
    def num_layers(self) -> int:
        """How many layers can be hooked (without building the network)."""

    @abstractmethod
    def layer_names(self) -> list[str]:
        """Module path of each hookable layer, by layer number."""

    @abstractmethod
    def layer_shapes(self, blocks: list[int], input_activations: bool = False) -> dict[int, tuple[int, int, int]]:
        """``{layer: (C, h, w)}`` of the hooked layers' maps, computed without weights or a forward."""

    def input_transform(self, x: torch.Tensor) -> torch.Tensor:
        """The network's input from the stored view input ``(B, 3, H, W)`` in [-1, 1] (identity by default)."""
        return x

    @abstractmethod
    def build(self, device: torch.device, checkpoint: str | None, init_seed: int = 0) -> None:
        """Make the network on ``device`` in eval mode with the checkpoint's weights (or random weights drawn
        after ``torch.manual_seed(init_seed)`` when checkpoint is None)."""

    @abstractmethod
    def forward(self, x: torch.Tensor, t: int, noise: torch.Tensor | None, blocks: list[int],
                input_activations: bool = False) -> dict[int, torch.Tensor]:
        """ONE forward of the batch ``x`` (stored view inputs, ``(B, 3, H, W)`` in [-1, 1]): ``{layer: (B, C, h, w)
        float32}`` on the CPU or the extractor's device for each of ``blocks`` (the layers' outputs, or their inputs when input_activations).
        ``t`` and ``noise`` are used by kinds with timesteps only."""

    # -- identity ----------------------------------------------------------------------------------------------
    def fingerprint(self, checkpoint_sha256: str | None, init_seed: int = 0) -> dict[str, Any]:
        """What determines this extractor's maps: kind, flags and the weights' identity (the checkpoint's
        sha256, computed by the caller, or the random-init seed when there is no checkpoint). Stage keys hash it."""
        weights = ({"checkpoint_sha256": checkpoint_sha256} if checkpoint_sha256 is not None
                   else {"random_init_seed": init_seed})
        return {"kind": self.kind, "weights": weights, "flags": dict(self.flags)}

    @classmethod
    def default_checkpoint(cls, dataset_checkpoint: str) -> str:
        """Where the official script puts this kind's checkpoint for a data set preset, relative to the config
        (dataset_checkpoint: the preset's DDPM file name, e.g. 'lsun_bedroom.pt')."""
        return f"checkpoints/{cls.kind}/{Path(dataset_checkpoint).stem}.pth"

    def tag_name(self, checkpoint: str | None, init_seed: int) -> str:
        """Readable start of the store's backbone tag, e.g. 'mae-lsun_bedroom'."""
        return f"{self.kind}-{Path(checkpoint).stem if checkpoint else f'random{init_seed}'}"

    def feature_spec(self, features: Any) -> dict[str, Any]:
        """The activation settings (features section) that change this extractor's maps."""
        return {"input_activations": features.input_activations, "image_size": self.image_size}


def imagenet_input(x: torch.Tensor) -> torch.Tensor:
    """Stored view inputs ``(B, 3, H, W)`` in [-1, 1] -> the official mae / swav input: ToTensor's ``uint8 / 255``
    then ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``. The uint8 pixels are recovered exactly (the stored value is
    ``2 * (u / 255) - 1`` in float32: rounding ``(x + 1) * 127.5`` gives u back), so the result is bit for bit
    the official transform's on the same resized image."""
    import torch

    pixels = torch.round((x.to(torch.float32) + 1) * 127.5).clamp_(0, 255)
    unit = pixels.div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (unit - mean) / std


def read_checkpoint(path: str | Path, entry: str) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)[entry]``: the state dict a training script stored under ``entry``
    ('model' for MAE, 'state_dict' for SwAV). ``argparse.Namespace`` is allowed besides tensors and plain
    containers (MAE's training script stores its arguments under 'args'). ExtractorError naming the file for a
    missing file, a refused or unreadable file, a missing entry or an entry that is not a mapping of tensors."""
    import torch

    from pipeline.torchfile import TorchFileError, load_tensors

    path = Path(path)
    if not path.is_file():
        raise ExtractorError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = load_tensors(path, f"checkpoint {path}")
    except TorchFileError as err:
        raise ExtractorError(str(err)) from None
    if not isinstance(state, Mapping) or entry not in state:
        found = sorted(map(str, state))[:_MAX_LISTED] if isinstance(state, Mapping) else type(state).__name__
        raise ExtractorError(f"checkpoint {path}: expected a mapping with the state dict under {entry!r} "
                             f"(the official format {{{entry!r}: state_dict, ...}}), found {found}")
    weights = state[entry]
    if not isinstance(weights, Mapping):
        raise ExtractorError(f"checkpoint {path}: entry {entry!r} is a {type(weights).__name__}, expected a "
                             f"state dict")
    bad = [k for k, v in weights.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ExtractorError(f"checkpoint {path}: entry {entry!r} is not a state dict: {bad[0]!r} is a "
                             f"{type(weights[bad[0]]).__name__} ({len(bad)} such entries)")
    return dict(weights)


@dataclass
class LoadReport:
    """What a non-strict load did: the model's keys the checkpoint lacked and the checkpoint's keys the model
    has no place for."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.loaded)} tensors loaded; {len(self.missing)} missing "
                f"(first: {self.missing[:_MAX_LISTED]}); {len(self.unexpected)} unused "
                f"(first: {self.unexpected[:_MAX_LISTED]})")


def load_partial_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> LoadReport:
    """``model.load_state_dict(state, strict=False)`` as the official SwAV extractors do, but checked: a shape
    mismatch and a checkpoint that loads nothing are ExtractorErrors; missing and unused keys are reported
    (returned, and logged as a warning when the model lacks some)."""
    own = model.state_dict()
    loaded = [k for k in state if k in own]
    if not loaded:
        raise ExtractorError(f"checkpoint {source}: none of its {len(state)} tensors match the model (first keys: "
                             f"{sorted(state)[:_MAX_LISTED]}; the model expects e.g. {list(own)[:_MAX_LISTED]}); "
                             f"it would leave the network random")
    mismatched = [k for k in loaded if tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatched:
        shown = "; ".join(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                          for k in mismatched[:_MAX_LISTED])
        raise ExtractorError(f"checkpoint {source} does not fit the model built from the flags: "
                             f"{len(mismatched)} shape mismatch(es), first: {shown}")
    report = LoadReport(loaded=loaded, missing=[k for k in own if k not in state],
                        unexpected=[k for k in state if k not in own])
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in loaded}, strict=False)
    if report.missing:
        LOG.warning("checkpoint %s left parts of the model at their random init: %s", source, report.summary())
    else:
        LOG.info("checkpoint %s: %s", source, report.summary())
    return report


class _StopForward(Exception):
    """Raised by the hook of the last needed layer to skip the rest of the network."""


class ActivationHooks:
    """Hooks on some modules for one forward: each module's output (or input, with ``inputs``) as a detached
    float32 tensor; the forward stops right after the last hooked module (later layers cannot change earlier
    activations, so the maps equal a full forward's). Use as ``with ActivationHooks(...) as hooks: hooks.run(f)``."""

    def __init__(self, modules: dict[int, nn.Module], inputs: bool):
        self.modules, self.inputs = modules, inputs
        self.collected: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._last = max(modules)

    def __enter__(self) -> "ActivationHooks":
        for index, module in self.modules.items():
            if self.inputs:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(index)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()

    def _keep(self, index: int, tensor: torch.Tensor) -> None:
        self.collected[index] = tensor.detach().float()
        if index == self._last:
            raise _StopForward

    def _pre_hook(self, index: int):
        return lambda module, args: self._keep(index, args[0])

    def _hook(self, index: int):
        return lambda module, args, output: self._keep(index, output)

    def run(self, forward: Any, *args: Any) -> dict[int, torch.Tensor]:
        try:
            forward(*args)
        except _StopForward:
            pass
        return dict(self.collected)

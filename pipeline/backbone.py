"""Guided-diffusion backbone: build the UNet + diffusion, load checkpoints, read decoder blocks.

The official method (yandex-research/ddpm-segmentation) noises an image, ``x_t = q_sample(x_0, t, noise)``,
runs the guided-diffusion UNet once on it and keeps the activations of some decoder blocks
(``model.output_blocks[i]``). This module does exactly that, one forward per call, with hooks that live only
for the call.

Shapes: images ``x0`` are ``(B, 3, H, W)`` float in [-1, 1]; noise is ``(1, 3, H, W)`` (shared across the
batch) or ``(B, 3, H, W)``; block activations are ``(B, C, h, w)`` float32 on the CPU.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from pathlib import Path

import torch
from guided_diffusion.gaussian_diffusion import GaussianDiffusion
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.unet import ResBlock, UNetModel, Upsample
from torch import nn

from pipeline.model_flags import OFFICIAL_MODEL_FLAGS  # plain data, re-exported here
from pipeline.torchfile import TorchFileError, load_tensors

__all__ = [
    "OFFICIAL_MODEL_FLAGS",
    "TINY_MODEL_FLAGS",
    "BackboneError",
    "complete_flags",
    "build_backbone",
    "resolve_device",
    "load_checkpoint",
    "make_noise",
    "block_shapes",
    "num_output_blocks",
    "extract_blocks",
    "count_parameters",
    "redraw_zero_initialised_convs",
]

NOISE_MODES = ("cpu", "cuda-generator")
_MAX_LISTED = 5  # how many keys a checkpoint-mismatch message lists per kind


class BackboneError(ValueError):
    """A backbone could not be built, loaded or run as asked (bad flag, checkpoint, block, device...)."""


# A small UNet of the same code (3 levels, 32x32, 6 decoder blocks) for tests and demos; random weights.
TINY_MODEL_FLAGS: dict = {
    **model_and_diffusion_defaults(),
    "image_size": 32,
    "num_channels": 32,
    "channel_mult": "1,2,2",
    "num_res_blocks": 1,
    "attention_resolutions": "16",
    "learn_sigma": False,
    "use_fp16": False,
    "dropout": 0.0,
    "diffusion_steps": 1000,
}


def complete_flags(flags: Mapping) -> dict:
    """Return ``flags`` with every missing key of ``model_and_diffusion_defaults()`` filled in.

    Raises BackboneError for a flag name guided-diffusion does not know (naming it and listing the allowed
    names) and for a value whose type differs from the default's (e.g. ``attention_resolutions=16`` instead
    of the string ``"16"``); an int is accepted where the default is a float.
    """
    defaults = model_and_diffusion_defaults()
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise BackboneError(
            f"unknown model flag(s) {unknown}; allowed flags are: {', '.join(sorted(defaults))}"
        )
    completed = dict(defaults)
    for name, value in flags.items():
        default = defaults[name]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise BackboneError(
                f"model flag {name!r} must be {type(default).__name__} (default {default!r}), "
                f"got {type(value).__name__} {value!r}"
            )
        completed[name] = float(value) if isinstance(default, float) else value
    return completed


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; any other name is checked to be usable."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise BackboneError(f"invalid device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {str(resolved)!r} requested but CUDA is not available here")
    return resolved


def build_backbone(
    flags: Mapping, device: str | torch.device = "auto"
) -> tuple[UNetModel, GaussianDiffusion]:
    """Build the guided-diffusion UNet and GaussianDiffusion from ``flags``, in eval mode, on ``device``.

    ``create_model_and_diffusion(**complete_flags(flags))``. The torso is converted to float16
    (``convert_to_fp16()``, as the official code does) only when ``use_fp16`` is set AND the device is CUDA;
    on the CPU the model stays float32 whatever ``use_fp16`` says (half convolutions are slow or missing
    on CPU), so CPU activations are float32-exact while CUDA ones carry float16 rounding.
    Weights are random until ``load_checkpoint``.
    """
    completed = complete_flags(flags)
    target = resolve_device(device)
    try:
        model, diffusion = create_model_and_diffusion(**completed)
    except (ValueError, AssertionError, ZeroDivisionError) as err:
        raise BackboneError(f"guided-diffusion refused the model flags: {err!r}") from None
    model.to(target)
    if completed["use_fp16"] and target.type == "cuda":
        model.convert_to_fp16()
    else:
        model.dtype = torch.float32  # the UNet casts its input to model.dtype; keep it fp32 off-CUDA
    model.eval()
    return model, diffusion


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values of ``model`` (552.8 M for the official 256x256 UNets)."""
    return sum(p.numel() for p in model.parameters())


def num_output_blocks(model: UNetModel) -> int:
    """Number of decoder blocks, i.e. ``len(model.output_blocks)`` (18 for the official UNets)."""
    return len(model.output_blocks)


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a guided-diffusion checkpoint (a plain state dict of tensors) into ``model`` in place.

    ``pipeline.torchfile.load_tensors`` (``torch.load(..., weights_only=True)``); values are cast to the dtype of the
    model's own tensors (so a float32 checkpoint loads into a model converted to float16) and copied to
    its device. Raises BackboneError for a missing file, a file ``weights_only`` refuses or cannot read, a
    file that is not a flat mapping of tensors, and for keys or shapes that do not match the model
    (listing the first missing / unexpected keys and ``key: checkpoint shape vs model shape``).
    """
    path = Path(path)
    if not path.exists():
        raise BackboneError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise BackboneError(f"checkpoint path is not a file: {path}")
    try:
        state = load_tensors(path, f"checkpoint {path}")
    except TorchFileError as err:
        raise BackboneError(str(err)) from None

    if not isinstance(state, Mapping):
        raise BackboneError(
            f"checkpoint {path} holds a {type(state).__name__}, expected a state dict "
            f"(a mapping of parameter names to tensors)"
        )
    not_tensors = [(k, v) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if not_tensors:
        key, value = not_tensors[0]
        raise BackboneError(
            f"checkpoint {path} is not a plain state dict: entry {key!r} is a {type(value).__name__}, "
            f"expected a tensor ({len(not_tensors)} such entries; wrapped checkpoints like "
            f"{{'state_dict': ...}} or {{'model': ...}} are not accepted)"
        )

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first: {missing[:_MAX_LISTED]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:_MAX_LISTED]}")
        if mismatched:
            shown = "; ".join(
                f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                for k in mismatched[:_MAX_LISTED]
            )
            parts.append(f"{len(mismatched)} shape mismatch(es), first: {shown}")
        raise BackboneError(
            f"checkpoint {path} does not match the model built from the flags "
            f"(wrong flags for this checkpoint?): " + " | ".join(parts)
        )
    cast = {k: v.to(dtype=own[k].dtype) for k, v in state.items()}
    model.load_state_dict(cast, strict=True)


def make_noise(
    seed: int, image_size: int, device: str | torch.device, mode: str = "cpu"
) -> torch.Tensor:
    """The shared N(0, 1) noise, shape ``(1, 3, image_size, image_size)`` float32 on ``device``.

    mode ``"cpu"`` (default): drawn from a CPU ``torch.Generator`` seeded with ``seed`` and moved to
    ``device``, so the noise is the same on every machine. mode ``"cuda-generator"``: drawn from a
    generator created on the CUDA ``device``, as the official code does (different values from "cpu";
    needs CUDA).
    """
    device = torch.device(device)
    shape = (1, 3, image_size, image_size)
    if mode == "cpu":
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    if mode == "cuda-generator":
        if device.type != "cuda" or not torch.cuda.is_available():
            raise BackboneError(
                f"noise mode 'cuda-generator' needs a CUDA device, got {str(device)!r}"
                + ("" if torch.cuda.is_available() else " (CUDA is not available here)")
            )
        generator = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
    raise BackboneError(f"unknown noise mode {mode!r}; expected one of {NOISE_MODES}")


def _check_blocks(model: UNetModel, blocks: list[int]) -> list[int]:
    """Sorted unique block indices, each checked to lie in [0, n)."""
    n = num_output_blocks(model)
    if len(blocks) == 0:
        raise BackboneError(f"no decoder blocks requested; choose blocks in [0, {n})")
    for block in blocks:
        if isinstance(block, bool) or not isinstance(block, numbers.Integral) or not 0 <= block < n:
            raise BackboneError(f"decoder block {block!r} is out of range: allowed blocks are [0, {n})")
    return sorted({int(block) for block in blocks})


def _is_upsampler(layer: nn.Module) -> bool:
    return isinstance(layer, Upsample) or (isinstance(layer, ResBlock) and isinstance(layer.h_upd, Upsample))


def _layer_out_channels(layer: nn.Module) -> int | None:
    if isinstance(layer, (ResBlock, Upsample)):
        return layer.out_channels
    return None  # attention keeps the channel count


def block_shapes(
    model: UNetModel, image_size: int, blocks: list[int], input_activations: bool = False
) -> dict[int, tuple[int, int, int]]:
    """``{block: (C, h, w)}`` of each hooked decoder block for square inputs of side ``image_size``.

    Computed analytically from the module structure (no forward): the decoder starts at
    ``image_size / 2**(levels - 1)`` and each block holding an upsampler doubles the side. With
    ``input_activations`` the block's input (the concatenation of the previous output and the skip) is
    described instead. Raises BackboneError for a block out of range or an image_size the UNet cannot take.
    """
    wanted = _check_blocks(model, blocks)
    n_down = len(model.channel_mult) - 1
    if image_size <= 0 or image_size % (2**n_down) != 0:
        raise BackboneError(
            f"image_size {image_size} must be a positive multiple of {2**n_down} for this UNet "
            f"({n_down + 1} levels)"
        )
    side = image_size // 2**n_down
    shapes: dict[int, tuple[int, int, int]] = {}
    for index, block in enumerate(model.output_blocks):
        layers = list(block)
        in_channels = layers[0].channels  # the first layer of every decoder block is a ResBlock
        out_channels = in_channels
        out_side = side
        for layer in layers:
            channels = _layer_out_channels(layer)
            if channels is not None:
                out_channels = channels
            if _is_upsampler(layer):
                out_side *= 2
        if index in wanted:
            shapes[index] = (in_channels, side, side) if input_activations else (out_channels, out_side, out_side)
        side = out_side
    return {block: shapes[block] for block in wanted}


class _StopForward(Exception):
    """Raised by the hook of the last needed block to skip the rest of the UNet."""


@torch.no_grad()
def extract_blocks(
    model: UNetModel,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    t: int,
    noise: torch.Tensor | None,
    blocks: list[int],
    input_activations: bool = False,
    to_host: bool = True,
) -> dict[int, torch.Tensor]:
    """Activations of decoder blocks for images ``x0`` noised to timestep ``t``: ONE UNet forward.

    x0: ``(B, 3, H, W)`` in [-1, 1]. noise: ``(1, 3, H, W)`` (shared, expanded to the batch) or
    ``(B, 3, H, W)``; None draws fresh noise. ``x_t = diffusion.q_sample(x0, t, noise)`` in float32, then
    ``model(x_t, diffusion._scale_timesteps(t))`` — the UNet casts ``x_t`` to its own dtype (float16 when
    converted). Returns ``{block: (B, C, h, w) float32 CPU tensor}``: the block outputs, or their inputs
    when ``input_activations``; with ``to_host=False`` they stay on the model's device (a GPU caller casts them
    to float16 there before the copy). The forward stops right after the last needed block (the later blocks
    cannot change earlier activations, so the result is identical to a full forward).
    """
    wanted = _check_blocks(model, blocks)
    if x0.ndim != 4 or x0.shape[1] != 3:
        raise BackboneError(f"x0 must have shape (B, 3, H, W), got {tuple(x0.shape)}")
    if not 0 <= int(t) < diffusion.num_timesteps:
        raise BackboneError(f"timestep {t} is out of range: allowed [0, {diffusion.num_timesteps})")
    device = next(model.parameters()).device
    x0 = x0.to(device=device, dtype=torch.float32)
    batch = x0.shape[0]
    if noise is not None:
        if noise.ndim != 4 or noise.shape[0] not in (1, batch) or noise.shape[1:] != x0.shape[1:]:
            raise BackboneError(
                f"noise must have shape (1 or {batch}, {', '.join(map(str, x0.shape[1:]))}), "
                f"got {tuple(noise.shape)}"
            )
        noise = noise.to(device=device, dtype=torch.float32).expand_as(x0)
    t_batch = torch.full((batch,), int(t), dtype=torch.long, device=device)
    x_t = diffusion.q_sample(x0, t_batch, noise=noise)

    collected: dict[int, torch.Tensor] = {}
    last = wanted[-1]

    def make_hook(index: int):
        if input_activations:
            def hook(module, args):  # forward pre-hook: args[0] is the block input
                collected[index] = args[0].detach().float()
                if index == last:
                    raise _StopForward
        else:
            def hook(module, args, output):
                collected[index] = output.detach().float()
                if index == last:
                    raise _StopForward
        return hook

    handles = []
    try:
        for index in wanted:
            block = model.output_blocks[index]
            register = block.register_forward_pre_hook if input_activations else block.register_forward_hook
            handles.append(register(make_hook(index)))
        try:
            model(x_t, diffusion._scale_timesteps(t_batch))
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    return {index: collected[index].cpu() if to_host else collected[index] for index in wanted}


@torch.no_grad()
def redraw_zero_initialised_convs(model: nn.Module, std: float = 0.02) -> None:
    """Give every all-zero conv N(0, std) weights and biases, in place.

    guided-diffusion zero-initialises the last conv of every ResBlock, the attention output projections and
    `model.out`, so at random init ResBlocks are identities, attention is a no-op and the timestep embedding
    has no effect. A randomly initialised backbone (`model.random_init`, the `random-unet` baseline) gets
    this redraw so it is a genuinely random network, not a stack of skip connections.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and not module.weight.any():
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.normal_(module.bias, std=std)

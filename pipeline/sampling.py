"""Drawing images from a guided-diffusion backbone (DatasetDDPM's synthetic data set).

The official generate_dataset.py runs guided-diffusion's `p_sample_loop` (or `ddim_sample_loop` with
`--use_ddim`) on a `SpacedDiffusion` built with `timestep_respacing`, `clip_denoised=True`, batches of 100 from
the global RNG. Here each sample draws its noise (the initial x_T and every ancestral step's noise) from its own
CPU `torch.Generator` seeded with `sample_seed(seed, index)`: a sample is the same whatever the batch it is drawn
in, the number of samples asked for, or the device the UNet runs on (up to floating-point rounding). The step
itself is guided-diffusion's: `p_mean_variance` (ancestral) or `ddim_sample` with eta 0 (DDIM), so the model
is called as p_sample / ddim_sample call it.

Images leave as float32 in [-1, 1] (the clamp the official code applies before extracting features) and become
uint8 as the official `((x + 1) * 127.5).clamp(0, 255).to(uint8)` for the segmenter.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["SamplingError", "parse_respacing", "respaced_diffusion", "sample_seed", "sample_images",
           "check_samples", "to_uint8"]


class SamplingError(ValueError):
    """A sampling setting that cannot be used (a respacing larger than the schedule) or a sample that is not
    an image (not finite)."""


def parse_respacing(respacing: str | int | None, diffusion_steps: int, ddim: bool = False) -> str:
    """The canonical `timestep_respacing` string of guided-diffusion: "" (every step of the schedule), "K"
    (K steps, evenly strided), "ddimK" (the DDIM paper's integer stride); an int K is "K". SamplingError naming
    the value when it is not one of these, asks for more steps than `diffusion_steps`, or (ddimK) has no
    integer stride giving exactly K steps."""
    text = "" if respacing is None else str(respacing).strip()
    if text == "":
        return ""
    match = re.fullmatch(r"(ddim)?(\d+)", text)
    if not match:
        raise SamplingError(f"respacing {respacing!r}: expected '' (the full schedule), an integer K or 'ddimK'")
    count = int(match.group(2))
    if not 1 <= count <= diffusion_steps:
        raise SamplingError(f"respacing {respacing!r}: {count} steps; the schedule has {diffusion_steps} "
                            f"(diffusion_steps), expected 1..{diffusion_steps}")
    if match.group(1) and not any(len(range(0, diffusion_steps, s)) == count for s in range(1, diffusion_steps)):
        raise SamplingError(f"respacing {respacing!r}: no integer stride gives exactly {count} of "
                            f"{diffusion_steps} steps; use {count} (evenly strided) instead")
    return f"{match.group(1) or ''}{count}"


def respaced_diffusion(flags: Mapping[str, Any], respacing: str):
    """guided-diffusion's SpacedDiffusion for complete model flags with `timestep_respacing = respacing`
    (script_util.create_gaussian_diffusion, as create_model_and_diffusion builds it)."""
    from guided_diffusion.script_util import create_gaussian_diffusion

    return create_gaussian_diffusion(
        steps=int(flags["diffusion_steps"]), learn_sigma=bool(flags["learn_sigma"]),
        noise_schedule=flags["noise_schedule"], use_kl=bool(flags["use_kl"]),
        predict_xstart=bool(flags["predict_xstart"]), rescale_timesteps=bool(flags["rescale_timesteps"]),
        rescale_learned_sigmas=bool(flags["rescale_learned_sigmas"]), timestep_respacing=respacing)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a synthetic data set drawn with `seed` (63 bits of sha256)."""
    return int.from_bytes(hashlib.sha256(f"ddpmseg-sample:{seed}:{index}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def sample_images(model: nn.Module, diffusion, indices: list[int], seed: int, image_size: int, *, ddim: bool = False,
                  clip_denoised: bool = True, device: torch.device | str = "cpu",
                  on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Draw the samples `indices` (B,) with `diffusion`'s reverse process: returns (B, 3, H, W) float32 on the
    CPU, clamped to [-1, 1] (SamplingError when a sample is not finite).

    ddim: DDIM with eta 0 (deterministic given x_T); otherwise ancestral sampling (p_sample). on_step: called
    after every denoising step (a progress bar)."""
    device = torch.device(device)
    generators = [torch.Generator(device="cpu").manual_seed(sample_seed(seed, i)) for i in indices]
    shape = (3, image_size, image_size)

    def noise() -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)

    x = noise()
    for step in reversed(range(diffusion.num_timesteps)):
        t = torch.full((len(indices),), step, device=device, dtype=torch.long)
        if ddim:
            x = diffusion.ddim_sample(model, x, t, clip_denoised=clip_denoised, eta=0.0)["sample"]
        else:
            out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
            step_noise = noise()
            x = out["mean"] + (step != 0) * torch.exp(0.5 * out["log_variance"]) * step_noise
        if on_step is not None:
            on_step()
    x = x.float().cpu()
    check_samples(x, indices)
    return x.clamp(-1, 1)


def check_samples(samples: torch.Tensor, indices: list[int]) -> None:
    """SamplingError naming the first samples that hold a value that is not finite (a broken checkpoint, fp16
    overflow)."""
    bad = [i for i, s in zip(indices, samples) if not bool(torch.isfinite(s).all())]
    if bad:
        raise SamplingError(f"samples {bad[:5]} are not finite (NaN or inf after the reverse process): a broken "
                            f"checkpoint or fp16 overflow?")


def to_uint8(samples: torch.Tensor | np.ndarray) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) floats in [-1, 1] -> (…, H, W, 3) uint8, as the official
    `((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)` (truncation)."""
    x = torch.as_tensor(np.asarray(samples) if isinstance(samples, np.ndarray) else samples).float()
    out = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return out.movedim(-3, -1).contiguous().numpy()

"""Training a guided-diffusion UNet on a folder of images: the backbone of the demo.

The loss is the library's own ``GaussianDiffusion.training_losses`` (the epsilon MSE for ``learn_sigma=False``,
plus the variational term when ``learn_sigma=True``), timesteps drawn uniformly from ``[0, diffusion_steps)``,
AdamW, and an exponential moving average (EMA) of the weights, as guided-diffusion's own ``TrainLoop`` does.

Files written for ``out = ckpt.pt``:

- ``ckpt.pt``: a plain state dict (parameter name -> tensor), the EMA weights when EMA is on; the official code
  can load it with ``model.load_state_dict(torch.load(path))`` and ``pipeline.backbone.load_checkpoint`` reads it
  with ``weights_only=True`` (float32, or float16 with ``save_dtype=torch.float16``: load_checkpoint casts);
- ``ckpt.json``: the complete model flags (every key of ``model_and_diffusion_defaults()``), so that
  ``build_backbone(json.load(...))`` rebuilds the model;
- ``ckpt.resume.pt``: what resuming needs (raw and EMA weights, optimizer state, step, settings, a hash of the
  training images), loadable with ``weights_only=True``.

Determinism: the initial weights come from ``torch.manual_seed(seed)``; every random draw of step ``s`` (which
images, flips, timesteps, noise, dropout) comes from generators seeded with ``(seed, s)``, and images are visited in epochs of a seeded permutation; the state after
``s`` steps is therefore the same whether the run was interrupted and resumed or not (bit-identical on the CPU).

Images: every ``.png`` / ``.jpg`` / ``.jpeg`` under the folder (recursive, sorted), square, loaded once into
memory with the extraction transform (``pipeline.datasets.load_image``: bilinear resize to ``image_size``,
``[-1, 1]``) — ``N x 3 x S x S`` float32, e.g. 61 MB for 5000 images of 32 px.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.backbone import (
    TINY_MODEL_FLAGS,
    BackboneError,
    build_backbone,
    complete_flags,
    count_parameters,
    resolve_device,
)
from pipeline.datasets import IMAGE_EXTENSIONS, load_image
from pipeline.torchfile import TorchFileError, load_tensors

__all__ = [
    "DEMO_MODEL_FLAGS",
    "FLAG_PRESETS",
    "TrainingError",
    "TrainSettings",
    "resolve_flags",
    "list_images",
    "load_images",
    "flags_path_for",
    "resume_path_for",
    "train_backbone",
]

# The flags of the shipped demo backbone (pipeline/assets/demo_backbone.pt, its flags in demo_backbone.json):
# TINY_MODEL_FLAGS's 3-level 32x32 UNet, 1.19 M parameters (4.8 MB as a float32 state dict).
DEMO_MODEL_FLAGS: dict = dict(TINY_MODEL_FLAGS)

#: Named flag sets accepted wherever a flags file is expected (``--flags tiny``).
FLAG_PRESETS: dict[str, dict] = {"tiny": dict(TINY_MODEL_FLAGS), "demo": dict(DEMO_MODEL_FLAGS)}

RESUME_FORMAT = 1  # bump when the resume file's layout changes
_SAVED_SETTINGS = ("seed", "batch_size", "lr", "weight_decay", "ema_rate", "flip")  # must match to resume


class TrainingError(BackboneError):
    """Backbone training could not start or resume as asked (the message names the file, option or value)."""


@dataclass
class TrainSettings:
    """Hyper-parameters of a backbone training run.

    steps: total optimizer steps (a resumed run continues up to this count). batch_size: images per step.
    lr, weight_decay: AdamW. ema_rate: EMA decay of the saved weights (0 disables EMA: the raw weights are
    saved); the rate used at step s is min(ema_rate, (1 + s) / (10 + s)) so short runs are not dominated by the
    random init. flip: random horizontal flips with probability 1/2. save_every: write the checkpoint files
    every this many steps (0: only at the end). save_dtype: "float32" or "float16" for ckpt.pt.
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_rate: float = 0.999
    seed: int = 0
    flip: bool = True
    save_every: int = 500
    save_dtype: str = "float32"

    def __post_init__(self) -> None:
        checks = [
            ("steps", self.steps >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "a finite number > 0"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("ema_rate", 0 <= self.ema_rate < 1, "a number in [0, 1)"),
            ("seed", self.seed >= 0, "an integer >= 0"),
            ("save_every", self.save_every >= 0, "an integer >= 0 (0: save only at the end)"),
            ("save_dtype", self.save_dtype in ("float32", "float16"), "'float32' or 'float16'"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise TrainingError(f"training setting {name} must be {expected}, got {getattr(self, name)!r}")


def resolve_flags(flags: str | os.PathLike | Mapping) -> dict:
    """Complete model flags from a preset name (``"tiny"``, ``"demo"``), a JSON file path or a mapping.

    A JSON file holds an object of guided-diffusion flags; missing keys take ``model_and_diffusion_defaults()``
    (note: those defaults are a 64 px model, so give at least image_size, num_channels, channel_mult...).
    Raises TrainingError for an unknown preset / missing or invalid file, BackboneError for a bad flag.
    """
    if isinstance(flags, Mapping):
        return complete_flags(flags)
    text = str(flags)
    if text in FLAG_PRESETS:
        return complete_flags(FLAG_PRESETS[text])
    path = Path(text)
    if not path.is_file():
        raise TrainingError(
            f"flags {text!r} is neither a preset ({', '.join(sorted(FLAG_PRESETS))}) nor an existing JSON file"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TrainingError(f"flags file {path} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise TrainingError(f"flags file {path} holds a {type(data).__name__}; expected a JSON object of flags")
    return complete_flags(data)


def list_images(images_dir: str | os.PathLike) -> list[Path]:
    """Every .png / .jpg / .jpeg (any case) under ``images_dir``, recursively, sorted by path string."""
    root = Path(images_dir)
    if not root.is_dir():
        raise TrainingError(f"images directory {root} does not exist or is not a directory")
    found = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found, key=str)


def load_images(images_dir: str | os.PathLike, image_size: int) -> torch.Tensor:
    """All images under ``images_dir`` as one ``(N, 3, image_size, image_size)`` float32 tensor in [-1, 1].

    Same transform as feature extraction (``pipeline.datasets.load_image``). Raises TrainingError when there is
    no image, DatasetError (naming the file) for an unreadable or non-square one.
    """
    paths = list_images(images_dir)
    if not paths:
        raise TrainingError(
            f"images directory {images_dir} holds no image (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return torch.stack([load_image(path, image_size) for path in paths])


def flags_path_for(out: str | os.PathLike) -> Path:
    """The flags file written beside a checkpoint: ``ckpt.pt`` -> ``ckpt.json``."""
    return Path(out).with_suffix(".json")


def resume_path_for(out: str | os.PathLike) -> Path:
    """The resume file written beside a checkpoint: ``ckpt.pt`` -> ``ckpt.resume.pt``."""
    return Path(out).with_suffix(".resume.pt")


def _images_digest(images: torch.Tensor) -> str:
    """sha256 of the training images quantised to uint8 (order matters), to refuse resuming on other data."""
    quantised = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).contiguous()
    return hashlib.sha256(quantised.numpy().tobytes()).hexdigest()


def _step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the random draws of one step, derived from (seed, step)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]) >> 1


def _batch_indices(seed: int, step: int, n_images: int, batch_size: int) -> np.ndarray:
    """Image indices (batch_size,) of step ``step``: epochs of a seeded permutation, drop_last."""
    per_epoch = n_images // batch_size
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch, 7]).permutation(n_images)
    return order[position * batch_size:(position + 1) * batch_size]


def _atomic_torch_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cpu_state(module: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {k: (v.detach().to("cpu", dtype=dtype) if dtype is not None and v.is_floating_point()
                else v.detach().to("cpu")).clone() for k, v in module.state_dict().items()}


def _save(out: Path, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer, step: int,
          settings: TrainSettings, flags: dict, digest: str, losses: list[float], elapsed: float) -> None:
    """Write ckpt.pt (EMA or raw weights, save_dtype), ckpt.json (flags) and ckpt.resume.pt; resume file last."""
    saved = ema if ema is not None else model
    dtype = torch.float16 if settings.save_dtype == "float16" else torch.float32
    _atomic_torch_save(_cpu_state(saved, dtype), out)
    _atomic_write_text(json.dumps(flags, indent=2, sort_keys=True) + "\n", flags_path_for(out))
    resume = {
        "format": RESUME_FORMAT,
        "step": int(step),
        "model": _cpu_state(model),
        "ema": _cpu_state(ema) if ema is not None else {},
        "optimizer": optimizer.state_dict(),
        "settings": asdict(settings),
        "flags": json.dumps(flags, sort_keys=True),
        "images_sha256": digest,
        "losses": [float(x) for x in losses],
        "elapsed_s": float(elapsed),
    }
    _atomic_torch_save(resume, resume_path_for(out))


def _load_resume(path: Path) -> dict:
    if not path.is_file():
        raise TrainingError(f"cannot resume: {path} not found (it is written beside the checkpoint at every save)")
    try:
        state = load_tensors(path, f"resume file {path}")
    except TorchFileError as err:
        raise TrainingError(f"cannot resume: {err}") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise TrainingError(f"cannot resume: {path} is not a resume file of format {RESUME_FORMAT}")
    return state


def _check_resume_matches(path: Path, state: dict, settings: TrainSettings, flags: dict, digest: str) -> None:
    saved_settings = state["settings"]
    for name in _SAVED_SETTINGS:
        if saved_settings.get(name) != getattr(settings, name):
            raise TrainingError(f"cannot resume from {path}: it was trained with {name}={saved_settings.get(name)!r}, "
                                f"this run asks {name}={getattr(settings, name)!r}")
    if state["flags"] != json.dumps(flags, sort_keys=True):
        saved = json.loads(state["flags"])
        differing = sorted(k for k in set(saved) | set(flags) if saved.get(k) != flags.get(k))
        raise TrainingError(f"cannot resume from {path}: model flags differ in {differing}")
    if state["images_sha256"] != digest:
        raise TrainingError(f"cannot resume from {path}: the training images differ from those it was trained on")
    if state["step"] > settings.steps:
        raise TrainingError(f"cannot resume from {path}: it is at step {state['step']}, beyond steps={settings.steps}")


def train_backbone(
    images_dir: str | os.PathLike,
    flags: str | os.PathLike | Mapping,
    out: str | os.PathLike,
    settings: TrainSettings | None = None,
    resume: bool = False,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> dict:
    """Train a guided-diffusion UNet on the images under ``images_dir``; write ``out``, its flags and resume files.

    flags: a preset name, a JSON file or a mapping (see ``resolve_flags``). Each step: ``batch_size`` images
    (N, 3, S, S) in [-1, 1], flipped at random, timesteps ``t ~ U{0..T-1}`` (N,), noise (N, 3, S, S);
    ``loss = diffusion.training_losses(model, x0, t, noise=noise)["loss"].mean()``; AdamW step; EMA update.
    With ``resume`` the run continues from ``ckpt.resume.pt`` (weights, EMA, optimizer, step), which must come
    from the same settings, flags and images; up to ``settings.steps`` steps in total.

    Returns info: {"out", "flags_path", "resume_path", "steps" (total reached), "start_step", "images",
    "parameters", "final_loss" (mean loss of the last 100 steps), "loss_history" (mean loss of
    each block of 100 steps, whole run), "elapsed_s" (training wall time, whole run incl. earlier runs), "device"}.
    """
    settings = settings or TrainSettings()
    out = Path(out)
    completed = resolve_flags(flags)
    target = resolve_device(device)
    images = load_images(images_dir, int(completed["image_size"]))
    n_images = images.shape[0]
    if settings.batch_size > n_images:
        raise TrainingError(f"batch size {settings.batch_size} exceeds the {n_images} image(s) in {images_dir}; "
                            f"choose --batch-size <= {n_images}")
    digest = _images_digest(images)

    if completed["use_fp16"] and target.type == "cuda":
        raise TrainingError("use_fp16 training is not supported (no loss scaling here); set use_fp16 false in the "
                            "flags to train (extraction may still convert the trained weights to float16)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)  # the initial weights follow the seed too
        model, diffusion = build_backbone(completed, device=target)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False) if settings.ema_rate > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    start_step = 0
    losses: list[float] = []  # the loss of every step, whole run
    elapsed_before = 0.0
    resume_path = resume_path_for(out)
    if resume:
        state = _load_resume(resume_path)
        _check_resume_matches(resume_path, state, settings, completed, digest)
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        losses = [float(x) for x in state["losses"]]
        elapsed_before = float(state["elapsed_s"])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, initial=start_step, desc="backbone train", unit="step")

    started = time.perf_counter()
    image_size = images.shape[-1]

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    devices = [target.index or 0] if target.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            for step in range(start_step, settings.steps):
                generator = torch.Generator().manual_seed(_step_seed(settings.seed, step))
                torch.manual_seed(_step_seed(settings.seed, step) ^ 0x5DEECE66D)  # model dropout, if any
                rows = torch.from_numpy(_batch_indices(settings.seed, step, n_images, settings.batch_size))
                x0 = images[rows]
                if settings.flip:
                    flip = torch.rand(len(rows), generator=generator) < 0.5
                    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
                t = torch.randint(0, diffusion.num_timesteps, (len(rows),), generator=generator)
                noise = torch.randn((len(rows), 3, image_size, image_size), generator=generator)
                x0, t, noise = x0.to(target), t.to(target), noise.to(target)

                loss = diffusion.training_losses(model, x0, t, noise=noise)["loss"].float().mean()
                if not torch.isfinite(loss):
                    raise TrainingError(f"step {step}: the loss is {loss.item()} (diverged); lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if ema is not None:
                    rate = min(settings.ema_rate, (1 + step) / (10 + step))
                    with torch.no_grad():
                        for target_param, param in zip(ema.parameters(), model.parameters()):
                            target_param.mul_(rate).add_(param.detach(), alpha=1 - rate)

                losses.append(loss.item())
                if bar is not None:
                    bar.update(1)
                    if (step + 1) % 10 == 0:
                        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
                done = step + 1
                if (settings.save_every and done % settings.save_every == 0) or done == settings.steps:
                    _save(out, model, ema, optimizer, done, settings, completed, digest, losses, elapsed())
    finally:
        if bar is not None:
            bar.close()

    if start_step >= settings.steps:  # nothing to do: make sure the files exist and say where we are
        if not out.is_file():
            _save(out, model, ema, optimizer, start_step, settings, completed, digest, losses, elapsed())
    return {
        "out": str(out),
        "flags_path": str(flags_path_for(out)),
        "resume_path": str(resume_path),
        "steps": int(settings.steps),
        "start_step": int(start_step),
        "images": int(n_images),
        "parameters": int(count_parameters(model)),
        "final_loss": float(np.mean(losses[-100:])) if losses else None,
        "loss_history": [float(np.mean(losses[i:i + 100])) for i in range(0, len(losses), 100)],
        "elapsed_s": round(elapsed(), 3),
        "device": str(target),
    }


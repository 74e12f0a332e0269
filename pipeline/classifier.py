"""The pixel MLP: one member of the ensemble, its training loop, and its file format.

`recipe: paper` follows the official implementation exactly (src/pixel_classifier.py and train_interpreter.py of
yandex-research/ddpm-segmentation):

- fewer than 30 classes: Linear(D,128)-ReLU-BatchNorm1d(128)-Linear(128,32)-ReLU-BatchNorm1d(32)-Linear(32,C);
  30 classes or more: the same with widths 256 and 128;
- Linear weights ~ N(0, 0.02), Linear biases 0; BatchNorm1d keeps PyTorch's default init (the official init
  function only matches BatchNorm2d);
- CrossEntropyLoss, Adam lr 1e-3, batch 64, up to 100 epochs, and the official early stop (`EarlyStopping`).

The later study's improvements are options, off by default: Dropout(p) after every ReLU, AdamW with weight decay,
another number of epochs.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch
from torch import Tensor, nn

from pipeline.classifier_bounds import ENSEMBLE_MODES, MIN_BATCH_SIZE, MIN_EPOCHS, OPTIMIZERS  # re-exported
from pipeline.torchfile import load_tensors

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig

LINEAR_INIT_STD = 0.02
# The official loop starts from best_loss = 10000000 (not +inf); kept for exactness.
OFFICIAL_INITIAL_BEST_LOSS = 10_000_000.0
MEMBER_META_REQUIRED = ("number_class", "dim", "dropout")
#: held while a member seeds torch's global generator and draws its init: members trained in threads at once
#: (the segment flow's local members) must not interleave their draws
INIT_LOCK = threading.Lock()


class GeneratorDropout(nn.Module):
    """nn.Dropout's CPU training arithmetic (a Bernoulli(1 - p) mask divided by 1 - p, times the input) drawn from
    a generator of the member's own instead of torch's global one: the same masks, bit for bit, when the
    generator continues the global stream where nn.Dropout would have drawn (tested), and no draw shared with a
    member trained in another thread. Identity in eval mode."""

    def __init__(self, p: float, generator: torch.Generator):
        super().__init__()
        self.p, self.generator = p, generator

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        return x * torch.empty_like(x).bernoulli_(1 - self.p, generator=self.generator).div_(1 - self.p)


def _own_dropout(model: nn.Sequential, generator: torch.Generator) -> list[int]:
    """Swap model's nn.Dropout layers for GeneratorDropout over `generator`; returns their indices."""
    swapped = [i for i, layer in enumerate(model) if isinstance(layer, nn.Dropout)]
    for i in swapped:
        model[i] = GeneratorDropout(model[i].p, generator)
    return swapped


def hidden_widths(number_class: int) -> tuple[int, int]:
    """Widths of the two hidden layers: (128, 32) below 30 classes, (256, 128) from 30 classes on (official)."""
    return (128, 32) if number_class < 30 else (256, 128)


def build_classifier(number_class: int, dim: int, dropout: float = 0.0) -> nn.Sequential:
    """The official pixel classifier with the official init applied.

    Input (N, dim) float32 features, output (N, number_class) logits. With dropout > 0 an nn.Dropout(dropout)
    follows every ReLU (before its BatchNorm1d); with dropout == 0 the layers are exactly the official ones.
    """
    if number_class < 2:
        raise ValueError(f"number_class must be >= 2, got {number_class}")
    if dim < 1:
        raise ValueError(f"dim (feature dimension) must be >= 1, got {dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    first, second = hidden_widths(number_class)
    layers: list[nn.Module] = []
    for width_in, width_out in ((dim, first), (first, second)):
        layers.append(nn.Linear(width_in, width_out))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.BatchNorm1d(width_out))
    layers.append(nn.Linear(second, number_class))
    model = nn.Sequential(*layers)
    init_official(model)
    return model


def init_official(model: nn.Module) -> None:
    """Official init: every nn.Linear weight ~ N(0, 0.02), bias 0. BatchNorm1d is left at PyTorch's default."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, LINEAR_INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


@dataclass
class EarlyStopping:
    """The official early-stopping rule, called after every training iteration.

    While epoch >= start_epoch (official: `epoch > 3`): if loss < best, best = loss and counter = 0, else
    counter += 1; training stops when counter > patience (official: 50, i.e. on the 51st iteration in a row
    without improvement). Before start_epoch nothing is recorded.
    """

    start_epoch: int = 4
    patience: int = 50
    best: float = OFFICIAL_INITIAL_BEST_LOSS
    counter: int = 0
    active: bool = False  # True once the rule has seen an iteration

    def update(self, epoch: int, loss: float) -> bool:
        """Record one iteration's loss; returns True when training must stop."""
        if epoch < self.start_epoch:
            return False
        self.active = True
        if loss < self.best:
            self.best = loss
            self.counter = 0
        else:
            self.counter += 1
        return self.counter > self.patience


# The bounds of the classifier's hyper-parameters, in one place (pipeline/classifier_bounds.py, plain data):
# TrainSettings checks them and the config (pipeline/config.py, ClassifierConfig) declares them, so a value the
# config accepts always trains. ENSEMBLE_MODES: independent: one member at a time (this module's train_member);
# batched: all at once (pipeline/ensemble.py).


@dataclass
class TrainSettings:
    """Hyper-parameters of one member. Defaults are the official ones (`recipe: paper`)."""

    number_class: int
    dim: int
    lr: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 100
    optimizer: str = "adam"  # "adam" | "adamw"
    weight_decay: float = 0.0
    dropout: float = 0.0
    early_stop_start_epoch: int = 4
    patience: int = 50
    device: str = "cpu"  # where the member trains (a torch device name); not a hyper-parameter of the result
    ensemble: str = "independent"  # one of ENSEMBLE_MODES: how the ensemble's members are trained

    def __post_init__(self) -> None:
        if self.ensemble not in ENSEMBLE_MODES:
            raise ValueError(f"TrainSettings.ensemble must be one of {ENSEMBLE_MODES}, got {self.ensemble!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainSettings.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.max_epochs < MIN_EPOCHS:
            raise ValueError(f"TrainSettings.max_epochs must be >= {MIN_EPOCHS}, got {self.max_epochs}")
        if self.batch_size < MIN_BATCH_SIZE:
            raise ValueError(f"TrainSettings.batch_size must be >= {MIN_BATCH_SIZE} (BatchNorm1d in train mode), "
                             f"got {self.batch_size}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainSettings.weight_decay must be >= 0, got {self.weight_decay}")


def train_settings(cfg: "ExperimentConfig", dim: int) -> TrainSettings:
    """A member's settings from an experiment config (its classifier section), for features of `dim` channels.

    The one place the config's classifier section becomes TrainSettings (the train stage, benchmarks).
    early_stopping off: the stop rule never starts (exactly max_epochs, the later study's fixed 11).
    classifier.device is resolved here (auto: CUDA when available; a CUDA device that is not there is an error)."""
    from pipeline.backbone import resolve_device

    c = cfg.classifier
    start = c.early_stop_start_epoch if c.early_stopping else c.max_epochs + 1
    return TrainSettings(number_class=cfg.dataset.number_class, dim=dim, lr=c.lr, batch_size=c.batch_size,
                         max_epochs=c.max_epochs, optimizer=c.optimizer, weight_decay=c.weight_decay,
                         dropout=c.dropout, early_stop_start_epoch=start, patience=c.patience,
                         device=str(resolve_device(c.device)), ensemble=c.ensemble)


def build_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """Adam (official) or AdamW over the model's parameters, with settings.lr and settings.weight_decay."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; expected one of {OPTIMIZERS}")


def train_member(
    settings: TrainSettings,
    epoch_batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    seed: int,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "",
) -> tuple[nn.Module, dict]:
    """Train one ensemble member.

    epoch_batches(epoch) yields (features (B, D) float, labels (B,) long) for epoch index `epoch`; B must be > 1
    (BatchNorm1d in train mode). torch.manual_seed(seed) is called right before the model is built, so the init
    and any dropout masks follow the seed. The model stays in train mode during the whole loop (as officially).

    Returns the trained model in eval mode, on the CPU, and info = {"epochs": epochs run (the stopping epoch
    counts), "iterations", "final_loss": last iteration's loss, "best_loss": the early-stopping best (None if the
    rule never ran), "stopped_early": bool}.
    """
    device = torch.device(device)
    with INIT_LOCK:  # members trained in several threads at once (flows/segment.py) share torch's generator
        torch.manual_seed(seed)
        model = build_classifier(settings.number_class, settings.dim, settings.dropout).to(device)
        # on the CPU dropout draws from a generator of the member's own, continuing the global stream (the same
        # masks as nn.Dropout; nothing shared with members in other threads)
        own = _own_dropout(model, torch.Generator().set_state(torch.get_rng_state())) if device.type == "cpu" else []
    optimizer = build_optimizer(model, settings)
    criterion = nn.CrossEntropyLoss()
    stopper = EarlyStopping(start_epoch=settings.early_stop_start_epoch, patience=settings.patience)
    model.train()

    bar = None
    if progress:
        from pipeline.progress import progress_bar

        bar = progress_bar(desc=desc or "train member", unit="it", leave=False)

    iterations = 0
    epochs_run = 0
    final_loss = math.nan
    stopped_early = False
    try:
        for epoch in range(settings.max_epochs):
            epochs_run = epoch + 1
            batches_this_epoch = 0
            for features, labels in epoch_batches(epoch):
                if features.ndim != 2 or features.shape[1] != settings.dim:
                    raise ValueError(f"epoch {epoch}: expected features of shape (B, {settings.dim}), "
                                     f"got {tuple(features.shape)}")
                if labels.shape != (features.shape[0],):
                    raise ValueError(f"epoch {epoch}: expected labels of shape ({features.shape[0]},), "
                                     f"got {tuple(labels.shape)}")
                features = features.to(device=device, dtype=torch.float32, non_blocking=True)
                labels = labels.to(device=device, dtype=torch.long, non_blocking=True)

                optimizer.zero_grad()
                loss = criterion(model(features), labels)
                loss.backward()
                optimizer.step()

                iterations += 1
                batches_this_epoch += 1
                final_loss = loss.item()
                if bar is not None:
                    bar.update(1)
                    if iterations % 50 == 0:
                        bar.set_postfix(epoch=epoch, loss=f"{final_loss:.4f}")
                if stopper.update(epoch, final_loss):
                    stopped_early = True
                    break
            if batches_this_epoch == 0:
                raise ValueError(f"epoch_batches({epoch}) yielded no batch: no labelled pixels to train on?")
            if stopped_early:
                break
        if bar is not None:  # the state at the end, for the bar's last line
            bar.set_postfix(epoch=epochs_run - 1, loss=f"{final_loss:.4f}")
    finally:
        if bar is not None:
            bar.close()

    for i in own:  # back to the official layer
        model[i] = nn.Dropout(model[i].p)
    model = model.cpu().eval()
    info = {
        "epochs": epochs_run,
        "iterations": iterations,
        "final_loss": final_loss,
        "best_loss": stopper.best if stopper.active else None,
        "stopped_early": stopped_early,
    }
    return model, info


def _check_plain(value: object, where: str) -> None:
    """Raise if value is not made of types torch.load(weights_only=True) accepts without tensors."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be str, got {type(key).__name__} {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where}: expected a plain value (None, bool, int, float, str, list, tuple, dict), "
                    f"got {type(value).__name__}")


def save_member(path: str | os.PathLike, model: nn.Module, meta: dict) -> None:
    """Write {"state_dict": CPU tensors, "meta": meta} with torch.save, atomically (temp file + rename).

    meta must hold number_class, dim and dropout (to rebuild the model) and only plain types, so the file loads
    with torch.load(weights_only=True).
    """
    missing = [key for key in MEMBER_META_REQUIRED if key not in meta]
    if missing:
        raise ValueError(f"save_member({path}): meta lacks {missing}; required keys: {list(MEMBER_META_REQUIRED)}")
    _check_plain(meta, "meta")
    state_dict = {key: tensor.detach().cpu() for key, tensor in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"state_dict": state_dict, "meta": dict(meta)}, handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_member(path: str | os.PathLike | IO[bytes], what: str | None = None) -> tuple[nn.Module, dict]:
    """Load a member written by save_member or torch.save({"state_dict", "meta"}) (pipeline.torchfile: tensors
    and plain types only); returns (model in eval mode on CPU, meta). `what` names it in errors (default: path).

    Raises ValueError (TorchFileError for an unreadable or unsafe file) naming it."""
    name = what or str(path)
    payload = load_tensors(path, name)
    if not isinstance(payload, dict) or "state_dict" not in payload or "meta" not in payload:
        raise ValueError(f"{name}: not a member file (expected a dict with keys 'state_dict' and 'meta')")
    meta = payload["meta"]
    missing = [key for key in MEMBER_META_REQUIRED if key not in meta]
    if missing:
        raise ValueError(f"{name}: meta lacks {missing}; required keys: {list(MEMBER_META_REQUIRED)}")
    model = build_classifier(int(meta["number_class"]), int(meta["dim"]), float(meta["dropout"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"{name}: state_dict does not fit the classifier rebuilt from meta "
                         f"(number_class={meta['number_class']}, dim={meta['dim']}, dropout={meta['dropout']}): "
                         f"{error}") from error
    return model.eval(), meta

"""The pixel classifier's training choices and bounds as plain data (no torch import): what a config's
classifier section is validated against; pipeline/classifier.py re-exports them."""
from __future__ import annotations

__all__ = ["OPTIMIZERS", "MIN_BATCH_SIZE", "MIN_EPOCHS", "ENSEMBLE_MODES"]

OPTIMIZERS = ("adam", "adamw")
MIN_BATCH_SIZE = 2  # BatchNorm1d in train mode needs >= 2 samples a batch
MIN_EPOCHS = 1
ENSEMBLE_MODES = ("batched", "independent")

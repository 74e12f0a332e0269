"""A tiny experiment for tests and benchmarks: the procedural data set and a small randomly initialised UNet."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_config(out: Path, size: int = 32) -> dict[str, Any]:
    """A small experiment on the generated data set with a tiny randomly initialised UNet (tests, benchmarks)."""
    from pipeline.backbone import TINY_MODEL_FLAGS
    from pipeline.config import OFFICIAL_FLAGS
    from pipeline import synthetic

    flags = {k: v for k, v in TINY_MODEL_FLAGS.items() if k in OFFICIAL_FLAGS and OFFICIAL_FLAGS[k] != v}
    flags["image_size"] = size
    return {
        "recipe": "paper",
        "dataset": {"name": "synthetic", "train_dir": "data/train", "test_dir": "data/test",
                    "number_class": len(synthetic.CLASS_NAMES), "ignore_label": synthetic.IGNORE_LABEL,
                    "training_number": 10, "testing_number": 20, "class_names": list(synthetic.CLASS_NAMES),
                    "palette": [list(c) for c in synthetic.PALETTE]},
        "model": {"random_init": True, "init_seed": 0, "flags": flags},
        "features": {"steps": [50, 150, 250], "blocks": [1, 2, 3, 4], "batch_size": 10},
        "classifier": {"model_num": 10},
        "store": "store",
        "output_dir": ".",
    }

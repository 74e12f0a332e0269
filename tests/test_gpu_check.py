"""benchmarks/gpu_check.py: the skipped line without CUDA; its checks run with device="cpu" at toy sizes.
Extraction keeps activations on the model's device until they are float16 (storage.features.to_float16)."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from benchmarks import gpu_check
from pipeline.backbone import TINY_MODEL_FLAGS, extract_blocks
from storage.features import StoreError, to_float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skipped line is for machines without CUDA")
def test_gpu_check_says_skipped_without_cuda():
    out = io.StringIO()
    with redirect_stdout(out):
        assert gpu_check.main([]) == 0
    assert json.loads(out.getvalue()) == {"skipped": "no cuda"}


def test_gpu_check_functions_on_cpu(tmp_path):
    ex = gpu_check.extraction_check(tmp_path, "cpu", flags=dict(TINY_MODEL_FLAGS), images=2, steps=(50, 150),
                                    blocks=(2, 3), batch_size=2)
    assert ex["unet_forwards"] == 2 and ex["store_mb"] > 0 and 0 < ex["forward_s_per_batch"] < ex["extract_s"]
    assert ex["store_mb_per_s"] > 0
    tr = gpu_check.training_check("cpu", members=3, dim=48, number_class=5, iterations=4)
    assert tr["member_px_per_s"] == pytest.approx(3 * 4 * 64 / tr["train_s"])
    ev = gpu_check.evaluation_check("cpu", members=2, images=2, number_class=5,
                                    shapes=[(8, 4, 4), (4, 8, 8)], size=16)
    assert ev["dim"] == 12 and ev["images_per_s"] > 0


def test_activations_cast_on_their_device_are_the_host_cast(tiny_backbone):
    model, diffusion, _ = tiny_backbone
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    host = extract_blocks(model, diffusion, x0, 50, noise, [2, 3])
    kept = extract_blocks(model, diffusion, x0, 50, noise, [2, 3], to_host=False)
    for block in (2, 3):
        assert kept[block].device == next(model.parameters()).device
        assert np.array_equal(to_float16(kept[block], "x"), to_float16(host[block].numpy(), "x"))
    with pytest.raises(StoreError, match="not finite"):
        to_float16(torch.tensor([1.0, float("nan")]), "unit u image i block 2")
    with pytest.raises(StoreError, match="float16 range"):
        to_float16(torch.tensor([1.0, 70000.0]), "unit u image i block 2")

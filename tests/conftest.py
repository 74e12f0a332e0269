"""Shared pytest fixtures (real components, small sizes)."""

from __future__ import annotations

import pytest
import torch

from pipeline.backbone import TINY_MODEL_FLAGS, build_backbone


def _redraw_zero_initialised_convs(model: torch.nn.Module, std: float = 0.02) -> None:
    """guided-diffusion zero-initialises the last conv of every ResBlock and attention projection, which
    at random init makes the time embedding and attention no-ops; give those convs small random weights so
    the tiny UNet behaves like a trained one (its activations depend on t through the embedding)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                torch.nn.init.normal_(module.bias, std=std)


@pytest.fixture(scope="session")
def tiny_backbone():
    """(model, diffusion, flags): the TINY_MODEL_FLAGS UNet (32x32, 6 decoder blocks) on the CPU, random
    weights from torch.manual_seed(0), eval mode. Shared by the whole session: do not modify it."""
    torch.manual_seed(0)
    model, diffusion = build_backbone(TINY_MODEL_FLAGS, device="cpu")
    with torch.no_grad():
        _redraw_zero_initialised_convs(model)
    return model, diffusion, dict(TINY_MODEL_FLAGS)

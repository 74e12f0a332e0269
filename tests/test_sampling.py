"""pipeline/sampling.py: guided-diffusion's reverse process with a seed per sample (DatasetDDPM)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.backbone import complete_flags
from pipeline.sampling import (SamplingError, check_samples, parse_respacing, respaced_diffusion, sample_images,
                               to_uint8)


def test_parse_respacing_canonical_forms_and_errors():
    assert parse_respacing("", 1000) == "" and parse_respacing(None, 1000) == ""
    assert parse_respacing(50, 1000) == "50" and parse_respacing(" ddim20 ", 1000) == "ddim20"
    with pytest.raises(SamplingError, match="2000 steps; the schedule has 1000"):
        parse_respacing("2000", 1000)
    with pytest.raises(SamplingError, match="no integer stride gives exactly 999"):
        parse_respacing("ddim999", 1000)
    with pytest.raises(SamplingError, match="an integer K or 'ddimK'"):
        parse_respacing("fast", 1000)
    with pytest.raises(SamplingError, match="expected 1..1000"):
        parse_respacing("0", 1000)


def test_a_sample_does_not_depend_on_its_batch(tiny_backbone):
    model, _, flags = tiny_backbone
    diffusion = respaced_diffusion(complete_flags(flags), "4")
    assert diffusion.num_timesteps == 4
    four = sample_images(model, diffusion, [0, 1, 2, 3], seed=0, image_size=32)
    two = sample_images(model, diffusion, [2, 3], seed=0, image_size=32)
    assert four.shape == (4, 3, 32, 32) and four.dtype == torch.float32
    assert float(four.min()) >= -1 and float(four.max()) <= 1
    torch.testing.assert_close(four[2:], two, rtol=0, atol=1e-5)
    assert not torch.equal(four[0], four[1])  # each index its own noise
    other_seed = sample_images(model, diffusion, [2], seed=1, image_size=32)
    assert not torch.allclose(other_seed[0], two[0])


def test_ddim_is_deterministic_given_the_seed(tiny_backbone):
    model, _, flags = tiny_backbone
    diffusion = respaced_diffusion(complete_flags(flags), parse_respacing("ddim4", 1000))
    a = sample_images(model, diffusion, [5], seed=0, image_size=32, ddim=True)
    torch.manual_seed(123)  # the global RNG plays no part
    b = sample_images(model, diffusion, [5], seed=0, image_size=32, ddim=True)
    assert torch.equal(a, b)


def test_to_uint8_is_the_official_formula_and_samples_are_checked():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 1.2]).reshape(1, 1, 7).expand(3, 1, 7)
    official = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(to_uint8(x), official)
    assert to_uint8(x)[0, :, 0].tolist() == [0, 0, 0, 127, 191, 255, 255]
    bad = torch.zeros(2, 3, 4, 4)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(SamplingError, match=r"samples \[8\] are not finite"):
        check_samples(bad, [7, 8])

"""The guided-diffusion model flags as plain data (no torch, no guided_diffusion import): what a config is
validated against. pipeline/backbone.py builds the network from them; tests/test_backbone.py checks that
GUIDED_DIFFUSION_DEFAULTS equals guided_diffusion's model_and_diffusion_defaults()."""
from __future__ import annotations

from typing import Any

__all__ = ["GUIDED_DIFFUSION_DEFAULTS", "OFFICIAL_MODEL_FLAGS"]

#: guided_diffusion.script_util.model_and_diffusion_defaults() (openai/guided-diffusion as vendored here)
GUIDED_DIFFUSION_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}

# The flags of the four official 256x256 checkpoints (scripts/ddpm/train_interpreter.sh), completed with
# guided_diffusion's model_and_diffusion_defaults() for every other key.
OFFICIAL_MODEL_FLAGS: dict[str, Any] = {
    **GUIDED_DIFFUSION_DEFAULTS,
    "attention_resolutions": "32,16,8",
    "class_cond": False,
    "diffusion_steps": 1000,
    "dropout": 0.1,
    "image_size": 256,
    "learn_sigma": True,
    "noise_schedule": "linear",
    "num_channels": 256,
    "num_head_channels": 64,
    "num_res_blocks": 2,
    "resblock_updown": True,
    "use_fp16": True,
    "use_scale_shift_norm": True,
}

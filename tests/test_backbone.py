"""Backbone: build, checkpoints, noise, hooked decoder blocks (tiny real guided-diffusion UNet)."""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass

import pytest
import torch

from pipeline.backbone import (
    OFFICIAL_MODEL_FLAGS,
    TINY_MODEL_FLAGS,
    BackboneError,
    block_shapes,
    build_backbone,
    complete_flags,
    count_parameters,
    extract_blocks,
    load_checkpoint,
    make_noise,
    num_output_blocks,
    resolve_device,
)

SIZE = TINY_MODEL_FLAGS["image_size"]


def _images(batch: int = 1, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, SIZE, SIZE, generator=generator) * 2 - 1


def _all_blocks(model) -> list[int]:
    return list(range(num_output_blocks(model)))


# --- flags and build -------------------------------------------------------------------------------


def test_flag_sets_are_complete_and_official_values():
    from guided_diffusion.script_util import model_and_diffusion_defaults

    assert set(OFFICIAL_MODEL_FLAGS) == set(model_and_diffusion_defaults())
    assert set(TINY_MODEL_FLAGS) == set(model_and_diffusion_defaults())
    assert OFFICIAL_MODEL_FLAGS["attention_resolutions"] == "32,16,8"
    assert OFFICIAL_MODEL_FLAGS["num_channels"] == 256 and OFFICIAL_MODEL_FLAGS["learn_sigma"] is True
    assert complete_flags({"image_size": 32})["num_channels"] == model_and_diffusion_defaults()["num_channels"]


def test_plain_flag_table_equals_guided_diffusion_defaults():
    """pipeline/model_flags.py (what configs are validated against, without importing torch) holds exactly
    guided-diffusion's defaults, value and type."""
    from guided_diffusion.script_util import model_and_diffusion_defaults

    from pipeline.model_flags import GUIDED_DIFFUSION_DEFAULTS

    defaults = model_and_diffusion_defaults()
    assert GUIDED_DIFFUSION_DEFAULTS == defaults
    assert {k: type(v) for k, v in GUIDED_DIFFUSION_DEFAULTS.items()} == {k: type(v) for k, v in defaults.items()}


def test_unknown_flag_is_named_with_allowed_names():
    with pytest.raises(BackboneError, match="num_chanels") as info:
        complete_flags({**TINY_MODEL_FLAGS, "num_chanels": 32})
    assert "num_channels" in str(info.value)  # the allowed names are listed
    with pytest.raises(BackboneError, match="num_chanels"):
        build_backbone({"num_chanels": 32}, device="cpu")


def test_flag_of_wrong_type_is_named():
    with pytest.raises(BackboneError, match="attention_resolutions"):
        complete_flags({**TINY_MODEL_FLAGS, "attention_resolutions": 16})
    assert complete_flags({**TINY_MODEL_FLAGS, "dropout": 0})["dropout"] == 0.0  # int where a float is due


def test_cpu_build_stays_float32_even_with_use_fp16():
    torch.manual_seed(0)
    model, _ = build_backbone({**TINY_MODEL_FLAGS, "use_fp16": True}, device="cpu")
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(BackboneError, match="CUDA is not available"):
            resolve_device("cuda")


# --- shapes and hooks ------------------------------------------------------------------------------


def test_block_shapes_equal_hooked_output_shapes(tiny_backbone):
    model, diffusion, _ = tiny_backbone
    blocks = _all_blocks(model)
    assert len(blocks) == 6
    shapes = block_shapes(model, SIZE, blocks)
    outputs = extract_blocks(model, diffusion, _images(2), 50, None, blocks)
    assert {b: tuple(a.shape) for b, a in outputs.items()} == {b: (2, *s) for b, s in shapes.items()}
    assert shapes[0] == (64, 8, 8) and shapes[5] == (32, 32, 32)
    assert all(a.dtype == torch.float32 and a.device.type == "cpu" for a in outputs.values())


def test_input_activations_are_block_inputs(tiny_backbone):
    model, diffusion, _ = tiny_backbone
    noise = make_noise(0, SIZE, torch.device("cpu"))
    blocks = [1, 3, 4]
    inputs = extract_blocks(model, diffusion, _images(), 150, noise, blocks, input_activations=True)
    outputs = extract_blocks(model, diffusion, _images(), 150, noise, [0, 1, 2, 3])
    assert set(inputs) == set(blocks)
    shapes = block_shapes(model, SIZE, blocks, input_activations=True)
    assert {b: tuple(a.shape[1:]) for b, a in inputs.items()} == shapes
    assert shapes[3] == (96, 16, 16)  # previous output (64) + skip (32)
    # the input of block i is [output of block i - 1, skip connection]: so these are inputs, not outputs
    for block in blocks:
        previous = outputs[block - 1]
        assert torch.equal(inputs[block][:, : previous.shape[1]], previous)
        assert inputs[block].shape[1] > previous.shape[1]  # the skip channels follow
    assert inputs[1].shape[1:] != outputs[1].shape[1:]  # (128, 8, 8) in, (64, 16, 16) out


def test_same_shared_noise_is_deterministic_and_t_matters(tiny_backbone):
    model, diffusion, _ = tiny_backbone
    noise = make_noise(0, SIZE, torch.device("cpu"))
    first = extract_blocks(model, diffusion, _images(), 50, noise, [2, 4])
    again = extract_blocks(model, diffusion, _images(), 50, noise, [2, 4])
    later = extract_blocks(model, diffusion, _images(), 250, noise, [2, 4])
    fresh = extract_blocks(model, diffusion, _images(), 50, None, [2, 4])
    for block in (2, 4):
        assert torch.equal(first[block], again[block])
        assert not torch.allclose(first[block], later[block], atol=1e-3)
        assert not torch.allclose(first[block], fresh[block], atol=1e-3)


def test_timestep_changes_activations_through_the_embedding(tiny_backbone):
    """Same x_t, different timestep argument: the time embedding must change the block outputs."""
    model, diffusion, _ = tiny_backbone
    x_t = _images()
    captured = []
    handle = model.output_blocks[3].register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    try:
        with torch.no_grad():
            model(x_t, torch.tensor([50]))
            model(x_t, torch.tensor([250]))
    finally:
        handle.remove()
    assert not torch.allclose(captured[0], captured[1], atol=1e-4)


def test_early_stop_equals_full_forward(tiny_backbone):
    """Stopping after the last needed block gives exactly the activations of a complete forward."""
    model, diffusion, _ = tiny_backbone
    noise = make_noise(3, SIZE, torch.device("cpu"))
    x0 = _images(2)
    t = torch.full((2,), 150, dtype=torch.long)
    captured = {}
    handles = [
        model.output_blocks[i].register_forward_hook(lambda m, inp, out, i=i: captured.__setitem__(i, out.clone()))
        for i in (1, 2)
    ]
    try:
        with torch.no_grad():
            full_output = model(diffusion.q_sample(x0, t, noise=noise.expand_as(x0)), t)
    finally:
        for handle in handles:
            handle.remove()
    assert full_output.shape == (2, 3, SIZE, SIZE)
    ours = extract_blocks(model, diffusion, x0, 150, noise, [1, 2])
    assert torch.equal(ours[1], captured[1]) and torch.equal(ours[2], captured[2])
    # hooks were removed: the model has no hooks left on its decoder blocks
    assert all(not block._forward_hooks and not block._forward_pre_hooks for block in model.output_blocks)


def test_batch_shares_the_noise(tiny_backbone):
    model, diffusion, _ = tiny_backbone
    noise = make_noise(0, SIZE, torch.device("cpu"))
    x0 = _images(2)
    both = extract_blocks(model, diffusion, x0, 50, noise, [4])[4]
    second = extract_blocks(model, diffusion, x0[1:], 50, noise, [4])[4]
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-5)


def test_block_out_of_range_names_the_range(tiny_backbone):
    model, diffusion, _ = tiny_backbone
    with pytest.raises(BackboneError, match=r"block 6 .*\[0, 6\)"):
        extract_blocks(model, diffusion, _images(), 50, None, [2, 6])
    with pytest.raises(BackboneError, match=r"\[0, 6\)"):
        block_shapes(model, SIZE, [-1])
    with pytest.raises(BackboneError, match="timestep 1000"):
        extract_blocks(model, diffusion, _images(), 1000, None, [2])


# --- checkpoints -----------------------------------------------------------------------------------


def test_checkpoint_round_trip(tiny_backbone, tmp_path):
    model, diffusion, flags = tiny_backbone
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(123)  # a fresh model with other random weights
    fresh, _ = build_backbone(flags, device="cpu")
    noise = make_noise(0, SIZE, torch.device("cpu"))
    before = extract_blocks(fresh, diffusion, _images(), 50, noise, [3])[3]
    load_checkpoint(fresh, path)
    expected = extract_blocks(model, diffusion, _images(), 50, noise, [3])[3]
    after = extract_blocks(fresh, diffusion, _images(), 50, noise, [3])[3]
    assert not torch.equal(before, expected)
    assert torch.equal(after, expected)


def test_checkpoint_loads_into_fp16_converted_model(tiny_backbone, tmp_path):
    model, _, flags = tiny_backbone
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    fresh, _ = build_backbone(flags, device="cpu")
    fresh.convert_to_fp16()  # what build_backbone does on CUDA with use_fp16
    load_checkpoint(fresh, path)
    weight = fresh.output_blocks[0][0].in_layers[2].weight
    assert weight.dtype == torch.float16
    assert torch.equal(weight, model.output_blocks[0][0].in_layers[2].weight.half())


def test_mismatched_checkpoint_names_key_and_both_shapes(tmp_path):
    torch.manual_seed(0)
    wider, _ = build_backbone({**TINY_MODEL_FLAGS, "num_channels": 64}, device="cpu")
    path = tmp_path / "wider.pt"
    torch.save(wider.state_dict(), path)
    model, _ = build_backbone(TINY_MODEL_FLAGS, device="cpu")
    with pytest.raises(BackboneError) as info:
        load_checkpoint(model, path)
    message = str(info.value)
    assert "time_embed.0.weight: checkpoint (256, 64) vs model (128, 32)" in message
    assert str(path) in message


def test_checkpoint_with_missing_and_unexpected_keys(tmp_path, tiny_backbone):
    model, _, _ = tiny_backbone
    state = dict(model.state_dict())
    del state["out.2.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    with pytest.raises(BackboneError, match=r"1 missing key.*out\.2\.weight.*1 unexpected key.*extra\.weight"):
        load_checkpoint(model, path)


def test_wrapped_state_dict_is_refused(tmp_path, tiny_backbone):
    model, _, _ = tiny_backbone
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    with pytest.raises(BackboneError, match=r"not a plain state dict: entry 'state_dict'"):
        load_checkpoint(model, path)
    path_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path_list)
    with pytest.raises(BackboneError, match="holds a list"):
        load_checkpoint(model, path_list)


@dataclass
class _Arbitrary:
    payload: int


def test_arbitrary_pickle_is_refused_clearly(tmp_path, tiny_backbone):
    model, _, _ = tiny_backbone
    path = tmp_path / "object.pt"
    torch.save(_Arbitrary(3), path)
    with pytest.raises(BackboneError, match=r"refused for safety"):
        load_checkpoint(model, path)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Arbitrary(3)))
    with pytest.raises(BackboneError, match="plain.pkl"):
        load_checkpoint(model, plain)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(BackboneError, match="garbage.pt"):
        load_checkpoint(model, garbage)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("container", ["zip", "plain pickle"])
def test_checkpoint_with_code_is_refused_naming_the_global_without_suggesting_to_disable_the_check(
        tmp_path, tiny_backbone, container):
    """torch's own refusal text suggests re-running with weights_only=False: ddpmseg says the file holds code or
    objects refused for safety, names the global, and never suggests turning the check off."""
    model, _, _ = tiny_backbone
    path = tmp_path / "evil.pt"
    payload = {"weight": torch.zeros(1), "hook": _RunsCode()}
    if container == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(BackboneError) as caught:
        load_checkpoint(model, path)
    message = str(caught.value)
    assert str(path) in message and "refused for safety" in message and "code" in message
    assert "system" in message  # the global: posix.system / os.system
    assert "weights_only=False" not in message and "weights_only" not in message and "\n" not in message


def test_missing_checkpoint_names_path(tmp_path, tiny_backbone):
    model, _, _ = tiny_backbone
    path = tmp_path / "nowhere" / "lsun_bedroom.pt"
    with pytest.raises(BackboneError, match="not found.*lsun_bedroom.pt"):
        load_checkpoint(model, path)


# --- noise -----------------------------------------------------------------------------------------


def test_make_noise_is_deterministic_and_device_independent():
    cpu = torch.device("cpu")
    first = make_noise(0, SIZE, cpu)
    assert first.shape == (1, 3, SIZE, SIZE) and first.dtype == torch.float32
    assert torch.equal(first, make_noise(0, SIZE, cpu))
    assert not torch.equal(first, make_noise(1, SIZE, cpu))
    reference = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, reference)  # drawn on the CPU whatever the target device
    if torch.cuda.is_available():
        assert torch.equal(make_noise(0, SIZE, torch.device("cuda")).cpu(), first)
        assert make_noise(0, SIZE, torch.device("cuda"), mode="cuda-generator").device.type == "cuda"
    else:
        with pytest.raises(BackboneError, match="cuda-generator"):
            make_noise(0, SIZE, cpu, mode="cuda-generator")
    with pytest.raises(BackboneError, match="unknown noise mode"):
        make_noise(0, SIZE, cpu, mode="gpu")


# --- the official 552.8 M model ---------------------------------------------------------------------

OFFICIAL_BLOCK_SHAPES = {
    **{b: (1024, 8, 8) for b in (0, 1)},
    **{b: (1024, 16, 16) for b in (2, 3, 4)},
    5: (1024, 32, 32),
    **{b: (512, 32, 32) for b in (6, 7)},
    **{b: (512, 64, 64) for b in (8, 9, 10)},
    11: (512, 128, 128),
    **{b: (256, 128, 128) for b in (12, 13)},
    **{b: (256, 256, 256) for b in (14, 15, 16, 17)},
}


@pytest.mark.slow
def test_official_model_parameters_and_block_shapes():
    torch.manual_seed(0)
    model, diffusion = build_backbone(OFFICIAL_MODEL_FLAGS, device="cpu")
    parameters = count_parameters(model)
    print(f"official UNet: {parameters} parameters ({parameters / 1e6:.1f} M)")
    assert round(parameters / 1e6, 1) == 552.8
    blocks = _all_blocks(model)
    assert len(blocks) == 18
    assert block_shapes(model, 256, blocks) == OFFICIAL_BLOCK_SHAPES
    noise = make_noise(0, 256, torch.device("cpu"))
    x0 = torch.zeros(1, 3, 256, 256)
    start = time.perf_counter()
    outputs = extract_blocks(model, diffusion, x0, 50, noise, blocks)  # one forward, all 18 blocks
    print(f"one forward at 256x256 with all 18 blocks hooked: {time.perf_counter() - start:.1f} s")
    assert {b: tuple(a.shape[1:]) for b, a in outputs.items()} == OFFICIAL_BLOCK_SHAPES
    assert sum(OFFICIAL_BLOCK_SHAPES[b][0] for b in (5, 6, 7, 8, 12)) == 2816

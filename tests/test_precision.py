"""Precision options: "autocast" keeps the CPU in float32, "bfloat16" runs CPU autocast in bfloat16 with
GroupNorm still in float32; what ran is recorded in the metadata. (Speed: benchmarks/bfloat16_cpu.py.)"""
from __future__ import annotations

import pytest
import torch

from ldm.generation import GenerationRequest, generate, load_model, precision_scope
from ldm.generation import model as model_module
from ldm.generation.model import precision_used
from tests.conftest import TINY_CONFIG

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(TINY_CONFIG, tiny_ckpt, device="cpu", verbose=False)


@pytest.mark.parametrize("native", [False, True], ids=["cpu-without-native-bf16", "cpu-with-native-bf16"])
@pytest.mark.parametrize("precision, device, used", [
    ("autocast", "cpu", "float32"), ("full", "cpu", "float32"), ("bfloat16", "cpu", "bfloat16 autocast"),
    ("autocast", "cuda", "float16 autocast"), ("bfloat16", "cuda", "bfloat16 autocast"), ("bfloat16", "mps", "float32"),
    ("autocast", "mps", "float32"), ("full", "cuda", "float32"),
])
def test_precision_used_names_what_each_option_computes_in(precision, device, used, native, monkeypatch):
    monkeypatch.setattr(model_module, "cpu_has_native_bfloat16", lambda: native)
    if native and (precision, device) == ("autocast", "cpu"):
        used = "bfloat16 autocast"  # autocast uses bfloat16 only where the CPU computes it in hardware
    assert precision_used(precision, torch.device(device)) == used


def test_native_bfloat16_is_read_from_the_cpu():
    assert model_module.cpu_has_native_bfloat16() == (torch.cpu._is_avx512_bf16_supported()
                                                      or torch.cpu._is_amx_tile_supported())


def test_bfloat16_runs_linear_layers_in_bfloat16_and_group_norm_in_float32(model, monkeypatch):
    unet = model.unet
    linear_outputs, norm_outputs = set(), set()
    group_norm = torch.nn.functional.group_norm

    def recording_group_norm(*args, **kwargs):
        out = group_norm(*args, **kwargs)
        norm_outputs.add(out.dtype)  # the dtype the normalisation was computed in, after autocast
        return out

    monkeypatch.setattr(torch.nn.functional, "group_norm", recording_group_norm)
    hooks = [m.register_forward_hook(lambda m, i, o: linear_outputs.add(o.dtype))
             for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    try:
        with torch.no_grad(), precision_scope("bfloat16", CPU):
            unet(x, t, context=context)
    finally:
        for hook in hooks:
            hook.remove()
    assert linear_outputs == {torch.bfloat16}
    assert norm_outputs == {torch.float32}


def test_bfloat16_images_are_close_to_float32_and_say_what_ran(model):
    request = dict(prompt="a chair", steps=2, scale=3.0, batch_size=2, seed=3)
    full = generate(model, GenerationRequest(**request, precision="full"))
    low = generate(model, GenerationRequest(**request, precision="bfloat16"))
    difference = (low.samples[0].latent - full.samples[0].latent).norm() / full.samples[0].latent.norm()
    assert 0 < difference < 0.1  # bfloat16 really ran (not bit-identical), and stayed near float32
    assert [s.metadata["precision"] for s in low.samples] == ["bfloat16 autocast"] * 2
    assert full.samples[0].metadata["precision"] == "float32"

"""The attention seam (ldm/modules/attention.py, step_context.py): per-call state reaches every attention
layer as an argument, processors and readers come and go with their `with` blocks, and the library
carries no run state through hooks."""
from __future__ import annotations

import re

import pytest
import torch

from ldm.modules.attention import PLAIN, processors_installed, readers_added
from ldm.modules.step_context import StepContext
from tests.conftest import ROOT


def test_step_context_progress_and_token_grids():
    step = StepContext(halves=2, step_index=3, total_steps=10, latent_size=(64, 96))
    assert step.progress == 0.3
    assert [step.token_grid(tag) for tag in ("down.64", "up.32", "mid.8")] == [(64, 96), (32, 48), (8, 12)]
    assert StepContext(latent_size=(9, 5)).token_grid("down.16") == (3, 2)  # halvings round up
    assert StepContext().progress is None
    with pytest.raises(ValueError, match="both the step index and the number of steps"):
        StepContext(step_index=1)
    assert StepContext() != StepContext()  # one object per model call: compared by identity


def test_every_attention_layer_receives_the_callers_step_context_and_its_grid(tiny_unet):
    seen = []
    layers = [m for m in tiny_unet.modules() if hasattr(m, "processor")]
    step = StepContext(halves=1, step_index=2, total_steps=5, latent_size=(16, 8))
    x = torch.randn(1, 4, 16, 8)
    with readers_added([(layer, lambda layer, x, c, call, out: seen.append((layer, call))) for layer in layers]):
        with torch.no_grad():
            tiny_unet(x, torch.full((1,), 10), context=torch.randn(1, 77, 32), step=step)
    assert len(seen) == len(layers) == 32  # 16 transformer blocks, attn1 and attn2 each
    assert all(call.step is step for _, call in seen)
    for layer, call in seen:
        tag = layer.tag or next(b.attn1.tag for b in tiny_unet.modules() if getattr(b, "attn2", None) is layer)
        assert call.grid == step.token_grid(tag)


def test_a_bare_unet_call_makes_one_plain_step_context_for_all_its_layers(tiny_unet):
    seen = []
    layers = tiny_unet.self_attention_layers()
    with readers_added([(layer, lambda layer, x, c, call, out: seen.append(call.step)) for layer in layers]):
        with torch.no_grad():
            tiny_unet(torch.randn(2, 4, 8, 8), torch.full((2,), 10), context=torch.randn(2, 77, 32))
    assert len({id(step) for step in seen}) == 1
    assert seen[0].halves == 1 and seen[0].progress is None and seen[0].latent_size == (8, 8)


def test_processors_and_readers_are_restored_after_an_exception(tiny_unet):
    layer = tiny_unet.self_attention_layers()[0]

    def reader(*args):
        pass

    with pytest.raises(RuntimeError, match="boom"):
        with processors_installed([(layer, lambda *args: None)]), readers_added([(layer, reader)]):
            raise RuntimeError("boom")
    assert layer.processor is PLAIN and layer.readers == []


def test_readers_never_change_a_layers_output(tiny_unet):
    x, t, c = torch.randn(2, 4, 8, 8), torch.full((2,), 10), torch.randn(2, 77, 32)
    with torch.no_grad():
        plain = tiny_unet(x, t, context=c)
        layers = [m for m in tiny_unet.modules() if hasattr(m, "processor")]
        with readers_added([(layer, lambda *args: None) for layer in layers]):
            read = tiny_unet(x, t, context=c)
    assert torch.equal(plain, read)


def test_no_library_hook_carries_run_state():
    """Hooks appear only where a third-party model offers no argument to pass a call's state: the diffusers
    UNet, whose timestep the processors' step context is read from."""
    hooks = {}
    for path in sorted((ROOT / "ldm").rglob("*.py")):
        found = len(re.findall(r"register_forward(_pre)?_hook\(", path.read_text()))
        if found:
            hooks[str(path.relative_to(ROOT))] = found
    assert hooks == {"ldm/sharing/diffusers_processors.py": 1}

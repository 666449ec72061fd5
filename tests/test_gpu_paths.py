"""GPU paths checked on the CPU by emulation: no host stall per sampler step, no per-chunk synchronisation
in attention_stats, and no unused checkpoint tensors moved to the device.

There is no GPU here, so a CUDA device is emulated where the code only decides *how* to copy: the copy
itself is recorded instead of run. The numbers on the CPU are checked against plain `torch.randn` draws
from the same seeded generators, the way sampling drew them before.
"""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

from ldm.checkpoint import load_model_from_config
from ldm.eval import attention_stats
from ldm.models.diffusion import sampling_util
from ldm.models.diffusion.sampling_util import draw_noise
from ldm.util import instantiate_from_config
from tests.conftest import randomize_


def test_noise_on_the_cpu_is_each_generators_next_standard_normal_draw():
    generators = [torch.Generator().manual_seed(seed) for seed in (3, 4)]
    expected = torch.stack([torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(seed)) for seed in (3, 4)])
    assert torch.equal(draw_noise((2, 4, 5, 6), generators, torch.device("cpu")), expected)
    one = torch.Generator().manual_seed(7)
    assert torch.equal(draw_noise((2, 3), one, "cpu"), torch.randn(2, 3, generator=torch.Generator().manual_seed(7)))


def test_noise_for_a_cuda_model_is_copied_from_pinned_memory_without_waiting(monkeypatch):
    copies = []

    def record_to(tensor, *args, **kwargs):  # stands in for the CUDA copy
        copies.append((tensor.is_pinned_for_test, args, kwargs))
        return tensor

    def pin(tensor):
        pinned = tensor.clone()
        pinned.is_pinned_for_test = True
        return pinned

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "to", record_to)
    monkeypatch.setattr(torch.Tensor, "is_pinned_for_test", False, raising=False)
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    noise = draw_noise((2, 4, 3, 3), generators, torch.device("cuda"))
    assert copies == [(True, (torch.device("cuda"),), {"non_blocking": True})]
    monkeypatch.undo()
    expected = torch.stack([torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    assert torch.equal(noise, expected)


def test_the_ddim_eta_step_draws_its_noise_through_the_non_waiting_copy(monkeypatch):
    from ldm.models.diffusion.ddim import DDIMSampler

    class Zero(torch.nn.Module):  # eps = 0: the step is pure schedule arithmetic plus eta noise
        def __init__(self):
            super().__init__()
            from ldm.modules.diffusionmodules.util import make_beta_schedule
            betas = torch.tensor(make_beta_schedule("linear", 1000, 0.00085, 0.012))
            self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
            self.num_timesteps = 1000

        def apply_model(self, x, t, cond, step=None):
            return torch.zeros_like(x)

    moved = []
    original = sampling_util.to_device_without_waiting
    monkeypatch.setattr(sampling_util, "to_device_without_waiting",
                        lambda tensor, device: moved.append(tuple(tensor.shape)) or original(tensor, device))
    DDIMSampler(Zero()).sample(4, 2, (1, 2, 2), conditioning=torch.zeros(2, 1), eta=1.0, verbose=False,
                               generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert moved == [(2, 1, 2, 2)] * 5  # x_T, then one draw per step with sigma > 0 (the last has sigma 0)


def test_attention_statistics_synchronise_once_however_many_query_chunks(monkeypatch):
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8)
    expected = attention_stats.attention_statistics(q, k, 0.35)
    monkeypatch.setattr(attention_stats, "QUERY_CHUNK", 3)  # 14 chunks per image
    calls = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append(1) or item(t))
    chunked = attention_stats.attention_statistics(q, k, 0.35)
    assert len(calls) == 2  # one per returned number, none per chunk
    assert chunked == pytest.approx(expected, rel=1e-6)


def test_unused_ema_weights_of_a_full_ema_file_stay_on_the_cpu(tmp_path, tiny_config, monkeypatch):
    from ldm.checkpoint import ema_key, loading

    torch.manual_seed(0)
    model = randomize_(instantiate_from_config(tiny_config.model))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    ema = {ema_key(k): state[k] + 1 for k in state if k.startswith("model.diffusion_model.")}
    safetensors.torch.save_file(state | ema, tmp_path / "full-ema.safetensors")
    read_on = []
    original = loading.load_checkpoint
    monkeypatch.setattr(loading, "load_checkpoint",
                        lambda path, device="cpu": read_on.append(str(device)) or original(path, device))
    # "meta" stands in for a GPU: whatever the file put there would be moved there.
    loaded = load_model_from_config(tiny_config, tmp_path / "full-ema.safetensors", device="meta", verbose=False)
    assert read_on == ["cpu"]  # the file is mapped on the CPU; its unused EMA copies are dropped there
    assert all(t.is_meta for t in loaded.state_dict().values())  # only the model's own tensors were moved

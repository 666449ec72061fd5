"""Specification of ldm/modules/attention_kernel.py: attention that stays linear in memory without fused kernels.

The reference is attention written out naively (softmax of the full score matrix), and PyTorch's fused
kernel where it has one. The math kernel (what mps always runs) is forced on the CPU with
`torch.nn.attention.sdpa_kernel`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.modules.attention import CrossAttention
from ldm.modules.attention_kernel import (chunked_attention, memory_linear_attention, query_chunk_size,
                                          uses_fused_kernel)

ROOT = Path(__file__).resolve().parents[1]


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


@pytest.mark.parametrize("budget_queries", [1, 7, 64, 1000])
def test_chunked_attention_equals_the_full_softmax_for_any_chunk_size(budget_queries):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 50, 8), torch.randn(2, 3, 70, 8), torch.randn(2, 3, 70, 5)
    budget = budget_queries * 2 * 3 * 70 * 8  # (B, heads, M) scores of 8 bytes per query
    assert query_chunk_size(q, k, budget) == budget_queries
    out = chunked_attention(q, k, v, scale=0.3, budget_bytes=budget)
    torch.testing.assert_close(out, naive_attention(q, k, v, 0.3), rtol=1e-5, atol=1e-6)


def test_pytorchs_own_kernel_choice_decides_whether_to_chunk():
    q = torch.randn(1, 2, 16, 8)
    assert uses_fused_kernel(q, q, q)  # the CPU flash kernel takes plain float32 inputs
    with sdpa_kernel(SDPBackend.MATH):
        assert not uses_fused_kernel(q, q, q)
    transposed = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # last dim not contiguous
    assert not uses_fused_kernel(transposed, q, q)
    assert not uses_fused_kernel(q.to("meta"), q.to("meta"), q.to("meta"))  # no fused kernel: chunk


def test_a_self_attention_layer_chunks_on_the_math_kernel_and_gives_the_same_output(monkeypatch):
    torch.manual_seed(0)
    layer = CrossAttention(32, heads=2, dim_head=16).eval()
    x = torch.randn(2, 300, 32)
    with torch.no_grad():
        fused = layer(x)
        monkeypatch.setattr("ldm.modules.attention_kernel.DEFAULT_BUDGET_BYTES", 2 * 300 * 8 * 10)
        calls = []
        original = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda q, *a, **kw: calls.append(q.shape[-2]) or original(q, *a, **kw))
        with sdpa_kernel(SDPBackend.MATH):
            chunked = layer(x)
    assert len(calls) > 1 and sum(calls) == 300  # it did split the queries
    torch.testing.assert_close(chunked, fused, rtol=1e-5, atol=1e-5)


# The shared 64x64 layer at batch 4 (N = 4096 tokens per image, group of 4: 16384 keys), one head of
# width 40 to keep the test fast. Unchunked, the math kernel holds 16384 x 16384 float32 logits (1 GiB)
# and their softmax (1 GiB more: 2.3 GiB peak measured); chunked, one chunk's scores and softmax fit the
# 256 MiB budget (300-540 MiB peak measured, the allocator keeping some freed chunks).
PEAK_BOUND_MIB = 1024
CHILD = """
import json, resource, sys, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from ldm.sharing.kernels import shared_batch_attention
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(4, 1, 4096, 40, generator=g) for _ in range(3))  # (B, heads, N, d)
run = lambda: shared_batch_attention(q, k, v, halves=1, mode="all", anchors=1, strength=0.0, scale=40 ** -0.5)
rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
with sdpa_kernel(SDPBackend.MATH):
    chunked = run()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
fused = run()  # PyTorch's CPU flash kernel
print(json.dumps({"peak_mib": (peak - rss) / 2 ** 20, "max_diff": (chunked - fused).abs().max().item()}))
"""


def test_a_shared_64x64_layer_at_batch_4_stays_within_the_memory_bound_on_the_math_kernel():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["peak_mib"] < PEAK_BOUND_MIB, measured
    assert measured["max_diff"] < 1e-4, measured


def test_memory_linear_attention_is_plain_sdpa_where_a_fused_kernel_runs():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 40, 8), torch.randn(3, 2, 40, 8), torch.randn(3, 2, 40, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)
    assert torch.equal(memory_linear_attention(q, k, v, scale=0.5, budget_bytes=1), expected)


def test_the_autoencoder_attention_hands_4d_inputs_to_pytorch_and_matches_a_naive_reference(monkeypatch):
    from ldm.modules.diffusionmodules.model import AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(16, norm_num_groups=4).eval()
    x = torch.randn(2, 16, 6, 5)  # (B, C, H, W)
    shapes = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: shapes.append(tuple(q.shape)) or original(q, *a, **kw))
    with torch.no_grad():
        out = block(x)
        h = block.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (block.q, block.k, block.v))  # (B, HW, C)
        attended = naive_attention(q, k, v, 16 ** -0.5).transpose(1, 2).reshape(2, 16, 6, 5)
        expected = x + block.proj_out(attended)
    assert shapes == [(2, 1, 30, 16)]  # (B, heads, HW, C): the layout fused kernels accept
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

"""Scaled dot-product attention whose memory stays linear in the number of keys on every backend.

`torch.nn.functional.scaled_dot_product_attention` is linear in memory only when PyTorch picks a fused
kernel (flash or memory-efficient on CUDA, flash on the CPU). Otherwise it runs its math path, which
builds the whole (queries x keys) score matrix: on Apple GPUs (`mps`) always, elsewhere when an input
disqualifies the fused kernels or they are switched off (`torch.nn.attention.sdpa_kernel`). For batch-shared
attention that matrix is large: sharing `all` at batch 4 and 512 px holds 16384 x 16384 logits per head.

`memory_linear_attention` asks PyTorch which kernel it would use; when that is the math path, the queries are split into
chunks so that one chunk's scores fit `budget_bytes`. Every query's softmax involves only its own row of
scores, so the chunks give the same result as the whole (up to float rounding of the kernel).

Layouts: q (..., N, d), k (..., M, d), v (..., M, dv), any leading dimensions (batch, heads).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

# Scores held per chunk. The math path keeps the logits and their softmax at once, in float32 or wider.
DEFAULT_BUDGET_BYTES = 256 * 2**20
_SCORE_BYTES = 2 * 4


def uses_fused_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `scaled_dot_product_attention(q, k, v)` would run a fused (memory-linear) kernel."""
    if q.device.type not in ("cpu", "cuda"):
        return False  # PyTorch chooses among fused kernels only on these; mps and others run the math path
    try:
        choice = torch._fused_sdp_choice(q, k, v)  # what scaled_dot_product_attention itself would pick
    except (AttributeError, RuntimeError, NotImplementedError):
        return True  # a PyTorch without the query: leave the choice to it
    return choice != int(SDPBackend.MATH)


def query_chunk_size(q: torch.Tensor, k: torch.Tensor, budget_bytes: Optional[int] = None) -> int:
    """How many queries one chunk may hold so that its scores (leading dims x rows x M) fit the budget."""
    budget_bytes = DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes
    per_query = math.prod(q.shape[:-2]) * k.shape[-2] * _SCORE_BYTES
    return max(1, budget_bytes // per_query)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                      budget_bytes: Optional[int] = None) -> torch.Tensor:
    """Attention computed over chunks of the queries; peak score memory about `budget_bytes`."""
    rows = query_chunk_size(q, k, budget_bytes)
    if rows >= q.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    chunks = [F.scaled_dot_product_attention(q_chunk, k, v, scale=scale)  # (..., rows, dv)
              for q_chunk in q.split(rows, dim=-2)]
    return torch.cat(chunks, dim=-2)  # (..., N, dv)


def memory_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
              budget_bytes: Optional[int] = None) -> torch.Tensor:
    """`scaled_dot_product_attention(q, k, v, scale=scale)`, query-chunked where PyTorch has no fused kernel."""
    if uses_fused_kernel(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return chunked_attention(q, k, v, scale=scale, budget_bytes=budget_bytes)

"""The UNet's transformer layers: `SpatialTransformer` -> `BasicTransformerBlock` -> `CrossAttention`.

Layouts: feature maps are (B, C, H, W); inside the transformer they are token sequences (B, N, C) with
N = H * W; attention heads are split as (B, heads, N, dim_head). Attention always goes through
`torch.nn.functional.scaled_dot_product_attention`, so no N x N matrix is built by this code and the
fused kernels (flash / memory-efficient on CUDA, flash on CPU) are used where torch has them; where it
has none (mps, disqualified inputs), self-attention splits its queries into chunks instead
(`ldm/modules/attention_kernel.py`), so its memory stays linear in the number of keys.

Each `BasicTransformerBlock` has two attention layers:
- `attn1`, self-attention: the image's tokens attend to the image's own tokens;
- `attn2`, cross-attention: the image's tokens attend to the text tokens (the prompt).

Every attention layer hands its work to a swappable piece, its processor (the seam batch-shared
attention plugs into; `ldm/sharing/` explains that mode):
- `CrossAttention.processor` computes the layer's output from its input. `PlainAttention` (the default)
  is the layer's own attention; batch sharing puts its own processor on the self-attention layers it
  selects, for the duration of a `with` block, and puts the plain one back after.
- `CrossAttention.readers` observe each call (input, text, output) without changing anything: the
  subject masks of batch sharing, the recorders of references and the evaluation's instruments.
Both receive a `LayerCall` (ldm/modules/step_context.py): the model call's step context (guidance
halves, step, latent size) and the layer's token grid, passed down from the UNet's forward call.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.attention_kernel import memory_linear_attention
from ldm.modules.diffusionmodules.util import GroupNorm32, checkpoint, zero_module
from ldm.modules.step_context import LayerCall, StepContext
from ldm.util import default


class GEGLU(nn.Module):
    """Gated GELU feed-forward input (Shazeer 2020): one projection to 2x width, half gates the other."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Processor(Protocol):
    """Computes one call of an attention layer: x (B, N, C), context (B, T, D) or None -> (B, N, C)."""

    def __call__(self, layer: "CrossAttention", x: torch.Tensor, context: Optional[torch.Tensor],
                 call: Optional[LayerCall]) -> torch.Tensor: ...


# Observes one call of an attention layer: (layer, x, context, call, output); returns nothing.
Reader = Callable[["CrossAttention", torch.Tensor, Optional[torch.Tensor], Optional[LayerCall], torch.Tensor], None]


class PlainAttention:
    """A layer's own attention, the default processor: softmax(q k^T * scale) v over its own keys."""

    def __call__(self, layer: "CrossAttention", x: torch.Tensor, context: Optional[torch.Tensor],
                 call: Optional[LayerCall]) -> torch.Tensor:
        q, k, v = layer.project(x, context)  # (B, heads, N, d), (B, heads, M, d) x 2
        if context is None:  # N x N scores: query-chunked where PyTorch has no fused kernel (e.g. mps)
            out = memory_linear_attention(q, k, v, scale=layer.scale)  # (B, heads, N, d)
        else:  # cross-attention: N x 77 scores, left to PyTorch as it is
            out = F.scaled_dot_product_attention(q, k, v, scale=layer.scale)  # (B, heads, N, d)
        return layer.output(out)


PLAIN = PlainAttention()


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (self-attention when `context` is None).

    Plain attributes (not parameters, so not in the state dict):
    - `tag`: the resolution group of a self-attention layer, e.g. "down.64", set by `UNetModel` when it
      builds the layer (None for cross-attention layers, which are never shared);
    - `processor`: what computes a call (`PLAIN` unless a `with` block has put another in place);
    - `readers`: what observes each call (empty unless a `with` block has added some).
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.tag: Optional[str] = None
        self.processor: Processor = PLAIN
        self.readers: list[Reader] = []

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                call: Optional[LayerCall] = None) -> torch.Tensor:
        out = self.processor(self, x, context, call)
        for read in self.readers:
            read(self, x, context, call, out)
        return out

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "b n (h d) -> b h n d", h=self.heads)  # (B, N, heads*d) -> (B, heads, N, d)

    def project(self, x: torch.Tensor, context: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, heads, N, d) from x (B, N, C); k, v (B, heads, M, d) from the context (x itself when None)."""
        context = default(context, x)
        return self.split_heads(self.to_q(x)), self.split_heads(self.to_k(context)), self.split_heads(self.to_v(context))

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The heads' attention output (B, heads, N, d) merged and projected: (B, N, C)."""
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


@contextmanager
def processors_installed(assignments: Sequence[tuple[CrossAttention, Processor]]) -> Iterator[None]:
    """Each layer computes with its given processor inside the block; the previous ones come back after."""
    previous = [(layer, layer.processor) for layer, _ in assignments]
    try:
        for layer, processor in assignments:
            layer.processor = processor
        yield
    finally:
        for layer, processor in reversed(previous):
            layer.processor = processor


@contextmanager
def readers_added(assignments: Sequence[tuple[CrossAttention, Reader]]) -> Iterator[None]:
    """Each layer also calls its given reader after every call inside the block."""
    added: list[tuple[CrossAttention, Reader]] = []
    try:
        for layer, reader in assignments:
            layer.readers.append(reader)
            added.append((layer, reader))
        yield
    finally:
        for layer, reader in reversed(added):
            layer.readers.remove(reader)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention (`attn1`), cross-attention to the text (`attn2`), GEGLU MLP."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: Optional[int] = None, gated_ff: bool = True, checkpoint: bool = True):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads,
                                    dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                call: Optional[LayerCall] = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context, call), self.checkpoint and self.training)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                 call: Optional[LayerCall] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), call=call) + x
        x = self.attn2(self.norm2(x), context=context, call=call) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the pixels of a feature map: (B, C, H, W) -> tokens -> (B, C, H, W).

    The input projection is a 1x1 convolution (SD v1); `use_linear=True` gives the linear projection
    of later Stable Diffusion versions.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: Optional[int] = None, use_checkpoint: bool = True, use_linear: bool = False,
                 norm_num_groups: int = 32):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = GroupNorm32(num_groups=norm_num_groups, num_channels=in_channels, eps=1e-6, affine=True)
        self.use_linear = use_linear
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                                  checkpoint=use_checkpoint)
            for _ in range(depth)
        )
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                step: Optional[StepContext] = None) -> torch.Tensor:
        """x (B, C, H, W); `step`: the model call's context (a plain one when None), handed to every
        attention layer with this feature map's (H, W) token grid."""
        _, _, h, w = x.shape  # (B, C, H, W)
        call = LayerCall(step if step is not None else StepContext(latent_size=(h, w)), (h, w))
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # (B, inner, H, W)
        x = rearrange(x, "b c h w -> b (h w) c")  # (B, H*W, C or inner)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context, call=call)
        if self.use_linear:
            x = self.proj_out(x)
        # contiguous(): the permuted view would otherwise be channels-last in memory, and that layout
        # would spread through the residual sum to every later convolution (about 1.3x slower on CPU).
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()  # (B, C or inner, H, W)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in

    def self_attention_layers(self) -> list[CrossAttention]:
        """The `attn1` layers of this transformer, in order (the ones batch sharing may change)."""
        return [block.attn1 for block in self.transformer_blocks]

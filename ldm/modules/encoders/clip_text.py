"""CLIP text transformer (the text tower of OpenAI CLIP), written for SD v1's conditioning.

SD v1 conditions its UNet on the last hidden state of CLIP ViT-L/14's text tower: a 12-layer, 768-wide
pre-LayerNorm transformer with a causal mask over 77 tokens. `CLIPTextConfig`'s defaults are that model.

Assumptions:
- Inputs are int64 token ids (B, T) with T <= max_position_embeddings, laid out as the CLIP tokenizer makes
  them: BOS, tokens, EOS, then padding. No padding mask is needed: with the causal mask a token only sees
  tokens to its left, so padding placed after EOS never changes the outputs at real tokens.
- Hidden states are (B, T, C) throughout; attention heads are split to (B, H, T, D).
- Attribute names are the checkpoint keys: in an SD v1 checkpoint this module's state dict sits under
  `cond_stage_model.transformer.`, e.g. `text_model.encoder.layers.0.self_attn.q_proj.weight`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYER_CHOICES = ("last", "penultimate")
MAX_POSITIONS = 4096  # a bound for untrusted configs, far above CLIP's 77


@dataclass
class CLIPTextConfig:
    """Sizes of the CLIP text tower; the defaults are ViT-L/14's, the one SD v1 uses."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                f"{self.num_attention_heads}; pick sizes whose ratio is the per-head width"
            )
        if not 1 <= self.max_position_embeddings <= MAX_POSITIONS:  # its position ids are made at construction
            raise ValueError(f"max_position_embeddings={self.max_position_embeddings} must be between 1 and "
                             f"{MAX_POSITIONS} (CLIP's is 77)")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI trained CLIP with, so its weights expect it."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # Persistent because the SD v1 checkpoints store it (as int64); a non-persistent buffer would make
        # strict loading of those checkpoints fail on an unexpected key.
        positions = torch.arange(config.max_position_embeddings, dtype=torch.int64)
        self.register_buffer("position_ids", positions.unsqueeze(0), persistent=True)  # (1, max_positions)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = self.position_ids[:, :seq_len]  # (1, T)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, C)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention; the attention itself is scaled_dot_product_attention."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        width = config.hidden_size
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, width = x.shape
        x = x.view(batch, seq_len, self.num_heads, width // self.num_heads)  # (B, T, H, D)
        return x.transpose(1, 2)  # (B, H, T, D)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, seq_len, width = hidden.shape
        q = self._split_heads(self.q_proj(hidden))
        k = self._split_heads(self.k_proj(hidden))
        v = self._split_heads(self.v_proj(hidden))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, seq_len, width)  # (B, T, C)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden))
        return hidden + self.mlp(self.layer_norm2(hidden))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """Run the first `num_layers` blocks (all of them by default)."""
        for layer in self.layers[:num_layers]:
            hidden = layer(hidden)
        return hidden


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, layer: str = "last") -> torch.Tensor:
        if layer not in LAYER_CHOICES:
            raise ValueError(f"layer={layer!r} is not supported; use one of {LAYER_CHOICES}")
        # "penultimate" is what UIs call "CLIP skip 2": stop one block early, then still apply the final
        # LayerNorm, because the layers downstream were trained on normalised features.
        num_layers = len(self.encoder.layers) - 1 if layer == "penultimate" else None
        hidden = self.encoder(self.embeddings(input_ids), num_layers=num_layers)  # (B, T, C)
        return self.final_layer_norm(hidden)


class CLIPTextModel(nn.Module):
    """CLIP text tower; `forward(input_ids)` returns the normalised last hidden state (B, T, hidden)."""

    def __init__(self, config: CLIPTextConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else CLIPTextConfig()
        self.text_model = CLIPTextTransformer(self.config)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def forward(self, input_ids: torch.Tensor, layer: str = "last") -> torch.Tensor:
        """input_ids (B, T) int64 -> (B, T, hidden).

        layer="last" is the output of all blocks (what SD v1 uses); "penultimate" skips the last block.
        Both go through final_layer_norm.
        """
        return self.text_model(input_ids, layer=layer)

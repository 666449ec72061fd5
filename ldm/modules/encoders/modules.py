"""Conditioning encoders of SD v1: `FrozenCLIPEmbedder` turns prompts into the UNet's context (B, 77, 768).

Assumptions:
- Class and parameter names are CompVis's, so `configs/*.yaml` written for it work unchanged
  (`target: ldm.modules.encoders.modules.FrozenCLIPEmbedder`).
- The text transformer is built locally from a config, never downloaded: its weights come from the SD
  checkpoint (`cond_stage_model.transformer.*`). The tokenizer's vocabulary is read from local files, see
  `ldm.modules.encoders.tokenizer.find_vocabulary`.
- The encoder runs wherever its parameters are; move it with `.to(device)` like any module.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ldm.modules.encoders.clip_text import LAYER_CHOICES, CLIPTextConfig, CLIPTextModel
from ldm.modules.encoders.tokenizer import DEFAULT_REPO_ID, CLIPTokenizer


class AbstractEncoder(nn.Module):
    """Base of the conditioning encoders: `encode(x)` gives what the diffusion model is conditioned on."""

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement encode()")


class FrozenCLIPEmbedder(AbstractEncoder):
    """CLIP ViT-L/14 text tower with its tokenizer, frozen: prompts -> (B, max_length, hidden)."""

    def __init__(
        self,
        version: str = DEFAULT_REPO_ID,
        device: str = "cuda",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        tokenizer_path: Optional[str | os.PathLike] = None,
        text_config: Optional[dict[str, Any]] = None,
    ) -> None:
        """
        version: a hub id whose files are looked up in the local HF cache, or a local directory holding
            vocab.json and merges.txt. Only the tokenizer reads it; no weights are loaded from it.
        device: kept for compatibility with CompVis configs and ignored; the module runs on the device of
            its parameters.
        layer: "last" (SD v1) or "penultimate" ("CLIP skip 2").
        tokenizer_path: explicit vocabulary location; takes precedence over `version`.
        text_config: CLIPTextConfig fields overriding the ViT-L/14 defaults (tests use tiny ones).
        """
        super().__init__()
        if layer not in LAYER_CHOICES:
            raise ValueError(f"layer={layer!r} is not supported; use one of {LAYER_CHOICES}")
        config = CLIPTextConfig(**(text_config or {}))
        if max_length > config.max_position_embeddings:
            raise ValueError(
                f"max_length={max_length} exceeds the text model's {config.max_position_embeddings} positions; "
                f"use max_length <= {config.max_position_embeddings}"
            )
        if tokenizer_path is None and os.path.isdir(os.path.expanduser(version)):
            tokenizer_path = version
        repo_id = version if tokenizer_path is None else DEFAULT_REPO_ID
        self.tokenizer = CLIPTokenizer.from_default(tokenizer_path, repo_id=repo_id)
        self.transformer = CLIPTextModel(config)
        self.max_length = max_length
        self.layer = layer
        if freeze:
            self.freeze()

    @property
    def device(self) -> torch.device:
        """Where the module runs: the device of its weights (the constructor's `device` is ignored)."""
        return self.transformer.token_embedding.weight.device

    def freeze(self) -> None:
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text: Sequence[str]) -> torch.Tensor:
        """Prompts -> (B, max_length) int64 ids; warns once, naming what was cut, if any prompt is too long."""
        tokens = self.tokenizer(list(text), max_length=self.max_length)
        cut = [(prompt, lost) for prompt, lost in zip(text, tokens.truncated) if lost is not None]
        if cut:
            details = "; ".join(f"prompt {prompt!r} lost {lost!r}" for prompt, lost in cut)
            warnings.warn(
                f"CLIP reads at most {self.max_length} tokens, so the end of {len(cut)} prompt(s) was cut: "
                f"{details}. Shorten the prompt to keep those words.",
                stacklevel=2,
            )
        return tokens.input_ids

    def forward(self, text: Sequence[str]) -> torch.Tensor:
        """list of B prompts -> (B, max_length, hidden) context for the UNet's cross-attention."""
        if isinstance(text, str):
            raise TypeError("FrozenCLIPEmbedder expects a list of prompts; wrap a single prompt as [prompt]")
        input_ids = self.tokenize(text).to(self.device)
        return self.transformer(input_ids, layer=self.layer)

    def encode(self, text: Sequence[str]) -> torch.Tensor:
        return self(text)

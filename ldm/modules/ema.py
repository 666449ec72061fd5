"""Exponential moving average of a model's parameters, stored under the CompVis checkpoint names.

CompVis' `LitEma` keeps one buffer per trainable parameter of the wrapped module, named after the
parameter with the dots removed (`diffusion_model.input_blocks.0.0.weight` ->
`diffusion_modelinput_blocks00weight`), plus `decay` and `num_updates`. `*-full-ema.ckpt` files hold
these as `model_ema.*`; keeping the names lets the loader map them back (`--use-ema`).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


def ema_buffer_name(parameter_name: str) -> str:
    return parameter_name.replace(".", "")


class LitEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                buffer_name = ema_buffer_name(name)
                self.m_name2s_name[name] = buffer_name
                self.register_buffer(buffer_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update; early on the decay is lowered to (1 + n) / (10 + n) so the average warms up."""
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(decay, (1 + int(self.num_updates)) / (10 + int(self.num_updates)))
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.m_name2s_name and p.requires_grad:
                s = shadow[self.m_name2s_name[name]]
                s.sub_((1.0 - decay) * (s - p.detach().to(s.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.m_name2s_name:
                p.copy_(shadow[self.m_name2s_name[name]])

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        for saved, p in zip(self.collected_params, parameters):
            p.copy_(saved)
        self.collected_params = []

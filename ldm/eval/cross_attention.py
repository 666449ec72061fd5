"""Where does the cross-attention of the image queries go? Read without changing the model.

`CrossAttentionRecorder` adds a reader (ldm/modules/attention.py) to every cross-attention layer
(`attn2`) of a UNet. The reader receives the layer's input x (B, N, C) and its text context (B, T, D),
recomputes the attention probabilities softmax(q k^T * scale) per head from the layer's own `to_q` /
`to_k`, reduces them and returns nothing, so the layer's output is the one the layer computed (bit for
bit). The reading is `ldm.modules.cross_attention_read`, shared with the subject masks of batch
sharing, and the probabilities are never built for more than one image and
`QUERY_CHUNK` queries at a time, so the recorder runs at SD v1's 4096 tokens.

What it records, per layer and call, for each image of the batch, given the token positions of its
prompt by role (`roles`, e.g. from `ldm.eval.text_probe.token_roles`: "start", "attribute", "class",
"other", "end", "padding"):
- `mass[role]`: the share of the attention of the image's queries that goes to the role's tokens,
  averaged over heads and queries (the roles partition the T tokens, so the shares sum to 1);
- for the roles in `mapped`: the role's attention map over the image (its tokens' probabilities summed,
  one map per head), described by `entropy`, its normalised entropy over the image positions (1 =
  spread evenly over the image; NaN for a single position), and `peak`, its largest value over its
  mean (1 = even, N = all on one position); both averaged over heads.

Layers are grouped by the level tag of the self-attention layer of the same transformer block
(`down.64`, `mid.8`, ...; cross-attention layers themselves carry no tag).
"""
from __future__ import annotations

import math
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from ldm.modules import cross_attention_read
from ldm.modules.attention import readers_added
from ldm.modules.cross_attention_read import layer_queries_and_keys, probability_chunks
from ldm.sharing import find_unet

QUERY_CHUNK = cross_attention_read.QUERY_CHUNK
Roles = Mapping[str, Sequence[int]]  # role -> token positions of one prompt


@dataclass
class CallRecord:
    """One layer call: role -> (B,) values. A role without tokens in a prompt has mass 0 and NaN maps."""

    mass: dict[str, torch.Tensor]
    entropy: dict[str, torch.Tensor]
    peak: dict[str, torch.Tensor]


def cross_attention_layers(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(module path, level tag, layer) of every `attn2` of the model's UNet, in forward order."""
    return cross_attention_read.cross_attention_layers(find_unet(model))


def token_attention(q: torch.Tensor, k: torch.Tensor, scale: float, roles: Sequence[Roles],
                    mapped: Sequence[str] = ()) -> CallRecord:
    """The record of one call from q (B, heads, N, d) and k (B, heads, T, d), one `roles` per image."""
    batch, heads, pixels, _ = q.shape  # pixels: the image's query tokens
    if len(roles) != batch:
        raise ValueError(f"got token roles for {len(roles)} prompts but the batch holds {batch} images")
    nan = torch.full((batch,), math.nan)
    names = dict.fromkeys(role for prompt_roles in roles for role in prompt_roles)
    record = CallRecord(mass={r: nan.clone() for r in names}, entropy={r: nan.clone() for r in mapped},
                        peak={r: nan.clone() for r in mapped})
    for b in range(batch):
        mass = {role: 0.0 for role in roles[b]}
        maps = {role: torch.zeros(heads, pixels) for role in mapped if len(roles[b].get(role, ()))}
        for start, probs in probability_chunks(q[b], k[b], scale, QUERY_CHUNK):  # probs (heads, n, T)
            for role, positions in roles[b].items():
                mass[role] += probs[..., list(positions)].sum().item()
            for role, image_map in maps.items():
                image_map[:, start:start + probs.shape[1]] = probs[..., list(roles[b][role])].sum(dim=-1)  # (heads, n)
        for role, total in mass.items():
            record.mass[role][b] = total / (heads * pixels)
        for role, image_map in maps.items():
            p = image_map / image_map.sum(dim=-1, keepdim=True)  # (heads, N): a distribution over the image
            if pixels > 1:
                entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=-1) / math.log(pixels)
                record.entropy[role][b] = entropy.mean()
            record.peak[role][b] = (p.amax(dim=-1) * pixels).mean()  # max / mean over the image
    return record


class CrossAttentionRecorder:
    """`with CrossAttentionRecorder(model, mapped=("attribute", "class")) as rec:` then, before each
    forward pass, `rec.roles = [roles of image 0, roles of image 1, ...]`; afterwards `rec.summary()`."""

    def __init__(self, model: nn.Module, mapped: Sequence[str] = ()):
        self.layers = cross_attention_layers(model)
        self.mapped = tuple(mapped)
        self.roles: Optional[list[Roles]] = None
        self.records: dict[str, list[CallRecord]] = defaultdict(list)
        self._reading = ExitStack()

    def _reader(self, name: str):
        def record(layer: nn.Module, x: torch.Tensor, context: Optional[torch.Tensor], call: object,
                   out: torch.Tensor) -> None:
            if context is None:
                raise ValueError(f"{name} ran without a text context; the recorder reads cross-attention only")
            if self.roles is None:
                raise ValueError("set recorder.roles (the token roles of each prompt) before each forward pass")
            q, k = layer_queries_and_keys(layer, x, context)  # (B, heads, N, d), (B, heads, T, d)
            self.records[name].append(token_attention(q, k, layer.scale, self.roles, self.mapped))
        return record

    def summary(self) -> dict[str, dict[str, float]]:
        """level tag -> {"layers", "mass.<role>", "entropy.<role>", "peak.<role>"}, each the mean over
        the level's layers, their calls and the images (NaN values left out), in forward order; the
        last row, "all", is the mean over every layer."""
        groups: dict[str, list[str]] = defaultdict(list)
        for name, tag, _ in self.layers:
            if self.records.get(name):
                groups[tag].append(name)
        every = [name for names in groups.values() for name in names]
        return {**{tag: self._mean_over(names) for tag, names in groups.items()}, "all": self._mean_over(every)}

    def _mean_over(self, names: list[str]) -> dict[str, float]:
        values: dict[str, list[torch.Tensor]] = defaultdict(list)
        for name in names:
            for call in self.records[name]:
                for kind in ("mass", "entropy", "peak"):
                    for role, per_image in getattr(call, kind).items():
                        values[f"{kind}.{role}"].append(per_image)
        row = {"layers": float(len(names))}
        for key, tensors in values.items():
            stacked = torch.cat(tensors)
            finite = stacked[~stacked.isnan()]
            row[key] = finite.mean().item() if finite.numel() else math.nan
        return row

    def __enter__(self) -> "CrossAttentionRecorder":
        self._reading.enter_context(readers_added([(layer, self._reader(name)) for name, _, layer in self.layers]))
        return self

    def __exit__(self, *exc) -> None:
        self._reading.close()

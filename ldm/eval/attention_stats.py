"""How selective is a model's self-attention, and what would sharing let each image see?

Batch sharing can only make images consistent if a query finds *matching* tokens among the other
images' keys (a chair leg attending to chair legs) and copies their appearance. If a model's
self-attention is nearly uniform, a query averages all tokens alike, and sharing merely blends the
batch's averages. `AttentionRecorder` measures both sides while the model generates, for every tagged
self-attention layer (`attn1`, with a reader: ldm/modules/attention.py), with sharing off:

- `entropy`: the normalised entropy of each query's attention over its own image's keys, averaged
  over queries, heads and calls: 1.0 is uniform attention, lower is more selective (NaN for a
  layer with a single token).
- `other_mass`: if the keys of all images of the set were pooled (sharing "all", strength 0), the share
  of a query's attention that would go to the other images. A query that prefers its own image gives
  less than `(B - 1) / B`, the value of attention that cannot tell images apart.
- `output_similarity`: the mean cosine similarity, between every two images of the set, of the layer's
  output at the same token. Sharing only changes which images' values a query mixes; if every image's
  output is nearly the same (near 1, as when uniform attention averages a background all images share),
  reading other images' keys and values cannot change much, whatever the strength or anchor.

`prediction_change` asks the downstream question: sharing in one group changes that group's outputs,
but how much does it change the UNet's noise prediction, the only thing the sampler sees? A group
whose attention output the following layers barely use can share all it likes without moving the image.

With classifier-free guidance the batch is [unconditional; conditional]; only the conditional images
(the last `set_size` of the batch) are measured. Queries are processed in chunks, so no
(B*N) x (B*N) tensor is built even at SD v1's 4096 tokens.
"""
from __future__ import annotations

import math
from collections import defaultdict
from contextlib import ExitStack
from typing import Optional

import torch
from torch import nn

from ldm.modules.attention import readers_added
from ldm.sharing import find_unet, shared_attention, tagged_layers

QUERY_CHUNK = 1024


def output_similarity(out: torch.Tensor) -> float:
    """Mean cosine similarity between the outputs of two different images at the same token; out (B, N, C)."""
    batch = out.shape[0]
    unit = torch.nn.functional.normalize(out.float(), dim=-1)
    pairs = torch.einsum("inc,jnc->ij", unit, unit) / out.shape[1]  # (B, B): mean over tokens
    return ((pairs.sum() - pairs.diagonal().sum()) / (batch * (batch - 1))).item()


def attention_statistics(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[float, float]:
    """(mean normalised own-image entropy, mean share on other images) for q, k of shape (B, heads, N, d)."""
    batch, _, tokens, _ = q.shape
    pooled = torch.cat(k.unbind(0), dim=1).float().transpose(1, 2)  # (heads, d, B*N): the keys sharing "all" offers
    # Sums stay on the device until the end: an .item() per chunk would make the host wait for the GPU.
    entropy_sum = torch.zeros((), dtype=torch.float64, device=q.device)
    other_sum = torch.zeros((), dtype=torch.float64, device=q.device)
    count = 0
    for i in range(batch):
        for start in range(0, tokens, QUERY_CHUNK):
            queries = q[i, :, start:start + QUERY_CHUNK].float()  # (heads, n, d)
            logits = queries @ pooled * scale  # (heads, n, B*N)
            own = logits[..., i * tokens:(i + 1) * tokens].softmax(dim=-1)
            if tokens > 1:
                entropy = -(own * own.clamp_min(1e-30).log()).sum(dim=-1) / math.log(tokens)
                entropy_sum += entropy.sum(dtype=torch.float64)
            weights = logits.softmax(dim=-1).unflatten(-1, (batch, tokens)).sum(dim=-1)  # (heads, n, B)
            other_sum += (1.0 - weights[..., i]).sum(dtype=torch.float64)
            count += queries.shape[0] * queries.shape[1]
    entropy_mean = entropy_sum.item() / count if tokens > 1 else math.nan  # one token: nothing to choose from
    return entropy_mean, other_sum.item() / count


class AttentionRecorder:
    """`with AttentionRecorder(model, set_size=4) as rec: ...generate...`, then `rec.summary()`."""

    def __init__(self, model: nn.Module, set_size: int):
        self.unet = find_unet(model)
        self.set_size = set_size
        self.values: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.similarities: dict[str, list[float]] = defaultdict(list)
        self._reading = ExitStack()

    def _read(self, layer: nn.Module, x: torch.Tensor, context: Optional[torch.Tensor], call: object,
              out: torch.Tensor) -> None:
        x = x[-self.set_size:]  # the conditional images: the second half under guidance
        heads = layer.heads
        q = layer.to_q(x).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, N, d)
        k = layer.to_k(x).unflatten(-1, (heads, -1)).transpose(1, 2)
        self.values[layer.tag].append(attention_statistics(q, k, layer.scale))
        self.similarities[layer.tag].append(output_similarity(out[-self.set_size:]))  # (B, N, C)

    def __enter__(self) -> "AttentionRecorder":
        self._reading.enter_context(readers_added([(layer, self._read) for _, layer in tagged_layers(self.unet)]))
        return self

    def __exit__(self, *exc) -> None:
        self._reading.close()

    def summary(self) -> dict[str, dict[str, float]]:
        """group tag (e.g. "up.32") -> {"calls", "entropy", "other_mass", "uniform_other_mass",
        "output_similarity"}, averaged over the group's layers and every call, in the UNet's order."""
        uniform = (self.set_size - 1) / self.set_size
        out = {}
        for tag, values in self.values.items():
            out[tag] = {"calls": len(values), "entropy": sum(v[0] for v in values) / len(values),
                        "other_mass": sum(v[1] for v in values) / len(values), "uniform_other_mass": uniform,
                        "output_similarity": sum(self.similarities[tag]) / len(self.similarities[tag])}
        return out


@torch.no_grad()
def prediction_change(model: nn.Module, latents: torch.Tensor, conditioning: torch.Tensor, tags: list[str],
                      fractions: tuple[float, ...] = (0.25, 0.5, 0.75), seed: int = 0,
                      noise: Optional[torch.Tensor] = None) -> dict[str, float]:
    """tag -> ||eps_shared - eps|| / ||eps||: the relative change of the noise prediction of a set when
    only that group shares (mode "all", strength 0), averaged over timesteps at `fractions` of the
    schedule. The input is the set's `latents` (B, C, h, w) noised to each timestep with one fixed
    `noise` (default: drawn from `seed`)."""
    if noise is None:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(latents)
    changes = dict.fromkeys(tags, 0.0)
    for fraction in fractions:
        t = torch.full((latents.shape[0],), int(fraction * (model.num_timesteps - 1)), device=latents.device)
        x = model.q_sample(latents, t, noise)
        reference = model.apply_model(x, t, conditioning)
        for tag in tags:
            with shared_attention(model, groups=tag):
                shared = model.apply_model(x, t, conditioning)
            changes[tag] += ((shared - reference).norm() / reference.norm()).item() / len(fractions)
    return changes

"""The kernels of batch sharing: which keys and values each query image sees, and one attention over them.

Layouts: q, k, v are (B, heads, N, d) for a batch of `halves` guidance halves, each one sharing group
of G = B / halves consecutive images; grouped tensors are (groups, images, heads, N, d).

Concatenation (modes "all" and "anchor", `shared_batch_attention`): each query image attends to the
concatenated tokens of the images it sees. The concatenation is a regrouping: all queries of a group
attend to all keys of the group in one `scaled_dot_product_attention` call, which computes the same
softmax each query would get alone (a query's softmax only involves its own row); no (B*N) x (B*N)
mask or logits tensor is ever built, so memory stays linear in the group size.

Gathering (subject masks, dropout, "others", "pooled", `attend_own_and_offered`): each image j *offers*
a gathered set of its tokens (its masked / kept / pooled keys and values, M_j of them), and each query
image i attends to [its own N tokens (not in "others"); the offers of the images it sees]. Where the
key sets have different lengths, each query image is its own attention call over exactly its keys (no
padding). What is dropped or masked is never computed: this is where dropout and masks save time.

A `strength` bias on the other images' logits enters as extra query/key channels rather than as a
mask, so the fused attention kernels still apply and memory stays linear.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.attention_kernel import memory_linear_attention


# ---------------------------------------------------------------------------------------------------
# Concatenation
# ---------------------------------------------------------------------------------------------------
def attend_across_images(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                         strength: float = 0.0) -> torch.Tensor:
    """Attention of several query images over the concatenated tokens of several key images.

    q: (G, Iq, heads, N, d) queries of Iq images in each of G independent groups;
    k, v: (G, Ik, heads, M, d) keys and values of Ik images. Query image t's own tokens are key image
    t (t < Iq); the rest are "other" images and get `strength` added to their logits.
    Returns (G, Iq, heads, N, d).

    The concatenation is a regrouping: all Iq*N queries of a group attend to all Ik*M keys of the
    group in one `scaled_dot_product_attention` call, which computes the same softmax each query
    would get alone (a query's softmax only involves its own row). No mask is needed for s = 0.

    For s != 0 the bias depends on which image a query and a key come from. Rather than a
    (Iq*N) x (Ik*M) mask, the bias is written as a dot product of Ik extra channels appended to the
    queries and keys: query image t carries the indicator "key image j is not me" (1 - [j == t]) and
    key image j carries s / scale at channel j, so scale * (extra q . extra k) = s exactly for
    other images and 0 for its own. The extra channels cost Ik values per token, linear memory.
    """
    G, Iq, heads, N, d = q.shape
    Ik = k.shape[1]
    q = rearrange(q, "g i h n d -> g h (i n) d")  # (G, heads, Iq*N, d)
    k = rearrange(k, "g j h m d -> g h (j m) d")  # (G, heads, Ik*M, d)
    v = rearrange(v, "g j h m d -> g h (j m) d")  # (G, heads, Ik*M, d)
    M = k.shape[2] // Ik
    if strength != 0.0:
        own = torch.eye(Iq, Ik, dtype=q.dtype, device=q.device)  # (Iq, Ik): 1 where key image j is query image t
        q_extra = (1.0 - own).repeat_interleave(N, dim=0)  # (Iq*N, Ik)
        k_extra = (torch.eye(Ik, dtype=q.dtype, device=q.device) * (strength / scale)).repeat_interleave(M, dim=0)
        # Pad every head dimension (values included) to one multiple of 8 so fused kernels still apply.
        width = 8 * math.ceil((d + Ik) / 8)
        q = torch.cat([q, q_extra.expand(G, heads, -1, -1)], dim=-1)  # (G, heads, Iq*N, d+Ik)
        k = torch.cat([k, k_extra.expand(G, heads, -1, -1)], dim=-1)  # (G, heads, Ik*M, d+Ik)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))  # (..., width)
    out = memory_linear_attention(q, k, v, scale=scale)[..., :d]  # (G, heads, Iq*N, d)
    return rearrange(out, "g h (i n) d -> g i h n d", i=Iq)


def shared_batch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, halves: int, mode: str,
                           anchors: int, strength: float, scale: float) -> torch.Tensor:
    """Self-attention with each image also seeing its group's images. q, k, v: (B, heads, N, d).

    The batch is `halves` equal halves (2 with classifier-free guidance), each one sharing group.
    """
    B = q.shape[0]
    if B % halves:
        raise ValueError(f"a batch of {B} cannot be split into {halves} guidance halves")
    group = B // halves
    q, k, v = (rearrange(t, "(k b) h n d -> k b h n d", k=halves) for t in (q, k, v))  # (halves, group, heads, N, d)
    if mode == "all" or anchors >= group:
        out = attend_across_images(q, k, v, scale=scale, strength=strength)  # (halves, group, heads, N, d)
        return rearrange(out, "k b h n d -> (k b) h n d")
    # Anchor mode: the anchors share only among themselves, so their result does not depend on the
    # other images at all; each other image sees its own tokens first, then the anchors'.
    anchor_out = attend_across_images(q[:, :anchors], k[:, :anchors], v[:, :anchors], scale=scale,
                                      strength=strength)  # (halves, A, heads, N, d)
    rest = group - anchors

    def own_then_anchors(t: torch.Tensor) -> torch.Tensor:
        shared = t[:, None, :anchors].expand(-1, rest, -1, -1, -1, -1)  # (halves, R, A, heads, N, d)
        own = t[:, anchors:, None]  # (halves, R, 1, heads, N, d)
        return rearrange(torch.cat([own, shared], dim=2), "k r j h n d -> (k r) j h n d")  # (halves*R, 1+A, ...)

    rest_out = attend_across_images(rearrange(q[:, anchors:], "k r h n d -> (k r) 1 h n d"),
                                    own_then_anchors(k), own_then_anchors(v), scale=scale,
                                    strength=strength)  # (halves*R, 1, heads, N, d)
    rest_out = rearrange(rest_out, "(k r) 1 h n d -> k r h n d", k=halves)
    return rearrange(torch.cat([anchor_out, rest_out], dim=1), "k b h n d -> (k b) h n d")


# ---------------------------------------------------------------------------------------------------
# Gathering
# ---------------------------------------------------------------------------------------------------
def others_seen(batch: int, halves: int, mode: str, anchors: int) -> list[list[int]]:
    """For each image of the batch, the other images (batch indices, same half) whose offers it sees:
    every other image of its group, or in "anchor" mode the anchors (an anchor: the other anchors)."""
    group = batch // halves
    seen = []
    for i in range(batch):
        start = (i // group) * group
        members = list(range(start, start + group))
        if mode == "anchor" and anchors < group:
            members = members[:anchors]
        seen.append([j for j in members if j != i])
    return seen


def offers(k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each image's offered tokens: k, v (B, heads, M, d) gathered where keep (B, M) is True (all if None)."""
    if keep is None:
        return list(k.unbind(0)), list(v.unbind(0))
    return ([k[j][:, keep[j]] for j in range(k.shape[0])],  # (heads, M_j, d) each
            [v[j][:, keep[j]] for j in range(v.shape[0])])


def attend_own_and_offered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offered_k: Sequence[torch.Tensor],
                           offered_v: Sequence[torch.Tensor], seen: Sequence[Sequence[int]], *, include_own: bool,
                           strength: float, scale: float) -> torch.Tensor:
    """Query image i attends to [own k_i, v_i (if `include_own`); offered_k[j], offered_v[j] for j in
    seen[i]], with `strength` added to the offered tokens' logits. q, k, v (B, heads, N, d); offers
    (heads, M_j, d). Returns (B, heads, N, d). Every query image must see at least one token.

    When every image sees as many keys (no masks or dropout) the batch is one attention call. Otherwise
    each query image is its own call over exactly its L_i keys: padding the key sets to the longest
    would cost attention FLOPs on keys that are then switched off, and the stacked, padded copies of
    the keys and values (B x longest, plus a wider copy for the padding channel) would raise the peak
    memory of the layer by several times its keys and values."""
    batch, heads, _, d = q.shape
    keys, values = [], []
    for i in range(batch):
        parts_k = ([k[i]] if include_own else []) + [offered_k[j] for j in seen[i]]
        parts_v = ([v[i]] if include_own else []) + [offered_v[j] for j in seen[i]]
        if sum(p.shape[1] for p in parts_k) == 0:
            raise ValueError(f"image {i} would attend to no token at all; keep its own tokens or offer some")
        keys.append(parts_k)
        values.append(parts_v)
    own = k.shape[2] if include_own else 0
    lengths = [sum(p.shape[1] for p in parts) for parts in keys]
    if len(set(lengths)) == 1 and (strength == 0.0 or lengths[0] == own):
        k_all = torch.stack([torch.cat(parts, dim=1) for parts in keys])  # (B, heads, L, d)
        v_all = torch.stack([torch.cat(parts, dim=1) for parts in values])
        return memory_linear_attention(q, k_all, v_all, scale=scale)
    out = q.new_empty(q.shape)  # (B, heads, N, d)
    for i in range(batch):
        out[i] = _own_then_offered(q[i:i + 1], keys[i], values[i], own, strength, scale)[0]
    return out


def _own_then_offered(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], own: int,
                      strength: float, scale: float) -> torch.Tensor:
    """One attention call: q (1, heads, n, d) over the concatenated keys (heads, L_k, d) and values, the
    first `own` of them the query image's own; `strength` is added to the logits of the others.
    Returns (1, heads, n, d)."""
    _, heads, n, d = q.shape
    k_i, v_i = torch.cat(list(keys), dim=1)[None], torch.cat(list(values), dim=1)[None]  # (1, heads, L, d)
    length = k_i.shape[2]
    if strength != 0.0 and length > own:
        # One extra channel: query 1, key 0 (own) or strength / scale (offered), so that
        # scale * (q_extra . k_extra) is the bias; padded to one multiple of 8 so fused kernels apply.
        width = 8 * math.ceil((d + 1) / 8)
        bias = torch.cat([q.new_zeros(own), q.new_full((length - own,), strength / scale)])  # (L,)
        q = F.pad(torch.cat([q, q.new_ones(1, heads, n, 1)], dim=-1), (0, width - d - 1))
        k_i = F.pad(torch.cat([k_i, bias[None, None, :, None].expand(1, heads, -1, 1)], dim=-1), (0, width - d - 1))
        v_i = F.pad(v_i, (0, width - d))
    return memory_linear_attention(q, k_i, v_i, scale=scale)[..., :d]


def attend_within_subjects(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offered_k: Sequence[torch.Tensor],
                           offered_v: Sequence[torch.Tensor], offered_labels: Sequence[torch.Tensor],
                           query_labels: torch.Tensor, seen: Sequence[Sequence[int]], *, strength: float,
                           scale: float) -> torch.Tensor:
    """Isolated subjects: the queries of image i inside subject a's mask (query_labels[i] == a, a >= 1)
    attend to [own k_i, v_i; the tokens labelled a that the images seen[i] offer]; its queries outside
    every mask (label 0) to its own tokens only. q, k, v (B, heads, N, d); offers (heads, M_j, d) with
    their labels (M_j,); query_labels (B, N). Returns (B, heads, N, d).

    Each (image, label) is one attention call over exactly its keys, so no query ever receives weight on
    another subject's tokens, and nothing is padded."""
    batch, _, tokens, _ = q.shape
    out = q.new_empty(q.shape)  # (B, heads, N, d)
    for i in range(batch):
        for label in torch.unique(query_labels[i]).tolist():
            rows = (query_labels[i] == label).nonzero().flatten()  # (n_a,) query tokens of this subject
            keys, values = [k[i]], [v[i]]
            if label > 0:
                for j in seen[i]:
                    chosen = offered_labels[j] == label  # (M_j,)
                    keys.append(offered_k[j][:, chosen])
                    values.append(offered_v[j][:, chosen])
            q_rows = q[i:i + 1, :, rows] if len(rows) < tokens else q[i:i + 1]  # (1, heads, n_a, d)
            attended = _own_then_offered(q_rows, keys, values, tokens, strength, scale)[0]  # (heads, n_a, d)
            if len(rows) < tokens:
                out[i][:, rows] = attended
            else:
                out[i] = attended
    return out

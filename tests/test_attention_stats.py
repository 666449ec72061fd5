"""The self-attention diagnostic (ldm/eval/attention_stats.py, scripts/attention_stats.py).

The statistics are checked against textbook versions written here (full softmax per image and head,
explicit loops over image pairs), on hand-made inputs with known answers, and on what a tiny random
model's self-attention layers actually receive during sampling (captured by hooks of this file), so
that recording the wrong images (both guidance halves), the wrong layer or the wrong average fails.
"""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

from ldm.eval import attention_stats
from ldm.eval.attention_stats import AttentionRecorder, attention_statistics, output_similarity
from ldm.cli import UsageError
from ldm.generation import generate_latents
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.attention import PLAIN
from ldm.sharing import active_run, tagged_layers
from ldm.util import instantiate_from_config
from tests.conftest import TINY_CONFIG, load_script, randomize_


def direct_statistics(q, k, scale):
    """Textbook version: the full (N, B*N) softmax per image and head, no chunking."""
    batch, heads, tokens, _ = q.shape
    entropies, others = [], []
    for i in range(batch):
        for h in range(heads):
            logits = q[i, h] @ torch.cat([k[j, h] for j in range(batch)]).T * scale  # (N, B*N)
            own = torch.softmax(logits[:, i * tokens:(i + 1) * tokens], dim=-1)
            entropies.append((-(own * own.log()).sum(-1) / math.log(tokens)).mean())
            pooled = torch.softmax(logits, dim=-1)
            others.append(1 - pooled[:, i * tokens:(i + 1) * tokens].sum(-1).mean())
    return torch.stack(entropies).mean().item(), torch.stack(others).mean().item()


def test_statistics_match_a_direct_computation_across_query_chunks(monkeypatch):
    monkeypatch.setattr(attention_stats, "QUERY_CHUNK", 3)  # 10 tokens: chunks of 3, 3, 3, 1
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 2, 10, 8, generator=g), torch.randn(3, 2, 10, 8, generator=g)
    got = attention_statistics(q, k, scale=0.7)
    assert got == pytest.approx(direct_statistics(q, k, 0.7), rel=1e-5)


def test_uniform_attention_and_identical_images_give_the_reference_values():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 2, 6, 8, generator=g)
    entropy, other = attention_statistics(q, torch.zeros(4, 2, 6, 8), scale=1.0)  # all logits equal
    assert entropy == pytest.approx(1.0, abs=1e-6) and other == pytest.approx(0.75, abs=1e-6)
    same = torch.randn(1, 2, 6, 8, generator=g).expand(4, -1, -1, -1)  # identical images: equal shares
    entropy, other = attention_statistics(same, same, scale=3.0)
    assert entropy < 0.99 and other == pytest.approx(0.75, abs=1e-6)


def test_queries_that_match_only_their_own_image_keep_their_attention_there():
    tokens = 10 * torch.eye(4)  # 4 tokens, each query matching exactly one key
    q = torch.stack([tokens, -tokens])[:, None]  # (2 images, 1 head, 4, 4); image 1 is image 0 negated
    entropy, other = attention_statistics(q, q.clone(), scale=1.0)
    assert other < 1e-6  # the other image's keys all score -100 or 0 against 100 for the own match
    assert entropy < 0.01  # each query picks one own token


def test_output_similarity_is_the_mean_cosine_between_different_images_at_the_same_token():
    g = torch.Generator().manual_seed(2)
    out = torch.randn(3, 5, 4, generator=g)
    pairs = [torch.nn.functional.cosine_similarity(out[i], out[j], dim=-1).mean()
             for i in range(3) for j in range(3) if i != j]
    assert output_similarity(out) == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-5)
    assert output_similarity(out[:1].expand(3, -1, -1)) == pytest.approx(1.0, abs=1e-6)  # identical images
    assert output_similarity(torch.stack([out[0], -out[0]])) == pytest.approx(-1.0, abs=1e-6)


def test_uniform_attention_over_a_shared_background_gives_nearly_the_same_output_in_every_image():
    """The demo model's case: attention that averages its image outputs the mean value, and when most
    tokens (the background) are the same in every image, that mean is nearly the same too."""
    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(8, 8)
    background = torch.randn(1, 8, generator=g).expand(90, -1)
    images = torch.stack([torch.cat([background, torch.randn(10, 8, generator=g)]) for _ in range(4)])  # (4, 100, 8)
    uniform_out = layer(images.mean(dim=1, keepdim=True).expand(-1, 100, -1))  # attention with equal weights
    own_token_out = layer(images)  # attention that picks each query's own token
    assert output_similarity(uniform_out) > 0.95 > output_similarity(own_token_out)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return randomize_(instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)).eval()


def direct_output_similarity(out):
    """Mean cosine, over ordered pairs of different images, of their outputs at the same token; out (B, N, C)."""
    batch = out.shape[0]
    pairs = [torch.nn.functional.cosine_similarity(out[i], out[j], dim=-1).mean()
             for i in range(batch) for j in range(batch) if i != j]
    return torch.stack(pairs).mean().item()


def test_recorder_averages_the_conditional_images_of_every_call(tiny_model):
    """Reference: hooks that keep what each attn1 receives and returns; statistics of the last `set_size`
    images (the conditional half of the guided batch), averaged over the group's layers and calls."""
    unet = tiny_model.model.diffusion_model
    inputs, outputs = defaultdict(list), defaultdict(list)

    def keep(module, args, out) -> None:
        inputs[module].append(args[0].detach())
        outputs[module].append(out.detach())

    handles = [layer.register_forward_hook(keep) for _, layer in tagged_layers(unet)]
    shape = (tiny_model.channels, tiny_model.image_size, tiny_model.image_size)
    try:
        with AttentionRecorder(tiny_model, set_size=2) as recorder:
            generate_latents(tiny_model, DDIMSampler(tiny_model), ["a chair"] * 2, [0, 1], shape=shape, steps=2,
                             scale=3.0)
    finally:
        for handle in handles:
            handle.remove()
    expected = defaultdict(list)
    for layer, calls in inputs.items():
        for x, out in zip(calls, outputs[layer]):
            assert x.shape[0] == 4  # guided: [unconditional; conditional], 2 images each
            conditional = x[2:]
            q = layer.to_q(conditional).unflatten(-1, (layer.heads, -1)).transpose(1, 2)  # (2, heads, N, d)
            k = layer.to_k(conditional).unflatten(-1, (layer.heads, -1)).transpose(1, 2)
            entropy, other = direct_statistics(q, k, layer.scale) if q.shape[2] > 1 else (math.nan, math.nan)
            expected[layer.tag].append((entropy, other, direct_output_similarity(out[2:])))
    summary = recorder.summary()
    assert list(summary) == list(expected)
    for tag, rows in expected.items():
        entropy, other, similarity = (sum(column) / len(column) for column in zip(*rows))
        if not math.isnan(entropy):
            assert summary[tag]["entropy"] == pytest.approx(entropy, rel=1e-4)
            assert summary[tag]["other_mass"] == pytest.approx(other, rel=1e-4)
        assert summary[tag]["output_similarity"] == pytest.approx(similarity, rel=1e-4, abs=1e-6)
        assert summary[tag]["calls"] == len(rows)


def test_recorder_sees_every_group_at_every_step_and_leaves_no_hooks(tiny_model):
    unet = tiny_model.model.diffusion_model
    shape = (tiny_model.channels, tiny_model.image_size, tiny_model.image_size)
    with AttentionRecorder(tiny_model, set_size=2) as recorder:
        generate_latents(tiny_model, DDIMSampler(tiny_model), ["a chair"] * 2, [0, 1], shape=shape, steps=3, scale=3.0)
    layers_per_tag = {}
    for _, layer in tagged_layers(unet):
        layers_per_tag[layer.tag] = layers_per_tag.get(layer.tag, 0) + 1
    summary = recorder.summary()
    assert {tag: row["calls"] for tag, row in summary.items()} == {t: 3 * n for t, n in layers_per_tag.items()}
    entropies = [row["entropy"] for row in summary.values() if not math.isnan(row["entropy"])]  # NaN: 1 token
    assert entropies and all(0.0 < e <= 1.0 for e in entropies)
    for row in summary.values():
        assert 0.0 <= row["other_mass"] <= 1.0
        assert row["uniform_other_mass"] == 0.5
        assert -1.0 <= row["output_similarity"] <= 1.0
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for _, layer in tagged_layers(unet))


def test_script_reports_every_group_of_a_tiny_checkpoint(tiny_model, tmp_path, capsys):
    ckpt = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(ckpt))
    summary = load_script("attention_stats").main(["--config", str(TINY_CONFIG), "--ckpt", str(ckpt), "--steps", "2",
                                                   "--n_samples", "2", "--seed", "5", "--device", "cpu"])
    tags = list(dict.fromkeys(layer.tag for _, layer in tagged_layers(tiny_model.model.diffusion_model)))
    assert list(summary) == tags
    printed = capsys.readouterr().out
    for tag, row in summary.items():
        assert f"| `{tag}` | {row['calls']} |" in printed and f"| {row['prediction_change']:.4f} |" in printed
    assert "prediction change if shared alone" in printed and "(seeds 5-6)" in printed
    # The same set made here directly (DDIM, seeds 5 and 6, the script's scale): the script's numbers are its.
    from ldm.eval.attention_stats import prediction_change
    shape = (tiny_model.channels, tiny_model.image_size, tiny_model.image_size)
    with AttentionRecorder(tiny_model, set_size=2) as recorder:
        latents = generate_latents(tiny_model, DDIMSampler(tiny_model), ["a chair"] * 2, [5, 6], shape=shape,
                                   steps=2, scale=7.5)
    with torch.no_grad():
        conditioning = tiny_model.get_learned_conditioning(["a chair"] * 2)
    direct = prediction_change(tiny_model, latents, conditioning, tags)
    for tag, row in recorder.summary().items():
        assert summary[tag]["other_mass"] == pytest.approx(row["other_mass"], rel=1e-5)
        assert summary[tag]["prediction_change"] == pytest.approx(direct[tag], rel=1e-4, abs=1e-7)
    assert max(row["prediction_change"] for row in summary.values()) > 1e-3


def test_script_refuses_a_set_of_one():
    with pytest.raises(UsageError, match="--n_samples must be at least 2"):
        load_script("attention_stats").parse_args(["--demo", "--n_samples", "1"])


def test_prediction_change_is_zero_for_identical_images_and_leaves_sharing_off(tiny_model):
    from ldm.eval.attention_stats import prediction_change
    unet = tiny_model.model.diffusion_model
    tags = list(dict.fromkeys(layer.tag for _, layer in tagged_layers(unet)))
    shape = (tiny_model.channels, tiny_model.image_size, tiny_model.image_size)
    with torch.no_grad():
        conditioning = tiny_model.get_learned_conditioning(["a chair"] * 3)
    same = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).expand(3, -1, -1, -1)
    same_noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1)).expand(3, -1, -1, -1)
    changes = prediction_change(tiny_model, same, conditioning, tags, noise=same_noise)
    assert list(changes) == tags and all(abs(c) < 1e-5 for c in changes.values())  # nothing to share
    distinct = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    changes = prediction_change(tiny_model, distinct, conditioning, tags)
    assert all(c >= 0.0 for c in changes.values()) and max(changes.values()) > 1e-3
    assert active_run(unet) is None
    assert all(layer.processor is PLAIN and not layer.readers for _, layer in tagged_layers(unet))


def test_prediction_change_matches_one_shared_forward_pass(tiny_model):
    from ldm.eval.attention_stats import prediction_change
    from ldm.sharing import shared_attention
    tag = tagged_layers(tiny_model.model.diffusion_model)[-1][1].tag
    shape = (tiny_model.channels, tiny_model.image_size, tiny_model.image_size)
    latents = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        conditioning = tiny_model.get_learned_conditioning(["a chair", "a lamp"])
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        t = torch.full((2,), (tiny_model.num_timesteps - 1) // 2)
        x = tiny_model.q_sample(latents, t, noise)
        reference = tiny_model.apply_model(x, t, conditioning)
        with shared_attention(tiny_model, groups=tag):
            shared = tiny_model.apply_model(x, t, conditioning)
    expected = ((shared - reference).norm() / reference.norm()).item()
    assert prediction_change(tiny_model, latents, conditioning, [tag], fractions=(0.5,))[tag] == pytest.approx(expected)

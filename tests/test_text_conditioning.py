"""The text-conditioning measurement: probes, cross-attention reading, sensitivity, script
(ldm/eval/text_probe.py, ldm/eval/cross_attention.py, ldm/eval/text_conditioning.py,
scripts/probe_text_conditioning.py)."""
from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch
from einops import rearrange
from omegaconf import OmegaConf

from ldm.data.synthetic import CLASSES, COLOURS, PATTERNS
from ldm.eval import cross_attention
from ldm.eval.cross_attention import CrossAttentionRecorder, cross_attention_layers, token_attention
from ldm.eval.text_conditioning import conditional_eps, noised_latents, prompt_pairs, relative_change, sensitivity
from ldm.eval.text_probe import (fit_linear_probe, is_held_out, make_prompt, naming_prompts, token_roles,
                                 variance_share)
from ldm.cli import UsageError
from ldm.sharing import tagged_layers
from ldm.util import instantiate_from_config
from tests.conftest import TINY_CONFIG, load_script, randomize_


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return randomize_(instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)).eval()


# ----------------------------------------------------------------------------- probes


def separable_data(seed: int, per_class: int = 10, classes: int = 3, dim: int = 5):
    g = torch.Generator().manual_seed(seed)
    centres = 5.0 * torch.eye(classes, dim)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=g), labels


def test_probe_training_is_deterministic_for_a_seed():
    features, labels = separable_data(0)
    first = fit_linear_probe(features, labels, 3, steps=50, seed=4)
    second = fit_linear_probe(features, labels, 3, steps=50, seed=4)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    other_seed = fit_linear_probe(features, labels, 3, steps=50, seed=5)
    assert not torch.equal(first.weight, other_seed.weight)


def test_probe_reads_a_trivially_separable_label_on_unseen_points():
    train, train_labels = separable_data(0)
    test, test_labels = separable_data(1)
    probe = fit_linear_probe(train, train_labels, 3, steps=200)
    assert probe.accuracy(test, test_labels) == 1.0


def test_probe_on_pure_noise_does_not_read_the_label():
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(4).repeat(50)
    probe = fit_linear_probe(torch.randn(200, 3, generator=g), labels, 4, steps=200)
    assert probe.accuracy(torch.randn(200, 3, generator=g), labels) < 0.4  # chance 0.25


def test_variance_share_is_one_when_features_vary_only_with_the_label_and_zero_when_they_never_do():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert variance_share(torch.randn(3, 4)[labels], labels) == pytest.approx(1.0)
    within = torch.tensor([[1.0], [-1.0]]).repeat(3, 1)  # the same spread inside every group, equal means
    assert variance_share(within, labels) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("attribute,values,other_values", [("colour", COLOURS, PATTERNS), ("pattern", PATTERNS, COLOURS)])
def test_held_out_combinations_leave_every_value_and_class_in_both_halves(attribute, values, other_values):
    prompts = naming_prompts(attribute)  # each class and value, with the other attribute unnamed or named
    assert len({p.text for p in prompts}) == len(prompts) == len(CLASSES) * len(values) * (1 + len(other_values))
    train = [p for p in prompts if not is_held_out(p, attribute)]
    test = [p for p in prompts if is_held_out(p, attribute)]
    for half in (train, test):
        assert {getattr(p, attribute) for p in half} == set(values)
        assert {p.cls for p in half} == set(CLASSES)
    train_pairs = {(p.cls, getattr(p, attribute)) for p in train}
    assert not train_pairs & {(p.cls, getattr(p, attribute)) for p in test}


def test_token_roles_find_the_words_and_partition_the_sequence(tiny_model):
    tokenizer = tiny_model.cond_stage_model.tokenizer
    prompt = make_prompt("chair", colour="orange", pattern="striped")
    assert prompt.text == "an orange striped chair"
    roles = token_roles(tokenizer, prompt, "colour", 77)
    assert roles["start"] == (0,) and roles["attribute"] == (2,) and roles["class"] == (4,)
    assert roles["other"] == (1, 3) and roles["end"] == (5,) and roles["padding"] == tuple(range(6, 77))
    ids = tokenizer("an orange striped chair").input_ids[0]
    assert ids[2] == tokenizer.encode("orange")[0] and ids[5] == tokenizer.eos_id
    assert token_roles(tokenizer, make_prompt("vase", pattern="solid"), "pattern", 77)["attribute"] == (2,)  # "plain"


# ----------------------------------------------------------------------------- cross-attention


def naive_record(q, k, scale, roles, mapped):
    """Textbook version: the full (N, T) softmax per image and head, every reduction written out."""
    batch, heads, pixels, _ = q.shape
    out = {"mass": {}, "entropy": {}, "peak": {}}
    for b in range(batch):
        probs = torch.stack([torch.softmax(q[b, h] @ k[b, h].T * scale, dim=-1) for h in range(heads)])  # (H, N, T)
        for role, positions in roles[b].items():
            out["mass"].setdefault(role, []).append(probs[:, :, list(positions)].sum(-1).mean().item())
        for role in mapped:
            maps = probs[:, :, list(roles[b][role])].sum(-1)  # (H, N)
            dist = maps / maps.sum(-1, keepdim=True)
            out["entropy"].setdefault(role, []).append(
                (-(dist * dist.log()).sum(-1) / math.log(pixels)).mean().item())
            out["peak"].setdefault(role, []).append((maps.max(-1).values / maps.mean(-1)).mean().item())
    return out


def test_token_attention_matches_a_naive_softmax_across_query_chunks(monkeypatch):
    monkeypatch.setattr(cross_attention, "QUERY_CHUNK", 3)  # 10 queries: chunks of 3, 3, 3, 1
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 10, 4, generator=g), torch.randn(2, 2, 7, 4, generator=g)
    roles = [{"start": (0,), "attribute": (1, 2), "class": (3,), "end": (4,), "padding": (5, 6)},
             {"start": (0,), "attribute": (2,), "class": (1, 3), "end": (4,), "padding": (5, 6)}]
    got = token_attention(q, k, 0.8, roles, mapped=("attribute", "class"))
    expected = naive_record(q, k, 0.8, roles, ("attribute", "class"))
    for kind in ("mass", "entropy", "peak"):
        for role, values in expected[kind].items():
            assert getattr(got, kind)[role].tolist() == pytest.approx(values, rel=1e-5)
    total = sum(got.mass.values())
    assert torch.allclose(total, torch.ones(2))  # the roles partition the tokens


def roles_for(prompts, images, tokenizer):
    return [token_roles(tokenizer, p, "colour", 77) for p in prompts for _ in range(images)]


def tiny_inputs(model, prompts):
    images = 2
    x = torch.randn(images * len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.full((x.shape[0],), 500)
    with torch.no_grad():
        context = model.get_learned_conditioning([p.text for p in prompts]).repeat_interleave(images, dim=0)
    return x, t, context, images


def test_recorder_leaves_the_unet_output_bit_identical_and_removes_its_hooks(tiny_model):
    prompts = [make_prompt("chair", colour="red"), make_prompt("lamp", colour="blue")]
    x, t, context, images = tiny_inputs(tiny_model, prompts)
    with torch.no_grad():
        plain = tiny_model.apply_model(x, t, context)
        with CrossAttentionRecorder(tiny_model, mapped=("attribute",)) as recorder:
            recorder.roles = roles_for(prompts, images, tiny_model.cond_stage_model.tokenizer)
            recorded = tiny_model.apply_model(x, t, context)
    assert torch.equal(plain, recorded)
    assert all(len(calls) == 1 for calls in recorder.records.values()) and len(recorder.records) == 16
    assert all(not layer._forward_hooks for _, _, layer in cross_attention_layers(tiny_model))


def test_recorder_reports_the_attention_each_cross_attention_layer_applied(tiny_model):
    """Captured independently: the naive probabilities reproduce the layer's output, and the recorder's
    record equals their reductions."""
    prompts = [make_prompt("vase", colour="green")]
    x, t, context, images = tiny_inputs(tiny_model, prompts)
    name, _, layer = cross_attention_layers(tiny_model)[-1]
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=args[0], c=kwargs["context"],
                                                                                   out=out), with_kwargs=True)
    roles = roles_for(prompts, images, tiny_model.cond_stage_model.tokenizer)
    try:
        with torch.no_grad(), CrossAttentionRecorder(tiny_model, mapped=("attribute", "class")) as recorder:
            recorder.roles = roles
            tiny_model.apply_model(x, t, context)
    finally:
        handle.remove()
    q, k, v = (rearrange(f(seen[key]), "b n (h d) -> b h n d", h=layer.heads)
               for f, key in ((layer.to_q, "x"), (layer.to_k, "c"), (layer.to_v, "c")))
    with torch.no_grad():
        probs = torch.softmax(q @ k.transpose(-1, -2) * layer.scale, dim=-1)  # (B, H, N, T)
        rebuilt = layer.to_out(rearrange(probs @ v, "b h n d -> b n (h d)"))
    assert torch.allclose(rebuilt, seen["out"], atol=1e-5)
    expected = naive_record(q, k, layer.scale, roles, ("attribute", "class"))
    call = recorder.records[name][0]
    for kind in ("mass", "entropy", "peak"):
        for role, values in expected[kind].items():
            assert getattr(call, kind)[role].tolist() == pytest.approx(values, rel=1e-4)


def test_cross_attention_layers_take_the_level_of_their_block(tiny_model):
    unet = tiny_model.model.diffusion_model
    assert [tag for _, tag, _ in cross_attention_layers(tiny_model)] == [layer.tag for _, layer in tagged_layers(unet)]


def test_recorder_summary_groups_layers_by_level_and_ends_with_all(tiny_model):
    prompts = [make_prompt("table", colour="yellow")]
    x, t, context, images = tiny_inputs(tiny_model, prompts)
    with torch.no_grad(), CrossAttentionRecorder(tiny_model, mapped=("attribute",)) as recorder:
        recorder.roles = roles_for(prompts, images, tiny_model.cond_stage_model.tokenizer)
        tiny_model.apply_model(x, t, context)
    summary = recorder.summary()
    tags = list(dict.fromkeys(layer.tag for _, layer in tagged_layers(tiny_model.model.diffusion_model)))
    assert list(summary) == [*tags, "all"] and summary["all"]["layers"] == 16
    masses = [summary["all"][f"mass.{r}"] for r in ("start", "attribute", "class", "other", "end", "padding")]
    assert sum(masses) == pytest.approx(1.0, abs=1e-5)


def test_recorder_without_roles_is_an_error(tiny_model):
    x, t, context, _ = tiny_inputs(tiny_model, [make_prompt("chair")])
    with pytest.raises(ValueError, match="set recorder.roles"), torch.no_grad(), CrossAttentionRecorder(tiny_model):
        tiny_model.apply_model(x, t, context)


# ----------------------------------------------------------------------------- sensitivity


def test_noise_predictions_of_a_batch_of_prompts_equal_one_prompt_at_a_time(tiny_model):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    noised = noised_latents(tiny_model, x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(5)), (250, 750))
    with torch.no_grad():
        contexts = tiny_model.get_learned_conditioning(["a red chair", "a table", ""])
    together = conditional_eps(tiny_model, noised, contexts)
    assert together.shape == (3, 2, 2, 4, 8, 8)
    for p in range(3):
        alone = conditional_eps(tiny_model, noised, contexts[p:p + 1])[0]
        assert torch.allclose(together[p], alone, atol=1e-5)


def test_sensitivity_is_zero_for_identical_prompts_and_positive_for_different_ones(tiny_model):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    noised = noised_latents(tiny_model, x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(7)), (500,))
    with torch.no_grad():
        contexts = tiny_model.get_learned_conditioning(["a red chair", "a red chair", "a blue chair"])
    eps = conditional_eps(tiny_model, noised, contexts)
    assert torch.equal(relative_change(eps[0], eps[1]), torch.zeros(1, 2))
    assert (relative_change(eps[0], eps[2]) > 1e-3).all()
    texts = {text for pairs in prompt_pairs().values() for pair in pairs for text in pair}
    same = {text: eps[0] for text in texts}  # every prompt predicts the same: nothing changes
    rows = sensitivity(same, {text: contexts[:1] for text in texts})
    assert all(row.eps_change == (0.0,) and row.context_change == 0.0 for row in rows)


# ----------------------------------------------------------------------------- script


def test_script_writes_every_table_for_a_tiny_checkpoint_and_never_overwrites(tiny_model, tmp_path, capsys):
    ckpt = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(ckpt))
    out = tmp_path / "report" / "tiny.md"
    args = ["--config", str(TINY_CONFIG), "--ckpt", str(ckpt), "--latents", "1", "--steps", "1",
            "--probe-steps", "20", "--device", "cpu", "--out", str(out)]
    results = load_script("probe_text_conditioning").main(args)
    written = out.read_text()
    assert written.startswith("## Text conditioning of `tiny.safetensors`")
    assert "python scripts/probe_text_conditioning.py --config" in written
    for heading in ("### 1.", "### 2a.", "### 2b.", "Colour prompts", "Pattern prompts", "| `up.64` |"):
        assert heading in written
    assert written in capsys.readouterr().out
    assert len(results.probes) == 10 and results.timesteps == (249, 499, 749)
    with pytest.raises(UsageError, match="never overwrites"):
        load_script("probe_text_conditioning").main(args)


def test_script_refuses_a_model_without_the_clip_text_encoder(tmp_path):
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.cond_stage_config.target = "ldm.modules.encoders.modules.SomethingElse"
    path = tmp_path / "other.yaml"
    OmegaConf.save(config, path)
    with pytest.raises(UsageError, match="needs ldm.modules.encoders.modules.FrozenCLIPEmbedder"):
        load_script("probe_text_conditioning").check_text_encoder_config(path)

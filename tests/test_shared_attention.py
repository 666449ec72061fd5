"""Batch-shared self-attention, as specified in ldm/sharing/__init__.py.

Two kinds of checks: the attention maths against a naive reference that builds the full logits
matrix with an explicit bias (independent of the regrouping and extra-channel tricks), and invariants
of the whole tiny UNet (identical images, batch of one, guidance halves, anchors, layer selection).
"""
from __future__ import annotations

import math

from fractions import Fraction

import pytest
import torch

from ldm.modules.attention import PLAIN, readers_added
from ldm.modules.step_context import StepContext
from ldm.sharing import SharingProcessor, active_run, describe_layers, shared_attention
from ldm.sharing.kernels import attend_across_images, shared_batch_attention

SCALE = 8 ** -0.5


def naive_shared_attention(q, k, v, *, halves, mode, anchors, strength):
    """Reference: for each query image, the list of visible images, full logits, explicit bias."""
    B, heads, N, d = q.shape
    group = B // halves
    out = torch.empty_like(q)
    for i in range(B):
        start = (i // group) * group
        members = list(range(start, start + group))
        if mode == "anchor" and anchors < group:
            anchor_ids = members[:anchors]
            visible = anchor_ids if i in anchor_ids else [i] + anchor_ids
        else:
            visible = members
        keys = torch.cat([k[j] for j in visible], dim=1)  # (heads, |visible|*N, d)
        values = torch.cat([v[j] for j in visible], dim=1)
        bias = torch.cat([torch.full((N,), 0.0 if j == i else strength) for j in visible])
        logits = q[i] @ keys.transpose(-1, -2) * SCALE + bias  # (heads, N, |visible|*N)
        out[i] = logits.softmax(-1) @ values
    return out


def random_qkv(B, heads=2, N=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, heads, N, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("mode,anchors", [("all", 1), ("anchor", 1), ("anchor", 2)])
@pytest.mark.parametrize("halves", [1, 2])
@pytest.mark.parametrize("strength", [0.0, -2.5, 3.0])
def test_shared_attention_maths_matches_a_naive_reference(mode, anchors, halves, strength):
    q, k, v = random_qkv(4 * halves)
    ours = shared_batch_attention(q, k, v, halves=halves, mode=mode, anchors=anchors, strength=strength, scale=SCALE)
    reference = naive_shared_attention(q, k, v, halves=halves, mode=mode, anchors=anchors, strength=strength)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_large_positive_strength_attends_only_to_the_other_images():
    q, k, v = random_qkv(3)
    ours = attend_across_images(q[None], k[None], v[None], scale=SCALE, strength=1000.0)[0]
    others_of_0 = torch.cat([k[1], k[2]], dim=1), torch.cat([v[1], v[2]], dim=1)
    expected = torch.softmax(q[0] @ others_of_0[0].transpose(-1, -2) * SCALE, -1) @ others_of_0[1]
    torch.testing.assert_close(ours[0], expected)


def test_batch_sizes_that_do_not_split_into_halves_are_an_error():
    q, k, v = random_qkv(3)
    with pytest.raises(ValueError, match="cannot be split into 2 guidance halves"):
        shared_batch_attention(q, k, v, halves=2, mode="all", anchors=1, strength=0.0, scale=SCALE)


# ---- the whole tiny UNet ---------------------------------------------------------------------------
def unet_inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)  # (B, C, H, W)
    t = torch.full((batch,), 500)
    context = torch.randn(batch, 77, 32, generator=g)
    return x, t, context


@torch.no_grad()
def run(unet, x, t, context, halves=1, progress=None):
    """One UNet call with its step context: `halves` guidance halves, at step `progress` (a fraction of
    the steps, written as step index / steps; None: outside a sampler)."""
    step_index = total = None
    if progress is not None:
        fraction = Fraction(progress).limit_denominator(1000)
        step_index, total = fraction.numerator, fraction.denominator
    step = StepContext(halves=halves, step_index=step_index, total_steps=total, latent_size=tuple(x.shape[-2:]))
    assert step.progress == progress
    return unet(x, t, context=context, step=step)


def is_plain(layer) -> bool:
    """The layer computes its own attention and nothing reads it."""
    return layer.processor is PLAIN and not layer.readers


def test_leaving_the_controller_restores_a_bit_identical_model(tiny_unet):
    x, t, c = unet_inputs(3)
    before = run(tiny_unet, x, t, c)
    with shared_attention(tiny_unet, groups="all"):
        shared = run(tiny_unet, x, t, c)
    after = run(tiny_unet, x, t, c)
    assert torch.equal(before, after)
    assert not torch.allclose(before, shared)  # the mode did something while it was on
    assert all(is_plain(layer) for layer in tiny_unet.self_attention_layers())
    assert active_run(tiny_unet) is None


def test_controller_restores_the_model_after_an_exception(tiny_unet):
    with pytest.raises(RuntimeError, match="boom"):
        with shared_attention(tiny_unet, groups="up"):
            raise RuntimeError("boom")
    assert all(is_plain(layer) for layer in tiny_unet.self_attention_layers())


def test_identical_images_with_sharing_equal_the_plain_model(tiny_unet):
    x, t, c = unet_inputs(1)
    x, t, c = x.repeat(4, 1, 1, 1), t.repeat(4), c.repeat(4, 1, 1)
    plain = run(tiny_unet, x, t, c)
    with shared_attention(tiny_unet, groups="all"):
        shared = run(tiny_unet, x, t, c)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)


def test_a_batch_of_one_with_sharing_equals_the_plain_model(tiny_unet):
    x, t, c = unet_inputs(1)
    plain = run(tiny_unet, x, t, c)
    with shared_attention(tiny_unet, groups="all", strength=2.0):
        shared = run(tiny_unet, x, t, c)
    torch.testing.assert_close(shared, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups", ["all", "mid", "up.64", "down.16"])
def test_changing_one_image_changes_another_only_when_sharing(tiny_unet, groups):
    x, t, c = unet_inputs(2)
    x_changed = x.clone()
    x_changed[1] += 1.0
    plain, plain_changed = run(tiny_unet, x, t, c), run(tiny_unet, x_changed, t, c)
    assert torch.equal(plain[0], plain_changed[0])  # without sharing, images are independent
    with shared_attention(tiny_unet, groups=groups):
        shared, shared_changed = run(tiny_unet, x, t, c), run(tiny_unet, x_changed, t, c)
    assert not torch.allclose(shared[0], shared_changed[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("groups,expected", [
    ("all", 16), ("down", 6), ("mid", 1), ("up", 9), ("down.64", 2), ("up.32", 3), ("32", 5),
    ("mid,up", 10), ("up.32,up.16", 6),
])
def test_exactly_the_selected_layers_are_shared(tiny_unet, groups, expected):
    shared_calls = []

    def count(layer, x, context, call, out):
        if isinstance(layer.processor, SharingProcessor) and layer.processor.run.applies(call.step):
            shared_calls.append(layer.tag)

    x, t, c = unet_inputs(2)
    with readers_added([(layer, count) for layer in tiny_unet.self_attention_layers()]):
        with shared_attention(tiny_unet, groups=groups) as controller:
            run(tiny_unet, x, t, c)
    assert len(shared_calls) == expected == len(controller.layers)
    names = {g.strip() for g in groups.split(",")}
    assert all(names & {"all", tag, tag.split(".")[0], tag.split(".")[1]} for tag in shared_calls)


def test_guidance_halves_never_share_with_each_other(tiny_unet):
    x, t, c = unet_inputs(4)  # [uncond 0, uncond 1, cond 0, cond 1]
    x_uncond_changed, c_uncond_changed = x.clone(), c.clone()
    x_uncond_changed[:2] += 1.0
    c_uncond_changed[:2] = torch.randn_like(c[:2])
    with shared_attention(tiny_unet, groups="all"):
        eps = run(tiny_unet, x, t, c, halves=2)
        eps_changed = run(tiny_unet, x_uncond_changed, t, c_uncond_changed, halves=2)
        x_cond_changed = x.clone()
        x_cond_changed[2:] -= 1.0
        eps_cond_changed = run(tiny_unet, x_cond_changed, t, c, halves=2)
    torch.testing.assert_close(eps_changed[2:], eps[2:], rtol=0, atol=1e-6)  # conditional half unchanged
    torch.testing.assert_close(eps_cond_changed[:2], eps[:2], rtol=0, atol=1e-6)  # and vice versa
    assert not torch.allclose(eps_changed[:2], eps[:2])


def test_cross_attention_computation_is_untouched(tiny_unet):
    records = []

    def record(module, args, kwargs, output):
        records.append((module, args[0].clone(), kwargs.get("context"), output.clone()))

    cross = [m.attn2 for m in tiny_unet.modules() if hasattr(m, "attn2")]
    handles = [m.register_forward_hook(record, with_kwargs=True) for m in cross]
    x, t, c = unet_inputs(3)
    with shared_attention(tiny_unet, groups="all"):
        run(tiny_unet, x, t, c)
        assert all(is_plain(m) for m in cross)
    for h in handles:
        h.remove()
    assert len(records) == 16
    with torch.no_grad():
        for module, inputs, context, output in records:
            assert torch.equal(module(inputs, context=context), output)


def test_anchor_images_come_out_as_if_generated_alone(tiny_unet):
    x, t, c = unet_inputs(5)
    with shared_attention(tiny_unet, groups="all", mode="all"):
        anchors_alone = run(tiny_unet, x[:2], t[:2], c[:2])
    with shared_attention(tiny_unet, groups="all", mode="anchor", anchors=2):
        with_followers = run(tiny_unet, x, t, c)
    # batch 5 vs batch 2 runs different GEMM tilings: equal up to float32 rounding
    torch.testing.assert_close(with_followers[:2], anchors_alone, rtol=1e-4, atol=1e-5)


def test_anchor_mode_respects_guidance_halves(tiny_unet):
    x, t, c = unet_inputs(6)  # two halves of 3: anchor + 2 followers each
    with shared_attention(tiny_unet, groups="all", mode="anchor", anchors=1):
        both = run(tiny_unet, x, t, c, halves=2)
    with shared_attention(tiny_unet, groups="all", mode="anchor", anchors=1):
        cond_alone = run(tiny_unet, x[3:], t[3:], c[3:])
    torch.testing.assert_close(both[3:], cond_alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window, outside, inside", [
    ((0.0, 0.4), 0.4, 0.2),  # the end is excluded
    ((0.5, 1.0), 0.25, 0.5),  # the start is included, and nothing before it shares
])
def test_step_window_shares_from_its_start_up_to_its_end(tiny_unet, window, outside, inside):
    x, t, c = unet_inputs(2)
    plain = run(tiny_unet, x, t, c)
    with shared_attention(tiny_unet, groups="all", steps=window):
        off = run(tiny_unet, x, t, c, progress=outside)
        on = run(tiny_unet, x, t, c, progress=inside)
    assert torch.equal(off, plain)
    assert not torch.allclose(on, plain)


@pytest.mark.parametrize("window, total, selected", [
    ((0.0, 1.0), 4, [0, 1, 2, 3]),
    ((0.25, 0.75), 4, [1, 2]),  # progress 0.25 and 0.5; 0.75 is the end, excluded
    ((0.6, 0.9), 2, []),  # steps at progress 0 and 0.5: neither is inside
    ((0.0, 0.4), 2, [0]),
])
def test_steps_in_window_lists_the_steps_the_window_selects(window, total, selected):
    from ldm.sharing import SharedAttentionSettings
    assert SharedAttentionSettings(steps=window).steps_in_window(total) == selected


def test_very_negative_strength_equals_off(tiny_unet):
    x, t, c = unet_inputs(3)
    plain = run(tiny_unet, x, t, c)
    with shared_attention(tiny_unet, groups="all", strength=-1000.0):
        nearly_off = run(tiny_unet, x, t, c)
    with shared_attention(tiny_unet, groups="all", strength=-math.inf):
        off = run(tiny_unet, x, t, c)
    # Not bit-identical: the bias runs through extra, padded key channels, so the kernel sums differently.
    torch.testing.assert_close(nearly_off, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(off, plain)


def test_unknown_group_names_are_an_error_listing_the_valid_ones(tiny_unet):
    with pytest.raises(ValueError, match=r"unknown shared-attention group\(s\) 'up.128'.*valid names: all, down, mid, up"):
        shared_attention(tiny_unet, groups="up,up.128")


@pytest.mark.parametrize("kwargs, field, message", [
    ({"mode": "some"}, "mode", "unknown shared-attention mode"),
    ({"anchors": 0}, "anchors", "anchors must be at least 1"),
    ({"steps": (0.5, 0.5)}, "steps", "step window"),
    ({"steps": (0.0, 1.5)}, "steps", "step window"),
    ({"groups": ""}, "groups", "no layer groups"),
    ({"strength": math.nan}, "strength", "strength"),
    ({"strength": math.inf}, "strength", "strength"),
])
def test_bad_settings_are_value_errors_naming_the_setting(tiny_unet, kwargs, field, message):
    from ldm.errors import InvalidValue
    with pytest.raises(InvalidValue, match=message) as error:
        shared_attention(tiny_unet, **kwargs)
    assert isinstance(error.value, ValueError) and error.value.field == field


def test_help_lists_every_group_and_layer(tiny_unet):
    text = describe_layers(tiny_unet)
    for tag in ("down.64", "down.32", "down.16", "mid.8", "up.16", "up.32", "up.64"):
        assert tag in text
    assert "middle_block.1.transformer_blocks.0.attn1" in text

"""Subject-aware sharing and the study's variants (ldm/sharing/: kernels.py, transforms.py, masks.py):
the gathered kernel against a naive reference that masks the full logits matrix,
the invariants the maths promises on the whole tiny UNet, the masks, dropout's seeding and the settings.
"""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIG
from ldm.errors import InvalidValue
from ldm.modules.cross_attention_read import token_probability_map
from ldm.modules.step_context import StepContext
from ldm.sharing import SharedAttentionSettings, shared_attention
from ldm.sharing.kernels import attend_own_and_offered, offers, others_seen, shared_batch_attention
from ldm.sharing.masks import otsu_mask, resize_mask
from ldm.sharing.subject_words import subject_token_positions
from ldm.sharing.transforms import adain_to_group_reference, blend_with_group_mean, pool_tokens

SCALE = 8 ** -0.5
GRID = (3, 4)  # an odd side, so pooling meets a partial window


def random_qkv(B, heads=2, N=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, heads, N, d, generator=g, dtype=torch.float64) for _ in range(3)]


# ---- naive references, written for clarity ----------------------------------------------------------
def naive_pool(t, grid):
    """2x2 blocks of the (h, w) token grid averaged over the cells each block has."""
    h, w = grid
    B, heads, _, d = t.shape
    image = t.reshape(B, heads, h, w, d)
    rows = []
    for top in range(0, h, 2):
        for left in range(0, w, 2):
            rows.append(image[:, :, top:top + 2, left:left + 2].reshape(B, heads, -1, d).mean(dim=2))
    return torch.stack(rows, dim=2)


def naive_adain(t, halves):
    out = t.clone()
    group = t.shape[0] // halves
    for i in range(t.shape[0]):
        ref = (i // group) * group
        if i == ref:
            continue
        for h in range(t.shape[1]):
            for c in range(t.shape[3]):
                x, r = t[i, h, :, c], t[ref, h, :, c]
                x_std = ((x - x.mean()) ** 2).mean().sqrt() + 1e-5
                r_std = ((r - r.mean()) ** 2).mean().sqrt() + 1e-5
                out[i, h, :, c] = (x - x.mean()) / x_std * r_std + r.mean()
    return out


def naive_variant(q, k, v, *, halves, mode, anchors=1, strength=0.0, keep=None, grid=GRID):
    """Every image's keys concatenated once; what query image i may not see gets -inf in its logits."""
    B, heads, N, d = q.shape
    group = B // halves
    offered_k, offered_v = (naive_pool(k, grid), naive_pool(v, grid)) if mode == "pooled" else (k, v)
    M = offered_k.shape[2]
    keep = torch.ones(B, M, dtype=torch.bool) if keep is None else keep
    out = torch.empty_like(q)
    for i in range(B):
        members = list(range((i // group) * group, (i // group + 1) * group))
        seen = members[:anchors] if mode == "anchor" and anchors < group else members
        keys = [k[i]] + [offered_k[j] for j in range(B)]
        values = [v[i]] + [offered_v[j] for j in range(B)]
        bias = [torch.full((N,), -torch.inf if mode == "others" else 0.0, dtype=q.dtype)]
        for j in range(B):
            visible = (j in seen) and j != i
            bias.append(torch.where(keep[j] & visible, torch.tensor(strength, dtype=q.dtype),
                                    torch.tensor(-torch.inf, dtype=q.dtype)))
        logits = q[i] @ torch.cat(keys, 1).transpose(-1, -2) * SCALE + torch.cat(bias)
        out[i] = logits.softmax(-1) @ torch.cat(values, 1)
    return out


def gathered(q, k, v, *, halves, mode, anchors=1, strength=0.0, keep=None, grid=GRID):
    offered_k, offered_v = k, v
    if mode == "pooled":
        (offered_k, _), (offered_v, _) = pool_tokens(k, grid), pool_tokens(v, grid)
    ok, ov = offers(offered_k, offered_v, keep)
    return attend_own_and_offered(q, k, v, ok, ov, others_seen(q.shape[0], halves, mode, anchors),
                                  include_own=mode != "others", strength=strength, scale=SCALE)


# ---- the kernels ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,anchors", [("all", 1), ("anchor", 2), ("others", 1), ("pooled", 1)])
@pytest.mark.parametrize("halves", [1, 2])
@pytest.mark.parametrize("strength", [0.0, 1.5])
@pytest.mark.parametrize("masked", [False, True])
def test_gathered_kernel_matches_a_naive_masked_reference(mode, anchors, halves, strength, masked):
    q, k, v = random_qkv(3 * halves)
    M = 12 if mode != "pooled" else 4
    keep = None
    if masked:
        keep = torch.rand(q.shape[0], M, generator=torch.Generator().manual_seed(1)) < 0.5
        keep[:, 0] = True  # "others" needs something to see
    ours = gathered(q, k, v, halves=halves, mode=mode, anchors=anchors, strength=strength, keep=keep)
    reference = naive_variant(q, k, v, halves=halves, mode=mode, anchors=anchors, strength=strength, keep=keep)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["all", "anchor"])
def test_an_all_ones_mask_equals_plain_sharing(mode):
    q, k, v = random_qkv(6)
    keep = torch.ones(6, 12, dtype=torch.bool)
    ours = gathered(q, k, v, halves=2, mode=mode, keep=keep, strength=0.7)
    plain = shared_batch_attention(q, k, v, halves=2, mode=mode, anchors=1, strength=0.7, scale=SCALE)
    torch.testing.assert_close(ours, plain, rtol=1e-10, atol=1e-10)


def test_a_mask_selecting_nothing_equals_no_sharing():
    q, k, v = random_qkv(4)
    ours = gathered(q, k, v, halves=1, mode="all", keep=torch.zeros(4, 12, dtype=torch.bool))
    alone = torch.softmax(q @ k.transpose(-1, -2) * SCALE, -1) @ v
    torch.testing.assert_close(ours, alone, rtol=1e-10, atol=1e-10)


def test_pooling_averages_each_2x2_block_of_the_token_grid():
    _, k, _ = random_qkv(2)
    pooled, grid = pool_tokens(k, GRID)
    assert grid == (2, 2)
    torch.testing.assert_close(pooled, naive_pool(k, GRID))


@pytest.mark.parametrize("halves", [1, 2])
def test_adain_matches_a_naive_per_channel_normalisation(halves):
    q, _, _ = random_qkv(4)
    ours = adain_to_group_reference(q, halves)
    torch.testing.assert_close(ours, naive_adain(q, halves), rtol=1e-9, atol=1e-9)
    group = 4 // halves
    assert torch.equal(ours[::group], q[::group])  # each group's reference is left as it was


def test_mean_mode_blends_each_image_with_its_group_mean():
    _, k, _ = random_qkv(4)
    ours = blend_with_group_mean(k, halves=2)
    expected = torch.stack([(k[(i // 2) * 2:(i // 2) * 2 + 2].mean(0) + 2 * k[i]) / 3 for i in range(4)])
    torch.testing.assert_close(ours, expected)


# ---- masks --------------------------------------------------------------------------------------------
def naive_otsu(values):
    """Every distinct value as threshold; the between-class variance computed from the two classes."""
    best, best_threshold = -1.0, None
    for t in sorted(set(values.flatten().tolist()))[1:]:
        fg, bg = values[values >= t], values[values < t]
        between = fg.numel() * bg.numel() * (fg.mean() - bg.mean()) ** 2
        if between > best:
            best, best_threshold = between, t
    return values >= best_threshold


def test_otsu_mask_matches_a_brute_force_search():
    for seed in range(5):
        values = torch.rand(8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 3
        assert torch.equal(otsu_mask(values), naive_otsu(values))


def test_a_constant_map_gives_an_empty_mask():
    assert not otsu_mask(torch.full((4, 4), 0.3)).any()


def test_the_mask_of_a_hand_made_cross_attention_map():
    # 16 queries on a 4x4 grid, 5 text tokens; the subject is token 2. Queries in the top-left 2x3
    # block point at the subject's key, the others at token 4.
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:2, :3] = True
    keys = torch.eye(5)[None, None] * 4.0  # (1, 1, T=5, d=5)
    queries = torch.where(region.flatten()[:, None], torch.eye(5)[2], torch.eye(5)[4])[None, None]  # (1, 1, 16, 5)
    probability = token_probability_map(queries, keys, 1.0, [(2,)], chunk=5)  # (1, 16), chunks of 5 queries
    expected = torch.softmax(queries[0, 0] @ keys[0, 0].T, -1)[:, 2]
    torch.testing.assert_close(probability[0], expected)
    assert torch.equal(otsu_mask(probability[0].reshape(4, 4)), region)


def test_masks_are_resized_to_a_layer_grid_by_majority_of_covered_cells():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # one 2x2 cell fully covered
    mask[0, 2, 2] = True  # a quarter of another: not enough
    assert resize_mask(mask, (2, 2)).tolist() == [[True, False, False, False]]
    assert resize_mask(mask, (8, 8)).sum() == 4 * 5  # upsampled: every covered cell becomes 4 tokens


def test_subject_tokens_are_found_in_each_prompt_and_a_missing_word_names_the_image():
    from ldm.modules.encoders.tokenizer import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_default()
    positions = subject_token_positions(tokenizer, ["a red chair", "a chair and a lamp"], [("chair", "lamp")])
    assert positions == [[(3,), (2, 5)]]
    with pytest.raises(InvalidValue, match=r"image 1 \('a table'\)") as error:
        subject_token_positions(tokenizer, ["a chair", "a table"], [("chair",)])
    assert error.value.field == "subjects"


# ---- the whole tiny UNet ------------------------------------------------------------------------------
def unet_inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.full((batch,), 500), torch.randn(batch, 77, 32, generator=g)


@torch.no_grad()
def run(unet, x, t, c, halves=1):
    """One UNet call outside a sampler (no step), with `halves` guidance halves."""
    return unet(x, t, context=c, step=StepContext(halves=halves, latent_size=tuple(x.shape[-2:])))


SUBJECT = dict(subjects="chair", subject_positions=[(2,)] * 4)


@pytest.mark.parametrize("options", [dict(mode="others"), dict(mode="mean"), dict(adain=True),
                                     dict(adain=True, mode="anchor")])
def test_identical_images_stay_unchanged_where_the_maths_says_so(tiny_unet, options):
    x, t, c = unet_inputs(1)
    x, t, c = x.repeat(4, 1, 1, 1), t.repeat(4), c.repeat(4, 1, 1)
    plain = run(tiny_unet, x, t, c)
    with shared_attention(tiny_unet, groups="all", **options):
        shared = run(tiny_unet, x, t, c)
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [dict(mode="others"), dict(mode="pooled"), dict(mode="mean"), dict(adain=True),
                                     dict(dropout=0.5), SUBJECT])
def test_every_variant_changes_the_images(tiny_unet, options):
    x, t, c = unet_inputs(4)
    plain = run(tiny_unet, x, t, c)
    with shared_attention(tiny_unet, groups="all", **options):
        run(tiny_unet, x, t, c)  # a first call, so a subject mask exists
        shared = run(tiny_unet, x, t, c)
    assert not torch.allclose(shared, plain, rtol=1e-4, atol=1e-4)


def test_subject_masks_share_nothing_before_the_first_mask_and_leave_cross_attention_bit_identical(tiny_unet):
    records = []
    cross = [m.attn2 for m in tiny_unet.modules() if hasattr(m, "attn2")]
    handles = [m.register_forward_hook(lambda mod, a, kw, out: records.append((mod, a[0], kw["context"], out)),
                                       with_kwargs=True) for m in cross]
    x, t, c = unet_inputs(4)
    plain = run(tiny_unet, x, t, c)
    records.clear()
    with shared_attention(tiny_unet, groups="up", **SUBJECT) as controller:
        first = run(tiny_unet, x, t, c)
        second = run(tiny_unet, x, t, c)
        assert controller.run.masks.ready and controller.run.masks.latent_mask().shape == (4, 16, 16)
    for h in handles:
        h.remove()
    assert torch.equal(first, plain)  # no mask at the first call: no sharing, and reading changed nothing
    assert not torch.allclose(second, plain)
    with torch.no_grad():
        for module, inputs, context, output in records:
            assert torch.equal(module(inputs, context=context), output)
    assert all(not m.readers for m in cross)  # the mask readers are gone on exit


def test_seeded_dropout_reproduces_and_differs_between_seeds(tiny_unet):
    x, t, c = unet_inputs(3)
    outputs = []
    for seed in (7, 7, 8):
        with shared_attention(tiny_unet, groups="all", dropout=0.5, seed=seed):
            outputs.append(torch.stack([run(tiny_unet, x, t, c) for _ in range(2)]))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2])
    assert not torch.allclose(outputs[0][0], outputs[0][1])  # redrawn at every call


@pytest.mark.parametrize("options", [dict(mode="pooled"), dict(mode="others"), dict(mode="mean"), dict(adain=True),
                                     dict(dropout=0.5, subjects="chair", subject_positions=[(2,)] * 2)])
def test_guidance_halves_never_mix_under_any_variant(tiny_unet, options):
    x, t, c = unet_inputs(4)  # [uncond 0, uncond 1, cond 0, cond 1]
    changed_x, changed_c = x.clone(), c.clone()
    changed_x[:2] += 1.0
    changed_c[:2] = torch.randn_like(c[:2])
    outputs = []
    for inputs in ((x, c), (changed_x, changed_c)):
        with shared_attention(tiny_unet, groups="all", seed=3, **options):
            run(tiny_unet, x, t, c, halves=2)  # the same first call (and mask) for both
            outputs.append(run(tiny_unet, inputs[0], t, inputs[1], halves=2))
    torch.testing.assert_close(outputs[1][2:], outputs[0][2:], rtol=0, atol=1e-6)
    assert not torch.allclose(outputs[1][:2], outputs[0][:2])


@pytest.mark.parametrize("kwargs, field, message", [
    ({"dropout": 1.0}, "dropout", "0 <= p < 1"),
    ({"dropout": -0.1}, "dropout", "0 <= p < 1"),
    ({"subjects": (("red chair",),)}, "subjects", "single words"),
    ({"mode": "others", "subjects": "chair"}, "subjects", "nothing to attend to"),
    ({"mode": "mean", "dropout": 0.5}, "dropout", "no other images' tokens"),
    ({"mode": "mean", "strength": 1.0}, "strength", "nothing|no other images' keys"),
])
def test_bad_variant_settings_are_errors_naming_the_setting(kwargs, field, message):
    with pytest.raises(InvalidValue, match=message) as error:
        SharedAttentionSettings(**kwargs)
    assert error.value.field == field


def test_subject_masks_need_the_prompts_or_the_token_positions(tiny_unet):
    with pytest.raises(ValueError, match="token positions"):
        shared_attention(tiny_unet, subjects="chair")


def test_generation_with_subject_masks_records_every_option_in_the_metadata(tiny_ckpt):
    from ldm.generation import GenerationRequest, generate, load_model
    model = load_model(TINY_CONFIG, tiny_ckpt)
    settings = SharedAttentionSettings(groups=("up",), subjects=(("chair",),), dropout=0.25, adain=True)
    request = GenerationRequest(prompt=("a chair", "a red chair"), batch_size=2, steps=3, scale=2.0, seed=5,
                                sharing=settings)
    first, second = generate(model, request), generate(model, request)
    assert [a.tobytes() for a in first.images] == [b.tobytes() for b in second.images]
    meta = first.samples[0].metadata["shared_attention"]
    assert (meta["subject"], meta["dropout"], meta["adain"], meta["mode"]) == ("chair", 0.25, True, "all")
    with pytest.raises(InvalidValue, match=r"image 1 \('a table'\)"):
        GenerationRequest(prompt=("a chair", "a table"), batch_size=2, sharing=settings)


@pytest.mark.parametrize("spec, expected", [
    ("up@mask@drop=0.5", dict(groups=("up",), subjects=(("chair", "table", "lamp", "vase", "face"),),
                               dropout=0.5)),
    ("up@subject=chair/lamp@adain", dict(groups=("up",), subjects=(("chair", "lamp"),), adain=True)),
    ("up@pooled", dict(groups=("up",), mode="pooled")),
    ("all@mean", dict(mode="mean")),
])
def test_the_harness_names_every_variant(spec, expected):
    from ldm.eval.configurations import parse_configuration
    assert parse_configuration(spec).sharing == SharedAttentionSettings(**expected)

"""Several subjects (ldm/sharing: subject_words.py, masks.py, kernels.attend_within_subjects, run.py):
isolated sharing against a naive reference that masks the full logits matrix, the invariants it
promises, the labels that masks become, and the subjects' words in the prompts."""
from __future__ import annotations

import pytest
import torch

from ldm.errors import InvalidValue
from ldm.modules.step_context import StepContext
from ldm.sharing import SharedAttentionSettings, shared_attention
from ldm.sharing.kernels import attend_within_subjects, offers, others_seen
from ldm.sharing.masks import SubjectMasks, label_masks, resize_labels, resize_mask
from ldm.sharing.subject_words import check_prompts_name_subjects, per_subject, subject_token_positions

SCALE = 8 ** -0.5


def random_qkv(batch, tokens=6, heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, tokens, d, generator=g, dtype=torch.float64) for _ in range(3))


def naive_isolated(q, k, v, labels, keep, seen, strength):
    """Query (i, n) of label a > 0 over [all of image i; tokens of label a kept in the images seen[i]],
    label 0 over image i alone, with `strength` on the others' logits: an explicit softmax per query."""
    batch, heads, tokens, _ = q.shape
    out = torch.zeros_like(q)
    for i in range(batch):
        for n in range(tokens):
            a = int(labels[i, n])
            keys, values, bias = [k[i]], [v[i]], [torch.zeros(tokens, dtype=q.dtype)]
            if a > 0:
                for j in seen[i]:
                    chosen = (labels[j] == a) & keep[j]
                    keys.append(k[j][:, chosen])
                    values.append(v[j][:, chosen])
                    bias.append(torch.full((int(chosen.sum()),), strength, dtype=q.dtype))
            logits = torch.einsum("hd,hld->hl", q[i, :, n], torch.cat(keys, dim=1)) * SCALE + torch.cat(bias)
            out[i, :, n] = torch.einsum("hl,hld->hd", logits.softmax(dim=-1), torch.cat(values, dim=1))
    return out


def kernel(q, k, v, labels, keep, seen, strength=0.0):
    offered = labels * keep
    offered_k, offered_v = offers(k, v, offered > 0)
    return attend_within_subjects(q, k, v, offered_k, offered_v, [row[row > 0] for row in offered], labels, seen,
                                  strength=strength, scale=SCALE)


LABELS = torch.tensor([[1, 1, 2, 0, 0, 2], [0, 2, 2, 1, 0, 0], [1, 0, 0, 0, 2, 1], [2, 2, 0, 0, 1, 1]])


@pytest.mark.parametrize("mode, anchors", [("all", 1), ("anchor", 1), ("anchor", 2)])
@pytest.mark.parametrize("strength", [0.0, -1.5, 2.0])
@pytest.mark.parametrize("dropped", [False, True])
def test_isolated_kernel_equals_the_naive_masked_softmax(mode, anchors, strength, dropped):
    q, k, v = random_qkv(4)
    keep = torch.ones(4, 6, dtype=torch.bool)
    if dropped:
        keep = torch.rand(4, 6, generator=torch.Generator().manual_seed(3)) >= 0.4
    seen = others_seen(4, 1, mode, anchors)
    torch.testing.assert_close(kernel(q, k, v, LABELS, keep, seen, strength),
                               naive_isolated(q, k, v, LABELS, keep, seen, strength))


def test_a_subjects_queries_never_receive_weight_on_another_subjects_tokens():
    """Subject 2's values in the other images changed by a lot: image 0's queries of subject 1 and of no
    subject are unchanged to the last bit (zero weight there); its subject-2 queries change."""
    q, k, v = random_qkv(4)
    keep = torch.ones(4, 6, dtype=torch.bool)
    seen = others_seen(4, 1, "all", 1)
    changed_v = v.clone()
    for j in range(1, 4):
        changed_v[j][:, LABELS[j] == 2] += 100.0
    before, after = kernel(q, k, v, LABELS, keep, seen), kernel(q, k, changed_v, LABELS, keep, seen)
    not_2 = LABELS[0] != 2
    assert torch.equal(after[0][:, not_2], before[0][:, not_2])
    assert not torch.allclose(after[0][:, ~not_2], before[0][:, ~not_2])


def test_a_subject_no_other_image_shows_is_not_shared():
    q, k, v = random_qkv(3)
    labels = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 2, 2, 0, 0, 0], [0, 0, 0, 2, 0, 0]])  # subject 1 in image 0 only
    keep = torch.ones(3, 6, dtype=torch.bool)
    out = kernel(q, k, v, labels, keep, others_seen(3, 1, "all", 1))
    alone = torch.softmax(q[0] @ k[0].transpose(-1, -2) * SCALE, dim=-1) @ v[0]  # (heads, N, d)
    torch.testing.assert_close(out[0], alone)  # subject 1's queries and the background: own image only


def test_two_identical_images_whose_masks_cover_them_stay_unchanged():
    """Seeing the other image's copy of every key changes no softmax (each weight is doubled). Where a mask
    covers part of an image only, its subject's keys would be counted twice: that is sharing at work,
    not an invariant."""
    q, k, v = random_qkv(1)
    q, k, v = (t.repeat(2, 1, 1, 1) for t in (q, k, v))
    labels = torch.ones(2, 6, dtype=torch.long)
    out = kernel(q, k, v, labels, torch.ones(2, 6, dtype=torch.bool), others_seen(2, 1, "all", 1))
    plain = torch.softmax(q @ k.transpose(-1, -2) * SCALE, dim=-1) @ v
    torch.testing.assert_close(out, plain)


# ---- masks and labels ---------------------------------------------------------------------------------
def test_overlapping_masks_go_to_the_subject_that_attends_more():
    maps = torch.tensor([[[0.9, 0.6, 0.1]], [[0.2, 0.7, 0.8]]])[:, None]  # (S=2, B=1, H=1, W=3)
    masks = maps > 0.5
    assert label_masks(masks, maps).tolist() == [[[1, 2, 2]]]
    assert label_masks(torch.zeros_like(masks), maps).tolist() == [[[0, 0, 0]]]


def test_labels_resize_to_the_subject_covering_most_of_a_token_at_least_half():
    labels = torch.tensor([[[1, 1, 2, 0], [1, 2, 2, 0]]])  # (1, 2, 4) -> a 1x2 grid: cells of 2x2
    assert resize_labels(labels, 2, (1, 2)).tolist() == [[1, 2]]  # left: 1 covers 3/4; right: 2 covers 1/2
    sparse = torch.tensor([[[1, 1, 2, 0], [1, 0, 1, 0]]])
    assert resize_labels(sparse, 2, (1, 2)).tolist() == [[1, 0]]  # right: 1 and 2 cover 1/4 each
    assert resize_labels(labels, 2, (2, 4)).tolist() == [[1, 1, 2, 0, 1, 2, 2, 0]]


def test_with_one_subject_the_labels_are_todays_mask():
    g = torch.Generator().manual_seed(0)
    masks = SubjectMasks([[(2,)] * 3])
    masks.history.append(torch.rand(1, 3, 8, 8, generator=g))
    masks.enter_call(StepContext())
    for grid in [(8, 8), (4, 4), (3, 5)]:
        assert torch.equal(masks.labels_on_grid(grid) == 1, masks.on_grid(grid))
        assert torch.equal(masks.on_grid(grid), resize_mask(masks.latent_mask(), grid))


def test_one_subjects_positions_may_be_given_per_image():
    assert per_subject([(2,), (2, 3)]) == [[(2,), (2, 3)]]
    assert per_subject([[(2,)], [(5,)]]) == [[(2,)], [(5,)]]


# ---- the subjects' words --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from ldm.modules.encoders.tokenizer import CLIPTokenizer
    return CLIPTokenizer.from_default()


def test_each_subject_gets_its_own_tokens(tokenizer):
    positions = subject_token_positions(tokenizer, ["a red chair and a lamp", "a lamp and a chair"],
                                        [("chair",), ("lamp",)])
    assert positions == [[(3,), (5,)], [(6,), (2,)]]


def test_occurrences_tell_two_subjects_of_one_kind_apart(tokenizer):
    prompts = ["a face with glasses and a face with red hair"]
    assert subject_token_positions(tokenizer, prompts, [("face#1",), ("face#2",)]) == [[(2,)], [(7,)]]
    with pytest.raises(InvalidValue, match="names 'face' 2 times.*ambiguous.*face#1"):
        subject_token_positions(tokenizer, prompts, [("face",), ("glasses",)])
    # a single subject keeps every occurrence, as it always has
    assert subject_token_positions(tokenizer, prompts, [("face",)]) == [[(2, 7)]]


def test_a_prompt_missing_a_subject_names_the_image():
    with pytest.raises(InvalidValue, match="image 1 .*'a chair'.*none of the subject words 'lamp'"):
        check_prompts_name_subjects(["a chair and a lamp", "a chair"], [("chair",), ("lamp",)])
    with pytest.raises(InvalidValue, match="image 0"):
        check_prompts_name_subjects(["a face"], [("face#2",)])


def test_settings_refuse_a_word_naming_two_subjects_and_isolation_outside_all_or_anchor():
    with pytest.raises(InvalidValue, match="names two subjects"):
        SharedAttentionSettings(subjects=(("chair", "lamp"), ("lamp",)))
    with pytest.raises(InvalidValue, match="isolated subjects share in mode 'all' or 'anchor'"):
        SharedAttentionSettings(subjects="chair;lamp", subject_sharing="isolated", mode="pooled")


# ---- the whole tiny UNet ------------------------------------------------------------------------------
def unet_inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.full((batch,), 500), torch.randn(batch, 77, 32, generator=g)


@torch.no_grad()
def run(unet, x, t, c, halves=1):
    return unet(x, t, context=c, step=StepContext(halves=halves, latent_size=tuple(x.shape[-2:])))


TWO = dict(subjects=(("chair",), ("lamp",)), subject_positions=[[(2,)] * 4, [(5,)] * 4])


def test_isolated_sharing_changes_the_images_and_differs_from_pooled(tiny_unet):
    x, t, c = unet_inputs(4)
    plain = run(tiny_unet, x, t, c)
    outputs = {}
    for sharing in ("pooled", "isolated"):
        with shared_attention(tiny_unet, groups="all", subject_sharing=sharing, **TWO):
            run(tiny_unet, x, t, c)  # a first call: masks exist from the second
            outputs[sharing] = run(tiny_unet, x, t, c)
    assert not torch.allclose(outputs["isolated"], plain, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outputs["isolated"], outputs["pooled"], rtol=1e-4, atol=1e-4)


def test_isolated_guidance_halves_never_mix(tiny_unet):
    x, t, c = unet_inputs(4)  # [uncond 0, uncond 1, cond 0, cond 1]
    changed_x, changed_c = x.clone(), c.clone()
    changed_x[:2] += 1.0
    two = dict(subjects=TWO["subjects"], subject_positions=[[(2,)] * 2, [(5,)] * 2])
    results = []
    for xs, cs in ((x, c), (changed_x, c)):
        with shared_attention(tiny_unet, groups="all", subject_sharing="isolated", adain=True, **two):
            run(tiny_unet, xs, t, cs, halves=2)
            results.append(run(tiny_unet, xs, t, cs, halves=2))
    torch.testing.assert_close(results[1][2:], results[0][2:], rtol=0, atol=1e-6)  # conditional half unchanged
    assert not torch.allclose(results[1][:2], results[0][:2])


def test_isolated_masks_leave_cross_attention_bit_identical(tiny_unet):
    records = []
    cross = [m.attn2 for m in tiny_unet.modules() if hasattr(m, "attn2")]
    handles = [m.register_forward_hook(lambda mod, a, kw, out: records.append((mod, a[0], kw["context"], out)),
                                       with_kwargs=True) for m in cross]
    x, t, c = unet_inputs(4)
    with shared_attention(tiny_unet, groups="up", subject_sharing="isolated", **TWO) as controller:
        run(tiny_unet, x, t, c)
        run(tiny_unet, x, t, c)
        assert controller.run.masks.latent_labels().shape == (4, 16, 16)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for module, inputs, context, output in records:
            assert torch.equal(module(inputs, context=context), output)
    assert all(not m.readers for m in cross)

"""The synthetic objects data set: seeded, every attribute visible in the pixels, captions parseable.

Visibility is checked on the pixels alone: the object is where the image is saturated (the background
and the floor shadow are grey), so these tests do not trust the renderer's own masks.
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data.synthetic import (CLASSES, COLOURS, PATTERNS, SIZES, Attributes, SyntheticObjects, caption,
                                parse_prompt, render, sample_attributes)

CENTRED = dict(cls="chair", colour="red", pattern="solid", size="large", x=0.0, y=0.0, facing="right")


def attrs(**changes) -> Attributes:
    return Attributes(**{**CENTRED, **changes})


def object_mask(image: np.ndarray) -> np.ndarray:
    """Pixels belonging to the object: saturated, unlike the grey background and shadow."""
    image = image.astype(np.int16)
    return (image.max(axis=-1) - image.min(axis=-1)) > 30


def dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a mask by one pixel (8-neighbourhood), to cover anti-aliased edges."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[1 + dr:1 + dr + h, 1 + dc:1 + dc + w] for dr in (-1, 0, 1) for dc in (-1, 0, 1)], axis=0)


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_same_seed_gives_identical_items():
    a, b = SyntheticObjects(6, seed=3), SyntheticObjects(6, seed=3)
    for i in range(6):
        assert a[i]["image"].numpy().tobytes() == b[i]["image"].numpy().tobytes()
        assert a[i]["txt"] == b[i]["txt"] and a[i]["attributes"] == b[i]["attributes"]


def test_item_depends_only_on_seed_and_index_not_length():
    assert torch.equal(SyntheticObjects(100, seed=3)[7]["image"], SyntheticObjects(8, seed=3)[7]["image"])


def test_different_seeds_give_different_images():
    a, b = SyntheticObjects(6, seed=3), SyntheticObjects(6, seed=4)
    assert all(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(6))


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_returns_uint8_hwc(size):
    image = render(attrs(), size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_colour_changes_only_object_pixels_to_the_named_colour():
    reference = render(attrs())
    mask = object_mask(reference)
    for name, rgb in COLOURS.items():
        image = render(attrs(colour=name))
        overlap = (object_mask(image) & mask).sum() / (object_mask(image) | mask).sum()
        assert overlap > 0.9, f"{name}: the shape must not depend on the colour"
        # The most common object pixel is the fill colour, nearest to the named one.
        values, counts = np.unique(image[mask], axis=0, return_counts=True)
        fill = values[counts.argmax()].astype(float)
        nearest = min(COLOURS, key=lambda c: np.linalg.norm(fill - np.array(COLOURS[c])))
        assert nearest == name
        if name != "red":
            changed = np.abs(image.astype(int) - reference.astype(int)).sum(-1) > 0
            assert not changed[~dilate(mask)].any(), f"{name}: pixels outside the object changed"
            assert changed[mask].mean() > 0.99


def test_each_pattern_is_visible_and_distinct():
    interiors = {}
    for pattern in PATTERNS:
        image = render(attrs(cls="vase", pattern=pattern)).astype(float)
        rows, cols = np.nonzero(object_mask(image.astype(np.uint8)))
        r, c = int(np.median(rows)), int(np.median(cols))
        interiors[pattern] = image[r + 2:r + 12, c - 5:c + 5]  # a 10x10 patch inside the vase body
    assert interiors["solid"].std(axis=(0, 1)).max() < 1.0
    for pattern in PATTERNS[1:]:
        assert interiors[pattern].std(axis=(0, 1)).max() > 20, f"{pattern} is not visible"
    for p, q in itertools.combinations(PATTERNS[1:], 2):
        assert np.abs(interiors[p] - interiors[q]).mean() > 10, f"{p} and {q} look alike"


@pytest.mark.parametrize("axis", ["x", "y"])
def test_position_moves_the_bounding_box(axis):
    before = bbox(object_mask(render(attrs())))
    after = bbox(object_mask(render(attrs(**{axis: 0.1}))))  # 0.1 of 64 px = 6.4 px
    shift = np.subtract(after, before)
    moved, still = (shift[2:], shift[:2]) if axis == "x" else (shift[:2], shift[2:])
    assert np.all(np.abs(moved - 6.4) <= 1) and np.all(still == 0)


def test_size_scales_the_bounding_box():
    heights = {}
    for size in SIZES:
        top, bottom, _, _ = bbox(object_mask(render(attrs(size=size))))
        heights[size] = bottom - top + 1
    ratio = heights["large"] / heights["small"]
    assert abs(ratio - SIZES["large"] / SIZES["small"]) < 0.12


@pytest.mark.parametrize("cls", CLASSES)
def test_facing_left_mirrors_facing_right(cls):
    right = render(attrs(cls=cls, facing="right")).astype(float)
    left = render(attrs(cls=cls, facing="left")).astype(float)
    assert np.abs(left - right[:, ::-1]).mean() < 1.0
    # Every class is asymmetric, so facing is visible.
    assert np.abs(left - right).mean() > 5 * np.abs(left - right[:, ::-1]).mean() + 2


def test_classes_have_different_silhouettes():
    masks = {cls: object_mask(render(attrs(cls=cls))) for cls in CLASSES}
    for a, b in itertools.combinations(CLASSES, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.6, f"{a} and {b} overlap too much (IoU {iou:.2f})"


def test_sampled_objects_stay_inside_the_image():
    rng = np.random.default_rng(0)
    for size in SIZES:
        for cls in CLASSES:
            for _ in range(10):
                top, bottom, left, right = bbox(object_mask(render(sample_attributes(rng, cls=cls, size=size))))
                assert top > 0 and left > 0 and bottom < 63 and right < 63


def test_fixing_an_attribute_keeps_the_other_random_draws():
    free = sample_attributes(np.random.default_rng(5))
    other_cls = next(c for c in CLASSES if c != free.cls)
    fixed = sample_attributes(np.random.default_rng(5), cls=other_cls)
    assert fixed.cls == other_cls
    assert (fixed.colour, fixed.pattern, fixed.size, fixed.facing) == (free.colour, free.pattern, free.size,
                                                                        free.facing)
    assert sample_attributes(np.random.default_rng(5), x=0.125).x == 0.125


def test_bad_attributes_are_rejected():
    with pytest.raises(TypeError, match="unknown attributes"):
        sample_attributes(np.random.default_rng(0), shape="round")
    with pytest.raises(ValueError, match="colour"):
        sample_attributes(np.random.default_rng(0), colour="teal")
    with pytest.raises(ValueError, match="outside the image"):
        attrs(x=0.7)


def test_caption_examples():
    a = attrs(colour="red", pattern="striped")
    assert caption(a, set()) == "a chair"
    assert caption(a, {"colour"}) == "a red chair"
    assert caption(a, {"pattern"}) == "a striped chair"
    assert caption(a, {"colour", "pattern"}) == "a red striped chair"
    assert caption(attrs(pattern="solid"), {"colour", "pattern"}) == "a plain red chair"
    assert caption(attrs(cls="vase", colour="orange"), {"colour"}) == "an orange vase"
    with pytest.raises(ValueError, match="cannot mention"):
        caption(a, {"size"})


def test_parse_prompt_recovers_what_every_caption_names():
    mentions = [set(), {"colour"}, {"pattern"}, {"colour", "pattern"}]
    for cls, colour, pattern in itertools.product(CLASSES, COLOURS, PATTERNS):
        a = attrs(cls=cls, colour=colour, pattern=pattern)
        for mention in mentions:
            expected = {"cls": cls, "colour": colour if "colour" in mention else None,
                        "pattern": pattern if "pattern" in mention else None}
            assert parse_prompt(caption(a, mention)) == expected


def test_parse_prompt_synonyms_and_conflicts():
    assert parse_prompt("Two Blue CHAIRS with stripes.") == {"cls": "chair", "colour": "blue", "pattern": "striped"}
    assert parse_prompt("a spotted lamp")["pattern"] == "dotted"
    assert parse_prompt("a photo") == {"cls": None, "colour": None, "pattern": None}
    with pytest.raises(ValueError, match="two values for colour"):
        parse_prompt("a red and blue chair")


def test_mention_frequencies_follow_the_probabilities():
    data = SyntheticObjects(3000, seed=1)
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(data)):
        mention = data.attributes(i)[1]
        counts[mention] = counts.get(mention, 0) + 1
    expected = {(): 0.4, ("colour",): 0.2, ("pattern",): 0.2, ("colour", "pattern"): 0.2}
    for mention, p in expected.items():
        assert abs(counts.get(mention, 0) / len(data) - p) < 0.03


def test_custom_mention_probabilities():
    data = SyntheticObjects(20, seed=2, mention_probs={("colour", "pattern"): 1.0})
    for i in range(len(data)):
        parsed = parse_prompt(data[i]["txt"])
        truth = data[i]["attributes"]
        assert parsed == {"cls": truth["cls"], "colour": truth["colour"], "pattern": truth["pattern"]}
    with pytest.raises(ValueError, match="sum to 1"):
        SyntheticObjects(4, mention_probs={(): 0.5})
    with pytest.raises(ValueError, match="outside"):
        SyntheticObjects(4, mention_probs={("size",): 1.0})


def test_items_match_their_attributes_and_collate():
    data = SyntheticObjects(8, seed=9)
    item = data[5]
    truth = Attributes(**json.loads(json.dumps(item["attributes"])))
    expected = torch.from_numpy(render(truth)).float() / 127.5 - 1
    assert torch.equal(item["image"], expected)
    assert parse_prompt(item["txt"])["cls"] == truth.cls

    batch = next(iter(DataLoader(data, batch_size=4)))
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert len(batch["txt"]) == 4 and all(isinstance(t, str) for t in batch["txt"])
    assert batch["attributes"]["cls"] == [data[i]["attributes"]["cls"] for i in range(4)]
    assert batch["attributes"]["x"].shape == (4,)


# ---------------------------------------------------------------------------------------------------
# Pair images: two instances of one object
# ---------------------------------------------------------------------------------------------------
def test_pair_captions():
    a = attrs(colour="red", pattern="striped")
    assert caption(a, set(), count=2) == "two chairs"
    assert caption(a, {"colour", "pattern"}, count=2) == "two red striped chairs"
    assert parse_prompt(caption(attrs(cls="vase"), {"colour"}, count=2)) == {"cls": "vase", "colour": "red",
                                                                              "pattern": None}
    with pytest.raises(ValueError, match="one or two"):
        caption(a, set(), count=3)


def test_pairs_leave_the_single_object_items_unchanged():
    plain, mixed = SyntheticObjects(40, seed=4), SyntheticObjects(40, seed=4, pair_fraction=0.5)
    singles = [i for i in range(40) if not mixed.is_pair(i)]
    assert 5 < len(singles) < 35
    for i in singles:
        assert torch.equal(mixed[i]["image"], plain[i]["image"]) and mixed[i]["txt"] == plain[i]["txt"]
        assert mixed[i]["count"] == 1


def test_pair_items_show_two_matching_objects_one_in_each_half():
    data = SyntheticObjects(60, seed=6, pair_fraction=1.0)
    for i in range(0, 60, 6):
        item = data[i]
        assert item["count"] == 2 and item["txt"].startswith("two ")
        image = np.rint((item["image"].numpy() + 1) * 127.5).astype(np.uint8)
        mask = object_mask(image)
        left, right = mask[:, :32], mask[:, 32:]
        assert left.sum() > 20 and right.sum() > 20, f"item {i}: expected an object in each half"
        for half in (image[:, :32], image[:, 32:]):
            # The most saturated pixels of each half are the object's own colour (outline and pattern
            # tint are darker or paler): the nearest named colour must be the item's.
            pixels = half.reshape(-1, 3).astype(float)
            saturation = pixels.max(axis=1) - pixels.min(axis=1)
            mean = pixels[saturation >= 0.9 * saturation.max()].mean(axis=0)
            nearest = min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - mean).sum())
            assert nearest == item["attributes"]["colour"], f"item {i}: {mean}"


def test_pair_fraction_is_respected_and_checked():
    data = SyntheticObjects(2000, seed=1, pair_fraction=0.3)
    share = sum(data.is_pair(i) for i in range(2000)) / 2000
    assert abs(share - 0.3) < 0.04
    with pytest.raises(ValueError, match="pair_fraction"):
        SyntheticObjects(4, pair_fraction=1.5)

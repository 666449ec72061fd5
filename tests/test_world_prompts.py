"""The world v2's one prompt grammar (ldm/data/prompts.py) and its data set (ldm/data/scenes.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data.prompts import caption, parse_prompt, scene_for_prompt
from ldm.data.scenes import NOT_APPLICABLE, WorldScenes
from ldm.data.world import FURNITURE, VOCABULARY, attributes_of, sample_scene
from ldm.errors import InvalidValue


def test_parse_reads_back_exactly_what_a_caption_names_over_many_scenes_and_subsets():
    for i in range(1500):
        rng = np.random.default_rng([11, i])
        scene = sample_scene(rng)
        own = attributes_of(scene.subject)
        named = [name for name, coin in zip(own, rng.random(len(own))) if coin < 0.5]
        text = caption(scene, named)
        expected = {"subject": scene.subject, **{name: getattr(scene, name) for name in named}}
        assert parse_prompt(text) == expected, text


def test_captions_read_as_the_issue_writes_them():
    chair = sample_scene(np.random.default_rng(0), {"subject": "chair", "colour": "red", "pattern": "striped",
                                                   "wall": "green", "floor": "wood"})
    assert caption(chair, ["colour", "pattern", "wall", "floor"]) == \
        "a red striped chair in a green room on a wooden floor"
    face = sample_scene(np.random.default_rng(0), {"subject": "face", "hair_colour": "blond", "glasses": "yes"})
    assert caption(face, ["hair_colour", "glasses"]) == "a face with blond hair and glasses"
    assert caption(face, []) == "a face"


@pytest.mark.parametrize("prompt, expected", [
    ("A red striped chair in a green room on a wooden floor",
     {"subject": "chair", "colour": "red", "pattern": "striped", "wall": "green", "floor": "wood"}),
    ("a lamp on a wooden floor", {"subject": "lamp", "floor": "wood"}),
    ("two vases with stripes on the lawn", None),  # "two" is not a word of the world
    ("a face with red hair wearing a blue shirt", {"subject": "face", "hair_colour": "red", "shirt": "blue"}),
    ("a portrait with blonde curly hair, without glasses, in front of a gray backdrop",
     {"subject": "face", "hair_colour": "blond", "hair_style": "curly", "glasses": "no", "backdrop": "grey"}),
    ("a big blue checkered table facing right in the middle", {"subject": "table", "colour": "blue",
                                                               "pattern": "checked", "size": "large",
                                                               "facing": "right", "position": "centre"}),
])
def test_parse_reads_synonyms_and_colour_words_by_context(prompt, expected):
    if expected is None:
        with pytest.raises(InvalidValue, match="'two'"):
            parse_prompt(prompt)
    else:
        assert parse_prompt(prompt) == expected


@pytest.mark.parametrize("prompt, says", [
    ("a red sofa", "'sofa' is not in the demo world's vocabulary"),
    ("a white chair", "'white' is a colour of walls"),
    ("a red blue chair", "two values of colour"),
    ("a chair with glasses", "mixes face and furniture"),
    ("a face with skin", "'skin' needs a tone"),
    ("a vase facing", "'facing' needs 'left' or 'right'"),
])
def test_parse_refuses_what_it_cannot_read_with_a_message_naming_the_problem(prompt, says):
    with pytest.raises(InvalidValue, match=says) as caught:
        parse_prompt(prompt)
    assert caught.value.field == "prompt"


def test_scene_for_prompt_keeps_what_is_named_and_samples_the_rest():
    scenes = [scene_for_prompt("a red chair on grass", np.random.default_rng(i)) for i in range(40)]
    assert all(s.subject == "chair" and s.colour == "red" and s.floor == "grass" for s in scenes)
    assert len({s.wall for s in scenes}) > 1 and len({s.pattern for s in scenes}) > 1


def test_item_i_depends_only_on_seed_and_i():
    small, large = WorldScenes(8, seed=3), WorldScenes(500, seed=3)
    for i in (0, 5, 7):
        a, b = small[i], large[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["txt"] == b["txt"] and a["labels"] == b["labels"] and a["named"] == b["named"]
    assert WorldScenes(8, seed=4)[0]["txt"] != small[0]["txt"] or \
        not torch.equal(WorldScenes(8, seed=4)[0]["image"], small[0]["image"])


def test_items_carry_consistent_ground_truth():
    data = WorldScenes(64, seed=1, mention_prob=0.5)
    for i in range(len(data)):
        item = data[i]
        assert item["image"].shape == (64, 64, 3) and item["image"].min() >= -1 and item["image"].max() <= 1
        assert item["mask"].shape == (64, 64)
        x0, y0, x1, y1 = item["bbox"].tolist()
        assert item["mask"][y0:y1, x0:x1].sum() == item["mask"].sum() > 0
        labels, named = item["labels"], item["named"].split()
        assert set(labels) == set(VOCABULARY)
        own = attributes_of(labels["subject"])
        assert all((value != NOT_APPLICABLE) == (name == "subject" or name in own) for name, value in labels.items())
        assert parse_prompt(item["txt"]) == {name: labels[name] for name in named}


def test_mention_prob_sets_how_much_captions_name():
    bare = WorldScenes(50, seed=2, mention_prob=0.0)
    full = WorldScenes(50, seed=2, mention_prob=1.0)
    assert all(bare[i]["named"] == "subject" for i in range(0, 50, 5))
    for i in range(0, 50, 5):
        assert set(full[i]["named"].split()) == {"subject", *attributes_of(full[i]["labels"]["subject"])}
    # The scene itself does not depend on what the caption names.
    assert torch.equal(bare[3]["image"], full[3]["image"])


def test_faces_and_furniture_batch_together_with_the_default_collate():
    batch = next(iter(DataLoader(WorldScenes(32, seed=0), batch_size=32)))
    assert batch["image"].shape == (32, 64, 64, 3) and batch["bbox"].shape == (32, 4)
    subjects = batch["labels"]["subject"]
    assert "face" in subjects and set(subjects) - {"face"}


def test_face_share_sets_the_fraction_of_faces_and_splits_the_rest_among_furniture():
    data = WorldScenes(4000, seed=6, face_share=0.5)
    subjects = [data.scene(i)[0].subject for i in range(len(data))]
    # Binomial(4000, p) has a std of at most 32 items; 5 std either side.
    assert abs(subjects.count("face") - 2000) < 160
    for furniture in FURNITURE:
        assert abs(subjects.count(furniture) - 500) < 110
    assert {WorldScenes(50, seed=6, face_share=1.0).scene(i)[0].subject for i in range(50)} == {"face"}
    assert "face" not in {WorldScenes(200, seed=6, face_share=0.0).scene(i)[0].subject for i in range(200)}
    uniform = [WorldScenes(4000, seed=6).scene(i)[0].subject for i in range(4000)]
    assert abs(uniform.count("face") - 800) < 130


def test_face_share_items_depend_only_on_seed_and_i_and_match_their_captions():
    small, large = WorldScenes(8, seed=3, face_share=0.7), WorldScenes(300, seed=3, face_share=0.7)
    for i in range(8):
        assert small[i]["txt"] == large[i]["txt"] and torch.equal(small[i]["image"], large[i]["image"])
        assert parse_prompt(small[i]["txt"]) == {n: small[i]["labels"][n] for n in small[i]["named"].split()}
    with pytest.raises(ValueError, match="face_share"):
        WorldScenes(4, face_share=1.5)

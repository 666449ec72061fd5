"""The world v2 (ldm/data/world.py, render.py): scenes are valid, seeded, and drawn with true masks."""
from __future__ import annotations

import numpy as np
import pytest

from ldm.data.render import HORIZON, render_scene
from ldm.data.shapes import BACKGROUND_RGB, SKIN_RGB
from ldm.data.world import (APPLIES_TO, SUBJECTS, VOCABULARY, Scene, attributes_of, position_name,
                            sample_scene)
from ldm.errors import InvalidValue


def scenes(n: int, seed: int = 0, fixed=None) -> list[Scene]:
    return [sample_scene(np.random.default_rng([seed, i]), fixed) for i in range(n)]


def test_every_sampled_scene_has_exactly_its_subjects_attributes():
    for scene in scenes(200):
        labels = scene.labels()
        assert set(labels) == set(VOCABULARY)
        for name, value in labels.items():
            applies = scene.subject in APPLIES_TO[name]
            assert (value in VOCABULARY[name]) if applies else value is None, (name, scene)


def test_sampling_covers_every_value_of_every_attribute():
    seen = {name: set() for name in VOCABULARY}
    for scene in scenes(600):
        for name, value in scene.labels().items():
            if value is not None:
                seen[name].add(value)
    assert seen == {name: set(values) for name, values in VOCABULARY.items()}


def test_fixing_an_attribute_leaves_the_other_draws_unchanged():
    free = sample_scene(np.random.default_rng(7), {"subject": "chair"})
    fixed = sample_scene(np.random.default_rng(7), {"subject": "chair", "colour": "red"})
    assert fixed.colour == "red"
    assert {k: v for k, v in fixed.to_dict().items() if k != "colour"} == \
        {k: v for k, v in free.to_dict().items() if k != "colour"}


def test_fixing_an_attribute_the_subject_lacks_is_refused():
    with pytest.raises(InvalidValue, match="pattern"):
        sample_scene(np.random.default_rng(0), {"subject": "face", "pattern": "striped"})


def test_scene_refuses_values_outside_the_vocabulary_and_a_position_x_disagrees_with():
    with pytest.raises(InvalidValue, match="colour"):
        Scene("chair", y=0.3, colour="pink", pattern="solid", size="small", facing="left", position="centre",
              wall="white", floor="wood")
    with pytest.raises(InvalidValue, match="position"):
        Scene("chair", x=-0.25, y=0.3, colour="red", pattern="solid", size="small", facing="left", position="right",
              wall="white", floor="wood")


def test_named_position_is_the_third_the_subject_is_drawn_in():
    for scene in scenes(100, fixed={"subject": "lamp"}):
        assert position_name(scene.x) == scene.position
        centre_col = np.mean(np.nonzero(render_scene(scene).mask)[1]) / 64 - 0.5
        expected = {"left": -1, "centre": 0, "right": 1}[scene.position]
        assert np.sign(round(centre_col / 0.1)) in ((expected,) if expected else (-1, 0, 1))


def test_render_returns_pixels_mask_and_the_masks_bounding_box():
    for scene in scenes(30):
        out = render_scene(scene, 64)
        assert out.image.shape == (64, 64, 3) and out.image.dtype == np.uint8
        assert out.mask.shape == (64, 64) and out.mask.dtype == bool and out.mask.any()
        x0, y0, x1, y1 = out.bbox
        assert out.mask[y0:y1, x0:x1].sum() == out.mask.sum()  # the box holds the whole mask
        assert out.mask[y0, x0:x1].any() and out.mask[y1 - 1, x0:x1].any()  # and is tight
        assert out.mask[y0:y1, x0].any() and out.mask[y0:y1, x1 - 1].any()


def test_outside_the_mask_a_room_shows_its_wall_above_the_horizon():
    for scene in scenes(60, fixed={"subject": "table"}):
        out = render_scene(scene, 64)
        wall_rows = slice(0, round(HORIZON * 64) - 2)
        near = out.mask
        for _ in range(2):  # pixels up to 2 px outside the mask may hold a fraction (< 1/2) of outline
            padded = np.pad(near, 1)
            near = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:] | near
        free = ~near[wall_rows]
        # Away from the subject (and its shadow, which lies on the floor) the wall is its own colour.
        assert np.abs(out.image[wall_rows][free].astype(int) - BACKGROUND_RGB[scene.wall]).max() <= 2


def test_a_face_shows_its_skin_and_its_backdrop():
    for scene in scenes(20, fixed={"subject": "face"}):
        out = render_scene(scene, 64)
        cheek = out.image[30, 32 + round(scene.x * 64) - 8]  # beside the nose, below the eye
        assert np.abs(cheek.astype(int) - SKIN_RGB[scene.skin]).max() <= 3
        assert not out.mask[2, 2] and tuple(out.image[2, 2]) == BACKGROUND_RGB[scene.backdrop]


def test_glasses_and_hair_style_change_the_pixels_where_they_should():
    base = sample_scene(np.random.default_rng(3), {"subject": "face", "glasses": "no", "hair_style": "short"})
    with_glasses = Scene(**{**base.to_dict(), "glasses": "yes"})
    long_hair = Scene(**{**base.to_dict(), "hair_style": "long"})
    eyes = (slice(22, 31), slice(20, 44))
    plain, spectacled, long_ = (render_scene(s).image.astype(int) for s in (base, with_glasses, long_hair))
    assert np.abs(plain - spectacled)[eyes].sum() > 10 * np.abs(plain - spectacled).sum() / 20
    assert render_scene(long_hair).mask.sum() > render_scene(base).mask.sum()
    assert np.abs(plain - long_).sum() > 0


def test_render_is_deterministic_and_scales():
    scene = scenes(1, seed=5)[0]
    a, b = render_scene(scene, 64), render_scene(scene, 64)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    big = render_scene(scene, 128)
    assert big.image.shape == (128, 128, 3)
    # The same scene covers the same share of the image at both sizes.
    assert abs(big.mask.mean() - a.mask.mean()) < 0.03


def test_attributes_of_lists_subject_specific_attributes():
    assert attributes_of("face") == ("skin", "hair_colour", "hair_style", "glasses", "shirt", "backdrop")
    assert "pattern" in attributes_of("vase") and "glasses" not in attributes_of("vase")
    assert set(SUBJECTS) == {"chair", "table", "lamp", "vase", "face"}


def test_sample_grid_script_writes_the_same_png_for_the_same_arguments(tmp_path):
    from tests.conftest import load_script
    script = load_script("render_world_samples")
    args = ["--count", "3", "--columns", "3", "--masks"]
    script.main(["--out", str(tmp_path / "a.png"), *args])
    script.main(["--out", str(tmp_path / "b.png"), *args])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    with pytest.raises(script.UsageError, match="--mention-prob"):
        script.main(["--out", str(tmp_path / "c.png"), "--mention-prob", "2"])
    assert not (tmp_path / "c.png").exists()

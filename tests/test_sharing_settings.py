"""The sharing settings own every check and conversion (ldm/sharing/settings.py): wrong types are errors
naming the field, never coerced; values from a front end, the study's text and PNG metadata all come
back to the same settings."""
from __future__ import annotations

import json
import math

import pytest

from ldm.errors import InvalidValue
from ldm.sharing import SharedAttentionSettings as Settings

EXAMPLES = [
    Settings(),
    Settings(groups=("up",), mode="anchor", anchors=2, steps=(0.0, 0.5), strength=-1.5),
    Settings(groups=("mid", "up.32"), subjects=(("chair", "lamp"),), dropout=0.25, adain=True),
    Settings(groups=("up",), mode="pooled", strength=2.0),
    Settings(groups=("32",), mode="others", strength=-math.inf),
    Settings(groups=("all",), mode="mean", steps=(0.25, 0.75)),
]


@pytest.mark.parametrize("settings", EXAMPLES, ids=lambda s: s.to_text())
def test_the_study_text_gives_back_the_same_settings(settings):
    assert Settings.from_text(settings.to_text()) == settings


@pytest.mark.parametrize("settings", EXAMPLES, ids=lambda s: s.to_text())
def test_png_metadata_gives_back_the_same_settings_through_json(settings):
    written = json.loads(json.dumps(settings.as_metadata()))
    assert Settings.from_metadata(written) == settings


def test_metadata_keeps_its_written_form():
    """PNGs made before keep their meaning: the keys, the comma-joined lists and the window text."""
    assert Settings(groups=("up", "mid"), subjects=(("chair",),)).as_metadata() == {
        "groups": "up,mid", "mode": "all", "anchors": 1, "steps": "0.0:1.0", "strength": 0.0, "subject": "chair",
        "dropout": 0.0, "adain": False}
    assert Settings.from_metadata(None) is None


@pytest.mark.parametrize("text, expected", [
    ("up@0:0.3", Settings(groups=("up",), steps=(0.0, 0.3))),
    ("mid+up@s=-1", Settings(groups=("mid", "up"), strength=-1.0)),
    ("all@anchor=2", Settings(mode="anchor", anchors=2)),
    ("up@mask@drop=0.5", Settings(groups=("up",), subjects=(("chair", "face"),), dropout=0.5)),
    ("up@subject=chair/lamp@adain", Settings(groups=("up",), subjects=(("chair", "lamp"),), adain=True)),
])
def test_the_study_text_syntax(text, expected):
    assert Settings.from_text(text, mask_words=("chair", "face")) == expected


@pytest.mark.parametrize("text, problem", [("up@wobble", "unknown option"), ("up@mask", "'mask' needs subject words"),
                                           ("up@anchor=x", "invalid literal")])
def test_bad_study_text_names_the_problem(text, problem):
    with pytest.raises(InvalidValue, match=problem):
        Settings.from_text(text)


@pytest.mark.parametrize("kwargs, field", [
    (dict(groups=(1,)), "groups"), (dict(groups=None), "groups"),
    (dict(anchors="3", mode="anchor"), "anchors"), (dict(anchors=2.5, mode="anchor"), "anchors"),
    (dict(anchors=True, mode="anchor"), "anchors"),
    (dict(steps=(0,)), "steps"), (dict(steps="0:1"), "steps"), (dict(steps=(0, "1")), "steps"),
    (dict(strength="1"), "strength"), (dict(dropout="0.5"), "dropout"), (dict(dropout=True), "dropout"),
    (dict(adain="no"), "adain"), (dict(adain=1), "adain"), (dict(mode=None), "mode"),
    (dict(subjects=(("chair", 2),)), "subjects"), (dict(subjects=5), "subjects"),
])
def test_wrong_types_are_refused_naming_the_field_never_coerced(kwargs, field):
    with pytest.raises(InvalidValue) as error:
        Settings(**kwargs)
    assert error.value.field == field


def test_anchors_other_than_one_need_anchor_mode():
    with pytest.raises(InvalidValue, match="anchor mode only") as error:
        Settings(anchors=3)
    assert error.value.field == "anchors"
    assert Settings(mode="anchor", anchors=3).anchors == 3


def test_values_from_a_front_end_none_meaning_not_given():
    assert Settings.from_values("up,mid") == Settings(groups=("up", "mid"))
    assert Settings.from_values("up", mode="anchor", anchors=2, steps="0:0.5", subjects="chair, lamp",
                                dropout=0.5, adain=True) == \
        Settings(groups=("up",), mode="anchor", anchors=2, steps=(0.0, 0.5), subjects=(("chair", "lamp"),), dropout=0.5,
                 adain=True)


@pytest.mark.parametrize("values, field, problem", [
    (dict(anchors=1), "anchors", "anchor mode only"),  # given, but the mode is the default 'all'
    (dict(anchors=3, mode="all"), "anchors", "anchor mode only"),
    (dict(subjects=""), "subjects", "no subject word"),
    (dict(subjects=" , "), "subjects", "no subject word"),
    (dict(subjects=["chair", ""]), "subjects", "no subject word"),
    (dict(subject_sharing="isolated"), "subject_sharing", "applies to subjects"),
    (dict(steps="0-1"), "steps", "START:END"),
])
def test_values_that_would_be_ignored_are_errors(values, field, problem):
    with pytest.raises(InvalidValue, match=problem) as error:
        Settings.from_values("up", **values)
    assert error.value.field == field


@pytest.mark.parametrize("metadata, field", [
    ({"groups": "up", "colour": "red"}, "shared_attention"),  # an unknown key
    ("up", "shared_attention"),  # not a mapping
    ({"groups": ["up"]}, "groups"),  # lists are written as texts
    ({"groups": "up", "anchors": "2", "mode": "anchor"}, "anchors"),
    ({"groups": "up", "steps": 5}, "steps"),
    ({"groups": "up", "adain": "false"}, "adain"),
    ({"groups": "up," * 100}, "groups"),  # more names than any model has
    ({"groups": "up", "mode": "anchor", "anchors": 10 ** 9}, "anchors"),
])
def test_tampered_metadata_is_refused_naming_the_field(metadata, field):
    with pytest.raises(InvalidValue) as error:
        Settings.from_metadata(metadata)
    assert error.value.field == field

"""The demo world v2: every image is a scene, one subject in front of a background.

A subject is a piece of furniture (chair, table, lamp, vase; side view, as in v1's
`ldm.data.synthetic`) standing in a room (a wall colour above a floor kind), or a face (a
front-view portrait) in front of a plain backdrop. Every attribute of a scene is a name from
`VOCABULARY`; `APPLIES_TO` says which subjects have it (a face has no pattern, a chair no glasses).
A face's "identity" is its skin, hair colour, hair style, glasses and shirt together.

This module only describes scenes (`Scene`, `sample_scene`); `ldm.data.render` draws them,
`ldm.data.prompts` turns them into captions and back, `ldm.data.scenes` is the data set.

Conventions
- `x` is the offset of the centre of the subject's drawing box from the image centre, as a
  fraction of the image side, +x right. For furniture, `y` is where it stands: the offset of the
  bottom of its box from the image centre (+y down, image rows), always on the floor; a face has
  y = 0. The named `position` (left, centre, right) is the third of the usable range `x` falls in.
- Values are plain strings, so a scene is JSON-able and the vocabulary can travel with a model.
- `sample_scene` draws the same random numbers whatever is fixed, so fixing one attribute leaves
  every other one of a seeded draw unchanged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

import numpy as np

from ldm.data.synthetic import CLASSES, COLOURS, FACINGS, PATTERNS, SIZES
from ldm.errors import InvalidValue

FURNITURE: tuple[str, ...] = CLASSES
SUBJECTS: tuple[str, ...] = (*FURNITURE, "face")
# Wall and backdrop colours share their names with object colours where they can ("a green room"),
# but are drawn as muted tints (ldm/data/render.py), so a subject stays distinct from its wall.
BACKGROUND_COLOURS: tuple[str, ...] = ("white", "grey", "red", "green", "blue", "yellow")

VOCABULARY: dict[str, tuple[str, ...]] = {
    "subject": SUBJECTS,
    # furniture
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "size": tuple(SIZES),
    "facing": FACINGS,
    "position": ("left", "centre", "right"),
    "wall": BACKGROUND_COLOURS,
    "floor": ("wood", "tiles", "carpet", "grass"),
    # faces
    "skin": ("pale", "tan", "brown", "dark"),
    "hair_colour": ("black", "brown", "blond", "red", "grey"),
    "hair_style": ("short", "long", "curly"),
    "glasses": ("no", "yes"),
    "shirt": tuple(COLOURS),
    "backdrop": BACKGROUND_COLOURS,
}
FURNITURE_ATTRIBUTES: tuple[str, ...] = ("colour", "pattern", "size", "facing", "position", "wall", "floor")
FACE_ATTRIBUTES: tuple[str, ...] = ("skin", "hair_colour", "hair_style", "glasses", "shirt", "backdrop")
BACKGROUND_ATTRIBUTES: tuple[str, ...] = ("wall", "floor", "backdrop")
APPLIES_TO: dict[str, tuple[str, ...]] = {
    "subject": SUBJECTS,
    **{name: FURNITURE for name in FURNITURE_ATTRIBUTES},
    **{name: ("face",) for name in FACE_ATTRIBUTES},
}

# Usable |x| of a furniture subject's centre (fraction of the image side) and how far a face may be
# off centre; faces stay near the middle so that their features keep their size.
FURNITURE_X_RANGE = 0.28
FACE_X_RANGE = 0.06
# Furniture stands on the floor: the bottom of its drawing box lies this far below the image centre
# (fraction of the side), between the horizon and the image bottom.
FEET_RANGE = (0.22, 0.42)


def attributes_of(subject: str) -> tuple[str, ...]:
    """The attributes a subject has besides `subject` itself, in `VOCABULARY` order."""
    return tuple(name for name in VOCABULARY if name != "subject" and subject in APPLIES_TO[name])


def position_name(x: float) -> str:
    """The named third of the furniture range that a centre offset `x` falls in."""
    third = 2 * FURNITURE_X_RANGE / 3
    return "left" if x < -FURNITURE_X_RANGE + third else "right" if x >= FURNITURE_X_RANGE - third else "centre"


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image; attributes a subject does not have are None."""
    subject: str
    x: float = 0.0
    y: float = 0.0
    colour: Optional[str] = None
    pattern: Optional[str] = None
    size: Optional[str] = None
    facing: Optional[str] = None
    position: Optional[str] = None
    wall: Optional[str] = None
    floor: Optional[str] = None
    skin: Optional[str] = None
    hair_colour: Optional[str] = None
    hair_style: Optional[str] = None
    glasses: Optional[str] = None
    shirt: Optional[str] = None
    backdrop: Optional[str] = None

    def __post_init__(self) -> None:
        if self.subject not in SUBJECTS:
            raise InvalidValue("subject", self.subject, f"is not one of {list(SUBJECTS)}")
        for name in VOCABULARY:
            value = getattr(self, name)
            if self.subject not in APPLIES_TO[name]:
                if value is not None:
                    raise InvalidValue(name, value, f"a {self.subject} has no {name}; leave it None")
            elif value not in VOCABULARY[name]:
                raise InvalidValue(name, value, f"a {self.subject} needs one of {list(VOCABULARY[name])}")
        limit = FACE_X_RANGE if self.subject == "face" else FURNITURE_X_RANGE
        if not -limit <= self.x <= limit:
            raise InvalidValue("x", self.x, f"a {self.subject}'s centre offset must lie in [-{limit}, {limit}]")
        if self.subject == "face" and self.y != 0.0:
            raise InvalidValue("y", self.y, "a face is drawn at y = 0")
        if self.subject != "face" and not FEET_RANGE[0] <= self.y <= FEET_RANGE[1]:
            raise InvalidValue("y", self.y, f"furniture stands on the floor: y (its feet) must lie in {list(FEET_RANGE)}")
        if self.position is not None and position_name(self.x) != self.position:
            raise InvalidValue("position", self.position, f"x={self.x:.3f} lies in the {position_name(self.x)} third")

    def labels(self) -> dict[str, Optional[str]]:
        """Every `VOCABULARY` attribute -> its value, None where the subject does not have it."""
        return {name: getattr(self, name) for name in VOCABULARY}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; `Scene(**d)` rebuilds the scene."""
        return asdict(self)


def sample_scene(rng: np.random.Generator, fixed: Optional[Mapping[str, str]] = None) -> Scene:
    """Draw a random scene, keeping the attributes given in `fixed` (e.g. what a prompt names).

    Every attribute of every subject is drawn, in `VOCABULARY` order, before those that do not apply
    are dropped: the random stream does not depend on what is fixed.
    """
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(VOCABULARY)
    if unknown:
        raise InvalidValue("fixed", sorted(unknown), f"unknown attributes; the world has {list(VOCABULARY)}")
    drawn = {name: values[int(rng.integers(len(values)))] for name, values in VOCABULARY.items()}
    unit_x, unit_feet, face_x = rng.uniform(-1.0, 1.0), rng.uniform(0.0, 1.0), rng.uniform(-1.0, 1.0)
    drawn.update(fixed)
    subject = drawn["subject"]
    if subject not in SUBJECTS:
        raise InvalidValue("subject", subject, f"is not one of {list(SUBJECTS)}")
    for name in fixed:
        if subject not in APPLIES_TO[name]:
            raise InvalidValue(name, fixed[name], f"a {subject} has no {name}")
    values = {name: drawn[name] for name in attributes_of(subject)}
    if subject == "face":
        return Scene(subject, x=float(face_x * FACE_X_RANGE), y=0.0, **values)
    # x is drawn inside the named third, so `position` and the drawing agree.
    third = 2 * FURNITURE_X_RANGE / 3
    start = {"left": -FURNITURE_X_RANGE, "centre": -FURNITURE_X_RANGE + third,
             "right": FURNITURE_X_RANGE - third}[values["position"]]
    x = start + (unit_x + 1.0) / 2 * third
    feet = FEET_RANGE[0] + unit_feet * (FEET_RANGE[1] - FEET_RANGE[0])
    return Scene(subject, x=float(np.clip(x, -FURNITURE_X_RANGE, FURNITURE_X_RANGE)), y=float(feet), **values)


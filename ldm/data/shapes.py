"""Geometry and colours of the world v2's subjects and backgrounds (ldm/data/world.py), no drawing.

Furniture keeps v1's side-view silhouettes (`ldm.data.synthetic.SHAPES`, longest side 1, facing
right). A face is a front-view portrait built from the parts below, in image units (the image side
is 1, origin top left, y down), centred at x = 0.5 before the scene's offset is added. Parts are
listed back to front; each is drawn in one of the scene's colours ("skin", "hair", "shirt" ...).

Sizes were chosen so that every face attribute stays readable at 64 px: the head is about 22 px wide,
an eye 4 px, a glasses rim 1 px; the three hair styles differ in silhouette (short: a cap on the
head; long: falls to the shoulders; curly: a round mass wider than the head).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ldm.data.synthetic import COLOURS, SHAPE_EXTENTS, SHAPES, Primitive

__all__ = ["SHAPES", "SHAPE_EXTENTS", "Primitive", "FacePart", "face_parts", "SKIN_RGB", "HAIR_RGB",
           "BACKGROUND_RGB", "FLOOR_RGB", "SUBJECT_RGB"]

RGB = tuple[int, int, int]
SUBJECT_RGB: dict[str, RGB] = dict(COLOURS)
# Muted tints for walls and backdrops, light enough that a saturated subject of the same colour name
# still stands out against them.
BACKGROUND_RGB: dict[str, RGB] = {
    "white": (242, 240, 235), "grey": (168, 168, 168), "red": (226, 150, 140),
    "green": (160, 202, 155), "blue": (155, 180, 222), "yellow": (240, 226, 150),
}
# Base colour of each floor kind; the texture (planks, grout, speckle, blades) is drawn around it.
FLOOR_RGB: dict[str, RGB] = {
    "wood": (160, 108, 62), "tiles": (222, 220, 210), "carpet": (92, 108, 116), "grass": (86, 146, 58),
}
SKIN_RGB: dict[str, RGB] = {"pale": (246, 216, 196), "tan": (222, 170, 124), "brown": (160, 104, 68),
                            "dark": (92, 58, 38)}
HAIR_RGB: dict[str, RGB] = {"black": (28, 24, 24), "brown": (112, 70, 38), "blond": (232, 200, 108),
                            "red": (192, 68, 28), "grey": (196, 196, 200)}
EYE_WHITE: RGB = (250, 250, 250)
PUPIL: RGB = (30, 30, 40)
MOUTH: RGB = (150, 40, 50)
GLASSES: RGB = (20, 20, 20)


class FacePart(NamedTuple):
    """One piece of a portrait: `kind` "ellipse", "rectangle", "chord" (upper half of an ellipse),
    "ring" (an ellipse outline `width` thick) or "line" (through the points (x0, y0, x1, y1, ...) of
    `box`, `width` thick); `box` is (x0, y0, x1, y1) for the others;
    `paint` names the colour; `subject` says whether it belongs to the subject mask."""
    kind: str
    box: tuple[float, ...]
    paint: str
    subject: bool = True
    width: float = 0.0


HEAD = (0.33, 0.20, 0.67, 0.64)
EYE_Y, EYE_DX, EYE_R, PUPIL_R = 0.41, 0.075, 0.032, 0.017


def _eye_parts() -> list[FacePart]:
    parts = []
    for side in (-1, 1):
        ex = 0.5 + side * EYE_DX
        parts.append(FacePart("ellipse", (ex - EYE_R, EYE_Y - EYE_R * 0.8, ex + EYE_R, EYE_Y + EYE_R * 0.8), "eye"))
        parts.append(FacePart("ellipse", (ex - PUPIL_R, EYE_Y - PUPIL_R, ex + PUPIL_R, EYE_Y + PUPIL_R), "pupil"))
        parts.append(FacePart("line", (ex - 0.04, EYE_Y - 0.055, ex + 0.04, EYE_Y - 0.06), "hair", width=0.018))
    return parts


def face_parts(hair_style: str, glasses: bool) -> list[FacePart]:
    """The parts of a portrait with this hair style, back to front, in image units centred at x = 0.5."""
    parts: list[FacePart] = []
    if hair_style == "long":
        parts.append(FacePart("rectangle", (0.29, 0.30, 0.71, 0.80), "hair"))  # falls behind the shoulders
    elif hair_style == "curly":
        parts.append(FacePart("ellipse", (0.22, 0.08, 0.78, 0.60), "hair"))
        # A ring of small curls makes the outline bumpy, unlike the smooth long and short hair.
        for i in range(14):
            angle = math.pi * (0.9 + 1.2 * i / 13)
            cx, cy = 0.5 + 0.27 * math.cos(angle), 0.34 + 0.25 * math.sin(angle)
            parts.append(FacePart("ellipse", (cx - 0.045, cy - 0.045, cx + 0.045, cy + 0.045), "hair"))
    elif hair_style != "short":
        raise ValueError(f"unknown hair style {hair_style!r}")
    parts += [
        FacePart("ellipse", (0.12, 0.76, 0.88, 1.30), "shirt"),  # shoulders
        FacePart("rectangle", (0.44, 0.58, 0.56, 0.80), "neck"),
        FacePart("ellipse", (0.30, 0.38, 0.36, 0.48), "skin"),  # ears
        FacePart("ellipse", (0.64, 0.38, 0.70, 0.48), "skin"),
        FacePart("ellipse", HEAD, "skin"),
    ]
    if hair_style == "long":
        parts.append(FacePart("rectangle", (0.29, 0.30, 0.35, 0.80), "hair"))  # strands in front of the ears
        parts.append(FacePart("rectangle", (0.65, 0.30, 0.71, 0.80), "hair"))
    # Every style has a cap over the top of the head (the curly mass already covers it).
    cap = (0.315, 0.16, 0.685, 0.52) if hair_style != "curly" else (0.30, 0.12, 0.70, 0.50)
    parts.append(FacePart("chord", cap, "hair"))
    parts += _eye_parts()
    parts.append(FacePart("line", (0.455, 0.535, 0.5, 0.55, 0.545, 0.535), "mouth", width=0.02))
    if glasses:
        for side in (-1, 1):
            ex, r = 0.5 + side * EYE_DX, 0.058
            parts.append(FacePart("ring", (ex - r, EYE_Y - r, ex + r, EYE_Y + r), "glasses", width=0.022))
        parts.append(FacePart("line", (0.5 - EYE_DX + 0.058, EYE_Y, 0.5 + EYE_DX - 0.058, EYE_Y), "glasses",
                              width=0.02))
    return parts

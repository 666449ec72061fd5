"""Draw a world v2 scene (ldm/data/world.py): image, per-pixel subject mask and bounding box.

Procedural, numpy + PIL only, a few milliseconds per 64 px image. Furniture stands in a room: the
wall fills the image down to the horizon, the floor kind below it, the object (v1's silhouettes,
patterns and outline, `ldm.data.synthetic`) with its feet on the floor and a soft shadow. A face is a
front-view portrait (`ldm.data.shapes.face_parts`) before a plain backdrop.

Conventions
- `render_scene` returns uint8 (H, W, 3) pixels, a bool (H, W) mask that is True where the subject
  covers at least half a pixel (outline included: it is drawn in the subject's colours), and the
  mask's bounding box (x0, y0, x1, y1) in pixels, end exclusive.
- Drawing happens at `SUPERSAMPLE` times the size and is box-filtered down, for smooth edges.
- Floor textures have a fixed seed: a floor kind looks the same in every scene, so that the floor
  is a property of the words, not of the item's random stream.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ldm.data.shapes import (BACKGROUND_RGB, EYE_WHITE, FLOOR_RGB, GLASSES, HAIR_RGB, MOUTH, PUPIL, SHAPE_EXTENTS,
                             SHAPES, SKIN_RGB, SUBJECT_RGB, face_parts)
from ldm.data.synthetic import SIZES, draw_primitives, pattern_texture
from ldm.data.world import Scene

SUPERSAMPLE = 4
# The horizon (wall above, floor below) as a fraction of the image height.
HORIZON = 0.56
# Longest side of a "large" piece of furniture as a fraction of the image side (v1: 0.62; smaller
# here so that wall and floor stay visible around it).
FURNITURE_FRACTION = 0.52
OUTLINE_DARKEN = 0.45
FACE_OUTLINE = np.array((45, 40, 40), dtype=np.float32)


class RenderedScene(NamedTuple):
    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # bool (H, W), True on the subject
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 of the mask in pixels, end exclusive


def render_scene(scene: Scene, size: int = 64) -> RenderedScene:
    """Draw `scene` at `size` x `size` pixels."""
    if size < 16 or size % 8:
        raise ValueError(f"size={size}: the world is drawn at a multiple of 8 pixels, at least 16")
    if scene.subject == "face":
        image, coverage = _draw_face(scene, size)
    else:
        image, coverage = _draw_furniture(scene, size)
    mask = coverage >= 0.5
    return RenderedScene(np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, mask_bbox(mask))


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), end exclusive, of the True pixels of a (H, W) mask; (0, 0, 0, 0) if none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return 0, 0, 0, 0
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _downsample(layer: Image.Image, size: int) -> np.ndarray:
    """A supersampled image -> float32 at `size` (coverage in [0, 1] for an L mask, 0-255 for RGB)."""
    array = np.asarray(layer.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    return array / 255.0 if layer.mode == "L" else array


def _outline(alpha: np.ndarray, size: int) -> np.ndarray:
    """Coverage (size, size, 1) grown by one pixel at 64 px (more at larger sizes): silhouette + outline."""
    grow = 2 * max(1, size // 64) + 1
    grown = Image.fromarray((alpha[..., 0] * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(grow))
    return np.asarray(grown, dtype=np.float32)[..., None] / 255.0


# ---- rooms and furniture --------------------------------------------------------------------------

@lru_cache(maxsize=32)
def floor_texture(kind: str, size: int) -> np.ndarray:
    """A full-frame float32 (size, size, 3) texture of a floor kind; only the rows below the horizon are used."""
    rng = np.random.default_rng(1234)
    base = np.array(FLOOR_RGB[kind], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    unit = size / 64  # texture features scale with the image
    if kind == "wood":
        plank = np.floor(yy / (4 * unit)).astype(int)  # horizontal planks 4 px high at 64 px
        shade = rng.uniform(-18, 18, size=plank.max() + 1)[plank]
        seams = (yy % (4 * unit)) < unit
        joints = ((xx + 23 * plank * unit) % (24 * unit)) < unit  # staggered plank ends
        texture = base + shade[..., None] - 45 * (seams | joints)[..., None]
    elif kind == "tiles":
        grout = ((xx % (8 * unit)) < unit) | ((yy % (8 * unit)) < unit)
        texture = base - 70 * grout[..., None]
    elif kind == "carpet":
        texture = base + rng.normal(0, 14, size=(size, size, 1))
    elif kind == "grass":
        blades = rng.uniform(-30, 30, size=(size // 2 + 1, size))[np.floor(yy / 2).astype(int), xx.astype(int)]
        texture = base + np.stack([0.6 * blades, blades, 0.4 * blades], axis=-1)
    else:
        raise ValueError(f"unknown floor kind {kind!r}; expected one of {list(FLOOR_RGB)}")
    texture = np.clip(texture, 0, 255).astype(np.float32)
    texture.setflags(write=False)
    return texture


def _room(scene: Scene, size: int) -> np.ndarray:
    """Wall above the horizon, floor below, a darker skirting line between them: float32 (size, size, 3)."""
    image = np.broadcast_to(np.array(BACKGROUND_RGB[scene.wall], dtype=np.float32), (size, size, 3)).copy()
    horizon = round(HORIZON * size)
    image[horizon:] = floor_texture(scene.floor, size)[horizon:]
    skirting = max(1, size // 64)
    image[horizon - skirting:horizon] *= 0.7
    return image


def _draw_furniture(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    big = size * SUPERSAMPLE
    side = SIZES[scene.size] * FURNITURE_FRACTION * big
    half_w, half_h = SHAPE_EXTENTS[scene.subject]
    feet = (0.5 + scene.y) * big
    centre = ((0.5 + scene.x) * big, feet - half_h * side)

    shape = Image.new("L", (big, big), 0)
    draw_primitives(ImageDraw.Draw(shape), SHAPES[scene.subject], centre, side, scene.facing == "left")
    alpha = _downsample(shape, size)[..., None]  # (size, size, 1)

    shadow = Image.new("L", (big, big), 0)
    w, h = 1.1 * half_w * side, 0.05 * side
    ImageDraw.Draw(shadow).ellipse((centre[0] - w, feet - h, centre[0] + w, feet + h), fill=255)
    shadow_alpha = 0.45 * _downsample(shadow, size)[..., None]

    # A dark outline keeps light patterns apart from a light wall or floor.
    outline = _outline(alpha, size)
    dark = OUTLINE_DARKEN * np.array(SUBJECT_RGB[scene.colour], dtype=np.float32)

    image = _room(scene, size)
    image = image * (1 - shadow_alpha)  # the shadow darkens whatever floor it falls on
    image = image * (1 - outline) + dark * outline
    image = image * (1 - alpha) + pattern_texture(scene.pattern, scene.colour, size) * alpha
    return image, outline[..., 0]


# ---- faces ----------------------------------------------------------------------------------------

def _face_paints(scene: Scene) -> dict[str, tuple[int, int, int]]:
    skin = np.array(SKIN_RGB[scene.skin], dtype=np.float32)
    return {"skin": SKIN_RGB[scene.skin], "neck": tuple(int(v) for v in 0.88 * skin),
            "hair": HAIR_RGB[scene.hair_colour], "shirt": SUBJECT_RGB[scene.shirt], "eye": EYE_WHITE,
            "pupil": PUPIL, "mouth": MOUTH, "glasses": GLASSES}


def _draw_face(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND_RGB[scene.backdrop])
    shape = Image.new("L", (big, big), 0)
    draw, draw_mask = ImageDraw.Draw(canvas), ImageDraw.Draw(shape)
    paints = _face_paints(scene)
    shift = scene.x

    def px(values: tuple[float, ...]) -> list[float]:  # image units -> supersampled pixels, x shifted
        return [(v + shift if i % 2 == 0 else v) * big for i, v in enumerate(values)]

    for part in face_parts(scene.hair_style, scene.glasses == "yes"):
        colour, box = paints[part.paint], px(part.box)
        targets = [(draw, colour)] + ([(draw_mask, 255)] if part.subject else [])
        for target, fill in targets:
            if part.kind == "ellipse":
                target.ellipse(box, fill=fill)
            elif part.kind == "rectangle":
                target.rectangle(box, fill=fill)
            elif part.kind == "chord":
                target.chord(box, 180, 360, fill=fill)
            elif part.kind == "ring":
                target.ellipse(box, outline=fill, width=max(1, round(part.width * big)))
            elif part.kind == "line":
                target.line(box, fill=fill, width=max(1, round(part.width * big)), joint="curve")
            else:
                raise ValueError(f"unknown face part kind {part.kind!r}")
    image = _downsample(canvas, size)
    alpha = _downsample(shape, size)[..., None]  # (size, size, 1)
    outline = _outline(alpha, size)
    ring = np.clip(outline - alpha, 0, 1)  # only outside the silhouette: the face's own pixels stay
    backdrop = np.array(BACKGROUND_RGB[scene.backdrop], dtype=np.float32)
    image = image * (1 - ring) + (0.5 * backdrop + 0.5 * FACE_OUTLINE) * ring
    return image, outline[..., 0]

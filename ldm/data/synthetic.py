"""A seeded procedural data set of simple objects with known attributes, for the consistency demo.

Every image shows one object (a chair, table, lamp or vase, drawn in side view) on a plain light
background with a soft floor shadow. Each object has a colour, a surface pattern, a size, a position
and a facing direction, all known exactly, so an evaluation can check what a generated image shows.
Captions always name the class and sometimes the colour and/or the pattern; what a caption leaves
out is what batch-shared attention is meant to make consistent across a batch.

Conventions
- Images from `render` are uint8 arrays (H, W, 3). `SyntheticObjects` returns float32 tensors
  (H, W, 3) in [-1, 1], the CompVis batch layout (the models permute to (B, 3, H, W) themselves).
- Position `x`, `y` is the offset of the centre of the object's bounding box from the image centre,
  as a fraction of the image side; +x is right, +y is down (image rows).
- Sizes are named; `SIZES` maps each name to a scale factor of the object's longest side.
- `facing` is the side the object's front points to. Shapes are drawn facing right and mirrored.
- Patterns are laid out in image coordinates with a period of an eighth of the image side (8 px at
  64 px), so they stay equally visible on small and large objects.
- Only numpy and PIL are used; nothing is downloaded. Item i of a data set depends only on
  (seed, i), so data sets can be split across workers or regenerated anywhere.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

CLASSES: tuple[str, ...] = ("chair", "table", "lamp", "vase")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 200, 20),
    "green": (35, 150, 55),
    "blue": (35, 80, 215),
    "purple": (130, 50, 180),
}
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checked")
SIZES: dict[str, float] = {"small": 0.6, "medium": 0.8, "large": 1.0}
FACINGS: tuple[str, ...] = ("left", "right")
# Attributes a caption may name besides the class (always named).
MENTIONABLE: tuple[str, ...] = ("colour", "pattern")
DEFAULT_MENTION_PROBS: dict[tuple[str, ...], float] = {
    (): 0.4, ("colour",): 0.2, ("pattern",): 0.2, ("colour", "pattern"): 0.2,
}

BACKGROUND = np.array((238, 235, 228), dtype=np.float32)
SHADOW = np.array((170, 168, 162), dtype=np.float32)
# Longest side of a "large" object as a fraction of the image side.
OBJECT_FRACTION = 0.62
# Empty border kept around an object whose position was sampled (fraction of the image side); the
# bottom keeps more room for the shadow.
MARGIN_X, MARGIN_Y = 0.04, 0.06
# Shapes are drawn this many times larger and box-filtered down, for smooth edges at 64 px.
SUPERSAMPLE = 4
PATTERN_PERIODS_PER_IMAGE = 8
# The pattern's second colour: the object colour mixed with white, so the named colour still dominates.
TINT_WHITE = 0.65

# Caption words: the pattern "solid" is called "plain" in captions, which reads naturally.
PATTERN_WORDS = {"solid": "plain", "striped": "striped", "dotted": "dotted", "checked": "checked"}
_CLASS_WORDS = {**{c: c for c in CLASSES}, **{c + "s": c for c in CLASSES}}
_COLOUR_WORDS = {c: c for c in COLOURS}
_PATTERN_PROMPT_WORDS = {
    "plain": "solid", "solid": "solid",
    "striped": "striped", "stripes": "striped", "stripy": "striped",
    "dotted": "dotted", "dots": "dotted", "spotted": "dotted", "polka": "dotted",
    "checked": "checked", "checkered": "checked", "chequered": "checked", "checks": "checked",
}


class Primitive(NamedTuple):
    """One piece of a silhouette in object units: "polygon" (points), "ellipse" (two corners) or
    "line" (points, stroke width)."""
    kind: str
    points: tuple[tuple[float, float], ...]
    width: float = 0.0


def _rect(u0: float, v0: float, u1: float, v1: float) -> Primitive:
    return Primitive("polygon", ((u0, v0), (u1, v0), (u1, v1), (u0, v1)))


# Side views facing right, in units where roughly 1 is the object's longest side, v pointing down.
# They are recentred and rescaled below; the asymmetric parts (chair back, desk drawers, lamp arm,
# vase handle) are what makes `facing` visible.
_RAW_SHAPES: dict[str, tuple[Primitive, ...]] = {
    "chair": (
        Primitive("polygon", ((-0.36, -0.50), (-0.17, -0.50), (-0.10, 0.05), (-0.28, 0.05))),  # back
        Primitive("polygon", ((-0.30, -0.03), (0.30, -0.03), (0.34, 0.13), (-0.30, 0.13))),  # seat
        Primitive("line", ((-0.24, 0.10), (-0.30, 0.50)), 0.08),  # back leg
        Primitive("line", ((0.26, 0.10), (0.29, 0.50)), 0.08),  # front leg
    ),
    "table": (
        _rect(-0.50, -0.30, 0.50, -0.17),  # top
        _rect(-0.45, -0.17, -0.36, 0.30),  # leg
        _rect(0.06, -0.17, 0.45, 0.05),  # upper drawer
        _rect(0.06, 0.08, 0.45, 0.30),  # lower drawer
    ),
    "lamp": (
        Primitive("ellipse", ((-0.34, 0.40), (0.04, 0.52))),  # base
        Primitive("line", ((-0.15, 0.44), (-0.26, -0.06), (0.06, -0.36)), 0.06),  # arm
        Primitive("polygon", ((0.03, -0.37), (0.13, -0.43), (0.48, -0.16), (0.15, 0.06))),  # shade, a cone
    ),
    "vase": (
        Primitive("ellipse", ((-0.26, -0.12), (0.26, 0.50))),  # body
        _rect(-0.11, -0.38, 0.11, -0.02),  # neck
        _rect(-0.17, -0.46, 0.17, -0.37),  # lip
        Primitive("line", ((-0.10, -0.30), (-0.30, -0.26), (-0.36, -0.12), (-0.24, 0.04)), 0.07),  # handle
    ),
}


def _bounds(prims: tuple[Primitive, ...]) -> tuple[float, float, float, float]:
    us, vs = [], []
    for p in prims:
        pad = p.width / 2
        us += [u - pad for u, _ in p.points] + [u + pad for u, _ in p.points]
        vs += [v - pad for _, v in p.points] + [v + pad for _, v in p.points]
    return min(us), min(vs), max(us), max(vs)


def _normalise(prims: tuple[Primitive, ...]) -> tuple[tuple[Primitive, ...], tuple[float, float]]:
    """Centre a shape's bounding box on the origin and scale its longest side to 1; also return its
    half extents (half width, half height)."""
    u0, v0, u1, v1 = _bounds(prims)
    cu, cv, k = (u0 + u1) / 2, (v0 + v1) / 2, 1.0 / max(u1 - u0, v1 - v0)
    out = tuple(Primitive(p.kind, tuple(((u - cu) * k, (v - cv) * k) for u, v in p.points), p.width * k)
                for p in prims)
    return out, ((u1 - u0) * k / 2, (v1 - v0) * k / 2)


SHAPES: dict[str, tuple[Primitive, ...]] = {c: _normalise(p)[0] for c, p in _RAW_SHAPES.items()}
SHAPE_EXTENTS: dict[str, tuple[float, float]] = {c: _normalise(p)[1] for c, p in _RAW_SHAPES.items()}


@dataclass(frozen=True)
class Attributes:
    """Ground truth of one image; `x`, `y` follow the module's position convention."""
    cls: str
    colour: str
    pattern: str
    size: str
    x: float
    y: float
    facing: str

    def __post_init__(self) -> None:
        for name, allowed in (("cls", CLASSES), ("colour", COLOURS), ("pattern", PATTERNS),
                              ("size", SIZES), ("facing", FACINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Attributes.{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        for name in ("x", "y"):
            if not -0.5 <= getattr(self, name) <= 0.5:
                raise ValueError(f"Attributes.{name}={getattr(self, name)} puts the object centre outside "
                                 "the image; use an offset in [-0.5, 0.5] (fraction of the image side)")

    @property
    def scale(self) -> float:
        return SIZES[self.size]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with the field names as keys; `Attributes(**d)` rebuilds it."""
        return asdict(self)


def position_limits(cls: str, size: str) -> tuple[float, float]:
    """Largest |x| and |y| that keep an object of this class and size (and its shadow) inside the image."""
    half_w, half_h = SHAPE_EXTENTS[cls]
    extent = SIZES[size] * OBJECT_FRACTION
    return 0.5 - half_w * extent - MARGIN_X, 0.5 - half_h * extent - MARGIN_Y


def sample_attributes(rng: np.random.Generator, **fixed: Any) -> Attributes:
    """Draw random attributes, keeping those given in `fixed` (e.g. `cls="chair"`).

    The same random numbers are drawn whatever is fixed, so fixing one attribute leaves the others
    of a seeded draw unchanged (positions are drawn as fractions of the safe range, which depends on
    class and size).
    """
    unknown = set(fixed) - {f.name for f in fields(Attributes)}
    if unknown:
        raise TypeError(f"sample_attributes got unknown attributes {sorted(unknown)}; "
                        f"fixable ones are {[f.name for f in fields(Attributes)]}")
    drawn = {
        "cls": CLASSES[rng.integers(len(CLASSES))],
        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
        "pattern": PATTERNS[rng.integers(len(PATTERNS))],
        "size": list(SIZES)[rng.integers(len(SIZES))],
        "facing": FACINGS[rng.integers(len(FACINGS))],
    }
    unit_x, unit_y = rng.uniform(-1.0, 1.0, size=2)
    drawn.update({k: v for k, v in fixed.items() if k not in ("x", "y")})
    centred = Attributes(**drawn, x=0.0, y=0.0)  # validates the fixed values before they are used
    limit_x, limit_y = position_limits(centred.cls, centred.size)
    return replace(centred, x=float(fixed.get("x", unit_x * limit_x)), y=float(fixed.get("y", unit_y * limit_y)))


# Pair images (`SyntheticObjects(pair_fraction=...)`): two instances of one object, the same class,
# colour and pattern, each with its own size, facing and place, one in each half of the image, drawn at
# this fraction of the usual size so both fit.
PAIR_SCALE = 0.55


def sample_pair(rng: np.random.Generator) -> tuple[Attributes, Attributes]:
    """Two instances of one object (same class, colour, pattern) for the left and right half of an image
    drawn with `render_scene(pair, scale=PAIR_SCALE)`; size, facing and position are drawn per instance."""
    first = sample_attributes(rng)
    second = sample_attributes(rng, cls=first.cls, colour=first.colour, pattern=first.pattern)
    placed = []
    for attrs, side in ((first, -1.0), (second, 1.0)):
        half_w, half_h = SHAPE_EXTENTS[attrs.cls]
        extent = attrs.scale * PAIR_SCALE * OBJECT_FRACTION
        inner, outer = half_w * extent + 0.01, 0.5 - half_w * extent - MARGIN_X  # |x| range within the half
        limit_y = 0.5 - half_h * extent - MARGIN_Y
        x = side * rng.uniform(inner, outer)
        y = rng.uniform(-limit_y, limit_y)
        placed.append(replace(attrs, x=float(x), y=float(y)))
    return placed[0], placed[1]


def draw_primitives(draw: ImageDraw.ImageDraw, primitives: tuple[Primitive, ...], centre: tuple[float, float],
                     side: float, mirror: bool) -> None:
    """Draw shape primitives given in object units (longest side 1, facing right) onto a mask."""
    cx, cy = centre
    sign = -1.0 if mirror else 1.0

    def to_pixels(points):
        return [(cx + sign * u * side, cy + v * side) for u, v in points]

    for prim in primitives:
        if prim.kind == "polygon":
            draw.polygon(to_pixels(prim.points), fill=255)
        elif prim.kind == "ellipse":
            (x0, y0), (x1, y1) = to_pixels(prim.points)
            draw.ellipse((min(x0, x1), y0, max(x0, x1), y1), fill=255)
        elif prim.kind == "line":
            width = max(1, round(prim.width * side))
            draw.line(to_pixels(prim.points), fill=255, width=width, joint="curve")
            # Round caps, so thick strokes meet without notches.
            for px, py in to_pixels(prim.points):
                draw.ellipse((px - width / 2, py - width / 2, px + width / 2, py + width / 2), fill=255)
        else:
            raise ValueError(f"unknown primitive kind {prim.kind!r}")


def _downsample_mask(mask: Image.Image, size: int) -> np.ndarray:
    """Supersampled L mask -> float coverage in [0, 1] of shape (size, size)."""
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


@lru_cache(maxsize=256)
def pattern_texture(pattern: str, colour: str, size: int) -> np.ndarray:
    """Full-frame pattern in the object's colours, float32 (size, size, 3); cached since it is per (pattern, colour)."""
    big = size * SUPERSAMPLE
    period = big / PATTERN_PERIODS_PER_IMAGE
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) + 0.5  # (big, big) each
    if pattern == "solid":
        second = np.zeros((big, big), dtype=bool)
    elif pattern == "striped":
        # Diagonal stripes, so thin vertical and horizontal parts (legs, table tops) still show them.
        second = ((xx + yy) % period) < period / 2
    elif pattern == "dotted":
        dx = (xx % period) - period / 2
        dy = (yy % period) - period / 2
        second = dx * dx + dy * dy < (0.28 * period) ** 2
    elif pattern == "checked":
        cell = period / 2
        second = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2) == 1
    else:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    base = np.array(COLOURS[colour], dtype=np.float32)
    tint = TINT_WHITE * 255.0 + (1 - TINT_WHITE) * base
    coverage = np.asarray(Image.fromarray((second * 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255.0  # (size, size, 1)
    texture = base * (1 - coverage) + tint * coverage
    texture.setflags(write=False)
    return texture


def render(attrs: Attributes, size: int = 64) -> np.ndarray:
    """Draw the object `attrs` describes; returns uint8 (size, size, 3)."""
    return render_scene([attrs], size)


def render_scene(objects: Sequence[Attributes], size: int = 64, scale: float = 1.0) -> np.ndarray:
    """Draw several objects, in order, on one background, each `scale` times its usual size; uint8 (size, size, 3)."""
    image = np.broadcast_to(BACKGROUND, (size, size, 3)).copy()
    for attrs in objects:
        image = _draw_object(image, attrs, size, scale)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _draw_object(image: np.ndarray, attrs: Attributes, size: int, scale: float) -> np.ndarray:
    """Composite one object (shadow, outline, patterned fill) over a float32 image (size, size, 3)."""
    big = size * SUPERSAMPLE
    side = attrs.scale * scale * OBJECT_FRACTION * big
    centre = ((0.5 + attrs.x) * big, (0.5 + attrs.y) * big)
    half_w, half_h = SHAPE_EXTENTS[attrs.cls]

    shape_mask = Image.new("L", (big, big), 0)
    draw_primitives(ImageDraw.Draw(shape_mask), SHAPES[attrs.cls], centre, side, attrs.facing == "left")
    alpha = _downsample_mask(shape_mask, size)[..., None]  # (size, size, 1)

    shadow_mask = Image.new("L", (big, big), 0)
    floor = centre[1] + half_h * side
    shadow_half_w, shadow_half_h = 1.1 * half_w * side, 0.05 * side
    ImageDraw.Draw(shadow_mask).ellipse((centre[0] - shadow_half_w, floor - shadow_half_h,
                                         centre[0] + shadow_half_w, floor + shadow_half_h), fill=255)
    shadow = 0.5 * _downsample_mask(shadow_mask, size)[..., None]

    # A dark outline, one output pixel wide at 64 px, keeps light patterns from dissolving the silhouette
    # into the background.
    grow = 2 * max(1, size // 64) + 1
    outline = np.asarray(Image.fromarray((alpha[..., 0] * 255).astype(np.uint8)).filter(
        ImageFilter.MaxFilter(grow)), dtype=np.float32)[..., None] / 255.0
    dark = 0.45 * np.array(COLOURS[attrs.colour], dtype=np.float32)

    image = image * (1 - shadow) + SHADOW * shadow
    image = image * (1 - outline) + dark * outline
    return image * (1 - alpha) + pattern_texture(attrs.pattern, attrs.colour, size) * alpha


def caption(attrs: Attributes, mention: set[str] | frozenset[str] | tuple[str, ...] = (), count: int = 1) -> str:
    """Caption naming the class and the attributes in `mention` (a subset of MENTIONABLE).

    "a chair", "a red chair", "a striped chair", "a red striped chair", "a plain red chair"; with
    `count=2`: "two chairs", "two red striped chairs".
    """
    extra = set(mention) - set(MENTIONABLE)
    if extra:
        raise ValueError(f"caption cannot mention {sorted(extra)}; choose from {list(MENTIONABLE)}")
    words = []
    if "colour" in mention:
        words.append(attrs.colour)
    if "pattern" in mention:
        # Adjective order: "plain" reads before a colour, the pattern adjectives after it.
        if attrs.pattern == "solid":
            words.insert(0, PATTERN_WORDS[attrs.pattern])
        else:
            words.append(PATTERN_WORDS[attrs.pattern])
    if count not in (1, 2):
        raise ValueError(f"captions describe one or two objects, got count={count}")
    words.append(attrs.cls if count == 1 else attrs.cls + "s")
    article = "two" if count == 2 else "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def parse_prompt(prompt: str) -> dict[str, Optional[str]]:
    """Which class, colour and pattern a prompt names: {"cls", "colour", "pattern"}, None where unnamed.

    Accepts the caption vocabulary plus a few synonyms ("stripes", "spotted", "checkered", plurals).
    A prompt naming two different values of one attribute is ambiguous and raises ValueError.
    """
    found: dict[str, Optional[str]] = {"cls": None, "colour": None, "pattern": None}
    vocab = {"cls": _CLASS_WORDS, "colour": _COLOUR_WORDS, "pattern": _PATTERN_PROMPT_WORDS}
    for word in re.findall(r"[a-z]+", prompt.lower()):
        for key, table in vocab.items():
            value = table.get(word)
            if value is None:
                continue
            if found[key] not in (None, value):
                raise ValueError(f"prompt {prompt!r} names two values for {key}: {found[key]!r} and {value!r}; "
                                 "the evaluation needs prompts about a single object")
            found[key] = value
    return found


def _check_mention_probs(mention_probs: Mapping[tuple[str, ...], float]) -> None:
    for mention in mention_probs:
        if not set(mention) <= set(MENTIONABLE):
            raise ValueError(f"mention_probs key {mention!r} names attributes outside {list(MENTIONABLE)}")
    total = sum(mention_probs.values())
    if abs(total - 1.0) > 1e-6 or min(mention_probs.values()) < 0:
        raise ValueError(f"mention_probs must be non-negative and sum to 1, got {dict(mention_probs)} (sum {total})")


class SyntheticObjects(Dataset):
    """`length` seeded items {"image": float32 (size, size, 3) in [-1, 1], "txt": str, "attributes": dict}.

    Item i depends only on (seed, i). `mention_probs` maps each tuple of attribute names a caption may
    name (besides the class) to its probability; the default is 40% class only, 20% colour, 20% pattern,
    20% both.
    """

    def __init__(self, length: int, seed: int = 0, size: int = 64,
                 mention_probs: Optional[Mapping[tuple[str, ...], float]] = None, pair_fraction: float = 0.0) -> None:
        if length < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        if not 0.0 <= pair_fraction <= 1.0:
            raise ValueError(f"pair_fraction must be between 0 and 1, got {pair_fraction}")
        self.pair_fraction = float(pair_fraction)
        self.length = length
        self.seed = seed
        self.size = size
        self.mention_probs = dict(DEFAULT_MENTION_PROBS if mention_probs is None else mention_probs)
        _check_mention_probs(self.mention_probs)
        self._mentions = list(self.mention_probs)
        self._probs = np.array([self.mention_probs[m] for m in self._mentions], dtype=np.float64)

    def __len__(self) -> int:
        return self.length

    def attributes(self, index: int) -> tuple[Attributes, tuple[str, ...]]:
        """Ground truth and mentioned attributes of item `index`, without rendering it."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a data set of length {self.length}")
        rng = np.random.default_rng([self.seed, index])
        attrs = sample_attributes(rng)
        mention = self._mentions[rng.choice(len(self._mentions), p=self._probs)]
        return attrs, mention

    def is_pair(self, index: int) -> bool:
        """Whether item `index` shows two instances of its object. Drawn from its own random stream, so
        with pair_fraction 0 every item is exactly what it was before pairs existed."""
        return self.pair_fraction > 0 and np.random.default_rng([self.seed, index, 1]).random() < self.pair_fraction

    def __getitem__(self, index: int) -> dict[str, Any]:
        attrs, mention = self.attributes(index)
        if self.is_pair(index):
            first, second = sample_pair(np.random.default_rng([self.seed, index, 2]))
            first = replace(first, cls=attrs.cls, colour=attrs.colour, pattern=attrs.pattern)
            second = replace(second, cls=attrs.cls, colour=attrs.colour, pattern=attrs.pattern)
            pixels, count = render_scene([first, second], self.size, scale=PAIR_SCALE), 2
        else:
            pixels, count = render(attrs, self.size), 1
        image = torch.from_numpy(pixels).float() / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
        return {"image": image, "txt": caption(attrs, set(mention), count=count), "attributes": attrs.to_dict(),
                "count": count}

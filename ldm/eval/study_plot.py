"""The subject-aware sharing study read back: configuration means, the Pareto front, the recommended
setting, and the plot of subject consistency against background diversity.

Input: the `results.csv` of a `--world v2` run of scripts/eval_consistency.py (one row per configuration
and seed; columns `configuration`, `seed` and the metrics of `ldm.eval.metrics_v2`) and, beside it,
its `timing.csv` (`sec_per_image`, for ties). The axes: subject consistency = `agreement`, background
diversity = `bg_diversity`; prompt alignment = `acc_subject` (class) and `acc_specified` (every other
named attribute, the backgrounds a story names included). Each configuration is summarised by its
mean over seeds.

The selection rule (RECOMMENDATION_RULE, fixed before any study result was seen) is in
scripts/plot_study.py's docstring and ANSWERS.md.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from ldm.errors import InvalidValue

X_METRIC, Y_METRIC = "agreement", "bg_diversity"
ALIGNMENT_METRICS = ("acc_subject", "acc_specified")
ALIGNMENT_TOLERANCE = 0.05
REQUIRED_COLUMNS = ("configuration", "seed", X_METRIC, Y_METRIC, *ALIGNMENT_METRICS)
RECOMMENDATION_RULE = (
    "Among the sharing configurations (not 'off') on the Pareto front of subject consistency (agreement, "
    "higher is better) against background diversity (bg_diversity, higher is better), each the mean over "
    f"seeds, keep those whose prompt alignment is within {ALIGNMENT_TOLERANCE} of 'off' on both acc_subject "
    "and acc_specified (mean over seeds, no lower than off's minus 0.05); recommend the one with the highest "
    "agreement. Ties (equal agreement to 3 decimals): the lower sec_per_image of timing.csv, then the "
    "earlier in the run's order. If none qualifies, nothing is recommended. The cost at 512 px of the "
    "recommended setting is then read from benchmarks/shared_attention_cost.py and reported as it is.")


@dataclass(frozen=True)
class ConfigurationMeans:
    """Means over seeds of one configuration (NaN where no seed has a value)."""

    name: str
    x: float
    y: float
    acc_subject: float
    acc_specified: float
    sec_per_image: float = math.nan


def _mean(values: Sequence[str]) -> float:
    numbers = [float(v) for v in values if v != ""]
    return sum(numbers) / len(numbers) if numbers else math.nan


def read_means(results_csv: Path) -> list[ConfigurationMeans]:
    """Per configuration (in the file's order), the means over seeds of the study's metrics; the timing
    from timing.csv beside it if present. InvalidValue (field `results`) for a file without the columns."""
    with open(results_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    missing = [c for c in REQUIRED_COLUMNS if not rows or c not in rows[0]]
    if missing:
        raise InvalidValue("results", results_csv, f"has no {', '.join(missing)} column(s) or no rows; give the "
                                                    "results.csv of a --world v2 run of scripts/eval_consistency.py")
    timing: dict[str, list[str]] = {}
    timing_csv = Path(results_csv).with_name("timing.csv")
    if timing_csv.is_file():
        with open(timing_csv, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                timing.setdefault(row["configuration"], []).append(row.get("sec_per_image", ""))
    names = list(dict.fromkeys(r["configuration"] for r in rows))
    out = []
    for name in names:
        mine = [r for r in rows if r["configuration"] == name]
        means = [_mean([r[column] for r in mine]) for column in (X_METRIC, Y_METRIC, *ALIGNMENT_METRICS)]
        out.append(ConfigurationMeans(name, *means, sec_per_image=_mean(timing.get(name, []))))
    return out


def pareto_front(points: Sequence[ConfigurationMeans]) -> list[str]:
    """Names of the points no other point dominates (at least as high on x and y, higher on one); points
    with a NaN coordinate are never on the front."""
    valid = [p for p in points if not (math.isnan(p.x) or math.isnan(p.y))]
    return [p.name for p in valid
            if not any(o.x >= p.x and o.y >= p.y and (o.x > p.x or o.y > p.y) for o in valid)]


def aligned(point: ConfigurationMeans, off: ConfigurationMeans) -> bool:
    """Prompt alignment within ALIGNMENT_TOLERANCE of 'off' on both alignment metrics (NaN in off: not judged)."""
    for own, reference in ((point.acc_subject, off.acc_subject), (point.acc_specified, off.acc_specified)):
        if math.isnan(reference):
            continue
        if math.isnan(own) or own < reference - ALIGNMENT_TOLERANCE - 1e-12:
            return False
    return True


def recommend(points: Sequence[ConfigurationMeans]) -> Optional[str]:
    """The configuration RECOMMENDATION_RULE picks, or None; needs an 'off' row."""
    by_name = {p.name: p for p in points}
    if "off" not in by_name:
        raise InvalidValue("configurations", sorted(by_name), "have no 'off', which the rule needs to judge prompt "
                                                              "alignment; run the study with 'off'")
    front = set(pareto_front(points))
    eligible = [(order, p) for order, p in enumerate(points)
                if p.name != "off" and p.name in front and aligned(p, by_name["off"])]
    if not eligible:
        return None

    def key(item: tuple[int, ConfigurationMeans]) -> tuple[float, float, int]:
        order, p = item
        cost = p.sec_per_image if not math.isnan(p.sec_per_image) else math.inf
        return (-round(p.x, 3), cost, order)
    return min(eligible, key=key)[1].name


# ---------------------------------------------------------------------------------------------------
# The plot
# ---------------------------------------------------------------------------------------------------
SIZE = (1000, 800)
MARGIN = (90, 40, 60, 110)  # left, top, right, bottom
FONT_SIZE = 14


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow before 10.1: the bitmap font
        return ImageFont.load_default()


def _range(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = max(0.05, (high - low) * 0.15)
    return max(0.0, low - pad), min(1.0, high + pad) if high <= 1.0 else high + pad


def alignment_colour(change: float) -> tuple[int, int, int]:
    """Blue for no loss of acc_specified against 'off' (or a gain), through purple to red at a loss of
    0.1 or more; grey where it is unknown."""
    if math.isnan(change):
        return (140, 140, 140)
    loss = min(1.0, max(0.0, -change / 0.1))
    return (int(40 + 200 * loss), 60, int(220 - 180 * loss))


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def label_position(draw: ImageDraw.ImageDraw, font: Any, text: str, point: tuple[float, float], prefer_left: bool,
                   taken: Sequence[tuple[float, float, float, float]]
                   ) -> tuple[tuple[float, float], str, tuple[float, float, float, float]]:
    """Where a point's label goes: beside it on the preferred side, else on the other side, else moved
    up or down by whole lines, the first place whose box meets no label in `taken` (the beside-it
    place when none is free). Returns (xy, PIL anchor, the label's box there)."""
    cx, cy = point
    sides = [(cx - 18, "rm"), (cx + 18, "lm")] if prefer_left else [(cx + 18, "lm"), (cx - 18, "rm")]
    line = FONT_SIZE + 4
    for shift in (0, 1, -1, 2, -2, 3, -3):
        for x, anchor in sides:
            xy = (x, cy - 2 + shift * line)
            box = draw.textbbox(xy, text, font=font, anchor=anchor)
            if not any(_overlaps(box, other) for other in taken):
                return xy, anchor, box
    xy, anchor = (sides[0][0], cy - 2), sides[0][1]
    return xy, anchor, draw.textbbox(xy, text, font=font, anchor=anchor)


def draw_study(points: Sequence[ConfigurationMeans], title: str) -> Image.Image:
    """Subject consistency (x) against background diversity (y), one labelled point per configuration with
    its alignment; the Pareto front joined and ringed; the recommended configuration boxed."""
    shown = [p for p in points if not (math.isnan(p.x) or math.isnan(p.y))]
    if not shown:
        raise InvalidValue("results", title, "has no configuration with both agreement and bg_diversity")
    image = Image.new("RGB", SIZE, "white")
    draw, font = ImageDraw.Draw(image), _font()
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    (x0, x1), (y0, y1) = _range([p.x for p in shown]), _range([p.y for p in shown])

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    draw.rectangle((left, top, right, bottom), outline="black")
    for i in range(6):  # ticks and light grid lines
        fx, fy = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        px, _ = at(fx, y0)
        _, py = at(x0, fy)
        draw.line((px, top, px, bottom), fill=(232, 232, 232))
        draw.line((left, py, right, py), fill=(232, 232, 232))
        draw.text((px, bottom + 6), f"{fx:.2f}", fill="black", font=font, anchor="mt")
        draw.text((left - 6, py), f"{fy:.2f}", fill="black", font=font, anchor="rm")
    draw.text(((left + right) / 2, bottom + 36), "subject consistency (agreement, mean over seeds)", fill="black",
              font=font, anchor="mm")
    draw.text((12, top - 24), "background diversity (bg_diversity)", fill="black", font=font, anchor="lm")
    draw.text((right, top - 24), title, fill="black", font=font, anchor="rm")

    front = pareto_front(shown)
    front_points = sorted((p for p in shown if p.name in front), key=lambda p: p.x)
    if len(front_points) > 1:
        draw.line([at(p.x, p.y) for p in front_points], fill=(0, 150, 0), width=2)
    off = next((p for p in points if p.name == "off"), None)
    chosen = recommend(points) if off is not None else None
    for p in shown:
        cx, cy = at(p.x, p.y)
        change = p.acc_specified - off.acc_specified if off is not None else math.nan
        radius = 7
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=alignment_colour(change))
        if p.name in front:
            draw.ellipse((cx - 11, cy - 11, cx + 11, cy + 11), outline=(0, 150, 0), width=2)
        if p.name == chosen:
            draw.rectangle((cx - 15, cy - 15, cx + 15, cy + 15), outline="black", width=2)
    taken: list[tuple[float, float, float, float]] = []  # boxes of the labels drawn so far
    for p in shown:
        cx, cy = at(p.x, p.y)
        alignment = "" if math.isnan(p.acc_specified) else f" ({p.acc_specified:.2f})"
        prefer_left = cx > left + 0.7 * (right - left)  # near the right edge the label goes left of its point
        xy, anchor, box = label_position(draw, font, p.name + alignment, (cx, cy), prefer_left, taken)
        taken.append(box)
        draw.text(xy, p.name + alignment, fill="black", font=font, anchor=anchor)
    legend = ("(number) = acc_specified, the prompt alignment of the named attributes; colour: blue = as 'off', "
              "red = 0.1 or more below it", "green ring and line = Pareto front; black box = recommended setting")
    for row, text in enumerate(legend):
        draw.text((left, bottom + 58 + row * (FONT_SIZE + 6)), text, fill=(60, 60, 60), font=font, anchor="lt")
    return image

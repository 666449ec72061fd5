"""Draw a grid of world v2 scenes with their captions, so a reader can see what the demo world v2 looks like.

    PYTHONPATH=. python scripts/render_world_samples.py --out assets/world-v2-samples.png

Each cell is item i of `WorldScenes(seed=--seed, mention_prob=--mention-prob)` at 64 px, shown at
--scale times its size (nearest neighbour, so the pixels the models see stay visible), with the
subject mask's outline drawn over a copy next to it when --masks is given, and its caption below.
The same arguments always give the same file.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from ldm.cli import ArgumentParser, UsageError, run_cli  # noqa: E402
from ldm.data.render import render_scene  # noqa: E402
from ldm.data.prompts import caption  # noqa: E402
from ldm.data.scenes import WorldScenes  # noqa: E402

CAPTION_LINES, LINE_HEIGHT, CHAR_WIDTH = 4, 11, 6  # PIL's default font: about 6 px per character


def mask_outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the mask's border pixels painted white: (H, W, 3) uint8."""
    padded = np.pad(mask, 1)
    inside = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out = image.copy()
    out[mask & ~inside] = 255
    return out


def sample_grid(count: int, columns: int, seed: int, mention_prob: float, scale: int, masks: bool) -> Image.Image:
    data = WorldScenes(count, seed=seed, mention_prob=mention_prob)
    side = 64 * scale
    cell_w = side * (2 if masks else 1) + 8
    cell_h = side + CAPTION_LINES * LINE_HEIGHT + 10
    rows = -(-count // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i in range(count):
        scene, named = data.scene(i)
        drawn = render_scene(scene, 64)
        tiles = [drawn.image] + ([mask_outline(drawn.image, drawn.mask)] if masks else [])
        pixels = np.concatenate(tiles, axis=1)
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        sheet.paste(Image.fromarray(pixels).resize((pixels.shape[1] * scale, side), Image.Resampling.NEAREST), (x, y))
        lines = textwrap.wrap(caption(scene, named), (cell_w - 8) // CHAR_WIDTH)[:CAPTION_LINES]
        for k, line in enumerate(lines):
            draw.text((x, y + side + 3 + k * LINE_HEIGHT), line, fill=(20, 20, 20), font=font)
    return sheet


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="assets/world-v2-samples.png", help="PNG file to write")
    parser.add_argument("--count", type=int, default=24, help="number of scenes")
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="data seed of WorldScenes")
    parser.add_argument("--mention-prob", type=float, default=0.5, help="share of attributes each caption names")
    parser.add_argument("--scale", type=int, default=2, help="display magnification of the 64 px images")
    parser.add_argument("--masks", action="store_true", help="show each scene's subject mask outline beside it")
    opt = parser.parse_args(argv)
    if opt.count < 1 or opt.columns < 1 or opt.scale < 1:
        raise UsageError("--count, --columns and --scale must be at least 1")
    if not 0 <= opt.mention_prob <= 1:
        raise UsageError(f"--mention-prob {opt.mention_prob}: give a probability between 0 and 1")
    if not opt.out.endswith(".png"):
        raise UsageError(f"--out {opt.out}: the grid is written as PNG; give a name ending in .png")
    sheet = sample_grid(opt.count, opt.columns, opt.seed, opt.mention_prob, opt.scale, opt.masks)
    Path(opt.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(opt.out, optimize=True)
    print(f"wrote {opt.out} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    run_cli(main)

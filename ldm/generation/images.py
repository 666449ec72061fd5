"""Pictures: tensors to and from 8-bit images, labelled grids, and the metadata PNGs carry.

- Model images are (B, 3, H, W) in [-1, 1]; pictures are 8-bit RGB PIL images.
- A PNG written by this project carries its settings as text chunks: `prompt`, `negative_prompt` and
  `seed` on their own, and everything under `parameters` as JSON (`read_png_metadata` reads it back).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

LABEL_FONT_SIZE = 13


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> 8-bit RGB images."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in array]


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An image -> (1, 3, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3)
    return array.permute(2, 0, 1)[None].contiguous()  # (1, 3, H, W)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """A mask picture -> (1, 1, H, W) in [0, 1] from its grey levels (white 1 = repaint, black 0 = keep)."""
    grey = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)  # (H, W)
    return grey[None, None]


def label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at a readable size. At its default 10 px a space is 2 px wide and
    "no sharing" reads "nosharing"; Pillow before 10.1 (no size argument) keeps its bitmap font."""
    try:
        return ImageFont.load_default(size=LABEL_FONT_SIZE)
    except TypeError:
        return ImageFont.load_default()


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Optional[Sequence[str]] = None) -> Image.Image:
    """One picture of `rows` of images (rows may differ in length), with a label strip left of each row."""
    if not rows or not any(rows):
        raise ValueError("no images to put in a grid")
    w, h = next(image for row in rows for image in row).size
    n_cols = max(len(row) for row in rows)
    font = label_font()
    label_width = 0
    if row_labels:
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_width = max(8 + int(measure.textlength(label, font=font)) for label in row_labels)
    grid = Image.new("RGB", (label_width + n_cols * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (label_width + c * w, r * h))
        if row_labels:
            top, bottom = font.getbbox(row_labels[r])[1::2]
            draw.text((4, r * h + (h - top - bottom) // 2), row_labels[r], fill="black", font=font)  # centred
    return grid


def png_metadata(values: dict[str, Any]) -> PngInfo:
    """PNG text chunks: prompt and seed on their own, everything as JSON under "parameters"."""
    info = PngInfo()
    for key in ("prompt", "negative_prompt", "seed"):
        if key in values:
            info.add_text(key, str(values[key]))
    info.add_text("parameters", json.dumps(values, sort_keys=True, default=str))
    return info


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The settings a PNG of this project carries ("parameters"); {} for a PNG without them."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get("parameters")
    return json.loads(text) if text else {}

"""Pictures: reading image files safely, tensors to and from 8-bit images, labelled grids, and the
metadata PNGs carry.

- Model images are (B, 3, H, W) in [-1, 1]; pictures are 8-bit RGB PIL images.
- An image file is untrusted input: `read_image_file` reads only a regular file, checks the size its
  header declares (at most MAX_INPUT_PIXELS) before decoding a pixel, and turns whatever the decoder
  raises into one `UnreadableImage`. `to_rgb` converts every mode the pipeline can take correctly
  (16-bit greyscale scaled, not clipped; transparency flattened onto white) and refuses the rest.
- A PNG written by this project carries its settings as text chunks: `prompt`, `negative_prompt` and
  `seed` on their own, and everything under `parameters` as JSON (`read_png_metadata` reads it back).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

LABEL_FONT_SIZE = 13
# The largest picture read (width x height, from its header, before decoding): 8192 x 8192, 192 MiB as
# 8-bit RGB. Larger ones are refused, as are decompression bombs (a 21 KiB PNG declaring 9000 x 9000).
MAX_INPUT_PIXELS = 8192 * 8192
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
IMAGE_HINT = "a picture (PNG, JPEG, ...)"


class UnreadableImage(ValueError):
    """An image file that cannot be used: not an image, damaged, too large, or in a mode with no fixed range."""


def read_image_file(path: str | os.PathLike, what: str = "image", hint: str = IMAGE_HINT,
                    max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """The picture of a regular file, decoded (its PNG text chunks in `.text`), EXIF rotation applied,
    in its own mode (see `to_rgb`); FileNotFoundError, IsADirectoryError, NotARegularFile, or
    UnreadableImage naming what was wrong."""
    from ldm.files import open_regular_file
    with open_regular_file(path, what, hint) as handle:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(handle) as opened:
                    width, height = opened.size
                    if width < 1 or height < 1 or width * height > max_pixels:
                        raise UnreadableImage(f"declares {width}x{height} pixels, more than the {max_pixels:,} this "
                                              "program reads; give a smaller picture")
                    opened.load()
                    text = dict(getattr(opened, "text", {}) or {})
                    image = ImageOps.exif_transpose(opened)
                    image = opened.copy() if image is opened else image  # detached from the file
        except UnreadableImage:
            raise
        except Exception as error:  # noqa: BLE001 - any decoder failure (PIL raises OSError, ValueError,
            # SyntaxError, struct.error, DecompressionBomb*, ...) is one line about this file
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise UnreadableImage(f"is not an image this program can read ({reason}); use PNG or JPEG") from None
    image.text = text  # exif_transpose may copy the image without its chunks
    return image


def to_rgb(image: Image.Image, transparency: str = "white") -> Image.Image:
    """`image` as 8-bit RGB (the image itself when it is RGB already): palette, greyscale, 1-bit, CMYK and
    YCbCr converted; 16-bit greyscale scaled to 8 bits (PIL's own conversion clips it, so a 16-bit
    picture would come out white); transparent pixels flattened onto white (`transparency="white"`)
    or, for a mask, refused (`"refuse"`). UnreadableImage for 32-bit integer and float pixels, whose
    range no format fixes."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and image.format == "PNG"):  # PNG's 16-bit grey, as some PILs open it
        grey = np.round(np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("I", "F"):
        raise UnreadableImage(f"has {'32-bit integer' if mode == 'I' else 'floating-point'} pixels, whose range "
                              "is not fixed; save it as an 8-bit PNG or JPEG")
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if transparency == "refuse":
            if rgba.getchannel("A").getextrema()[0] < 255:
                raise UnreadableImage("has transparent pixels, which a mask cannot mean; give a picture without "
                                      "transparency, white where to repaint")
            return rgba.convert("RGB")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise UnreadableImage(f"has pixels in mode {mode}, which cannot be converted to RGB ({error}); save it as "
                              "an 8-bit PNG or JPEG") from None


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> 8-bit RGB images."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in array]


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An image -> (1, 3, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.asarray(to_rgb(image), dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3)
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
    return metadata_of(read_image_file(path))


def metadata_of(image: Image.Image) -> dict[str, Any]:
    """The settings an image read by `read_image_file` carries; UnreadableImage if they are not JSON."""
    text = getattr(image, "text", {}).get("parameters")
    if not text:
        return {}
    try:
        values = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise UnreadableImage(f"has 'parameters' metadata that is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise UnreadableImage("has 'parameters' metadata that is not a JSON object")
    return values

"""Reading what a user hands a run: prompt files and init images (and masks).

Files are untrusted: only regular files are read (ldm/files.py), a prompt file up to
MAX_PROMPT_FILE_BYTES, an image up to the size its header may declare (`read_image_file`). Errors
speak of the file and its content (FileNotFoundError, IsADirectoryError, NotARegularFile, or
`InvalidValue` with the field `prompt_file` / `init_image` / `mask_image`); a front end adds its own
name for the setting.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from ldm.errors import InvalidValue
from ldm.files import FileTooLarge, read_bytes
from ldm.generation.images import MAX_INPUT_PIXELS, UnreadableImage, read_image_file, to_rgb

MAX_PROMPT_FILE_BYTES = 4 * 2 ** 20  # 1,000 prompts of 2,000 characters fit; a larger file is no prompt list
PROMPT_FILE_HINT = "a text file with one prompt per line"


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a UTF-8 text file, one prompt each, stripped."""
    path = Path(path)
    try:
        text = read_bytes(path, "prompt file", PROMPT_FILE_HINT, MAX_PROMPT_FILE_BYTES).decode("utf-8")
    except FileTooLarge as error:
        raise InvalidValue("prompt_file", path, f"is larger than a prompt file ever needs ({error}); split it") \
            from None
    except UnicodeDecodeError as error:
        raise InvalidValue("prompt_file", path, f"cannot be read as UTF-8 text ({error}); give {PROMPT_FILE_HINT}") \
            from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidValue("prompt_file", path, "the file holds no prompts; write one prompt per line")
    return prompts


def open_image(path: str | os.PathLike, field: str = "init_image", what: str = "init image",
               max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """An image file as 8-bit RGB, its EXIF rotation applied (`to_rgb`: a mask with transparency is
    refused); errors name the setting `field` (`what` in prose)."""
    path = Path(path)
    hint = "the picture to start from (PNG, JPEG, ...)" if field == "init_image" else \
        "a picture (PNG, JPEG, ...), white where to repaint"
    try:
        image = read_image_file(path, what, hint, max_pixels)
        return to_rgb(image, transparency="white" if field == "init_image" else "refuse")
    except UnreadableImage as error:
        raise InvalidValue(field, path, str(error)) from None


def fit_to_multiple(image: Image.Image, multiple: int) -> Image.Image:
    """`image` resized so both sides are multiples of `multiple` (rounded down, at least one multiple),
    as the autoencoder and the UNet need; the image itself when it already fits."""
    width, height = (max(multiple, side - side % multiple) for side in image.size)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)

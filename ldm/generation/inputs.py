"""Reading what a user hands a run: prompt files and init images.

Errors speak of the file and its content (FileNotFoundError, IsADirectoryError, or `InvalidValue` with
the field `prompt_file` / `init_image`); a front end adds its own name for the setting.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.errors import InvalidValue


def _existing_file(path: Path, what: str, hint: str) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give {hint}")
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist; give {hint}")


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a UTF-8 text file, one prompt each, stripped."""
    path = Path(path)
    _existing_file(path, "prompt file", "a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidValue("prompt_file", path, f"cannot be read as UTF-8 text ({error}); give a text file "
                                                "with one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidValue("prompt_file", path, "the file holds no prompts; write one prompt per line")
    return prompts


def open_image(path: str | os.PathLike, field: str = "init_image", what: str = "init image") -> Image.Image:
    """An image file as RGB, its EXIF rotation applied; errors name the setting `field` (`what` in prose)."""
    path = Path(path)
    hint = "the picture to start from (PNG, JPEG, ...)" if field == "init_image" else \
        "a picture (PNG, JPEG, ...), white where to repaint"
    _existing_file(path, what, hint)
    try:
        with Image.open(path) as opened:
            return ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise InvalidValue(field, path, f"is not an image this program can read ({error}); "
                                               "use PNG or JPEG") from None


def fit_to_multiple(image: Image.Image, multiple: int) -> Image.Image:
    """`image` resized so both sides are multiples of `multiple` (rounded down, at least one multiple),
    as the autoencoder and the UNet need; the image itself when it already fits."""
    width, height = (max(multiple, side - side % multiple) for side in image.size)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)

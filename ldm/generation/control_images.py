"""Reading control images, the hints a ControlNet follows (a pose skeleton, an edge or depth map, ...).

A run takes one control image for every image of a batch, or one per image (a pose per frame). Each must have
the size of the images to generate, since a ControlNet reads its hint at pixel resolution (8 pixels per
latent), and be an RGB or grey picture: greyscale, 1-bit and palette images (without transparency) become RGB
without loss; images with transparency, CMYK or 16-bit ones are refused rather than converted in a way the
user did not choose. Everything is checked from the files' headers before any pixel is decoded, and before any
weights load. Errors name the setting `control_image` (`InvalidValue`), or are FileNotFoundError /
IsADirectoryError for paths.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.errors import InvalidValue

FIELD = "control_image"
LOSSLESS_TO_RGB = ("RGB", "L", "1", "P")  # modes that become RGB without losing or inventing anything
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def read_control_images(paths: Sequence[str | os.PathLike], width: int, height: int, batch_size: int) -> torch.Tensor:
    """The hints of `paths` as (N, 3, height, width) in [0, 1]; N = 1 (for every image) or `batch_size`."""
    paths = list(paths)
    if len(paths) not in (1, batch_size):
        raise InvalidValue(FIELD, len(paths), f"give one control image for every image, or one per image of the "
                                              f"batch ({batch_size}), not {len(paths)}")
    images = [read_control_image(path, width, height) for path in paths]
    return torch.stack([hint_tensor(image) for image in images])  # (N, 3, H, W)


def read_control_image(path: str | os.PathLike, width: int, height: int) -> Image.Image:
    """The control image at `path` as RGB, its EXIF rotation applied, after checking its mode and size."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"control image {path} is a folder; give a picture (PNG, JPEG, ...)")
    if not path.exists():
        raise FileNotFoundError(f"control image {path} does not exist; give a picture (PNG, JPEG, ...)")
    try:
        with Image.open(path) as opened:  # reads the header only
            _check_mode(opened, path)
            size = _displayed_size(opened)
            if size != (width, height):
                raise InvalidValue(FIELD, path, f"is {size[0]}x{size[1]}, the images are {width}x{height} (width x "
                                                "height); give a control image of the images' size")
            return ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise InvalidValue(FIELD, path, f"is not an image this program can read ({error}); use PNG or JPEG") from None


def hint_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image -> (3, H, W) in [0, 1], as ControlNets read their hints."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (H, W, 3)
    return array.permute(2, 0, 1).contiguous()  # (3, H, W)


def _check_mode(image: Image.Image, path: Path) -> None:
    transparent = "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "RGBa", "La")
    if transparent:
        raise InvalidValue(FIELD, path, f"has transparency (mode {image.mode}), which a ControlNet cannot read; "
                                        "save it as RGB or greyscale without an alpha channel")
    if image.mode not in LOSSLESS_TO_RGB:
        raise InvalidValue(FIELD, path, f"is a {image.mode} image; save it as 8-bit RGB or greyscale")


def _displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF rotation is applied, read from the header."""
    width, height = image.size
    if image.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS:
        return height, width
    return width, height

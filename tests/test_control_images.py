"""Control images: read as hints in [0, 1], and refused in one line (before any weights load) when their
count, size, mode or file is wrong."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import InvalidValue
from ldm.generation.control_images import read_control_images


def save(path, image: Image.Image, **kwargs):
    image.save(path, **kwargs)
    return path


def gradient(mode: str = "RGB", size=(64, 32)) -> Image.Image:
    array = np.arange(size[0] * size[1] * 3, dtype=np.uint8).reshape(size[1], size[0], 3)
    return Image.fromarray(array, "RGB").convert(mode)


def test_an_rgb_image_becomes_a_hint_of_its_pixels_over_255(tmp_path):
    image = gradient()
    hints = read_control_images([save(tmp_path / "pose.png", image)], 64, 32, batch_size=4)
    assert hints.shape == (1, 3, 32, 64)
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255
    assert torch.equal(hints[0], expected)


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_grey_bilevel_and_palette_images_become_rgb_without_loss(tmp_path, mode):
    image = gradient(mode)
    hints = read_control_images([save(tmp_path / f"map-{mode}.png", image)], 64, 32, batch_size=1)
    expected = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255
    assert torch.equal(hints[0], expected)


def test_one_image_per_image_of_the_batch_keeps_their_order(tmp_path):
    paths = [save(tmp_path / f"{i}.png", Image.new("RGB", (64, 32), (i * 40, 0, 0))) for i in range(3)]
    hints = read_control_images(paths, 64, 32, batch_size=3)
    assert hints[:, 0, 0, 0].tolist() == pytest.approx([0, 40 / 255, 80 / 255])


def test_a_count_that_is_neither_one_nor_the_batch_is_refused(tmp_path):
    paths = [save(tmp_path / f"{i}.png", gradient()) for i in range(3)]
    with pytest.raises(InvalidValue, match=r"control_image=3: give one control image for every image, or one per "
                                           r"image of the batch \(2\), not 3"):
        read_control_images(paths, 64, 32, batch_size=2)


def test_an_image_of_another_size_is_refused_naming_both_sizes(tmp_path):
    path = save(tmp_path / "pose.png", gradient(size=(48, 32)))
    with pytest.raises(InvalidValue, match=r"is 48x32, the images are 64x32 \(width x height\)"):
        read_control_images([path], 64, 32, batch_size=1)


def test_the_exif_rotation_counts_for_the_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated by 90 degrees: a 32x64 file shows as 64x32
    path = save(tmp_path / "rotated.jpg", gradient(size=(32, 64)), exif=exif.tobytes())
    assert read_control_images([path], 64, 32, batch_size=1).shape == (1, 3, 32, 64)


@pytest.mark.parametrize("mode, message", [("RGBA", "has transparency"), ("LA", "has transparency"),
                                           ("CMYK", "is a CMYK image"), ("I;16", "is a I;16 image")])
def test_images_with_transparency_or_other_modes_are_refused(tmp_path, mode, message):
    image = Image.new(mode, (64, 32))
    path = save(tmp_path / ("map.tiff" if mode == "CMYK" else "map.png"), image)
    with pytest.raises(InvalidValue, match=message):
        read_control_images([path], 64, 32, batch_size=1)


def test_missing_folders_and_unreadable_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="control image .* does not exist"):
        read_control_images([tmp_path / "absent.png"], 64, 32, batch_size=1)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_control_images([tmp_path], 64, 32, batch_size=1)
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(InvalidValue, match="is not an image this program can read"):
        read_control_images([tmp_path / "text.png"], 64, 32, batch_size=1)

"""Writing results without ever overwriting: numbered files, numbered folders, and a check beforehand.

- `check_output_folder(path)`: the folder exists or can be created, and files can be written in it;
  checked before any slow work, without leaving anything behind (the probe file is anonymous).
- `OutputFolder`: numbered PNGs (`00000.png`, `grid-0000.png`, ...), each name created exclusively
  ('x' mode), so a second run, or a run next to a deleted file, always writes new names.
- `new_numbered_folder(root, "run-")`: the next `run-NNNN` folder under `root`, created exclusively.
- `save_result`: a generation's images (in `samples/`) and its grid, each PNG with its metadata.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from PIL import Image

from ldm.generation.images import png_metadata

if TYPE_CHECKING:
    from ldm.generation.generate import GenerationResult


def check_output_folder(path: str | os.PathLike) -> None:
    """Raise NotADirectoryError or PermissionError unless files can be written in `path` (made if missing)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the nearest existing ancestor, which the folder would be made in
    if not existing.is_dir():
        raise NotADirectoryError(f"output folder {path}: {existing} exists and is not a folder; choose "
                                 "another folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise PermissionError(f"output folder {path} cannot be written ({error.strerror or error} in "
                              f"{existing}); choose a folder you can write to") from None


class OutputFolder:
    """Numbered PNGs in a folder, never overwriting: each name is created exclusively ('x' mode)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise NotADirectoryError(f"output folder {self.path} exists and is not a folder; choose another "
                                     "folder") from None

    def _next_number(self, prefix: str) -> int:
        pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.png$")
        numbers = [int(m.group(1)) for name in os.listdir(self.path) if (m := pattern.match(name))]
        return max(numbers, default=-1) + 1

    def save(self, image: Image.Image, metadata: dict[str, Any], prefix: str = "", digits: int = 5) -> Path:
        number = self._next_number(prefix)
        while True:
            target = self.path / f"{prefix}{number:0{digits}d}.png"
            try:
                with open(target, "xb") as handle:  # fails if the name exists: nothing is overwritten
                    image.save(handle, format="PNG", pnginfo=png_metadata(metadata))
                return target
            except FileExistsError:
                number += 1


def new_numbered_folder(root: str | os.PathLike, prefix: str = "run-", digits: int = 4) -> Path:
    """The next `{prefix}NNNN` folder under `root` (made if missing), created exclusively."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)")
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := pattern.fullmatch(p.name))]
    number = max(numbers, default=-1) + 1
    while True:
        folder = root / f"{prefix}{number:0{digits}d}"
        try:
            folder.mkdir()  # exclusive: a concurrent run takes the next number
            return folder
        except FileExistsError:
            number += 1


def save_result(result: "GenerationResult", outdir: str | os.PathLike, *, samples: bool = True, grid: bool = True,
                images_per_row: Optional[int] = None) -> list[Path]:
    """Save a `GenerationResult`: each image to `outdir/samples/NNNNN.png`, the grid to
    `outdir/grid-NNNN.png`; returns the paths written, in order."""
    written: list[Path] = []
    if samples:
        folder = OutputFolder(Path(outdir) / "samples")
        written += [folder.save(sample.image, sample.metadata) for sample in result.samples]
    if grid:
        written.append(OutputFolder(outdir).save(result.grid(images_per_row), result.metadata, prefix="grid-",
                                                 digits=4))
    return written

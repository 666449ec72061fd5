"""README.md's Python example, run exactly as written (the first python block of its "Python API"
section), on the shipped demo model, in a temporary working folder."""
from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from tests.conftest import ROOT


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_python_example_runs_and_gives_what_it_says(tmp_path, capsys):
    code = readme_python_example()
    namespace: dict = {}
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(previous)
    plain, shared, image = namespace["plain"], namespace["shared"], namespace["image"]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert [s.metadata["seed"] for s in plain.images] == [s.metadata["seed"] for s in shared.images] == [42, 43, 44, 45]
    assert shared.images[1].metadata["shared_attention"]["groups"] == "all"
    assert plain.images[1].metadata["shared_attention"] is None
    assert "'seed': 43" in capsys.readouterr().out
    for a, b in zip(plain.images, shared.images):  # pictures, and sharing changed them
        assert np.asarray(a.image).std() > 10 and not np.array_equal(np.asarray(a.image), np.asarray(b.image))
    with Image.open(tmp_path / "chairs.png") as grid:
        assert grid.height == 2 * 64 and grid.width > 4 * 64

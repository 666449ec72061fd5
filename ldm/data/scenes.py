"""The world v2 as a data set: seeded scenes with their captions and every piece of ground truth.

Item i depends only on (seed, i): its scene is drawn from `np.random.default_rng([seed, i])`, and
so is the subset of attributes its caption names, each applicable attribute independently with
probability `mention_prob` (the subject is always named). By default the subject is drawn uniformly
(a face one item in five); `face_share` makes that fraction of items faces instead, the furniture
classes sharing the rest equally, for a training stage that needs more faces. Items are what the training loops and the
instruments read:

    image    float32 (H, W, 3) in [-1, 1]   the CompVis batch layout (models permute themselves)
    mask     float32 (H, W), 1 on the subject
    bbox     int64 (4,) x0, y0, x1, y1 in pixels, end exclusive
    txt      the caption (ldm/data/prompts.py)
    labels   {attribute: value} for every VOCABULARY attribute, NOT_APPLICABLE ("") where the subject
             lacks it, so that the default collate can batch faces and furniture together
    named    the attributes the caption names, space-separated (the subject included)
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.prompts import caption
from ldm.data.render import render_scene
from ldm.data.world import FURNITURE, VOCABULARY, Scene, attributes_of, sample_scene

NOT_APPLICABLE = ""


class WorldScenes(Dataset):
    """`length` seeded scenes of the world v2 at `size` px; see the module docstring for an item."""

    def __init__(self, length: int, seed: int = 0, size: int = 64, mention_prob: float = 0.5,
                 face_share: Optional[float] = None) -> None:
        if length < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        if not 0.0 <= mention_prob <= 1.0:
            raise ValueError(f"mention_prob must be between 0 and 1, got {mention_prob}")
        if face_share is not None and not 0.0 <= face_share <= 1.0:
            raise ValueError(f"face_share must be between 0 and 1 (or None for a uniform subject), got {face_share}")
        self.length, self.seed, self.size, self.mention_prob = length, seed, size, float(mention_prob)
        self.face_share = None if face_share is None else float(face_share)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Scene, tuple[str, ...]]:
        """Item `index`'s scene and the attributes its caption names, without rendering."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a data set of length {self.length}")
        rng = np.random.default_rng([self.seed, index])
        fixed = None
        if self.face_share is not None:  # one extra draw, first, so the default stream stays as it was
            share = rng.random()
            fixed = {"subject": "face" if share < self.face_share else
                     FURNITURE[min(int((share - self.face_share) / (1.0 - self.face_share) * len(FURNITURE)),
                                   len(FURNITURE) - 1)]}
        scene = sample_scene(rng, fixed)
        # One draw per attribute of every subject, so the stream's length does not depend on the subject.
        coins = dict(zip([name for name in VOCABULARY if name != "subject"], rng.random(len(VOCABULARY) - 1)))
        named = tuple(name for name in attributes_of(scene.subject) if coins[name] < self.mention_prob)
        return scene, ("subject", *named)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene, named = self.scene(index)
        drawn = render_scene(scene, self.size)
        return {
            "image": torch.from_numpy(drawn.image).float() / 127.5 - 1.0,  # (H, W, 3) in [-1, 1]
            "mask": torch.from_numpy(drawn.mask).float(),  # (H, W)
            "bbox": torch.tensor(drawn.bbox, dtype=torch.int64),  # (4,)
            "txt": caption(scene, named),
            "labels": {name: NOT_APPLICABLE if value is None else value for name, value in scene.labels().items()},
            "named": " ".join(named),
        }

"""Helpers the world v2 script tests share: tiny random files on disk, the tiny model loaded once, and
the one-line usage error of a script."""
from __future__ import annotations

import contextlib
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

import ldm.checkpoint
from ldm.eval.scene_classifier import SceneClassifier, SceneClassifierConfig, save_scene_classifier
from ldm.eval.segmenter import SegmenterConfig, SubjectSegmenter, save_segmenter
from ldm.util import instantiate_from_config
from tests.conftest import TINY_CONFIG, randomize_

TINY_CLASSIFIER = SceneClassifierConfig(widths=(8, 8, 8, 8, 8), feature_dim=16)


def write_tiny_world_files(folder: Path, random_segmenter: bool = True) -> Path:
    """tiny.safetensors (the tiny text-to-image model, random), classifier.safetensors (a tiny random
    scene classifier) and segmenter.safetensors (random, or as built when `random_segmenter` is False)."""
    torch.manual_seed(0)
    model = randomize_(instantiate_from_config(OmegaConf.load(TINY_CONFIG).model), seed=0)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(folder / "tiny.safetensors"))
    save_scene_classifier(randomize_(SceneClassifier(TINY_CLASSIFIER), seed=1).eval(), folder / "classifier.safetensors")
    segmenter = SubjectSegmenter(SegmenterConfig(width=4))
    if random_segmenter:
        segmenter = randomize_(segmenter, seed=2).eval()
    save_segmenter(segmenter, folder / "segmenter.safetensors")
    return folder


@contextlib.contextmanager
def tiny_model_loaded_once(weights: Path) -> Iterator[torch.nn.Module]:
    """The tiny model loaded once and handed to every load while the context is open (loading is most
    of a tiny run's time)."""
    model = ldm.checkpoint.load_model_from_config(OmegaConf.load(TINY_CONFIG), weights, device="cpu", verbose=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ldm.checkpoint, "load_model_from_config", lambda *args, **kwargs: model)
        yield model


def usage_error(script: ModuleType, args: list[str], capsys) -> str:
    """Run `script`'s main through its CLI wrapper, expect exit status 2 and a one-line message; return it."""
    with pytest.raises(SystemExit) as stopped:
        script.run_cli(script.main, args, flags=script.FLAGS)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    return error

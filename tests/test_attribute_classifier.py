"""The attribute classifier: the shipped weights read fresh renders correctly; the API and training work.

The shipped-artefact tests judge `models/demo/attribute_classifier.safetensors` against the generator's
ground truth on a data seed the training script never used (it trains on seed 0 and holds out seed 1).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import save_file

from ldm.data.synthetic import SIZES, Attributes, SyntheticObjects, render
from ldm.eval.attribute_classifier import (DEFAULT_PATH, AttributeClassifier, ClassifierConfig, default_vocab,
                                           load_attribute_classifier, read_metadata, save_attribute_classifier)

ROOT = Path(__file__).resolve().parents[1]
FRESH_SEED = 2024
TINY = ClassifierConfig(widths=(8, 8, 8, 8, 8), reduced_channels=4, feature_dim=16)


def load_training_script():
    spec = importlib.util.spec_from_file_location("train_classifier", ROOT / "scripts" / "train_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)


@pytest.fixture(scope="module")
def shipped() -> AttributeClassifier:
    if not DEFAULT_PATH.exists():
        pytest.fail(f"the shipped classifier {DEFAULT_PATH} is missing; run scripts/train_classifier.py")
    torch.manual_seed(0)
    return load_attribute_classifier()


@pytest.fixture(scope="module")
def fresh_renders() -> tuple[list[np.ndarray], list[Attributes]]:
    data = SyntheticObjects(300, seed=FRESH_SEED)
    truth = [data.attributes(i)[0] for i in range(len(data))]
    return [render(a) for a in truth], truth


def accuracy(pred: list[str], truth: list[Attributes], field: str) -> float:
    return float(np.mean([p == getattr(t, field) for p, t in zip(pred, truth)]))


def test_shipped_weights_are_small_and_describe_themselves():
    assert DEFAULT_PATH.stat().st_size < 1_000_000
    meta = read_metadata(DEFAULT_PATH)
    assert meta["vocab"] == default_vocab() and meta["size_scales"] == SIZES
    assert meta["held_out"]["clean"]["acc_cls"] > 0.95


def test_shipped_classifier_reads_fresh_clean_renders(shipped, fresh_renders):
    images, truth = fresh_renders
    pred = shipped.predict(to_batch(images))
    for field in ("cls", "colour", "pattern", "facing"):
        assert accuracy(pred[field], truth, field) > 0.9, field
    assert accuracy(pred["size_label"], truth, "size") > 0.85
    for field in ("x", "y"):
        error = (pred[field] - torch.tensor([getattr(t, field) for t in truth])).abs().mean()
        assert error < 0.03, f"mean |{field} error| {error:.3f} (fraction of the image side)"


def test_shipped_classifier_tolerates_blur_and_noise(shipped, fresh_renders):
    # A degradation written independently of the training augmentation: PIL blur plus pixel noise.
    images, truth = fresh_renders
    rng = np.random.default_rng(0)
    blurred = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.8))) for im in images]
    noisy = [np.clip(im + rng.normal(0, 8, im.shape), 0, 255).astype(np.uint8) for im in blurred]
    pred = shipped.predict(to_batch(noisy))
    for field in ("cls", "colour", "facing"):
        assert accuracy(pred[field], truth, field) > 0.85, field
    assert accuracy(pred["pattern"], truth, "pattern") > 0.7


def test_features_compare_appearance_not_position(shipped):
    # The same object at two places must look more alike than two different-looking objects at one place.
    base = dict(cls="chair", size="large", facing="right", y=0.0)
    same = [render(Attributes(colour="red", pattern="striped", x=x, **base)) for x in (-0.12, 0.12)]
    other = render(Attributes(colour="blue", pattern="dotted", x=-0.12, **base))
    feats = torch.nn.functional.normalize(shipped.features(to_batch([*same, other])), dim=1)  # (3, F)
    assert feats.shape == (3, shipped.config.feature_dim)
    assert feats[0] @ feats[1] > feats[0] @ feats[2] + 0.1


def test_other_resolutions_are_resized(shipped, fresh_renders):
    _, truth = fresh_renders
    pred = shipped.predict(to_batch([render(a, size=128) for a in truth[:48]]))
    assert accuracy(pred["cls"], truth[:48], "cls") > 0.9


def test_predict_format_and_mode():
    model = AttributeClassifier(TINY).train()
    pred = model.predict(torch.rand(5, 3, 64, 64) * 2 - 1)
    assert model.training, "predict must restore the training mode"
    for name, labels in default_vocab().items():
        assert len(pred[name]) == 5 and set(pred[name]) <= set(labels)
        assert pred[name + "_probs"].shape == (5, len(labels))
        assert torch.allclose(pred[name + "_probs"].sum(dim=1), torch.ones(5))
    assert all(pred[k].shape == (5,) and not pred[k].requires_grad for k in ("x", "y", "size"))
    assert set(pred["size_label"]) <= set(SIZES)


def test_wrong_layouts_and_ranges_are_refused():
    model = AttributeClassifier(TINY)
    with pytest.raises(ValueError, match="permute"):
        model.predict(torch.zeros(2, 64, 64, 3))
    with pytest.raises(ValueError, match="127.5"):
        model.predict(torch.full((2, 3, 64, 64), 200.0))


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = AttributeClassifier(TINY)
    for p in model.parameters():  # move away from the initialisation, so loading must restore real values
        p.data.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "clf.safetensors"
    save_attribute_classifier(model.eval(), path, extra_metadata={"note": [1, 2]})
    loaded = load_attribute_classifier(path)
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    assert loaded.config == TINY and read_metadata(path)["note"] == [1, 2]
    for key, value in model(images).items():
        assert torch.allclose(loaded(images)[key], value, atol=1e-6), key


def test_loading_refuses_other_files(tmp_path):
    foreign = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not an attribute classifier"):
        load_attribute_classifier(foreign)
    with pytest.raises(FileNotFoundError, match="train_classifier.py"):
        load_attribute_classifier(tmp_path / "missing.safetensors")


def test_degrade_is_seeded_and_stays_in_range():
    script = load_training_script()
    images = script.to_model_range(script.render_set(6, seed=3)["images"])
    first = script.degrade(images, torch.Generator().manual_seed(1))
    again = script.degrade(images, torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and first.shape == images.shape
    assert first.min() >= -1 and first.max() <= 1 and not torch.equal(first, images)


def test_training_reduces_the_loss_deterministically():
    script = load_training_script()
    data = script.render_set(32, seed=4)

    def run() -> list[float]:
        torch.manual_seed(0)
        return script.train_classifier(AttributeClassifier(TINY), data, epochs=16, batch_size=16,
                                       learning_rate=3e-2, augment_fraction=0.25, seed=0)

    losses = run()
    assert len(losses) == 32
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4])
    assert losses == run()


def test_training_script_refuses_to_overwrite(tmp_path):
    script = load_training_script()
    out = tmp_path / "clf.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(script.UsageError, match="--force"):
        script.main(["--out", str(out)])
    assert out.read_bytes() == b"keep me"

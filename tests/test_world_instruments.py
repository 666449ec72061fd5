"""The world v2 instruments (ldm/eval/scene_classifier.py, segmenter.py) and their training script.

Most tests check on tiny data that the code trains and predicts the right things. The last section
measures the SHIPPED files (models/demo/v2) on freshly rendered held-out scenes against the world's
targets (attribute accuracy >= 0.95 each, mask IoU >= 0.9); a missing file fails there, it is never
skipped.
"""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from ldm.data.world import APPLIES_TO, VOCABULARY
from ldm.eval.degrade import to_model_range
from ldm.eval.instruments import load_world_instruments
from ldm.eval.scene_classifier import (IGNORE, SceneClassifier, SceneClassifierConfig, label_targets,
                                       load_scene_classifier)
from ldm.eval.segmenter import SegmenterConfig, SubjectSegmenter, load_segmenter, mask_iou
from tests.conftest import ROOT, load_script

script = load_script("train_world_instruments")
TINY_CLASSIFIER = SceneClassifierConfig(widths=(8, 8, 16, 16, 16), feature_dim=32)
TINY_OVERRIDES = ["classifier.params.widths=[8,8,16,16,16]", "classifier.params.feature_dim=32",
                  "segmenter.params.width=4", "training.train_size=32", "training.val_size=16",
                  "training.classifier_steps=3", "training.segmenter_steps=3", "training.batch_size=16"]


@pytest.fixture(scope="module")
def tiny_data():
    return script.render_world_set(48, seed=0)


def test_rendered_set_labels_only_what_applies(tiny_data):
    subjects = [VOCABULARY["subject"][i] for i in tiny_data["labels"]["subject"].tolist()]
    for name, labels in tiny_data["labels"].items():
        for subject, label in zip(subjects, labels.tolist()):
            assert (label != IGNORE) == (subject in APPLIES_TO[name]), (name, subject)
    assert tiny_data["images"].shape == (48, 3, 64, 64) and tiny_data["masks"].shape == (48, 64, 64)


def test_label_targets_map_strings_to_indices_and_absent_to_ignore():
    targets = label_targets({"subject": ["face", "chair"], "pattern": ["", "dotted"]},
                            {"subject": VOCABULARY["subject"], "pattern": VOCABULARY["pattern"]})
    assert targets["subject"].tolist() == [VOCABULARY["subject"].index("face"), VOCABULARY["subject"].index("chair")]
    assert targets["pattern"].tolist() == [IGNORE, VOCABULARY["pattern"].index("dotted")]


def test_classifier_has_a_head_per_attribute_and_predicts_none_where_the_subject_lacks_it():
    model = SceneClassifier(TINY_CLASSIFIER)
    logits = model(torch.rand(4, 3, 64, 64) * 2 - 1)
    assert {k: v.shape for k, v in logits.items()} == {k: (4, len(v)) for k, v in VOCABULARY.items()}
    # Force the subject head: a face for image 0, a vase for the others.
    with torch.no_grad():
        model.heads["subject"].weight.zero_()
        model.heads["subject"].bias.copy_(torch.tensor([0.0, 0, 0, 5, 0]))
    predicted = model.predict(torch.zeros(3, 3, 64, 64))
    assert predicted["subject"] == ["vase"] * 3
    assert predicted["glasses"] == [None] * 3 and all(p in VOCABULARY["pattern"] for p in predicted["pattern"])
    assert all(len(v) == 3 for v in predicted.values())


def test_classifier_loss_ignores_heads_with_no_applicable_image():
    model = SceneClassifier(TINY_CLASSIFIER)
    faces = {name: torch.full((2,), IGNORE) for name in VOCABULARY}
    faces["subject"] = torch.tensor([4, 4])
    faces["skin"] = torch.tensor([0, 1])
    total, parts = model.loss(model(torch.zeros(2, 3, 64, 64)), faces)
    assert set(parts) == {"subject", "skin"} and torch.isfinite(total)


def _eval_loss(model, loss_of, images):
    model.eval()
    with torch.no_grad():
        return float(loss_of(images.float() / 127.5 - 1, torch.arange(len(images))))


def test_training_reduces_the_classifier_loss(tiny_data):
    torch.manual_seed(0)
    classifier = SceneClassifier(TINY_CLASSIFIER)
    targets = tiny_data["labels"]

    def loss_of(x, i):
        return classifier.loss(classifier(x), {k: v[i] for k, v in targets.items()})[0]

    before = _eval_loss(classifier, loss_of, tiny_data["images"])
    script.fit(classifier, loss_of, tiny_data["images"], steps=40, batch_size=16, learning_rate=3e-3,
               augment_fraction=0.0)
    # Measured in eval mode, with the batch-norm statistics of only 40 steps: a clear drop, not a fit.
    assert _eval_loss(classifier, loss_of, tiny_data["images"]) < 0.8 * before


def test_training_reduces_the_segmenter_loss(tiny_data):
    torch.manual_seed(0)
    segmenter = SubjectSegmenter(SegmenterConfig(width=4))

    def loss_of(x, i):
        return segmenter.loss(segmenter(x), tiny_data["masks"][i])

    before = _eval_loss(segmenter, loss_of, tiny_data["images"])
    script.fit(segmenter, loss_of, tiny_data["images"], steps=30, batch_size=16, learning_rate=1e-2,
               augment_fraction=0.5)
    assert _eval_loss(segmenter, loss_of, tiny_data["images"]) < 0.7 * before


def test_segmenter_predicts_a_mask_per_pixel():
    masks = SubjectSegmenter(SegmenterConfig(width=4)).predict(torch.zeros(2, 3, 64, 64))
    assert masks.shape == (2, 64, 64) and masks.dtype == torch.bool
    with pytest.raises(ValueError, match="divisible by 8"):
        SubjectSegmenter(SegmenterConfig(width=4))(torch.zeros(1, 3, 30, 30))


def test_mask_iou_matches_a_count_by_hand():
    truth = torch.zeros(3, 4, 4, dtype=torch.bool)
    truth[0, :2] = True  # 8 pixels
    predicted = torch.zeros_like(truth)
    predicted[0, 1:3] = True  # 8 pixels, 4 shared -> 4 / 12
    truth[1, 0, 0] = True  # nothing predicted -> 0
    assert torch.allclose(mask_iou(predicted, truth), torch.tensor([4 / 12, 0.0, 1.0]))


def test_script_trains_measures_and_writes_loadable_instruments(tmp_path):
    info = script.main(["--out-dir", str(tmp_path), *TINY_OVERRIDES])
    assert set(info["classifier_accuracy"]["clean"]) == set(VOCABULARY)
    assert all(0 <= v <= 1 for v in info["classifier_accuracy"]["clean"].values())
    assert 0 <= info["segmenter_iou"]["clean"] <= 1
    classifier = load_scene_classifier(tmp_path / "scene_classifier.safetensors")
    assert classifier.vocab == {k: list(v) for k, v in VOCABULARY.items()}
    assert load_segmenter(tmp_path / "segmenter.safetensors").config.width == 4
    assert json.loads((tmp_path / "instruments.json").read_text())["command"].startswith("python scripts/")
    with pytest.raises(script.UsageError, match="--force"):
        script.main(["--out-dir", str(tmp_path), *TINY_OVERRIDES])


def test_loading_refuses_the_other_instruments_file(tmp_path):
    script.main(["--out-dir", str(tmp_path), *TINY_OVERRIDES])
    with pytest.raises(ValueError, match="not a ldm.eval.segmenter"):
        load_segmenter(tmp_path / "scene_classifier.safetensors")


def test_shipped_recipe_config_builds_both_instruments():
    config = OmegaConf.load(ROOT / "configs" / "demo" / "v2" / "instruments.yaml")
    from ldm.util import instantiate_from_config
    assert SceneClassifier(instantiate_from_config(config.classifier)).config.final_side == 2
    SubjectSegmenter(instantiate_from_config(config.segmenter))


# ----------------------------------------------------------------------------- the shipped instruments

SHIPPED = ROOT / "models" / "demo" / "v2"
# Data seed 5 is held out: the instruments trained on seed 0 and were validated on seed 1
# (configs/demo/v2/instruments.yaml), and no stage of the v2 recipe uses it (seeds 0-3 and 99).
HELD_OUT_SEED, HELD_OUT_COUNT = 5, 500  # about 100 faces and 400 pieces of furniture
ACCURACY_TARGET, IOU_TARGET = 0.95, 0.9


@pytest.fixture(scope="module")
def shipped():
    """The shipped instrument pair, loaded as the harness loads it (format and vocabulary checked)."""
    files = [SHIPPED / "scene_classifier.safetensors", SHIPPED / "segmenter.safetensors"]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: train them with scripts/train_world_instruments.py "
                    "(configs/demo/v2/README.md, step 4)")
    return load_world_instruments(*files, torch.device("cpu"))


@pytest.fixture(scope="module")
def held_out():
    return script.render_world_set(HELD_OUT_COUNT, seed=HELD_OUT_SEED)


def test_shipped_classifier_reads_every_attribute_of_held_out_renders(shipped, held_out):
    """Clean renders only: the issue states the target on renders; the degraded figures (renders
    degraded like a small diffusion model's output) are in instruments.json, written by the training run."""
    predicted = {name: [] for name in VOCABULARY}
    for start in range(0, HELD_OUT_COUNT, 100):
        for name, labels in shipped.classifier.predict(to_model_range(held_out["images"][start:start + 100])).items():
            predicted[name] += labels
    accuracy = {}
    for name, values in VOCABULARY.items():
        truth = held_out["labels"][name].tolist()
        judged = [predicted[name][i] == values[t] for i, t in enumerate(truth) if t != IGNORE]
        accuracy[name] = sum(judged) / len(judged)
    low = {name: round(value, 3) for name, value in accuracy.items() if value < ACCURACY_TARGET}
    assert not low, f"below {ACCURACY_TARGET} on {HELD_OUT_COUNT} renders of data seed {HELD_OUT_SEED}: {low}"


def test_shipped_segmenter_finds_the_subject_of_held_out_renders(shipped, held_out):
    """Mean IoU with the renderer's masks, clean renders (as the classifier test above)."""
    ious = [mask_iou(shipped.segmenter.predict(to_model_range(held_out["images"][start:start + 100])),
                     held_out["masks"][start:start + 100]) for start in range(0, HELD_OUT_COUNT, 100)]
    mean_iou = float(torch.cat(ious).mean())
    assert mean_iou >= IOU_TARGET, f"mean mask IoU {mean_iou:.3f} on renders of data seed {HELD_OUT_SEED}"

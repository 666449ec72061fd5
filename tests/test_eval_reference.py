"""The reference-consistency measurement (scripts/eval_reference.py, ldm/eval/reference_consistency.py).

Its bookkeeping on configs/tiny with random weights and a tiny random scene classifier: the measure
on hand-made readings, one row per subject, seed, condition and compared reference, the summary, the
grid, and a results folder that is never overwritten. What the numbers are on a trained model is
the script's job, not the test's.
"""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from PIL import Image

from ldm.eval.reference_consistency import OTHER_SCENES, appearance_match
from ldm.eval.scene_classifier import SceneClassifier, SceneClassifierConfig, save_scene_classifier
from tests.conftest import TINY_CONFIG, load_script, randomize_

script = load_script("eval_reference")


def test_the_match_counts_the_open_appearance_attributes_equal_to_the_reference_s():
    prompts = ("a red chair on grass", "a chair in a green room")  # the first names its colour
    readings = {"colour": ["red", "blue"], "pattern": ["striped", "solid"]}
    reference = {"colour": "blue", "pattern": "striped"}
    match, per_attribute = appearance_match(readings, prompts, reference, ("colour", "pattern"))
    # image 0: pattern only (striped == striped) -> 1; image 1: colour hit, pattern miss -> 0.5
    assert match == pytest.approx(0.75)
    assert per_attribute == {"colour": 1.0, "pattern": 0.5}


def test_an_attribute_the_reference_lacks_is_not_counted():
    match, per_attribute = appearance_match({"colour": ["red"]}, ["a chair"], {"colour": None}, ("colour",))
    assert math.isnan(match) and math.isnan(per_attribute["colour"])


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("classifier") / "classifier.safetensors"
    torch.manual_seed(0)
    tiny = SceneClassifierConfig(widths=(8, 8, 8, 8, 8), feature_dim=16)
    save_scene_classifier(randomize_(SceneClassifier(tiny), seed=1).eval(), path)
    return path


def arguments(tiny_ckpt, classifier_file, outdir) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--classifier", str(classifier_file),
            "--seeds", "3", "--groups", "up", "--steps", "1", "--outdir", str(outdir)]


@pytest.fixture(scope="module")
def run(tiny_ckpt, classifier_file, tmp_path_factory):
    return script.main(arguments(tiny_ckpt, classifier_file, tmp_path_factory.mktemp("eval") / "out"))


def test_every_subject_seed_condition_and_reference_has_one_row(run):
    with open(run / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    keys = [(r["subject"], r["condition"], r["against"]) for r in rows]
    expected = [(subject, condition, against) for subject in ("furniture", "face")
                for condition, against in (("none", "png"), ("none", "render"), ("png-up", "png"),
                                           ("render-up", "render"))]
    assert keys == expected
    assert all(0.0 <= float(r["match"]) <= 1.0 for r in rows if r["match"] != "nan")
    face = [r for r in rows if r["subject"] == "face"]
    assert all(r["match_colour"] in ("", "nan") for r in face)  # a face has no colour attribute


def test_the_summary_averages_the_rows_it_names(run):
    with open(run / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    summary = json.loads((run / "summary.json").read_text())["rows"]
    entry = next(s for s in summary if (s["condition"], s["against"], s["subject"]) == ("png-up", "png", "all"))
    values = [float(r["match"]) for r in rows if (r["condition"], r["against"]) == ("png-up", "png")
              and r["match"] != "nan"]
    assert entry["units"] == len(values)
    if values:
        assert entry["mean"] == pytest.approx(sum(values) / len(values), abs=1e-4)
    assert "| png-up | png |" in (run / "results.md").read_text()


def test_the_grid_shows_the_reference_then_the_new_images_per_condition(run):
    with Image.open(run / "grid.png") as grid:
        width, height = grid.size
    columns = 1 + len(OTHER_SCENES["furniture"])
    assert width >= columns * 64 and height >= 2 * 3 * 64  # 2 subjects x 3 conditions, 64 px images


def test_a_results_folder_that_holds_anything_is_refused_in_one_line(tiny_ckpt, classifier_file, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep")
    with pytest.raises(SystemExit) as stopped:
        script.run_cli(script.main, arguments(tiny_ckpt, classifier_file, tmp_path / "out"), flags=script.FLAGS)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["old.txt"]

"""The consistency harness on the world v2 (ldm/eval/metrics_v2.py, prompt_sets.py, the --world v2 path).

Each metric is checked on hand-made labels, masks and pictures whose right value is known. The end-to-end
runs use configs/tiny/tiny-inference.yaml with random weights and a scene classifier and segmenter
with random weights (the harness only needs them to be well-formed instruments), 2 DDIM steps, sets
of 2, on the CPU with one thread.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.data.render import render_scene
from ldm.data.world import Scene
from ldm.errors import InvalidValue
from ldm.eval.consistency import _notes as consistency_notes
from ldm.eval.metrics_v2 import (ATTRIBUTES, WORLD_V2_METRICS, colour_histogram, mask_layout,
                                 mean_histogram_intersection, mean_pairwise_iou, named_accuracy, open_agreement,
                                 open_attributes, world_metrics)
from ldm.eval.prompt_sets import (SYNTHETIC_PROMPTS, WORLD_V2_PROMPTS, generation_prompt, image_prompts,
                                  story_parts)
from ldm.eval.scene_classifier import SceneClassifier, save_scene_classifier
from ldm.eval.subject_mask_iou import MaskRecorder, step_buckets, step_ious
from ldm.generation.model import DEMO_V1_CKPT
from ldm.sharing import SharedAttention, SharedAttentionSettings
from tests.conftest import TINY_CONFIG, load_script
from tests.world_fixtures import TINY_CLASSIFIER, tiny_model_loaded_once, usage_error, write_tiny_world_files

eval_script = load_script("eval_consistency")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def labels_for(subjects: list[str], **values: list) -> dict[str, list]:
    """Classifier-style predictions: every attribute present, None unless given."""
    return {a: list(values.get(a, subjects if a == "subject" else [None] * len(subjects))) for a in ATTRIBUTES}


def blank_images(count: int, side: int = 8) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((count, side, side), dtype=bool), np.zeros((count, side, side, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- what a prompt leaves open


def test_open_attributes_are_the_unnamed_ones_the_subject_can_have():
    assert open_attributes({"subject": "chair", "colour": "red"}) == ("pattern", "size", "facing", "position",
                                                                      "wall", "floor")
    assert open_attributes({"subject": "face", "glasses": "yes"}) == ("skin", "hair_colour", "hair_style", "shirt",
                                                                      "backdrop")
    # No subject named: a wall colour allows any furniture, so the subject itself is open.
    assert open_attributes({"wall": "red"})[0] == "subject" and "glasses" not in open_attributes({"wall": "red"})


def test_stories_give_each_image_its_own_prompt():
    line = "a red chair in a green room | a red chair in a blue room"
    assert story_parts(line) == ("a red chair in a green room", "a red chair in a blue room")
    assert image_prompts(line, 3) == ("a red chair in a green room", "a red chair in a blue room",
                                      "a red chair in a green room")
    assert generation_prompt("a chair", 4) == "a chair" and generation_prompt(line, 2) == story_parts(line)
    with pytest.raises(InvalidValue, match="empty part"):
        story_parts("a chair | ")


def test_default_world_v2_sets_cover_furniture_faces_named_and_open_backgrounds_and_stories():
    parts = [story_parts(line) for line in WORLD_V2_PROMPTS]
    from ldm.data.prompts import parse_prompt
    named = [[parse_prompt(p) for p in story] for story in parts]
    subjects = {n["subject"] for story in named for n in story}
    assert {"face", "chair"} <= subjects
    assert any(len(s) == 1 and not {"wall", "floor", "backdrop"} & set(s[0]) for s in named)  # background open
    assert any(len(s) == 1 and {"wall", "floor"} & set(s[0]) for s in named)  # one named background
    stories = [s for s in named if len(s) > 1]
    assert any(s[0]["subject"] == "face" for s in stories) and any(s[0]["subject"] != "face" for s in stories)
    for story in stories:  # the same subject, backgrounds that differ within the set
        assert len({tuple((k, v) for k, v in n.items() if k not in ("wall", "floor", "backdrop")) for n in story}) == 1
        assert len({tuple((k, n.get(k)) for k in ("wall", "floor", "backdrop")) for n in story}) == len(story)


# ----------------------------------------------------------------------------- label metrics


def test_agreement_counts_only_pairs_leaving_the_attribute_open_and_labelled():
    assert open_agreement(["red", "red", "blue"], [True] * 3) == pytest.approx(1 / 3)
    assert open_agreement(["red", "blue", "red"], [True, False, True]) == 1.0  # the named image is left out
    assert open_agreement(["red", None, "red"], [True] * 3) == 1.0  # a subject without colour is left out
    assert math.isnan(open_agreement(["red", "red"], [True, False]))


def test_accuracy_judges_each_image_against_its_own_prompt():
    assert named_accuracy(["green", "blue", "red"], ["green", "green", None]) == 0.5
    assert named_accuracy([None, "red"], ["red", "red"]) == 0.5  # a subject without colour is wrong
    assert math.isnan(named_accuracy(["red"], [None]))


def test_set_metrics_of_a_story_with_known_labels():
    prompts = ["a red chair in a green room", "a red chair in a blue room", "a red chair on grass",
               "a red chair on grass"]
    predictions = labels_for(["chair", "chair", "chair", "table"], colour=["red", "red", "blue", "red"],
                             pattern=["solid", "solid", "striped", "solid"], wall=["green", "green", "white", "white"],
                             floor=["wood", "wood", "grass", "carpet"], size=["small"] * 4,
                             facing=["left"] * 4, position=["left", "left", "right", "right"])
    masks, pixels = blank_images(4)
    m = world_metrics(prompts, predictions, masks, pixels)
    assert m["acc_subject"] == 0.75 and m["acc_colour"] == 0.75
    assert m["acc_wall"] == 0.5  # green right, green for "blue" wrong
    assert m["acc_floor"] == 0.5  # grass right, carpet wrong
    assert m["acc_specified"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert m["agree_pattern"] == pytest.approx(3 / 6) and m["agree_wall"] == 1.0  # wall open in images 3, 4 only
    assert m["agree_floor"] == 1.0  # floor open in images 1, 2: both wood
    assert m["bg_diversity"] == 0.0  # every pair leaving a background open got the same one
    assert m["agreement"] == pytest.approx(3 / 6)  # pattern: the only identity attribute left open
    assert m["agree_position"] == pytest.approx(2 / 6) and math.isnan(m["agree_skin"])
    assert math.isnan(m["acc_glasses"]) and set(m) == set(WORLD_V2_METRICS.descriptions)


def test_background_diversity_is_one_when_open_backgrounds_all_differ():
    predictions = labels_for(["face"] * 3, backdrop=["red", "blue", "green"], skin=["pale"] * 3)
    masks, pixels = blank_images(3)
    m = world_metrics(["a face"] * 3, predictions, masks, pixels)
    assert m["bg_diversity"] == 1.0 and m["agree_skin"] == 1.0 and m["agreement"] == 1.0


# ----------------------------------------------------------------------------- pixel metrics


def test_colour_histograms_inside_masks_compare_subjects_and_outside_backgrounds():
    side = 8
    masks = np.zeros((3, side, side), dtype=bool)
    masks[:, 2:6, 2:6] = True
    pixels = np.zeros((3, side, side, 3), dtype=np.uint8)
    pixels[0][masks[0]] = (250, 0, 0)  # image 0 and 1: red subjects; image 2: blue
    pixels[1][masks[1]] = (250, 0, 0)
    pixels[2][masks[2]] = (0, 0, 250)
    pixels[0][~masks[0]] = (250, 250, 250)  # backgrounds: white, white, half white and half black
    pixels[1][~masks[1]] = (250, 250, 250)
    pixels[2, :4][~masks[2, :4]] = (250, 250, 250)
    m = world_metrics(["a chair"] * 3, labels_for(["chair"] * 3), masks, pixels)
    assert m["subject_hist_sim"] == pytest.approx(1 / 3)  # pairs: same, disjoint, disjoint
    outside = (~masks[2]).sum()
    white_share = (~masks[2, :4]).sum() / outside
    assert m["bg_hist_dist"] == pytest.approx((0 + (1 - white_share) + (1 - white_share)) / 3)
    assert m["mask_iou"] == 1.0 and m["spread_x"] == 0.0


def test_histogram_of_an_empty_region_is_left_out():
    pixels = np.full((4, 4, 3), 200, dtype=np.uint8)
    empty, full = np.zeros((4, 4), dtype=bool), np.ones((4, 4), dtype=bool)
    assert colour_histogram(pixels, empty) is None
    assert colour_histogram(pixels, full).sum() == pytest.approx(1.0)
    assert math.isnan(mean_histogram_intersection([colour_histogram(pixels, full), None]))


def test_mask_layout_reads_the_box_of_the_mask():
    mask = np.zeros((10, 10), dtype=bool)
    mask[3:9, 0:4] = True  # columns 0-3, rows 3-8
    x, y, size = mask_layout(mask)
    assert (x, y, size) == pytest.approx((0.2 - 0.5, 0.9 - 0.5, 0.6))
    assert mask_layout(np.zeros((10, 10), dtype=bool)) is None


def test_mask_overlap_and_layout_spread_of_moved_subjects():
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, 2:6, 0:4] = True
    masks[1, 2:6, 2:6] = True  # shifted right by 2 columns: 8 of 24 pixels in common
    pixels = np.zeros((2, 10, 10, 3), dtype=np.uint8)
    m = world_metrics(["a chair"] * 2, labels_for(["chair"] * 2), masks, pixels)
    assert m["mask_iou"] == pytest.approx(8 / 24)
    assert math.isnan(mean_pairwise_iou(masks[:1]))  # one image: no pair
    assert m["spread_x"] == pytest.approx(0.1) and m["spread_y"] == 0.0 and m["spread_size"] == 0.0


def test_rendered_scenes_give_the_metrics_their_ground_truth_says():
    """Truth masks of two renders of one scene vs one moved to the other side: metrics follow."""
    base = Scene("chair", x=-0.2, y=0.3, colour="red", pattern="solid", size="large", facing="left",
                 position="left", wall="green", floor="wood")
    moved = Scene(**{**base.__dict__, "x": 0.2, "position": "right", "wall": "blue"})
    drawn = [render_scene(s) for s in (base, base, moved)]
    masks = np.stack([d.mask for d in drawn])
    pixels = np.stack([d.image for d in drawn])
    truth = labels_for(["chair"] * 3, **{a: [getattr(s, a) for s in (base, base, moved)] for a in ATTRIBUTES})
    m = world_metrics(["a red chair"] * 3, truth, masks, pixels)
    assert m["acc_subject"] == m["acc_colour"] == 1.0
    assert m["subject_hist_sim"] > 0.9  # the same red chair, moved
    assert m["agree_wall"] == pytest.approx(1 / 3) and m["bg_diversity"] == pytest.approx(1 - (1 / 3 + 1) / 2)
    assert m["bg_hist_dist"] > 0.1 and m["mask_iou"] < 1.0 and m["spread_x"] > 0.1


# ----------------------------------------------------------------------------- the harness end to end

PROMPTS = ("a red chair", "a face with glasses", "a lamp in a green room | a lamp on grass")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = write_tiny_world_files(tmp_path_factory.mktemp("world-v2"))
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_model(files):
    with tiny_model_loaded_once(files / "tiny.safetensors") as model:
        yield model


def world_args(files: Path) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--ckpt", str(files / "tiny.safetensors"), "--world", "v2",
            "--classifier", str(files / "classifier.safetensors"), "--segmenter", str(files / "segmenter.safetensors"),
            "--prompts", str(files / "prompts.txt"), "--device", "cpu", "--steps", "2", "--set-size", "2",
            "--seeds", "0,1", "--configs", "off,all"]


@pytest.fixture(scope="module")
def world_run(tiny_model, files, tmp_path_factory) -> Path:
    return eval_script.main([*world_args(files), "--outdir", str(tmp_path_factory.mktemp("run") / "out")])


def test_world_v2_run_writes_the_v2_metrics_for_every_set(world_run):
    sets = read_csv(world_run / "sets.csv")
    assert len(sets) == 2 * 2 * len(PROMPTS)
    metrics = list(WORLD_V2_METRICS.descriptions)
    assert list(sets[0])[5:5 + len(metrics)] == metrics
    for row in sets:
        for name in ("mask_iou", "acc_subject", "feature_sim"):  # defined for every set of two
            assert 0.0 <= float(row[name]) <= 1.0 + 1e-9, (row["prompt"], name)
        for name in ("subject_hist_sim", "bg_hist_dist", "spread_x"):  # empty when a random mask is empty
            assert row[name] == "" or 0.0 <= float(row[name]) <= 1.0 + 1e-9, (row["prompt"], name)
        assert len(row["labels_subject"].split("|")) == 2
    story = [row for row in sets if row["prompt"] == PROMPTS[2]]
    assert all(row["acc_wall"] != "" and row["acc_floor"] != "" for row in story)  # each image named one
    chair = [row for row in sets if row["prompt"] == PROMPTS[0]]
    assert all(row["agree_colour"] == "" and row["acc_colour"] != "" and row["acc_glasses"] == "" for row in chair)
    summary = json.loads((world_run / "summary.json").read_text())
    assert summary["run"]["world"] == "v2" and set(summary["metrics"]) == set(metrics)
    report = (world_run / "results.md").read_text()
    assert "| `off` |" in report.split("Change from `off`")[0] and "mask_iou" in report
    detail = report.split("Per attribute")[1].splitlines()
    header = next(line for line in detail if line.startswith("| configuration"))
    assert "acc_wall" in header and "acc_glasses" in header and "acc_pattern" not in header  # none names it


def test_world_v2_run_is_reproducible(world_run, tiny_model, files, tmp_path):
    again = eval_script.main([*world_args(files), "--outdir", str(tmp_path / "again")])
    for name in ("results.csv", "sets.csv"):
        assert (again / name).read_bytes() == (world_run / name).read_bytes()


def run_cli(args: list[str], capsys) -> str:
    return usage_error(eval_script, args, capsys)


def test_missing_segmenter_is_one_line_before_anything_runs(files, tmp_path, capsys):
    args = world_args(files)
    args[args.index("--segmenter") + 1] = str(tmp_path / "absent.safetensors")
    error = run_cli([*args, "--outdir", str(tmp_path / "out")], capsys)
    assert error.startswith("error: --segmenter") and "train_world_instruments" in error
    assert not (tmp_path / "out").exists()


def test_segmenter_given_as_classifier_is_refused_naming_the_flag(files, tmp_path, capsys):
    args = world_args(files)
    args[args.index("--classifier") + 1] = str(files / "segmenter.safetensors")
    error = run_cli([*args, "--outdir", str(tmp_path / "out")], capsys)
    assert error.startswith("error: --classifier") and "not a world v2 classifier" in error
    assert not (tmp_path / "out").exists()


def test_classifier_of_another_vocabulary_is_refused(files, tmp_path, capsys):
    from ldm.data.world import VOCABULARY
    other = {**{k: list(v) for k, v in VOCABULARY.items()}, "floor": ["wood", "tiles"]}
    save_scene_classifier(SceneClassifier(TINY_CLASSIFIER, vocab=other), tmp_path / "other.safetensors")
    args = world_args(files)
    args[args.index("--classifier") + 1] = str(tmp_path / "other.safetensors")
    assert "another vocabulary" in run_cli([*args, "--outdir", str(tmp_path / "out")], capsys)


def test_unknown_word_in_a_story_is_refused(files, tmp_path, capsys):
    (tmp_path / "bad.txt").write_text("a chair | a sofa\n")
    args = world_args(files)
    args[args.index("--prompts") + 1] = str(tmp_path / "bad.txt")
    assert "'sofa'" in run_cli(args, capsys)


def test_stories_and_segmenter_need_world_v2(files, tmp_path, capsys):
    v1 = [a for a in world_args(files) if a not in ("--world", "v2")]
    assert "--world v2" in run_cli(v1, capsys)  # --segmenter without --world v2
    (tmp_path / "story.txt").write_text("a chair | a red chair\n")
    v1 = v1[:v1.index("--segmenter")] + v1[v1.index("--segmenter") + 2:]
    v1[v1.index("--classifier") + 1] = str(files / "classifier.safetensors")
    v1[v1.index("--prompts") + 1] = str(tmp_path / "story.txt")
    assert "story" in run_cli(v1, capsys)



# ----------------------------------------------------------------------------- which world is measured by default


def request_for(tmp_path: Path, *args: str):
    """The script's checked request (nothing generated, no weights loaded)."""
    return eval_script.build_request(eval_script.parse_args([*args, "--outdir", str(tmp_path / "out")]))


def test_the_demo_model_is_measured_in_the_world_v2_by_default(tmp_path):
    request = request_for(tmp_path, "--demo")
    assert (request.model_world, request.world, request.prompts) == ("v2", "v2", WORLD_V2_PROMPTS)
    assert request.segmenter_path is not None and consistency_notes(request) == []  # no "labels mean little"


@pytest.mark.parametrize("world", [(), ("--world", "v1")], ids=["default", "--world v1"])
def test_the_v1_demo_model_given_by_its_paths_is_measured_in_the_world_v1(tmp_path, world):
    request = request_for(tmp_path, "--config", "configs/demo/demo-inference.yaml",
                          "--ckpt", "models/demo/demo.safetensors", *world)
    assert (request.model_world, request.world, request.prompts) == ("v1", "v1", SYNTHETIC_PROMPTS)
    assert request.ckpt_path.resolve() == DEMO_V1_CKPT and request.segmenter_path is None


def test_feature_models_measure_the_demo_model_through_the_world_v1_path(tmp_path):
    request = request_for(tmp_path, "--demo", "--features", "clip", "--feature-model", str(tmp_path))
    assert (request.model_world, request.world, request.features) == ("v2", "v1", "clip")


def test_instruments_of_the_other_world_are_run_with_a_note_saying_which_world_fits(tmp_path):
    request = request_for(tmp_path, "--demo", "--world", "v1")
    assert (request.model_world, request.world) == ("v2", "v1")
    assert any("use --world v2" in note for note in consistency_notes(request))

# ----------------------------------------------------------------------------- sharing's subject masks


def test_step_iou_of_hand_made_masks():
    """8x8 pixels, a 4x4 latent grid (a cell covers 2x2 pixels). Image 0's segmenter mask fills the
    top-left 4x4 pixels = latent cells rows 0-1, cols 0-1; image 1's is empty, so it is left out."""
    segmented = torch.zeros(2, 8, 8, dtype=torch.bool)
    segmented[0, :4, :4] = True
    segmented[0, 4, 0:2] = True  # 2 of the 4 pixels of cell (2, 0): half covered counts as subject
    top_row = torch.zeros(2, 4, 4, dtype=torch.bool)
    top_row[:, 0, :] = True  # cells (0, 0..3): 2 shared with the segmenter's 5 cells, union 7
    exact = torch.zeros(2, 4, 4, dtype=torch.bool)
    exact[:, :2, :2] = True
    exact[:, 2, 0] = True
    ious = step_ious([None, top_row, exact, torch.zeros(2, 4, 4, dtype=torch.bool)], segmented)
    assert math.isnan(ious[0])  # no mask at the first step
    assert ious[1:] == [pytest.approx(2 / 7), 1.0, 0.0]
    assert all(math.isnan(v) for v in step_ious([exact], torch.zeros(2, 8, 8, dtype=torch.bool)))


def test_step_buckets_split_the_steps_in_order():
    assert step_buckets(25) == [list(range(i, i + 5)) for i in range(0, 25, 5)]
    assert step_buckets(3) == [[0], [1], [2]] and step_buckets(7) == [[0, 1], [2, 3], [4], [5], [6]]


def test_recorder_keeps_each_calls_mask_and_changes_nothing(tiny_model):
    unet = tiny_model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), 500), torch.randn(2, 77, 32, generator=g)
    settings = SharedAttentionSettings(groups=("up",), subjects=(("chair",),))

    def three_calls(record: bool):
        controller = SharedAttention(unet, settings, subject_positions=[(2,), (2,)])
        recorder = MaskRecorder(unet)
        with torch.no_grad(), controller:  # bare UNet calls: one guidance half
            with recorder if record else contextlib.nullcontext():
                outputs = [unet(x, t, context=context) for _ in range(3)]
        return outputs, recorder.steps

    recorded, steps = three_calls(record=True)
    plain, nothing = three_calls(record=False)
    assert all(torch.equal(a, b) for a, b in zip(recorded, plain)) and nothing == []
    assert steps[0] is None and len(steps) == 3
    assert all(m.dtype == torch.bool and m.shape == (2, 8, 8) for m in steps[1:])
    with torch.no_grad(), MaskRecorder(unet) as unshared:  # no sharing active: nothing recorded
        unet(x, t, context=context)
    assert unshared.steps == []


@pytest.fixture(scope="module")
def masked_run(tiny_model, files, tmp_path_factory) -> Path:
    args = world_args(files)
    args[args.index("--configs") + 1] = "off,up@mask"
    args[args.index("--steps") + 1] = "3"
    return eval_script.main([*args, "--outdir", str(tmp_path_factory.mktemp("masked") / "out")])


def test_mask_iou_per_step_is_written_for_configurations_with_masks(masked_run):
    rows = read_csv(masked_run / "mask_iou.csv")
    assert [(r["configuration"], r["seed"], r["step"]) for r in rows] == [
        ("up@mask", seed, step) for seed in ("0", "1") for step in ("0", "1", "2")]
    assert all(r["mask_iou"] == "" for r in rows if r["step"] == "0")  # no mask before the second step
    later = [r["mask_iou"] for r in rows if r["step"] != "0"]
    assert all(v == "" or 0.0 <= float(v) <= 1.0 for v in later) and any(v != "" for v in later)
    report = (masked_run / "results.md").read_text()
    section = report.split("Subject masks of sharing against the subject segmenter")[1]
    assert "| `up@mask` | – |" in section and "`off`" not in section.split("\n\n")[1]
    assert "mask_iou.csv" in json.loads((masked_run / "summary.json").read_text())["files"]


def test_mask_iou_is_reproducible(masked_run, tiny_model, files, tmp_path):
    args = world_args(files)
    args[args.index("--configs") + 1] = "off,up@mask"
    args[args.index("--steps") + 1] = "3"
    again = eval_script.main([*args, "--outdir", str(tmp_path / "again")])
    assert (again / "mask_iou.csv").read_bytes() == (masked_run / "mask_iou.csv").read_bytes()


def test_a_prompt_set_without_the_subject_is_refused_before_anything_runs(files, tmp_path, capsys):
    (tmp_path / "rooms.txt").write_text("a chair\na green room\n")  # the second set names no subject
    args = world_args(files)
    args[args.index("--prompts") + 1] = str(tmp_path / "rooms.txt")
    args[args.index("--configs") + 1] = "off,up@mask"
    error = run_cli([*args, "--outdir", str(tmp_path / "out")], capsys)
    assert error.startswith("error: --configs up@mask") and "'a green room'" in error
    assert not (tmp_path / "out").exists()

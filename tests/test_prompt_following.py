"""The prompt-following measurement (ldm/eval/prompt_following.py, scripts/eval_prompt_following.py).

The captions and the bookkeeping are checked against the grammar and a naive recount; the end-to-end
runs use configs/tiny/tiny-inference.yaml and a scene classifier, both with random weights (the
measurement only needs well-formed files: what it reports of them means nothing), 2 DDIM steps, on
the CPU with one thread.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.prompts import caption, parse_prompt
from ldm.data.scenes import WorldScenes
from ldm.data.world import VOCABULARY
from ldm.errors import InvalidValue
from ldm.eval.prompt_following import (ATTRIBUTES, DEFAULT_PROMPT_COUNT, HELD_OUT_SEED, NOISE_STRIDE,
                                       TARGET_ATTRIBUTES, TRAINING_DATA_SEED, HeldOutCaption, ImageReading, Tally,
                                       choose_scale, held_out_captions, tally, verdict)
from tests.conftest import ROOT, TINY_CONFIG, load_script
from tests.world_fixtures import tiny_model_loaded_once, write_tiny_world_files

script = load_script("eval_prompt_following")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------- captions


def test_held_out_captions_are_the_training_grammar_at_another_seed():
    captions = held_out_captions(HELD_OUT_SEED, 30)
    data = WorldScenes(30, seed=HELD_OUT_SEED, mention_prob=0.5)
    for item in captions:
        scene, named = data.scene(item.index)
        assert item.prompt == caption(scene, named)
        assert item.named == parse_prompt(item.prompt) == {a: getattr(scene, a) for a in named}
        assert item.noise_seed == HELD_OUT_SEED * NOISE_STRIDE + item.index


def test_held_out_captions_are_seeded_and_reproducible():
    assert held_out_captions(1000, 20) == held_out_captions(1000, 20)
    assert held_out_captions(1000, 20)[:8] == held_out_captions(1000, 8)  # caption i depends on (seed, i) only
    assert [c.prompt for c in held_out_captions(1000, 20)] != [c.prompt for c in held_out_captions(1001, 20)]


def test_default_budget_names_every_attribute_at_least_20_times():
    counts = Counter(a for c in held_out_captions(HELD_OUT_SEED, DEFAULT_PROMPT_COUNT) for a in c.named)
    assert set(counts) == set(VOCABULARY)
    assert min(counts.values()) >= 20, counts


def test_the_training_data_seed_is_the_recipes_and_is_refused():
    train = OmegaConf.load(ROOT / "configs" / "demo" / "v2" / "demo-train.yaml")
    assert int(train.data.params.seed) == TRAINING_DATA_SEED
    with pytest.raises(InvalidValue, match="training data seed"):
        script.PromptFollowingRequest(Path("c"), Path("k"), Path("x"), seeds=(1000, TRAINING_DATA_SEED))


# ----------------------------------------------------------------------------- bookkeeping


def reading(prompt: str, scale: float = 3.0, index: int = 0, **labels: str) -> ImageReading:
    named = parse_prompt(prompt)
    full = {a: labels.get(a, named.get(a)) for a in ATTRIBUTES}  # the named value unless told otherwise
    return ImageReading(HeldOutCaption(1000, index, prompt, named), scale, full)


def test_tally_counts_named_and_shown_per_attribute():
    readings = [reading("a red chair"), reading("a red striped chair", colour="blue"),
                reading("a face with glasses", subject="vase", glasses=None), reading("a lamp on grass")]
    counts = tally(readings)
    assert counts["subject"] == Tally(4, 3)
    assert counts["colour"] == Tally(2, 1) and counts["pattern"] == Tally(1, 1)
    assert counts["glasses"] == Tally(1, 0)  # a vase has no glasses: wrong, not unjudged
    assert counts["floor"] == Tally(1, 1) and counts["wall"] == Tally(0, 0)
    assert set(counts) == set(ATTRIBUTES)


def test_verdict_takes_the_minimum_over_the_target_attributes_and_checks_the_targets():
    tallies = {a: Tally(20, 20) for a in ATTRIBUTES}
    assert verdict(tallies).meets_targets and verdict(tallies).min_target_accuracy == 1.0
    assert not verdict({**tallies, "subject": Tally(20, 18)}).meets_targets  # class 0.90 < 0.95
    weak = verdict({**tallies, "hair_style": Tally(20, 16), "facing": Tally(20, 2)})
    assert (weak.min_target_accuracy, weak.min_target_attribute) == (0.8, "hair_style") and not weak.meets_targets
    assert weak.min_any_accuracy == 0.1  # facing is reported but not a target
    assert verdict({**tallies, "facing": Tally(20, 2)}).meets_targets
    assert not verdict({**tallies, "skin": Tally(0, 0)}).meets_targets  # unnamed: nothing shows it is followed


def test_choose_scale_takes_the_highest_minimum_and_ties_go_to_the_lower_scale():
    def at(shown: int):
        return verdict({a: Tally(20, shown if a == "colour" else 20) for a in ATTRIBUTES})
    assert choose_scale({2.0: at(15), 3.0: at(18), 5.0: at(18), 7.5: at(17)}) == 3.0
    assert choose_scale({7.5: at(20), 2.0: at(20)}) == 2.0
    unjudged = verdict({a: Tally(0, 0) for a in ATTRIBUTES})
    assert choose_scale({2.0: unjudged, 5.0: at(1)}) == 5.0


# ----------------------------------------------------------------------------- the script end to end

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_world_files(tmp_path_factory.mktemp("prompt-following"), random_segmenter=False)


@pytest.fixture(scope="module")
def tiny_model(files):
    """The tiny model loaded once for every run of this module (loading is most of a run's time)."""
    with tiny_model_loaded_once(files / "tiny.safetensors") as model:
        yield model


def args(files: Path, scales: str = "1.5,3", prompts: int = 3) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--ckpt", str(files / "tiny.safetensors"),
            "--classifier", str(files / "classifier.safetensors"), "--prompts", str(prompts), "--scales", scales,
            "--steps", "2", "--batch-size", "2", "--seeds", "1000,1001"]


@pytest.fixture(scope="module")
def run(tiny_model, files, tmp_path_factory) -> Path:
    return script.main([*args(files), "--outdir", str(tmp_path_factory.mktemp("run") / "out")])


def test_results_are_a_recount_of_the_per_image_readings(run):
    images = read_csv(run / "images.csv")
    assert len(images) == 2 * 2 * 3  # scales x seeds x captions
    naive = Counter()
    for row in images:
        assert {a: row[f"named_{a}"] for a in ATTRIBUTES if row[f"named_{a}"]} == parse_prompt(row["prompt"])
        assert int(row["noise_seed"]) == int(row["data_seed"]) * NOISE_STRIDE + int(row["index"])
        for a in ATTRIBUTES:
            if row[f"named_{a}"]:
                naive[row["scale"], a, "named"] += 1
                naive[row["scale"], a, "shown"] += row[f"label_{a}"] == row[f"named_{a}"]
    results = read_csv(run / "results.csv")
    assert len(results) == 2 * len(ATTRIBUTES)
    for row in results:
        named, shown = naive[row["scale"], row["attribute"], "named"], naive[row["scale"], row["attribute"], "shown"]
        assert (int(row["named"]), int(row["shown"])) == (named, shown)
        assert row["accuracy"] == ("" if not named else format(shown / named, ".6g"))
        assert row["target"] == str(int(row["attribute"] in TARGET_ATTRIBUTES))
    assert {r["named"] for r in results if r["attribute"] == "subject"} == {"6"}  # every caption names it


def test_summary_report_and_grid_agree_with_the_tallies(run):
    summary = json.loads((run / "summary.json").read_text())
    results = read_csv(run / "results.csv")
    for scale in ("1.5", "3"):
        entry = summary["scales"][scale]
        subject = next(r for r in results if r["scale"] == scale and r["attribute"] == "subject")
        assert entry["class_accuracy"] == pytest.approx(int(subject["shown"]) / 6)
        judged = [int(r["shown"]) / int(r["named"]) for r in results
                  if r["scale"] == scale and r["target"] == "1" and int(r["named"])]
        assert entry["min_target_accuracy"] == pytest.approx(min(judged))
    assert summary["chosen_scale"] in (1.5, 3.0) and summary["run"]["sharing"] is None
    report = (run / "results.md").read_text()
    assert "| scale 1.5 | scale 3 |" in report and "min over targets" in report
    with Image.open(run / "grid.png") as grid:
        assert grid.height == 2 * 64  # one row of the first images per scale


def test_same_command_gives_byte_identical_csvs_and_scales_do_not_interact(run, tiny_model, files, tmp_path):
    again = script.main([*args(files), "--outdir", str(tmp_path / "again")])
    for name in ("results.csv", "images.csv"):
        assert (again / name).read_bytes() == (run / name).read_bytes()
    alone = script.main([*args(files, scales="3"), "--outdir", str(tmp_path / "alone")])
    assert read_csv(alone / "images.csv") == [r for r in read_csv(run / "images.csv") if r["scale"] == "3"]


# ----------------------------------------------------------------------------- bad input


def cli_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        script.run_cli(script.main, argv, flags=script.FLAGS)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ")
    return error


@pytest.mark.parametrize("flag, value, expected", [
    ("--scales", "2,x", "--scales"), ("--scales", "2,2", "--scales"), ("--scales", "0", "--scales"),
    ("--scales", "inf", "--scales"), ("--seeds", "1000,2", "--seeds 2"), ("--seeds", "-1", "--seeds"),
    ("--prompts", "0", "--prompts"), ("--steps", "0", "--steps"), ("--threads", "0", "--threads"),
])
def test_bad_values_are_one_line_before_anything_runs(files, tmp_path, capsys, flag, value, expected):
    argv = args(files)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert expected in cli_error([*argv, "--outdir", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


def test_bad_files_are_one_line_naming_the_flag_and_nothing_is_written(files, tmp_path, capsys):
    for flag, path, expected in (("--classifier", tmp_path / "absent.safetensors", "no such file"),
                                 ("--classifier", files / "segmenter.safetensors", "not a world v2 classifier"),
                                 ("--ckpt", tmp_path / "absent.safetensors", "no such file")):
        argv = args(files)
        argv[argv.index(flag) + 1] = str(path)
        error = cli_error([*argv, "--outdir", str(tmp_path / "out")], capsys)
        assert error.startswith(f"error: {flag} ") and expected in error and not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.csv").write_text("x")
    assert "already exists" in cli_error([*args(files), "--outdir", str(tmp_path / "full")], capsys)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["old.csv"]

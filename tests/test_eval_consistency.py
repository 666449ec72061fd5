"""Specification of the consistency evaluation (scripts/eval_consistency.py, ldm/eval/consistency.py and
its parts metric_set.py, metrics_v1.py, instruments.py, configurations.py, jobs.py, report.py, and ldm/eval/distributed.py).

Metrics are checked on hand-made inputs. End-to-end runs use configs/tiny/tiny-inference.yaml with
random weights (written once per module), a tiny random attribute classifier, 2 DDIM steps, sets of
2 images and 2 prompts, on the CPU with one thread. The feature-model path runs on tiny random
`transformers` models saved to a temporary folder, and its scores are compared with the same models
called directly. One test launches 2 processes with torch.distributed.run (gloo, loopback).
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from PIL import Image

import ldm.checkpoint
from ldm.eval import consistency
from ldm.eval.attribute_classifier import AttributeClassifier, ClassifierConfig, save_attribute_classifier
from ldm.eval.configurations import Configuration, parse_configuration, resolve_configurations
from ldm.eval.consistency import create_output_folder
from ldm.eval.jobs import Sampling, SetRunner, image_seeds, make_jobs
from ldm.eval.metric_set import spread
from ldm.eval.metrics_v1 import attribute_metrics, mean_pairwise_cosine, pairwise_agreement, unspecified_attributes
from ldm.eval.distributed import ProcessGroup, shard
from ldm.errors import InvalidValue
from ldm.generation import LoadedModel, decode_to_images, generate_latents, make_sampler
from ldm.util import instantiate_from_config
from tests.conftest import ROOT, TINY_CONFIG, load_script, randomize_

SCRIPT = ROOT / "scripts" / "eval_consistency.py"
PROMPTS = ("a chair", "a red vase")


eval_script = load_script("eval_consistency")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------- metrics on hand-made inputs


def test_agreement_of_identical_labels_is_one():
    assert pairwise_agreement(["red"] * 4) == 1.0


def test_agreement_of_all_different_labels_is_zero():
    assert pairwise_agreement(["red", "blue", "green", "purple"]) == 0.0


def test_agreement_counts_unordered_pairs():
    assert pairwise_agreement(["red", "red", "blue"]) == pytest.approx(1 / 3)  # 1 of 3 pairs agree
    assert math.isnan(pairwise_agreement(["red"]))  # one image: no pair


def test_feature_similarity_of_identical_features_is_one():
    assert mean_pairwise_cosine(torch.tensor([[1.0, 2.0, 3.0]] * 3)) == pytest.approx(1.0)


def test_feature_similarity_averages_cosines_of_distinct_pairs():
    features = torch.tensor([[1.0, 0.0], [0.0, 5.0], [2.0, 2.0]])  # cosines 0, 1/sqrt(2), 1/sqrt(2)
    assert mean_pairwise_cosine(features) == pytest.approx(2 / 3 / math.sqrt(2))


def test_layout_spread_of_identical_positions_is_zero():
    assert spread([0.1, 0.1, 0.1]) == 0.0
    assert spread([-0.2, 0.2]) == pytest.approx(0.2)  # population std


@pytest.mark.parametrize("prompt, unspecified", [
    ("a chair", ("colour", "pattern")),
    ("a red chair", ("pattern",)),
    ("a striped vase", ("colour",)),
    ("two plain blue lamps", ()),
    ("something green", ("cls", "pattern")),
])
def test_unspecified_attributes_are_those_the_prompt_does_not_name(prompt, unspecified):
    assert unspecified_attributes(prompt) == unspecified


def test_attribute_metrics_split_named_and_open_attributes():
    predictions = {"cls": ["chair", "table"], "colour": ["red", "red"], "pattern": ["solid", "dotted"],
                   "x": torch.tensor([0.1, 0.1]), "y": torch.tensor([0.0, 0.2]), "size": torch.tensor([0.8, 0.8])}
    m = attribute_metrics("a red chair", predictions)
    assert m["acc_cls"] == 0.5 and m["acc_colour"] == 1.0 and m["acc_specified"] == 1.0
    assert math.isnan(m["agree_colour"]) and math.isnan(m["acc_pattern"])  # named vs open
    assert m["agree_pattern"] == 0.0 and m["agreement"] == 0.0
    assert m["spread_x"] == 0.0 and m["spread_y"] == pytest.approx(0.1) and m["spread_size"] == 0.0


def test_ambiguous_prompt_is_an_error_naming_the_prompt():
    with pytest.raises(InvalidValue, match="two values") as error:
        unspecified_attributes("a red blue chair")
    assert (error.value.field, error.value.value) == ("prompt", "a red blue chair")


# ----------------------------------------------------------------------------- configurations and jobs


def test_configuration_specs_set_window_strength_and_anchors():
    assert parse_configuration("off").sharing is None
    window = parse_configuration("up@0:0.3").sharing
    assert window.groups == ("up",) and window.steps == (0.0, 0.3) and window.mode == "all"
    assert parse_configuration("all@s=-1").sharing.strength == -1.0
    anchor = parse_configuration("anchor").sharing
    assert (anchor.groups, anchor.mode, anchor.anchors) == (("all",), "anchor", 1)
    assert parse_configuration("mid+up.32@anchor=2").sharing.groups == ("mid", "up.32")


@pytest.mark.parametrize("spec", ["up@sometimes", "all@0.5:0.2", "all@anchor=0"])
def test_bad_configuration_spec_is_an_error_naming_it(spec):
    with pytest.raises(InvalidValue, match="Syntax") as error:
        parse_configuration(spec)
    assert (error.value.field, error.value.value) == ("configs", spec)


def test_default_configurations_cover_paths_levels_anchor_and_window(tiny_unet):
    names = [c.name for c in resolve_configurations(None, tiny_unet)]
    # mid.8 is the only layer of level 8, so level 8 is not listed again after mid.
    assert names == ["off", "all", "down", "mid", "up", "64", "32", "16", "anchor", "all@0:0.5"]
    extra = [c.name for c in resolve_configurations(["default", "up@0:0.3"], tiny_unet)]
    assert extra == [*names, "up@0:0.3"]


def test_unknown_group_is_an_error_listing_the_valid_names(tiny_unet):
    with pytest.raises(InvalidValue, match="valid names"):
        resolve_configurations(["up.128"], tiny_unet)


def test_every_configuration_gets_the_same_seeds():
    jobs = make_jobs([Configuration("off", None), parse_configuration("all")], [0, 1], PROMPTS)
    assert len(jobs) == 2 * 2 * 2 and [j.index for j in jobs] == list(range(8))
    by_config = {name: [(j.seed, j.prompt) for j in jobs if j.configuration == name] for name in ("off", "all")}
    assert by_config["off"] == by_config["all"]
    assert image_seeds(2, 3) == [2000, 2001, 2002]


def test_sharding_splits_jobs_disjointly_and_completely():
    jobs = list(range(11))
    shards = [shard(jobs, ProcessGroup(rank=r, world_size=3)) for r in range(3)]
    assert sorted(j for s in shards for j in s) == jobs
    assert shards == [shard(jobs, ProcessGroup(rank=r, world_size=3)) for r in range(3)]  # deterministic


def test_output_folder_is_never_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(consistency, "DEFAULT_OUTPUT_ROOT", tmp_path / "consistency")
    first, second = create_output_folder(None), create_output_folder(None)
    assert (first.name, second.name) == ("run-0000", "run-0001")
    (first / "results.md").write_text("earlier results")
    with pytest.raises(FileExistsError, match="never overwrites"):
        create_output_folder(first)
    assert create_output_folder(second) == second  # empty: fine


# ----------------------------------------------------------------------------- end to end on a tiny model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = randomize_(instantiate_from_config(instantiate_config().model))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(folder / "tiny.safetensors"))
    classifier = randomize_(AttributeClassifier(ClassifierConfig(widths=(8, 8, 8, 8, 8), reduced_channels=4,
                                                                 feature_dim=16)), seed=1)
    save_attribute_classifier(classifier.eval(), folder / "classifier.safetensors")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"ckpt": folder / "tiny.safetensors", "classifier": folder / "classifier.safetensors",
            "prompts": folder / "prompts.txt"}


def instantiate_config():
    from omegaconf import OmegaConf
    return OmegaConf.load(TINY_CONFIG)


@pytest.fixture(scope="module")
def tiny_model(files):
    """The evaluation loads the checkpoint through this cache, so in-process runs share one model."""
    model = ldm.checkpoint.load_model_from_config(instantiate_config(), files["ckpt"], device="cpu", verbose=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ldm.checkpoint, "load_model_from_config", lambda *args, **kwargs: model)
        yield model


@pytest.fixture(scope="module")
def run_args(files) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--ckpt", str(files["ckpt"]), "--classifier", str(files["classifier"]),
            "--prompts", str(files["prompts"]), "--device", "cpu", "--steps", "2", "--set-size", "2",
            # the tests compare with float32 calls; autocast is bfloat16 on CPUs that have it natively
            "--precision", "full", "--seeds", "0,1", "--configs", "off,all"]


@pytest.fixture(scope="module")
def single_run(tiny_model, run_args, tmp_path_factory) -> Path:
    return eval_script.main([*run_args, "--outdir", str(tmp_path_factory.mktemp("run") / "out")])


def test_outputs_are_written_and_well_formed(single_run):
    results = read_csv(single_run / "results.csv")
    rows = [(r["configuration"], r["seed"]) for r in results]
    assert rows == [("off", "0"), ("off", "1"), ("all", "0"), ("all", "1")]
    assert all(0.0 <= float(r["agreement"]) <= 1.0 and 0.0 <= float(r["acc_cls"]) <= 1.0 for r in results)
    sets = read_csv(single_run / "sets.csv")
    assert len(sets) == 2 * 2 * len(PROMPTS)
    assert {s["image_seeds"] for s in sets} == {"0 1", "1000 1001"}
    assert all(s["agree_colour"] == "" for s in sets if s["prompt"] == "a red vase")  # named: no agreement
    timing = read_csv(single_run / "timing.csv")
    assert all(float(t["sec_per_image"]) > 0 and float(t["peak_memory_mb"]) > 0 for t in timing)
    summary = json.loads((single_run / "summary.json").read_text())
    assert [c["name"] for c in summary["configurations"]] == ["off", "all"]
    mean = np.mean([float(r["agreement"]) for r in results if r["configuration"] == "all"])
    assert summary["summary"]["all"]["agreement"]["mean"] == pytest.approx(mean, abs=1e-6)
    main_table = (single_run / "results.md").read_text().split("Change from `off`")[0]
    table = [line for line in main_table.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == ["off", "all"] and "±" in table[0]
    for name in ("grid-00-off.png", "grid-01-all.png"):
        with Image.open(single_run / name) as grid:
            assert grid.height == len(PROMPTS) * 64 and grid.width > 2 * 64  # rows = sets, label strip
            cells = np.asarray(grid.convert("RGB"), dtype=np.int16)[:, -2 * 64:]  # (sets * 64, 2 * 64, 3)
        for row in range(len(PROMPTS)):
            for column in range(2):  # every image the study measured is a picture, not a constant square
                cell = cells[row * 64:(row + 1) * 64, column * 64:(column + 1) * 64]
                assert cell.max() - cell.min() > 64 and cell.std() > 10, (name, row, column)


def test_change_from_off_is_paired_by_seed():
    from ldm.eval.report import changes_from_off
    nan = math.nan
    row = lambda name, seed, agreement, acc: {"configuration": name, "seed": seed, "agreement": agreement,  # noqa: E731
                                              "feature_sim": 0.5, "acc_cls": acc, "acc_specified": nan,
                                              "text_image": nan}
    # Seed 1 gives alike images in both configurations: the unpaired spreads overlap, the change does not.
    rows = [row("off", 0, 0.2, 1.0), row("off", 1, 0.6, 1.0), row("off", 2, 0.3, 1.0),
            row("all", 2, 0.4, 0.5), row("all", 0, 0.3, 1.0), row("all", 1, 0.8, 1.0)]
    changes = changes_from_off(rows, [Configuration("off", None), parse_configuration("all")])
    assert list(changes) == ["all"]
    agreement = changes["all"]["agreement"]
    assert agreement["mean"] == pytest.approx(np.mean([0.1, 0.2, 0.1]))
    assert agreement["std"] == pytest.approx(np.std([0.1, 0.2, 0.1], ddof=1))
    assert (agreement["min"], agreement["max"], agreement["n_seeds"]) == (pytest.approx(0.1), pytest.approx(0.2), 3)
    assert changes["all"]["acc_cls"]["min"] == pytest.approx(-0.5)
    assert changes["all"]["feature_sim"]["max"] == 0.0 and math.isnan(changes["all"]["acc_specified"]["mean"])
    assert changes_from_off([r for r in rows if r["configuration"] == "all"], [parse_configuration("all")]) == {}


def test_report_gives_the_change_from_off_of_the_seed_rows(single_run):
    results = read_csv(single_run / "results.csv")
    value = {(r["configuration"], r["seed"]): float(r["agreement"]) for r in results}
    differences = [value[("all", seed)] - value[("off", seed)] for seed in ("0", "1")]
    summary = json.loads((single_run / "summary.json").read_text())
    change = summary["change_from_off"]["all"]["agreement"]
    assert change["mean"] == pytest.approx(np.mean(differences), abs=1e-5)
    assert change["min"] == pytest.approx(min(differences), abs=1e-5) and list(summary["change_from_off"]) == ["all"]
    table = (single_run / "results.md").read_text().split("Change from `off`")[1]
    row = next(line for line in table.splitlines() if line.startswith("| `all`"))
    assert row.split(" | ")[1].startswith(f"{np.mean(differences):+.3f} ± ")


def test_identical_arguments_give_identical_numbers(single_run, tiny_model, run_args, tmp_path):
    again = eval_script.main([*run_args, "--outdir", str(tmp_path / "again")])
    for name in ("results.csv", "sets.csv"):
        assert (again / name).read_bytes() == (single_run / name).read_bytes()


def test_sharing_changes_the_images(single_run):
    with Image.open(single_run / "grid-00-off.png") as off, Image.open(single_run / "grid-01-all.png") as shared:
        assert not np.array_equal(np.asarray(off), np.asarray(shared))


def test_sets_of_one_image_are_the_same_in_every_configuration(tiny_model, tiny_unet):
    configurations = resolve_configurations(None, tiny_unet)
    runner = SetRunner(LoadedModel.wrap(tiny_model), None, configurations, Sampling(steps=2, scale=3.0, set_size=1),
                       torch.device("cpu"))
    images = {c.name: np.asarray(runner.images("a chair", 7, c.sharing)[0]) for c in configurations}
    for name, image in images.items():
        assert np.array_equal(image, images["off"]), name


def test_existing_outdir_with_files_is_refused(run_args, tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="never overwrites"):
        eval_script.main([*run_args, "--outdir", str(tmp_path)])
    assert (tmp_path / "old.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- transformers feature models


def save_tiny_clip(folder: Path) -> None:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **tiny),
        vision_config=dict(image_size=32, patch_size=8, **tiny), projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)


def save_tiny_dino(folder: Path) -> None:
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, image_size=32, patch_size=8)
    transformers.Dinov2Model(config).save_pretrained(folder)
    processor = transformers.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)


def reference_features(kind: str, folder: Path, images: list[Image.Image],
                       prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image features and text features computed directly with transformers."""
    with torch.no_grad():
        if kind == "dino":
            model = transformers.Dinov2Model.from_pretrained(folder).eval()
            pixels = transformers.BitImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")
            return model(**pixels).last_hidden_state[:, 0], None
        model = transformers.CLIPModel.from_pretrained(folder).eval()
        processor = transformers.CLIPProcessor.from_pretrained(folder)
        inputs = processor(images=images, text=[prompt], return_tensors="pt", padding=True)
        out = model(**inputs)
        return out.image_embeds, out.text_embeds


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_feature_model_scores_match_the_model_called_directly(kind, tiny_model, run_args, tmp_path):
    folder = tmp_path / kind
    (save_tiny_clip if kind == "clip" else save_tiny_dino)(folder)
    args = [*run_args[:run_args.index("--seeds")], "--seeds", "0", "--configs", "off"]
    outdir = eval_script.main([*args, "--features", kind, "--feature-model", str(folder),
                               "--outdir", str(tmp_path / "out")])
    rows = read_csv(outdir / "sets.csv")
    assert all(r["agreement"] == "" and r["acc_cls"] == "" and r["spread_x"] == "" for r in rows)  # no classifier
    assert "attribute classifier was not used" in (outdir / "results.md").read_text()
    for row in rows:
        seeds = [int(s) for s in row["image_seeds"].split()]
        latents = generate_latents(tiny_model, make_sampler("ddim", tiny_model), [row["prompt"]] * 2, seeds,
                                   shape=(4, 8, 8), steps=2, scale=7.5)
        images_, text = reference_features(kind, folder, decode_to_images(tiny_model, latents), row["prompt"])
        expected = torch.nn.functional.cosine_similarity(images_[0], images_[1], dim=0)
        assert float(row["feature_sim"]) == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
        if kind == "clip":
            score = torch.nn.functional.cosine_similarity(images_, text, dim=-1).mean()
            assert float(row["text_image"]) == pytest.approx(float(score), rel=1e-4, abs=1e-5)
        else:
            assert row["text_image"] == ""


def test_missing_feature_model_is_an_error_saying_nothing_is_downloaded(run_args, tmp_path):
    with pytest.raises(InvalidValue, match="(?i)nothing is downloaded"):
        eval_script.main([*run_args, "--features", "dino", "--feature-model", str(tmp_path / "absent"),
                          "--outdir", str(tmp_path / "out")])


# ----------------------------------------------------------------------------- several processes


def test_two_processes_write_the_same_results_as_one(single_run, run_args, tmp_path):
    outdir = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), *run_args, "--outdir", str(outdir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("results.csv", "sets.csv", "grid-00-off.png", "grid-01-all.png"):
        assert (outdir / name).read_bytes() == (single_run / name).read_bytes(), name
    assert json.loads((outdir / "summary.json").read_text())["run"]["processes"] == 2

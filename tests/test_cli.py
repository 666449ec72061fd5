"""End-to-end specification of scripts/txt2img.py and scripts/img2img.py on a tiny random checkpoint.

The checkpoint is configs/tiny/tiny-inference.yaml (64 px images, f = 8) with random weights (so
attention, and therefore batch sharing, shows at the output), written once per session. The scripts'
`main(argv)` runs in-process. Each run that several tests inspect is a module fixture, run once. Runs
use the CPU, 2 DDIM steps and batches of 2; torch is held to one thread, which is much faster than two
on a shared 2-core machine. Every saved image is checked to be a picture, not a constant (black)
square. Bad input is specified in tests/test_bad_input.py.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm.checkpoint
from ldm.generation import generate_latents, img2img_latents, make_sampler
from ldm.sharing import MODES
from tests.conftest import TINY_CONFIG, load_script

STEPS = "2"
LONG_PROMPT = "a " * 74 + "purple elephant wearing a hat"  # 74 + BOS + EOS + "purple" fill CLIP's 77 tokens


txt2img = load_script("txt2img")
img2img = load_script("img2img")


@dataclass
class Run:
    outdir: Path
    written: list[Path]

    def __post_init__(self) -> None:
        for path in self.written:
            assert_picture(path)

    @property
    def samples(self) -> list[Path]:
        return [path for path in self.written if path.parent.name == "samples"]

    @property
    def grid(self) -> Path:
        (grid,) = [path for path in self.written if path.name.startswith("grid-")]
        return grid


def parameters(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["parameters"])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_picture(path: Path) -> None:
    """A saved image holds a picture: a wide range of values, not a constant (e.g. all-black) square.
    (8-bit pixels are finite by construction; non-finite latents are refused before they are decoded.)"""
    values = pixels(path)
    assert values.max() - values.min() > 64 and values.std() > 10, f"{path} is nearly constant"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def load_once(tiny_ckpt):
    """The scripts load the checkpoint through this: the first load of each (file, options) is real,
    later runs get the same model back. Saves a load per run; the loader has tests of its own."""
    real_loader = ldm.checkpoint.load_model_from_config
    models = {}

    def loader(config, ckpt, **options):
        key = (str(ckpt), repr(sorted(options.items())))
        if key not in models:
            models[key] = real_loader(config, ckpt, **options)
        return models[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ldm.checkpoint, "load_model_from_config", loader)
        yield loader


@pytest.fixture(scope="module")
def tiny_model(load_once, tiny_ckpt):
    """The model the scripts run (same loader options as theirs)."""
    return load_once(TINY_CONFIG, tiny_ckpt, use_ema=False, device=torch.device("cpu"), verbose=True)


@pytest.fixture(scope="module")
def model_args(tiny_ckpt) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--device", "cpu", "--ddim_steps", STEPS,
            "--n_samples", "2", "--n_iter", "1"]


@pytest.fixture(scope="module")
def run_txt2img(model_args, tmp_path_factory):
    def run(*args: str, outdir: Path | None = None) -> Run:
        outdir = outdir or tmp_path_factory.mktemp("txt2img")
        written = txt2img.main([*model_args, "--H", "64", "--W", "64", "--outdir", str(outdir), *args])
        return Run(outdir, written)
    return run


@pytest.fixture(scope="module")
def run_img2img(model_args, init_image, tmp_path_factory):
    def run(*args: str) -> Run:
        outdir = tmp_path_factory.mktemp("img2img")
        written = img2img.main([*model_args, "--init-img", str(init_image), "--outdir", str(outdir), *args])
        return Run(outdir, written)
    return run


@pytest.fixture(scope="module")
def init_image(tmp_path_factory) -> Path:
    """100 x 70 px, so the script has to resize it to 64 x 64."""
    array = np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def plain_run(run_txt2img) -> Run:
    """Two iterations of 2 images: seeds 42, 43, 44, 45."""
    return run_txt2img("--prompt", "a red chair", "--n_iter", "2")


@pytest.fixture(scope="module")
def repeated_run(plain_run, run_txt2img):
    """The plain run again into the same folder; returns (bytes of the first run's files before, the run)."""
    before = {path: path.read_bytes() for path in plain_run.written}
    return before, run_txt2img("--prompt", "a red chair", "--n_iter", "2", outdir=plain_run.outdir)


@pytest.fixture(scope="module")
def compare_run(run_txt2img) -> Run:
    return run_txt2img("--prompt", "a red chair", "--n_iter", "2", "--shared-attn", "all", "--compare")


@pytest.fixture(scope="module")
def from_file_run(run_txt2img, tmp_path_factory):
    """Three prompts (the last one too long for CLIP) in batches of 2; returns (prompts, run, warnings)."""
    prompts = ["a red chair", "a blue lamp", LONG_PROMPT]
    prompt_file = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = run_txt2img("--from-file", str(prompt_file))
    return prompts, run, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------- txt2img outputs


def test_txt2img_saves_each_image_with_prompt_seed_and_settings(plain_run):
    assert len(plain_run.samples) == 4
    meta = parameters(plain_run.samples[1])
    with Image.open(plain_run.samples[1]) as image:
        assert image.size == (64, 64)
        assert image.text["prompt"] == "a red chair" and image.text["seed"] == "43"
    assert meta["prompt"] == "a red chair" and meta["seed"] == 43 and meta["batch_seeds"] == [42, 43]
    assert meta["sampler"] == "ddim" and meta["steps"] == 2 and meta["H"] == meta["W"] == 64
    assert meta["shared_attention"] is None


def test_txt2img_saves_a_grid_of_all_images(plain_run):
    with Image.open(plain_run.grid) as grid:
        assert grid.size == (2 * 64, 2 * 64)  # n_samples images per row, one row per batch
    assert plain_run.grid.parent == plain_run.outdir


def test_second_run_writes_new_names_and_leaves_earlier_files_untouched(repeated_run):
    before, second = repeated_run
    assert not set(second.written) & set(before)
    assert all(path.read_bytes() == content for path, content in before.items())


def test_same_seed_gives_identical_images(repeated_run):
    before, second = repeated_run
    first_samples = [path for path in before if path.parent.name == "samples"]
    assert [p.read_bytes() for p in second.samples] == [before[p] for p in first_samples]


def test_image_k_uses_seed_plus_k(plain_run, run_txt2img):
    later = run_txt2img("--prompt", "a red chair", "--seed", "44")
    assert [parameters(p)["seed"] for p in plain_run.samples] == [42, 43, 44, 45]
    for ours, earlier in zip(later.samples, plain_run.samples[2:]):
        np.testing.assert_array_equal(pixels(ours), pixels(earlier))
    assert np.abs(pixels(later.samples[0]) - pixels(plain_run.samples[0])).max() > 0


def test_fixed_code_restarts_the_seeds_every_iteration(plain_run, run_txt2img):
    fixed = run_txt2img("--prompt", "a red chair", "--n_iter", "2", "--fixed_code")
    assert [parameters(p)["seed"] for p in fixed.samples] == [42, 43, 42, 43]
    for ours, earlier in zip(fixed.samples, plain_run.samples[:2] * 2):
        np.testing.assert_array_equal(pixels(ours), pixels(earlier))


def test_from_file_fills_a_short_last_batch(from_file_run):
    prompts, run, _ = from_file_run
    metas = [parameters(p) for p in run.samples]
    assert [m["prompt"] for m in metas] == prompts
    assert [m["seed"] for m in metas] == [42, 43, 44]
    assert metas[2]["batch_seeds"] == [44]


def test_prompt_longer_than_77_tokens_warns_naming_what_was_cut(from_file_run):
    _, _, messages = from_file_run
    cut = [m for m in messages if "cut" in m]
    assert cut, messages
    assert "elephant wearing a hat" in cut[0] and "a blue lamp" not in cut[0]


@pytest.mark.parametrize("flag", ["--plms", "--dpm_solver"])
def test_every_sampler_runs(flag, plain_run, run_txt2img):
    run = run_txt2img("--prompt", "a red chair", flag, "--skip_grid")
    assert len(run.written) == 2  # --skip_grid: samples only
    assert parameters(run.samples[0])["sampler"] == flag.lstrip("-")
    # A different integrator on the same start noise ends elsewhere after 2 steps.
    assert np.abs(pixels(run.samples[0]) - pixels(plain_run.samples[0])).max() > 0


# ----------------------------------------------------------------------------- batch-shared attention


def test_compare_saves_a_labelled_grid_with_two_rows_per_batch(compare_run):
    with Image.open(compare_run.grid) as grid:
        width, height = grid.size
    assert height == 2 * 2 * 64  # 2 batches x (no sharing, shared)
    assert width > 2 * 64  # the label strip
    assert parameters(compare_run.grid)["compare"] is True


def test_compare_no_sharing_images_equal_a_plain_run(compare_run, plain_run):
    plain = [p for p in compare_run.samples if parameters(p)["shared_attention"] is None]
    assert [parameters(p)["seed"] for p in plain] == [42, 43, 44, 45]
    for ours, earlier in zip(plain, plain_run.samples):
        np.testing.assert_array_equal(pixels(ours), pixels(earlier))


def test_compare_shared_images_differ_and_record_their_settings(compare_run, plain_run):
    shared = [p for p in compare_run.samples if parameters(p)["shared_attention"] is not None]
    assert len(shared) == 4
    assert parameters(shared[0])["shared_attention"]["groups"] == "all"
    for ours, plain in zip(shared, plain_run.samples):
        assert np.abs(pixels(ours) - pixels(plain)).max() > 0


def test_shared_attn_help_lists_groups_and_layers_without_a_checkpoint(capsys):
    written = txt2img.main(["--config", str(TINY_CONFIG), "--shared-attn", "help"])
    out = capsys.readouterr().out
    assert written == []
    layers, modes = out.split("Modes:")
    tags = [line.split()[0] for line in layers.splitlines() if line.startswith("  ")]
    assert tags[0] == "down.64" and tags[-1] == "up.64" and "mid.8" in tags
    assert "Group names: all, down, mid, up" in out
    assert [line.split()[0] for line in modes.splitlines() if line.startswith("  ")] == list(MODES)
    assert "--shared-attn-subject" in out and "--shared-attn-dropout" in out and "--shared-attn-adain" in out


@pytest.mark.parametrize("script, argv", [("txt2img", ["--demo"]), ("img2img", ["--demo"]),
                                          ("eval_consistency", ["--demo"]), ("attention_stats", ["--demo"]),
                                          ("probe_text_conditioning", ["--demo"]),
                                          ("eval_reference", ["--outdir", "unused"])])
def test_demo_defaults_are_the_v2_model_at_the_one_demo_guidance_scale(script, argv):
    """--demo (and eval_reference's default model) is the demo model v2, at DEMO_SCALE in every script."""
    from ldm.generation.builder import resolve_path
    from ldm.generation.model import DEMO_CKPT, DEMO_CONFIG, DEMO_SCALE
    opt = load_script(script).parse_args(argv)
    assert resolve_path(opt.config).resolve() == DEMO_CONFIG and resolve_path(opt.ckpt).resolve() == DEMO_CKPT
    assert opt.scale == DEMO_SCALE


# ----------------------------------------------------------------------------- img2img


@pytest.fixture(scope="module")
def img2img_runs(run_img2img) -> dict[str, Run]:
    """Strength 0.5 plain, and strength 1.0 with and without sharing (--compare)."""
    return {"0.5": run_img2img("--prompt", "a red chair", "--strength", "0.5"),
            "1.0": run_img2img("--prompt", "a red chair", "--strength", "1.0", "--shared-attn", "all", "--compare")}


@pytest.mark.parametrize("strength", ["0.5", "1.0"])
def test_img2img_saves_images_with_strength_and_init_image(strength, img2img_runs):
    run = img2img_runs[strength]
    meta = parameters(run.samples[1])
    assert meta["strength"] == float(strength) and meta["init_image"] == "init.png"
    assert meta["encode_steps"] == int(float(strength) * 2)
    assert meta["seed"] == 43 and meta["prompt"] == "a red chair" and meta["sampler"] == "ddim"
    with Image.open(run.samples[0]) as image:
        assert image.size == (64, 64)  # 100 x 70 rounded down to multiples of 64
    assert np.abs(pixels(run.samples[0]) - pixels(run.samples[1])).max() > 0  # each image has its own seed


def test_img2img_with_shared_attention(img2img_runs):
    run = img2img_runs["1.0"]
    plain = [p for p in run.samples if parameters(p)["shared_attention"] is None]
    shared = [p for p in run.samples if parameters(p)["shared_attention"] is not None]
    assert len(plain) == len(shared) == 2
    assert all(np.abs(pixels(a) - pixels(b)).max() > 0 for a, b in zip(plain, shared))


# ----------------------------------------------------------------------------- per-image noise (library level)


def test_ddim_eta_noise_follows_each_image_seed_not_its_batch_position(tiny_model):
    sampler = make_sampler("ddim", tiny_model)
    options = dict(shape=(4, 8, 8), steps=2, scale=1.0, eta=1.0)
    forward = generate_latents(tiny_model, sampler, ["a chair"] * 2, [7, 8], **options)
    swapped = generate_latents(tiny_model, sampler, ["a chair"] * 2, [8, 7], **options)
    torch.testing.assert_close(forward, swapped.flip(0))
    deterministic = generate_latents(tiny_model, sampler, ["a chair"] * 2, [7, 8], **{**options, "eta": 0.0})
    assert (forward - deterministic).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # the eta noise is really there


def test_img2img_noise_follows_each_image_seed_not_its_batch_position(tiny_model):
    sampler = make_sampler("ddim", tiny_model)
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    options = dict(steps=2, strength=0.5, scale=1.0, eta=1.0)
    forward = img2img_latents(tiny_model, sampler, init, ["a chair"] * 2, [7, 8], **options)
    swapped = img2img_latents(tiny_model, sampler, init, ["a chair"] * 2, [8, 7], **options)
    torch.testing.assert_close(forward, swapped.flip(0))
    assert (forward[0] - forward[1]).abs().max() > 1e-3


def test_img2img_strength_0_returns_the_init_latent(tiny_model):
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = img2img_latents(tiny_model, make_sampler("ddim", tiny_model), init, ["a chair"] * 2, [7, 8],
                          steps=2, strength=0.0, scale=5.0)
    torch.testing.assert_close(out, init.expand(2, -1, -1, -1))


def test_grid_labels_sit_in_the_middle_of_their_own_row():
    from ldm.generation import image_grid
    tile = Image.new("RGB", (40, 40), "gray")
    grid = np.asarray(image_grid([[tile, tile], [tile]], ["off (no sharing)", "all"]).convert("L"))
    strip = grid[:, : grid.shape[1] - 2 * 40]  # the label strip left of the images
    assert strip.shape[1] > 0
    for row in range(2):
        ink = np.nonzero((strip[row * 40:(row + 1) * 40] < 128).any(axis=1))[0]  # rows of dark pixels
        assert ink.size, f"row {row} has no label"
        assert ink.min() > 0 and ink.max() < 39, "the label must not touch the row's edges"
        assert abs((ink.min() + ink.max()) / 2 - 19.5) <= 3

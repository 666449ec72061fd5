"""Every bad input of the scripts, one row each: one line on stderr, exit status 2, nothing written.

CASES is the table. A row names the script, the arguments added to that script's BASE arguments
(placeholders in braces are files made by the `paths` fixture), and the expected error line. Unless a
row is marked `loads` (its error lies in the weights or in the sampling arithmetic, found only by
running), it must fail before the checkpoint loads: the loader is replaced by one that fails the test.
For txt2img and img2img the output folder already holds an earlier run's files, which must come out
byte for byte the same; the consistency study's output folder must not be created. Scripts run
in-process through `ldm.cli.run_cli`, exactly as their `__main__` does; one row also runs as a real
process. The last tests are inputs that are NOT errors and do what the help says.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
from PIL import Image

import ldm.checkpoint
from ldm.cli import GENERATION_FLAGS, SD_CKPT, run_cli
from tests.conftest import ROOT, TINY_CONFIG, load_script

SCRIPTS = {name: load_script(name) for name in ("txt2img", "img2img", "eval_consistency", "attention_stats")}
MODEL = ("--config", str(TINY_CONFIG), "--ckpt", "{ckpt}", "--device", "cpu")
BASE = {
    "txt2img": (*MODEL, "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "1", "--outdir", "{out}"),
    "img2img": (*MODEL, "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "1", "--outdir", "{out}",
                "--init-img", "{init}"),
    "eval_consistency": (*MODEL, "--steps", "2", "--set-size", "2", "--seeds", "0", "--configs", "off",
                         "--outdir", "{new_out}"),
    "attention_stats": (*MODEL, "--steps", "2", "--n_samples", "2"),
}


@dataclass(frozen=True)
class Case:
    id: str
    script: str
    args: tuple[str, ...]
    line: str  # a regular expression searched in the error line
    loads: bool = False  # the error can only show once the model has loaded and run
    base: bool = True  # False: `args` are the whole command line


def case(id: str, script: str, args: tuple[str, ...], line: str, **options) -> Case:
    return Case(id, script, tuple(args), line, **options)


CASES = [
    # --- numbers that are not finite or out of range
    case("eta nan", "txt2img", ("--ddim_eta", "nan"), r"^error: --ddim_eta nan: must be a finite number"),
    case("eta 5", "txt2img", ("--ddim_eta", "5"), r"^error: --ddim_eta 5: must be between 0 .* and 1"),
    case("eta negative", "txt2img", ("--ddim_eta", "-0.5"), r"^error: --ddim_eta -0.5: must be between 0"),
    case("scale inf", "txt2img", ("--scale", "inf"), r"^error: --scale inf: must be a finite number"),
    case("scale nan", "txt2img", ("--scale", "nan"), r"^error: --scale nan: must be a finite number"),
    case("scale 1e30", "txt2img", ("--scale", "1e30"),
         r"^error: sampling gave NaN or infinite latents .*guidance scale 1e\+30 is far beyond", loads=True),
    case("checkpoint with a NaN tensor", "txt2img", ("--ckpt", "{nan_ckpt}"),
         r"^error: sampling gave NaN .*tensor model\.diffusion_model\.out\.2\.weight holds NaN", loads=True),
    case("steps 0", "txt2img", ("--ddim_steps", "0"), r"^error: --ddim_steps 0: must be a whole number of at least 1"),
    case("steps 5000", "txt2img", ("--ddim_steps", "5000"), r"^error: --ddim_steps 5000: must be between 1 and 1000"),
    case("seed negative", "txt2img", ("--seed", "-1"), r"^error: --seed -1: must be a whole number of at least 0"),
    case("seed too large", "txt2img", ("--seed", str(2 ** 63 - 1)), r"^error: --seed \d+: image seeds run"),
    case("n_samples 0", "txt2img", ("--n_samples", "0"), r"^error: --n_samples 0: must be a whole number"),
    case("n_iter 0", "txt2img", ("--n_iter", "0"), r"^error: --n_iter 0: must be a whole number"),
    case("not a number", "txt2img", ("--ddim_steps", "ten"),
         r"^error: argument --ddim_steps: invalid int value: 'ten' \(see --help\)$"),
    # --- sizes and the latent geometry, checked against the config
    case("H not a multiple", "txt2img", ("--H", "60"), r"^error: --H 60: image sides must be multiples of 64"),
    case("H the UNet cannot halve", "txt2img", ("--H", "72"), r"^error: --H 72: image sides must be multiples of 64"),
    case("W zero", "txt2img", ("--W", "0"), r"^error: --W 0: must be a positive whole number of pixels"),
    case("C 8", "txt2img", ("--C", "8"), r"^error: --C 8: the model's autoencoder has 4 there"),
    case("f 8 on the demo model", "txt2img", ("--demo", "--f", "8", "--outdir", "{out}"),
         r"^error: --f 8: the model's autoencoder has 4 there", base=False),
    # --- files: checkpoint, config, prompts, output folder
    case("missing checkpoint", "txt2img", ("--ckpt", "{missing}"), rf"^error: checkpoint not found: .*{SD_CKPT}.*--demo"),
    case("checkpoint is a folder", "txt2img", ("--ckpt", "{folder}"), r"^error: checkpoint path .* is a directory"),
    case("checkpoint is not a checkpoint", "txt2img", ("--ckpt", "{garbage}"),
         r"^error: .*garbage\.ckpt starts with .*neither a safetensors file nor a torch\.save checkpoint"),
    case("config is a folder", "txt2img", ("--config", "{folder}"), r"^error: config .* is a folder"),
    case("config missing", "txt2img", ("--config", "{missing}"), r"^error: config .*missing.* does not exist"),
    case("config malformed YAML", "txt2img", ("--config", "{malformed}"), r"^error: config .* is not valid YAML"),
    case("config not a model", "txt2img", ("--config", "{not_model}"),
         r"^error: config .* does not describe a latent diffusion model"),
    case("config without an autoencoder", "txt2img", ("--config", "{half_model}"),
         r"^error: config .* does not describe a latent diffusion model"),
    case("prompt file missing", "txt2img", ("--from-file", "{missing}"), r"^error: prompt file .* does not exist"),
    case("prompt file empty", "txt2img", ("--from-file", "{empty}"), r"^error: --from-file .*: the file holds no prompts"),
    case("prompt file not text", "txt2img", ("--from-file", "{binary}"), r"^error: --from-file .*: cannot be read as UTF-8"),
    case("outdir unwritable", "txt2img", ("--outdir", "{unwritable}/out"), r"^error: output folder .* cannot be written"),
    case("outdir inside a file", "txt2img", ("--outdir", "{file}/out"), r"^error: output folder .* is not a folder"),
    case("device unknown", "txt2img", ("--device", "toaster"), r"^error: --device toaster: is not a device name"),
    # --- samplers and flags that do not go together
    case("plms and dpm_solver", "txt2img", ("--plms", "--dpm_solver"), r"^error: --plms and --dpm_solver exclude"),
    case("plms with eta", "txt2img", ("--plms", "--ddim_eta", "0.5"), r"^error: --ddim_eta 0.5: PLMS is deterministic"),
    case("prompt without text", "txt2img", ("--prompt",), r"^error: --prompt needs a text"),
    case("laion400m", "txt2img", ("--laion400m",), r"^error: --laion400m is not supported"),
    # --- batch-shared attention
    case("unknown group", "txt2img", ("--shared-attn", "sideways"),
         r"^error: --shared-attn sideways: unknown shared-attention group.*valid names: all, down, mid, up"),
    case("window selects no step", "txt2img", ("--shared-attn", "all", "--shared-attn-steps", "0.6:0.9"),
         r"^error: --shared-attn-steps 0.6:0.9: the step window selects none of the 2 sampling steps"),
    case("window backwards", "txt2img", ("--shared-attn", "all", "--shared-attn-steps", "0.6:0.2"),
         r"^error: --shared-attn-steps 0.6:0.2: .*0 <= start < end <= 1"),
    case("window not fractions", "txt2img", ("--shared-attn", "all", "--shared-attn-steps", "half"),
         r"^error: --shared-attn-steps half: give START:END"),
    case("window not finite", "txt2img", ("--shared-attn", "all", "--shared-attn-steps", "0:nan"),
         r"^error: --shared-attn-steps 0:nan: .*0 <= start < end <= 1"),
    case("strength nan", "txt2img", ("--shared-attn", "all", "--shared-attn-strength", "nan"),
         r"^error: --shared-attn-strength nan: strength must be a number or -inf"),
    case("strength +inf", "txt2img", ("--shared-attn", "all", "--shared-attn-strength", "inf"),
         r"^error: --shared-attn-strength inf: strength must be a number or -inf"),
    case("anchors 0", "txt2img", ("--shared-attn", "all", "--shared-attn-mode", "anchor", "--shared-attn-anchors", "0"),
         r"^error: --shared-attn-anchors 0: anchors must be at least 1"),
    case("mode unknown", "txt2img", ("--shared-attn", "all", "--shared-attn-mode", "some"),
         r"^error: argument --shared-attn-mode: invalid choice: 'some'"),
    case("mode without sharing", "txt2img", ("--shared-attn-mode", "anchor"),
         r"^error: --shared-attn-mode only applies together with --shared-attn"),
    case("dropout 1", "txt2img", ("--shared-attn", "up", "--shared-attn-dropout", "1"),
         r"^error: --shared-attn-dropout 1(\.0)?: the dropout probability must satisfy 0 <= p < 1"),
    case("subject not in the prompt", "txt2img", ("--shared-attn", "up", "--shared-attn-subject", "dog"),
         r"^error: --shared-attn-subject dog: the prompt of image 0 \('a painting of a virus monster playing guitar'\) contains none of the subject words"),
    case("subject with mode others", "txt2img", ("--shared-attn", "up", "--shared-attn-mode", "others",
                                                 "--shared-attn-subject", "chair"),
         r"^error: --shared-attn-subject chair: mode 'others' leaves a query only"),
    case("adain without sharing", "txt2img", ("--shared-attn-adain",),
         r"^error: --shared-attn-adain only applies together with --shared-attn"),
    case("strength without sharing", "txt2img", ("--shared-attn-strength", "2"),
         r"^error: --shared-attn-strength only applies together with --shared-attn"),
    case("steps without sharing", "txt2img", ("--shared-attn-steps", "0:0.5"),
         r"^error: --shared-attn-steps only applies together with --shared-attn"),
    case("invalid steps without sharing", "txt2img", ("--shared-attn-steps", "0.9:0.1"),
         r"^error: --shared-attn-steps only applies together with --shared-attn"),
    case("anchors without sharing", "txt2img", ("--shared-attn-anchors", "3"),
         r"^error: --shared-attn-anchors only applies together with --shared-attn"),
    case("compare without sharing", "txt2img", ("--compare",), r"^error: --compare .*add --shared-attn"),
    # --- img2img
    case("img2img without init image", "img2img", ("--demo", "--outdir", "{out}"), r"^error: --init-img is required",
         base=False),
    case("init image missing", "img2img", ("--init-img", "{missing}"), r"^error: init image .* does not exist"),
    case("init image a folder", "img2img", ("--init-img", "{folder}"), r"^error: init image .* is a folder"),
    case("init image not an image", "img2img", ("--init-img", "{notes_png}"),
         r"^error: --init-img .*notes\.png: is not an image"),
    case("strength 1.5", "img2img", ("--strength", "1.5"), r"^error: --strength 1.5: must be between 0 .* and 1"),
    case("strength negative", "img2img", ("--strength", "-0.1"), r"^error: --strength -0.1: must be between 0"),
    case("strength nan", "img2img", ("--strength", "nan"), r"^error: --strength nan: must be a finite number"),
    case("sharing with no step to run", "img2img", ("--strength", "0.2", "--shared-attn", "all"),
         r"^error: --strength 0.2: with 2 steps this runs no denoising step"),
    case("img2img with plms", "img2img", ("--plms",), r"^error: img2img always samples with DDIM"),
    # --- the consistency study
    case("study outdir not empty", "eval_consistency", ("--outdir", "{out}"), r"^error: output folder .* never overwrites"),
    case("study outdir unwritable", "eval_consistency", ("--outdir", "{unwritable}/study"),
         r"^error: output folder .* cannot be written"),
    case("study seeds", "eval_consistency", ("--seeds", "0,x"), r"^error: --seeds '0,x' must be comma-separated"),
    case("study configuration", "eval_consistency", ("--configs", "up@sometimes"),
         r"^error: --configs up@sometimes: unknown option 'sometimes'. Syntax:"),
    case("study group", "eval_consistency", ("--configs", "up.128"), r"^error: --configs up.128: unknown shared-attention"),
    case("study window selects no step", "eval_consistency", ("--configs", "all@0.9:1"),
         r"^error: --configs all@0.9:1: the step window selects none of the 2 sampling steps"),
    case("study steps 0", "eval_consistency", ("--steps", "0"), r"^error: --steps 0: must be a whole number"),
    case("study scale nan", "eval_consistency", ("--scale", "nan"), r"^error: --scale nan: must be a finite number"),
    case("study set size 0", "eval_consistency", ("--set-size", "0"), r"^error: --set-size must be between 1"),
    case("study prompts missing", "eval_consistency", ("--prompts", "{missing}"), r"^error: prompt file .* does not exist"),
    case("study ambiguous prompt", "eval_consistency", ("--prompts", "{ambiguous}"),
         r"^error: --prompts a red blue chair: .*two values"),
    case("study features without model", "eval_consistency", ("--features", "dino"),
         r"^error: --features and --feature-model go together"),
    case("study checkpoint is a folder", "eval_consistency", ("--ckpt", "{folder}"), r"^error: checkpoint path .* is a directory"),
    case("study config malformed", "eval_consistency", ("--config", "{malformed}"), r"^error: config .* is not valid YAML"),
    # --- attention statistics
    case("stats set of one", "attention_stats", ("--n_samples", "1"), r"^error: --n_samples must be at least 2"),
    case("stats steps 0", "attention_stats", ("--steps", "0"), r"^error: --steps 0: must be a whole number"),
    case("stats checkpoint not a checkpoint", "attention_stats", ("--ckpt", "{garbage}"),
         r"^error: .*garbage\.ckpt starts with"),
    case("stats config not a model", "attention_stats", ("--config", "{not_model}"),
         r"^error: config .* does not describe a latent diffusion model"),
]


# ----------------------------------------------------------------------------- inputs


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder nobody may create files in: permission bits bind everyone but root, and as root
    (whom they do not bind) the kernel's /sys, where no file can be created."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_ckpt) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("inputs")
    state = safetensors.torch.load_file(str(tiny_ckpt))
    state["model.diffusion_model.out.2.weight"][0, 0, 0, 0] = math.nan
    safetensors.torch.save_file(state, str(folder / "nan.safetensors"))
    (folder / "garbage.ckpt").write_bytes(b"this is not a checkpoint, only some text\n")
    (folder / "a-folder").mkdir()
    (folder / "a-folder" / "model.ckpt").write_bytes(b"")
    (folder / "malformed.yaml").write_text("model: {params: [unclosed\n")
    (folder / "not-model.yaml").write_text("name: just some settings\nvalues: [1, 2]\n")
    (folder / "half-model.yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
                                            "  params:\n    timesteps: 1000\n")
    (folder / "empty.txt").write_text("\n  \n")
    (folder / "binary.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3\x28")
    (folder / "ambiguous.txt").write_text("a chair\na red blue chair\n")
    (folder / "notes.png").write_text("not a picture")
    (folder / "a-file.txt").write_text("a file, not a folder")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(folder / "init.png")
    return {"ckpt": str(tiny_ckpt), "nan_ckpt": str(folder / "nan.safetensors"), "garbage": str(folder / "garbage.ckpt"),
            "folder": str(folder / "a-folder"), "missing": str(folder / "missing"),
            "malformed": str(folder / "malformed.yaml"), "not_model": str(folder / "not-model.yaml"),
            "half_model": str(folder / "half-model.yaml"), "empty": str(folder / "empty.txt"),
            "binary": str(folder / "binary.txt"), "ambiguous": str(folder / "ambiguous.txt"),
            "notes_png": str(folder / "notes.png"), "file": str(folder / "a-file.txt"), "init": str(folder / "init.png"),
            "unwritable": str(unwritable_folder(folder))}


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """An output folder holding an earlier run's grid and sample."""
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(out / "samples" / "00000.png")
    Image.new("RGB", (8, 8), "blue").save(out / "grid-0000.png")
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded, but this input can be refused before loading it")


def run_script(script: str, argv: list[str], capsys) -> tuple[int, str]:
    module = SCRIPTS[script]
    with pytest.raises(SystemExit) as exited:
        run_cli(module.main, argv, flags=getattr(module, "FLAGS", GENERATION_FLAGS))
    return exited.value.code, capsys.readouterr().err


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, paths, earlier_run, tmp_path, capsys, monkeypatch):
    if not case.loads:
        monkeypatch.setattr(ldm.checkpoint, "load_model_from_config", refuse_to_load)
    new_out = tmp_path / "new-study"
    values = {**paths, "out": str(earlier_run), "new_out": str(new_out)}
    args = (*BASE[case.script], *case.args) if case.base else case.args
    before = snapshot(earlier_run)
    status, stderr = run_script(case.script, [a.format(**values) for a in args], capsys)
    lines = stderr.strip().splitlines()
    assert status == 2
    assert "Traceback" not in stderr
    error_lines = [line for line in lines if line.startswith("error:")]
    # Before loading nothing else is printed to stderr; after it, only sampling progress precedes the error.
    assert len(error_lines) == 1 and lines[-1] == error_lines[0] and (case.loads or len(lines) == 1), stderr
    assert re.search(case.line, lines[-1]), lines[-1]
    assert snapshot(earlier_run) == before
    assert not new_out.exists()
    assert not (Path(paths["unwritable"]) / "out").exists()


def test_a_bad_input_from_a_real_process_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--demo", "--ddim_eta", "5",
                             "--outdir", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --ddim_eta 5: must be between 0 (deterministic DDIM) and "
                                                  "1 (DDPM-like noise)"]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- inputs that are not errors


def txt2img(paths: dict[str, str], out: Path, *args: str) -> list[Path]:
    argv = [a.format(**paths, out=str(out)) for a in (*BASE["txt2img"], *args)]
    return SCRIPTS["txt2img"].main(argv)


def test_strength_minus_inf_is_accepted_as_the_help_writes_it_and_switches_sharing_off(paths, tmp_path):
    plain = txt2img(paths, tmp_path / "plain", "--skip_grid")
    off = txt2img(paths, tmp_path / "off", "--skip_grid", "--shared-attn", "all", "--shared-attn-strength", "-inf")
    with Image.open(off[0]) as image:
        assert json.loads(image.text["parameters"])["shared_attention"]["strength"] == -math.inf
    assert [p.read_bytes() != b"" for p in off] == [True, True]
    for ours, reference in zip(off, plain):
        assert np.array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(reference)))


def test_a_safetensors_file_named_ckpt_is_read_by_its_content(paths, tmp_path):
    renamed = tmp_path / "weights.ckpt"
    renamed.write_bytes(Path(paths["ckpt"]).read_bytes())
    written = txt2img({**paths, "ckpt": str(renamed)}, tmp_path / "out", "--skip_grid")
    reference = txt2img(paths, tmp_path / "reference", "--skip_grid")
    assert [p.name for p in written] == ["00000.png", "00001.png"]
    assert all(np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))) for a, b in zip(written, reference))


def test_f_and_c_that_match_the_config_are_accepted(paths, tmp_path):
    written = txt2img(paths, tmp_path / "out", "--skip_grid", "--f", "8", "--C", "4")
    with Image.open(written[0]) as image:
        meta = json.loads(image.text["parameters"])
        assert image.size == (64, 64) and (meta["H"], meta["W"], meta["f"], meta["C"]) == (64, 64, 8, 4)



def test_values_that_look_like_flags_are_read_as_the_values_of_their_flag():
    opt = SCRIPTS["txt2img"].parse_args(["--demo", "--scale", "-1e3", "--shared-attn-strength", "-inf", "--seed", "-1"])
    assert (opt.scale, opt.shared_attn_strength, opt.seed) == (-1000.0, -math.inf, -1)

"""Hostile inputs, family by family: configs that would run code, files that would block or never end,
runs that would exhaust memory, parsers' exceptions, options that would be ignored, wrong types in the
Python API, and malformed requests to the web page.

CASES is the table for the scripts: each row runs txt2img, img2img or train in-process through
`ldm.cli.run_cli` (as their `__main__` does) and must end with exit status 2, exactly one line on
stderr starting with `error:` and matching the row, no traceback, and no new file anywhere (the
output folder is not created; no marker file appears). The checkpoint loader is replaced by one that
fails the test: every refusal comes before the weights load. A guard fails a row that blocks (a FIFO
opened by mistake) instead of hanging the suite. Two rows also run as real processes.

Rows whose rule belongs to the sharing settings type (anchors without anchor mode, empty subject
words, the settings' field types, a reference's recorded sharing settings) check that type's own
checks (ldm/sharing/settings.py) through the same front ends.

API_CASES are GenerationRequest keyword sets that must raise InvalidValue naming the field;
PAGE_CASES are raw HTTP requests to the page, which must get a 4xx answer with one error line while
the server stays up and writes nothing.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import safetensors.torch
import yaml
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import ldm.checkpoint
from ldm.app.server import App, serve
from ldm.cli import GENERATION_FLAGS, run_cli
from ldm.errors import InvalidValue
from ldm.generation import GenerationRequest, load_model, open_image
from ldm.generation.builder import RunValues
from ldm.generation.limits import Limits
from ldm.sharing import SharedAttentionSettings
from tests.conftest import ROOT, SD_CONFIG, TINY_CONFIG, load_script

SCRIPTS = {name: load_script(name) for name in ("txt2img", "img2img", "train")}
MODEL = ("--config", "{config}", "--ckpt", "{ckpt}", "--device", "cpu")
BASE = {
    "txt2img": (*MODEL, "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "1", "--outdir", "{out}"),
    "img2img": (*MODEL, "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "1", "--outdir", "{out}",
                "--init-img", "{init}"),
    "train": ("--out", "{out}/weights.safetensors"),
}
BLOCKING_GUARD_SECONDS = 30


@dataclass(frozen=True)
class Case:
    id: str
    script: str
    args: tuple[str, ...]
    line: str  # a regular expression searched in the error line


def case(id: str, script: str, args: tuple[str, ...], line: str) -> Any:
    return pytest.param(Case(id, script, tuple(args), line), id=id)


def reference_args(reference: str, *extra: str) -> tuple[str, ...]:
    """txt2img beside a reference made by the `generated` fixture (same steps, batch, sharing)."""
    return ("--shared-attn", "all", "--shared-attn-mode", "anchor", "--shared-attn-reference", reference, *extra)


CASES = [
    # --- configs are untrusted: only this project's classes (and torch.nn.Identity) are built
    case("config target os.system", "txt2img", ("--config", "{system_config}"),
         r"^error: config .*system\.yaml: config target 'os\.system' is refused \(outside this project\).*nothing was run"),
    case("config target builtins.exec", "txt2img", ("--config", "{exec_config}"),
         r"^error: config .*: config target 'builtins\.exec' is refused"),
    case("config target in the text encoder's entry", "txt2img", ("--config", "{popen_config}"),
         r"^error: config .*: config target 'subprocess\.Popen' is refused"),
    case("config target a function of the project", "txt2img", ("--config", "{function_config}"),
         r"^error: config .*: config target 'ldm\.util\.instantiate_from_config' is refused \(not a class this project"),
    case("config target a class imported into the project", "txt2img", ("--config", "{imported_config}"),
         r"^error: config .*: config target 'ldm\.cli\.Path' is refused \(not a class this project defines\)"),
    case("training config target os.system", "train", ("--config", "{system_config}"),
         r"^error: config target 'os\.system' is refused"),
    case("config YAML aliases", "txt2img", ("--config", "{alias_config}"), r"^error: config .* uses YAML aliases"),
    case("config nested brackets", "txt2img", ("--config", "{bracket_config}"), r"^error: config .* holds more than 200 \["),
    case("config larger than a config", "txt2img", ("--config", "{large_config}"), r"^error: config .* is larger than 64 KiB"),
    case("config a YAML list", "txt2img", ("--config", "{list_config}"), r"^error: config .* holds a YAML list"),
    case("config timesteps absurd", "txt2img", ("--config", "{timesteps_config}"),
         r"^error: config .*: timesteps is 1000000000000, where a whole number from 1 to 100000 goes"),
    case("config timesteps 0", "txt2img", ("--config", "{zero_timesteps_config}"),
         r"^error: config .*: timesteps is 0, where a whole number from 1 to"),
    case("config image size absurd", "txt2img", ("--config", "{image_size_config}"), r"^error: config .*: image_size is"),
    case("config channels negative", "txt2img", ("--config", "{channels_config}"),
         r"^error: config .*: cannot build its UNet .*negative dimension"),
    case("config embed_dim a string", "txt2img", ("--config", "{embed_config}"),
         r"^error: config .*: first_stage_config embed_dim is four, where a whole number"),
    case("demo with a config", "txt2img", ("--demo", "--config", str(SD_CONFIG), "--outdir", "{out}"),
         r"^error: --demo uses the shipped demo model; drop --demo to give --config and --ckpt"),
    # --- only regular files are read; FIFOs, devices and folders are refused by name
    case("prompt file a FIFO", "txt2img", ("--from-file", "{fifo}"), r"^error: prompt file .*fifo is a FIFO \(named pipe\)"),
    case("prompt file /dev/zero", "txt2img", ("--from-file", "/dev/zero"),
         r"^error: prompt file /dev/zero is a character device, not a file"),
    case("prompt file too large", "txt2img", ("--from-file", "{sparse}"), r"^error: --from-file .*: is larger than"),
    case("checkpoint a FIFO", "txt2img", ("--ckpt", "{fifo}"), r"^error: checkpoint .*fifo is a FIFO"),
    case("checkpoint /dev/urandom", "txt2img", ("--ckpt", "/dev/urandom"),
         r"^error: checkpoint /dev/urandom is a character device, not a file"),
    case("config a FIFO", "txt2img", ("--config", "{fifo}"), r"^error: config .*fifo is a FIFO"),
    case("config /dev/zero", "txt2img", ("--config", "/dev/zero"), r"^error: config /dev/zero is a character device"),
    case("init image a FIFO", "img2img", ("--init-img", "{fifo}"), r"^error: init image .*fifo is a FIFO"),
    case("reference a folder", "txt2img", reference_args("{folder}"), r"^error: --shared-attn-reference .*: is a folder"),
    case("reference a FIFO", "txt2img", reference_args("{fifo}"), r"^error: --shared-attn-reference .*fifo: is a FIFO"),
    case("reference missing", "txt2img", reference_args("{folder}/missing.png"),
         r"^error: --shared-attn-reference .*missing\.png: no such file"),
    # --- resource limits before work
    case("height 100000", "txt2img", ("--H", "100000"), r"^error: --H 100000: image sides must be multiples of 64"),
    case("width 100032", "txt2img", ("--W", "100032"),
         r"^error: --W 100032: at most 2048 pixels per side .*--no-limits lifts this"),
    case("batch 100000", "txt2img", ("--n_samples", "100000"), r"^error: --n_samples 100000: at most 64 \(--no-limits"),
    case("iterations 100000", "txt2img", ("--n_iter", "100000"),
         r"^error: --n_iter 100000: the run would make 200000 images, more than 1000"),
    case("prompt file of 10,000 lines", "txt2img", ("--from-file", "{many_prompts}"),
         r"^error: --from-file .*: holds 10000 prompts; at most 1000 per run"),
    case("prompt of 10,000 characters", "txt2img", ("--prompt", "a" * 10_000),
         r"^error: --prompt a{10,}\.\.\. \(10000 characters\): is 10000 characters long; at most 2000"),
    case("negative prompt of 10,000 characters", "txt2img", ("--negative-prompt", "b" * 10_000),
         r"^error: --negative-prompt b+\.\.\. \(10000 characters\): is 10000 characters long"),
    case("init image 9000x9000 one-bit", "img2img", ("--init-img", "{bilevel}"),
         r"^error: --init-img .*bilevel\.png: declares 9000x9000 pixels, more than the 67,108,864"),
    case("init image a decompression bomb", "img2img", ("--init-img", "{bomb}"),
         r"^error: --init-img .*bomb\.png: (declares 20000x20000|is not an image)"),
    case("reference claiming a 5,000-image batch", "txt2img", reference_args("{ref_batch_5000}"),
         r"^error: --shared-attn-reference .*: its metadata describes a batch of 5000 prompts"),
    # --- every parser's exception is one line
    case("safetensors truncated", "txt2img", ("--ckpt", "{truncated}"), r"^error: .*truncated.* (download it again)"),
    case("safetensors header not JSON", "txt2img", ("--ckpt", "{bad_header}"),
         r"^error: could not read .*bad-header\.safetensors as safetensors .*truncated or corrupt"),
    case("safetensors UNet tensor of another shape", "txt2img", ("--ckpt", "{odd_unet}"),
         r"^error: --ckpt .*: its UNet reads 7 input channels but --config .* reading 4; it is made for another config: "
         r"give the --config that matches it$"),
    case("diffusers scaling_factor a string", "txt2img", ("--ckpt", "{pipeline_string}"),
         r"^error: .*vae/config\.json has scaling_factor = \"abc\", where a number goes"),
    case("diffusers layers_per_block null", "txt2img", ("--ckpt", "{pipeline_null}"),
         r"^error: .*unet/config\.json has layers_per_block = null, where a whole number goes"),
    case("diffusers model_index a list", "txt2img", ("--ckpt", "{pipeline_list}"),
         r"^error: .*model_index\.json holds no JSON object"),
    case("diffusers config deeply nested", "txt2img", ("--ckpt", "{pipeline_deep}"), r"^error: .*cannot read config\.json"),
    case("diffusers shard outside the folder", "txt2img", ("--ckpt", "{pipeline_escape}"),
         r"^error: .*names shards that are missing \(\.\./\.\./outside\.safetensors\)"),
    case("outdir without a value", "txt2img", ("--outdir",), r"^error: argument --outdir: expected one argument"),
    case("init image truncated PNG", "img2img", ("--init-img", "{truncated_png}"),
         r"^error: --init-img .*: is not an image this program can read"),
    case("init image of float pixels", "img2img", ("--init-img", "{float_tiff}"),
         r"^error: --init-img .*: has floating-point pixels"),
    # --- tampered reference metadata
    case("reference seed huge", "txt2img", reference_args("{ref_seed_huge}"),
         r"its metadata's seeds are not those of one batch"),
    case("reference seed a string", "txt2img", reference_args("{ref_seed_text}"),
         r"its metadata's seed is 'x', where a whole number goes"),
    case("reference index outside its batch", "txt2img", reference_args("{ref_index_out}"),
         r"batch_index 7 is outside its batch of 2"),
    case("reference index a string", "txt2img", reference_args("{ref_index_text}"),
         r"its metadata's batch_index is '0', where a whole number goes"),
    case("reference prompts not texts", "txt2img", reference_args("{ref_prompts_numbers}"),
         r"its metadata's batch_prompts is .*, where a list of texts goes"),
    case("reference prompt not its batch's", "txt2img", reference_args("{ref_prompt_other}"),
         r"its metadata's prompt is not its batch's prompt"),
    case("reference prompt of a megabyte", "txt2img", reference_args("{ref_prompt_long}"),
         r"its metadata holds a prompt of 100000 characters"),
    case("reference steps absurd", "txt2img", reference_args("{ref_steps}"), r"its metadata's steps 1000000000 is not"),
    case("reference factor 0", "txt2img", reference_args("{ref_factor}"), r"factor f 0 describe no autoencoder"),
    case("reference scale a string", "txt2img", reference_args("{ref_scale}"), r"scale is 'x', where a finite number"),
    case("reference metadata not JSON", "txt2img", reference_args("{ref_not_json}"), r"metadata that is not valid JSON"),
    case("reference metadata a list", "txt2img", reference_args("{ref_list}"), r"metadata that is not a JSON object"),
    case("reference resized, metadata kept", "txt2img", reference_args("{ref_resized}"),
         r"its pixels are 32x32 but its metadata says 64x64: it was resized"),
    case("reference's references a text", "txt2img", reference_args("{ref_references_text}"),
         r"its metadata's references is 'abc', where a list of file names goes"),
    case("reference sharing settings of the wrong type", "txt2img", reference_args("{ref_sharing}"),
         r"^error: --shared-attn-reference .*shared_attention"),
    # --- options that would be ignored are errors
    case("negative rows", "txt2img", ("--n_rows", "-5"), r"^error: --n_rows -5: give a positive number of images per"),
    case("reference without sharing", "txt2img", ("--shared-attn-reference", "{init}"),
         r"^error: --shared-attn-reference is shared with in anchor mode, and this run shares nothing: add --shared-attn"),
    case("anchors without anchor mode", "txt2img", ("--shared-attn", "all", "--shared-attn-anchors", "3"),
         r"^error: --shared-attn-anchors 3"),
    case("empty subject", "txt2img", ("--shared-attn", "all", "--shared-attn-subject", ""),
         r"^error: --shared-attn-subject"),
    case("subject of commas", "txt2img", ("--shared-attn", "all", "--shared-attn-subject", ","),
         r"^error: --shared-attn-subject"),
]


# ----------------------------------------------------------------------------- hostile files


def write_config(path: Path, change) -> str:
    config = yaml.safe_load(TINY_CONFIG.read_text())
    change(config["model"]["params"])
    path.write_text(yaml.safe_dump(config))
    return str(path)


def tampered_png(source: Path, path: Path, change=None, text: Optional[str] = None,
                 size: Optional[tuple[int, int]] = None) -> str:
    """A copy of a generated PNG with its metadata changed (or replaced by `text`), or resized."""
    with Image.open(source) as image:
        metadata = json.loads(image.text["parameters"])
        pixels = image.convert("RGB")
    if change is not None:
        change(metadata)
    info = PngInfo()
    info.add_text("parameters", text if text is not None else json.dumps(metadata))
    (pixels.resize(size) if size else pixels).save(path, pnginfo=info)
    return str(path)


def fake_pipeline(folder: Path, unet: Any = None, vae: Any = None, index: Any = None,
                  unet_text: Optional[str] = None, shard_index: Any = None) -> str:
    """A diffusers folder whose JSON is what a test gives; its weight files are empty (never read)."""
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index if index is not None else {
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}))
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        (folder / sub).mkdir()
        if sub == "unet" and shard_index is not None:
            (folder / sub / f"{stem}.safetensors.index.json").write_text(json.dumps(shard_index))
        else:
            (folder / sub / f"{stem}.safetensors").write_bytes(b"")
    (folder / "unet" / "config.json").write_text(unet_text or json.dumps(unet or {"in_channels": 4}))
    (folder / "vae" / "config.json").write_text(json.dumps(vae or {"scaling_factor": 0.18215}))
    return str(folder)


@pytest.fixture(scope="module")
def generated(tiny_ckpt, tmp_path_factory) -> Path:
    """A PNG txt2img made on the tiny model, sharing in anchor mode, to tamper with as a reference."""
    out = tmp_path_factory.mktemp("reference")
    written = SCRIPTS["txt2img"].main(["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--device", "cpu",
                                      "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "1", "--skip_grid",
                                      "--shared-attn", "all", "--shared-attn-mode", "anchor", "--outdir", str(out)])
    return written[0]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_ckpt, generated) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "MARKER"
    p: dict[str, str] = {"config": str(TINY_CONFIG), "ckpt": str(tiny_ckpt), "marker": str(marker),
                         "folder": str(folder)}
    params = lambda **values: (lambda c: c.update(values))  # noqa: E731
    unet = lambda **values: (lambda c: c["unet_config"]["params"].update(values))  # noqa: E731
    p["system_config"] = write_config(folder / "system.yaml", params(
        unet_config={"target": "os.system", "params": {"command": f"touch {marker}"}}))
    p["exec_config"] = write_config(folder / "exec.yaml", params(
        unet_config={"target": "builtins.exec", "params": {"source": f"open({str(marker)!r}, 'w')"}}))
    p["popen_config"] = write_config(folder / "popen.yaml", params(
        cond_stage_config={"target": "subprocess.Popen", "params": {"args": ["touch", str(marker)]}}))
    p["function_config"] = write_config(folder / "function.yaml", params(unet_config={
        "target": "ldm.util.instantiate_from_config",
        "params": {"config": {"target": "os.system", "params": {"command": f"touch {marker}"}}}}))
    p["imported_config"] = write_config(folder / "imported.yaml", params(
        unet_config={"target": "ldm.cli.Path", "params": {}}))
    p["timesteps_config"] = write_config(folder / "timesteps.yaml", params(timesteps=10 ** 12))
    p["zero_timesteps_config"] = write_config(folder / "zero-timesteps.yaml", params(timesteps=0))
    p["image_size_config"] = write_config(folder / "image-size.yaml", params(image_size=10 ** 9))
    p["channels_config"] = write_config(folder / "channels.yaml", unet(model_channels=-5))
    p["embed_config"] = write_config(folder / "embed.yaml",
                                     lambda c: c["first_stage_config"]["params"].update(embed_dim="four"))
    (folder / "alias.yaml").write_text("a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                                       "c: [*b, *b, *b, *b, *b, *b, *b, *b]\n")
    (folder / "brackets.yaml").write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    (folder / "large.yaml").write_text("model: {}\n" + "# padding\n" * 10_000)
    (folder / "list.yaml").write_text("- model\n- params\n")
    p.update({name: str(folder / f"{name.split('_')[0]}.yaml") for name in
              ("alias_config", "bracket_config", "large_config", "list_config")})
    p["bracket_config"] = str(folder / "brackets.yaml")
    os.mkfifo(folder / "fifo")
    p["fifo"] = str(folder / "fifo")
    with open(folder / "sparse.txt", "wb") as handle:  # 64 MiB that take no disk
        handle.truncate(64 * 2 ** 20)
    p["sparse"] = str(folder / "sparse.txt")
    (folder / "many.txt").write_text("".join(f"a chair number {i}\n" for i in range(10_000)))
    p["many_prompts"] = str(folder / "many.txt")
    # images
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "init.png")
    p["init"] = str(folder / "init.png")
    Image.new("1", (9000, 9000)).save(folder / "bilevel.png")
    p["bilevel"] = str(folder / "bilevel.png")
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")
    p["bomb"] = str(folder / "bomb.png")
    png = (folder / "init.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    p["truncated_png"] = str(folder / "truncated.png")
    Image.fromarray(np.ones((64, 64), np.float32)).save(folder / "float.tif")
    p["float_tiff"] = str(folder / "float.tif")
    # checkpoints
    data = Path(tiny_ckpt).read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    p["truncated"] = str(folder / "truncated.safetensors")
    header = b'{"a": [1, 2'
    (folder / "bad-header.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"x" * 64)
    p["bad_header"] = str(folder / "bad-header.safetensors")
    state = safetensors.torch.load_file(str(tiny_ckpt))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = state[key][:, :1].repeat(1, 7, 1, 1).contiguous()
    safetensors.torch.save_file(state, str(folder / "odd-unet.safetensors"))
    p["odd_unet"] = str(folder / "odd-unet.safetensors")
    p["pipeline_string"] = fake_pipeline(folder / "pipeline-string", vae={"scaling_factor": "abc"})
    p["pipeline_null"] = fake_pipeline(folder / "pipeline-null", unet={"layers_per_block": None})
    p["pipeline_list"] = fake_pipeline(folder / "pipeline-list", index=[1, 2])
    p["pipeline_deep"] = fake_pipeline(folder / "pipeline-deep", unet_text="[" * 100_000)
    p["pipeline_escape"] = fake_pipeline(folder / "pipeline-escape", shard_index={
        "weight_map": {"a": "../../outside.safetensors"}})
    # tampered references
    tamper = lambda name, **kw: tampered_png(generated, folder / f"{name}.png", **kw)  # noqa: E731
    p["ref_batch_5000"] = tamper("batch", change=lambda m: m.update(batch_prompts=[m["prompt"]] * 5000,
                                                                    batch_seeds=list(range(5000))))
    p["ref_seed_huge"] = tamper("seed-huge", change=lambda m: m.update(seed=10 ** 30, batch_seeds=[10 ** 30, 1]))
    p["ref_seed_text"] = tamper("seed-text", change=lambda m: m.update(seed="x"))
    p["ref_index_out"] = tamper("index-out", change=lambda m: m.update(batch_index=7))
    p["ref_index_text"] = tamper("index-text", change=lambda m: m.update(batch_index="0"))
    p["ref_prompts_numbers"] = tamper("prompts-numbers", change=lambda m: m.update(batch_prompts=[1, 2]))
    p["ref_prompt_other"] = tamper("prompt-other", change=lambda m: m.update(prompt="something else"))
    p["ref_prompt_long"] = tamper("prompt-long", change=lambda m: m.update(
        prompt="a" * 100_000, batch_prompts=["a" * 100_000, "b"]))
    p["ref_steps"] = tamper("steps", change=lambda m: m.update(steps=10 ** 9))
    p["ref_factor"] = tamper("factor", change=lambda m: m.update(f=0))
    p["ref_scale"] = tamper("scale", change=lambda m: m.update(scale="x"))
    p["ref_not_json"] = tamper("not-json", text="{not json")
    p["ref_list"] = tamper("list", text="[1, 2]")
    p["ref_resized"] = tamper("resized", size=(32, 32))
    p["ref_references_text"] = tamper("references-text", change=lambda m: m.update(references="abc"))
    p["ref_sharing"] = tamper("sharing", change=lambda m: m.update(shared_attention={"groups": 5, "mode": []}))
    return p


# ----------------------------------------------------------------------------- running a row


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded, but this input can be refused before loading it")


@contextlib.contextmanager
def not_blocking(seconds: int = BLOCKING_GUARD_SECONDS):
    """Fail (instead of hanging the suite) when the code inside blocks, e.g. on a FIFO it opened."""
    def blocked(signum, frame):
        raise AssertionError(f"blocked for {seconds} s: a FIFO or device was read")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def every_file(*folders: Path) -> set[Path]:
    return {p for folder in folders for p in folder.rglob("*") if p.exists()}


@pytest.mark.parametrize("row", CASES)
def test_hostile_input_is_one_line_exit_2_and_writes_nothing(row, paths, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ldm.checkpoint, "load_model_from_config", refuse_to_load)
    out = tmp_path / "out"
    args = (*BASE[row.script], *row.args)
    argv = [a.format(**paths, out=str(out)) if "{" in a and len(a) < 200 else a for a in args]
    before = every_file(Path(paths["folder"]))
    module = SCRIPTS[row.script]
    with pytest.raises(SystemExit) as exited, not_blocking():
        run_cli(module.main, argv, flags=getattr(module, "TRAIN_FLAGS", GENERATION_FLAGS))
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert exited.value.code == 2
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("error: "), stderr[:2000]
    assert re.search(row.line, lines[0]), lines[0][:2000]
    assert not out.exists() and every_file(Path(paths["folder"])) == before
    assert not Path(paths["marker"]).exists()


def test_a_config_running_a_shell_command_is_refused_in_a_real_process(paths, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--config", paths["system_config"],
                             "--ckpt", paths["ckpt"], "--outdir", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "config target 'os.system' is refused" in result.stderr
    assert not Path(paths["marker"]).exists() and not (tmp_path / "out").exists()


def test_a_fifo_as_prompt_file_is_refused_in_a_real_process_without_blocking(paths, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--demo", "--from-file",
                             paths["fifo"], "--outdir", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: prompt file {paths['fifo']} is a FIFO (named pipe), not a file; give a text file with one prompt "
        "per line"]


# ----------------------------------------------------------------------------- inputs that are converted, not refused


def grey16_png(path: Path) -> np.ndarray:
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)  # a ramp over the whole range
    Image.fromarray(values).save(path)
    return values


def test_a_16_bit_greyscale_init_image_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    values = grey16_png(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as raw:
        assert raw.mode.startswith("I") and np.asarray(raw.convert("RGB")).mean() > 250  # what PIL alone makes of it
    image = open_image(tmp_path / "grey16.png")
    pixels = np.asarray(image, dtype=np.int16)
    assert image.mode == "RGB" and (pixels[..., 0] == pixels[..., 2]).all()
    assert np.abs(pixels[..., 0] - values / 257.0).max() <= 0.5  # 65535 -> 255, the ramp kept


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "CMYK", "L"])
def test_pictures_in_other_modes_come_out_as_the_rgb_they_show(mode, tmp_path):
    """Opaque pixels keep their colour; transparent ones become white (what a viewer shows on white)."""
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    source = rgb.convert("L").convert("RGBA") if mode in ("LA", "L") else rgb.convert("RGBA")
    array = np.asarray(source).copy()
    array[:8, :, 3] = 255 if mode in ("P", "CMYK", "L") else 0  # the top half transparent where the mode can say so
    picture = Image.fromarray(array, "RGBA")
    expected = Image.alpha_composite(Image.new("RGBA", picture.size, "white"), picture).convert("RGB")
    converted = picture.convert("RGB").quantize(256, dither=Image.Dither.NONE) if mode == "P" else picture.convert(mode)
    converted.save(tmp_path / ("p.tif" if mode == "CMYK" else "p.png"))
    read = open_image(tmp_path / ("p.tif" if mode == "CMYK" else "p.png"))
    tolerance = {"P": 8, "CMYK": 2}.get(mode, 0)  # a palette may merge close colours; CMYK rounds
    assert read.mode == "RGB"
    assert np.abs(np.asarray(read, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max() <= tolerance
    if mode in ("LA", "RGBA"):
        assert (np.asarray(read)[:8] == 255).all()  # transparent: white, not the colour under it


def test_a_mask_with_transparency_is_refused_not_guessed(tmp_path):
    Image.new("RGBA", (64, 64), (255, 255, 255, 0)).save(tmp_path / "mask.png")
    with pytest.raises(InvalidValue, match="has transparent pixels") as error:
        open_image(tmp_path / "mask.png", field="mask_image", what="mask")
    assert error.value.field == "mask_image"


def test_the_limits_lift_where_the_user_means_it(tiny_ckpt, tmp_path):
    from ldm.generation.builder import prepare_run
    values = RunValues(prompt="a chair", config=str(TINY_CONFIG), ckpt=str(tiny_ckpt), device="cpu", steps=2,
                       batch_size=100, n_iter=1)
    with pytest.raises(InvalidValue, match="at most 64"):
        prepare_run(values)
    assert prepare_run(RunValues(**{**values.__dict__, "limits": Limits.none()})).request.batch_size == 100


# ----------------------------------------------------------------------------- the Python API


def api(field: str, **keywords) -> Any:
    return pytest.param(field, keywords, id=f"{field}={keywords!r}"[:60])


def sharing(**fields) -> Any:
    return lambda: SharedAttentionSettings(**fields)


API_CASES = [
    api("prompt", prompt=None), api("prompt", prompt=5), api("prompt", prompt=("a", 3)), api("prompt", prompt=()),
    api("prompt", prompt="a\x00chair"), api("prompt", prompt="a \ud800 chair"),
    api("negative_prompt", negative_prompt=None), api("reference_prompt", reference_prompt=3),
    api("fixed_code", fixed_code="no"), api("compare", compare="yes"), api("reference_cache", reference_cache=1),
    api("sampler", sampler=["ddim"]), api("precision", precision=None), api("seed", seed=True),
    api("seed", seed=2.5), api("height", height="512"), api("batch_size", batch_size=2.0),
    api("init_image", init_image=Image.new("RGB", (0, 0))), api("init_image", init_image="picture.png"),
    api("init_image", init_image=Image.fromarray(np.zeros((8, 8), np.float32))),
    api("init_image_name", init_image=Image.new("RGB", (64, 64)), init_image_name=3),
    api("references", references=5),
    api("mask_image", init_image=Image.new("RGB", (64, 64)), mask_image=Image.new("RGBA", (64, 64), (0, 0, 0, 0))),
    api("sharing.anchors", sharing=sharing(mode="anchor", anchors="3")),
    api("sharing.anchors", sharing=sharing(mode="anchor", anchors=2.5)),
    api("sharing.adain", sharing=sharing(adain="no")),
    api("sharing.steps", sharing=sharing(steps=(0,))),
    api("sharing.groups", sharing=sharing(groups=(1,))),
]


@pytest.mark.parametrize("field, keywords", API_CASES)
def test_the_python_api_refuses_a_wrong_type_or_value_naming_the_field(field, keywords):
    with pytest.raises(InvalidValue) as error:  # the settings (built by a callable) are checked too
        keywords = {name: value() if callable(value) else value for name, value in keywords.items()}
        GenerationRequest(**{"prompt": "a chair", **keywords})
    assert error.value.field in (field, field.split(".")[-1]), error.value


# ----------------------------------------------------------------------------- the web page


@pytest.fixture(scope="module")
def page(tiny_ckpt, tmp_path_factory):
    """The page's server on the tiny model, its limits the page's."""
    from ldm.app.server import PAGE_LIMITS
    outdir = tmp_path_factory.mktemp("page")
    base = RunValues(config=str(TINY_CONFIG), ckpt=str(tiny_ckpt), device="cpu", n_iter=1, limits=PAGE_LIMITS)
    server = serve(App(load_model(TINY_CONFIG, tiny_ckpt, device="cpu", verbose=False), base, outdir), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def raw_request(server, head: str, body: bytes = b"", close_after: bool = True) -> tuple[int, str]:
    """Send `head` (request line and headers, without the blank line) and `body` as they are; the
    status and the body of the answer."""
    with socket.create_connection(server.server_address, timeout=60) as connection:
        connection.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n" + body)
        if close_after:
            connection.shutdown(socket.SHUT_WR)  # a short body ends here
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")


def post_head(server, path: str = "/generate", length: Any = None, origin: Any = "own",
              content_type: str = "application/json") -> str:
    port = server.server_address[1]
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Type: {content_type}"]
    if origin is not None:
        lines.append(f"Origin: {f'http://127.0.0.1:{port}' if origin == 'own' else origin}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return "\n".join(lines)


FORM = {"prompt": "a chair", "--ddim_steps": "2", "--n_samples": "2", "groups": []}
FORM_BYTES = json.dumps(FORM).encode()
PAGE_CASES = [
    # (id, head arguments, body, status, error line pattern)
    ("Content-Length not a number", dict(length="abc"), FORM_BYTES, 400, r"^error: Content-Length 'abc' is not a number"),
    ("Content-Length negative", dict(length="-5"), FORM_BYTES, 400, r"^error: Content-Length '-5' is not a number"),
    ("Content-Length huge", dict(length=str(10 ** 12)), FORM_BYTES, 413, r"^error: the form is larger than"),
    ("Content-Length of 5000 digits", dict(length="9" * 5000), FORM_BYTES, 400, r"is not a number of bytes"),
    ("no Content-Length", dict(), FORM_BYTES, 411, r"^error: the request has no Content-Length"),
    ("body shorter than its length", dict(length=str(len(FORM_BYTES) + 100)), FORM_BYTES, 400,
     r"^error: the body has \d+ bytes, not the \d+ its Content-Length says"),
    ("body not UTF-8", dict(length="4"), b'{"\xff"', 400, r"^error: the form is not UTF-8"),
    ("body not JSON", dict(length="9"), b"not json!", 400, r"^error: the form is not JSON"),
    ("body nested too deep", dict(length="100000"), b"[" * 100_000, 400, r"^error: the form is not JSON"),
    ("body a JSON list", dict(length="2"), b"[]", 400, r"^error: the form must be a JSON object"),
    ("no Origin", dict(origin=None), FORM_BYTES, 403, r"^error: requests must come from the page"),
    ("another Origin", dict(origin="http://attacker.example"), FORM_BYTES, 403, r"^error: requests must come from"),
    ("not JSON content", dict(content_type="application/x-www-form-urlencoded"), FORM_BYTES, 415,
     r"^error: send the form as application/json"),
    ("too many images", dict(), {**FORM, "--n_samples": "100"}, 400, r"^error: --n_samples 100: at most 16"),
    ("too many steps", dict(), {**FORM, "--ddim_steps": "500"}, 400, r"^error: --ddim_steps 500: at most 150"),
    ("prompt too long", dict(), {**FORM, "prompt": "a " * 5000}, 400,
     r"^error: --prompt .*: is 9999 characters long; at most 1000 .*starting scripts/app.py with --no-limits"),
    ("reference a server path", dict(), {**FORM, "groups": ["all"], "--shared-attn-mode": "anchor",
                                         "--shared-attn-reference": ["/etc/passwd"]}, 400,
     r"^error: --shared-attn-reference /etc/passwd: give an uploaded picture or an image of this page's results$"),
    ("reference a path outside the results", dict(), {**FORM, "groups": ["all"], "--shared-attn-mode": "anchor",
                                                      "--shared-attn-reference": [{"url": "/files/../../etc/passwd"}]},
     400, r"^error: --shared-attn-reference /files/\.\./\.\./etc/passwd: is not an image of this page's results"),
    ("reference an upload not base64", dict(), {**FORM, "groups": ["all"], "--shared-attn-mode": "anchor",
                                                "--shared-attn-reference": [{"name": "x.png", "data": "@@@"}]}, 400,
     r"^error: --shared-attn-reference x\.png: the upload is not base64 data"),
    ("a prompt with a NUL", dict(), {**FORM, "prompt": "a\x00chair"}, 400, r"^error: --prompt .*contains a NUL"),
]


@pytest.mark.parametrize("head, body, status, line", [case[1:] for case in PAGE_CASES], ids=[c[0] for c in PAGE_CASES])
def test_a_malformed_page_request_is_a_4xx_line_and_the_server_stays_up(page, head, body, status, line):
    before = every_file(page.app.outdir)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        head = {**head, "length": str(len(body))}
    answer_status, answer = raw_request(page, post_head(page, **head), body)
    error = json.loads(answer)["error"]
    assert (answer_status, "\n" in error, "Traceback" in error) == (status, False, False), error
    assert re.search(line, error), error
    assert raw_request(page, f"GET / HTTP/1.1\nHost: 127.0.0.1:{page.server_address[1]}")[0] == 200
    assert every_file(page.app.outdir) == before


def test_a_nul_in_a_file_url_is_not_found_and_says_nothing_of_what_exists(page):
    port = page.server_address[1]
    answers = {raw_request(page, f"GET /files/{name} HTTP/1.1\nHost: 127.0.0.1:{port}")
               for name in ("a%00b.png", "../../../etc/passwd", "nothing.png", "%ff%fe.png")}
    assert answers == {(404, json.dumps({"error": "error: nothing here"}))}


def test_the_reference_answer_is_the_same_whether_a_path_exists_or_not(page):
    answers = []
    for url in ("/files/../../../etc/passwd", "/files/../../../no/such/file.png", "/files/missing.png"):
        form = {**FORM, "groups": ["all"], "--shared-attn-mode": "anchor", "--shared-attn-reference": [{"url": url}]}
        body = json.dumps(form).encode()
        status, answer = raw_request(page, post_head(page, length=len(body)), body)
        answers.append((status, json.loads(answer)["error"].replace(url, "URL")))
    assert len(set(answers)) == 1 and answers[0][0] == 400


def follow(server, job: str) -> dict[str, Any]:
    port = server.server_address[1]
    while True:
        status = json.loads(raw_request(server, f"GET /status/{job} HTTP/1.1\nHost: 127.0.0.1:{port}")[1])
        if status["state"] != "running":
            return status


def submit(server, form: dict[str, Any]) -> str:
    body = json.dumps(form).encode()
    status, answer = raw_request(server, post_head(server, length=len(body)), body)
    assert status == 200, answer
    return json.loads(answer)["job"]


def test_a_cancelled_job_stops_and_writes_nothing(page, monkeypatch):
    before = every_file(page.app.outdir)
    started = threading.Event()
    from ldm.app import runs
    original = runs.Job.report

    def report(self, progress):  # the first step waits for the cancel, so the job is surely running
        if not started.is_set():
            started.set()
            while not self.cancelled:
                threading.Event().wait(0.01)
        return original(self, progress)

    monkeypatch.setattr(runs.Job, "report", report)
    job = submit(page, {**FORM, "--ddim_steps": "5"})
    assert started.wait(60)
    body = b"{}"
    status, _ = raw_request(page, post_head(page, f"/cancel/{job}", length=len(body)), body)
    assert status == 200
    final = follow(page, job)
    assert (final["state"], final["error"]) == ("cancelled", "error: cancelled; nothing was written")
    assert every_file(page.app.outdir) == before


def test_a_job_that_fails_while_saving_removes_its_run_folder(page, monkeypatch):
    from ldm.app import runs
    before = every_file(page.app.outdir)

    def save_then_fail(result, folder, **options):
        (Path(folder) / "samples").mkdir()
        Image.new("RGB", (8, 8)).save(Path(folder) / "samples" / "00000.png")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs, "save_result", save_then_fail)
    final = follow(page, submit(page, FORM))
    assert final["state"] == "error" and "No space left on device" in final["error"]
    assert every_file(page.app.outdir) == before


def test_an_uploaded_reference_runs_and_the_shown_command_finds_it(page, paths):
    upload = base64.b64encode(Path(paths["init"]).read_bytes()).decode()
    form = {**FORM, "groups": ["all"], "--shared-attn-mode": "anchor",
            "--shared-attn-reference": [{"name": "../my picture.png", "data": upload}]}
    job = submit(page, form)
    final = follow(page, job)
    assert final["state"] == "done", final["error"]
    folder = page.app.outdir / Path(final["result"]["grid"].removeprefix("/files/")).parent
    copy = folder / "references" / "my_picture.png"
    assert copy.read_bytes() == Path(paths["init"]).read_bytes()
    assert f"--shared-attn-reference {copy}" in final["result"]["command"]
    assert json.loads(final["result"]["settings"])["references"] == ["my_picture.png"]
    assert not page.app.jobs[job].references.folder.exists()  # the upload's own folder is gone

"""The command-line layer: flags become the builder's values; library errors become one line.

Flag names and defaults follow CompVis' scripts; the project's additions are `--device`,
`--negative-prompt`, `--use-ema`, `--demo` and the `--shared-attn*` / `--compare` family. Options whose
default differs between SD v1 and the shipped demo model default to None here and are filled in by
`apply_model_defaults` (from `ldm.generation.builder`'s tables), so an explicit flag always wins; the
image size, latent channels (--C) and factor (--f) come from the model's config (a given --C or --f
must agree with it).

`prepare_generation` maps the flags to `RunValues` (`run_values`) and hands them to the builder
(`ldm.generation.builder.prepare_run`), which checks every value and file that can be checked without the
weights, so a mistake surfaces before the slow checkpoint load; `run_generation` then loads, generates
(`ldm.generation.generate`) and saves. `command_flags` is the way back: the flags that give some values
(the web page shows them as the equivalent command).

Errors: flags that cannot go together raise `UsageError` here; the library raises errors about values
(`ldm.errors.InvalidValue` names the field, `SettingsError` writes fields as `{field}`), which
`run_cli` writes with each field's flag. Either way the user sees one line, `error: ...`, and exit
status 2.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from tqdm import tqdm

from ldm.checkpoint.errors import CheckpointError
from ldm.errors import ConfigError, InvalidValue, SettingsError, format_value
from ldm.files import FileTooLarge, NotARegularFile
from ldm.generation.builder import (DEMO_DEFAULTS, SD_CKPT, SD_CONFIG, SD_DEFAULTS, PreparedRun, RunValues,
                                  SharingValues, check_checkpoint, check_unet_input, model_defaults, prepare_run,
                                  read_config, with_model_defaults)
from ldm.generation.generate import NonFiniteError, Progress, generate
from ldm.generation.limits import Limits
from ldm.generation.model import choose_device, load_model
from ldm.generation.outputs import save_result
from ldm.sharing import MODES, describe_layers
from ldm.modules.token_grids import self_attention_grids

# Flags every script that names a model has, by builder field.
MODEL_FLAGS = {"config": "--config", "ckpt": "--ckpt", "demo": "--demo", "use_ema": "--use-ema", "device": "--device",
               "precision": "--precision", "channels": "--C", "factor": "--f"}
# The flag that sets each field of RunValues (and of the request and sharing settings) in txt2img and img2img.
GENERATION_FLAGS = {
    **MODEL_FLAGS,
    "prompt": "--prompt", "prompt_file": "--from-file", "negative_prompt": "--negative-prompt", "seed": "--seed",
    "batch_size": "--n_samples", "n_iter": "--n_iter", "sampler": "--plms/--dpm_solver", "steps": "--ddim_steps",
    "scale": "--scale", "eta": "--ddim_eta", "height": "--H", "width": "--W", "init_image": "--init-img",
    "strength": "--strength", "mask_image": "--mask", "fixed_code": "--fixed_code", "compare": "--compare",
    "outdir": "--outdir", "images_per_row": "--n_rows", "save_samples": "--skip_save", "save_grid": "--skip_grid",
    "limits": "--no-limits",
    "sharing.groups": "--shared-attn", "sharing.mode": "--shared-attn-mode", "sharing.anchors": "--shared-attn-anchors",
    "sharing.steps": "--shared-attn-steps", "sharing.strength": "--shared-attn-strength",
    "references": "--shared-attn-reference", "reference_prompt": "--shared-attn-reference-prompt",
    "reference_cache": "--shared-attn-reference-cache",
    "sharing.subjects": "--shared-attn-subject", "sharing.subject_sharing": "--shared-attn-subjects",
    "sharing.dropout": "--shared-attn-dropout",
    "sharing.adain": "--shared-attn-adain",
}
# argparse destinations of the fields whose flag is named otherwise (for the model defaults).
DESTINATIONS = {"steps": "ddim_steps", "batch_size": "n_samples"}


class UsageError(ValueError):
    """Flags that do not go together, or a flag the program does not support; the message names them."""


# Errors whose message is meant for the user as it stands: a traceback would only hide it.
USER_ERRORS = (UsageError, InvalidValue, SettingsError, ConfigError, CheckpointError, NonFiniteError,
               FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError,
               NotARegularFile, FileTooLarge)


def error_line(error: BaseException, flags: Mapping[str, str]) -> str:
    """The one line shown for a user error, naming each field by its flag (`flags`, over MODEL_FLAGS)."""
    names = {**MODEL_FLAGS, **flags}
    if isinstance(error, InvalidValue) and error.field in names:
        text = f"{names[error.field]} {format_value(error.value)}: {error.describe_problem(names)}"
    elif isinstance(error, InvalidValue):
        text = f"{error.field}={format_value(error.value)}: {error.describe_problem(names)}"
    elif isinstance(error, SettingsError):
        text = error.describe(names)
    else:
        text = str(error)
    return "error: " + re.sub(r"\s*\n\s*", " ", text.strip())


def run_cli(main: Callable[..., Any], argv: Optional[Sequence[str]] = None,
            flags: Mapping[str, str] = GENERATION_FLAGS) -> Any:
    """Run a script's main, turning user errors into one line on stderr and exit status 2."""
    try:
        return main() if argv is None else main(argv)
    except USER_ERRORS as error:
        print(error_line(error, flags), file=sys.stderr)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors, and values such as `-inf` or `-1e30` accepted after their flag
    (argparse would take them for flags: it only knows plain negative numbers)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> argparse.Namespace:
        tokens: list[str] = []
        for token in (sys.argv[1:] if args is None else args):
            action = self._option_string_actions.get(tokens[-1]) if tokens else None
            if action is not None and action.nargs is None and token.startswith("-") and _is_float(token):
                tokens[-1] = f"{tokens[-1]}={token}"  # "--flag=-inf": argparse takes it as the value
            else:
                tokens.append(token)
        return super().parse_args(tokens, namespace)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--config", type=str, default=None, help=f"model config (default: {SD_CONFIG})")
    group.add_argument("--ckpt", type=str, default=None,
                       help=f"checkpoint, .ckpt or .safetensors, or a diffusers SD v1 pipeline folder "
                            f"(default: {SD_CKPT})")
    group.add_argument("--demo", action="store_true",
                       help="use the tiny demo model shipped in models/demo/v2/ (CPU, 64 px); no download needed")
    group.add_argument("--use-ema", action="store_true", help="load the EMA weights of a *-full-ema checkpoint")
    group.add_argument("--device", type=str, default="auto", help="auto (cuda, mps, cpu), cuda, cuda:1, mps or cpu")
    group.add_argument("--precision", type=str, choices=["full", "autocast", "bfloat16"], default="autocast",
                       help="autocast = float16 on CUDA, bfloat16 on CPUs that compute it natively (AVX512-BF16, "
                            "AMX), else float32; bfloat16 = bfloat16 autocast on any CPU and CUDA; full = float32")


def add_sampling_arguments(parser: argparse.ArgumentParser, image_size: bool = True) -> None:
    """Sampler, guidance, seeds and batch flags; `image_size=False` leaves out --H/--W (img2img takes the
    size from its init image)."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--ddim_steps", type=int, default=None, help="number of sampling steps (SD default 50)")
    group.add_argument("--plms", action="store_true", help="use PLMS sampling")
    group.add_argument("--dpm_solver", action="store_true", help="use DPM-Solver sampling")
    group.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta, 0 (deterministic) to 1")
    group.add_argument("--scale", type=float, default=None,
                       help="classifier-free guidance scale (SD default 7.5)")
    group.add_argument("--negative-prompt", type=str, default="", help="what the unconditional half is conditioned on")
    group.add_argument("--seed", type=int, default=42, help="seed of the first image; image k uses seed + k")
    group.add_argument("--fixed_code", action="store_true",
                       help="every iteration (--n_iter) restarts from the same seeds (seed, seed+1, ...)")
    group.add_argument("--n_samples", type=int, default=None, help="images per batch (SD default 3)")
    group.add_argument("--n_iter", type=int, default=None, help="batches per prompt (SD default 2)")
    if image_size:
        group.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's, 512 for SD)")
        group.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's, 512 for SD)")
    limits = Limits()
    group.add_argument("--no-limits", action="store_true",
                       help=f"lift the run's size limits (image sides of {limits.max_side:g} px, {limits.max_batch_size:g} "
                            f"images per batch, {limits.max_images:g} images and {limits.max_prompts:g} prompts per run, "
                            f"{limits.max_steps:g} steps, {limits.max_prompt_chars:g} characters per prompt) for a "
                            "machine that can take more")
    group.add_argument("--C", type=int, default=None, help="latent channels (read from the config; a given value must match)")
    group.add_argument("--f", type=int, default=None, help="autoencoder downsampling factor (read from the config; "
                                                           "a given value must match)")


def add_output_arguments(parser: argparse.ArgumentParser, default_outdir: str) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--outdir", type=str, default=default_outdir, help="folder to write results to")
    group.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    group.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    group.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")


def add_shared_attention_arguments(parser: argparse.ArgumentParser) -> None:
    """The --shared-attn-* options default to None, so that one given without --shared-attn is noticed."""
    group = parser.add_argument_group(
        "batch-shared self-attention",
        "Images of one batch also attend to each other's self-attention keys and values, so they show a "
        "consistent subject. Cross-attention (the prompt) is never changed.")
    group.add_argument("--shared-attn", type=str, default=None, metavar="GROUPS",
                       help="layers to share: all, down, mid, up, down.64, up.32, 32, ... comma-separated; "
                            "'help' lists the groups and layers")
    group.add_argument("--shared-attn-mode", type=str, choices=MODES, default=None,
                       help="all (default): every image sees every image of its batch; anchor: images see the first "
                            "K; others: only the other images; pooled: the others 2x2-pooled; mean: keys and values "
                            "from (group mean + 2 x own) / 3 ('--shared-attn help' explains each)")
    group.add_argument("--shared-attn-anchors", type=int, default=None, metavar="K",
                       help="anchor images (anchor mode; default 1)")
    group.add_argument("--shared-attn-steps", type=str, default=None, metavar="START:END",
                       help="fraction of the sampling steps with sharing on, e.g. 0:0.4 for the first 40%% "
                            "(default 0:1); img2img reads it on the whole grid, where its run starts part way")
    group.add_argument("--shared-attn-strength", type=float, default=None, metavar="S",
                       help="logit bias on the other images' keys: 0 plain (default), <0 weaker, >0 stronger, -inf off")
    group.add_argument("--shared-attn-reference", type=str, action="append", default=None, metavar="IMAGE",
                       help="an image every new image also shares with (anchor mode): a PNG this project generated "
                            "(made again, as if the new images were made beside it) or any picture (DDIM-inverted); "
                            "repeat for several (e.g. every image of a batch)")
    group.add_argument("--shared-attn-reference-prompt", type=str, default="", metavar="TEXT",
                       help="what a reference picture (not a generated PNG) shows, to invert it with (default empty)")
    group.add_argument("--shared-attn-reference-cache", choices=("on", "off"), default="on",
                       help="on (default): record the references' keys and values once per run and reuse them in "
                            "every batch; off: record them again before every batch (same images, slower, the "
                            "same peak memory)")
    group.add_argument("--shared-attn-subject", type=str, action="append", default=None, metavar="WORD[,WORD...]",
                       help="prompt words naming a subject (alternatives, comma-separated; every prompt must name "
                            "it): of the other images only the subjects' tokens are shared, found from the words' "
                            "cross-attention. Repeat for several subjects (or separate them with ';'); WORD#N names "
                            "the N-th occurrence of WORD, for two subjects of one kind (face#1, face#2)")
    group.add_argument("--shared-attn-subjects", type=str, choices=("pooled", "isolated"), default=None,
                       help="with subjects: pooled (default) offers every subject's tokens to every query, as "
                            "ConsiStory does; isolated offers a query inside one subject's mask only that "
                            "subject's tokens of the other images, and a query outside every mask its own image only")
    group.add_argument("--shared-attn-dropout", type=float, default=None, metavar="P",
                       help="drop each of the other images' tokens with probability P (0 <= P < 1), redrawn every "
                            "step from the run's seed")
    group.add_argument("--shared-attn-adain", action="store_true", default=None,
                       help="AdaIN of queries and keys towards the first image of the batch (the anchor)")
    group.add_argument("--compare", action="store_true",
                       help="also generate the same seeds without sharing and save both as one labelled grid")


def check_prompt_given(opt: argparse.Namespace, example: str) -> None:
    """`--prompt` given without a value (argparse stores None) and no --from-file: say what to give."""
    if opt.prompt is None and not opt.from_file:
        raise UsageError(f"--prompt needs a text, e.g. --prompt \"{example}\" (or use --from-file)")


def apply_model_defaults(opt: argparse.Namespace, sd_defaults: Optional[Mapping[str, Any]] = None) -> None:
    """Fill unset model-dependent options from the SD v1 or the demo defaults (`ldm.generation.builder`);
    `sd_defaults` (by RunValues field) overrides some SD v1 values (CompVis' img2img uses other batch and
    guidance defaults than its txt2img)."""
    defaults = model_defaults(opt.demo, opt.config, opt.ckpt, sd_defaults)
    # Whether the user named weights (rather than SD v1's default file): `--shared-attn help` then loads
    # them to measure the token grids; a --config alone shows its layers without loading anything.
    opt.weights_named = bool(opt.demo or opt.ckpt is not None)
    for name, value in defaults.items():
        if getattr(opt, DESTINATIONS.get(name, name), None) is None:
            setattr(opt, DESTINATIONS.get(name, name), value)


def choose_evaluated_model(opt: argparse.Namespace) -> None:
    """For the measuring scripts: the demo model unless --config or --ckpt names another; fills
    opt.demo, opt.config, opt.ckpt and unset opt.steps / opt.scale from that model's defaults."""
    model_defaults(opt.demo, opt.config, opt.ckpt)  # --demo with another model is refused
    opt.demo = opt.demo or not (opt.config or opt.ckpt)
    defaults = DEMO_DEFAULTS if opt.demo else SD_DEFAULTS
    opt.config, opt.ckpt = opt.config or defaults["config"], opt.ckpt or defaults["ckpt"]
    opt.steps = opt.steps if opt.steps is not None else defaults["steps"]
    opt.scale = opt.scale if opt.scale is not None else defaults["scale"]


# ---------------------------------------------------------------------------------------------------
# Flags to values, and back
# ---------------------------------------------------------------------------------------------------
def run_values(opt: argparse.Namespace) -> RunValues:
    """The builder's values for txt2img's, img2img's or inpaint's parsed flags."""
    if opt.plms and opt.dpm_solver:
        raise UsageError("--plms and --dpm_solver exclude each other; choose one (or neither for DDIM)")
    return RunValues(
        prompt=opt.prompt, prompt_file=opt.from_file, negative_prompt=opt.negative_prompt, seed=opt.seed,
        batch_size=opt.n_samples, n_iter=opt.n_iter, fixed_code=opt.fixed_code,
        sampler="plms" if opt.plms else "dpm_solver" if opt.dpm_solver else "ddim", steps=opt.ddim_steps,
        scale=opt.scale, eta=opt.ddim_eta, height=getattr(opt, "H", None), width=getattr(opt, "W", None),
        init_image=getattr(opt, "init_img", None), strength=getattr(opt, "strength", 0.75),
        mask_image=getattr(opt, "mask", None),
        sharing=SharingValues(groups=opt.shared_attn, mode=opt.shared_attn_mode, anchors=opt.shared_attn_anchors,
                              steps=opt.shared_attn_steps, strength=opt.shared_attn_strength,
                              subjects=None if opt.shared_attn_subject is None else tuple(opt.shared_attn_subject),
                              dropout=opt.shared_attn_dropout, adain=opt.shared_attn_adain,
                              subject_sharing=opt.shared_attn_subjects),
        compare=opt.compare, references=tuple(opt.shared_attn_reference or ()),
        reference_prompt=opt.shared_attn_reference_prompt, reference_cache=opt.shared_attn_reference_cache == "on",
        demo=opt.demo, config=opt.config, ckpt=opt.ckpt, use_ema=opt.use_ema, device=opt.device,
        precision=opt.precision, channels=opt.C, factor=opt.f, outdir=opt.outdir, save_samples=not opt.skip_save,
        save_grid=not opt.skip_grid, images_per_row=opt.n_rows, limits=Limits.none() if opt.no_limits else Limits())


# (field, flag) of the valued flags `command_flags` writes, in the order it writes them.
COMMAND_ORDER = ("batch_size", "n_iter", "seed", "steps", "scale", "eta", "negative_prompt", "height", "width",
                 "sharing.mode", "sharing.anchors", "sharing.steps", "sharing.strength", "sharing.subjects",
                 "sharing.subject_sharing", "sharing.dropout", "references", "reference_prompt", "reference_cache")


def command_flags(values: RunValues, prompt_file: Optional[str] = None) -> list[str]:
    """txt2img's flags for the run `values` describe (without --outdir), leaving out values equal to its
    defaults; per-image `prompts` are read from `prompt_file`, which the caller writes."""
    defaults = with_model_defaults(RunValues(demo=values.demo, config=values.config, ckpt=values.ckpt))
    values = with_model_defaults(values)
    tokens: list[str] = ["--demo"] if values.demo else ["--config", values.config, "--ckpt", values.ckpt]
    for name, flag in (("use_ema", "--use-ema"), ("fixed_code", "--fixed_code"), ("sharing.adain", "--shared-attn-adain")):
        tokens += [flag] if _field(values, name) else []
    tokens += ["--no-limits"] if values.limits == Limits.none() else []
    for name in ("device", "precision"):
        tokens += _valued(MODEL_FLAGS[name], _field(values, name), _field(defaults, name))
    if values.prompts is not None:
        tokens += _valued("--from-file", prompt_file, None) + _valued("--n_samples", len(values.prompts), None)
    else:
        tokens += _valued("--prompt", values.prompt, None)
    if values.sharing.groups is not None:
        tokens += _valued("--shared-attn", values.sharing.groups, None) + (["--compare"] if values.compare else [])
    for name in COMMAND_ORDER:
        if name == "batch_size" and values.prompts is not None:
            continue  # one image per prompt
        value, default = _field(values, name), _field(defaults, name)
        if name == "reference_cache":
            value, default = ("on" if value else "off"), "on"
        if name == "sharing.subjects" and isinstance(value, str):
            value = tuple(value.split(";"))  # as typed on the page: one flag per subject
        for item in (value if name in ("references", "sharing.subjects") and value is not None else (value,)):
            tokens += _valued(GENERATION_FLAGS[name], getattr(item, "path", item), default)
    return tokens


def _field(values: RunValues, name: str) -> Any:
    group, _, attribute = name.rpartition(".")
    return getattr(getattr(values, group) if group else values, attribute)


def _valued(flag: str, value: Any, default: Any) -> list[str]:
    """["--flag", "value"], ["--flag=value"] for a value that looks like a flag, or [] for the default."""
    if value is None or value == default:
        return []
    text = str(value)
    return [f"{flag}={text}"] if text.startswith("-") else [flag, text]


# ---------------------------------------------------------------------------------------------------
# txt2img, img2img and inpaint: prepare, then run
# ---------------------------------------------------------------------------------------------------
def print_shared_attention_help(opt: argparse.Namespace) -> None:
    """--shared-attn help: the groups, layers and modes from the config; when weights are named (--demo or
    --ckpt), the model is loaded as generation loads it and each layer's token grid at --H/--W (default:
    the model's size) is measured by one forward pass. Nothing is generated or written."""
    spec = read_config(opt.config, getattr(opt, "C", None), getattr(opt, "f", None))
    unet, grids = spec.unet, None
    if getattr(opt, "weights_named", False):
        ckpt = check_checkpoint(opt.ckpt, opt.demo)
        check_unet_input(spec, ckpt, hasattr(opt, "mask"), opt.config, opt.ckpt)
        height = getattr(opt, "H", None) or spec.geometry.native_size
        width = getattr(opt, "W", None) or spec.geometry.native_size
        spec.geometry.check_size(height, width)
        model = load_model(spec, ckpt, device=choose_device(opt.device), use_ema=opt.use_ema, verbose=False)
        _, latent_h, latent_w = spec.geometry.latent_shape(height, width)
        unet, grids = model.unet, self_attention_grids(model.unet, (latent_h, latent_w))
        print(f"Token grids measured by one forward pass of {ckpt.name} at {height}x{width} px (height x width; "
              f"latents {latent_h}x{latent_w}):")
    print(describe_layers(unet, grids))
    print("Options: --shared-attn-subject WORD[,WORD] (subject masks from cross-attention; sharing starts at the "
          "second step; repeat for several subjects, and --shared-attn-subjects isolated keeps each subject's "
          "tokens for its own queries), --shared-attn-dropout P (0 <= P < 1, seeded by --seed), --shared-attn-adain (AdaIN of "
          "queries and keys towards the first image); each combines with groups, anchors, steps and strength, "
          "except that modes others and mean take no subject or dropout, and mean no strength.")
    if grids is None:
        print("Token grids: add --demo, or --ckpt (and its --config), to load that model and list each layer's "
              "token grid at --H/--W (default: the model's size).")


def prepare_generation(opt: argparse.Namespace) -> PreparedRun:
    """The flags checked by the builder, with its notes shown; `opt.init_img` (img2img, when the script
    has that flag) is read and fitted to the model there."""
    run = prepare_run(run_values(opt))
    for line in run.info:
        print(line)
    for note in run.notes:
        print(f"note: {note}", file=sys.stderr)
    return run


class ProgressBar:
    """A tqdm bar over every sampler step of the run, fed by `generate`'s progress callback."""

    def __init__(self) -> None:
        self.bar: Optional[tqdm] = None

    def __call__(self, progress: Progress) -> None:
        if self.bar is None:
            self.bar = tqdm(total=progress.batches * progress.steps, desc="sampling", unit="step")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_generation(run: PreparedRun) -> list[Path]:
    """Load the model, generate the request and save it; returns the files written."""
    model = load_model(run.spec, run.ckpt, device=run.device, use_ema=run.use_ema)
    request = run.request
    batches = len(request.batches()) * (2 if request.compare else 1)
    print(f"Generating {request.image_count * (2 if request.compare else 1)} images in {batches} batches of "
          f"{request.denoising_steps} steps; the bar estimates the time left from the first steps.")
    bar = ProgressBar()
    try:
        result = generate(model, request, progress=bar)
    finally:
        bar.close()
    output = run.output
    written = save_result(result, output.folder, samples=output.samples, grid=output.grid,
                          images_per_row=output.images_per_row)
    for error in result.metadata.get("reference_inversion_errors", []):
        print(f"reference picture: DDIM inversion reconstructs its latent with relative RMS error {error:.3f}")
    print(f"Your samples are ready and waiting for you here:\n{output.folder.resolve()}")
    return written

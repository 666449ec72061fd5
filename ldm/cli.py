"""The command-line layer: flags become one checked `GenerationRequest`; library errors become one line.

Flag names and defaults follow CompVis' scripts; the project's additions are `--device`,
`--negative-prompt`, `--use-ema`, `--demo` and the `--shared-attn*` / `--compare` family. Options whose
default differs between SD v1 and the shipped demo model default to None here and are filled in by
`apply_model_defaults`, so an explicit flag always wins; the image size, latent channels (--C) and
factor (--f) come from the model's config (a given --C or --f must agree with it).

`prepare_generation` checks every flag and file that can be checked without the weights (flag
combinations, sharing settings, prompt file, config, checkpoint format, the request against the
config, the output folder, the device), so a mistake surfaces before the slow checkpoint load;
`run_generation` then loads, generates (`ldm.generation.generate`) and saves.

Errors: flag combinations raise `UsageError` here; the library raises ordinary exceptions about
values (`ldm.errors.InvalidValue` names the request field, which `run_cli` maps to its flag). Either
way the user sees one line, `error: ...`, and exit status 2.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from ldm.checkpoint import checkpoint_fingerprint
from ldm.checkpoint.errors import CheckpointError
from ldm.errors import InvalidValue, format_value
from ldm.generation.generate import NonFiniteError, Progress, generate
from ldm.generation.inputs import fit_to_multiple, open_image, read_prompt_file
from ldm.generation.model import (DEMO_SCALE, REPO_ROOT, ConfigError, ModelSpec, choose_device, load_model,
                                  read_model_spec)
from ldm.generation.outputs import check_output_folder, save_result
from ldm.generation.reference import check_references, read_reference, reference_notes, values_to_match
from ldm.generation.request import GenerationRequest
from ldm.modules.token_grids import self_attention_grids
from ldm.sharing import MODES, SharedAttentionSettings, describe_layers

SD_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
SD_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEMO_CONFIG = "configs/demo/v2/demo-inference.yaml"  # ldm.generation.model.DEMO_CONFIG, relative to the repository
DEMO_CKPT = "models/demo/v2/demo.safetensors"

# Defaults that depend on the model: SD v1 (CompVis' values) and the demo model (CPU-quick).
SD_DEFAULTS = dict(config=SD_CONFIG, ckpt=SD_CKPT, ddim_steps=50, scale=7.5, n_samples=3, n_iter=2)
DEMO_DEFAULTS = dict(config=DEMO_CONFIG, ckpt=DEMO_CKPT, ddim_steps=25, scale=DEMO_SCALE, n_samples=4, n_iter=1)
SHARING_OPTIONS = ("shared_attn_mode", "shared_attn_anchors", "shared_attn_steps", "shared_attn_strength",
                   "shared_attn_subject", "shared_attn_dropout", "shared_attn_adain")

# The flag that sets each request field (and sharing setting) in txt2img and img2img.
GENERATION_FLAGS = {
    "prompt": "--prompt", "prompt_file": "--from-file", "negative_prompt": "--negative-prompt", "seed": "--seed",
    "batch_size": "--n_samples", "n_iter": "--n_iter", "sampler": "--plms/--dpm_solver", "steps": "--ddim_steps",
    "scale": "--scale", "eta": "--ddim_eta", "height": "--H", "width": "--W", "init_image": "--init-img",
    "strength": "--strength", "mask_image": "--mask", "precision": "--precision", "device": "--device",
    "compare": "--compare",
    "sharing.groups": "--shared-attn", "sharing.mode": "--shared-attn-mode", "sharing.anchors": "--shared-attn-anchors",
    "sharing.steps": "--shared-attn-steps", "sharing.strength": "--shared-attn-strength",
    "references": "--shared-attn-reference", "reference_prompt": "--shared-attn-reference-prompt",
    "reference_cache": "--shared-attn-reference-cache",
    "sharing.subject": "--shared-attn-subject", "sharing.dropout": "--shared-attn-dropout",
    "sharing.adain": "--shared-attn-adain",
}


class UsageError(ValueError):
    """Flags that do not go together, or a flag the program does not support; the message names them."""


# Errors whose message is meant for the user as it stands: a traceback would only hide it.
USER_ERRORS = (UsageError, InvalidValue, ConfigError, CheckpointError, NonFiniteError, FileNotFoundError,
               IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def error_line(error: BaseException, flags: Mapping[str, str]) -> str:
    """The one line shown for a user error; an InvalidValue names the flag of its field."""
    if isinstance(error, InvalidValue) and error.field in flags:
        text = f"{flags[error.field]} {format_value(error.value)}: {error.problem}"
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
    group.add_argument("--C", type=int, default=None, help="latent channels (read from the config; a given value must match)")
    group.add_argument("--f", type=int, default=None, help="autoencoder downsampling factor (read from the config; "
                                                           "a given value must match)")


def add_output_arguments(parser: argparse.ArgumentParser, default_outdir: str) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--outdir", type=str, nargs="?", default=default_outdir, help="folder to write results to")
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
    group.add_argument("--shared-attn-subject", type=str, default=None, metavar="WORD[,WORD...]",
                       help="prompt words naming the subject (every prompt must contain one): of the other images "
                            "only the subject's tokens are shared, found from the words' cross-attention")
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


def apply_model_defaults(opt: argparse.Namespace, sd_defaults: Optional[dict[str, Any]] = None) -> None:
    """Fill unset model-dependent options from the SD v1 or the demo defaults; `sd_defaults` overrides
    some SD v1 values (CompVis' img2img uses other batch and guidance defaults than its txt2img)."""
    defaults = DEMO_DEFAULTS if opt.demo else {**SD_DEFAULTS, **(sd_defaults or {})}
    # Whether the user named weights (rather than SD v1's default file): `--shared-attn help` then loads
    # them to measure the token grids; a --config alone shows its layers without loading anything.
    opt.weights_named = bool(opt.demo or opt.ckpt is not None)
    for name, value in defaults.items():
        if getattr(opt, name, None) is None:
            setattr(opt, name, value)


def choose_evaluated_model(opt: argparse.Namespace) -> None:
    """For the measuring scripts: the demo model unless --config or --ckpt names another; fills
    opt.demo, opt.config, opt.ckpt and unset opt.steps / opt.scale from that model's defaults."""
    if opt.demo and (opt.config or opt.ckpt):
        raise UsageError("--demo uses the shipped demo model; drop --demo to give --config and --ckpt")
    opt.demo = opt.demo or not (opt.config or opt.ckpt)
    defaults = DEMO_DEFAULTS if opt.demo else SD_DEFAULTS
    opt.config, opt.ckpt = opt.config or defaults["config"], opt.ckpt or defaults["ckpt"]
    opt.steps = opt.steps if opt.steps is not None else defaults["ddim_steps"]
    opt.scale = opt.scale if opt.scale is not None else defaults["scale"]


# ---------------------------------------------------------------------------------------------------
# Files and the model, checked before the (slow) checkpoint load
# ---------------------------------------------------------------------------------------------------
def resolve_path(path: str) -> Path:
    """Relative paths are tried from the working directory, then from the repository root."""
    candidate = Path(path)
    if candidate.exists() or candidate.is_absolute():
        return candidate
    in_repo = REPO_ROOT / candidate
    return in_repo if in_repo.exists() else candidate


def model_spec(opt: argparse.Namespace) -> ModelSpec:
    """--config read and checked (YAML, entries, UNet layout); a given --C / --f must match it."""
    spec = read_model_spec(resolve_path(opt.config))
    geometry = spec.geometry
    for flag, value, actual, where in (("--C", getattr(opt, "C", None), geometry.channels, "embed_dim"),
                                       ("--f", getattr(opt, "f", None), geometry.factor, "2 ** (len(ch_mult) - 1)")):
        if value is not None and value != actual:
            raise UsageError(f"{flag} {value}: the model's autoencoder has {actual} there ({opt.config}: "
                             f"first_stage_config {where}); drop {flag} or set it to {actual}")
    return spec


def check_checkpoint(opt: argparse.Namespace) -> Path:
    """--ckpt exists and is a checkpoint by its content (safetensors or torch.save) or a diffusers SD v1
    pipeline folder, without loading it."""
    from ldm.checkpoint import checkpoint_format
    from ldm.checkpoint.diffusers_folder import inspect_diffusers_folder, is_diffusers_folder
    ckpt = resolve_path(opt.ckpt)
    if not ckpt.exists():
        if opt.demo:
            raise UsageError(f"the demo model is missing at {opt.ckpt}; it ships with the repository, "
                             f"so restore it with git (git checkout -- {Path(opt.ckpt).parent})")
        raise UsageError(
            f"checkpoint not found: {opt.ckpt}. Download the official Stable Diffusion v1 weights "
            f"(sd-v1-4.ckpt from the CompVis stable-diffusion-v-1-4-original model page on Hugging Face, "
            f"after accepting its license) and save them as {SD_CKPT}, or pass --ckpt PATH "
            f"(.ckpt or .safetensors). To try the project without them, run with --demo (a tiny model "
            f"that ships with the repository and runs on a CPU).")
    if is_diffusers_folder(ckpt):
        inspect_diffusers_folder(ckpt)  # components and weight files present; no tensor read yet
    else:
        checkpoint_format(ckpt)
    return ckpt


def check_unet_input(opt: argparse.Namespace, spec: ModelSpec, ckpt: Path, inpainting: bool) -> None:
    """The checkpoint's UNet reads as many input channels as the config's (4 text-to-image, 9 inpainting),
    and the script fits the model: refused before the load, naming which script or config fits."""
    from ldm.checkpoint.peek import unet_input_channels
    channels, config_channels = spec.geometry.channels, int(spec.unet.in_channels)
    inpainting_channels = 2 * channels + 1
    file_channels = unet_input_channels(ckpt)
    if file_channels is not None and file_channels != config_channels:
        kind = ("an inpainting checkpoint: use scripts/inpaint.py (config "
                "configs/stable-diffusion/v1-inpainting-inference.yaml)" if file_channels == inpainting_channels else
                "a text-to-image checkpoint, not an inpainting one (those read 9, e.g. sd-v1-5-inpainting): use "
                "txt2img.py or img2img.py" if file_channels == channels and inpainting else
                "give the --config that matches it")
        raise UsageError(f"--ckpt {opt.ckpt}: its UNet reads {file_channels} input channels but --config "
                         f"{opt.config} builds one reading {config_channels}; it is {kind}")
    if not inpainting and config_channels == inpainting_channels:
        raise UsageError(f"--config {opt.config} is an inpainting model ({config_channels} input channels): use "
                         "scripts/inpaint.py with --init-img and --mask")
    if inpainting and config_channels != inpainting_channels:
        raise UsageError(f"--config {opt.config} is not an inpainting model (its UNet reads {config_channels} "
                         f"input channels, not {inpainting_channels}); use "
                         "configs/stable-diffusion/v1-inpainting-inference.yaml with an inpainting checkpoint")


def print_shared_attention_help(opt: argparse.Namespace) -> None:
    """--shared-attn help: the groups, layers and modes from the config; when weights are named (--demo or
    --ckpt), the model is loaded as generation loads it and each layer's token grid at --H/--W (default:
    the model's size) is measured by one forward pass. Nothing is generated or written."""
    spec = model_spec(opt)
    unet, grids = spec.unet, None
    if getattr(opt, "weights_named", False):
        ckpt = check_checkpoint(opt)
        check_unet_input(opt, spec, ckpt, inpainting=hasattr(opt, "mask"))
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
          "second step), --shared-attn-dropout P (0 <= P < 1, seeded by --seed), --shared-attn-adain (AdaIN of "
          "queries and keys towards the first image); each combines with groups, anchors, steps and strength, "
          "except that modes others and mean take no subject or dropout, and mean no strength.")
    if grids is None:
        print("Token grids: add --demo, or --ckpt (and its --config), to load that model and list each layer's "
              "token grid at --H/--W (default: the model's size).")


def shared_attention_settings(opt: argparse.Namespace) -> Optional[SharedAttentionSettings]:
    """The settings the --shared-attn* flags describe, or None when sharing is off."""
    given = [name for name in SHARING_OPTIONS if getattr(opt, name) is not None]
    if opt.shared_attn is None:
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(f"{flag} only applies together with --shared-attn GROUPS; add --shared-attn "
                             f"(e.g. all) or drop {flag}")
        if opt.compare:
            raise UsageError("--compare shows sharing against no sharing; add --shared-attn GROUPS (e.g. all)")
        return None
    try:
        return SharedAttentionSettings.from_values(
            opt.shared_attn, mode=opt.shared_attn_mode, anchors=opt.shared_attn_anchors, steps=opt.shared_attn_steps,
            strength=opt.shared_attn_strength, subject=opt.shared_attn_subject, dropout=opt.shared_attn_dropout,
            adain=opt.shared_attn_adain)
    except InvalidValue as error:
        raise error.within("sharing") from None


# ---------------------------------------------------------------------------------------------------
# txt2img and img2img: prepare, then run
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreparedRun:
    """Everything checked and resolved before the model loads."""

    request: GenerationRequest
    spec: ModelSpec
    ckpt: Path
    device: torch.device


def prepare_generation(opt: argparse.Namespace) -> PreparedRun:
    """Check every flag and file that can be checked without the weights; `opt.init_img` (img2img, when
    the script has that flag) is read and fitted to the model here."""
    if opt.plms and opt.dpm_solver:
        raise UsageError("--plms and --dpm_solver exclude each other; choose one (or neither for DDIM)")
    sharing = shared_attention_settings(opt)
    prompt = tuple(read_prompt_file(resolve_path(opt.from_file))) if opt.from_file else opt.prompt
    spec = model_spec(opt)
    ckpt = check_checkpoint(opt)
    check_unet_input(opt, spec, ckpt, inpainting=getattr(opt, "mask", None) is not None)
    init_image, init_name = None, None
    if getattr(opt, "init_img", None) is not None:
        opened = open_image(opt.init_img)
        init_image, init_name = fit_to_multiple(opened, spec.geometry.pixel_multiple), Path(opt.init_img).name
        if init_image.size != opened.size:
            print(f"init image {init_name}: {opened.width}x{opened.height} resized to {init_image.width}x"
                  f"{init_image.height} (a multiple of {spec.geometry.pixel_multiple})")
    mask_image, mask_name = None, None
    if getattr(opt, "mask", None) is not None:
        if init_image is None:
            raise UsageError("--mask needs --init-img, the picture to repaint")
        mask_image, mask_name = open_image(opt.mask, field="mask_image", what="mask"), Path(opt.mask).name
        if mask_image.size != opened.size:
            raise UsageError(f"--mask {opt.mask} is {mask_image.width}x{mask_image.height} but --init-img "
                             f"{opt.init_img} is {opened.width}x{opened.height}; give a mask of the picture's size")
        mask_image = mask_image.resize(init_image.size, resample=Image.Resampling.NEAREST)
    request = GenerationRequest(
        prompt=prompt, negative_prompt=opt.negative_prompt, seed=opt.seed, batch_size=opt.n_samples,
        n_iter=opt.n_iter, fixed_code=opt.fixed_code,
        sampler="plms" if opt.plms else "dpm_solver" if opt.dpm_solver else "ddim", steps=opt.ddim_steps,
        scale=opt.scale, eta=opt.ddim_eta, height=getattr(opt, "H", None), width=getattr(opt, "W", None),
        init_image=init_image, init_image_name=init_name, strength=getattr(opt, "strength", 0.75),
        sharing=sharing, compare=opt.compare, precision=opt.precision,
        references=tuple(getattr(opt, "shared_attn_reference", None) or ()),
        reference_prompt=getattr(opt, "shared_attn_reference_prompt", ""),
        reference_cache=getattr(opt, "shared_attn_reference_cache", "on") == "on", mask_image=mask_image,
        mask_image_name=mask_name)
    request.check_for(spec)
    if request.references:  # the files and their settings, before the weights load
        references = [read_reference(path) for path in request.references]
        check_references(references, values_to_match(request, spec.geometry), checkpoint_fingerprint(ckpt),
                         request.sharing.subject, request.reference_prompt)
        for note in reference_notes(references, *request.size_for(spec.geometry), request.reference_prompt):
            print(f"note: {note}", file=sys.stderr)
    if sharing is not None and sharing.mode == "anchor" and sharing.anchors >= opt.n_samples:
        print(f"note: {sharing.anchors} anchors with {opt.n_samples} images per batch: every image is an "
              "anchor, which is the same as --shared-attn-mode all", file=sys.stderr)
    check_output_folder(opt.outdir)
    return PreparedRun(request, spec, ckpt, choose_device(opt.device))


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


def run_generation(opt: argparse.Namespace, run: PreparedRun) -> list[Path]:
    """Load the model, generate the request and save it; returns the files written."""
    model = load_model(run.spec, run.ckpt, device=run.device, use_ema=opt.use_ema)
    bar = ProgressBar()
    try:
        result = generate(model, run.request, progress=bar)
    finally:
        bar.close()
    written = save_result(result, opt.outdir, samples=not opt.skip_save, grid=not opt.skip_grid,
                          images_per_row=opt.n_rows if opt.n_rows > 0 else None)
    for error in result.metadata.get("reference_inversion_errors", []):
        print(f"reference picture: DDIM inversion reconstructs its latent with relative RMS error {error:.3f}")
    print(f"Your samples are ready and waiting for you here:\n{Path(opt.outdir).resolve()}")
    return written

"""Command-line options and the run loop shared by `scripts/txt2img.py` and `scripts/img2img.py`.

Flag names and defaults follow CompVis' scripts; the project's additions are `--device`,
`--negative-prompt`, `--use-ema`, `--demo` and the `--shared-attn*` / `--compare` family. Options whose
default differs between SD v1 and the shipped demo model default to None here and are filled in by
`apply_model_defaults`, so an explicit flag always wins.

Bad input raises `UsageError`; the scripts print it as one line and exit with status 2.

`sample_and_save` is the loop both scripts run: batches of prompts, per-image seeds (image k of a run
uses seed + k; with --fixed_code every iteration restarts at seed), the optional no-sharing comparison,
PNG metadata and grids. The scripts differ only in how a batch of latents is made.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from ldm.checkpoint.errors import CheckpointError
# UsageError lives next to the generation helpers, which raise it too; the scripts import it from here.
from ldm.generation import (OutputFolder, UsageError, batches, choose_device, decode_to_images, image_grid,
                            precision_scope, read_prompt_file)
from ldm.modules.shared_attention import MODES, SharedAttentionSettings, parse_groups

REPO_ROOT = Path(__file__).resolve().parents[1]
SD_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
SD_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEMO_CONFIG = "configs/demo/demo-inference.yaml"
DEMO_CKPT = "models/demo/demo.safetensors"

# Defaults that depend on the model: SD v1 (CompVis' values) and the demo model (64 px, CPU-quick).
SD_DEFAULTS = dict(config=SD_CONFIG, ckpt=SD_CKPT, H=512, W=512, f=8, C=4, ddim_steps=50, scale=7.5,
                   n_samples=3, n_iter=2)
DEMO_DEFAULTS = dict(config=DEMO_CONFIG, ckpt=DEMO_CKPT, H=64, W=64, f=4, C=4, ddim_steps=25, scale=3.0,
                     n_samples=4, n_iter=1)


# Errors whose message is meant for the user as it stands: a traceback would only hide it.
USER_ERRORS = (UsageError, FileNotFoundError, CheckpointError)
# A batch of latents (B, C, h, w) for prompts and seeds, with batch sharing `settings` (None = off).
SampleBatch = Callable[[list[str], list[int], Optional[SharedAttentionSettings]], torch.Tensor]


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's main, turning user errors into one line on stderr and exit status 2."""
    try:
        main()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--config", type=str, default=None, help=f"model config (default: {SD_CONFIG})")
    group.add_argument("--ckpt", type=str, default=None, help=f"checkpoint, .ckpt or .safetensors (default: {SD_CKPT})")
    group.add_argument("--demo", action="store_true",
                       help="use the tiny demo model shipped in models/demo/ (CPU, 64 px); no download needed")
    group.add_argument("--use-ema", action="store_true", help="load the EMA weights of a *-full-ema checkpoint")
    group.add_argument("--device", type=str, default="auto", help="auto (cuda, mps, cpu), cuda, cuda:1, mps or cpu")
    group.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast",
                       help="autocast = float16 on CUDA; float32 elsewhere")


def add_sampling_arguments(parser: argparse.ArgumentParser, image_size: bool = True) -> None:
    """Sampler, guidance, seeds and batch flags; `image_size=False` leaves out --H/--W (img2img takes the
    size from its init image)."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--ddim_steps", type=int, default=None, help="number of sampling steps (SD default 50)")
    group.add_argument("--plms", action="store_true", help="use PLMS sampling")
    group.add_argument("--dpm_solver", action="store_true", help="use DPM-Solver sampling")
    group.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    group.add_argument("--scale", type=float, default=None,
                       help="classifier-free guidance scale (SD default 7.5)")
    group.add_argument("--negative-prompt", type=str, default="", help="what the unconditional half is conditioned on")
    group.add_argument("--seed", type=int, default=42, help="seed of the first image; image k uses seed + k")
    group.add_argument("--fixed_code", action="store_true",
                       help="every iteration (--n_iter) restarts from the same seeds (seed, seed+1, ...)")
    group.add_argument("--n_samples", type=int, default=None, help="images per batch (SD default 3)")
    group.add_argument("--n_iter", type=int, default=None, help="batches per prompt (SD default 2)")
    if image_size:
        group.add_argument("--H", type=int, default=None, help="image height in pixels (SD default 512)")
        group.add_argument("--W", type=int, default=None, help="image width in pixels (SD default 512)")
    group.add_argument("--C", type=int, default=None, help="latent channels")
    group.add_argument("--f", type=int, default=None, help="downsampling factor of the autoencoder")


def add_output_arguments(parser: argparse.ArgumentParser, default_outdir: str) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--outdir", type=str, nargs="?", default=default_outdir, help="folder to write results to")
    group.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    group.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    group.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")


def add_shared_attention_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "batch-shared self-attention",
        "Images of one batch also attend to each other's self-attention keys and values, so they show a "
        "consistent subject. Cross-attention (the prompt) is never changed.")
    group.add_argument("--shared-attn", type=str, default=None, metavar="GROUPS",
                       help="layers to share: all, down, mid, up, down.64, up.32, 32, ... comma-separated; "
                            "'help' lists the groups and layers")
    group.add_argument("--shared-attn-mode", type=str, choices=MODES, default="all",
                       help="all: every image sees every image of its batch; anchor: images see the first K")
    group.add_argument("--shared-attn-anchors", type=int, default=1, metavar="K", help="anchor images (anchor mode)")
    group.add_argument("--shared-attn-steps", type=str, default="0:1", metavar="START:END",
                       help="fraction of the sampling steps with sharing on, e.g. 0:0.4 for the first 40%%")
    group.add_argument("--shared-attn-strength", type=float, default=0.0, metavar="S",
                       help="logit bias on the other images' keys: 0 plain, <0 weaker, >0 stronger, -inf off")
    group.add_argument("--compare", action="store_true",
                       help="also generate the same seeds without sharing and save both as one labelled grid")


def apply_model_defaults(opt: argparse.Namespace, sd_defaults: Optional[dict[str, Any]] = None) -> None:
    """Fill unset model-dependent options from the SD v1 or the demo defaults; `sd_defaults` overrides
    some SD v1 values (CompVis' img2img uses other batch and guidance defaults than its txt2img)."""
    defaults = DEMO_DEFAULTS if opt.demo else {**SD_DEFAULTS, **(sd_defaults or {})}
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


def resolve_path(path: str) -> Path:
    """Relative paths are tried from the working directory, then from the repository root."""
    candidate = Path(path)
    if candidate.exists() or candidate.is_absolute():
        return candidate
    in_repo = REPO_ROOT / candidate
    return in_repo if in_repo.exists() else candidate


def check_checkpoint(opt: argparse.Namespace) -> tuple[Path, Path]:
    config, ckpt = resolve_path(opt.config), resolve_path(opt.ckpt)
    if not config.exists():
        raise UsageError(f"config file not found: {opt.config}")
    if not ckpt.exists():
        if opt.demo:
            raise UsageError(f"the demo model is missing at {opt.ckpt}; it ships with the repository, "
                             "so restore it with git (git checkout -- models/demo)")
        raise UsageError(
            f"checkpoint not found: {opt.ckpt}. Download the official Stable Diffusion v1 weights "
            f"(sd-v1-4.ckpt from the CompVis stable-diffusion-v-1-4-original model page on Hugging Face, "
            f"after accepting its license) and save them as {SD_CKPT}, or pass --ckpt PATH "
            f"(.ckpt or .safetensors). To try the project without them, run with --demo (a tiny model "
            f"that ships with the repository and runs on a CPU).")
    return config, ckpt


def check_sampling(opt: argparse.Namespace, *, img2img: bool = False) -> str:
    """Validate sizes and sampler options; return the sampler name."""
    if opt.plms and opt.dpm_solver:
        raise UsageError("--plms and --dpm_solver exclude each other; choose one (or neither for DDIM)")
    sampler = "plms" if opt.plms else "dpm_solver" if opt.dpm_solver else "ddim"
    if sampler == "plms" and opt.ddim_eta != 0:
        raise UsageError(f"PLMS is deterministic and needs --ddim_eta 0 (got {opt.ddim_eta}); drop --plms to use eta")
    if sampler == "dpm_solver" and opt.ddim_eta != 0:
        raise UsageError(f"DPM-Solver is deterministic and needs --ddim_eta 0 (got {opt.ddim_eta})")
    if not 1 <= opt.ddim_steps <= 1000:
        raise UsageError(f"--ddim_steps must be between 1 and 1000, got {opt.ddim_steps}")
    if opt.ddim_eta < 0:
        raise UsageError(f"--ddim_eta must be >= 0, got {opt.ddim_eta}")
    if opt.n_samples < 1 or opt.n_iter < 1:
        raise UsageError("--n_samples and --n_iter must be at least 1")
    if not 0 <= opt.seed < 2 ** 63:  # torch seeds are 64-bit; negative ones alias large ones
        raise UsageError(f"--seed must be between 0 and 2**63 - 1, got {opt.seed}")
    if not img2img:
        for name in ("H", "W"):
            value = getattr(opt, name)
            if value <= 0 or value % 8:
                raise UsageError(f"--{name} {value} is not a positive multiple of 8; use e.g. 512")
            if value % opt.f:
                raise UsageError(f"--{name} {value} is not a multiple of the autoencoder factor --f {opt.f}")
    if not math.isfinite(opt.scale):
        raise UsageError(f"--scale must be a finite number, got {opt.scale}")
    return sampler


def pixel_multiple(opt: argparse.Namespace, unet: Any) -> int:
    """Image sides must be multiples of this: the autoencoder factor times the UNet's halvings."""
    return opt.f * 2 ** (len(unet.channel_mult) - 1)


def check_latent_size(opt: argparse.Namespace, unet: Any, height: int, width: int) -> None:
    """The UNet halves the latent at each level and mirrors it back, so it must divide evenly."""
    step = pixel_multiple(opt, unet)
    for name, pixels in (("H", height), ("W", width)):
        if pixels % step:
            raise UsageError(f"--{name} {pixels} gives a latent of {pixels // opt.f}, which this UNet cannot halve "
                             f"{len(unet.channel_mult) - 1} times; use a multiple of {step} "
                             f"(e.g. {step * max(1, round(pixels / step))})")


def shared_attention_settings(opt: argparse.Namespace) -> Optional[SharedAttentionSettings]:
    """The settings the --shared-attn* flags describe, or None when sharing is off."""
    if opt.shared_attn is None:
        if opt.compare:
            raise UsageError("--compare shows sharing against no sharing; add --shared-attn GROUPS (e.g. all)")
        return None
    try:
        start, end = (float(part) for part in opt.shared_attn_steps.split(":"))
    except ValueError:
        raise UsageError(f"--shared-attn-steps {opt.shared_attn_steps!r} must be START:END fractions, e.g. 0:0.4") from None
    try:
        return SharedAttentionSettings(groups=parse_groups(opt.shared_attn), mode=opt.shared_attn_mode,
                                       anchors=opt.shared_attn_anchors, steps=(start, end),
                                       strength=opt.shared_attn_strength)
    except ValueError as error:
        raise UsageError(f"--shared-attn: {error}") from None


def run_metadata(opt: argparse.Namespace, sampler: str, sharing: Optional[SharedAttentionSettings]) -> dict[str, Any]:
    """The settings that reproduce a run, stored in every PNG."""
    values = {
        "sampler": sampler, "steps": opt.ddim_steps, "scale": opt.scale, "eta": opt.ddim_eta,
        "H": opt.H, "W": opt.W, "C": opt.C, "f": opt.f, "precision": opt.precision,
        "config": str(opt.config), "ckpt": Path(opt.ckpt).name, "use_ema": opt.use_ema,
        "negative_prompt": opt.negative_prompt,
        "shared_attention": sharing.as_metadata() if sharing else None,
    }
    return json.loads(json.dumps(values, default=str))


# ---------------------------------------------------------------------------------------------------
# Model: checked from its config before the (slow) checkpoint load, then loaded
# ---------------------------------------------------------------------------------------------------
def unet_without_weights(config_path: Path) -> Any:
    """The config's UNet built on the meta device: its layout (levels, attention tags) without weights."""
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(config_path)
    with torch.device("meta"):
        return instantiate_from_config(config.model.params.unet_config)


def print_shared_attention_help(opt: argparse.Namespace) -> None:
    """--shared-attn help: the groups and layers, from the config alone (no checkpoint needed)."""
    from ldm.modules.shared_attention import describe_layers
    config = resolve_path(opt.config)
    if not config.exists():
        raise UsageError(f"config file not found: {opt.config}")
    print(describe_layers(unet_without_weights(config)))


def check_shared_layers(opt: argparse.Namespace, unet: Any, sharing: Optional[SharedAttentionSettings]) -> None:
    """Unknown group names are an error (listing the valid ones); a useless anchor count gets a note."""
    if sharing is None:
        return
    from ldm.modules.shared_attention import select_layers
    try:
        select_layers(unet, sharing.groups)
    except ValueError as error:
        raise UsageError(f"--shared-attn: {error}") from None
    if sharing.mode == "anchor" and sharing.anchors >= opt.n_samples:
        print(f"note: {sharing.anchors} anchors with {opt.n_samples} images per batch: every image is an "
              "anchor, which is the same as --shared-attn-mode all", file=sys.stderr)


@dataclass
class RunSetup:
    """What `prepare_run` checked and resolved: everything a script needs before loading the model."""

    sharing: Optional[SharedAttentionSettings]
    sampler_name: str
    prompts: list[str]
    config_path: Path
    ckpt_path: Path
    unet_layout: Any  # the UNet on the meta device: levels and attention tags, no weights
    device: torch.device

    def load_model(self, opt: argparse.Namespace) -> Any:
        from ldm.checkpoint import load_model_from_config
        model = load_model_from_config(OmegaConf.load(self.config_path), self.ckpt_path, use_ema=opt.use_ema,
                                       device=self.device)
        # Weights run in float32 (a no-op for fp32 files); --precision autocast gives float16 on CUDA.
        return model.float()


def prepare_run(opt: argparse.Namespace, *, img2img: bool = False) -> RunSetup:
    """Check every flag and file that can be checked without the weights, so mistakes surface before
    the (slow) checkpoint load."""
    sharing = shared_attention_settings(opt)
    sampler_name = check_sampling(opt, img2img=img2img)
    prompts = read_prompt_file(opt.from_file) if opt.from_file else [opt.prompt]
    config_path, ckpt_path = check_checkpoint(opt)
    unet = unet_without_weights(config_path)
    check_shared_layers(opt, unet, sharing)
    return RunSetup(sharing, sampler_name, prompts, config_path, ckpt_path, unet, choose_device(opt.device))


# ---------------------------------------------------------------------------------------------------
# The run loop
# ---------------------------------------------------------------------------------------------------
def sample_and_save(opt: argparse.Namespace, run: RunSetup, model: Any, base: dict[str, Any],
                    sample_batch: SampleBatch) -> list[Path]:
    """Generate n_iter rounds over the prompts, save each image (with `base` + its own metadata) and
    the grid; returns the paths written. With --compare each batch is made without and with sharing."""
    prompts, sharing = run.prompts, run.sharing
    outdir = OutputFolder(opt.outdir)
    sample_dir = OutputFolder(Path(opt.outdir) / "samples")
    # With --prompt, every batch holds n_samples copies of it; with --from-file, consecutive prompts
    # fill batches of n_samples and the last batch may be shorter.
    prompt_batches = list(batches(prompts, opt.n_samples)) if opt.from_file else [[prompts[0]] * opt.n_samples]
    variants = [("shared", sharing)] if sharing is not None else [("plain", None)]
    if opt.compare:
        variants = [("no sharing", None), ("shared", sharing)]

    written: list[Path] = []
    rows, row_labels = [], []  # one row per batch and variant
    image_count = 0
    with precision_scope(opt.precision, run.device):
        for iteration in tqdm(range(opt.n_iter), desc="iterations", disable=opt.n_iter == 1):
            position = 0
            for batch_prompts in tqdm(prompt_batches, desc="batches", disable=len(prompt_batches) == 1):
                first = position if opt.fixed_code else image_count
                seeds = [opt.seed + first + i for i in range(len(batch_prompts))]
                for label, settings in variants:
                    images = decode_to_images(model, sample_batch(batch_prompts, seeds, settings))
                    for index, (image, prompt, seed) in enumerate(zip(images, batch_prompts, seeds)):
                        metadata = {**base, "prompt": prompt, "seed": seed, "batch_seeds": seeds,
                                    "batch_index": index, "iteration": iteration,
                                    "shared_attention": settings.as_metadata() if settings else None}
                        if not opt.skip_save:
                            written.append(sample_dir.save(image, metadata))
                    rows.append(images)
                    row_labels.append(f"{label} (seeds {seeds[0]}-{seeds[-1]})")
                image_count += len(batch_prompts)
                position += len(batch_prompts)

    if not opt.skip_grid:
        if opt.compare:  # labelled rows: each batch without and with sharing, same seeds
            grid = image_grid(rows, row_labels=row_labels)
        else:
            per_row = opt.n_rows if opt.n_rows > 0 else opt.n_samples
            grid = image_grid(list(batches([image for row in rows for image in row], per_row)))
        grid_meta = {**base, "prompts": list(prompts), "first_seed": opt.seed, "compare": opt.compare}
        written.append(outdir.save(grid, grid_meta, prefix="grid-", digits=4))
    print(f"Your samples are ready and waiting for you here:\n{Path(opt.outdir).resolve()}")
    return written

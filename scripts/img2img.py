"""Image to image with Stable Diffusion v1 (CompVis flags, DDIM), plus batch-shared self-attention.

    python scripts/img2img.py --init-img sketch.png --prompt "a fantasy landscape" --strength 0.75
    python scripts/img2img.py --demo --init-img sketch.png --prompt "a chair" --shared-attn all --compare

The init image is resized to a multiple of what the model needs (64 px for SD v1), encoded, noised to
the level of step int(strength * ddim_steps) with each image's own seed, and denoised that many DDIM
steps: strength 0 keeps the init image, strength 1 ignores it. The --shared-attn-steps window counts
the steps that run. Outputs, seeds and metadata work as in txt2img; the metadata also holds the
strength and the init image's file name.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from ldm.cli import (UsageError, add_model_arguments, add_output_arguments, add_sampling_arguments,  # noqa: E402
                     add_shared_attention_arguments, apply_model_defaults, pixel_multiple, prepare_run,
                     print_shared_attention_help, run_cli, run_metadata, sample_and_save)
from ldm.generation import (encode_init_image, encode_steps, img2img_latents,  # noqa: E402
                            load_init_image)
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.modules.shared_attention import SharedAttentionSettings  # noqa: E402

# CompVis' img2img defaults where they differ from its txt2img (SD v1 only; --demo keeps its own).
IMG2IMG_SD_DEFAULTS = dict(n_samples=2, n_iter=1, scale=5.0)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                        help="the prompt to render")
    parser.add_argument("--init-img", type=str, default=None, help="the image to start from (required)")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="how much of the init image is replaced: 0 keeps it, 1 ignores it")
    parser.add_argument("--from-file", type=str, default=None, help="a text file with one prompt per line")
    add_model_arguments(parser)
    add_sampling_arguments(parser, image_size=False)
    add_output_arguments(parser, default_outdir="outputs/img2img-samples")
    add_shared_attention_arguments(parser)
    opt = parser.parse_args(argv)
    if opt.plms or opt.dpm_solver:
        raise UsageError("img2img always samples with DDIM; drop --plms / --dpm_solver")
    if opt.prompt is None and not opt.from_file:  # `--prompt` given without a value
        raise UsageError("--prompt needs a text, e.g. --prompt \"a fantasy landscape\" (or use --from-file)")
    apply_model_defaults(opt, sd_defaults=IMG2IMG_SD_DEFAULTS)
    return opt


def check_img2img(opt: argparse.Namespace) -> None:
    if opt.init_img is None:
        raise UsageError("--init-img is required: give the image to start from, e.g. --init-img sketch.png")
    if not (math.isfinite(opt.strength) and 0.0 <= opt.strength <= 1.0):
        raise UsageError(f"--strength must be between 0 and 1 (0 keeps the init image, 1 ignores it), "
                         f"got {opt.strength}")


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """Run the script with `argv` (default: sys.argv); returns the files written."""
    opt = parse_args(argv)
    if opt.shared_attn == "help":
        print_shared_attention_help(opt)
        return []
    check_img2img(opt)
    run = prepare_run(opt, img2img=True)
    init_image = load_init_image(opt.init_img, pixel_multiple(opt, run.unet_layout))  # (1, 3, H, W)
    opt.H, opt.W = init_image.shape[-2:]
    t_enc = encode_steps(opt.strength, opt.ddim_steps)
    if t_enc == 0:
        print(f"note: strength {opt.strength} with {opt.ddim_steps} steps runs no step; the outputs are the "
              "init image passed through the autoencoder", file=sys.stderr)
    print(f"target t_enc is {t_enc} steps")

    model = run.load_model(opt)
    sampler = DDIMSampler(model)
    init_latent = encode_init_image(model, init_image)  # (1, C, H/f, W/f)
    if init_latent.shape[-1] * opt.f != opt.W:
        raise UsageError(f"--f {opt.f} does not match the autoencoder, which maps {opt.W} px to "
                         f"{init_latent.shape[-1]} latents; drop --f or set it to {opt.W // init_latent.shape[-1]}")

    def sample_batch(prompts: list[str], seeds: list[int], sharing: Optional[SharedAttentionSettings]) -> torch.Tensor:
        return img2img_latents(model, sampler, init_latent, prompts, seeds, steps=opt.ddim_steps,
                               strength=opt.strength, scale=opt.scale, eta=opt.ddim_eta,
                               negative_prompt=opt.negative_prompt, sharing=sharing, verbose=True)

    base = {**run_metadata(opt, run.sampler_name, run.sharing), "strength": opt.strength,
            "encode_steps": t_enc, "init_image": Path(opt.init_img).name}
    return sample_and_save(opt, run, model, base, sample_batch)


if __name__ == "__main__":
    run_cli(main)

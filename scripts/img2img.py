"""Image to image with Stable Diffusion v1 (CompVis flags, DDIM), plus batch-shared self-attention.

    python scripts/img2img.py --init-img sketch.png --prompt "a fantasy landscape" --strength 0.75
    python scripts/img2img.py --demo --init-img sketch.png --prompt "a chair" --shared-attn all --compare

The init image is resized to a multiple of what the model needs (64 px for SD v1), encoded, noised to
the level of step int(strength * ddim_steps) with each image's own seed, and denoised that many DDIM
steps: strength 0 keeps the init image, strength 1 ignores it. The --shared-attn-steps window is read
on the whole grid, as in txt2img (at strength 0.5 the first step run is at 0.5, so a window 0:0.5 shares
nothing); --shared-attn-reference works as in txt2img, each step reading the reference's record at its
own noise level. Outputs, seeds and metadata work as in txt2img; the metadata also holds the strength
and the init image's file name.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm.cli import (ArgumentParser, UsageError, add_model_arguments, add_output_arguments,  # noqa: E402
                     add_sampling_arguments, add_shared_attention_arguments, apply_model_defaults, check_prompt_given,
                     prepare_generation, print_shared_attention_help, run_cli, run_generation)

# CompVis' img2img defaults where they differ from its txt2img (SD v1 only; --demo keeps its own).
IMG2IMG_SD_DEFAULTS = dict(batch_size=2, n_iter=1, scale=5.0)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    check_prompt_given(opt, example="a fantasy landscape")
    apply_model_defaults(opt, sd_defaults=IMG2IMG_SD_DEFAULTS)
    return opt


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """Run the script with `argv` (default: sys.argv); returns the files written."""
    opt = parse_args(argv)
    if opt.shared_attn == "help":
        print_shared_attention_help(opt)
        return []
    if opt.init_img is None:
        raise UsageError("--init-img is required: give the image to start from, e.g. --init-img sketch.png")
    run = prepare_generation(opt)
    request = run.request
    if request.denoising_steps == 0:
        print(f"note: strength {request.strength} with {request.steps} steps runs no step; the outputs are the "
              "init image passed through the autoencoder", file=sys.stderr)
    print(f"target t_enc is {request.denoising_steps} steps")
    return run_generation(run)


if __name__ == "__main__":
    run_cli(main)

"""Inpainting with the SD v1 inpainting model (sd-v1-5-inpainting), plus batch-shared self-attention.

    python scripts/inpaint.py --init-img room.png --mask room-mask.png --prompt "a red armchair" \
        --ckpt models/ldm/stable-diffusion-v1/sd-v1-5-inpainting.ckpt
    python scripts/inpaint.py --init-img room.png --mask room-mask.png --prompt "a red armchair" \
        --ckpt ... --n_samples 4 --shared-attn all --compare

The mask is a picture of the init image's size: white is repainted, black kept (grey levels are cut at
one half). The model reads, besides the noisy latents, the mask at latent size and the latents of the
picture with the masked region greyed out, so the repainted region fits what surrounds it. Strength 1
(default) starts each image from its seed's pure noise with any sampler; below 1 it starts from the
init image noised to that level (DDIM). The images of a batch share their self-attention with
--shared-attn, so several seeds put the same subject into the picture. Outputs, seeds and metadata work
as in txt2img; the metadata also names the init image and the mask.

The checkpoint must be an inpainting one (its UNet reads 9 channels); a text-to-image checkpoint is
refused before it loads.
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

INPAINT_CONFIG = "configs/stable-diffusion/v1-inpainting-inference.yaml"
INPAINT_CKPT = "models/ldm/stable-diffusion-v1/sd-v1-5-inpainting.ckpt"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=str, nargs="?", default="a photograph of a red armchair",
                        help="what to paint into the masked region")
    parser.add_argument("--init-img", type=str, default=None, help="the picture to paint into (required)")
    parser.add_argument("--mask", type=str, default=None,
                        help="the mask (required): a picture of the init image's size, white where to repaint")
    parser.add_argument("--strength", type=float, default=1.0,
                        help="1 (default) starts from pure noise; below 1 from the noised init image (DDIM)")
    parser.add_argument("--from-file", type=str, default=None, help="a text file with one prompt per line")
    add_model_arguments(parser)
    add_sampling_arguments(parser, image_size=False)
    add_output_arguments(parser, default_outdir="outputs/inpainting-samples")
    add_shared_attention_arguments(parser)
    opt = parser.parse_args(argv)
    if opt.demo:
        raise UsageError("--demo: the demo model is a text-to-image model and cannot inpaint; give --ckpt with an "
                         "inpainting checkpoint (sd-v1-5-inpainting)")
    check_prompt_given(opt, example="a red armchair")
    apply_model_defaults(opt, sd_defaults=dict(config=INPAINT_CONFIG, ckpt=INPAINT_CKPT))
    return opt


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """Run the script with `argv` (default: sys.argv); returns the files written."""
    opt = parse_args(argv)
    if opt.shared_attn == "help":
        print_shared_attention_help(opt)
        return []
    for flag, value in (("--init-img", opt.init_img), ("--mask", opt.mask)):
        if value is None:
            raise UsageError(f"{flag} is required: inpainting repaints the white region of --mask in --init-img")
    run = prepare_generation(opt)
    return run_generation(run)


if __name__ == "__main__":
    run_cli(main)

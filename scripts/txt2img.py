"""Text to image with Stable Diffusion v1 (CompVis flags), plus batch-shared self-attention.

    python scripts/txt2img.py --prompt "a wooden chair" --plms --n_samples 4 --shared-attn all --compare
    python scripts/txt2img.py --demo --prompt "a chair" --shared-attn all --compare     # CPU, tiny model

Images of one batch share self-attention when --shared-attn is given; --compare also generates the
same seeds without sharing and saves both as one labelled grid. Outputs go to --outdir/samples (one PNG
per image) and --outdir (grids), never overwriting earlier files; every PNG carries its prompt, seed and
settings as PNG text.
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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                        help="the prompt to render")
    parser.add_argument("--from-file", type=str, default=None, help="a text file with one prompt per line")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    add_output_arguments(parser, default_outdir="outputs/txt2img-samples")
    add_shared_attention_arguments(parser)
    parser.add_argument("--laion400m", action="store_true", help=argparse.SUPPRESS)  # CompVis flag, not supported
    opt = parser.parse_args(argv)
    if opt.laion400m:
        raise UsageError("--laion400m is not supported by this project; use --config and --ckpt")
    check_prompt_given(opt, example="a wooden chair")
    apply_model_defaults(opt)
    return opt


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """Run the script with `argv` (default: sys.argv); returns the files written."""
    opt = parse_args(argv)
    if opt.shared_attn == "help":
        print_shared_attention_help(opt)
        return []
    return run_generation(prepare_generation(opt))


if __name__ == "__main__":
    run_cli(main)

"""Measure how well a world v2 model follows its prompt, at several guidance scales.

    PYTHONPATH=. python scripts/eval_prompt_following.py                  # demo model v2, scales 2,3,5,7.5
    PYTHONPATH=. python scripts/eval_prompt_following.py --scales 3 --prompts 200 --seeds 1000,1001

Captions are drawn with the world v2 grammar from held-out data seeds (default 1000; the demo model
v2 trained on data seed 2 only), one image each, no sharing, read back by the scene classifier; per
scale, the accuracy of every named attribute and of the class, the minimum over the issue's target
attributes, whether the targets hold, and the scale the rule of configs/demo/v2/README.md picks.
The library side is `ldm/eval/prompt_following.py`. Results (results.md, results.csv, images.csv,
summary.json, grid.png) go to --outdir, which must be new or empty; by default a new
outputs/prompt-following/run-NNNN. Results of one scale do not depend on the other scales given, so
scales may be split over processes. On the CPU, the same command and --threads give byte-identical CSVs.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm.cli import ArgumentParser, UsageError, run_cli  # noqa: E402
from ldm.generation.builder import DEMO_CKPT, DEMO_CONFIG, check_checkpoint, read_config, resolve_path  # noqa: E402
from ldm.eval.consistency import WORLD_V2_CLASSIFIER, check_results_folder  # noqa: E402
from ldm.eval.prompt_following import (DEFAULT_OUTPUT_ROOT, DEFAULT_PROMPT_COUNT, DEFAULT_SCALES,  # noqa: E402
                                       HELD_OUT_SEED, PromptFollowingRequest, evaluate_prompt_following)
from ldm.generation.model import choose_device  # noqa: E402

DEMO_CLASSIFIER = str(WORLD_V2_CLASSIFIER)  # the demo model (v2) is read by the world v2 scene classifier
FLAGS = {"seeds": "--seeds", "count": "--prompts", "scales": "--scales", "steps": "--steps",
         "batch_size": "--batch-size", "threads": "--threads", "device": "--device", "classifier": "--classifier"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEMO_CONFIG, help=f"model config (default {DEMO_CONFIG})")
    parser.add_argument("--ckpt", default=DEMO_CKPT, help=f"its weights (default {DEMO_CKPT})")
    parser.add_argument("--classifier", default=DEMO_CLASSIFIER,
                        help=f"world v2 scene classifier (default {DEMO_CLASSIFIER})")
    parser.add_argument("--seeds", default=str(HELD_OUT_SEED),
                        help=f"comma-separated held-out data seeds of the captions (default {HELD_OUT_SEED})")
    parser.add_argument("--prompts", type=int, default=DEFAULT_PROMPT_COUNT,
                        help=f"captions per seed, one image each (default {DEFAULT_PROMPT_COUNT})")
    parser.add_argument("--scales", default=",".join(f"{s:g}" for s in DEFAULT_SCALES),
                        help="comma-separated guidance scales, all measured on the same captions and noise "
                             f"(default {','.join(f'{s:g}' for s in DEFAULT_SCALES)})")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25, the demo models')")
    parser.add_argument("--batch-size", type=int, default=16, help="images generated together (default 16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; CPU results are reproducible for the same value (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    parser.add_argument("--precision", choices=["full", "autocast"], default="full",
                        help="full = float32 (default); autocast = float16 on CUDA, bfloat16 on CPUs with native "
                             "bfloat16")
    parser.add_argument("--outdir", default=None,
                        help=f"new or empty folder (default a new {DEFAULT_OUTPUT_ROOT}/run-NNNN)")
    return parser.parse_args(argv)


def parse_numbers(flag: str, text: str, kind: type) -> tuple:
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r} must be comma-separated numbers, e.g. "
                         f"{'1000,1001' if kind is int else '2,3,5,7.5'}") from None
    if not values:
        raise UsageError(f"{flag} is empty; give at least one value")
    return values


def build_request(opt: argparse.Namespace) -> PromptFollowingRequest:
    """Check every flag and file that can be checked before the model loads."""
    values = PromptFollowingRequest(  # the numbers checked first; the paths are resolved below
        config_path=Path(opt.config), ckpt_path=Path(opt.ckpt), classifier_path=Path(opt.classifier),
        seeds=parse_numbers("--seeds", opt.seeds, int), count=opt.prompts,
        scales=parse_numbers("--scales", opt.scales, float), steps=opt.steps, batch_size=opt.batch_size,
        threads=opt.threads, device=opt.device, precision=opt.precision,
        outdir=Path(opt.outdir) if opt.outdir else None)
    if not resolve_path(opt.ckpt).exists():
        hint = ("the demo model ships with the repository: restore it with git (git checkout -- models/demo/v2)"
                if opt.ckpt == DEMO_CKPT else "pass the weights of a world v2 model")
        raise UsageError(f"--ckpt {opt.ckpt}: no such file; {hint}")
    spec = read_config(opt.config)
    ckpt = check_checkpoint(opt.ckpt)  # its format, by content
    classifier = resolve_path(opt.classifier)
    if not classifier.is_file():
        raise UsageError(f"--classifier {opt.classifier}: no such file; train the world v2 instruments with "
                         "scripts/train_world_instruments.py (configs/demo/v2/README.md) or pass its path")
    check_results_folder(values.outdir, DEFAULT_OUTPUT_ROOT)
    choose_device(opt.device)
    return replace(values, config_path=spec.config_path, ckpt_path=ckpt, classifier_path=classifier)

def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Run the measurement; returns the output folder."""
    outdir = evaluate_prompt_following(build_request(parse_args(argv)))
    print(f"Results: {outdir.resolve() / 'results.md'}")
    return outdir


if __name__ == "__main__":
    run_cli(main, flags=FLAGS)

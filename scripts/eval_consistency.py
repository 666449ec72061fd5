"""Measure what batch-shared attention does: subject consistency, prompt alignment, layout diversity, cost.

    python scripts/eval_consistency.py --demo                       # the shipped demo model, CPU
    python scripts/eval_consistency.py --configs default,up@0:0.3,all@s=-1
    python scripts/eval_consistency.py --config configs/stable-diffusion/v1-inference.yaml \\
        --ckpt models/ldm/stable-diffusion-v1/model.ckpt --prompts prompts.txt \\
        --features clip --feature-model openai/clip-vit-large-patch14
    torchrun --nproc_per_node 2 scripts/eval_consistency.py --demo  # jobs sharded over 2 processes
    python scripts/eval_consistency.py --config configs/demo/demo-inference.yaml \\
        --ckpt models/demo/demo.safetensors --world v1 --steps 25 --scale 3   # the v1 demo model, before v2

Every configuration generates the same prompt sets from the same seeds (image i of the set with seed
s starts from seed 1000*s + i), so differences come from sharing only. The run is in
`ldm/eval/consistency.py`, which lists the modules of its parts (metrics, instruments, configurations,
jobs, report); sharding over processes in `ldm/eval/distributed.py`. --world v2 (the default for the
demo model) measures a model of the world v2 (ldm/data/world.py) with its scene classifier and subject
segmenter; its prompt file may hold stories, one prompt per image joined by ' | '. --world v1 (the default
for any other model) measures the v1 demo model's synthetic objects with their attribute classifier.
Outputs (results.md, results.csv, sets.csv, timing.csv, summary.json, one grid per configuration) go
to --outdir, which must be new or empty; by default a new outputs/consistency/run-NNNN.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm.cli import ArgumentParser, UsageError, choose_evaluated_model, run_cli  # noqa: E402
from ldm.generation.builder import check_checkpoint, read_config, resolve_path  # noqa: E402
from ldm.errors import InvalidValue  # noqa: E402
from ldm.eval.configurations import CONFIGURATION_SYNTAX, resolve_configurations  # noqa: E402
from ldm.eval.consistency import (DEFAULT_PROMPTS_BY_WORLD, WORLD_V2_CLASSIFIER, WORLD_V2_SEGMENTER,  # noqa: E402
                                  EvalRequest, check_results_folder, evaluate)
from ldm.eval.jobs import SEED_STRIDE, Sampling  # noqa: E402
from ldm.eval.metrics_v1 import named_attributes  # noqa: E402
from ldm.eval.prompt_sets import check_world_prompt_sets, refuse_stories  # noqa: E402
from ldm.generation.inputs import read_prompt_file  # noqa: E402
from ldm.generation.model import DEMO_CONFIG, DEMO_SCALE, DEMO_V1_CONFIG, choose_device  # noqa: E402

# The flag that sets each field the library may name in an error.
FLAGS = {"configs": "--configs", "prompt": "--prompts", "prompt_file": "--prompts", "features": "--features",
         "feature_model": "--feature-model", "steps": "--steps", "scale": "--scale", "batch_size": "--set-size",
         "device": "--device", "precision": "--precision",
         "classifier": "--classifier", "segmenter": "--segmenter"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model (default: the demo model)")
    model.add_argument("--demo", action="store_true", help="the shipped demo model (the default without --config)")
    model.add_argument("--config", type=str, default=None, help="model config of another model")
    model.add_argument("--ckpt", type=str, default=None, help="its checkpoint (.ckpt or .safetensors)")
    model.add_argument("--use-ema", action="store_true", help="load the EMA weights of a *-full-ema checkpoint")
    model.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or mps (torchrun: cuda:LOCAL_RANK)")
    model.add_argument("--precision", choices=["full", "autocast"], default="autocast",
                       help="autocast = float16 on CUDA, bfloat16 on CPUs with native bfloat16, else float32")
    model.add_argument("--threads", type=int, default=1,
                       help="CPU threads; CPU results are reproducible for the same value (default 1)")
    run = parser.add_argument_group("what to generate")
    run.add_argument("--prompts", type=str, default=None,
                     help="text file, one prompt set per line: a prompt, or (--world v2) a story of one prompt "
                          "per image joined by ' | ' (default: a list for each world, ldm/eval/prompt_sets.py)")
    run.add_argument("--seeds", type=str, default="0,1,2", help="comma-separated set seeds (default 0,1,2)")
    run.add_argument("--set-size", type=int, default=4, help="images per prompt set, generated as one batch")
    run.add_argument("--steps", type=int, default=None, help="DDIM steps (demo 25, SD v1 50)")
    run.add_argument("--scale", type=float, default=None, help=f"guidance scale (demo {DEMO_SCALE}, SD v1 7.5)")
    run.add_argument("--configs", type=str, default="default",
                     help=f"comma-separated configurations. {CONFIGURATION_SYNTAX}")
    measure = parser.add_argument_group("measuring")
    measure.add_argument("--features", choices=["dino", "clip"], default=None,
                         help="measure with a transformers image model instead of the attribute classifier")
    measure.add_argument("--feature-model", type=str, default=None,
                         help="local folder or cached hub id of that model (never downloaded)")
    measure.add_argument("--world", choices=["v1", "v2"], default=None,
                         help="v2 (default for the demo model): the scenes of ldm/data/world.py, measured by a scene "
                              "classifier and a subject segmenter; v1 (default for any other model, and with "
                              "--features): the synthetic objects of the v1 demo model (configs/demo/) and their "
                              "attribute classifier")
    measure.add_argument("--classifier", type=str, default=None,
                         help=f"attribute classifier (v1 default: the shipped one; v2: {WORLD_V2_CLASSIFIER})")
    measure.add_argument("--segmenter", type=str, default=None,
                         help=f"--world v2 only: subject segmenter (default {WORLD_V2_SEGMENTER})")
    parser.add_argument("--outdir", type=str, default=None, help="new or empty folder for the results")
    opt = parser.parse_args(argv)
    choose_evaluated_model(opt)
    return opt


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--seeds {text!r} must be comma-separated whole numbers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) >= 2 ** 63 // SEED_STRIDE:
        raise UsageError(f"--seeds {text!r}: give distinct seeds between 0 and {2 ** 63 // SEED_STRIDE - 1}")
    return seeds


def model_world(opt: argparse.Namespace, config_path: Path) -> Optional[str]:
    """The synthetic world the evaluated model draws: v2 for the demo model, v1 for the v1 demo's config,
    None for any other model (whose images the world instruments were not trained on)."""
    if opt.demo or config_path.resolve() == DEMO_CONFIG.resolve():
        return "v2"
    return "v1" if config_path.resolve() == DEMO_V1_CONFIG.resolve() else None


def default_world(opt: argparse.Namespace, drawn: Optional[str]) -> str:
    """--world when given; otherwise v2 for a model of the world v2 (the demo model) measured by its
    instruments, else v1 (the attribute classifier, or --features, which only the v1 path takes)."""
    if opt.world is not None:
        return opt.world
    return "v2" if drawn == "v2" and opt.features is None else "v1"


def build_request(opt: argparse.Namespace) -> EvalRequest:
    """Check every flag and file that can be checked before the model is loaded."""
    drawn = model_world(opt, resolve_path(opt.config))
    world = default_world(opt, drawn)
    if not 1 <= opt.set_size <= SEED_STRIDE:
        raise UsageError(f"--set-size must be between 1 and {SEED_STRIDE}, got {opt.set_size}")
    if opt.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {opt.threads}")
    if (opt.features is None) != (opt.feature_model is None):
        raise UsageError("--features and --feature-model go together, e.g. --features clip --feature-model PATH")
    if world == "v1" and opt.segmenter is not None:
        raise UsageError("--segmenter measures the world v2's scenes; add --world v2 or drop --segmenter")
    if world == "v2" and opt.features is not None:
        raise UsageError("--world v2 measures with its own classifier and segmenter; drop --features or --world v2")
    seeds = parse_seeds(opt.seeds)
    prompts = (tuple(read_prompt_file(resolve_path(opt.prompts))) if opt.prompts
               else DEFAULT_PROMPTS_BY_WORLD[world])
    if world == "v2":
        check_world_prompt_sets(prompts)  # a word the world does not know is an error before anything runs
        classifier = resolve_path(opt.classifier or str(WORLD_V2_CLASSIFIER))
        segmenter = resolve_path(opt.segmenter or str(WORLD_V2_SEGMENTER))
        for flag, path in (("--classifier", classifier), ("--segmenter", segmenter)):
            if not path.is_file():
                raise UsageError(f"{flag} {path}: no such file; train the world v2 instruments with "
                                 "scripts/train_world_instruments.py (configs/demo/v2/README.md) or pass their paths")
    else:
        refuse_stories(prompts)
        classifier, segmenter = (resolve_path(opt.classifier) if opt.classifier else None), None
        if opt.features is None:
            for prompt in prompts:
                named_attributes(prompt)  # an ambiguous prompt is an error before anything runs
    spec = read_config(opt.config)
    ckpt_path = check_checkpoint(opt.ckpt, opt.demo)
    configurations = resolve_configurations(opt.configs.split(","), spec.unet)
    sampling = Sampling(opt.steps, opt.scale, opt.set_size, opt.precision)
    for configuration in configurations:  # e.g. a step window that selects none of --steps, or a prompt
        try:  # set without the subject words (every set: a failure after an hour of sets would waste it)
            for prompt in prompts:
                sampling.request(prompt, 0, configuration.sharing).check_for(spec)
        except InvalidValue as error:
            if not error.field.startswith("sharing"):
                raise
            raise InvalidValue("configs", configuration.name, error.problem) from None
    outdir = Path(opt.outdir) if opt.outdir else None
    check_results_folder(outdir)
    choose_device(opt.device)
    return EvalRequest(
        config_path=spec.config_path, ckpt_path=ckpt_path, configurations=tuple(configurations), prompts=prompts,
        seeds=seeds, sampling=sampling, outdir=outdir, device=opt.device, use_ema=opt.use_ema,
        features=opt.features, feature_model=opt.feature_model,
        classifier_path=classifier, threads=opt.threads, model_world=drawn, world=world,
        segmenter_path=segmenter)


def main(argv: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Run the evaluation; returns the output folder (None on torchrun ranks other than 0)."""
    outdir = evaluate(build_request(parse_args(argv)))
    if outdir is not None:
        print(f"Results: {outdir.resolve() / 'results.md'}")
    return outdir


if __name__ == "__main__":
    run_cli(main, flags=FLAGS)

"""Does a model follow colour and pattern words, and if not, where is the word lost?

    python scripts/probe_text_conditioning.py --demo --threads 1
    python scripts/probe_text_conditioning.py --config CONFIG --ckpt CKPT --out assets/text-conditioning/v2.md

Three measurements on the synthetic world's captions ("a red chair", "a striped vase", ...), on any
LatentDiffusion model with a FrozenCLIPEmbedder text encoder (the shipped demo model by default):
1. linear probes: can the named colour / pattern be read from the text encoder's output (the word's
   token, the class noun's token, the end-of-text token, the mean), on held-out class-attribute pairs;
2a. how much the UNet's noise prediction changes when only the colour (pattern, class) word changes,
   from the same noised latents at 1/4, 1/2 and 3/4 of the schedule;
2b. where each level's cross-attention goes: the start token, the attribute word, the class noun,
   the end-of-text token and the padding, and how concentrated the word's map is over the image.
The protocol is written out in ldm/eval/text_conditioning.py. Prints markdown tables; --out also
writes them, with this command, to a new file (an existing file is never overwritten).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.cli import UsageError, choose_evaluated_model, run_cli  # noqa: E402
from ldm.generation.builder import check_checkpoint, read_config  # noqa: E402
from ldm.util import load_config_file  # noqa: E402
from ldm.eval.text_conditioning import (TextConditioningRequest, TextConditioningResults,  # noqa: E402
                                        format_report, measure_text_conditioning)
from ldm.generation import DEMO_SCALE, choose_device, load_model  # noqa: E402

TEXT_ENCODER = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="the shipped demo model (the default without --config)")
    parser.add_argument("--config", type=str, default=None, help="model config of another model")
    parser.add_argument("--ckpt", type=str, default=None, help="its checkpoint (.ckpt or .safetensors)")
    parser.add_argument("--latents", type=int, default=8, help="reference images for 2a and 2b (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference images, the noise and the probes")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps of the reference images (demo 25, SD 50)")
    parser.add_argument("--scale", type=float, default=None,
                        help=f"their guidance scale (demo {DEMO_SCALE}, SD v1 7.5)")
    parser.add_argument("--probe-steps", type=int, default=500, help="Adam steps per linear probe (default 500)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per UNet forward pass (default 64)")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--out", type=str, default=None, help="also write the tables to this new markdown file")
    opt = parser.parse_args(argv)
    choose_evaluated_model(opt)
    for name, low in (("latents", 1), ("probe_steps", 1), ("batch_size", 1), ("threads", 1), ("steps", 1)):
        if getattr(opt, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(opt, name)}")
    if opt.steps > 1000:
        raise UsageError(f"--steps must be between 1 and 1000, got {opt.steps}")
    if opt.out is not None and Path(opt.out).exists():
        raise UsageError(f"--out {opt.out} already exists; this script never overwrites results, choose a new file")
    return opt


def check_text_encoder_config(config_path: Path) -> None:
    """The probes read the CLIP tokenizer and text transformer; refuse another encoder before loading."""
    target = OmegaConf.select(load_config_file(config_path), "model.params.cond_stage_config.target")
    if target != TEXT_ENCODER:
        raise UsageError(f"--config {config_path}: the text encoder is {target}, but this measurement needs "
                         f"{TEXT_ENCODER} (SD v1's CLIP text encoder); use a config with it")


def main(argv: Optional[Sequence[str]] = None) -> TextConditioningResults:
    arguments = list(sys.argv[1:] if argv is None else argv)
    opt = parse_args(arguments)
    torch.set_num_threads(opt.threads)
    spec = read_config(opt.config)
    check_text_encoder_config(spec.config_path)
    ckpt_path = check_checkpoint(opt.ckpt, opt.demo)
    model = load_model(spec, ckpt_path, device=choose_device(opt.device)).module
    request = TextConditioningRequest(latents=opt.latents, seed=opt.seed, steps=opt.steps, scale=opt.scale,
                                      probe_steps=opt.probe_steps, batch_size=opt.batch_size)
    results = measure_text_conditioning(model, request)
    command = shlex.join(["python", "scripts/probe_text_conditioning.py", *arguments])
    report = f"## Text conditioning of `{ckpt_path.name}`\n\nCommand: `{command}`\n\n{format_report(results)}"
    print(report, end="")
    if opt.out is not None:
        out = Path(opt.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("x", encoding="utf-8") as file:  # exclusive: never replaces a file
            file.write(report)
    return results


if __name__ == "__main__":
    run_cli(main)

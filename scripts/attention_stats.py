"""How selective is the model's self-attention, per layer group? (A diagnostic for batch sharing.)

    python scripts/attention_stats.py --demo --prompt "a chair"
    python scripts/attention_stats.py --config configs/stable-diffusion/v1-inference.yaml \\
        --ckpt models/ldm/stable-diffusion-v1/model.ckpt --prompt "a photo of a chair" --device cuda

Generates one set of --n_samples images without sharing (DDIM, image k from seed --seed + k) and
records, in every self-attention layer at every step, how uniform each query's attention over its own
image is (normalised entropy, 1 = uniform) and how much of it would go to the other images if their
keys were pooled as sharing "all" does ((B-1)/B = cannot tell images apart), and how similar the
layer's outputs are between images (near 1: sharing has little to exchange). Then, from the set's
final latents noised back to 1/4, 1/2 and 3/4 of the schedule, how much sharing in each group alone
changes the UNet's noise prediction. Sharing can only make a subject consistent where attention is
selective and its output matters downstream; see ldm/eval/attention_stats.py.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from ldm.cli import ArgumentParser, UsageError, choose_evaluated_model, run_cli  # noqa: E402
from ldm.generation.builder import check_checkpoint, read_config  # noqa: E402
from ldm.eval.attention_stats import AttentionRecorder, prediction_change  # noqa: E402
from ldm.generation import DEMO_SCALE, GenerationRequest, choose_device, generate, load_model  # noqa: E402

FLAGS = {"prompt": "--prompt", "seed": "--seed", "batch_size": "--n_samples", "steps": "--steps", "scale": "--scale",
         "device": "--device"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="the shipped demo model (the default without --config)")
    parser.add_argument("--config", type=str, default=None, help="model config of another model")
    parser.add_argument("--ckpt", type=str, default=None, help="its checkpoint (.ckpt or .safetensors)")
    parser.add_argument("--prompt", type=str, default="a chair")
    parser.add_argument("--n_samples", type=int, default=4, help="images in the set (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="image k starts from seed + k")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (demo 25, SD v1 50)")
    parser.add_argument("--scale", type=float, default=None, help=f"guidance scale (demo {DEMO_SCALE}, SD v1 7.5)")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    opt = parser.parse_args(argv)
    choose_evaluated_model(opt)
    if opt.n_samples < 2:
        raise UsageError(f"--n_samples must be at least 2 (sharing needs other images), got {opt.n_samples}")
    if opt.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {opt.threads}")
    return opt


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, float]]:
    opt = parse_args(argv)
    # One set without sharing, DDIM with eta 0, in float32: what the statistics describe.
    request = GenerationRequest(prompt=opt.prompt, seed=opt.seed, batch_size=opt.n_samples, sampler="ddim",
                                steps=opt.steps, scale=opt.scale, precision="full")
    spec = read_config(opt.config)
    request.check_for(spec)
    ckpt_path = check_checkpoint(opt.ckpt, opt.demo)
    device = choose_device(opt.device)
    torch.set_num_threads(opt.threads)
    model = load_model(spec, ckpt_path, device=device)
    with AttentionRecorder(model.module, set_size=opt.n_samples) as recorder:
        result = generate(model, request)
    latents = torch.stack([sample.latent for sample in result.samples]).to(device)  # (B, C, h, w)
    summary = recorder.summary()
    with torch.no_grad():
        conditioning = model.module.get_learned_conditioning([opt.prompt] * opt.n_samples)
    for tag, change in prediction_change(model.module, latents, conditioning, list(summary)).items():
        summary[tag]["prediction_change"] = change
    seeds = result.samples[0].metadata["batch_seeds"]
    uniform = (opt.n_samples - 1) / opt.n_samples
    print(f"Self-attention of {ckpt_path.name}, {opt.prompt!r}, {opt.n_samples} images (seeds {seeds[0]}-{seeds[-1]}), "
          f"DDIM {opt.steps} steps, scale {opt.scale}; mean over layers, steps, heads and queries.")
    print(f"| group | calls | own-image entropy (1 = uniform) | share on other images (uniform {uniform:.2f}) "
          "| output similarity between images | prediction change if shared alone |")
    print("|---|---|---|---|---|---|")
    for tag, row in summary.items():
        entropy = "-" if math.isnan(row["entropy"]) else f"{row['entropy']:.3f}"  # "-": a single token
        print(f"| `{tag}` | {row['calls']} | {entropy} | {row['other_mass']:.3f} | {row['output_similarity']:.3f} "
              f"| {row['prediction_change']:.4f} |")
    return summary


if __name__ == "__main__":
    run_cli(main, flags=FLAGS)

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
from omegaconf import OmegaConf  # noqa: E402

from ldm.cli import UsageError, check_checkpoint, choose_evaluated_model, run_cli  # noqa: E402
from ldm.eval.attention_stats import AttentionRecorder, prediction_change  # noqa: E402
from ldm.generation import choose_device, generate_latents  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="the shipped demo model (the default without --config)")
    parser.add_argument("--config", type=str, default=None, help="model config of another model")
    parser.add_argument("--ckpt", type=str, default=None, help="its checkpoint (.ckpt or .safetensors)")
    parser.add_argument("--prompt", type=str, default="a chair")
    parser.add_argument("--n_samples", type=int, default=4, help="images in the set (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="image k starts from seed + k")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (demo 25, SD v1 50)")
    parser.add_argument("--scale", type=float, default=None, help="guidance scale (demo 3.0, SD v1 7.5)")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    opt = parser.parse_args(argv)
    choose_evaluated_model(opt)
    if opt.n_samples < 2:
        raise UsageError(f"--n_samples must be at least 2 (sharing needs other images), got {opt.n_samples}")
    if not 1 <= opt.steps <= 1000:
        raise UsageError(f"--steps must be between 1 and 1000, got {opt.steps}")
    if opt.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {opt.threads}")
    return opt


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, float]]:
    opt = parse_args(argv)
    torch.set_num_threads(opt.threads)
    config_path, ckpt_path = check_checkpoint(opt)
    from ldm.checkpoint import load_model_from_config
    device = choose_device(opt.device)
    config = OmegaConf.load(config_path)
    model = load_model_from_config(config, ckpt_path, device=device).float()  # fp16 files run in float32
    params = config.model.params
    shape = (int(params.channels), int(params.image_size), int(params.image_size))
    seeds = [opt.seed + k for k in range(opt.n_samples)]
    with AttentionRecorder(model, set_size=opt.n_samples) as recorder:
        latents = generate_latents(model, DDIMSampler(model), [opt.prompt] * opt.n_samples, seeds, shape=shape,
                                   steps=opt.steps, scale=opt.scale)
    summary = recorder.summary()
    with torch.no_grad():
        conditioning = model.get_learned_conditioning([opt.prompt] * opt.n_samples)
    for tag, change in prediction_change(model, latents, conditioning, list(summary)).items():
        summary[tag]["prediction_change"] = change
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
    run_cli(main)

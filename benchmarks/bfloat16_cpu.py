"""bfloat16 autocast on the CPU against float32, measured in the same run: speed and image difference.

    python benchmarks/bfloat16_cpu.py                   # both models, 2 threads
    python benchmarks/bfloat16_cpu.py --skip-sd-unet    # the demo model only
    python benchmarks/bfloat16_cpu.py --skip-images --latent 16 --repeats 2   # speed only, quicker

1. Speed of one UNet forward, float32 vs `torch.autocast("cpu", dtype=torch.bfloat16)`, timed alternately
   (medians): the full SD v1 UNet (random weights; batch 2 = both guidance halves of one image; 32x32
   latents by default) and the shipped demo model's UNet (batch 8 = 4 images guided, 8x8 latents).
2. Images of the v1 demo model (configs/demo/, models/demo/: the model the rule below was decided and
   measured on, and the one whose images the attribute classifier reads): the same request generated
   with `precision="full"` and `precision="bfloat16"` (DDIM, 25 steps, scale 3, the prompts below, seeds
   from 1000): the pixel difference of every image (mean and max over pixels of |a - b| in 8-bit
   levels), and whether the study's attribute classifier (models/demo/) gives any image another label
   (class, colour, pattern, facing).

Decided before the first measurement: `--precision autocast` (the default) switches the CPU to bfloat16
only if, on the (v1) demo model, the mean pixel difference is at most 1 level for every image AND no
classifier label changes; otherwise float32 stays the CPU default and bfloat16 is the opt-in
`--precision bfloat16`. The issue adds "float32 where neither helps": so also only where bfloat16 is
faster. The CPU's native bfloat16 support (AVX512-BF16 or AMX, as torch reports it) is printed, since
without it torch computes convolutions in bfloat16 through slow generic kernels.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from _common import sd_unet, time_alternately, unet_inputs

from ldm.eval.attribute_classifier import load_attribute_classifier  # noqa: E402
from ldm.generation import GenerationRequest, generate, image_to_tensor, load_demo_model, load_model  # noqa: E402
from ldm.generation.model import DEMO_V1_CKPT, DEMO_V1_CONFIG  # noqa: E402

PROMPTS = ("a red chair", "a blue striped lamp", "a green table", "a yellow dotted vase")
LABELS = ("cls", "colour", "pattern", "facing")


def unet_speed(name: str, unet: torch.nn.Module, inputs: tuple, repeats: int) -> None:
    x, t, context = inputs

    def forward(dtype: torch.dtype | None):
        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                return unet(x, t, context=context)
        return run

    times = time_alternately({"float32": forward(None), "bfloat16": forward(torch.bfloat16)}, repeats=repeats)
    with torch.no_grad():
        reference = forward(None)()
        low = forward(torch.bfloat16)().float()
    error = ((low - reference).norm() / reference.norm()).item()
    print(f"{name}: float32 {times['float32']:.3f} s, bfloat16 {times['bfloat16']:.3f} s per forward (medians of "
          f"{repeats}); bfloat16 / float32 time ratio {times['bfloat16'] / times['float32']:.2f}; relative output "
          f"difference |bf16 - fp32| / |fp32| = {error:.4f}", flush=True)


def demo_images(batches: int) -> None:
    model = load_model(DEMO_V1_CONFIG, DEMO_V1_CKPT, device="cpu", verbose=False)  # the classifier reads v1
    request = dict(prompt=PROMPTS * batches, batch_size=4, steps=25, scale=3.0, seed=1000)  # v1's scale
    results = {name: generate(model, GenerationRequest(**request, precision=name)) for name in ("full", "bfloat16")}
    full, low = ([np.asarray(image, dtype=np.float64) for image in results[name].images] for name in results)
    differences = [np.abs(a - b) for a, b in zip(full, low)]
    means = [d.mean() for d in differences]
    classifier = load_attribute_classifier()
    labels = {name: classifier.predict(torch.cat([image_to_tensor(i) for i in results[name].images]))
              for name in results}
    changed = {head: sum(a != b for a, b in zip(labels["full"][head], labels["bfloat16"][head])) for head in LABELS}
    count = len(means)
    print(f"v1 demo model images ({count}, 25 DDIM steps, scale 3): |bf16 - fp32| in 8-bit levels: mean over images "
          f"{np.mean(means):.2f} (per-image means {min(means):.2f} to {max(means):.2f}), largest pixel difference "
          f"{max(d.max() for d in differences):.0f}")
    print("  classifier labels changed: " + ", ".join(f"{head} {changed[head]}/{count}" for head in LABELS))
    keep = max(means) <= 1.0 and not any(changed.values())
    print(f"  image rule (mean <= 1 level for every image, no label change): {'met' if keep else 'not met'}",
          flush=True)


def demo_unet_inputs(model) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, model.geometry.channels, 8, 8, generator=g)
    context = model.module.get_learned_conditioning(list(PROMPTS) * 2)
    return x, torch.full((8,), 500), context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=32, help="SD UNet latent side (32 = 256 px, 64 = 512 px)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=2, help="demo model: batches of the 4 prompts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-sd-unet", action="store_true")
    parser.add_argument("--skip-images", action="store_true", help="speed only: no demo-model images")
    opt = parser.parse_args()
    torch.set_num_threads(opt.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bfloat16 (AVX512-BF16 or AMX): "
          f"{torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()}", flush=True)
    demo = load_demo_model()
    unet_speed("demo UNet, batch 8, 8x8 latents", demo.unet, demo_unet_inputs(demo), opt.repeats)
    if not opt.skip_sd_unet:
        unet_speed(f"SD v1 UNet, batch 2, {opt.latent}x{opt.latent} latents", sd_unet(), unet_inputs(2, opt.latent),
                   opt.repeats)
    if not opt.skip_images:
        demo_images(opt.batches)

if __name__ == "__main__":
    main()

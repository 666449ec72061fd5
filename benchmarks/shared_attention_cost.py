"""Cost of batch-shared self-attention per layer group: one full-size SD v1 UNet forward, batch 4.

    python benchmarks/shared_attention_cost.py                 # 64x64 latents (512 px), fp32, CPU
    python benchmarks/shared_attention_cost.py --latent 32     # quicker

For each group the measured time is divided by the plain forward's, timed in turns in the same run,
and printed next to the FLOP-count prediction: a shared layer with N tokens, C channels and a sharing
group of G images does 4*B*N*(G*N)*C attention FLOPs instead of 4*B*N*N*C (q.k and attention.v), so the
extra is 4*B*N^2*C*(G-1) per selected layer; the plain total comes from torch's FlopCounterMode.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import sd_unet, time_alternately, unet_inputs
from ldm.modules.shared_attention import batch_layout, select_layers, shared_attention

GROUPS = ["all", "down", "mid", "up", "64", "32", "16"]


def attention_flops(tokens: int, channels: int, batch: int, keys_per_query: int) -> int:
    return 4 * batch * tokens * keys_per_query * channels


def layer_geometry(unet: torch.nn.Module, latent: int) -> dict[str, tuple[int, int]]:
    """tag -> (tokens, channels) of its self-attention layers at this latent size."""
    geometry = {}
    for _, layer in select_layers(unet, ["all"]):
        level = int(layer.tag.split(".")[1])
        side = latent * level // 64
        geometry[layer.tag] = (side * side, layer.to_q.in_features)
    return geometry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    opt = parser.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    unet = sd_unet()
    x, t, context = unet_inputs(opt.batch, opt.latent)

    def forward(groups: str | None):
        def run():
            with torch.no_grad(), batch_layout(unet, halves=1):
                if groups is None:
                    return unet(x, t, context=context)
                with shared_attention(unet, groups=groups):
                    return unet(x, t, context=context)
        return run

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, context=context)
    plain_flops = counter.get_total_flops()
    counted = {str(op) for op in counter.get_flop_counts().get("Global", {})}
    geometry = layer_geometry(unet, opt.latent)
    if not any("scaled_dot_product" in op for op in counted):  # add attention if the counter skipped it
        cross_keys = 77
        for tag, (tokens, channels) in geometry.items():
            count = sum(1 for _, layer in select_layers(unet, [tag]))
            plain_flops += count * (attention_flops(tokens, channels, opt.batch, tokens)
                                    + attention_flops(tokens, channels, opt.batch, cross_keys))

    candidates = {"off": forward(None), **{name: forward(name) for name in GROUPS}}
    medians = time_alternately(candidates, repeats=opt.repeats)
    print(f"Shared self-attention cost: full SD v1 UNet, fp32 CPU, batch {opt.batch} (one sharing group), "
          f"{opt.latent}x{opt.latent} latents, {torch.get_num_threads()} threads, {opt.repeats} alternating repeats")
    print(f"plain forward: {medians['off']:.2f} s, {plain_flops / 1e12:.2f} TFLOP")
    print(f"{'group':<6} {'layers':>6} {'time ratio':>11} {'FLOP ratio':>11}")
    for name in GROUPS:
        layers = select_layers(unet, [name])
        extra = 0
        for _, layer in layers:  # each query also sees the (G - 1) * N tokens of the other images
            tokens, channels = geometry[layer.tag]
            extra += attention_flops(tokens, channels, opt.batch, tokens * (opt.batch - 1))
        print(f"{name:<6} {len(layers):>6} {medians[name] / medians['off']:>11.3f} "
              f"{(plain_flops + extra) / plain_flops:>11.3f}")


if __name__ == "__main__":
    main()

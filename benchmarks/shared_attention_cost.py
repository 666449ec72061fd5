"""Cost of batch-shared self-attention per layer group: one full-size SD v1 UNet forward, batch 4.

    python benchmarks/shared_attention_cost.py                 # 64x64 latents (512 px), fp32, CPU
    python benchmarks/shared_attention_cost.py --latent 32     # quicker
    python benchmarks/shared_attention_cost.py --variants up,up@mask@drop=0.5 --memory   # the variants

For each group the measured time
the measured time is divided by the plain forward's, timed in turns in the same run,
and printed next to the FLOP-count prediction: a shared layer with N tokens, C channels and a sharing
group of G images does 4*B*N*(G*N)*C attention FLOPs instead of 4*B*N*N*C (q.k and attention.v), so the
extra is 4*B*N^2*C*(G-1) per selected layer; the plain total comes from torch's FlopCounterMode.

`--variants` times configurations in the consistency harness's syntax (ldm/eval/configurations.py,
e.g. `up@mask@drop=0.5`) instead of the groups, against the plain forward and plain sharing of the
same groups, in turns in the same run. With random weights there are no subject words: every image's
subject is text token 2, whose cross-attention map (random, Otsu-thresholded as always) gives the
mask; the share of tokens the masks keep is printed. A masked candidate's controller is entered once
untimed to make its first mask, which each timed call then starts from (as in steps 2.. of a run).
`--memory` adds the peak RSS of one forward of each candidate, each in a fresh process (peak RSS
cannot be reset), as the ratio to the plain forward's: of the whole process (weights included) and of
the growth during the forward beyond the built model and its inputs.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import sd_unet, time_alternately, unet_inputs
from ldm.eval.configurations import parse_configuration
from ldm.modules.shared_attention import SharedAttention, batch_layout, select_layers, shared_attention

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


SUBJECT_TOKEN = 2


def variant_forward(unet: torch.nn.Module, spec: str, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
    """A call running one forward of configuration `spec` ('off' = plain), and the share of tokens its
    masks keep (None without masks). A masked controller's first mask is made here, untimed."""
    settings = parse_configuration(spec).sharing
    if settings is None:
        return (lambda: unet(x, t, context=context)), None
    positions = [(SUBJECT_TOKEN,)] * x.shape[0]
    controller = SharedAttention(unet, settings, subject_positions=positions if settings.subject else None, seed=0)
    saved, share = None, None
    if settings.subject:
        with controller:
            unet(x, t, context=context)  # the first call reads the cross-attention, shares nothing
            saved = controller.masks
        saved.new_call()
        share = saved.latent_mask().float().mean().item()

    def run():
        with controller:
            if saved is not None:
                controller.masks = saved
            return unet(x, t, context=context)
    return run, share


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_memory(spec: str, batch: int, latent: int) -> None:
    """In a fresh process: print JSON {before, peak} MB around one forward of `spec`."""
    unet = sd_unet()
    x, t, context = unet_inputs(batch, latent)
    with torch.no_grad(), batch_layout(unet, halves=1):
        run, _ = variant_forward(unet, spec, x, t, context)
        before = peak_rss_mb()
        run()
    print(json.dumps({"before": before, "peak": peak_rss_mb()}))


def variants_table(opt: argparse.Namespace) -> None:
    specs = ["off", *[s for s in opt.variants.split(",") if s and s != "off"]]
    unet = sd_unet()
    x, t, context = unet_inputs(opt.batch, opt.latent)
    with torch.no_grad(), batch_layout(unet, halves=1):
        prepared = {spec: variant_forward(unet, spec, x, t, context) for spec in specs}
        medians = time_alternately({spec: run for spec, (run, _) in prepared.items()}, repeats=opt.repeats)
    memory = {}
    if opt.memory:
        for spec in specs:
            command = [sys.executable, __file__, "--child-memory", spec, "--batch", str(opt.batch),
                       "--latent", str(opt.latent), "--threads", str(torch.get_num_threads())]
            memory[spec] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    print(f"Sharing variants: full SD v1 UNet, fp32 CPU, batch {opt.batch} (one sharing group), "
          f"{opt.latent}x{opt.latent} latents, {torch.get_num_threads()} threads, {opt.repeats} alternating repeats")
    print(f"plain forward: {medians['off']:.2f} s")
    header = f"{'configuration':<22} {'mask keeps':>10} {'time / plain':>12}"
    if memory:
        header += f" {'peak RSS / plain':>16} {'forward growth / plain':>22}"
    print(header)
    for spec in specs:
        share = prepared[spec][1]
        row = f"{spec:<22} {'-' if share is None else f'{share:.2f}':>10} {medians[spec] / medians['off']:>12.3f}"
        if memory:
            m, ref = memory[spec], memory["off"]
            row += (f" {m['peak'] / ref['peak']:>16.3f}"
                    f" {(m['peak'] - m['before']) / (ref['peak'] - ref['before']):>22.3f}")
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", type=str, default=None,
                        help="comma-separated configurations (harness syntax) to time instead of the groups")
    parser.add_argument("--memory", action="store_true", help="with --variants: peak memory, fresh process each")
    parser.add_argument("--child-memory", type=str, default=None, help=argparse.SUPPRESS)
    opt = parser.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    if opt.child_memory is not None:
        return child_memory(opt.child_memory, opt.batch, opt.latent)
    if opt.variants is not None:
        return variants_table(opt)
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

"""Cost of batch-shared self-attention per layer group: one full-size SD v1 UNet forward, batch 4.

    python benchmarks/shared_attention_cost.py                 # 64x64 latents (512 px), fp32, CPU
    python benchmarks/shared_attention_cost.py --latent 32     # quicker
    python benchmarks/shared_attention_cost.py --variants up,up@mask,up@mask@drop=0.5,up@pooled,up@others \
        --memory --threads 1                                   # the subject-aware variants side by side

For each group the measured time is divided by the plain forward's, timed in turns in the same run,
and printed next to the FLOP-count prediction: a shared layer with N tokens, C channels and a sharing
group of G images does 4*B*N*(G*N)*C attention FLOPs instead of 4*B*N*N*C (q.k and attention.v), so the
extra is 4*B*N^2*C*(G-1) per selected layer; the plain total comes from torch's FlopCounterMode.

`--variants` times configurations in the consistency harness's syntax (ldm/eval/configurations.py,
e.g. `up@mask@drop=0.5`) instead of the groups, against the plain forward (`off`, always run first),
in turns in the same run; list `up` too to compare with plain sharing of the same layers. With random
weights there are no subject words: every image's subject is text token 2 (`SUBJECT_TOKEN`), whose
cross-attention map (random, Otsu-thresholded as always) gives the mask; the share of tokens the
masks keep is printed. The map of a first model call is made once, untimed; every timed call of a
masked candidate starts from the masks it gives, as at step 2 of a run. `--memory` adds the peak RSS
of one forward of each candidate, each in a fresh process (peak RSS cannot be reset; a masked one is
handed the saved map, so no other forward runs before it): of the whole process (weights included), in
MB and as the ratio to the plain forward's, and its growth during the forward beyond the peak that
building the model and its inputs reached, in MB (0 when the forward stays below that peak).

`--breakdown` times the attention of one 64-level layer alone (why the 64 level costs more time than
its FLOPs predict; benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import sd_unet, time_alternately, unet_inputs
from ldm.eval.configurations import parse_configuration
from ldm.modules.step_context import StepContext
from ldm.sharing import SharedAttention, SharedAttentionSettings, select_layers, shared_attention
from ldm.sharing.masks import SubjectMasks

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


# With random weights there are no subject words: subject s of every image is text token 2 + 3 s (the
# words after "a" in a prompt like "a chair and a lamp": tokens 2 and 5).
def subject_positions(subjects: int, batch: int) -> list[list[tuple[int, ...]]]:
    return [[(2 + 3 * s,)] * batch for s in range(subjects)]


def first_call_map(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   subjects: int) -> torch.Tensor:
    """The subject tokens' cross-attention maps (S, B, h, w) that a first model call leaves for the masks of
    the second: one untimed forward with subject masks (it shares nothing: no mask exists yet)."""
    settings = SharedAttentionSettings(groups=("up",), subjects=[f"subject{s}" for s in range(subjects)])
    controller = SharedAttention(unet, settings, subject_positions=subject_positions(subjects, x.shape[0]))
    with controller:
        unet(x, t, context=context)
        masks = controller.run.masks
    masks.enter_call(StepContext(latent_size=tuple(x.shape[-2:])))  # a next call: the first one's maps join the history
    return masks.history[-1]


def masks_after_first_call(first_map: torch.Tensor) -> SubjectMasks:
    """Subject masks as at the second step of a run: made from the first call's maps (S, B, h, w)."""
    masks = SubjectMasks(subject_positions(first_map.shape[0], first_map.shape[1]))
    masks.history.append(first_map)
    masks.enter_call(StepContext(latent_size=tuple(first_map.shape[-2:])))  # the second call's mask
    return masks


def variant_forward(unet: torch.nn.Module, spec: str, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    first_map: Optional[torch.Tensor]):
    """A call running one forward of configuration `spec` ('off' = plain), and the share of tokens its
    masks keep (None without masks). Every call of a masked configuration starts from the masks the
    first call's map makes (`first_map`), as at step 2 of a run, so every timed call is the same."""
    settings = parse_configuration(spec).sharing
    if settings is None:
        return (lambda: unet(x, t, context=context)), None
    positions = subject_positions(len(settings.subjects), x.shape[0]) if settings.subjects else None
    controller = SharedAttention(unet, settings, subject_positions=positions, seed=0)
    share = None
    if settings.subjects:
        first_map = first_map[:len(settings.subjects)]  # made for the most subjects any candidate names
        share = masks_after_first_call(first_map).latent_mask().float().mean().item()

    def run():
        with controller:
            if settings.subjects:
                controller.run.masks = masks_after_first_call(first_map[:len(settings.subjects)])
            return unet(x, t, context=context)
    return run, share


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_memory(spec: str, batch: int, latent: int, map_path: Optional[str]) -> None:
    """In a fresh process: print JSON {before, peak} MB around one forward of `spec` (a masked one from
    the first call's map the parent saved at `map_path`, so no other forward runs before it)."""
    unet = sd_unet()
    x, t, context = unet_inputs(batch, latent)
    first_map = torch.load(map_path) if map_path else None
    with torch.no_grad():
        run, _ = variant_forward(unet, spec, x, t, context, first_map)
        before = peak_rss_mb()
        run()
    print(json.dumps({"before": before, "peak": peak_rss_mb()}))


def variants_table(opt: argparse.Namespace) -> None:
    specs = ["off", *[s for s in opt.variants.split(",") if s and s != "off"]]
    unet = sd_unet()
    x, t, context = unet_inputs(opt.batch, opt.latent)
    masked = [spec for spec in specs if spec != "off" and parse_configuration(spec).sharing.subjects]
    with torch.no_grad():
        most = max((len(parse_configuration(spec).sharing.subjects) for spec in masked), default=0)
        first_map = first_call_map(unet, x, t, context, most) if masked else None
        prepared = {spec: variant_forward(unet, spec, x, t, context, first_map) for spec in specs}
        medians = time_alternately({spec: run for spec, (run, _) in prepared.items()}, repeats=opt.repeats)
    memory = {}
    if opt.memory:
        with tempfile.TemporaryDirectory() as folder:
            map_path = str(Path(folder) / "first_map.pt")
            if first_map is not None:
                torch.save(first_map, map_path)
            for spec in specs:
                command = [sys.executable, __file__, "--child-memory", spec, "--batch", str(opt.batch),
                           "--latent", str(opt.latent), "--threads", str(torch.get_num_threads())]
                if spec in masked:
                    command += ["--child-map", map_path]
                memory[spec] = json.loads(subprocess.run(command, check=True, capture_output=True,
                                                         text=True).stdout)
    print(f"Sharing variants: full SD v1 UNet, fp32 CPU, batch {opt.batch} (one sharing group), "
          f"{opt.latent}x{opt.latent} latents, {torch.get_num_threads()} threads, {opt.repeats} alternating repeats")
    print(f"plain forward: {medians['off']:.2f} s")
    header = f"{'configuration':<22} {'mask keeps':>10} {'time / plain':>12}"
    if memory:
        header += f" {'peak RSS MB':>11} {'peak RSS / plain':>16} {'forward growth MB':>17}"
    print(header)
    for spec in specs:
        share = prepared[spec][1]
        row = f"{spec:<22} {'-' if share is None else f'{share:.2f}':>10} {medians[spec] / medians['off']:>12.3f}"
        if memory:
            m, ref = memory[spec], memory["off"]
            # Growth is printed in MB, not as a ratio: the plain forward may peak below what building
            # the UNet already reached (growth 0), and a ratio to 0 means nothing.
            row += f" {m['peak']:>11.0f} {m['peak'] / ref['peak']:>16.3f} {m['peak'] - m['before']:>17.0f}"
        print(row)


def level_64_breakdown(opt: argparse.Namespace) -> None:
    """The attention of one SD v1 64-level self-attention layer at 512 px (B images, 8 heads of 40 channels,
    4096 tokens) alone, plain and shared, next to a 3x3 convolution of that level (what most of a plain
    forward's FLOPs are), as seconds and GFLOP/s: whether shared attention's extra time follows its FLOPs,
    and how fast attention FLOPs run against the rest of the UNet's."""
    from torch.nn import functional as F
    from ldm.sharing.kernels import shared_batch_attention
    batch, heads, tokens, width = opt.batch, 8, 4096, 40
    g = torch.Generator().manual_seed(0)
    # As CrossAttention hands them over: views (B, heads, N, d) of the projections' (B, N, heads*d).
    q, k, v = (torch.randn(batch, tokens, heads * width, generator=g).view(batch, tokens, heads, width)
               .transpose(1, 2) for _ in range(3))
    grouped = [t.transpose(0, 1).reshape(1, heads, batch * tokens, width).contiguous() for t in (q, k, v)]
    image = torch.randn(batch, heads * width, 64, 64, generator=g)
    conv = torch.nn.Conv2d(heads * width, heads * width, 3, padding=1).eval()
    scale = width ** -0.5
    plain_flops = attention_flops(tokens, heads * width, batch, tokens)
    candidates = {
        "plain attention (B, 8, 4096, 40)": (lambda: F.scaled_dot_product_attention(q, k, v), plain_flops),
        "shared, one fused call on pre-grouped inputs": (lambda: F.scaled_dot_product_attention(*grouped),
                                                         plain_flops * batch),
        "shared, our path (regroup, attend, regroup back)": (
            lambda: shared_batch_attention(q, k, v, halves=1, mode="all", anchors=1, strength=0.0, scale=scale),
            plain_flops * batch),
        "3x3 convolution 320->320 at 64x64": (lambda: conv(image), 2 * batch * 64 * 64 * (heads * width) ** 2 * 9),
    }
    with torch.no_grad():
        medians = time_alternately({name: fn for name, (fn, _) in candidates.items()}, repeats=opt.repeats)
    print(f"One 64-level layer at 512 px, batch {batch}, fp32 CPU, {torch.get_num_threads()} threads, "
          f"{opt.repeats} alternating repeats")
    reference = medians["plain attention (B, 8, 4096, 40)"]
    print(f"{'candidate':<50} {'seconds':>8} {'/ plain attn':>12} {'GFLOP/s':>8}")
    for name, (_, flops) in candidates.items():
        seconds = medians[name]
        print(f"{name:<50} {seconds:>8.3f} {seconds / reference:>12.3f} {flops / seconds / 1e9:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", type=str, default=None,
                        help="comma-separated configurations (harness syntax) to time instead of the groups")
    parser.add_argument("--memory", action="store_true", help="with --variants: peak memory, fresh process each")
    parser.add_argument("--breakdown", action="store_true", help="time one 64-level layer's attention alone")
    parser.add_argument("--child-memory", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-map", type=str, default=None, help=argparse.SUPPRESS)
    opt = parser.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    if opt.child_memory is not None:
        return child_memory(opt.child_memory, opt.batch, opt.latent, opt.child_map)
    if opt.breakdown:
        return level_64_breakdown(opt)
    if opt.variants is not None:
        return variants_table(opt)
    unet = sd_unet()
    x, t, context = unet_inputs(opt.batch, opt.latent)

    def forward(groups: str | None):
        def run():
            with torch.no_grad():  # a bare UNet call: one guidance half, no step
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

"""Peak memory of one full-size 64x64 SD v1 self-attention layer with batch sharing "all".

    python benchmarks/shared_attention_memory.py

Each measurement runs in a fresh process: the layer's working memory is the growth of the peak RSS
(CPU) or of torch.cuda.max_memory_allocated (GPU, --device cuda) during one call, beyond its inputs.
Plain attention at the same batch is the reference. Sharing must grow about linearly in the batch
(the (B*N) x (B*N) logits at B=8 would be 34 GB in float32; they are never built).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from _common import REPO  # noqa: F401  (puts the repository on sys.path)
from ldm.modules.attention import CrossAttention
from ldm.modules.step_context import LayerCall, StepContext
from ldm.sharing import shared_attention

TOKENS, CHANNELS, HEADS = 64 * 64, 320, 8  # input_blocks.1 of SD v1 at 512 px


def measure(batch: int, shared: bool, strength: float, device: str) -> float:
    """MB of working memory of one attention call (run in a child process)."""
    torch.manual_seed(0)
    layer = CrossAttention(CHANNELS, heads=HEADS, dim_head=CHANNELS // HEADS).to(device)
    layer.tag = "down.64"
    x = torch.randn(batch, TOKENS, CHANNELS, device=device)  # (B, N, C)

    class Holder(torch.nn.Module):  # the controller expects a UNet-like owner of the layer
        def __init__(self):
            super().__init__()
            self.layer = layer

        def self_attention_layers(self):
            return [layer]

    holder = Holder()
    call = LayerCall(StepContext(), (64, 64))  # one guidance half, no step, the 64x64 token grid
    with torch.no_grad():
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.max_memory_allocated()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if shared:
            with shared_attention(holder, groups="all", strength=strength):
                layer(x, call=call)
        else:
            layer(x, call=call)
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - base) / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opt = parser.parse_args()
    if opt.child:
        batch, shared, strength = json.loads(opt.child)
        print(json.dumps(measure(batch, shared, strength, opt.device)))
        return
    batches = [int(b) for b in opt.batches.split(",")]
    rows = []
    for batch in batches:
        row = [batch]
        for shared, strength in ((False, 0.0), (True, 0.0), (True, 1.0)):
            result = subprocess.run([sys.executable, __file__, "--device", opt.device,
                                     "--child", json.dumps([batch, shared, strength])],
                                    capture_output=True, text=True, check=True)
            row.append(float(result.stdout.strip().splitlines()[-1]))
        rows.append(row)
    print(f"One SD v1 self-attention layer (N={TOKENS}, C={CHANNELS}, {HEADS} heads), fp32, {opt.device}: "
          "working memory in MB")
    print(f"{'batch':>5} {'plain':>8} {'shared':>8} {'shared s=1':>11} {'shared/plain':>13} {'shared vs batch 1':>18}")
    first_shared = rows[0][2]
    for batch, plain, shared, biased in rows:
        print(f"{batch:>5} {plain:>8.1f} {shared:>8.1f} {biased:>11.1f} {shared / plain:>13.2f} "
              f"{shared / first_shared:>18.2f}")


if __name__ == "__main__":
    main()

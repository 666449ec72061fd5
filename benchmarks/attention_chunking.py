"""Peak memory and time of query-chunked attention against the unchunked math kernel, same run.

    python benchmarks/attention_chunking.py [--batches 1,2]

The attention of one full-size SD v1 64x64 self-attention layer (N = 4096 tokens per image, 8 heads of
width 40) with batch sharing "all" over the batch, on the CPU with PyTorch's math kernel forced
(`sdpa_kernel(SDPBackend.MATH)`: what mps always runs). Three candidates:
- chunked: `ldm/modules/attention_kernel.py` as the layer uses it (256 MiB score budget);
- full: the same call with an unlimited budget, i.e. one math-kernel call over all queries;
- fused: PyTorch's CPU flash kernel (not forced), the memory-linear reference where it exists.
Each memory figure is the peak-RSS growth of one call in a fresh process, beyond its inputs; times are
medians of calls run in turns (see `_common.time_alternately`). Ratios are against "full".
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from _common import REPO, time_alternately  # noqa: F401  (puts the repository on sys.path)
import ldm.modules.attention_kernel as kernel  # noqa: E402
from ldm.sharing.kernels import shared_batch_attention  # noqa: E402

TOKENS, HEADS, HEAD_WIDTH = 64 * 64, 8, 40
CANDIDATES = ("chunked", "full", "fused")


def run_once(candidate: str, q: torch.Tensor) -> torch.Tensor:
    if candidate == "full":
        kernel.DEFAULT_BUDGET_BYTES = 1 << 62
    scope = contextlib.nullcontext() if candidate == "fused" else sdpa_kernel(SDPBackend.MATH)
    try:
        with scope, torch.no_grad():
            return shared_batch_attention(q, q, q, halves=1, mode="all", anchors=1, strength=0.0,
                                          scale=HEAD_WIDTH ** -0.5)
    finally:
        kernel.DEFAULT_BUDGET_BYTES = 256 * 2**20


def inputs(batch: int) -> torch.Tensor:
    return torch.randn(batch, HEADS, TOKENS, HEAD_WIDTH, generator=torch.Generator().manual_seed(0))


def child_peak_mib(batch: int, candidate: str) -> float:
    q = inputs(batch)
    rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    run_once(candidate, q)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opt = parser.parse_args()
    torch.set_num_threads(1)
    if opt.child:
        batch, candidate = json.loads(opt.child)
        print(json.dumps(child_peak_mib(batch, candidate)))
        return
    print(f"Shared 'all' attention of one SD v1 64x64 layer ({HEADS} heads x {HEAD_WIDTH}), fp32, CPU, 1 thread")
    print(f"{'batch':>5} {'candidate':>9} {'peak MiB':>9} {'vs full':>8} {'seconds':>8} {'vs full':>8}")
    for batch in (int(b) for b in opt.batches.split(",")):
        peaks = {}
        for candidate in CANDIDATES:
            result = subprocess.run([sys.executable, __file__, "--child", json.dumps([batch, candidate])],
                                    capture_output=True, text=True, check=True)
            peaks[candidate] = float(result.stdout.strip().splitlines()[-1])
        q = inputs(batch)
        outputs = {c: run_once(c, q) for c in CANDIDATES}
        times = time_alternately({c: (lambda c=c: run_once(c, q)) for c in CANDIDATES}, repeats=opt.repeats,
                                 warmup=0)
        for c in CANDIDATES:
            print(f"{batch:>5} {c:>9} {peaks[c]:>9.0f} {peaks[c] / peaks['full']:>8.2f} {times[c]:>8.2f} "
                  f"{times[c] / times['full']:>8.2f}")
        difference = max((outputs[c] - outputs["full"]).abs().max().item() for c in CANDIDATES)
        print(f"      max |candidate - full| = {difference:.1e}")


if __name__ == "__main__":
    main()

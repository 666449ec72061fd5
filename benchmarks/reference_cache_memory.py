"""What recording a reference's anchors once per run costs in memory, and what it saves in time.

    python benchmarks/reference_cache_memory.py

Memory: the record for SD v1 (fp16, 512 px, 50 DDIM steps, guidance on), computed from the layer
shapes of the real config (built on the meta device, no weights) with `record_bytes`, which a test
checks against what the recorder keeps on a tiny model.

Time, measured on the demo model (CPU, its 25 steps, batches of 4, one reference): one record pass
(making the reference's batch again) against one new batch, alternately. With the record made once,
a run of k batches costs record + k * batch; making the anchors again in every batch would cost
k * (record + batch) (the reference's images then run in every batch): the cost of
`reference_cache=False`, whose peak memory is the same record, held one batch at a time.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from omegaconf import OmegaConf

from _common import SD_CONFIG, time_alternately
from ldm.generation import DEMO_SCALE, GenerationRequest, generate, load_demo_model, save_result
from ldm.generation.reference import read_reference, record_reference_anchors
from ldm.sharing import SharedAttentionSettings
from ldm.sharing.reference import record_bytes
from ldm.util import instantiate_from_config


def sd_memory() -> None:
    config = OmegaConf.load(SD_CONFIG)
    with torch.device("meta"):
        unet = instantiate_from_config(config.model.params.unet_config)
    print("SD v1, fp16, 512 px, 50 DDIM steps, guidance (2 halves), per anchor image:")
    print("| layers | step window | record |")
    print("|---|---|---|")
    for groups in ("all", "up", "up.64", "mid,up.16"):
        for window in ((0.0, 1.0), (0.0, 0.4)):
            settings = SharedAttentionSettings(groups=tuple(groups.split(",")), mode="anchor", steps=window)
            size = record_bytes(unet, settings, 512, steps=50, halves=2, anchors=1, bytes_per_value=2)
            print(f"| {groups} | {window[0]:g}:{window[1]:g} | {size / 2 ** 30:.2f} GiB |")


def demo_time(repeats: int) -> None:
    torch.set_num_threads(1)
    model = load_demo_model()
    sharing = SharedAttentionSettings(groups=("up",), mode="anchor")
    first = GenerationRequest(prompt="a red chair", seed=1, batch_size=4, steps=25, scale=DEMO_SCALE, sharing=sharing)
    with tempfile.TemporaryDirectory() as folder:
        path = save_result(generate(model, first), folder, grid=False)[0]
        reference = read_reference(path)
        request = GenerationRequest(prompt="a red chair in a garden", seed=100, batch_size=4, steps=25,
                                    scale=DEMO_SCALE, sharing=sharing, references=(str(path),))
        anchors, _, _ = record_reference_anchors(model.module, [reference], sharing)
        plain_batch = GenerationRequest(prompt="a red chair in a garden", seed=100, batch_size=4, steps=25,
                                        scale=DEMO_SCALE, sharing=sharing)

        def record() -> None:
            record_reference_anchors(model.module, [reference], sharing)

        def run_of_one_batch() -> None:
            generate(model, request)

        def batch_in_anchor_mode() -> None:
            generate(model, plain_batch)

        times = time_alternately({"record": record, "run of one batch (record included)": run_of_one_batch,
                                  "one batch, no reference": batch_in_anchor_mode}, repeats=repeats)
    print(f"demo model, CPU 1 thread, 25 steps, batch 4, layers up; record {anchors.nbytes / 2 ** 20:.1f} MiB; "
          f"medians of {repeats}:")
    for name, seconds in times.items():
        print(f"  {name}: {seconds:.2f} s ({seconds / times['one batch, no reference']:.2f}x a batch)")
    rec, batch = times["record"], times["one batch, no reference"]
    for k in (1, 4, 10):
        print(f"  k={k} batches: recorded once {rec + k * batch:.1f} s, made again per batch "
              f"{k * (rec + batch):.1f} s ({k * (rec + batch) / (rec + k * batch):.2f}x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sd_memory()
    demo_time(args.repeats)

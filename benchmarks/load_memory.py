"""Peak memory of loading a full-size SD v1 checkpoint: `load_model_from_config` against the naive way.

Writes an SD v1 checkpoint of random weights, with every key and shape of the reference list
(tests/data/sd-v1-checkpoint-keys.tsv, plus model_ema.decay/num_updates as in sd-v1-4.ckpt), fp32
(~4.3 GB) or with --fp16 (~2.1 GB), as a Lightning `.ckpt` and as `.safetensors` in a temporary directory.
Then, each in a fresh Python process, it measures peak RSS (getrusage ru_maxrss) of
- `ldm.checkpoint.load_model_from_config(configs/stable-diffusion/v1-inference.yaml, file)`, for both files;
- the naive way, as the reference: torch.load without mmap + the model built normally (random init) +
  load_state_dict, as CompVis' txt2img does it, for the `.ckpt`.
Each is reported right after loading and again after reading every weight once (a memory-mapped model only
pulls pages in when they are used, so the second number is what inference will cost), as peak RSS / file size.
The page cache is warm after writing, so the load times are warm-cache times.

Not run by the tests. From the repository root:
    python benchmarks/load_memory.py [--fp16] [--keep] [--dir DIR]
"""
from __future__ import annotations

import argparse
import ast
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `ldm` lives at the repository root

REFERENCE_KEYS = ROOT / "tests" / "data" / "sd-v1-checkpoint-keys.tsv"
SD_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
GB = 1e9


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def high_water_mark_bytes() -> int:
    """VmHWM: the peak RSS of this process's own address space, as a cross-check of ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- writing the files


def random_sd_v1_state_dict(fp16: bool) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        shape = ast.literal_eval(shape)
        if dtype == "torch.int64":  # position_ids
            state_dict[key] = torch.arange(shape[-1]).expand(shape).clone()
        else:
            tensor = torch.empty(shape, dtype=torch.float16 if fp16 else torch.float32)
            state_dict[key] = tensor.normal_(0.0, 0.02, generator=generator)
    state_dict["model_ema.decay"] = torch.tensor(0.9999)
    state_dict["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    return state_dict


def write_checkpoints(directory: Path, fp16: bool) -> tuple[Path, Path]:
    import safetensors.torch

    from ldm.checkpoint.testing import save_lightning_checkpoint

    name = "sd-v1-random-fp16" if fp16 else "sd-v1-random"
    ckpt, safetensors_file = directory / f"{name}.ckpt", directory / f"{name}.safetensors"
    state_dict = random_sd_v1_state_dict(fp16)
    save_lightning_checkpoint(ckpt, state_dict)
    safetensors.torch.save_file(state_dict, safetensors_file, metadata={"format": "pt"})
    return ckpt, safetensors_file


# ----------------------------------------------------------------------------- measuring (child process)


def load_naively(config, checkpoint: str):
    """CompVis txt2img's way: the whole file read into memory, a randomly initialised model, a copy."""
    import torch

    from ldm.checkpoint.safe_pickle import allow_checkpoint_globals
    from ldm.util import instantiate_from_config

    with allow_checkpoint_globals():  # the same safe unpickler, so only the memory behaviour differs
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model = instantiate_from_config(config.model)
    model.load_state_dict(state_dict, strict=False)
    return model.eval()


def measure(method: str, checkpoint: str, config_path: str) -> dict:
    import torch
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config

    config = OmegaConf.load(config_path)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    if method == "mmap":
        model = load_model_from_config(config, checkpoint, verbose=False)
    else:
        model = load_naively(config, checkpoint)
    seconds = time.perf_counter() - start
    after_load = peak_rss_bytes()
    with torch.no_grad():  # read every weight once, as a forward pass would
        checksum = sum(float(t.sum(dtype=torch.float64)) for t in model.state_dict().values() if t.is_floating_point())
    return {"baseline": baseline, "after_load": after_load, "after_touch": peak_rss_bytes(),
            "high_water_mark": high_water_mark_bytes(), "seconds": seconds, "checksum": checksum}


def run_child(*arguments: str) -> dict:
    """Run this script in a fresh process and return the JSON it prints last.

    Linux carries ru_maxrss over fork and exec, so the parent never imports torch nor holds weights:
    a child's peak then starts from this small process, not from a 4 GB one.
    """
    result = subprocess.run([sys.executable, __file__, *arguments], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp16", action="store_true", help="write fp16 weights (~2.1 GB) instead of fp32 (~4.3 GB)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints and print where they are")
    parser.add_argument("--dir", default=None, help="where to create the temporary directory (default: system temp)")
    parser.add_argument("--measure", choices=["mmap", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.checkpoint, str(SD_CONFIG))))
        return
    if args.write:
        print(json.dumps([str(path) for path in write_checkpoints(Path(args.write), args.fp16)]))
        return

    directory = Path(tempfile.mkdtemp(prefix="sd-load-memory-", dir=args.dir))
    try:
        start = time.perf_counter()
        ckpt, safetensors_file = map(Path, run_child("--write", str(directory), *(["--fp16"] if args.fp16 else [])))
        print(f"wrote random SD v1 weights ({'fp16' if args.fp16 else 'fp32'}) in {time.perf_counter() - start:.0f} s "
              f"to {directory}")
        runs = [("load_model_from_config", "mmap", ckpt), ("load_model_from_config", "mmap", safetensors_file),
                ("naive: torch.load + build + load_state_dict", "naive", ckpt)]
        print(f"{'method':<45} {'file':<12} {'size':>7} {'load':>6} {'RSS before load':>15} "
              f"{'peak RSS after load':>19} {'/size':>6} {'peak after reading all weights':>30} {'/size':>6}")
        for label, method, path in runs:
            size = path.stat().st_size
            m = run_child("--measure", method, "--checkpoint", str(path))
            print(f"{label:<45} {path.suffix:<12} {size / GB:>5.2f}GB {m['seconds']:>5.1f}s "
                  f"{m['baseline'] / GB:>13.2f}GB "
                  f"{m['after_load'] / GB:>17.2f}GB {m['after_load'] / size:>6.2f} "
                  f"{m['after_touch'] / GB:>28.2f}GB {m['after_touch'] / size:>6.2f}")
            if abs(m["high_water_mark"] - m["after_touch"]) > 0.05 * m["after_touch"]:
                print(f"  note: VmHWM {m['high_water_mark'] / GB:.2f} GB disagrees with ru_maxrss")
        print("(RSS before load: the interpreter, torch and the model code, already imported; it is part of each peak)")
    finally:
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Measure a trained autoencoder's latent scale factor, and how well it reconstructs held-out images.

Latent diffusion multiplies the first stage's latents by `scale_factor` so that they have about unit
variance (SD v1's 0.18215 is such a measurement on its own autoencoder). This script encodes the first
`--count` items of the data set in a training config, takes the posterior means, and prints 1 / their
standard deviation, the value for the diffusion config's `scale_factor`. It also decodes those means
and reports the mean absolute reconstruction error in 0..255 pixel units.

    python scripts/measure_scale_factor.py --autoencoder configs/demo/v2/autoencoder.yaml \
        --weights models/demo/v2/autoencoder.safetensors --data configs/demo/v2/autoencoder.yaml \
        --seed 99 --count 256
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from ldm.cli import ArgumentParser, UsageError, run_cli  # noqa: E402
from ldm.generation.builder import resolve_path  # noqa: E402
from ldm.data.latents import EncodedDataset  # noqa: E402
from ldm.util import instantiate_from_config, load_config_file  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--autoencoder", required=True, help="the autoencoder's training config (its model section)")
    parser.add_argument("--weights", required=True, help="the trained autoencoder (.safetensors)")
    parser.add_argument("--data", required=True, help="a config whose data section gives the images to encode")
    parser.add_argument("--seed", type=int, default=None, help="replace the data set's seed (held-out images)")
    parser.add_argument("--count", type=int, default=256, help="how many images to encode")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    opt = parser.parse_args(argv)
    if opt.count < 2:
        raise UsageError(f"--count must be at least 2 (got {opt.count}): a standard deviation needs two values")
    for flag, path in (("--autoencoder", opt.autoencoder), ("--weights", opt.weights), ("--data", opt.data)):
        if not resolve_path(path).is_file():
            raise UsageError(f"{flag}: no such file: {path}")
    return opt


def main(argv: Optional[Sequence[str]] = None) -> float:
    opt = parse_args(argv)
    torch.set_num_threads(opt.threads)
    model_config = load_config_file(resolve_path(opt.autoencoder)).model
    model_config.params.ckpt_path = str(resolve_path(opt.weights))
    autoencoder = instantiate_from_config(model_config).eval()
    data_config = load_config_file(resolve_path(opt.data)).data
    if opt.seed is not None:
        data_config.params.seed = opt.seed
    images = instantiate_from_config(data_config)
    encoded = EncodedDataset(images, autoencoder, length=opt.count)
    means = encoded.moments[:, : encoded.moments.shape[1] // 2]  # (N, z, h, w): the posterior means
    scale_factor = 1.0 / means.std().item()
    errors = []
    with torch.no_grad():
        for start in range(0, opt.count, 64):
            batch = means[start:start + 64]
            decoded = autoencoder.decode(batch).clamp(-1, 1)  # (B, 3, H, W)
            originals = torch.stack([images[i]["image"] for i in range(start, start + batch.shape[0])])
            errors.append((decoded.permute(0, 2, 3, 1) - originals).abs().flatten(1).mean(1) * 127.5)
    print(f"scale_factor {scale_factor:.4f} (1 / std of the posterior means of {opt.count} images, "
          f"data seed {data_config.params.seed})")
    print(f"reconstruction MAE {torch.cat(errors).mean().item():.2f} / 255 (of the means, decoded)")
    return scale_factor


if __name__ == "__main__":
    run_cli(main)

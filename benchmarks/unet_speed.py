"""One UNet forward at full SD v1 size: ours against diffusers' UNet2DConditionModel on the same weights.

    python benchmarks/unet_speed.py              # fp32, CPU, batch 2, 32x32 latents, 5 alternating repeats

Prints the median seconds of each and the ratio ours / diffusers (target: <= 1.0).
"""
from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf

from _common import SD_CONFIG, sd_unet, time_alternately, unet_inputs


def diffusers_copy(unet: torch.nn.Module) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    checkpoint = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    original = OmegaConf.to_container(OmegaConf.load(SD_CONFIG), resolve=True)
    config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    theirs = UNet2DConditionModel(**config)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return theirs.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    opt = parser.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    ours = sd_unet()
    theirs = diffusers_copy(ours)
    x, t, context = unet_inputs(opt.batch, opt.latent)
    with torch.no_grad():
        reference = theirs(x, t, encoder_hidden_states=context).sample
        difference = (ours(x, t, context=context) - reference).abs().max() / reference.abs().max()
        medians = time_alternately({
            "ours": lambda: ours(x, t, context=context),
            "diffusers": lambda: theirs(x, t, encoder_hidden_states=context),
        }, repeats=opt.repeats)
    print(f"UNet forward, fp32 CPU, batch {opt.batch}, {opt.latent}x{opt.latent} latents, "
          f"{torch.get_num_threads()} threads, {opt.repeats} alternating repeats (max |ours - diffusers| / max |diffusers| = {difference:.1e})")
    for name, seconds in medians.items():
        print(f"  {name:<10} {seconds:.3f} s (median)")
    print(f"  ratio ours / diffusers = {medians['ours'] / medians['diffusers']:.3f}")


if __name__ == "__main__":
    main()

"""The SD v1 inpainting model (RunwayML `sd-v1-5-inpainting`): latent diffusion with hybrid conditioning.

The UNet sees 9 input channels: the noisy latents (4), then the mask downsampled to the latent size (1, 1
where the picture is to be repainted), then the latents of the masked picture (4: the picture with the
repainted region set to 0, i.e. mid grey in [-1, 1]). The text still enters through cross-attention. That
channel order is the published checkpoint's (its config says `in_channels: 9  # 4 data + 4 downscaled
image + 1 mask`, built by concatenating mask, then masked image), and diffusers' inpainting pipeline uses
the same: noisy latents, mask, masked-image latents.

The extra 5 channels are the same for both halves of classifier-free guidance (only the text differs),
so the conditioning is a dict `{"c_concat": [(B, 5, h, w)], "c_crossattn": [(B, 77, D)]}` that the
guidance helper batches key by key. Batch-shared self-attention needs nothing else: it acts on the UNet's
self-attention layers whatever the input channels are.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ldm.models.diffusion.ddpm import LatentDiffusion

MASK_CHANNELS = 1


class LatentInpaintDiffusion(LatentDiffusion):
    """LatentDiffusion whose UNet also reads a mask and the masked picture's latents (hybrid conditioning)."""

    def __init__(self, *args: Any, finetune_keys: Any = None, conditioning_key: str = "hybrid",
                 **kwargs: Any) -> None:
        # `finetune_keys` is a training option of the published config; inference has no use for it.
        if conditioning_key != "hybrid":
            raise ValueError(f"an inpainting model conditions on text and masked image together: "
                             f"conditioning_key must be 'hybrid', not {conditioning_key!r}")
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        latent_channels = int(self.first_stage_model.embed_dim)
        unet_channels = int(self.model.diffusion_model.in_channels)
        if unet_channels != 2 * latent_channels + MASK_CHANNELS:
            raise ValueError(f"the inpainting UNet must take {2 * latent_channels + MASK_CHANNELS} input channels "
                             f"(latents, mask, masked-image latents), not {unet_channels}")

    @torch.no_grad()
    def masked_image_conditioning(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) picture in [-1, 1] and (1, 1, H, W) mask in {0, 1} (1 = repaint) -> (1, 5, H/f, W/f).

        The masked picture is encoded with the posterior mean (not a sample), so the conditioning is the
        same for every image of a run, as the init latent of img2img is.
        """
        mask = (mask >= 0.5).to(image.dtype)  # binary, as the model was trained
        masked_image = image * (1 - mask)  # the region to repaint becomes 0 (grey)
        posterior = self.encode_first_stage(masked_image)
        latents = self.get_first_stage_encoding(posterior.mode())  # (1, C, h, w)
        small_mask = F.interpolate(mask, size=latents.shape[-2:])  # nearest: stays binary, (1, 1, h, w)
        return torch.cat([small_mask, latents], dim=1)  # (1, 1 + C, h, w)

"""The KL-regularised autoencoder that maps images to Stable Diffusion's latent space and back.

Images are (B, 3, H, W) in [-1, 1]; latents are (B, embed_dim, H/8, W/8) for the SD v1 config
(the diffusion model additionally multiplies them by its `scale_factor`, 0.18215; that is not done
here). Batches handed to `training_step` hold images as (B, H, W, C), as CompVis' datasets produce them.

This is a plain `nn.Module`: the training hooks (`training_step`, `validation_step`,
`configure_optimizers`) have Lightning's names and meaning but nothing here imports Lightning.
The loss is built from `lossconfig`; `torch.nn.Identity` (what inference configs use) means
"no training loss", and training then fails with an explanation.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

# Where a full Stable Diffusion checkpoint keeps this model's weights.
FIRST_STAGE_PREFIX = "first_stage_model."


def _has_prefix(key: str, prefixes: Sequence[str]) -> bool:
    return any(key.startswith(prefix) for prefix in prefixes)


class AutoencoderKL(nn.Module):
    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], embed_dim: int,
                 ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 colorize_nlabels: Optional[int] = None, monitor: Optional[str] = None,
                 learning_rate: Optional[float] = None) -> None:
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true, since the encoder must output "
                             "both the mean and the log-variance of the posterior")
        if colorize_nlabels is not None:
            raise ValueError("colorize_nlabels (colouring segmentation maps for image logging) is not "
                             "supported; remove it from the config")
        self.image_key = image_key
        self.embed_dim = embed_dim
        self.monitor = monitor
        # Lightning-style: the training script may set this after construction.
        self.learning_rate = learning_rate

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        z_channels = ddconfig["z_channels"]
        # 1x1 convolutions between the encoder/decoder width and the latent width.
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        """Load weights from a standalone autoencoder checkpoint or from a full SD checkpoint.

        Keys starting with any of `ignore_keys` (relative to this model, i.e. after removing
        `first_stage_model.`) are not loaded. Every other weight of this model must be present;
        extra keys in the file (e.g. CompVis' `loss.discriminator.*`) are skipped with a warning.
        """
        from ldm.checkpoint import load_state_dict_file  # lazy: only needed when loading weights

        state_dict = load_state_dict_file(path)
        if any(key.startswith(FIRST_STAGE_PREFIX) for key in state_dict):
            state_dict = {key[len(FIRST_STAGE_PREFIX):]: value for key, value in state_dict.items()
                          if key.startswith(FIRST_STAGE_PREFIX)}
        state_dict = {key: value for key, value in state_dict.items() if not _has_prefix(key, ignore_keys)}
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [key for key in missing if not _has_prefix(key, ignore_keys)]
        if missing:
            raise RuntimeError(f"{path} lacks {len(missing)} autoencoder weights, e.g. {missing[:5]}; "
                               f"is it a Stable Diffusion v1 (or KL-f8 autoencoder) checkpoint? Add the prefixes "
                               f"to ignore_keys if these weights are meant to stay freshly initialised")
        if unexpected:
            warnings.warn(f"{path}: skipped {len(unexpected)} keys this model does not have, e.g. {unexpected[:5]}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """(B, in_channels, H, W) image -> posterior over (B, embed_dim, H/f, W/f) latents."""
        # Computed in the weights' dtype (float16 after `model.half()`), returned in the input's.
        moments = self.quant_conv(self.encoder(x.to(self.quant_conv.weight.dtype)))  # (B, 2 * embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments.to(x.dtype))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) latent -> (B, out_ch, h*f, w*f) image."""
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype))).to(z.dtype)

    def forward(self, input: torch.Tensor, sample_posterior: bool = True
                ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    # ---- training hooks -------------------------------------------------------------------------

    def get_input(self, batch: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
        """batch[key] as (B, H, W, C) (or (B, H, W)) -> contiguous float (B, C, H, W)."""
        x = batch[key]
        if x.ndim == 3:
            x = x[..., None]  # (B, H, W, 1)
        return x.permute(0, 3, 1, 2).contiguous().float()  # (B, C, H, W)

    def _compute_loss(self, batch: Mapping[str, torch.Tensor], split: str) -> tuple[torch.Tensor, dict]:
        if isinstance(self.loss, nn.Identity):
            raise RuntimeError("this AutoencoderKL was built with lossconfig torch.nn.Identity (the inference "
                               "setting) and has no training loss; set lossconfig.target to "
                               "ldm.modules.losses.vae.ReconstructionKLLoss to train it")
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)
        return self.loss(inputs, reconstructions, posterior, split=split)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._compute_loss(batch, split="train")
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict:
        """Returns the loss terms as a `val/...` metrics dict."""
        _, log = self._compute_loss(batch, split="val")
        return log

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.learning_rate is None:
            raise ValueError("learning_rate is not set; pass learning_rate=... to AutoencoderKL or assign "
                             "model.learning_rate before configure_optimizers()")
        params = [*self.encoder.parameters(), *self.decoder.parameters(),
                  *self.quant_conv.parameters(), *self.post_quant_conv.parameters()]
        # betas (0.5, 0.9): CompVis' autoencoder setting.
        return torch.optim.Adam(params, lr=self.learning_rate, betas=(0.5, 0.9))

"""Latent diffusion (Rombach et al. 2022) around the SD v1 UNet: the noise schedule, the model wrapper,
the first stage (autoencoder) and the text encoder, plus the training loss.

Layouts: images (B, 3, H, W) in [-1, 1]; latents (B, 4, H/8, W/8), multiplied by `scale_factor`
(0.18215 for SD v1) so they have roughly unit variance; timesteps (B,) integers in [0, 999]; text
conditioning (B, 77, 768). The model predicts the noise eps (`parameterization="eps"`).

These classes are plain `nn.Module`s with the Lightning hooks (`training_step`, `configure_optimizers`,
`on_train_batch_end`); `ldm/lightning.py` wraps them for a Lightning `Trainer`, so inference never
imports Lightning.
"""
from __future__ import annotations

import random
import warnings
from contextlib import contextmanager
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.step_context import StepContext
from ldm.util import default, instantiate_from_config

# The buffers `register_schedule` derives from the betas; all of them are in SD v1 checkpoints.
# The model always computes them from its config (see `DDPM._load_from_state_dict`): a float16 file
# holds them rounded (alpha_bar_0 = 0.99902 instead of 0.99915, 1 - alpha_bar off by 15% at t = 0).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def schedule_matches(stored: torch.Tensor, computed: torch.Tensor) -> bool:
    """Whether a checkpoint's schedule buffer equals the computed one up to the rounding of its dtype
    (float16 at least: a float32 file is held to the same tolerance as a float16 one)."""
    if stored.shape != computed.shape or stored.is_meta:
        return stored.shape == computed.shape
    dtypes = [torch.float16] + ([stored.dtype] if stored.is_floating_point() else [])
    rtol = max(torch.finfo(dtype).eps for dtype in dtypes)  # 2x the largest relative rounding error
    atol = max(torch.finfo(dtype).tiny for dtype in dtypes)  # values in the subnormal range
    return torch.allclose(stored.double().cpu(), computed.double().cpu(), rtol=rtol, atol=atol)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` and routes the conditioning to it."""

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: Optional[str]):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        if conditioning_key not in (None, "concat", "crossattn", "hybrid"):
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}; use crossattn, concat, hybrid or null")
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Optional[list] = None,
                c_crossattn: Optional[list] = None, step: Optional[StepContext] = None) -> torch.Tensor:
        if self.conditioning_key is None:
            return self.diffusion_model(x, t, step=step)
        if self.conditioning_key == "concat":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t, step=step)
        context = torch.cat(c_crossattn, dim=1)  # (B, 77, D)
        if self.conditioning_key == "hybrid":
            x = torch.cat([x, *c_concat], dim=1)
        return self.diffusion_model(x, t, context=context, step=step)


class DDPM(nn.Module):
    """Denoising diffusion (Ho et al. 2020) in the space of whatever `self.model` denoises."""

    def __init__(self, unet_config: Mapping[str, Any], timesteps: int = 1000, beta_schedule: str = "linear",
                 loss_type: str = "l2", ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (),
                 load_only_unet: bool = False, monitor: str = "val/loss", use_ema: bool = True,
                 first_stage_key: str = "image", image_size: int = 256, channels: int = 3,
                 log_every_t: int = 100, clip_denoised: bool = True, linear_start: float = 1e-4,
                 linear_end: float = 2e-2, cosine_s: float = 8e-3, given_betas: Optional[Sequence[float]] = None,
                 original_elbo_weight: float = 0.0, v_posterior: float = 0.0, l_simple_weight: float = 1.0,
                 conditioning_key: Optional[str] = None, parameterization: str = "eps",
                 scheduler_config: Optional[Mapping[str, Any]] = None, use_positional_encodings: bool = False,
                 learn_logvar: bool = False, logvar_init: float = 0.0):
        super().__init__()
        if parameterization != "eps":
            raise NotImplementedError(f"parameterization {parameterization!r}: only 'eps' (SD v1) is implemented")
        if original_elbo_weight != 0.0 or learn_logvar:
            raise NotImplementedError("the VLB loss terms (original_elbo_weight, learn_logvar) are not implemented")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"unknown loss_type {loss_type!r}; use l1 or l2")
        self.parameterization = parameterization
        self.loss_type = loss_type
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.log_every_t = log_every_t
        self.clip_denoised = clip_denoised
        self.v_posterior = v_posterior
        self.l_simple_weight = l_simple_weight
        self.monitor = monitor
        self.scheduler_config = scheduler_config
        self.learning_rate = 1e-4  # set from the config's base_learning_rate by the training script

        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)

        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def register_schedule(self, given_betas: Optional[Sequence[float]] = None, beta_schedule: str = "linear",
                          timesteps: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
                          cosine_s: float = 8e-3) -> None:
        """Compute the betas and every quantity derived from them (float64 maths, float32 buffers)."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = len(betas)
        self.linear_start, self.linear_end = linear_start, linear_end
        # Posterior q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7); v_posterior interpolates its variance.
        posterior_variance = ((1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + self.v_posterior * betas)
        values = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            # the variance is 0 at t=0, so the log is clipped to its value at t=1
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }
        device = self.betas.device if hasattr(self, "betas") and self.betas.device.type != "meta" else None
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, torch.tensor(values[name], dtype=torch.float32, device=device))

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "DDPM":
        # `model.half()` / `.to(torch.bfloat16)` casts every floating buffer; the schedule stays float32
        # (bfloat16 rounds alpha_bar_0 to 1, and the samplers then divide by sqrt(1 - alpha_bar) = 0).
        # It follows the device: the float32 values are moved, not re-widened from the rounded ones.
        schedule = {name: getattr(self, name) for name in SCHEDULE_BUFFERS}
        super()._apply(fn, *args, **kwargs)
        for name, before in schedule.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Every way of loading weights (the checkpoint loader, load_state_dict, Lightning) passes here.
        # The schedule is the config's, computed in float64: a file's copy is only compared with it, so a
        # float16 file cannot bring a rounded schedule, and one from another schedule is named.
        mismatched = []
        for name in SCHEDULE_BUFFERS:
            key = prefix + name
            if key in state_dict:
                computed = getattr(self, name)
                if not schedule_matches(state_dict[key], computed):
                    mismatched.append(name)
                state_dict[key] = computed
        if mismatched:
            warnings.warn(
                f"the checkpoint's noise schedule differs from the one this config computes beyond float16 rounding "
                f"({', '.join(mismatched)}); using the config's. If the checkpoint was trained with another schedule, "
                "set timesteps, linear_start and linear_end in the config to match it.", stacklevel=2)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @contextmanager
    def ema_scope(self):
        """Temporarily swap the EMA weights into the model (no-op without EMA)."""
        if not self.use_ema:
            yield
            return
        self.model_ema.store(self.model.parameters())
        self.model_ema.copy_to(self.model)
        try:
            yield
        finally:
            self.model_ema.restore(self.model.parameters())

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        """Load weights from `path` (the config's `ckpt_path`).

        The whole model from one file goes through the checkpoint loader, so missing UNet, VAE or
        text-encoder weights are an error, never a silent random init. With `ignore_keys` (keys left
        freshly initialised on purpose, e.g. to fine-tune a changed layer) or `only_model` (the file holds
        the `DiffusionWrapper` alone), the missing keys are expected, and are named rather than refused.
        """
        from ldm.checkpoint import load_state_dict_file, load_state_dict_into  # lazy: safe loading lives there
        state = load_state_dict_file(path)
        if not ignore_keys and not only_model:
            load_state_dict_into(self, state, source=str(path))
            return
        state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore_keys)}
        target = self.model if only_model else self
        missing, unexpected = target.load_state_dict(state, strict=False)
        print(f"Restored from {path}: {len(missing)} missing keys (left as initialised, e.g. {missing[:3]}) "
              f"and {len(unexpected)} unexpected keys")

    # ---- forward process and training -------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "l1":
            return (target - pred).abs().mean()
        return F.mse_loss(pred, target)

    def on_train_batch_end(self, *args, **kwargs) -> None:
        if self.use_ema:
            self.model_ema(self.model)

    def configure_optimizers(self):
        params = [p for p in self.trainable_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate)
        if self.scheduler_config is None:
            return optimizer
        schedule = instantiate_from_config(self.scheduler_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule.schedule)
        return [optimizer], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]

    def trainable_parameters(self):
        return list(self.model.parameters())


class LatentDiffusion(DDPM):
    """DDPM on the latents of a frozen autoencoder, conditioned on a (frozen) text encoder."""

    def __init__(self, first_stage_config: Mapping[str, Any], cond_stage_config: Any,
                 num_timesteps_cond: Optional[int] = None, cond_stage_key: str = "image",
                 cond_stage_trainable: bool = False, concat_mode: bool = True,
                 cond_stage_forward: Optional[str] = None, conditioning_key: Optional[str] = None,
                 scale_factor: float = 1.0, scale_by_std: bool = False, cond_dropout: float = 0.0,
                 *args, **kwargs):
        if scale_by_std:
            raise NotImplementedError("scale_by_std is not implemented; give scale_factor (0.18215 for SD v1)")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.cond_stage_key = cond_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_forward = cond_stage_forward
        self.scale_factor = scale_factor
        # Probability of replacing a caption by "" during training, so the model also learns the
        # unconditional prediction that classifier-free guidance needs.
        self.cond_dropout = cond_dropout

        self.first_stage_model = instantiate_from_config(first_stage_config).eval()
        for p in self.first_stage_model.parameters():
            p.requires_grad = False
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        if self.cond_stage_model is not None and not cond_stage_trainable:
            self.cond_stage_model = self.cond_stage_model.eval()
            for p in self.cond_stage_model.parameters():
                p.requires_grad = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def train(self, mode: bool = True):
        """Frozen stages stay in eval mode whatever the trainer asks (as in CompVis' disabled_train)."""
        super().train(mode)
        self.first_stage_model.eval()
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    # ---- the CompVis inference API ------------------------------------------------------------------
    def get_learned_conditioning(self, c: Any) -> torch.Tensor:
        """Text (a list of prompts) -> conditioning (B, 77, D)."""
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if callable(getattr(self.cond_stage_model, "encode", None)):
            c = self.cond_stage_model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        """Images (B, 3, H, W) in [-1, 1] -> the autoencoder's posterior over latents."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        """A posterior sample (or a tensor as is), scaled by `scale_factor`: (B, 4, H/8, W/8)."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type {type(encoder_posterior).__name__} is not supported")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                           force_not_quantize: bool = False) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False,
                    step: Optional[StepContext] = None) -> torch.Tensor:
        """The UNet's noise prediction eps(x_t, t, cond): (B, 4, h, w). `step`: the call's context for the
        attention layers (ldm/modules/step_context.py), built by the guidance helper."""
        if not isinstance(cond, dict):
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond if isinstance(cond, list) else [cond]}
        out = self.model(x_noisy, t, **cond, step=step)
        return out[0] if isinstance(out, tuple) else out

    # ---- training -----------------------------------------------------------------------------------
    def get_input(self, batch: Mapping[str, Any], key: str) -> torch.Tensor:
        """A batch's images are (B, H, W, 3) in [-1, 1] as in CompVis data loaders -> (B, 3, H, W)."""
        x = batch[key]
        if x.dim() == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def shared_step(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if "posterior" in batch:  # first-stage moments computed once (ldm/data/latents.py)
            posterior = DiagonalGaussianDistribution(batch["posterior"].to(self.device))
        else:
            posterior = self.encode_first_stage(self.get_input(batch, self.first_stage_key).to(self.device))
        z = self.get_first_stage_encoding(posterior).detach()  # (B, 4, h, w)
        captions = list(batch[self.cond_stage_key])
        if self.cond_dropout > 0:
            captions = ["" if random.random() < self.cond_dropout else text for text in captions]
        with torch.set_grad_enabled(self.cond_stage_trainable and torch.is_grad_enabled()):
            c = self.get_learned_conditioning(captions)
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=self.device)
        return self.p_losses(z, c, t)

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The simple loss of Ho et al.: || eps - eps_theta(x_t, t, c) ||."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start, t, noise)
        return self.l_simple_weight * self.get_loss(self.apply_model(x_noisy, t, cond), noise)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch)

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch)

    def trainable_parameters(self):
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            params += list(self.cond_stage_model.parameters())
        return params


def __getattr__(name: str) -> Any:
    # The published inpainting config names `ldm.models.diffusion.ddpm.LatentInpaintDiffusion`; the class
    # lives in its own module (imported lazily, since it builds on this one).
    if name == "LatentInpaintDiffusion":
        from ldm.models.diffusion.inpainting import LatentInpaintDiffusion
        return LatentInpaintDiffusion
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Specification of the KL autoencoder: checkpoint layout, parity with diffusers, posterior maths, training."""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from tests.conftest import REFERENCE_KEYS

PREFIX = "first_stage_model."

SD_V1_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                      ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
# 32 channels: the smallest width that GroupNorm's 32 groups allow.
TINY_DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
                     ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
IDENTITY_LOSS = {"target": "torch.nn.Identity"}
TRAINING_LOSS = {"target": "ldm.modules.losses.vae.ReconstructionKLLoss", "params": {"kl_weight": 1e-6}}


def _tiny_autoencoder(lossconfig=IDENTITY_LOSS, **overrides) -> AutoencoderKL:
    """A tiny autoencoder whose every parameter (including GroupNorm's ones and zeros) is perturbed."""
    torch.manual_seed(0)
    model = AutoencoderKL(ddconfig={**TINY_DDCONFIG, **overrides}, lossconfig=lossconfig, embed_dim=4)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _reference_first_stage_entries() -> dict[str, tuple[tuple[int, ...], str]]:
    entries = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        if not line.startswith(PREFIX):
            continue
        key, shape, dtype = line.split("\t")
        entries[key[len(PREFIX):]] = (tuple(int(n) for n in shape.strip("()").split(",") if n.strip()), dtype)
    return entries


# ---- checkpoint layout -------------------------------------------------------------------------

def test_sd_v1_autoencoder_has_exactly_the_checkpoint_keys_shapes_and_dtypes():
    with torch.device("meta"):
        model = AutoencoderKL(ddconfig=SD_V1_DDCONFIG, lossconfig=IDENTITY_LOSS, embed_dim=4)
    ours = {key: (tuple(t.shape), str(t.dtype)) for key, t in model.state_dict().items()}
    reference = _reference_first_stage_entries()
    assert len(reference) == 248
    assert sorted(set(ours) - set(reference)) == []
    assert sorted(set(reference) - set(ours)) == []
    mismatched = {key: (ours[key], reference[key]) for key in reference if ours[key] != reference[key]}
    assert mismatched == {}


def test_attention_at_listed_resolutions_adds_attn_blocks_and_keeps_shapes():
    model = _tiny_autoencoder(attn_resolutions=[16])
    keys = model.state_dict().keys()
    # Level 1 runs at 16x16 in both encoder and decoder (1 and 2 resnet blocks there).
    assert {"encoder.down.1.attn.0.q.weight", "decoder.up.1.attn.1.proj_out.weight"} <= set(keys)
    assert not any(key.startswith(("encoder.down.0.attn", "decoder.up.0.attn")) for key in keys)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        reconstruction, posterior = model(x, sample_posterior=False)
    assert posterior.mean.shape == (1, 4, 16, 16)
    assert reconstruction.shape == x.shape


def test_unknown_ddconfig_option_is_rejected_with_its_name():
    with pytest.raises(TypeError, match="attn_typo"):
        AutoencoderKL(ddconfig={**TINY_DDCONFIG, "attn_typo": "vanilla"}, lossconfig=IDENTITY_LOSS, embed_dim=4)


# ---- parity with diffusers ---------------------------------------------------------------------

def test_encode_and_decode_match_diffusers_autoencoder_kl():
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = _tiny_autoencoder().eval()
    config = dict(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32, layers_per_block=1,
                  block_out_channels=[32, 64], sample_size=32,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    theirs = DiffusersAutoencoderKL(**config).eval()
    ldm_checkpoint = {PREFIX + key: value for key, value in ours.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(ldm_checkpoint, config)
    missing, unexpected = theirs.load_state_dict(converted, strict=True)
    assert not missing and not unexpected

    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        posterior = ours.encode(x)
        reference_posterior = theirs.encode(x).latent_dist
        decoded = ours.decode(z)
        reference_decoded = theirs.decode(z).sample
    assert _relative_error(posterior.mean, reference_posterior.mean) < 1e-5
    assert _relative_error(posterior.std, reference_posterior.std) < 1e-5
    assert _relative_error(decoded, reference_decoded) < 1e-5


# ---- the posterior -----------------------------------------------------------------------------

def _random_posterior(seed: int = 0) -> DiagonalGaussianDistribution:
    generator = torch.Generator().manual_seed(seed)
    return DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3, generator=generator))


def test_mode_is_the_mean_half_of_the_parameters():
    parameters = torch.randn(2, 8, 3, 3)
    posterior = DiagonalGaussianDistribution(parameters)
    assert torch.equal(posterior.mode(), parameters[:, :4])
    assert torch.allclose(posterior.var, parameters[:, 4:].exp())


def test_log_variance_is_clamped_to_minus_30_and_20():
    parameters = torch.zeros(1, 2, 1, 1)
    parameters[0, 1] = 100.0
    assert DiagonalGaussianDistribution(parameters).logvar.item() == 20.0
    parameters[0, 1] = -100.0
    assert DiagonalGaussianDistribution(parameters).logvar.item() == -30.0


def test_kl_of_a_standard_normal_to_the_prior_is_zero():
    posterior = DiagonalGaussianDistribution(torch.zeros(3, 8, 4, 4))
    assert torch.allclose(posterior.kl(), torch.zeros(3), atol=1e-7)


def test_kl_and_nll_match_torch_distributions():
    posterior, other = _random_posterior(0), _random_posterior(1)
    as_normal = torch.distributions.Normal(posterior.mean, posterior.std)
    other_normal = torch.distributions.Normal(other.mean, other.std)
    prior = torch.distributions.Normal(torch.zeros_like(posterior.mean), torch.ones_like(posterior.mean))
    x = torch.randn_like(posterior.mean)
    expected_prior_kl = torch.distributions.kl_divergence(as_normal, prior).sum(dim=(1, 2, 3))
    expected_pair_kl = torch.distributions.kl_divergence(as_normal, other_normal).sum(dim=(1, 2, 3))
    assert torch.allclose(posterior.kl(), expected_prior_kl, rtol=1e-5)
    assert torch.allclose(posterior.kl(other), expected_pair_kl, rtol=1e-5)
    assert torch.allclose(posterior.nll(x), -as_normal.log_prob(x).sum(dim=(1, 2, 3)), rtol=1e-5)


def test_sample_is_reproducible_with_a_generator_and_has_the_posterior_statistics():
    mean_and_logvar = torch.tensor([1.5, math.log(0.25)]).view(1, 2, 1, 1).repeat(1, 1, 64, 64)  # (1, 2, 64, 64)
    posterior = DiagonalGaussianDistribution(mean_and_logvar)
    first = posterior.sample(torch.Generator().manual_seed(7))
    again = posterior.sample(torch.Generator().manual_seed(7))
    other = posterior.sample(torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # 4096 draws of N(1.5, 0.5^2): the standard error of the mean is 0.5 / 64.
    assert abs(first.mean().item() - 1.5) < 0.05
    assert abs(first.std().item() - 0.5) < 0.05


def test_deterministic_posterior_samples_its_mean_and_has_zero_kl():
    parameters = torch.randn(2, 8, 3, 3)
    posterior = DiagonalGaussianDistribution(parameters, deterministic=True)
    assert torch.equal(posterior.sample(), parameters[:, :4])
    assert torch.equal(posterior.kl(), torch.zeros(2))


# ---- training ----------------------------------------------------------------------------------

def _image_batch(batch_size: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {"image": torch.rand(batch_size, 32, 32, 3, generator=generator) * 2 - 1}  # (B, H, W, C) like CompVis


def test_get_input_turns_channels_last_batches_into_float_nchw():
    model = _tiny_autoencoder()
    images = torch.arange(2 * 4 * 5 * 3, dtype=torch.float64).view(2, 4, 5, 3)
    x = model.get_input({"image": images}, "image")
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x[1, 2], images[1, :, :, 2].float())


def test_training_step_gives_a_finite_scalar_loss_with_gradients_everywhere():
    model = _tiny_autoencoder(TRAINING_LOSS)
    loss = model.training_step(_image_batch(), batch_idx=0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name in ("encoder.conv_in.weight", "encoder.mid.attn_1.q.weight", "quant_conv.weight",
                 "post_quant_conv.weight", "decoder.mid.attn_1.v.weight", "decoder.conv_out.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_a_few_optimizer_steps_reduce_the_loss_on_a_fixed_batch():
    model = _tiny_autoencoder(TRAINING_LOSS)
    model.learning_rate = 1e-3
    optimizer = model.configure_optimizers()
    assert optimizer.defaults["betas"] == (0.5, 0.9)
    batch = _image_batch()
    losses = []
    for step in range(4):
        torch.manual_seed(step)
        loss = model.training_step(batch, batch_idx=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_validation_step_reports_loss_terms_without_gradients():
    model = _tiny_autoencoder(TRAINING_LOSS)
    log = model.validation_step(_image_batch(), batch_idx=0)
    assert set(log) == {"val/total_loss", "val/rec_loss", "val/kl_loss"}
    assert all(torch.isfinite(v) and not v.requires_grad for v in log.values())
    assert torch.allclose(log["val/total_loss"], log["val/rec_loss"] + 1e-6 * log["val/kl_loss"])


def test_identity_lossconfig_refuses_to_train_and_names_the_fix():
    model = _tiny_autoencoder(IDENTITY_LOSS)
    with pytest.raises(RuntimeError, match="ReconstructionKLLoss"):
        model.training_step(_image_batch(), batch_idx=0)


def test_configure_optimizers_without_learning_rate_explains_what_to_set():
    with pytest.raises(ValueError, match="learning_rate"):
        _tiny_autoencoder(TRAINING_LOSS).configure_optimizers()


# ---- loading weights ---------------------------------------------------------------------------

def _install_fake_checkpoint_loader(monkeypatch, state_dict: dict) -> None:
    """Stand in for ldm.checkpoint (owned elsewhere) so these tests only exercise our key handling."""
    fake = types.ModuleType("ldm.checkpoint")
    fake.load_state_dict_file = lambda path: dict(state_dict)
    monkeypatch.setitem(sys.modules, "ldm.checkpoint", fake)


def test_ckpt_path_loads_the_first_stage_of_a_full_checkpoint(monkeypatch):
    source = _tiny_autoencoder()
    full_checkpoint = {PREFIX + key: value for key, value in source.state_dict().items()}
    full_checkpoint["model.diffusion_model.out.0.weight"] = torch.ones(3)
    _install_fake_checkpoint_loader(monkeypatch, full_checkpoint)
    torch.manual_seed(123)
    loaded = AutoencoderKL(TINY_DDCONFIG, IDENTITY_LOSS, embed_dim=4, ckpt_path="sd.ckpt")
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_ckpt_path_keeps_ignored_keys_freshly_initialised_and_warns_about_extras(monkeypatch):
    source = _tiny_autoencoder()
    checkpoint = dict(source.state_dict())
    checkpoint["loss.discriminator.main.0.weight"] = torch.ones(1)
    _install_fake_checkpoint_loader(monkeypatch, checkpoint)
    with pytest.warns(UserWarning, match="loss.discriminator"):
        loaded = AutoencoderKL(TINY_DDCONFIG, IDENTITY_LOSS, embed_dim=4, ckpt_path="vae.ckpt",
                               ignore_keys=["decoder.conv_out"])
    assert torch.equal(loaded.encoder.conv_in.weight, source.encoder.conv_in.weight)
    assert not torch.equal(loaded.decoder.conv_out.weight, source.decoder.conv_out.weight)


def test_ckpt_path_missing_weights_is_an_error(monkeypatch):
    checkpoint = dict(_tiny_autoencoder().state_dict())
    del checkpoint["decoder.conv_out.bias"]
    _install_fake_checkpoint_loader(monkeypatch, checkpoint)
    with pytest.raises(RuntimeError, match="decoder.conv_out.bias"):
        AutoencoderKL(TINY_DDCONFIG, IDENTITY_LOSS, embed_dim=4, ckpt_path="vae.ckpt")

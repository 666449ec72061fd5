"""The UNet: checkpoint keys of SD v1, layer tags, and parity with diffusers' UNet2DConditionModel."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import SD_CONFIG, load_reference_keys, randomize_, shape_string
from diffusers_models import diffusers_unet_from_ours
from ldm.util import instantiate_from_config

PREFIX = "model.diffusion_model."


def test_full_size_unet_has_exactly_the_checkpoint_keys_and_shapes():
    config = OmegaConf.load(SD_CONFIG)
    with torch.device("meta"):
        unet = instantiate_from_config(config.model.params.unet_config)
    ours = {PREFIX + k: v for k, v in unet.state_dict().items()}
    reference = {k: v for k, v in load_reference_keys().items() if k.startswith(PREFIX)}
    assert set(ours) == set(reference)
    for key, (shape, dtype) in reference.items():
        assert (shape_string(ours[key]), str(ours[key].dtype)) == (shape, dtype), key


def test_full_size_unet_tags_sixteen_self_attention_layers_by_group():
    config = OmegaConf.load(SD_CONFIG)
    with torch.device("meta"):
        unet = instantiate_from_config(config.model.params.unet_config)
    tags = [layer.tag for layer in unet.self_attention_layers()]
    assert tags == ["down.64"] * 2 + ["down.32"] * 2 + ["down.16"] * 2 + ["mid.8"] + \
        ["up.16"] * 3 + ["up.32"] * 3 + ["up.64"] * 3
    # cross-attention layers are never tagged, so they can never be selected for sharing
    assert all(block.attn2.tag is None for block in unet.modules() if hasattr(block, "attn2"))


@pytest.mark.parametrize("batch", [1, 3])
def test_unet_eps_matches_diffusers_on_a_tiny_random_config(tiny_unet, tiny_config, batch):
    theirs = diffusers_unet_from_ours(tiny_unet, tiny_config)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 16, 16, generator=generator)  # (B, C, H, W)
    t = torch.tensor([999, 500, 1][:batch])
    context = torch.randn(batch, 77, 32, generator=generator)
    with torch.no_grad():
        ours = tiny_unet(x, t, context=context)
        reference = theirs(x, t, encoder_hidden_states=context).sample
    relative_error = (ours - reference).norm() / reference.norm()
    assert relative_error < 1e-5


def test_spatial_transformer_hands_on_a_plain_contiguous_feature_map():
    # A permuted (channels-last) tensor leaving a transformer would spread that memory layout to every
    # later convolution, which measured about 1.3x slower on CPU (benchmarks/unet_speed.py).
    from ldm.modules.attention import SpatialTransformer
    for use_linear in (False, True):
        layer = SpatialTransformer(16, n_heads=2, d_head=8, context_dim=8, norm_num_groups=4,
                                   use_linear=use_linear).eval()
        randomize_(layer)
        with torch.no_grad():
            out = layer(torch.randn(2, 16, 4, 4), context=torch.randn(2, 3, 8))
        assert out.is_contiguous()

"""LoRA files merged as weight deltas: parity with diffusers' `load_lora_weights` on tiny random weights (kohya
/ A1111 and diffusers formats, UNet and text encoder, linear and 1x1 / 3x3 convolution layers), the names of a
full-size SD v1 UNet, and the files that must be refused in one line without changing the model."""
from __future__ import annotations

import copy
import math

import pytest
import safetensors.torch
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointMismatchError, UnsafeCheckpointError, load_model_from_config, parameters_on_meta
from ldm.checkpoint.errors import OtherBaseModelError
from ldm.checkpoint.files import checkpoint_fingerprint
from ldm.checkpoint.lora import apply_loras, merge_lora, read_lora
from ldm.checkpoint.lora_keys import dotted_path, parameter_mapper, parse_key
from ldm.errors import InvalidValue
from ldm.util import instantiate_from_config
from tests.conftest import SD_CONFIG, TINY_CONFIG
from tests.diffusers_models import tiny_diffusers_pipeline

RANK = 4
CLIP_TEXT_LEVEL = "text_model."  # published files name it; transformers 5 modules do not


@pytest.fixture(scope="module")
def pipeline():
    return tiny_diffusers_pipeline(seed=0)


@pytest.fixture(scope="module")
def base_model(pipeline, tmp_path_factory):
    """Our tiny model holding the pipeline's weights (through the diffusers-folder loader)."""
    folder = tmp_path_factory.mktemp("pipeline") / "tiny-sd"
    pipeline.save_pretrained(str(folder))
    return load_model_from_config(TINY_CONFIG, folder, verbose=False)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)  # merging changes the weights


@pytest.fixture
def with_lora(pipeline):
    """The pipeline, its LoRA adapters removed again after the test."""
    yield pipeline
    pipeline.unload_lora_weights()


def lora_pairs(module: nn.Module, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{diffusers / transformers module path: (down, up)} for every linear and convolution layer of `module`."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Linear):
            down = torch.randn(RANK, layer.in_features, generator=generator) / math.sqrt(layer.in_features)
            up = torch.randn(layer.out_features, RANK, generator=generator) / math.sqrt(RANK)
        elif isinstance(layer, nn.Conv2d):  # conv_in, resnets' 3x3 and 1x1 convolutions, proj_in/out, samplers
            fan_in = layer.in_channels * math.prod(layer.kernel_size)
            down = torch.randn(RANK, layer.in_channels, *layer.kernel_size, generator=generator) / math.sqrt(fan_in)
            up = torch.randn(layer.out_channels, RANK, 1, 1, generator=generator) / math.sqrt(RANK)
        else:
            continue
        pairs[name] = (down, up)
    return pairs


def text_path(name: str) -> str:
    return name if name.startswith(CLIP_TEXT_LEVEL) else CLIP_TEXT_LEVEL + name


def kohya_file(path, pipeline, seed: int, unet_alpha: float = 2.0, text_alpha: float = 3.0):
    tensors = {}
    for prefix, module, alpha in (("lora_unet_", pipeline.unet, unet_alpha), ("lora_te_", pipeline.text_encoder,
                                                                              text_alpha)):
        for name, (down, up) in lora_pairs(module, seed).items():
            name = text_path(name) if prefix == "lora_te_" else name
            key = prefix + name.replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(alpha, dtype=torch.float16)}
    safetensors.torch.save_file(tensors, str(path))
    return path


def diffusers_file(path, pipeline, seed: int, unet_alpha: float = 8.0, text_alpha: float = 2.0):
    """A LoRA written by diffusers' own `save_lora_weights` (PEFT names, its PEFT config in the header)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    layers, metadata = {}, {}
    for component, module, alpha in (("unet", pipeline.unet, unet_alpha),
                                     ("text_encoder", pipeline.text_encoder, text_alpha)):
        pairs = lora_pairs(module, seed)
        layers[component] = {f"{name}.{part}.weight": tensor for name, (down, up) in pairs.items()
                             for part, tensor in (("lora_A", down), ("lora_B", up))}
        metadata[component] = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=list(pairs)).to_dict()
    StableDiffusionPipeline.save_lora_weights(
        str(path.parent), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=metadata["unet"], text_encoder_lora_adapter_metadata=metadata["text_encoder"],
        weight_name=path.name)
    return path


def down_up_file(path, pipeline, seed: int):
    """The diffusers names of its earlier LoRA layers (`lora.down` / `lora.up`), UNet only, no alpha, as .bin."""
    tensors = {f"unet.{name}.lora.{part}.weight": tensor for name, (down, up) in lora_pairs(pipeline.unet, seed).items()
               for part, tensor in (("down", down), ("up", up))}
    torch.save(tensors, path)
    return path


def inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 700]),
            torch.randn(2, 77, 32, generator=generator))


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


def assert_matches_diffusers(model, pipeline, text_encoder: bool = True):
    """Same outputs up to float32 round-off: diffusers adds s * B(A x) to W x, we compute (W + s BA) x (relative
    errors up to 2e-5 measured; a wrong alpha, scale or layer gives errors of order 1)."""
    x, t, context = inputs()
    ids = model.cond_stage_model.tokenize(["a red chair", "a lamp"])
    with torch.no_grad():
        ours, theirs = model.model.diffusion_model(x, t, context=context), pipeline.unet(x, t, context).sample
        assert relative_error(ours, theirs) < 1e-4
        if text_encoder:
            ours, theirs = model.cond_stage_model.transformer(ids), pipeline.text_encoder(ids).last_hidden_state
            assert relative_error(ours, theirs) < 1e-4


def assert_changed(model, base_model):
    """The LoRA moved both networks' outputs: the parity is not that of two untouched models."""
    x, t, context = inputs()
    with torch.no_grad():
        before, after = base_model.model.diffusion_model(x, t, context), model.model.diffusion_model(x, t, context)
    assert relative_error(after, before) > 0.05


@pytest.mark.parametrize("writer", [kohya_file, diffusers_file], ids=["kohya", "diffusers-peft"])
def test_a_lora_merged_at_a_scale_matches_diffusers_load_lora_weights(tmp_path, model, base_model, with_lora, writer):
    path = writer(tmp_path / "style.safetensors", with_lora, seed=2)
    layers = len(lora_pairs(with_lora.unet, 0)) + len(lora_pairs(with_lora.text_encoder, 0))
    (provenance,) = apply_loras(model, [(path, 0.7)])
    with_lora.load_lora_weights(str(path), adapter_name="style")
    with_lora.set_adapters(["style"], adapter_weights=[0.7])
    assert_matches_diffusers(model, with_lora)
    assert_changed(model, base_model)
    assert provenance.layers == layers  # every linear and convolution layer of both networks was adapted


def test_the_earlier_diffusers_names_in_a_bin_file_match_diffusers(tmp_path, model, with_lora):
    path = down_up_file(tmp_path / "pytorch_lora_weights.bin", with_lora, seed=3)
    apply_loras(model, [(path, 1.0)])
    with_lora.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="old")
    assert_matches_diffusers(model, with_lora, text_encoder=False)


# peft warns that a second adapter joins the first: that is what this test asks of diffusers.
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_two_loras_add_up_with_their_own_scales_as_diffusers_adapters(tmp_path, model, with_lora):
    first = kohya_file(tmp_path / "a.safetensors", with_lora, seed=4)
    second = diffusers_file(tmp_path / "b.safetensors", with_lora, seed=5)
    provenance = apply_loras(model, [(first, 0.5), (second, -0.8)])
    with_lora.load_lora_weights(str(first), adapter_name="a")
    with_lora.load_lora_weights(str(second), adapter_name="b")
    with_lora.set_adapters(["a", "b"], adapter_weights=[0.5, -0.8])
    assert_matches_diffusers(model, with_lora)
    assert [p.as_metadata() for p in provenance] == [
        {"file": "a.safetensors", "fingerprint": checkpoint_fingerprint(first), "scale": 0.5, "format": "kohya",
         "layers": provenance[0].layers},
        {"file": "b.safetensors", "fingerprint": checkpoint_fingerprint(second), "scale": -0.8, "format": "diffusers",
         "layers": provenance[1].layers}]


def test_scale_zero_leaves_every_weight_bit_identical(tmp_path, model, base_model, pipeline):
    apply_loras(model, [(kohya_file(tmp_path / "a.safetensors", pipeline, seed=6), 0.0)])
    ours, base = model.state_dict(), base_model.state_dict()
    assert all(torch.equal(ours[key], base[key]) for key in base)


def test_kohya_names_of_every_sd_v1_layer_reach_the_full_size_models_weights_with_their_shapes():
    # Public facts: a kohya SD v1 LoRA names diffusers' SD v1 UNet and transformers' CLIP ViT-L/14 modules.
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        theirs = UNet2DConditionModel(cross_attention_dim=768)  # its defaults are SD v1's otherwise
    with parameters_on_meta():
        ours = instantiate_from_config(OmegaConf.load(SD_CONFIG).model)
    shapes = {name: p.shape for name, p in ours.named_parameters()}
    to_parameter = parameter_mapper(layers_per_block=2, up_blocks_with_attention={1, 2, 3})
    layers = [(name, layer) for name, layer in theirs.named_modules() if isinstance(layer, (nn.Linear, nn.Conv2d))]
    for name, layer in layers:
        key = parse_key(f"lora_unet_{name.replace('.', '_')}.lora_down.weight", "kohya")
        assert key.module == name
        target = to_parameter(key)
        assert shapes[target] == layer.weight.shape, name
    assert len(layers) == 282  # every UNet layer with a weight matrix: attention, MLP, convolutions, embeddings
    text = parse_key("lora_te_text_model_encoder_layers_11_self_attn_out_proj.lora_up.weight", "kohya")
    assert to_parameter(text) == "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.out_proj.weight"
    assert shapes[to_parameter(text)] == (768, 768)


def test_kohya_module_names_are_read_part_by_part():
    assert dotted_path("up_blocks_1_upsamplers_0_conv") == "up_blocks.1.upsamplers.0.conv"
    assert dotted_path("down_blocks_0_resnets_1_time_emb_proj") == "down_blocks.0.resnets.1.time_emb_proj"
    assert dotted_path("mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0") == \
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
    assert dotted_path("time_embedding_linear_2") == "time_embedding.linear_2"


def test_a_lora_is_read_and_checked_against_a_model_whose_weights_are_not_loaded(tmp_path, pipeline):
    path = kohya_file(tmp_path / "a.safetensors", pipeline, seed=7)
    with parameters_on_meta():
        skeleton = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)
    lora = read_lora(path, skeleton)  # a front end checks LoRA files before the base model's weights load
    assert lora.format == "kohya" and len(lora.layers) == 293
    with pytest.raises(CheckpointMismatchError, match="has no value yet"):
        merge_lora(skeleton, lora, 1.0)


def save(path, tensors):
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def refused(model, base_model, files, error=CheckpointMismatchError, match=None) -> str:
    """Apply `files`, expect `error`, and check that no weight changed (a good file before a bad one included)."""
    with pytest.raises(error, match=match) as raised:
        apply_loras(model, files)
    ours, base = model.state_dict(), base_model.state_dict()
    assert all(torch.equal(ours[key], base[key]) for key in base)
    message = str(raised.value)
    assert "\n" not in message
    return message


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def test_unknown_names_incomplete_pairs_and_misfits_are_refused_naming_them(tmp_path, model, base_model, pipeline):
    good = kohya_file(tmp_path / "good.safetensors", pipeline, seed=8)
    bad = save(tmp_path / "bad.safetensors", {
        f"{Q}.lora_down.weight": torch.zeros(4, 32), f"{Q}.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4),  # LyCORIS LoHa: not LoRA
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(4, 32, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_down.weight": torch.zeros(4, 32, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_up.weight": torch.zeros(32, 5, 1, 1),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 33),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4)})
    message = refused(model, base_model, [(good, 1.0), (bad, 1.0)])
    for part in ("2 names this model has no layer for (lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a, "
                 "UNet down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q)",
                 "1 layers without their pair (UNet down_blocks.0.resnets.0.conv1 (no up))",
                 "UNet down_blocks.0.resnets.0.conv2 (ranks differ: down 4, up 5)",
                 "text encoder text_model.encoder.layers.0.mlp.fc1 (changes (64, 33), the weight is (64, 32))"):
        assert part in message


def test_loras_for_other_bases_are_refused_naming_the_base(tmp_path, model, base_model):
    sd2 = save(tmp_path / "sd2.safetensors", {f"{K2}.lora_down.weight": torch.zeros(4, 1024),
                                             f"{K2}.lora_up.weight": torch.zeros(32, 4)})
    message = refused(model, base_model, [(sd2, 1.0)], OtherBaseModelError)
    assert "is a LoRA for SD 2.x (its cross-attention reads 1024-wide text features, this model's 32-wide)" in message
    sdxl = save(tmp_path / "sdxl.safetensors", {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                                torch.zeros(4, 768)})
    refused(model, base_model, [(sdxl, 1.0)], OtherBaseModelError, match="is a LoRA for SDXL")


def test_missing_unsafe_foreign_and_non_finite_files_and_bad_scales_are_refused(tmp_path, model, base_model):
    refused(model, base_model, [(tmp_path / "absent.safetensors", 1.0)], FileNotFoundError)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({f"{Q}.lora_down.weight": torch.zeros(4, 32), "payload": print}, unsafe)
    refused(model, base_model, [(unsafe, 1.0)], UnsafeCheckpointError, match="builtins.print")
    foreign = save(tmp_path / "not-a-lora.safetensors", {"weight": torch.zeros(2)})
    refused(model, base_model, [(foreign, 1.0)], match="holds no LoRA tensors this program knows")
    nan = save(tmp_path / "nan.safetensors", {f"{Q}.lora_down.weight": torch.full((4, 32), math.nan),
                                             f"{Q}.lora_up.weight": torch.zeros(32, 4)})
    refused(model, base_model, [(nan, 1.0)], match="non-finite numbers")
    good = save(tmp_path / "good.safetensors", {f"{Q}.lora_down.weight": torch.ones(4, 32),
                                               f"{Q}.lora_up.weight": torch.ones(32, 4)})
    refused(model, base_model, [(good, math.inf)], InvalidValue, match="lora_scale=inf")

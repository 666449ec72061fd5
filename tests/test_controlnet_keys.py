"""ControlNet files: the published key list, and files the loader must refuse in one line before using them."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointMismatchError, CheckpointReadError, UnsafeCheckpointError
from ldm.checkpoint.controlnet import DEFAULT_CONTROLNET_CONFIG, controlnet_fingerprint, load_controlnet
from ldm.checkpoint.errors import OtherBaseModelError
from ldm.util import instantiate_from_config
from tests.conftest import ROOT, randomize_, shape_string
from tests.diffusers_models import CONTROL_PREFIX, tiny_diffusers_controlnet

KEY_LIST = ROOT / "tests" / "data" / "controlnet-v11-sd15-keys.tsv"
TINY_CONTROLNET = ROOT / "configs" / "tiny" / "tiny-controlnet.yaml"


def published_keys() -> dict[str, tuple[str, str]]:
    rows = [line.split("\t") for line in KEY_LIST.read_text().splitlines() if line and not line.startswith("#")]
    return {key: (shape, dtype) for key, shape, dtype in rows}


def tiny_controlnet_state_dict(seed: int = 0, **params) -> dict[str, torch.Tensor]:
    config = OmegaConf.load(TINY_CONTROLNET)
    config.model.params.update(params)
    torch.manual_seed(seed)
    model = randomize_(instantiate_from_config(config.model), seed)
    return {CONTROL_PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}


def test_sd15_controlnet_has_exactly_the_published_keys_shapes_and_dtypes_in_their_order():
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(DEFAULT_CONTROLNET_CONFIG).model)
    ours = {CONTROL_PREFIX + k: (shape_string(v), str(v.dtype)) for k, v in model.state_dict().items()}
    assert list(ours.items()) == list(published_keys().items())


def test_diffusers_own_converter_maps_the_published_keys_onto_an_sd15_controlnetmodel():
    # An independent check of the key list: diffusers reads these names into its ControlNetModel, none left over.
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    checkpoint = {key: torch.empty(eval(shape), device="meta") for key, (shape, _) in published_keys().items()}
    with torch.device("meta"):
        theirs = ControlNetModel(cross_attention_dim=768)  # its defaults are SD v1.5's otherwise
    converted = convert_controlnet_checkpoint(checkpoint, dict(theirs.config))
    reference = theirs.state_dict()
    assert set(converted) == set(reference)
    assert all(converted[key].shape == reference[key].shape for key in reference)


def test_controlnet_tensors_stay_memory_mapped_views_of_the_file(tmp_path):
    path = tmp_path / "control.safetensors"
    safetensors.torch.save_file(tiny_controlnet_state_dict(), str(path))
    model = load_controlnet(path, TINY_CONTROLNET)
    assert not model.input_hint_block[0].weight.untyped_storage().resizable()
    assert not any(p.is_meta for p in model.parameters())


def test_a_v10_file_holding_the_whole_controlldm_loads_its_controlnet(tmp_path):
    state_dict = tiny_controlnet_state_dict()
    whole = {**state_dict, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
             "betas": torch.zeros(1000)}
    path = tmp_path / "control_sd15_canny.safetensors"
    safetensors.torch.save_file(whole, str(path))
    model = load_controlnet(path, TINY_CONTROLNET)
    assert torch.equal(model.zero_convs[3][0].weight, state_dict[CONTROL_PREFIX + "zero_convs.3.0.weight"])


def test_a_controlnet_for_sd2_is_refused_naming_its_base(tmp_path):
    path = tmp_path / "control_sd21.safetensors"
    safetensors.torch.save_file(tiny_controlnet_state_dict(context_dim=1024), str(path))
    with pytest.raises(OtherBaseModelError) as error:
        load_controlnet(path, TINY_CONTROLNET)
    message = str(error.value)
    assert "is a ControlNet for SD 2.x (its cross-attention reads 1024-wide text features, this model's 32-wide)" \
           in message and "\n" not in message


def test_a_diffusers_folder_for_sdxl_is_refused_from_its_config(tmp_path):
    folder = tmp_path / "controlnet-sdxl"
    tiny_diffusers_controlnet().save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 2048}))
    with pytest.raises(OtherBaseModelError, match="is a ControlNet for SDXL"):
        load_controlnet(folder, TINY_CONTROLNET)
    (folder / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    with pytest.raises(CheckpointMismatchError, match="is a ControlNet for SDXL"):
        load_controlnet(folder, TINY_CONTROLNET)


def test_a_diffusers_folder_of_another_model_is_refused(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointMismatchError, match="holds a UNet2DConditionModel, not a ControlNetModel"):
        load_controlnet(folder, TINY_CONTROLNET)


def test_unknown_missing_and_misshapen_weights_are_refused_in_one_line_naming_them(tmp_path):
    state_dict = tiny_controlnet_state_dict()
    state_dict[CONTROL_PREFIX + "label_emb.0.0.weight"] = torch.zeros(4, 4)
    del state_dict[CONTROL_PREFIX + "zero_convs.5.0.bias"]
    state_dict[CONTROL_PREFIX + "input_hint_block.0.weight"] = torch.zeros(16, 4, 3, 3)
    path = tmp_path / "odd.safetensors"
    safetensors.torch.save_file(state_dict, str(path))
    with pytest.raises(CheckpointMismatchError) as error:
        load_controlnet(path, TINY_CONTROLNET)
    message = str(error.value)
    assert "\n" not in message
    for part in ("1 tensors a ControlNet of this config does not have (label_emb.0.0.weight)",
                 "weights missing (zero_convs.5.0.bias)",
                 "input_hint_block.0.weight (16, 4, 3, 3) vs (16, 3, 3, 3)"):
        assert part in message


def test_an_sd_checkpoint_given_as_a_controlnet_is_refused(tmp_path, tiny_ckpt):
    with pytest.raises(CheckpointMismatchError, match="holds a Stable Diffusion model .* and no ControlNet"):
        load_controlnet(tiny_ckpt, TINY_CONTROLNET)


def test_missing_damaged_and_unsafe_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_controlnet(tmp_path / "absent.pth", TINY_CONTROLNET)
    truncated = tmp_path / "truncated.safetensors"
    safetensors.torch.save_file(tiny_controlnet_state_dict(), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(CheckpointReadError):
        load_controlnet(truncated, TINY_CONTROLNET)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"control_model.x": torch.zeros(1), "payload": print}, unsafe)  # a pickled global: never run
    with pytest.raises(UnsafeCheckpointError, match="builtins.print"):
        load_controlnet(unsafe, TINY_CONTROLNET)
    empty_folder = tmp_path / "folder"
    empty_folder.mkdir()
    with pytest.raises(CheckpointReadError, match="folder without config.json"):
        load_controlnet(empty_folder, TINY_CONTROLNET)


def test_fingerprints_name_files_and_folders_by_content(tmp_path):
    file = tmp_path / "a.safetensors"
    safetensors.torch.save_file(tiny_controlnet_state_dict(), str(file))
    copy = tmp_path / "b.safetensors"
    copy.write_bytes(file.read_bytes())
    assert controlnet_fingerprint(file) == controlnet_fingerprint(copy)
    folder = tmp_path / "controlnet"
    tiny_diffusers_controlnet().save_pretrained(str(folder))
    assert controlnet_fingerprint(folder).startswith("folder-sha256:")
    assert controlnet_fingerprint(folder) != controlnet_fingerprint(file)

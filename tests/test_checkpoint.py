"""Specification of checkpoint loading (ldm/checkpoint/): safe, memory-mapped, and strict about missing weights.

Files are written here with torch.save / safetensors from tiny random models (configs/tiny); the reference
for "what the file holds" is the in-memory dict that was saved, and the reference model is the naive path:
a normally built model + load_state_dict.
"""
from __future__ import annotations

import builtins
import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from ldm.checkpoint import (CheckpointMismatchError, CheckpointReadError, LightningCallbackStandIn,
                            UnsafeCheckpointError, ema_key, load_checkpoint, load_model_from_config,
                            load_state_dict_file, load_state_dict_into, parameters_on_meta, remap_checkpoint_keys)
from ldm.checkpoint.testing import save_lightning_checkpoint
from ldm.util import instantiate_from_config
from tests.conftest import randomize_

CLIP = "cond_stage_model.transformer."


# ----------------------------------------------------------------------------- helpers and fixtures


@pytest.fixture(scope="module")
def tiny_state_dict(tiny_config) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_(instantiate_from_config(tiny_config.model))
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


def save_lightning_ckpt(path: Path, state_dict: dict[str, torch.Tensor], **torch_save_kwargs) -> Path:
    save_lightning_checkpoint(path, state_dict, global_step=470000, **torch_save_kwargs)
    return path


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map `path` (Linux /proc/self/maps)."""
    target = os.path.realpath(path)
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def naive_model(tiny_config, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The reference path: build normally, copy the weights in with load_state_dict."""
    model = instantiate_from_config(tiny_config.model)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- reading files safely


def test_lightning_ckpt_with_callback_class_and_numpy_metadata_loads_without_lightning(tmp_path, monkeypatch,
                                                                                        tiny_state_dict):
    path = save_lightning_ckpt(tmp_path / "model.ckpt", tiny_state_dict)
    # The file needs more than torch's default allow-list, exactly as the real SD v1 files do.
    assert {"pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint", "numpy.dtype"} <= set(
        torch.serialization.get_unsafe_globals_in_checkpoint(path))
    for name in [name for name in sys.modules if name.split(".")[0] == "pytorch_lightning"]:
        monkeypatch.delitem(sys.modules, name)  # in case another test imported it
    checkpoint = load_checkpoint(path)
    assert checkpoint.global_step == 470000
    assert checkpoint.metadata["epoch"] == 6 and isinstance(checkpoint.metadata["epoch"], np.integer)
    (callback_class, state), = checkpoint.metadata["callbacks"].items()
    assert callback_class is LightningCallbackStandIn
    assert state["best_model_score"] == 0.25 and state["dtype"] == np.dtype("float32")
    assert checkpoint.state_dict.keys() == tiny_state_dict.keys()
    assert all(torch.equal(checkpoint.state_dict[k], v) for k, v in tiny_state_dict.items())
    # pytorch_lightning is installed here, so importing it (and so running its code) would show up.
    assert not [name for name in sys.modules if name.split(".")[0] == "pytorch_lightning"]


class RunsCode:
    """Unpickling this object calls `function(argument)`: the classic pickle payload."""

    def __init__(self, function, argument: str):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


def malicious_payloads(marker: Path) -> dict[str, RunsCode]:
    return {
        "system": RunsCode(os.system, f"touch '{marker}'"),
        "eval": RunsCode(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
    }


@pytest.mark.parametrize("scan_first", [True, False], ids=["static-scan", "unpickler-only"])
@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", ["system", "eval"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch, payload, legacy_format, scan_first):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    bomb = malicious_payloads(marker)[payload]
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": bomb}, path,
               _use_new_zipfile_serialization=not legacy_format)
    if not scan_first:  # the second line of defence must hold on its own
        monkeypatch.setattr("ldm.checkpoint.files.find_unsafe_globals", lambda path: None)

    with pytest.raises(UnsafeCheckpointError) as caught:
        load_state_dict_file(path)
    message = str(caught.value)
    assert payload in message and str(path) in message
    assert "NOT loaded" in message and "only weights" in message and ".safetensors" in message
    assert not marker.exists()

    # Control: the payload is live, so the absence of the marker above means something.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_every_unknown_global_is_named(tmp_path):
    path = tmp_path / "evil.ckpt"
    marker = tmp_path / "pwned"
    torch.save(list(malicious_payloads(marker).values()), path)
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.eval.*system"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_safetensors_round_trip_with_metadata(tmp_path, tiny_state_dict):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tiny_state_dict, path, metadata={"format": "pt", "source": "test"})
    checkpoint = load_checkpoint(path)
    assert checkpoint.metadata == {"format": "pt", "source": "test"}
    assert checkpoint.state_dict.keys() == tiny_state_dict.keys()
    for key, tensor in tiny_state_dict.items():
        assert checkpoint.state_dict[key].dtype == tensor.dtype and torch.equal(checkpoint.state_dict[key], tensor)


def test_flat_pt_file_is_its_own_state_dict(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"a.weight": torch.arange(6.0).view(2, 3)}, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.metadata == {} and torch.equal(checkpoint.state_dict["a.weight"], torch.arange(6.0).view(2, 3))


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_tensors_are_memory_mapped_views_of_the_file_and_writes_do_not_reach_it(tmp_path, tiny_state_dict, suffix):
    path = tmp_path / f"model{suffix}"
    if suffix == ".ckpt":
        save_lightning_ckpt(path, tiny_state_dict)
    else:
        safetensors.torch.save_file(tiny_state_dict, path)
    digest = sha256(path)
    state_dict = load_state_dict_file(path)
    ranges = file_mappings(path)
    assert ranges, "the file is not mapped into this process"
    for key, tensor in state_dict.items():
        first, last = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
        assert any(start <= first and last <= end for start, end in ranges), f"{key} is not inside the mapping"
    weight = state_dict["model.diffusion_model.input_blocks.0.0.weight"]
    weight.add_(1.0)  # private mapping: copy-on-write, the file must stay as it was
    assert sha256(path) == digest


def test_legacy_non_zip_ckpt_still_loads(tmp_path, tiny_state_dict):
    path = save_lightning_ckpt(tmp_path / "old.ckpt", tiny_state_dict, _use_new_zipfile_serialization=False)
    state_dict = load_state_dict_file(path)
    assert all(torch.equal(state_dict[k], v) for k, v in tiny_state_dict.items())


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file_gives_a_clear_error(tmp_path, tiny_state_dict, suffix):
    path = tmp_path / f"model{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": tiny_state_dict}, path)
    else:
        safetensors.torch.save_file(tiny_state_dict, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match=r"truncated or corrupt.*download it again"):
        load_state_dict_file(path)


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict_file(tmp_path / "absent.ckpt")
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(IsADirectoryError, match=r"is a directory.*model\.ckpt"):
        load_state_dict_file(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"1234")
    with pytest.raises(CheckpointReadError, match=r"neither a safetensors file nor a torch.save checkpoint"):
        load_state_dict_file(tmp_path / "model.bin")
    with pytest.raises(CheckpointReadError, match="truncated or corrupt"):
        load_state_dict_file(tmp_path / "model.ckpt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointReadError, match="truncated or corrupt"):
        load_state_dict_file(tmp_path / "notes.pt")


@pytest.mark.parametrize("writer, misleading_name", [("safetensors", "model.ckpt"), ("torch", "model.safetensors"),
                                                    ("torch", "weights")])
def test_format_is_told_by_content_not_by_the_file_name(tmp_path, tiny_state_dict, writer, misleading_name):
    path = tmp_path / misleading_name
    if writer == "safetensors":
        safetensors.torch.save_file(tiny_state_dict, path)
    else:
        torch.save({"state_dict": tiny_state_dict}, path)
    state_dict = load_state_dict_file(path)
    assert all(torch.equal(state_dict[k], v) for k, v in tiny_state_dict.items())


def test_checkpoint_format_names_the_three_formats(tmp_path, tiny_state_dict):
    from ldm.checkpoint import checkpoint_format
    small = {"w": torch.ones(2)}
    safetensors.torch.save_file(small, tmp_path / "a")
    torch.save(small, tmp_path / "b")
    torch.save(small, tmp_path / "c", _use_new_zipfile_serialization=False)
    assert [checkpoint_format(tmp_path / n) for n in "abc"] == ["safetensors", "torch-zip", "torch-legacy"]


def test_fingerprint_follows_the_content_not_the_name_or_dates(tmp_path, tiny_state_dict):
    from ldm.checkpoint import checkpoint_fingerprint
    safetensors.torch.save_file(tiny_state_dict, tmp_path / "a.safetensors")
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "copy.ckpt").write_bytes(data)
    os.utime(tmp_path / "copy.ckpt", (0, 0))
    changed = bytearray(data)
    changed[-1] ^= 1  # one bit of the last tensor
    (tmp_path / "changed.safetensors").write_bytes(bytes(changed))
    first = checkpoint_fingerprint(tmp_path / "a.safetensors")
    assert first.startswith("sample-sha256:") and len(first) == len("sample-sha256:") + 16
    assert checkpoint_fingerprint(tmp_path / "copy.ckpt") == first
    assert checkpoint_fingerprint(tmp_path / "changed.safetensors") != first


# ----------------------------------------------------------------------------- key conventions


def test_clip_keys_without_text_model_level_are_mapped():
    tensor, other = torch.ones(3), torch.zeros(1)
    remapped = remap_checkpoint_keys({
        CLIP + "embeddings.token_embedding.weight": tensor,
        CLIP + "encoder.layers.0.mlp.fc1.bias": tensor,
        CLIP + "final_layer_norm.weight": tensor,
        CLIP + "text_model.embeddings.position_ids": other,
        "model.diffusion_model.out.2.bias": other,
    })
    assert set(remapped) == {
        CLIP + "text_model.embeddings.token_embedding.weight",
        CLIP + "text_model.encoder.layers.0.mlp.fc1.bias",
        CLIP + "text_model.final_layer_norm.weight",
        CLIP + "text_model.embeddings.position_ids",
        "model.diffusion_model.out.2.bias",
    }
    assert remapped[CLIP + "text_model.final_layer_norm.weight"] is tensor  # renamed, not copied
    with pytest.raises(CheckpointMismatchError, match="both"):
        remap_checkpoint_keys({CLIP + "final_layer_norm.weight": tensor,
                               CLIP + "text_model.final_layer_norm.weight": tensor})


def test_model_loads_from_a_file_with_recent_transformers_clip_names(tmp_path, tiny_config, tiny_state_dict):
    renamed = {k.replace(CLIP + "text_model.", CLIP): v for k, v in tiny_state_dict.items()}
    assert renamed.keys() != tiny_state_dict.keys()
    safetensors.torch.save_file(renamed, tmp_path / "converted.safetensors")
    model = load_model_from_config(tiny_config, tmp_path / "converted.safetensors", verbose=False)
    assert all(torch.equal(v, tiny_state_dict[k]) for k, v in model.state_dict().items())


def test_ema_key_drops_the_dots_of_the_wrapper_parameter_name():
    assert ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


def with_ema(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ema = {ema_key(k): v + 1.0 for k, v in state_dict.items() if k.startswith("model.diffusion_model.")}
    return state_dict | ema | {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}


def test_use_ema_puts_the_ema_weights_into_the_unet(tmp_path, tiny_config, tiny_state_dict, capsys):
    path = save_lightning_ckpt(tmp_path / "full-ema.ckpt", with_ema(tiny_state_dict))
    model = load_model_from_config(tiny_config, path, use_ema=True)
    for key, value in model.state_dict().items():
        expected = tiny_state_dict[key] + 1.0 if key.startswith("model.diffusion_model.") else tiny_state_dict[key]
        assert torch.equal(value, expected), key
    assert "EMA" in capsys.readouterr().out

    plain = load_model_from_config(tiny_config, path, use_ema=False)
    assert all(torch.equal(v, tiny_state_dict[k]) for k, v in plain.state_dict().items())
    assert "EMA weights not used" in capsys.readouterr().out


def test_a_model_with_its_own_ema_gets_both_the_ema_copies_and_separate_unet_weights(tmp_path, tiny_config,
                                                                                   tiny_state_dict):
    config = OmegaConf.merge(tiny_config, {"model": {"params": {"use_ema": True}}})
    path = save_lightning_ckpt(tmp_path / "full-ema.ckpt", with_ema(tiny_state_dict))
    model = load_model_from_config(config, path, use_ema=True, verbose=False)
    unet_weight = model.model.diffusion_model.input_blocks[0][0].weight
    ema_copy = getattr(model.model_ema, "diffusion_modelinput_blocks00weight")
    assert torch.equal(unet_weight, ema_copy)
    assert torch.equal(ema_copy, tiny_state_dict["model.diffusion_model.input_blocks.0.0.weight"] + 1.0)
    with torch.no_grad():
        unet_weight.add_(1.0)  # a training step must not move the EMA copy
    assert not torch.equal(unet_weight, ema_copy)

    pruned = {k: v for k, v in tiny_state_dict.items()}
    safetensors.torch.save_file(pruned, tmp_path / "pruned.safetensors")
    with pytest.raises(CheckpointMismatchError, match="use_ema: false"):
        load_model_from_config(config, tmp_path / "pruned.safetensors", verbose=False)


def test_use_ema_on_a_file_without_ema_weights_is_an_error(tmp_path, tiny_config, tiny_state_dict):
    state = tiny_state_dict | {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    path = save_lightning_ckpt(tmp_path / "pruned.ckpt", state)
    with pytest.raises(CheckpointMismatchError, match="has no EMA weights"):
        load_model_from_config(tiny_config, path, use_ema=True)


# ----------------------------------------------------------------------------- loading into the model


def test_loaded_model_holds_the_files_tensors_as_parameters_and_nothing_on_meta(tmp_path, tiny_config,
                                                                               tiny_state_dict):
    path = save_lightning_ckpt(tmp_path / "model.ckpt", tiny_state_dict)
    model = load_model_from_config(tiny_config, path, verbose=False)
    reference = instantiate_from_config(tiny_config.model)

    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.state_dict().keys() == tiny_state_dict.keys()
    assert all(torch.equal(v, tiny_state_dict[k]) for k, v in model.state_dict().items())
    expected_grad = {name: p.requires_grad for name, p in reference.named_parameters()}
    for name, param in model.named_parameters():
        assert type(param) is nn.Parameter and param.requires_grad == expected_grad[name], name
    assert not model.training and not model.first_stage_model.training
    # Zero copy: the model's weights are the file's mapped pages.
    ranges = file_mappings(path)
    for param in model.parameters():
        assert any(start <= param.data_ptr() < end for start, end in ranges)


def test_loaded_model_computes_what_the_naive_path_computes_and_can_train(tmp_path, tiny_config, tiny_state_dict):
    safetensors.torch.save_file(tiny_state_dict, tmp_path / "model.safetensors")
    model = load_model_from_config(tiny_config, tmp_path / "model.safetensors", verbose=False)
    reference = naive_model(tiny_config, tiny_state_dict)
    torch.manual_seed(2)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(model.cond_stage_model(["a cat"]), reference.cond_stage_model(["a cat"]))
        expected = reference.apply_model(x, t, context)

    out = model.apply_model(x, t, context)
    # Same weights (bit for bit, see the test above), but a safetensors file maps them at 8-byte rather than
    # 64-byte aligned addresses, and on some CPUs (measured on an AMD EPYC) the vectorised kernels then
    # round differently: about 2e-6 on outputs of size 2. Wrong or missing weights differ by O(1).
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    weight = model.model.diffusion_model.input_blocks[0][0].weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    with torch.no_grad():
        weight.sub_(weight.grad)  # an optimizer step on a mapped tensor must work


def test_missing_network_weights_are_an_error_naming_them(tmp_path, tiny_config, tiny_state_dict):
    components = {"UNet": "model.diffusion_model.", "VAE": "first_stage_model.",
                  "text encoder": CLIP + "text_model."}
    dropped = {name: sorted(k for k in tiny_state_dict if k.startswith(prefix) and k.endswith(".weight"))[:7]
               for name, prefix in components.items()}
    gone = {key for keys in dropped.values() for key in keys}
    safetensors.torch.save_file({k: v for k, v in tiny_state_dict.items() if k not in gone},
                                tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointMismatchError) as caught:
        load_model_from_config(tiny_config, tmp_path / "partial.safetensors", verbose=False)
    message = str(caught.value)
    for name, keys in dropped.items():
        assert f"{name}: 7 of" in message and keys[0] in message, name
    assert message.count("+2 more") == 3


def test_missing_derivable_buffers_keep_the_values_the_model_computes(tmp_path, tiny_config, tiny_state_dict, capsys):
    derivable = ["betas", "alphas_cumprod", "posterior_mean_coef2", CLIP + "text_model.embeddings.position_ids"]
    state = {k: v for k, v in tiny_state_dict.items() if k not in derivable}
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    model = load_model_from_config(tiny_config, tmp_path / "model.safetensors")
    computed = instantiate_from_config(tiny_config.model).state_dict()
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], computed[k]) for k in derivable)
    assert "4 missing" in capsys.readouterr().out


def test_unexpected_keys_are_reported_but_ema_bookkeeping_is_not(tmp_path, tiny_config, tiny_state_dict, capsys):
    state = tiny_state_dict | {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(3),
                               "logvar": torch.zeros(1000)}
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    load_model_from_config(tiny_config, tmp_path / "model.safetensors", verbose=True)
    out = capsys.readouterr().out
    assert "1 unexpected" in out and "logvar" in out and "model_ema" not in out


def test_fp16_file_keeps_its_dtype_and_integer_buffers_stay_integer(tmp_path, tiny_config, tiny_state_dict):
    half = {k: v.half() for k, v in tiny_state_dict.items()}  # a blanket cast, position_ids included
    safetensors.torch.save_file(half, tmp_path / "model-fp16.safetensors")
    model = load_model_from_config(tiny_config, tmp_path / "model-fp16.safetensors", verbose=False)
    assert model.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.float16
    positions = model.cond_stage_model.transformer.text_model.embeddings.position_ids
    assert positions.dtype == torch.int64
    assert torch.equal(positions, tiny_state_dict[CLIP + "text_model.embeddings.position_ids"])


def test_wrong_shapes_are_an_error(tmp_path, tiny_config, tiny_state_dict):
    key = "model.diffusion_model.out.2.weight"
    state = tiny_state_dict | {key: torch.zeros(8, 32, 3, 3)}
    safetensors.torch.save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"other shapes.*out\.2\.weight: file \(8, 32, 3, 3\)"):
        load_model_from_config(tiny_config, tmp_path / "other.safetensors", verbose=False)


class WithExtraParameter(nn.Module):
    """A stand-in whose parameter outside the three networks is neither in the file nor derivable."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = nn.Linear(2, 2)
        self.learned_scale = nn.Parameter(torch.ones(3))


def test_a_tensor_left_on_meta_is_an_error_naming_it():
    with parameters_on_meta():
        model = WithExtraParameter()
    state = {"model.diffusion_model.weight": torch.ones(2, 2), "model.diffusion_model.bias": torch.zeros(2)}
    with pytest.raises(CheckpointMismatchError, match="learned_scale"):
        load_state_dict_into(model, state, verbose=False)


def test_a_materialised_model_gets_copies_in_its_own_dtype():
    model = WithExtraParameter()
    state = {"model.diffusion_model.weight": torch.ones(2, 2, dtype=torch.float16),
             "model.diffusion_model.bias": torch.zeros(2, dtype=torch.float16)}
    report = load_state_dict_into(model, state, verbose=False)
    assert report.missing == ["learned_scale"]
    weight = model.model.diffusion_model.weight
    assert weight.dtype == torch.float32 and torch.equal(weight, torch.ones(2, 2))
    assert weight.data_ptr() != state["model.diffusion_model.weight"].data_ptr()


def test_config_ckpt_path_refuses_a_file_missing_network_weights(tmp_path, tiny_config, tiny_state_dict):
    # CompVis configs may name the weights in `ckpt_path`; that route must not init missing weights randomly.
    partial = {k: v for k, v in tiny_state_dict.items() if not k.startswith("model.diffusion_model.out.")}
    safetensors.torch.save_file(partial, tmp_path / "partial.safetensors")
    config = OmegaConf.to_container(tiny_config.model, resolve=True)
    config["params"]["ckpt_path"] = str(tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointMismatchError, match="model.diffusion_model.out"):
        instantiate_from_config(config)
    safetensors.torch.save_file(tiny_state_dict, tmp_path / "full.safetensors")
    config["params"]["ckpt_path"] = str(tmp_path / "full.safetensors")
    loaded = instantiate_from_config(config)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, tiny_state_dict[key]), key

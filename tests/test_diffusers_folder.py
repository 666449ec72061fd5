"""diffusers-format pipeline folders load into this project's modules: same weights, same outputs as diffusers."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from ldm.cli import run_cli
from tests.conftest import TINY_CONFIG, load_script
from tests.diffusers_models import save_tiny_pipeline
from ldm.checkpoint import CheckpointMismatchError, CheckpointReadError, checkpoint_fingerprint, load_model_from_config


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline") / "tiny-sd"
    pipeline = save_tiny_pipeline(folder)
    return folder, pipeline


@pytest.fixture(scope="module")
def loaded(saved_pipeline):
    folder, _ = saved_pipeline
    return load_model_from_config(TINY_CONFIG, folder, verbose=False)


def copy_of(folder, destination):
    """A copy of the saved pipeline folder that a test may damage."""
    shutil.copytree(folder, destination)
    return destination


def test_unet_from_a_folder_predicts_what_diffusers_predicts(saved_pipeline, loaded):
    _, pipeline = saved_pipeline
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ours = loaded.model.diffusion_model(x, t, context=context)
        theirs = pipeline.unet(x, t, encoder_hidden_states=context).sample
    assert ours.abs().mean() > 0.1  # random weights: a real, non-trivial output
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_vae_from_a_folder_encodes_and_decodes_as_diffusers(saved_pipeline, loaded):
    _, pipeline = saved_pipeline
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ours_mean = loaded.first_stage_model.encode(image).mode()
        theirs_mean = pipeline.vae.encode(image).latent_dist.mode()
        torch.testing.assert_close(ours_mean, theirs_mean, rtol=1e-4, atol=1e-4)
        ours = loaded.first_stage_model.decode(theirs_mean)
        theirs = pipeline.vae.decode(theirs_mean).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_text_encoder_from_a_folder_gives_diffusers_hidden_states(saved_pipeline, loaded):
    _, pipeline = saved_pipeline
    ids = loaded.cond_stage_model.tokenize(["a red chair", "a lamp"])
    with torch.no_grad():
        ours = loaded.cond_stage_model.transformer(ids)
        theirs = pipeline.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_folder_tensors_stay_memory_mapped_views_of_the_files(saved_pipeline):
    from ldm.checkpoint import load_checkpoint
    folder, _ = saved_pipeline
    state_dict = load_checkpoint(folder).state_dict
    weight = state_dict["model.diffusion_model.input_blocks.0.0.weight"]
    # A tensor read through safetensors' memory map does not own a resizable copy of the bytes.
    assert not weight.untyped_storage().resizable()


def test_bin_weights_load_through_the_safe_loader_like_safetensors(saved_pipeline, tmp_path, loaded):
    folder, _ = saved_pipeline
    copy = copy_of(folder, tmp_path / "bin-pipeline")
    from safetensors.torch import load_file
    for sub, stem, bin_name in (("unet", "diffusion_pytorch_model", "diffusion_pytorch_model"),
                                ("text_encoder", "model", "pytorch_model")):
        file = copy / sub / f"{stem}.safetensors"
        torch.save(load_file(str(file)), copy / sub / f"{bin_name}.bin")
        file.unlink()
    from_bin = load_model_from_config(TINY_CONFIG, copy, verbose=False)
    for key, tensor in loaded.state_dict().items():
        torch.testing.assert_close(from_bin.state_dict()[key], tensor, rtol=0, atol=0)


def test_a_bin_file_holding_code_is_refused(saved_pipeline, tmp_path):
    from ldm.checkpoint import UnsafeCheckpointError
    folder, _ = saved_pipeline
    copy = copy_of(folder, tmp_path / "evil-pipeline")
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"weight": torch.zeros(1), "payload": print}, copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="builtins.print"):
        load_model_from_config(TINY_CONFIG, copy, verbose=False)


def test_folder_fingerprint_names_its_weights_not_its_path(saved_pipeline, tmp_path):
    folder, _ = saved_pipeline
    copy = copy_of(folder, tmp_path / "renamed")
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(folder)
    assert checkpoint_fingerprint(folder).startswith("folder-sha256:")


def test_a_folder_without_an_sd_component_is_refused_by_name(saved_pipeline, tmp_path):
    folder, _ = saved_pipeline
    copy = copy_of(folder, tmp_path / "no-vae")
    index = json.loads((copy / "model_index.json").read_text())
    del index["vae"]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointMismatchError, match="without the SD v1 components \\(vae\\)"):
        load_model_from_config(TINY_CONFIG, copy, verbose=False)


def test_a_folder_missing_its_weight_file_says_what_it_looked_for(saved_pipeline, tmp_path):
    folder, _ = saved_pipeline
    copy = copy_of(folder, tmp_path / "no-weights")
    (copy / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointReadError, match="no text encoder weights in text_encoder/ .*model.safetensors"):
        load_model_from_config(TINY_CONFIG, copy, verbose=False)


def test_an_sdxl_like_vae_scale_is_refused(saved_pipeline, tmp_path):
    folder, _ = saved_pipeline
    copy = copy_of(folder, tmp_path / "xl-vae")
    config = json.loads((copy / "vae" / "config.json").read_text())
    (copy / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.13025}))
    with pytest.raises(CheckpointMismatchError, match="scaling_factor 0.13025"):
        load_model_from_config(TINY_CONFIG, copy, verbose=False)


def run_txt2img(capsys, *args: str) -> tuple[int, str]:
    """scripts/txt2img.py in-process through run_cli, as its __main__ runs it: (exit status, stderr)."""
    status = 0
    try:
        run_cli(load_script("txt2img").main, ["--config", str(TINY_CONFIG), "--device", "cpu", *args])
    except SystemExit as exited:
        status = exited.code
    return status, capsys.readouterr().err


def test_txt2img_reports_a_non_pipeline_folder_in_one_line_with_status_2(saved_pipeline, tmp_path, capsys):
    folder, _ = saved_pipeline
    copy = copy_of(folder, tmp_path / "broken")
    (copy / "model_index.json").write_text("{not json")
    outdir = tmp_path / "out"
    status, stderr = run_txt2img(capsys, "--ckpt", str(copy), "--prompt", "a chair", "--outdir", str(outdir))
    assert status == 2
    assert stderr.strip().count("\n") == 0
    assert stderr.startswith("error: ") and "model_index.json" in stderr
    assert not outdir.exists()


def test_txt2img_generates_from_a_pipeline_folder(saved_pipeline, tmp_path, capsys):
    folder, _ = saved_pipeline
    outdir = tmp_path / "out"
    status, stderr = run_txt2img(capsys, "--ckpt", str(folder), "--prompt", "a chair", "--ddim_steps", "2",
                                 "--n_samples", "2", "--n_iter", "1", "--outdir", str(outdir), "--skip_grid")
    assert status == 0, stderr
    assert len(list((outdir / "samples").glob("*.png"))) == 2

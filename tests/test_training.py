"""Training through Lightning with the project's own code: a few steps of each stage on tiny data.

Lightning is a required dependency of these tests (the `test` extra installs it): without it they fail.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import pytorch_lightning  # noqa: F401  (required: a missing Lightning must fail these tests, not skip them)
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import ROOT, TINY_CONFIG
from ldm.cli import run_cli
from ldm.lightning import seed_process


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_DATA = {"data": {"target": "ldm.data.synthetic.SyntheticObjects", "batch_size": 2,
                      "params": {"length": 8, "seed": 0, "size": 64}},
             "trainer": {"seed": 0, "max_steps": 3}}


def test_latent_diffusion_trains_a_few_steps_and_saves_loadable_weights(tmp_path):
    train = load_train_script()
    config = OmegaConf.merge(OmegaConf.load(TINY_CONFIG), TINY_DATA,
                             {"model": {"params": {"use_ema": True, "cond_dropout": 0.5, "first_stage_key": "image"}}})
    out = tmp_path / "tiny.safetensors"
    train.seed_everything(0)  # the seed train() uses: `initial` holds the run's starting weights
    initial = {key: value.clone() for key, value in train.build(config)[0].state_dict().items()}
    model = train.train(config, out, progress=False)
    saved = load_file(out)
    assert not any(key.startswith("model_ema.") for key in saved)  # EMA weights replace the raw ones
    unet_key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(saved[unet_key], initial[unet_key])  # the UNet learned
    frozen = [key for key in initial if key.startswith(("first_stage_model.", "cond_stage_model."))]
    assert frozen and all(torch.equal(saved[key], initial[key]) for key in frozen)  # the frozen stages did not
    assert all(torch.equal(model.state_dict()[key], initial[key]) for key in frozen)

    from ldm.checkpoint import load_model_from_config
    reloaded = load_model_from_config(OmegaConf.load(TINY_CONFIG), out, verbose=False)
    assert torch.equal(reloaded.state_dict()[unet_key], saved[unet_key])


def test_training_refuses_to_overwrite_existing_weights(tmp_path, capsys):
    train = load_train_script()
    out = tmp_path / "weights.safetensors"
    out.write_bytes(b"earlier result")
    with pytest.raises(Exception, match="exists; pass --force"):
        train.main(["--config", str(TINY_CONFIG), "--out", str(out)])
    assert out.read_bytes() == b"earlier result"


def test_autoencoder_trains_and_lowers_its_loss(tmp_path):
    train = load_train_script()
    config = OmegaConf.merge(OmegaConf.load(ROOT / "configs" / "demo" / "autoencoder.yaml"), TINY_DATA,
                             {"trainer": {"max_steps": 4}})
    train.seed_everything(0)
    model, loader = train.build(config)
    batch = next(iter(loader))
    with torch.no_grad():
        initial = float(model.training_step(batch, 0))
    trained = train.train(config, tmp_path / "ae.safetensors", progress=False)
    with torch.no_grad():
        assert float(trained.training_step(batch, 0)) < initial


def test_encoded_dataset_caches_the_first_stage_posterior(tiny_config):
    from ldm.data.latents import EncodedDataset
    from ldm.data.synthetic import SyntheticObjects
    from ldm.util import instantiate_from_config
    torch.manual_seed(0)
    first_stage = instantiate_from_config(tiny_config.model.params.first_stage_config).eval()
    images = SyntheticObjects(length=5, seed=3, size=64)
    encoded = EncodedDataset(images, first_stage, length=3, batch_size=2, progress=False)
    assert len(encoded) == 3
    item = encoded[2]
    assert item["txt"] == images[2]["txt"] and item["attributes"] == images[2]["attributes"]
    with torch.no_grad():
        posterior = first_stage.encode(images[2]["image"].permute(2, 0, 1)[None])
    torch.testing.assert_close(item["posterior"], torch.cat([posterior.mean, posterior.logvar], dim=1)[0],
                               rtol=1e-4, atol=2e-4)  # batch 2 vs 1: float32 rounding


def test_two_processes_train_with_ddp_and_only_rank_0_writes_the_file(tmp_path):
    """A real 2-process CPU run (gloo), in a subprocess: Lightning's "ddp" launcher runs the command again."""
    train = load_train_script()
    config = OmegaConf.merge(OmegaConf.load(TINY_CONFIG), TINY_DATA, {"trainer": {"max_steps": 2},
                             "model": {"params": {"first_stage_key": "image"}}})
    config_path = tmp_path / "tiny-train.yaml"
    OmegaConf.save(config, config_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = run_dir / "tiny.safetensors"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(config_path),
                             "--out", str(out), "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu"],
                            cwd=run_dir, capture_output=True, text=True, timeout=1800,  # a hang guard only
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1
    assert [path.name for path in run_dir.iterdir()] == ["tiny.safetensors"]  # no partial file, no logs

    from safetensors import safe_open
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["processes"] == "2"
    saved = load_file(out)
    train.seed_everything(0)
    initial = train.build(config)[0].state_dict()
    unet_key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(saved[unet_key], initial[unet_key])  # the UNet learned
    frozen = [key for key in initial if key.startswith("first_stage_model.")]
    assert frozen and all(torch.equal(saved[key], initial[key]) for key in frozen)
    from ldm.checkpoint import load_model_from_config
    reloaded = load_model_from_config(OmegaConf.load(TINY_CONFIG), out, verbose=False)
    assert torch.equal(reloaded.state_dict()[unet_key], saved[unet_key])


def test_each_process_draws_from_its_own_reproducible_stream():
    draws = {}
    for rank in (0, 1, 0):
        seed_process(7, rank)
        draws.setdefault(rank, []).append(torch.rand(4))
    torch.testing.assert_close(draws[0][0], draws[0][1], rtol=0, atol=0)
    assert not torch.equal(draws[0][0], draws[1][0])


@pytest.mark.parametrize("flags, named", [(["--devices", "0"], "--devices (trainer.devices) 0:"),
                                          (["--strategy", "ddp_spawn"], "--strategy (trainer.strategy) ddp_spawn:"),
                                          (["--accelerator", "tpu"], "--accelerator (trainer.accelerator) tpu:")])
def test_bad_process_settings_are_refused_before_training(flags, named, tmp_path, capsys):
    train = load_train_script()
    out = tmp_path / "weights.safetensors"
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, ["--config", str(TINY_CONFIG), "--out", str(out), *flags], flags=train.TRAIN_FLAGS)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {named}")
    assert not out.exists()

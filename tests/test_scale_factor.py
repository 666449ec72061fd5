"""scripts/measure_scale_factor.py: the number a diffusion config's scale_factor is set from."""
import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT, load_script

measure = load_script("measure_scale_factor")


def test_the_demo_configs_scale_factor_is_what_the_script_measures_on_the_shipped_autoencoder(capsys):
    # configs/demo/demo-inference.yaml says its value is 1 / std over 64 training images of seed 99
    config = OmegaConf.load(ROOT / "configs/demo/demo-inference.yaml")
    measured = measure.main(["--autoencoder", "configs/demo/autoencoder.yaml",
                             "--weights", "models/demo/autoencoder.safetensors",
                             "--data", "configs/demo/autoencoder.yaml", "--seed", "99", "--count", "64"])
    assert round(measured, 4) == config.model.params.scale_factor
    mae = float(capsys.readouterr().out.split("reconstruction MAE ")[1].split()[0])
    assert 0 < mae < 10  # a trained autoencoder, not a constant output


def test_a_count_below_two_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        measure.run_cli(measure.main, ["--autoencoder", "a.yaml", "--weights", "w", "--data", "d", "--count", "1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --count must be at least 2")

"""Token grids of the self-attention layers: measured by a forward pass (ldm/modules/token_grids.py) and
printed by `--shared-attn help` on a loaded model, checked against the count the tags imply: a layer
tagged level L (SD v1's latent side at 512 px, 64 / downsampling) runs on latent side * L / 64."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import ldm.cli
from ldm.cli import run_cli
from ldm.sharing import tagged_layers
from ldm.modules.token_grids import self_attention_grids
from ldm.util import instantiate_from_config
from tests.conftest import ROOT, TINY_CONFIG, load_script

TINY_INPAINT_CONFIG = ROOT / "configs" / "tiny" / "tiny-inpainting-inference.yaml"


def expected_grid(tag: str, latent_h: int, latent_w: int) -> tuple[int, int]:
    level = int(tag.split(".")[1])
    return latent_h * level // 64, latent_w * level // 64


@pytest.mark.parametrize("config", [TINY_CONFIG, TINY_INPAINT_CONFIG], ids=["txt2img", "inpainting"])
@pytest.mark.parametrize("latent_size", [(8, 8), (16, 8)])
def test_each_layer_runs_on_the_latent_side_scaled_by_its_level(config, latent_size):
    torch.manual_seed(0)
    unet = instantiate_from_config(OmegaConf.load(config).model.params.unet_config).eval()
    grids = self_attention_grids(unet, latent_size)
    assert [(g.name, g.tag) for g in grids] == [(name, layer.tag) for name, layer in tagged_layers(unet)]
    for grid in grids:
        assert (grid.height, grid.width) == expected_grid(grid.tag, *latent_size), grid
        assert grid.tokens == grid.height * grid.width


def test_measuring_leaves_no_hook_behind(tiny_unet):
    self_attention_grids(tiny_unet, (8, 8))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in tiny_unet.modules())


def grid_lines(text: str) -> dict[str, list[tuple[str, int]]]:
    """tag -> [(HxW, tokens)] from the help's layer lines ('  up.64   16x8   128 tokens  output_blocks...')."""
    rows: dict[str, list[tuple[str, int]]] = {}
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) == 5 and parts[3] == "tokens":
            rows.setdefault(parts[0], []).append((parts[1], int(parts[2])))
    return rows


@pytest.fixture
def no_generation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("--shared-attn help generated images")
    monkeypatch.setattr(ldm.cli, "generate", refuse)


@pytest.mark.parametrize("script", ["txt2img", "img2img"])
def test_help_on_a_loaded_model_prints_every_layers_grid_and_generates_nothing(script, tiny_ckpt, tmp_path, capsys,
                                                                               no_generation):
    outdir = tmp_path / "out"
    size = ["--H", "128", "--W", "64"] if script == "txt2img" else []  # img2img: the model's 64 px
    written = run_cli(load_script(script).main, ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt),
                                                 "--device", "cpu", "--outdir", str(outdir), *size,
                                                 "--shared-attn", "help"])  # exit status 2 would raise SystemExit
    out = capsys.readouterr().out
    assert written == [] and not outdir.exists()
    latent = (16, 8) if script == "txt2img" else (8, 8)  # pixels / f = 8
    rows = grid_lines(out)
    assert sorted(rows) == sorted(["down.64", "down.32", "down.16", "mid.8", "up.16", "up.32", "up.64"])
    assert sum(len(r) for r in rows.values()) == 16  # SD v1's 16 self-attention layers
    for tag, measured in rows.items():
        height, width = expected_grid(tag, *latent)
        assert measured == [(f"{height}x{width}", height * width)] * len(measured)
    assert f"latents {latent[0]}x{latent[1]}" in out
    assert "Token grid by level: 64 = " + "x".join(map(str, latent)) in out


def test_help_without_weights_lists_layers_and_says_which_flags_add_grids(capsys, no_generation):
    written = run_cli(load_script("txt2img").main, ["--config", str(TINY_CONFIG), "--shared-attn", "help"])
    out = capsys.readouterr().out
    assert written == [] and grid_lines(out) == {}
    assert "down.64" in out and "Token grids: add --demo, or --ckpt" in out


def test_help_with_a_missing_checkpoint_is_refused_as_generation_refuses_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(load_script("txt2img").main, ["--config", str(TINY_CONFIG), "--ckpt", str(tmp_path / "no.ckpt"),
                                              "--shared-attn", "help"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")

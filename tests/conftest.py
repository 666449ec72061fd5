"""Shared fixtures: tiny randomly initialised models with SD v1's layout, built from configs/tiny/."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny" / "tiny-inference.yaml"
SD_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
# Every key, shape and dtype of the official SD v1 checkpoint (public facts; kept in the repository so
# the key tests run on any checkout).
REFERENCE_KEYS = ROOT / "tests" / "data" / "sd-v1-checkpoint-keys.tsv"


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter non-trivial random values. Fresh models zero their output projections, which
    would make attention (and so batch sharing) invisible at the output; tests must not be fooled by that."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return module


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py imported as a module (the scripts are not a package), so tests can call its main."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_reference_keys() -> dict[str, tuple[str, str]]:
    """key -> (shape, dtype) of the official SD v1 checkpoint, from tests/data."""
    rows = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows[key] = (shape, dtype)
    return rows


def shape_string(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """The test models are tiny: a second intra-op thread mostly waits, and on a shared 2-core machine it
    makes small ops several times slower. Results do not depend on it (the parity tolerances hold)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_config():
    return OmegaConf.load(TINY_CONFIG)


@pytest.fixture
def tiny_unet(tiny_config):
    torch.manual_seed(0)
    return randomize_(instantiate_from_config(tiny_config.model.params.unet_config)).eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_config) -> Path:
    """configs/tiny with random weights (`randomize_`, seed 0) as a safetensors file."""
    import safetensors.torch
    torch.manual_seed(0)
    model = randomize_(instantiate_from_config(tiny_config.model))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path

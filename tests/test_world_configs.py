"""The demo model v2 recipe (configs/demo/v2/): written down, not yet run; these check it is runnable as written."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ldm.data.scenes import WorldScenes
from ldm.util import instantiate_from_config
from tests.conftest import ROOT

V2 = ROOT / "configs" / "demo" / "v2"


def merged(*names: str):
    return OmegaConf.merge(*(OmegaConf.load(V2 / name) for name in names))


def test_every_v2_recipe_file_says_whether_it_has_run_and_a_run_one_names_its_shipped_weights():
    for path in V2.glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        if first.startswith("# RUN -> "):
            weights = first.split()[3]
            assert (ROOT / weights).is_file(), f"{path.name} says it produced {weights}, which is missing"
        else:
            assert "NOT YET RUN" in first, path.name


def test_v2_recipe_trains_on_the_world_v2():
    for names in (("autoencoder.yaml",), ("demo-inference.yaml", "demo-train.yaml")):
        data = merged(*names).data
        dataset = instantiate_from_config({"target": data.target, "params": {**data.params, "length": 4}})
        assert isinstance(dataset, WorldScenes)


def test_v2_model_trains_its_text_encoder_with_the_unet():
    config = merged("demo-inference.yaml", "demo-train.yaml", "demo-train-stage2.yaml")
    for params in (config.model.params, config.model.params.first_stage_config.params):
        params.pop("ckpt_path")  # no trained weights exist yet; random ones exercise the same path
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    model.learning_rate = 1e-3
    text = model.cond_stage_model
    optimizer = model.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(p.requires_grad and id(p) in optimised for p in text.parameters())
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())

    batch = next(iter(DataLoader(WorldScenes(2, seed=0, mention_prob=1.0), batch_size=2)))
    before = text.transformer.text_model.final_layer_norm.weight.detach().clone()
    model.cond_dropout = 0.0
    loss = model.training_step(batch, 0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, text.transformer.text_model.final_layer_norm.weight)

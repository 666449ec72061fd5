"""The demo model v2 recipe (configs/demo/v2/, scripts/demo_v2_recipe.sh): checks that it runs as written."""
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


# ----------------------------------------------------------------------------- scripts/demo_v2_recipe.sh
def run_recipe(*args: str):
    import subprocess
    return subprocess.run(["bash", str(ROOT / "scripts" / "demo_v2_recipe.sh"), *args], capture_output=True,
                          text=True, timeout=120)


def test_the_recipe_runner_resumes_past_finished_stages_and_chains_each_stage_to_the_previous_one(tmp_path):
    """Every stage's file already in OUTDIR: nothing trains, and the configs each stage would be given
    read the autoencoder, the scale factor and the previous stage from OUTDIR."""
    outputs = ["instruments.json", "autoencoder-stage1.safetensors", "autoencoder.safetensors"]
    outputs += [f"demo-stage{k}.safetensors" for k in range(1, 6)]
    for name in outputs:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "scale-factor.txt").write_text("0.2656\n")
    done = run_recipe(str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("skipped") == len(outputs) + 1  # and the scale factor
    assert (tmp_path / "times.tsv").read_text().splitlines() == ["stage\tstart\tend\tseconds"]  # nothing ran
    chain = tmp_path / "chain"
    stage5 = OmegaConf.merge(*(OmegaConf.load(p) for p in (
        V2 / "demo-inference.yaml", V2 / "demo-train.yaml", V2 / "demo-train-stage3.yaml",
        V2 / "demo-train-stage5.yaml", chain / "scale-factor.yaml", chain / "demo-stage5.yaml")))
    assert stage5.model.params.ckpt_path == str(tmp_path / "demo-stage4.safetensors")
    assert stage5.model.params.first_stage_config.params.ckpt_path == str(tmp_path / "autoencoder.safetensors")
    assert stage5.model.params.scale_factor == 0.2656
    assert stage5.trainer.max_steps == 3000 and stage5.model.base_learning_rate == 1.0e-04  # stage 5's own
    sampling = OmegaConf.load(tmp_path / "demo-inference.yaml")  # the finished model's inference config
    assert sampling.model.params.scale_factor == 0.2656 and "data" not in sampling
    stage1 = OmegaConf.merge(OmegaConf.load(V2 / "demo-train.yaml"), OmegaConf.load(chain / "demo-stage1.yaml"))
    assert "ckpt_path" not in stage1.model.params  # stage 1 starts from random weights
    autoencoder2 = OmegaConf.merge(OmegaConf.load(V2 / "autoencoder-stage2.yaml"),
                                   OmegaConf.load(chain / "autoencoder-stage2.yaml"))
    assert autoencoder2.model.params.ckpt_path == str(tmp_path / "autoencoder-stage1.safetensors")


def test_the_recipe_runner_without_a_directory_is_a_usage_error():
    run = run_recipe()
    assert run.returncode == 2 and run.stderr.startswith("usage: bash scripts/demo_v2_recipe.sh OUTDIR")

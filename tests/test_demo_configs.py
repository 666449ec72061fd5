"""The probe configs under configs/demo/experiments stay what ANSWERS.md says they are."""
from __future__ import annotations

from omegaconf import OmegaConf

from ldm.util import instantiate_from_config
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "demo"


def merged(*names: str):
    return OmegaConf.merge(*(OmegaConf.load(DEMO / name) for name in names))


def test_wide_heads_inference_config_is_the_training_override_applied_to_the_demo_model():
    training = merged("demo-inference.yaml", "demo-train.yaml", "experiments/wide-heads.yaml")
    inference = merged("experiments/wide-heads-inference.yaml")
    demo = merged("demo-inference.yaml")
    assert inference.model.params.unet_config == training.model.params.unet_config
    # Only the head layout differs from the demo model.
    for key in ("num_heads", "num_head_channels"):
        demo.model.params.unet_config.params.pop(key, None)
        inference.model.params.unet_config.params.pop(key, None)
    assert inference == demo


def test_wide_heads_unet_has_32_channels_per_head():
    unet = instantiate_from_config(merged("experiments/wide-heads-inference.yaml").model.params.unet_config)
    layers = [m for m in unet.modules() if getattr(m, "tag", None)]
    assert layers and all(layer.to_q.out_features // layer.heads == 32 for layer in layers)


def test_pairs_probe_trains_on_half_pair_images_for_3000_steps():
    config = merged("demo-inference.yaml", "demo-train.yaml", "experiments/pairs.yaml")
    data = instantiate_from_config({"target": config.data.target, "params": {**config.data.params, "length": 400}})
    share = sum(data.is_pair(i) for i in range(400)) / 400
    assert abs(share - 0.5) < 0.08 and config.trainer.max_steps == 3000


def test_stage_two_continues_from_stage_one_and_the_shipped_weights_record_it():
    from safetensors import safe_open
    stage1 = merged("demo-inference.yaml", "demo-train.yaml")
    stage2 = merged("demo-inference.yaml", "demo-train.yaml", "demo-train-stage2.yaml")
    # Stage 2 starts from stage 1's output, not from the shipped file it replaces.
    assert stage2.model.params.ckpt_path == "outputs/demo/demo-stage1.safetensors"
    assert "ckpt_path" not in stage1.model.params
    assert stage2.trainer.max_steps == 3000 and stage2.trainer.seed != stage1.trainer.seed
    with safe_open(str(ROOT / "models" / "demo" / "demo.safetensors"), "pt") as weights:
        metadata = weights.metadata()
    assert OmegaConf.create(metadata["config"]) == stage2 and metadata["steps"] == "3000"

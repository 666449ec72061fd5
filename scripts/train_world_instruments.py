"""Train the world v2 instruments: the scene classifier and the subject segmenter.

    PYTHONPATH=. python scripts/train_world_instruments.py --config configs/demo/v2/instruments.yaml \
        --out-dir models/demo/v2 [--force] [training.classifier_steps=100 ...]

Renders a seeded training set and a held-out set of `ldm.data.scenes.WorldScenes` (data seeds
`seed` and `seed + 1`), trains both instruments on CPU with degraded copies of the renders
(`ldm.eval.degrade`, as the v1 classifier), then measures them on the held-out renders: accuracy
of every attribute on the images it applies to (clean and degraded) and the segmenter's mean mask
IoU. Writes scene_classifier.safetensors, segmenter.safetensors (the numbers and the command in
their metadata) and instruments.json. Existing outputs are only replaced with --force.

Images are (B, 3, H, W) in [-1, 1] throughout. Seeded; with the same thread count, deterministic.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm.cli import ArgumentParser, UsageError, run_cli  # noqa: E402
from ldm.data.render import render_scene  # noqa: E402
from ldm.data.scenes import WorldScenes  # noqa: E402
from ldm.data.world import VOCABULARY  # noqa: E402
from ldm.eval.degrade import degrade, to_model_range  # noqa: E402
from ldm.eval.scene_classifier import IGNORE, SceneClassifier, save_scene_classifier  # noqa: E402
from ldm.eval.segmenter import SubjectSegmenter, mask_iou, save_segmenter  # noqa: E402
from ldm.util import instantiate_from_config, load_config_file  # noqa: E402

OUTPUTS = ("scene_classifier.safetensors", "segmenter.safetensors", "instruments.json")


def render_world_set(length: int, seed: int, size: int = 64, progress: bool = False) -> dict[str, Any]:
    """Items 0..length-1 of WorldScenes(seed) as tensors: "images" uint8 (N, 3, H, W), "masks" bool
    (N, H, W), "labels" {attribute: (N,) indices into VOCABULARY, IGNORE where it does not apply}."""
    data = WorldScenes(length, seed=seed, size=size)
    images = np.empty((length, size, size, 3), dtype=np.uint8)
    masks = np.empty((length, size, size), dtype=bool)
    labels = {name: np.full(length, IGNORE, dtype=np.int64) for name in VOCABULARY}
    for i in tqdm(range(length), desc=f"render seed {seed}", disable=not progress, mininterval=2):
        scene, _ = data.scene(i)
        drawn = render_scene(scene, size)
        images[i], masks[i] = drawn.image, drawn.mask
        for name, value in scene.labels().items():
            if value is not None:
                labels[name][i] = VOCABULARY[name].index(value)
    return {"images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),  # (N, 3, H, W)
            "masks": torch.from_numpy(masks), "labels": {k: torch.from_numpy(v) for k, v in labels.items()}}


def fit(model: torch.nn.Module, batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        images: torch.Tensor, *, steps: int, batch_size: int, learning_rate: float, weight_decay: float = 1e-4,
        warmup_fraction: float = 0.05, augment_fraction: float = 0.8, seed: int = 0,
        progress: bool = False) -> list[float]:
    """Train `model` in place with AdamW and a warmed-up cosine schedule; returns every step's loss.

    `batch_loss(images, index)` gets a batch of (possibly degraded) images in [-1, 1] and the indices
    of its items, and returns the loss, so one loop serves both instruments."""
    generator = torch.Generator().manual_seed(seed)
    n = len(images)
    warmup = max(1, round(warmup_fraction * steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps)))))
    per_epoch = max(1, n // batch_size)
    order = torch.randperm(n, generator=generator)
    losses: list[float] = []
    model.train()
    for step in tqdm(range(steps), desc="train", disable=not progress, mininterval=2):
        start = (step % per_epoch) * batch_size
        if step and start == 0:
            order = torch.randperm(n, generator=generator)
        index = order[start:start + batch_size]
        batch = to_model_range(images[index])
        pick = torch.rand(len(index), generator=generator) < augment_fraction
        if pick.any():
            batch[pick] = degrade(batch[pick], generator)
        loss = batch_loss(batch, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _batches(data: Mapping[str, Any], degrade_seed: Optional[int], batch_size: int = 256):
    generator = torch.Generator().manual_seed(degrade_seed) if degrade_seed is not None else None
    for start in range(0, len(data["images"]), batch_size):
        images = to_model_range(data["images"][start:start + batch_size])
        yield start, images if generator is None else degrade(images, generator)


def evaluate_classifier(model: SceneClassifier, data: Mapping[str, Any], degrade_seed: Optional[int] = None
                        ) -> dict[str, float]:
    """Accuracy per attribute over the held-out images it applies to (a None prediction counts as wrong)."""
    correct = {name: 0 for name in model.vocab}
    for start, images in _batches(data, degrade_seed):
        predicted = model.predict(images)
        for name, values in model.vocab.items():
            truth = data["labels"][name][start:start + len(images)].tolist()
            correct[name] += sum(t != IGNORE and p == values[t] for p, t in zip(predicted[name], truth))
    return {name: count / max(1, int((data["labels"][name] != IGNORE).sum())) for name, count in correct.items()}


def evaluate_segmenter(model: SubjectSegmenter, data: Mapping[str, Any], degrade_seed: Optional[int] = None) -> float:
    """Mean mask IoU over the held-out images."""
    ious = [mask_iou(model.predict(images), data["masks"][start:start + len(images)])
            for start, images in _batches(data, degrade_seed)]
    return float(torch.cat(ious).mean())


def train_instruments(config: Any, progress: bool = False) -> tuple[SceneClassifier, SubjectSegmenter, dict[str, Any]]:
    """Both instruments trained as `config.training` says, with their held-out numbers."""
    cfg = config.training
    seed, size = int(cfg.seed), int(cfg.size)
    clock = time.time()
    train = render_world_set(int(cfg.train_size), seed, size, progress)
    held_out = render_world_set(int(cfg.val_size), seed + 1, size, progress)
    seconds = {"render": time.time() - clock}
    common = dict(batch_size=int(cfg.batch_size), learning_rate=float(cfg.learning_rate),
                  weight_decay=float(cfg.weight_decay), warmup_fraction=float(cfg.warmup_fraction),
                  augment_fraction=float(cfg.augment_fraction), seed=seed, progress=progress)

    torch.manual_seed(seed)
    classifier = SceneClassifier(instantiate_from_config(config.classifier))
    targets = train["labels"]
    clock = time.time()
    classifier_losses = fit(classifier, lambda x, i: classifier.loss(classifier(x), {k: v[i] for k, v in targets.items()})[0],
                            train["images"], steps=int(cfg.classifier_steps), **common)
    seconds["classifier_step"] = (time.time() - clock) / max(1, int(cfg.classifier_steps))
    torch.manual_seed(seed)
    segmenter = SubjectSegmenter(instantiate_from_config(config.segmenter))
    clock = time.time()
    segmenter_losses = fit(segmenter, lambda x, i: segmenter.loss(segmenter(x), train["masks"][i]),
                           train["images"], steps=int(cfg.segmenter_steps), **common)
    seconds["segmenter_step"] = (time.time() - clock) / max(1, int(cfg.segmenter_steps))
    numbers = {
        "held_out": f"{int(cfg.val_size)} renders of data seed {seed + 1}",
        "classifier_accuracy": {"clean": evaluate_classifier(classifier, held_out),
                                "degraded": evaluate_classifier(classifier, held_out, degrade_seed=12345)},
        "segmenter_iou": {"clean": evaluate_segmenter(segmenter, held_out),
                          "degraded": evaluate_segmenter(segmenter, held_out, degrade_seed=12345)},
        "final_loss": {"classifier": float(np.mean(classifier_losses[-20:])),
                       "segmenter": float(np.mean(segmenter_losses[-20:]))},
        # Wall-clock seconds (rendering both sets; one training step of each), to size the full run.
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
    }
    return classifier, segmenter, numbers


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo/v2/instruments.yaml", help="instruments and training config")
    parser.add_argument("--out-dir", default="models/demo/v2", help=f"directory for {', '.join(OUTPUTS)}")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    parser.add_argument("overrides", nargs="*", help="config overrides like training.classifier_steps=100")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    opt = parse_args(argv)
    out_dir = Path(opt.out_dir)
    existing = [str(out_dir / name) for name in OUTPUTS if (out_dir / name).exists()]
    if existing and not opt.force:
        raise UsageError(f"{', '.join(existing)} already exist(s); pass --force to replace, or choose another --out-dir")
    if not Path(opt.config).is_file():
        raise UsageError(f"--config {opt.config} is not a file; pass e.g. configs/demo/v2/instruments.yaml")
    try:
        config = OmegaConf.merge(load_config_file(opt.config), OmegaConf.from_dotlist(opt.overrides))
    except ValueError as error:
        raise UsageError(f"overrides {opt.overrides}: {error}; write them as key=value") from None
    torch.set_num_threads(int(config.training.num_threads))

    started = time.time()
    classifier, segmenter, numbers = train_instruments(config, progress=True)
    numbers["train_minutes"] = round((time.time() - started) / 60, 2)
    for kind in ("clean", "degraded"):
        accuracy = numbers["classifier_accuracy"][kind]
        print(f"{kind:9s} " + "  ".join(f"{k}={v:.3f}" for k, v in accuracy.items())
              + f"  mask_iou={numbers['segmenter_iou'][kind]:.3f}")
    print("seconds: " + "  ".join(f"{k}={v}" for k, v in numbers["seconds"].items()))
    command = "python scripts/train_world_instruments.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = {"command": command, "run_config": OmegaConf.to_container(config, resolve=True), **numbers}
    save_scene_classifier(classifier, out_dir / OUTPUTS[0], extra=info)
    save_segmenter(segmenter, out_dir / OUTPUTS[1], extra=info)
    (out_dir / OUTPUTS[2]).write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {', '.join(str(out_dir / name) for name in OUTPUTS)} in {numbers['train_minutes']} min")
    return info


if __name__ == "__main__":
    run_cli(main)

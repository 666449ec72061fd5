"""Train the attribute classifier (ldm/eval/attribute_classifier.py) on the synthetic objects.

    python scripts/train_classifier.py --config configs/demo/classifier.yaml \
        --out models/demo/attribute_classifier.safetensors [--force] [training.epochs=3 ...]

Renders a seeded training set and a held-out set (data seeds `seed` and `seed + 1`), trains on CPU
with degraded copies of the renders (blur, resampling, noise, colour blotches, colour jitter, JPEG),
because the images it will judge come from a small diffusion model and are blurrier and noisier
than the renders. Prints held-out accuracy per attribute on clean and on degraded renders, and
writes the weights with the config, vocabulary and these numbers in the safetensors metadata, plus
a readable JSON card next to it. An existing output is only replaced with --force.

Images are (B, 3, H, W) in [-1, 1] throughout. Everything is seeded; with the same thread count
the run is deterministic.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm.cli import UsageError, run_cli  # noqa: E402
from ldm.data.synthetic import SyntheticObjects, render  # noqa: E402
from ldm.eval.degrade import degrade, to_model_range  # noqa: E402
from ldm.eval.attribute_classifier import (REGRESSION_TARGETS, AttributeClassifier,  # noqa: E402
                                           default_vocab, save_attribute_classifier)
from ldm.util import instantiate_from_config, load_config_file  # noqa: E402

# Regression errors are divided by this before squaring. Smaller units weigh position and size more,
# but their gradients then swamp the shared trunk (Adam scales updates by the largest gradients) and
# the classification heads stall: with 0.05 they were still at chance after 60 steps, with 0.3 they
# learn, only a little slower than with no regression loss at all.
REGRESSION_UNIT = 0.25


def render_set(length: int, seed: int, size: int = 64, progress: bool = False) -> dict[str, torch.Tensor]:
    """Render items 0..length-1 of SyntheticObjects(seed): uint8 "images" (N, 3, H, W) plus targets:
    label indices (N,) per classification head and "regression" (N, 3) as x, y, size scale."""
    data = SyntheticObjects(length, seed=seed, size=size)
    images = np.empty((length, size, size, 3), dtype=np.uint8)
    labels: dict[str, list[int]] = {"cls": [], "colour": [], "pattern": [], "facing": []}
    regression = np.empty((length, len(REGRESSION_TARGETS)), dtype=np.float32)
    vocab = default_vocab()
    for i in tqdm(range(length), desc=f"render seed {seed}", disable=not progress, mininterval=2):
        attrs, _ = data.attributes(i)
        images[i] = render(attrs, size)
        for name in labels:
            labels[name].append(vocab[name].index(getattr(attrs, name)))
        regression[i] = (attrs.x, attrs.y, attrs.scale)
    out = {"images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()}  # (N, 3, H, W)
    out.update({name: torch.tensor(values) for name, values in labels.items()})
    out["regression"] = torch.from_numpy(regression)
    return out


def classifier_loss(outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                    heads: Sequence[str]) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of cross-entropies over the classification heads plus the scaled regression MSE."""
    parts = {name: F.cross_entropy(outputs[name], targets[name]) for name in heads}
    parts["regression"] = ((outputs["regression"] - targets["regression"]) / REGRESSION_UNIT).pow(2).mean()
    return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}


def train_classifier(model: AttributeClassifier, data: Mapping[str, torch.Tensor], *, epochs: float,
                     batch_size: int, learning_rate: float, weight_decay: float = 1e-4,
                     warmup_fraction: float = 0.05, augment_fraction: float = 0.8, seed: int = 0,
                     progress: bool = False) -> list[float]:
    """Train in place with AdamW and a warmed-up cosine schedule; returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    n = len(data["images"])
    steps_per_epoch = max(1, n // batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    warmup = max(1, round(warmup_fraction * total))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / total)))))
    heads = list(model.vocab)
    losses: list[float] = []
    model.train()
    order = torch.randperm(n, generator=generator)
    bar = tqdm(range(total), desc="train", disable=not progress, mininterval=2)
    for step in bar:
        start = (step % steps_per_epoch) * batch_size
        if step and start == 0:
            order = torch.randperm(n, generator=generator)
        index = order[start:start + batch_size]
        images = to_model_range(data["images"][index])
        pick = torch.rand(len(index), generator=generator) < augment_fraction
        if pick.any():
            images[pick] = degrade(images[pick], generator)
        loss, _ = classifier_loss(model(images), {k: v[index] for k, v in data.items()}, heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    return losses


def evaluate(model: AttributeClassifier, data: Mapping[str, torch.Tensor], degrade_seed: Optional[int] = None,
             batch_size: int = 256) -> dict[str, float]:
    """Accuracy per classification head (and of the nearest size name), mean absolute error of x, y, size.

    With `degrade_seed`, the images are degraded first (seeded), to measure robustness."""
    generator = torch.Generator().manual_seed(degrade_seed) if degrade_seed is not None else None
    correct: dict[str, int] = {name: 0 for name in [*model.vocab, "size_label"]}
    abs_error = torch.zeros(len(REGRESSION_TARGETS))
    size_names = list(model.size_scales)
    n = len(data["images"])
    for start in range(0, n, batch_size):
        images = to_model_range(data["images"][start:start + batch_size])
        if generator is not None:
            images = degrade(images, generator)
        pred = model.predict(images)
        for name in model.vocab:
            index = torch.tensor([model.vocab[name].index(label) for label in pred[name]])
            correct[name] += int((index == data[name][start:start + batch_size]).sum())
        truth = data["regression"][start:start + batch_size]  # (b, 3)
        estimate = torch.stack([pred[t] for t in REGRESSION_TARGETS], dim=1)  # (b, 3)
        abs_error += (estimate - truth).abs().sum(dim=0)
        true_sizes = [min(size_names, key=lambda s: abs(model.size_scales[s] - v)) for v in truth[:, 2].tolist()]
        correct["size_label"] += sum(p == t for p, t in zip(pred["size_label"], true_sizes))
    metrics = {f"acc_{name}": count / n for name, count in correct.items()}
    metrics.update({f"mae_{t}": float(e) / n for t, e in zip(REGRESSION_TARGETS, abs_error)})
    return metrics


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo/classifier.yaml", help="model and training config")
    parser.add_argument("--out", default="models/demo/attribute_classifier.safetensors", help="weights to write")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("overrides", nargs="*", help="config overrides like training.epochs=3")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    opt = parse_args(argv)
    out = Path(opt.out)
    card = out.with_suffix(".json")
    existing = [str(p) for p in (out, card) if p.exists()]
    if existing and not opt.force:
        raise UsageError(f"{', '.join(existing)} already exist(s); pass --force to replace, or choose another --out")
    config = OmegaConf.merge(load_config_file(opt.config), OmegaConf.from_dotlist(opt.overrides))
    train_cfg = config.training
    torch.set_num_threads(int(train_cfg.num_threads))
    torch.manual_seed(int(train_cfg.seed))

    started = time.time()
    train_data = render_set(int(train_cfg.train_size), int(train_cfg.seed), progress=True)
    val_data = render_set(int(train_cfg.val_size), int(train_cfg.seed) + 1, progress=True)
    model = AttributeClassifier(instantiate_from_config(config.model))
    losses = train_classifier(model, train_data, epochs=float(train_cfg.epochs), batch_size=int(train_cfg.batch_size),
                              learning_rate=float(train_cfg.learning_rate),
                              weight_decay=float(train_cfg.weight_decay),
                              warmup_fraction=float(train_cfg.warmup_fraction),
                              augment_fraction=float(train_cfg.augment_fraction), seed=int(train_cfg.seed),
                              progress=True)
    metrics = {"clean": evaluate(model, val_data), "degraded": evaluate(model, val_data, degrade_seed=12345)}
    minutes = (time.time() - started) / 60
    print(f"held-out set: {int(train_cfg.val_size)} renders of data seed {int(train_cfg.seed) + 1} "
          f"(trained in {minutes:.1f} min, final loss {np.mean(losses[-50:]):.4f})")
    for kind, values in metrics.items():
        print(f"  {kind:9s} " + "  ".join(f"{k}={v:.4f}" for k, v in values.items()))

    command = "python scripts/train_classifier.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info: dict[str, Any] = {"command": command, "run_config": OmegaConf.to_container(config, resolve=True),
                            "held_out": metrics, "train_minutes": round(minutes, 2),
                            "parameters": sum(p.numel() for p in model.parameters())}
    save_attribute_classifier(model, out, extra_metadata=info)
    card.write_text(json.dumps({"weights": out.name, **info}, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {card}")


if __name__ == "__main__":
    run_cli(main)

"""Measure how consistent new images in other scenes are with a reference (issue 14), on a world-v2 model.

    python scripts/eval_reference.py --outdir outputs/reference-eval
    python scripts/eval_reference.py --config CONFIG --ckpt CKPT --classifier SCENE_CLASSIFIER \\
        --seeds 0,1,2,3,4 --groups up,all --outdir OUT

For each subject (a chair, a face) and seed: a generated PNG reference and a rendered scene reference
(DDIM-inverted), then four new images whose prompts name other backgrounds, without sharing and with
each reference in each layer group. The measure (ldm/eval/reference_consistency.py): the share of the
subject's appearance attributes the new prompts leave open that the scene classifier reads as the
reference's (the PNG's classifier reading; the render's ground truth). Without sharing it is the chance
level. Writes results.md, results.csv (one row per subject, seed, condition and compared reference),
summary.json and grid.png (per subject, the first seed: a row per condition, the reference first)
into --outdir, which must be new or empty. CPU results are reproducible for the same --threads.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tqdm import tqdm  # noqa: E402

from ldm.cli import ArgumentParser, UsageError, run_cli  # noqa: E402
from ldm.generation.builder import DEMO_CKPT, DEMO_CONFIG, check_checkpoint, read_config, resolve_path  # noqa: E402
from ldm.eval.reference_consistency import (APPEARANCE, REFERENCE_PROMPTS, ReferenceEvalRequest,  # noqa: E402
                                            evaluate_references, summarize_references)
from ldm.eval.consistency import WORLD_V2_CLASSIFIER, check_results_folder  # noqa: E402
from ldm.eval.report import write_csv  # noqa: E402
from ldm.generation.images import image_grid  # noqa: E402
from ldm.generation.model import DEMO_SCALE  # noqa: E402

DEMO_CLASSIFIER = str(WORLD_V2_CLASSIFIER)  # the demo model (v2) is read by the world v2 scene classifier
FLAGS = {"seeds": "--seeds", "groups": "--groups", "steps": "--steps", "scale": "--scale", "outdir": "--outdir",
         "classifier": "--classifier", "references": "--config/--ckpt", "sharing.groups": "--groups"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=str, default=DEMO_CONFIG, help=f"model config (default {DEMO_CONFIG})")
    parser.add_argument("--ckpt", type=str, default=DEMO_CKPT, help=f"its checkpoint (default {DEMO_CKPT})")
    parser.add_argument("--classifier", type=str, default=DEMO_CLASSIFIER,
                        help=f"the world v2 scene classifier (default {DEMO_CLASSIFIER})")
    parser.add_argument("--seeds", type=str, default="0,1,2,3,4", help="comma-separated seeds (default 0,1,2,3,4)")
    parser.add_argument("--groups", type=str, default="up,all", help="layer groups, one condition each (default up,all)")
    parser.add_argument("--subjects", type=str, default="furniture,face",
                        help=f"subjects measured (default furniture,face): {', '.join(REFERENCE_PROMPTS)}")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    parser.add_argument("--scale", type=float, default=DEMO_SCALE,
                        help=f"guidance scale (default {DEMO_SCALE}, the demo model's)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--outdir", type=str, required=True, help="new or empty folder for the results")
    return parser.parse_args(argv)


def build_request(opt: argparse.Namespace) -> ReferenceEvalRequest:
    """Every flag and file checked before the model loads."""
    try:
        seeds = tuple(int(part) for part in opt.seeds.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--seeds {opt.seeds!r} must be comma-separated whole numbers, e.g. 0,1,2,3,4") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) >= 2 ** 53:
        raise UsageError(f"--seeds {opt.seeds!r}: give distinct whole numbers from 0")
    subjects = tuple(s.strip() for s in opt.subjects.split(",") if s.strip())
    unknown = [s for s in subjects if s not in REFERENCE_PROMPTS]
    if not subjects or unknown:
        raise UsageError(f"--subjects {opt.subjects!r}: choose among {', '.join(REFERENCE_PROMPTS)}")
    if opt.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {opt.threads}")
    if opt.steps < 1 or not math.isfinite(opt.scale):
        raise UsageError("--steps must be at least 1 and --scale a finite number")
    groups = tuple(g.strip() for g in opt.groups.split(",") if g.strip())
    if not groups:
        raise UsageError("--groups needs at least one layer group, e.g. up,all")
    classifier = resolve_path(opt.classifier)
    if not classifier.is_file():
        raise UsageError(f"--classifier {classifier}: no such file; train the world v2 instruments "
                         "(configs/demo/v2/README.md) or pass its path")
    spec = read_config(opt.config)
    check_checkpoint(opt.ckpt)
    from ldm.sharing import select_layers
    for group in groups:
        try:
            select_layers(spec.unet, (group,))
        except ValueError as error:
            raise UsageError(f"--groups {group}: {error}") from None
    check_results_folder(Path(opt.outdir))
    return ReferenceEvalRequest(seeds=seeds, groups=groups, subjects=subjects, steps=opt.steps, scale=opt.scale)


def write_outputs(outdir: Path, request: ReferenceEvalRequest, results, grids, argv: Sequence[str]) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    attributes = sorted({a for subject in request.subjects for a in APPEARANCE[subject]})
    columns = ["subject", "seed", "condition", "against", "match", *(f"match_{a}" for a in attributes)]
    write_csv(outdir / "results.csv", [
        {"subject": r.subject, "seed": r.seed, "condition": r.condition, "against": r.against,
         "match": f"{r.match:.4f}",
         **{f"match_{a}": f"{r.per_attribute[a]:.4f}" if a in r.per_attribute else "" for a in attributes}}
        for r in results], columns)
    summary = summarize_references(results, request)
    (outdir / "summary.json").write_text(json.dumps({"command": " ".join(argv), "seeds": list(request.seeds),
                                                     "steps": request.steps, "scale": request.scale,
                                                     "rows": summary}, indent=2, default=str) + "\n")
    lines = ["# Consistency of new images in other scenes with a reference", "",
             f"Command: `python scripts/eval_reference.py {' '.join(argv)}`", "",
             "Share of the open appearance attributes of each new image that equal the reference's "
             f"(mean ± std over {len(request.seeds)} seeds; `none` = no sharing, the chance level).", "",
             "| condition | compared with | " + " | ".join((*request.subjects, "all")) + " |",
             "|---|---|" + "---|" * (len(request.subjects) + 1)]
    for condition, against in dict.fromkeys((row["condition"], row["against"]) for row in summary):
        cells = [f"{row['mean']:.3f} ± {row['std']:.3f}" for row in summary
                 if row["condition"] == condition and row["against"] == against]
        lines.append(f"| {condition} | {against} | " + " | ".join(cells) + " |")
    (outdir / "results.md").write_text("\n".join(lines) + "\n")
    rows, labels = [], []
    for subject in request.subjects:
        for condition, images in grids[(subject, request.seeds[0])].items():
            rows.append(images)
            labels.append(f"{subject} seed {request.seeds[0]}: {condition}")
    image_grid(rows, row_labels=labels).save(outdir / "grid.png")


def main(argv: Optional[Sequence[str]] = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    opt = parse_args(argv)
    request = build_request(opt)
    import torch
    from ldm.eval.scene_classifier import load_scene_classifier
    from ldm.generation import load_model
    torch.set_num_threads(opt.threads)
    model = load_model(resolve_path(opt.config), resolve_path(opt.ckpt), device="cpu", verbose=False)
    classifier = load_scene_classifier(resolve_path(opt.classifier))
    with tqdm(total=request.generations, desc="generating", unit="batch") as bar:
        results, grids = evaluate_references(model, classifier, request, tick=lambda: bar.update(1))
    outdir = Path(opt.outdir)
    write_outputs(outdir, request, results, grids, argv)
    print(f"results in {outdir}")
    return outdir


if __name__ == "__main__":
    run_cli(main, flags=FLAGS)

"""The files of a prompt-following run (`ldm.eval.prompt_following`): tables, per-image readings, grid.

- results.csv: one row per (scale, attribute): named, shown, accuracy, and whether it is a target;
- images.csv: one row per (scale, image): data seed, caption index, noise seed, caption, and per
  attribute the named value and the classifier's label (empty where there is none), so that every
  number of results.csv can be recounted from it;
- results.md: the same per scale, the issue's targets, and the scale the README's rule picks;
- summary.json: run settings, tallies, verdicts, the chosen scale, seconds per image (the only value
  that differs between identical runs; the CSV files are identical on the CPU for the same threads);
- grid.png: the first images of every scale, one labelled row per scale (the same captions and noise).
Every file is created exclusively: nothing is overwritten.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from ldm.eval.prompt_following import (ATTRIBUTE_TARGET, ATTRIBUTES, CLASS_TARGET, TARGET_ATTRIBUTES, ImageReading,
                                       choose_scale, tally, verdict)
from ldm.eval.report import _json_safe, write_csv  # the consistency report's writers
from ldm.generation import image_grid


def _number(value: float, digits: int = 3) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def markdown_report(tallies: Mapping[float, Mapping[str, Any]], verdicts: Mapping[float, Any], chosen: float,
                    run_info: Mapping[str, Any], seconds: Mapping[float, float]) -> str:
    scales = list(tallies)
    lines = [
        "# Prompt following of a world v2 model", "",
        f"Model `{run_info['ckpt']}` ({run_info['config']}), classifier `{run_info['classifier']}`; "
        f"{run_info['count']} captions of each held-out data seed {run_info['seeds']} (world v2 grammar, "
        f"mention probability {run_info['mention_prob']}), one image each from noise seed "
        f"seed * {run_info['noise_stride']} + index, the same at every scale; DDIM {run_info['steps']} steps, "
        f"eta 0, no sharing, batches of {run_info['batch_size']}, {run_info['precision']} on {run_info['device']}, "
        f"{run_info['threads']} thread(s).", "",
        f"Targets (issue 12): class accuracy >= {CLASS_TARGET}, accuracy >= {ATTRIBUTE_TARGET} for each of "
        f"{', '.join(TARGET_ATTRIBUTES)}. Cells: accuracy (times named); `*` marks a target attribute.", "",
        "| attribute | " + " | ".join(f"scale {s:g}" for s in scales) + " |",
        "|---|" + "---:|" * len(scales),
    ]
    for attribute in ATTRIBUTES:
        mark = "*" if attribute in TARGET_ATTRIBUTES else ""
        name = "subject (class)" if attribute == "subject" else attribute + mark
        cells = [f"{_number(tallies[s][attribute].accuracy)} ({tallies[s][attribute].named})" for s in scales]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **min over targets** | " + " | ".join(
        f"**{_number(verdicts[s].min_target_accuracy)}** ({verdicts[s].min_target_attribute})" for s in scales) + " |")
    lines.append("| min over all named | " + " | ".join(_number(verdicts[s].min_any_accuracy) for s in scales) + " |")
    lines.append("| targets hold | " + " | ".join("yes" if verdicts[s].meets_targets else "no" for s in scales)
                 + " |")
    lines.append("| s / image | " + " | ".join(f"{seconds[s]:.2f}" for s in scales) + " |")
    lines += ["", f"Scale chosen by the rule of configs/demo/v2/README.md (highest minimum accuracy over the "
              f"target attributes, ties to the lower scale): **{chosen:g}**; there the targets "
              f"{'hold' if verdicts[chosen].meets_targets else 'do not hold'}.", "",
              "grid.png: the first images of every scale (one row per scale); their captions:", ""]
    return "\n".join(lines) + "\n"


def write_report(outdir: Path, readings: Sequence[ImageReading], shown: Mapping[float, Sequence[Image.Image]],
                 seconds: Mapping[float, float], run_info: Mapping[str, Any]) -> list[Path]:
    """Write results.csv, images.csv, results.md, summary.json and grid.png; returns the paths."""
    scales = list(dict.fromkeys(r.scale for r in readings))
    tallies = {s: tally([r for r in readings if r.scale == s]) for s in scales}
    verdicts = {s: verdict(tallies[s]) for s in scales}
    chosen = choose_scale(verdicts)
    paths = {name: outdir / name for name in ("results.csv", "images.csv", "results.md", "summary.json", "grid.png")}
    write_csv(paths["results.csv"], [
        {"scale": s, "attribute": a, "target": int(a in TARGET_ATTRIBUTES), "named": t.named, "shown": t.shown,
         "accuracy": t.accuracy} for s in scales for a, t in tallies[s].items()],
        ["scale", "attribute", "target", "named", "shown", "accuracy"])
    write_csv(paths["images.csv"], [
        {"scale": r.scale, "data_seed": r.caption.data_seed, "index": r.caption.index,
         "noise_seed": r.caption.noise_seed, "prompt": r.caption.prompt,
         **{f"named_{a}": r.caption.named.get(a, "") for a in ATTRIBUTES},
         **{f"label_{a}": r.labels[a] or "" for a in ATTRIBUTES}} for r in readings],
        ["scale", "data_seed", "index", "noise_seed", "prompt", *(f"named_{a}" for a in ATTRIBUTES),
         *(f"label_{a}" for a in ATTRIBUTES)])
    first = [r for r in readings if r.scale == scales[0]][:len(next(iter(shown.values())))]
    report = markdown_report(tallies, verdicts, chosen, run_info, seconds)
    report += "".join(f"{i + 1}. {r.caption.prompt} (noise seed {r.caption.noise_seed})\n" for i, r in enumerate(first))
    with open(paths["results.md"], "x", encoding="utf-8") as handle:
        handle.write(report)
    with open(paths["grid.png"], "xb") as handle:
        image_grid([list(shown[s]) for s in scales], row_labels=[f"scale {s:g}" for s in scales]).save(handle,
                                                                                                        format="PNG")
    document = {
        "run": dict(run_info),
        "targets": {"class_accuracy": CLASS_TARGET, "attribute_accuracy": ATTRIBUTE_TARGET,
                    "attributes": list(TARGET_ATTRIBUTES)},
        "scales": {f"{s:g}": {"tallies": {a: {"named": t.named, "shown": t.shown, "accuracy": t.accuracy}
                                          for a, t in tallies[s].items()},
                              "class_accuracy": verdicts[s].class_accuracy,
                              "min_target_accuracy": verdicts[s].min_target_accuracy,
                              "min_target_attribute": verdicts[s].min_target_attribute,
                              "min_any_accuracy": verdicts[s].min_any_accuracy,
                              "meets_targets": verdicts[s].meets_targets,
                              "sec_per_image": seconds[s]} for s in scales},
        "chosen_scale": chosen,
        "files": sorted(p.name for p in paths.values()),
    }
    with open(paths["summary.json"], "x", encoding="utf-8") as handle:
        handle.write(json.dumps(_json_safe(document), indent=2) + "\n")
    return list(paths.values())

"""Aggregation and report of the consistency evaluation.

Per (configuration, seed) each metric is averaged over the prompt sets; per configuration the report
gives mean and sample std (ddof 1) over seeds, and, when 'off' was run, each configuration's change
from 'off' paired by seed. Writes results.md, results.csv, sets.csv, timing.csv, summary.json,
mask_iou.csv (with subject masks) and one labelled image grid per configuration, never overwriting a
file. NaN (a value that does not apply) is an empty CSV cell, null in JSON and '–' in markdown. Which metrics are
written, shown and paired is the instrument's `ldm.eval.metric_set.MetricSet`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ldm.eval.configurations import Configuration
from ldm.eval.jobs import SEED_STRIDE, SetResult
from ldm.eval.metric_set import TIMING, MetricSet, finite_mean
from ldm.eval.metrics_v1 import SYNTHETIC_METRICS
from ldm.eval.subject_mask_iou import markdown_section, per_seed_rows
from ldm.generation import image_grid


def per_seed(results: Sequence[SetResult], configurations: Sequence[Configuration],
             seeds: Sequence[int], metric_set: MetricSet = SYNTHETIC_METRICS) -> list[dict[str, Any]]:
    """One row per (configuration, seed): each metric averaged over the prompt sets, plus timing."""
    rows = []
    for configuration in configurations:
        for seed in seeds:
            sets = [r for r in results if r.job.configuration == configuration.name and r.job.seed == seed]
            row: dict[str, Any] = {"configuration": configuration.name, "seed": seed}
            row.update({m: finite_mean([r.metrics[m] for r in sets]) for m in metric_set.descriptions})
            row["sec_per_image"] = sum(r.seconds for r in sets) / sum(len(r.image_seeds) for r in sets)
            row["peak_memory_mb"] = max(r.peak_memory_mb for r in sets)
            rows.append(row)
    return rows


def over_seeds(values: np.ndarray, extremes: bool = False) -> dict[str, Any]:
    """{"mean", "std" (ddof 1)[, "min", "max"], "n_seeds"} of the per-seed `values` that are not NaN."""
    values = values[~np.isnan(values)]
    stats: dict[str, Any] = {"mean": float(values.mean()) if len(values) else math.nan,
                             "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan}
    if extremes:
        stats["min"] = float(values.min()) if len(values) else math.nan
        stats["max"] = float(values.max()) if len(values) else math.nan
    stats["n_seeds"] = int(len(values))
    return stats


def summarize(seed_rows: Sequence[Mapping[str, Any]], configurations: Sequence[Configuration],
              metric_set: MetricSet = SYNTHETIC_METRICS) -> dict[str, dict]:
    """configuration -> metric -> {"mean", "std", "n_seeds"} over the seeds with a value (std ddof 1)."""
    summary: dict[str, dict] = {}
    for configuration in configurations:
        rows = [r for r in seed_rows if r["configuration"] == configuration.name]
        summary[configuration.name] = {}
        for metric in (*metric_set.descriptions, *TIMING):
            values = np.array([r[metric] for r in rows], dtype=np.float64)
            summary[configuration.name][metric] = over_seeds(values)
    return summary


def changes_from_off(seed_rows: Sequence[Mapping[str, Any]], configurations: Sequence[Configuration],
                     metric_set: MetricSet = SYNTHETIC_METRICS) -> dict[str, dict]:
    """configuration -> metric -> {"mean", "std", "min", "max", "n_seeds"} of (value - value of 'off')
    taken seed by seed; empty when 'off' was not run.

    Every configuration generates from the same seeds, and some seeds give alike (or unlike) images in
    every configuration, so the spread over seeds of a configuration's own values is mostly the seeds'
    doing. The per-seed difference from 'off' removes that shared part and leaves what sharing did."""
    baseline = {r["seed"]: r for r in seed_rows if r["configuration"] == "off"}
    if not baseline:
        return {}
    changes: dict[str, dict] = {}
    for configuration in configurations:
        if configuration.name == "off":
            continue
        rows = [r for r in seed_rows if r["configuration"] == configuration.name and r["seed"] in baseline]
        changes[configuration.name] = {}
        for metric in metric_set.paired_columns:
            values = np.array([r[metric] - baseline[r["seed"]][metric] for r in rows], dtype=np.float64)
            changes[configuration.name][metric] = over_seeds(values, extremes=True)
    return changes


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else format(value, ".6g")
    return str(value)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "x", newline="", encoding="utf-8") as handle:  # "x": never overwrite
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[_cell(row[c]) for c in columns] for row in rows])


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _mean_std(entry: Mapping[str, Any], digits: int) -> str:
    mean, std = entry["mean"], entry["std"]
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _change(entry: Mapping[str, Any]) -> str:
    if math.isnan(entry["mean"]):
        return "–"
    text = f"{entry['mean']:+.3f}" if math.isnan(entry["std"]) else f"{entry['mean']:+.3f} ± {entry['std']:.3f}"
    return f"{text} ({entry['min']:+.3f} to {entry['max']:+.3f})" if entry["n_seeds"] > 1 else text


def _changes_table(changes: Mapping[str, dict], configurations: Sequence[Configuration],
                   paired_columns: Sequence[str]) -> list[str]:
    shown = [m for m in paired_columns if any(not math.isnan(changes[name][m]["mean"]) for name in changes)]
    if not changes or not shown:
        return []
    header = ["configuration", *(f"Δ {m}" for m in shown)]
    lines = ["", "Change from `off`, seed by seed: mean ± std over seeds of (value − value of `off` with the same "
             "seed), and in brackets the smallest and largest change over seeds. Every configuration starts "
             "from the same noise, so this difference leaves out the part of the spread above that the seeds "
             "themselves cause.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in configurations:
        if c.name in changes:
            lines.append("| " + " | ".join([f"`{c.name}`", *(_change(changes[c.name][m]) for m in shown)]) + " |")
    return lines


def _detail_table(summary: Mapping[str, dict], configurations: Sequence[Configuration],
                  columns: Sequence[str]) -> list[str]:
    """Per-attribute means (no std, to stay readable), columns with a value in some configuration."""
    shown = [m for m in columns if any(not math.isnan(summary[c.name][m]["mean"]) for c in configurations)]
    if not shown:
        return []
    lines = ["", "Per attribute: mean over seeds of `agree_<attribute>` (prompts leaving it open) and "
                 "`acc_<attribute>` (prompts naming it).", "",
             "| " + " | ".join(["configuration", *shown]) + " |", "|" + "---|" * (len(shown) + 1)]
    for c in configurations:
        means = [summary[c.name][m]["mean"] for m in shown]
        cells = ["–" if math.isnan(mean) else f"{mean:.3f}" for mean in means]
        lines.append("| " + " | ".join([f"`{c.name}`", *cells]) + " |")
    return lines


def markdown_report(summary: Mapping[str, dict], configurations: Sequence[Configuration],
                    run_info: Mapping[str, Any], notes: Sequence[str],
                    changes: Mapping[str, dict] | None = None, metric_set: MetricSet = SYNTHETIC_METRICS,
                    mask_lines: Sequence[str] = ()) -> str:
    shown = [m for m in metric_set.report_columns
             if any(not math.isnan(summary[c.name][m]["mean"]) for c in configurations)]
    header = ["configuration", *shown, "s / image", "peak MB"]
    lines = [
        "# Batch-shared attention: consistency evaluation", "",
        f"Model `{run_info['config']}` (`{run_info['ckpt']}`), DDIM {run_info['steps']} steps, guidance scale "
        f"{run_info['scale']}; {len(run_info['prompts'])} prompt sets of {run_info['set_size']} images, seeds "
        f"{', '.join(map(str, run_info['seeds']))} (image i of a set with seed s starts from seed "
        f"{SEED_STRIDE}*s + i in every configuration); measured with the {run_info['instrument']}.", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]
    for c in configurations:
        cells = [f"`{c.name}`", *(_mean_std(summary[c.name][m], 3) for m in shown),
                 _mean_std(summary[c.name]["sec_per_image"], 3), _mean_std(summary[c.name]["peak_memory_mb"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± std over seeds; a seed's value is the mean over its prompt sets."]
    lines += [*_changes_table(changes or {}, configurations, metric_set.paired_columns)]
    lines += [*_detail_table(summary, configurations, metric_set.detail_columns), *mask_lines, ""]
    lines += [f"- `{m}`: {metric_set.descriptions[m]}" for m in shown]
    lines += ["- `s / image`: " + TIMING["sec_per_image"], "- `peak MB`: " + TIMING["peak_memory_mb"]]
    if notes:
        lines += ["", "Notes:", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def grid_file_name(position: int, name: str) -> str:
    return f"grid-{position:02d}-{re.sub(r'[^A-Za-z0-9._+=-]', '_', name)}.png"


def write_report(outdir: Path, results: Sequence[SetResult], configurations: Sequence[Configuration],
                 run_info: Mapping[str, Any], notes: Sequence[str], metric_set: MetricSet = SYNTHETIC_METRICS
                 ) -> list[Path]:
    """results.md, results.csv (quality, per configuration x seed), sets.csv (per set), timing.csv,
    summary.json, with subject masks measured mask_iou.csv (per configuration x seed x step;
    `ldm.eval.subject_mask_iou`), and one labelled grid per configuration; returns the paths written."""
    results = sorted(results, key=lambda r: r.job.index)
    seeds = list(run_info["seeds"])
    seed_rows = per_seed(results, configurations, seeds, metric_set)
    summary = summarize(seed_rows, configurations, metric_set)
    changes = changes_from_off(seed_rows, configurations, metric_set)
    metrics = list(metric_set.descriptions)
    paths = {name: outdir / name for name in ("results.md", "results.csv", "sets.csv", "timing.csv", "summary.json")}
    write_csv(paths["results.csv"], seed_rows, ["configuration", "seed", *metrics])
    write_csv(paths["timing.csv"], seed_rows, ["configuration", "seed", *TIMING])
    mask_rows = per_seed_rows(results, configurations, seeds)
    if mask_rows:
        paths["mask_iou.csv"] = outdir / "mask_iou.csv"
        write_csv(paths["mask_iou.csv"], mask_rows, ["configuration", "seed", "step", "mask_iou"])
    label_names = sorted({name for r in results for name in r.labels})
    set_rows = [{"configuration": r.job.configuration, "seed": r.job.seed, "set": r.job.set_index,
                 "prompt": r.job.prompt, "image_seeds": " ".join(map(str, r.image_seeds)), **r.metrics,
                 **{f"labels_{n}": "|".join(r.labels.get(n, [])) for n in label_names}} for r in results]
    write_csv(paths["sets.csv"], set_rows, ["configuration", "seed", "set", "prompt", "image_seeds", *metrics,
                                            *(f"labels_{n}" for n in label_names)])
    report = markdown_report(summary, configurations, run_info, notes, changes, metric_set,
                             markdown_section(mask_rows, run_info.get("segmenter_iou")))
    paths["results.md"].write_text(report, encoding="utf-8")
    grids = []
    for position, configuration in enumerate(configurations):
        shown = [r for r in results if r.job.configuration == configuration.name and r.images_png]
        rows = [[Image.open(io.BytesIO(data)) for data in r.images_png] for r in shown]
        labels = [f"{r.job.prompt} (seeds {r.image_seeds[0]}-{r.image_seeds[-1]})" for r in shown]
        grids.append(outdir / grid_file_name(position, configuration.name))
        image_grid(rows, row_labels=labels).save(grids[-1], format="PNG")
    document = {"run": dict(run_info), "configurations": [c.as_metadata() for c in configurations],
                "summary": summary, "change_from_off": changes, "metrics": dict(metric_set.descriptions),
                "timing": TIMING, "notes": list(notes),
                "files": sorted(p.name for p in [*paths.values(), *grids])}
    paths["summary.json"].write_text(json.dumps(_json_safe(document), indent=2) + "\n", encoding="utf-8")
    return [*paths.values(), *grids]

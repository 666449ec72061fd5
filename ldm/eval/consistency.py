"""Consistency evaluation of batch-shared attention: metrics, configurations, the run and its report.

A *prompt set* is `set_size` images of one prompt generated together in one batch: sharing acts
within it. A *job* is one (configuration, seed, prompt set); image i of a set with seed s starts from
the noise of seed `s * SEED_STRIDE + i`, the same in every configuration, so differences between
configurations come from sharing alone. Each job is measured on its own:

- subject consistency: pairwise agreement, within the set, of the predicted labels of every
  attribute (class, colour, pattern) the prompt does not name (`ldm.data.synthetic.parse_prompt`),
  and the mean pairwise cosine similarity of the images' features;
- prompt alignment: accuracy of the class and of the colour / pattern the prompt names (with a CLIP
  feature model: the cosine of the image and prompt embeddings instead);
- layout diversity: the spread (population std) of predicted x, y and size within the set.
  Sharing is meant to make appearance consistent without collapsing layouts.

Per (configuration, seed) the set values are averaged over prompt sets; per configuration the
report gives mean and sample std (ddof 1) over seeds. A value that does not apply (an attribute the
prompt names has no agreement, one it leaves open no accuracy) is NaN and written as an empty cell.

Images are measured as the 8-bit pictures the report shows, (B, 3, H, W) in [-1, 1] for the
classifier, PIL images for `transformers` processors. Quality numbers (results.csv, sets.csv) are
identical for identical arguments on the CPU; times and memory (timing.csv) are not.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.data.synthetic import parse_prompt
from ldm.generation import UsageError, decode_to_images, generate_latents, image_grid, precision_scope
from ldm.modules.shared_attention import PATHS, SharedAttentionSettings, select_layers, valid_group_names

SEED_STRIDE = 1000  # image i of the set with seed s uses seed s * SEED_STRIDE + i
DEFAULT_PROMPTS = ("a chair", "a table", "a lamp", "a vase", "a red chair", "a striped vase")
DEFAULT_OUTPUT_ROOT = Path("outputs") / "consistency"
NAMED_ATTRIBUTES = ("cls", "colour", "pattern")  # what a prompt may name (`parse_prompt` keys)
LAYOUT_TARGETS = ("x", "y", "size")

METRICS: dict[str, str] = {
    "agreement": "pairwise agreement within a set of the attributes the prompt leaves open "
                 "(mean over class, colour, pattern not named)",
    "agree_cls": "pairwise class agreement within a set (prompts naming no class)",
    "agree_colour": "pairwise colour agreement within a set (prompts naming no colour)",
    "agree_pattern": "pairwise pattern agreement within a set (prompts naming no pattern)",
    "feature_sim": "mean pairwise cosine similarity of image features within a set",
    "acc_cls": "share of images of the class the prompt names",
    "acc_colour": "share of images of the colour the prompt names",
    "acc_pattern": "share of images of the pattern the prompt names",
    "acc_specified": "accuracy of the colour / pattern the prompt names (mean over those named)",
    "text_image": "cosine similarity of CLIP image and prompt embeddings (raw, not x100)",
    "spread_x": "std within a set of the predicted horizontal position (fraction of the image side)",
    "spread_y": "std within a set of the predicted vertical position (fraction of the image side)",
    "spread_size": "std within a set of the predicted size scale",
}
TIMING: dict[str, str] = {
    "sec_per_image": "seconds per image, sampling and decoding (not measuring)",
    "peak_memory_mb": "peak memory: CUDA max_memory_allocated per set; on the CPU the process's peak RSS "
                      "(ru_maxrss), a high-water mark that never decreases as configurations run in order",
}
# The columns of results.md, in order (columns empty for every configuration are left out).
REPORT_COLUMNS = ("agreement", "agree_colour", "agree_pattern", "feature_sim", "acc_cls", "acc_specified",
                  "text_image", "spread_x", "spread_y", "spread_size")


# ---------------------------------------------------------------------------------------------------
# Metrics of one prompt set
# ---------------------------------------------------------------------------------------------------
def pairwise_agreement(labels: Sequence[str]) -> float:
    """Share of the unordered pairs of images with equal labels; NaN for fewer than two images."""
    pairs = list(combinations(labels, 2))
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else math.nan


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of rows of `features` (B, D); NaN for B < 2."""
    b = features.shape[0]
    if b < 2:
        return math.nan
    unit = F.normalize(features.double().flatten(1), dim=-1)  # (B, D)
    similarity = unit @ unit.T  # (B, B)
    return float((similarity.sum() - similarity.diagonal().sum()) / (b * (b - 1)))


def spread(values: Sequence[float]) -> float:
    """Population std of the values; NaN for fewer than two (no spread within one image)."""
    if len(values) < 2:
        return math.nan
    array = np.asarray(values, dtype=np.float64)
    # Deviations from one of the values leave the std unchanged and make equal values give exactly 0.
    return float(np.std(array - array[0]))


def finite_mean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def named_attributes(prompt: str) -> dict[str, str]:
    """The class / colour / pattern a prompt names, e.g. 'a red chair' -> {cls: chair, colour: red}."""
    try:
        return {k: v for k, v in parse_prompt(prompt).items() if v is not None}
    except ValueError as error:
        raise UsageError(f"{error}; change or drop the prompt") from None


def unspecified_attributes(prompt: str) -> tuple[str, ...]:
    """The attributes a prompt leaves open, which sharing should make agree within a set."""
    named = named_attributes(prompt)
    return tuple(a for a in NAMED_ATTRIBUTES if a not in named)


def blank_metrics() -> dict[str, float]:
    return {name: math.nan for name in METRICS}


def attribute_metrics(prompt: str, predictions: Mapping[str, Any]) -> dict[str, float]:
    """Agreement, accuracy and layout spread of one set from the classifier's `predict` output
    (labels under "cls", "colour", "pattern"; (B,) values under "x", "y", "size")."""
    named = named_attributes(prompt)
    metrics = blank_metrics()
    for attribute in NAMED_ATTRIBUTES:
        labels = list(predictions[attribute])
        if attribute in named:
            metrics[f"acc_{attribute}"] = sum(label == named[attribute] for label in labels) / len(labels)
        else:
            metrics[f"agree_{attribute}"] = pairwise_agreement(labels)
    metrics["agreement"] = finite_mean([metrics[f"agree_{a}"] for a in NAMED_ATTRIBUTES])
    metrics["acc_specified"] = finite_mean([metrics["acc_colour"], metrics["acc_pattern"]])
    for target in LAYOUT_TARGETS:
        metrics[f"spread_{target}"] = spread([float(v) for v in predictions[target]])
    return metrics


# ---------------------------------------------------------------------------------------------------
# Instruments: what measures the images
# ---------------------------------------------------------------------------------------------------
def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])  # (B, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]


class AttributeInstrument:
    """The attribute classifier of `ldm.eval.attribute_classifier` (for the synthetic-object models)."""

    description = "attribute classifier"

    def __init__(self, classifier: torch.nn.Module, device: torch.device) -> None:
        self.classifier, self.device = classifier.to(device).eval(), device

    def measure(self, prompt: str, images: Sequence[Image.Image]) -> tuple[dict[str, float], dict[str, list[str]]]:
        """(metrics, predicted labels per attribute) of one set."""
        x = images_to_tensor(images).to(self.device)
        predictions = self.classifier.predict(x)
        metrics = attribute_metrics(prompt, predictions)
        metrics["feature_sim"] = mean_pairwise_cosine(self.classifier.features(x))
        labels = {name: list(predictions[name]) for name in (*NAMED_ATTRIBUTES, "facing")}
        return metrics, labels


class FeatureModelInstrument:
    """A `transformers` image model: DINO-style (`AutoModel`, CLS token) or CLIP (`CLIPModel`, projected
    embeddings, plus the prompt for a text-image score). Loaded from local files only."""

    def __init__(self, kind: str, model: torch.nn.Module, processor: Any, device: torch.device) -> None:
        self.kind, self.model, self.processor, self.device = kind, model.to(device).eval(), processor, device
        self.description = f"{kind} image features of `{getattr(model, 'name_or_path', '') or type(model).__name__}`"

    @classmethod
    def load(cls, kind: str, name_or_path: str, device: torch.device) -> "FeatureModelInstrument":
        import transformers
        if kind not in ("dino", "clip"):
            raise UsageError(f"--features {kind!r} is not known; use dino or clip")
        model_class, processor_class = ((transformers.CLIPModel, transformers.CLIPProcessor) if kind == "clip"
                                        else (transformers.AutoModel, transformers.AutoImageProcessor))
        try:
            processor = processor_class.from_pretrained(name_or_path, local_files_only=True)
            model = model_class.from_pretrained(name_or_path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise UsageError(f"--feature-model {name_or_path}: cannot load a {kind} model from local files "
                             f"({error}). Nothing is downloaded: give a folder written by save_pretrained or "
                             "a hub id already in the Hugging Face cache") from None
        return cls(kind, model, processor, device)

    @staticmethod
    def _embedding(output: Any) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output holds the projection; older
        # versions return the tensor itself.
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, D) features of PIL images."""
        image_processor = self.processor.image_processor if self.kind == "clip" else self.processor
        pixels = image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        if self.kind == "clip":
            return self._embedding(self.model.get_image_features(pixel_values=pixels)).float()
        return self.model(pixel_values=pixels).last_hidden_state[:, 0].float()  # (B, D): the CLS token

    @torch.no_grad()
    def text_features(self, prompt: str) -> torch.Tensor:
        """(1, D) CLIP embedding of the prompt."""
        tokens = self.processor.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        return self._embedding(self.model.get_text_features(**tokens)).float()

    def measure(self, prompt: str, images: Sequence[Image.Image]) -> tuple[dict[str, float], dict[str, list[str]]]:
        metrics = blank_metrics()
        features = self.image_features(images)
        metrics["feature_sim"] = mean_pairwise_cosine(features)
        if self.kind == "clip":
            cosines = F.cosine_similarity(features.double(), self.text_features(prompt).double(), dim=-1)  # (B,)
            metrics["text_image"] = float(cosines.mean())
        return metrics, {}


# ---------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Configuration:
    """A named way of generating: `sharing` None means plain generation."""

    name: str
    sharing: Optional[SharedAttentionSettings]

    def as_metadata(self) -> dict[str, Any]:
        return {"name": self.name, "sharing": self.sharing.as_metadata() if self.sharing else None}


CONFIGURATION_SYNTAX = ("GROUPS[@OPTION...]: GROUPS joined by '+' (all, down, mid, up, up.32, 32, ...), OPTION "
                        "START:END (step window), s=STRENGTH, anchor or anchor=K; or 'off', 'anchor' (= all@anchor=1), "
                        "'default' (the default list)")


def parse_configuration(spec: str) -> Configuration:
    """'up@0:0.3', 'mid+up@s=-1', 'all@anchor=2', 'off', 'anchor' -> a Configuration named `spec`."""
    name = spec.strip()
    if name == "off":
        return Configuration("off", None)
    groups, *options = ("all@anchor=1" if name == "anchor" else name).split("@")
    values: dict[str, Any] = {"groups": tuple(g.strip() for g in groups.split("+") if g.strip())}
    try:
        for option in options:
            if ":" in option:
                start, end = option.split(":")
                values["steps"] = (float(start), float(end))
            elif option.startswith("s="):
                values["strength"] = float(option[2:])
            elif option == "anchor" or option.startswith("anchor="):
                values["mode"], values["anchors"] = "anchor", int(option.partition("=")[2] or 1)
            else:
                raise ValueError(f"unknown option {option!r}")
        return Configuration(name, SharedAttentionSettings(**values))
    except ValueError as error:
        raise UsageError(f"configuration {name!r}: {error}. Syntax: {CONFIGURATION_SYNTAX}") from None


def default_configuration_specs(unet: torch.nn.Module) -> list[str]:
    """off, all, the paths, each level whose layers differ from every earlier entry's (so mid.8 alone
    is not listed twice), one-anchor mode, and sharing over the first half of the steps."""
    valid = valid_group_names(unet)
    specs = ["off", "all", *(p for p in PATHS if p in valid)]
    seen = [frozenset(name for name, _ in select_layers(unet, [spec])) for spec in specs[1:]]
    for level in (name for name in valid if name.isdigit()):
        layers = frozenset(name for name, _ in select_layers(unet, [level]))
        if layers not in seen:
            specs.append(level)
            seen.append(layers)
    return [*specs, "anchor", "all@0:0.5"]


def resolve_configurations(specs: Optional[Sequence[str]], unet: torch.nn.Module) -> list[Configuration]:
    """Parse and check `specs` against the model's layer groups ('default' expands; None = default)."""
    expanded: list[str] = []
    for spec in specs or ["default"]:
        expanded += default_configuration_specs(unet) if spec.strip() == "default" else [spec.strip()]
    duplicates = sorted({s for s in expanded if expanded.count(s) > 1})
    if duplicates:
        raise UsageError(f"configuration(s) {', '.join(duplicates)} listed twice (note 'default' already holds "
                         f"{', '.join(default_configuration_specs(unet))})")
    configurations = [parse_configuration(spec) for spec in expanded]
    for configuration in configurations:
        if configuration.sharing is not None:
            try:
                select_layers(unet, configuration.sharing.groups)
            except ValueError as error:
                raise UsageError(f"configuration {configuration.name!r}: {error}") from None
    return configurations


# ---------------------------------------------------------------------------------------------------
# Jobs and their results
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One prompt set of one configuration and seed; `index` is its place in the full, ordered list."""

    index: int
    configuration: str
    seed: int
    set_index: int
    prompt: str


def image_seeds(seed: int, set_size: int) -> list[int]:
    return [seed * SEED_STRIDE + i for i in range(set_size)]


def make_jobs(configurations: Sequence[Configuration], seeds: Sequence[int], prompts: Sequence[str]) -> list[Job]:
    """Every (configuration, seed, prompt set), ordered by configuration, then seed, then set."""
    triples = [(c.name, s, p) for c in configurations for s in seeds for p in range(len(prompts))]
    return [Job(i, name, seed, p, prompts[p]) for i, (name, seed, p) in enumerate(triples)]


@dataclass
class SetResult:
    job: Job
    image_seeds: list[int]
    metrics: dict[str, float]
    labels: dict[str, list[str]]
    seconds: float
    peak_memory_mb: float
    images_png: list[bytes] = field(default_factory=list)  # only for the seed shown in the grids


@dataclass(frozen=True)
class Sampling:
    """How every set is generated: DDIM with eta 0, latents of `shape` (C, h, w)."""

    shape: tuple[int, int, int]
    steps: int
    scale: float
    set_size: int
    precision: str = "full"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
    except ImportError:  # not on Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10  # bytes on macOS, KiB on Linux


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class SetRunner:
    """Generates and measures jobs with one model, sampler and instrument."""

    def __init__(self, model: Any, sampler: Any, instrument: Any, configurations: Sequence[Configuration],
                 sampling: Sampling, device: torch.device) -> None:
        self.model, self.sampler, self.instrument = model, sampler, instrument
        self.sampling, self.device = sampling, device
        self.sharing = {c.name: c.sharing for c in configurations}

    def images(self, prompt: str, seeds: Sequence[int], sharing: Optional[SharedAttentionSettings],
               steps: Optional[int] = None) -> list[Image.Image]:
        s = self.sampling
        with precision_scope(s.precision, self.device):
            latents = generate_latents(self.model, self.sampler, [prompt] * len(seeds), list(seeds), shape=s.shape,
                                       steps=steps or s.steps, scale=s.scale, sharing=sharing)
            return decode_to_images(self.model, latents)

    def warm_up(self, prompt: str) -> None:
        """One short untimed run, so the first configuration's time does not include first-call costs."""
        self.images(prompt, image_seeds(0, self.sampling.set_size), None, steps=1)

    def run(self, job: Job, keep_images: bool) -> SetResult:
        seeds = image_seeds(job.seed, self.sampling.set_size)
        reset_peak_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        images = self.images(job.prompt, seeds, self.sharing[job.configuration])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        memory = peak_memory_mb(self.device)
        metrics, labels = self.instrument.measure(job.prompt, images)
        return SetResult(job, seeds, metrics, labels, seconds, memory,
                         [png_bytes(image) for image in images] if keep_images else [])


# ---------------------------------------------------------------------------------------------------
# Aggregation and report
# ---------------------------------------------------------------------------------------------------
def per_seed(results: Sequence[SetResult], configurations: Sequence[Configuration],
             seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per (configuration, seed): each metric averaged over the prompt sets, plus timing."""
    rows = []
    for configuration in configurations:
        for seed in seeds:
            sets = [r for r in results if r.job.configuration == configuration.name and r.job.seed == seed]
            row: dict[str, Any] = {"configuration": configuration.name, "seed": seed}
            row.update({m: finite_mean([r.metrics[m] for r in sets]) for m in METRICS})
            row["sec_per_image"] = sum(r.seconds for r in sets) / sum(len(r.image_seeds) for r in sets)
            row["peak_memory_mb"] = max(r.peak_memory_mb for r in sets)
            rows.append(row)
    return rows


def summarize(seed_rows: Sequence[Mapping[str, Any]], configurations: Sequence[Configuration]) -> dict[str, dict]:
    """configuration -> metric -> {"mean", "std", "n_seeds"} over the seeds with a value (std ddof 1)."""
    summary: dict[str, dict] = {}
    for configuration in configurations:
        rows = [r for r in seed_rows if r["configuration"] == configuration.name]
        summary[configuration.name] = {}
        for metric in (*METRICS, *TIMING):
            values = np.array([r[metric] for r in rows if not math.isnan(r[metric])], dtype=np.float64)
            summary[configuration.name][metric] = {
                "mean": float(values.mean()) if len(values) else math.nan,
                "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                "n_seeds": int(len(values)),
            }
    return summary


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


def markdown_report(summary: Mapping[str, dict], configurations: Sequence[Configuration],
                    run_info: Mapping[str, Any], notes: Sequence[str]) -> str:
    shown = [m for m in REPORT_COLUMNS if any(not math.isnan(summary[c.name][m]["mean"]) for c in configurations)]
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
    lines += ["", "Mean ± std over seeds; a seed's value is the mean over its prompt sets.", ""]
    lines += [f"- `{m}`: {METRICS[m]}" for m in shown]
    lines += ["- `s / image`: " + TIMING["sec_per_image"], "- `peak MB`: " + TIMING["peak_memory_mb"]]
    if notes:
        lines += ["", "Notes:", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def grid_file_name(position: int, name: str) -> str:
    return f"grid-{position:02d}-{re.sub(r'[^A-Za-z0-9._+=-]', '_', name)}.png"


def write_report(outdir: Path, results: Sequence[SetResult], configurations: Sequence[Configuration],
                 run_info: Mapping[str, Any], notes: Sequence[str]) -> list[Path]:
    """results.md, results.csv (quality, per configuration x seed), sets.csv (per set), timing.csv,
    summary.json and one labelled grid per configuration; returns the paths written."""
    results = sorted(results, key=lambda r: r.job.index)
    seeds = list(run_info["seeds"])
    seed_rows = per_seed(results, configurations, seeds)
    summary = summarize(seed_rows, configurations)
    paths = {name: outdir / name for name in ("results.md", "results.csv", "sets.csv", "timing.csv", "summary.json")}
    write_csv(paths["results.csv"], seed_rows, ["configuration", "seed", *METRICS])
    write_csv(paths["timing.csv"], seed_rows, ["configuration", "seed", *TIMING])
    label_names = sorted({name for r in results for name in r.labels})
    set_rows = [{"configuration": r.job.configuration, "seed": r.job.seed, "set": r.job.set_index,
                 "prompt": r.job.prompt, "image_seeds": " ".join(map(str, r.image_seeds)), **r.metrics,
                 **{f"labels_{n}": "|".join(r.labels.get(n, [])) for n in label_names}} for r in results]
    write_csv(paths["sets.csv"], set_rows, ["configuration", "seed", "set", "prompt", "image_seeds", *METRICS,
                                            *(f"labels_{n}" for n in label_names)])
    paths["results.md"].write_text(markdown_report(summary, configurations, run_info, notes), encoding="utf-8")
    grids = []
    for position, configuration in enumerate(configurations):
        shown = [r for r in results if r.job.configuration == configuration.name and r.images_png]
        rows = [[Image.open(io.BytesIO(data)) for data in r.images_png] for r in shown]
        labels = [f"{r.job.prompt} (seeds {r.image_seeds[0]}-{r.image_seeds[-1]})" for r in shown]
        grids.append(outdir / grid_file_name(position, configuration.name))
        image_grid(rows, row_labels=labels).save(grids[-1], format="PNG")
    document = {"run": dict(run_info), "configurations": [c.as_metadata() for c in configurations],
                "summary": summary, "metrics": METRICS, "timing": TIMING, "notes": list(notes),
                "files": sorted(p.name for p in [*paths.values(), *grids])}
    paths["summary.json"].write_text(json.dumps(_json_safe(document), indent=2) + "\n", encoding="utf-8")
    return [*paths.values(), *grids]


# ---------------------------------------------------------------------------------------------------
# The whole run, on one process or sharded over several (ldm.eval.distributed)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalRequest:
    """Everything a run needs, already checked by the script. `features` None = attribute classifier."""

    config_path: Path
    ckpt_path: Path
    configurations: tuple[Configuration, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    sampling: Sampling
    outdir: Optional[Path] = None  # None: a new numbered folder under DEFAULT_OUTPUT_ROOT
    device: str = "auto"
    use_ema: bool = False
    features: Optional[str] = None
    feature_model: Optional[str] = None
    classifier_path: Optional[Path] = None
    threads: int = 1
    synthetic_model: bool = True  # a model trained on ldm.data.synthetic, which the classifier reads


def check_output_folder(outdir: Optional[Path]) -> None:
    """Refuse an `outdir` that holds anything: results are never overwritten."""
    if outdir is not None and outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise UsageError(f"--outdir {outdir} already exists and is not an empty folder; this script never "
                         "overwrites results: choose a new folder or leave --outdir out for a numbered one")


def create_output_folder(outdir: Optional[Path]) -> Path:
    """`outdir` if it does not exist or is empty; without one, the next outputs/consistency/run-NNNN."""
    if outdir is not None:
        check_output_folder(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        return outdir
    DEFAULT_OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in DEFAULT_OUTPUT_ROOT.iterdir() if (m := re.fullmatch(r"run-(\d+)", p.name))]
    number = max(numbers, default=-1) + 1
    while True:
        try:
            (DEFAULT_OUTPUT_ROOT / f"run-{number:04d}").mkdir()  # exclusive: a concurrent run takes the next
            return DEFAULT_OUTPUT_ROOT / f"run-{number:04d}"
        except FileExistsError:
            number += 1


def _instrument(request: EvalRequest, device: torch.device) -> Any:
    if request.features is not None:
        return FeatureModelInstrument.load(request.features, request.feature_model, device)
    from ldm.eval.attribute_classifier import load_attribute_classifier
    return AttributeInstrument(load_attribute_classifier(request.classifier_path, device=device), device)


def _notes(request: EvalRequest) -> list[str]:
    notes = []
    if len(request.seeds) < 3:
        notes.append(f"only {len(request.seeds)} seed(s): the spread over seeds is unreliable (use 3 or more)")
    if request.features is not None:
        notes.append(f"--features {request.features}: the attribute classifier was not used, so agreement, "
                     "accuracy and layout spread are left empty")
    elif not request.synthetic_model:
        notes.append("the attribute classifier was trained on the synthetic objects of ldm.data.synthetic; "
                     "for other models its labels mean little (use --features dino or clip)")
    if request.sampling.set_size < 2:
        notes.append("sets of one image: nothing is shared, and within-set scores are empty")
    return notes


def evaluate(request: EvalRequest) -> Optional[Path]:
    """Generate and measure every job, write the report; returns the output folder (None on ranks > 0)."""
    from ldm.checkpoint import load_model_from_config
    from ldm.eval.distributed import broadcast_from_main, gather_to_main, process_group, shard
    from ldm.generation import choose_device, make_sampler
    from omegaconf import OmegaConf
    from tqdm import tqdm

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(request.threads)  # CPU results can depend on the thread count
    try:
        with process_group(choose_device(request.device)) as group:
            instrument = _instrument(request, group.device)  # before the slow model load: it may be missing
            torch.manual_seed(0)  # nothing should draw from the global generator; a stray draw stays reproducible
            model = load_model_from_config(OmegaConf.load(request.config_path), request.ckpt_path,
                                           use_ema=request.use_ema, device=group.device,
                                           verbose=group.is_main).float()  # fp16 files run in float32
            runner = SetRunner(model, make_sampler("ddim", model), instrument, request.configurations,
                               request.sampling, group.device)
            outcome: tuple[Optional[str], Optional[str]] = (None, None)
            if group.is_main:
                try:
                    outcome = (str(create_output_folder(request.outdir)), None)
                except UsageError as error:
                    outcome = (None, str(error))
            folder, error = broadcast_from_main(outcome, group)  # every rank stops on rank 0's error
            if error:
                raise UsageError(error)
            jobs = shard(make_jobs(request.configurations, request.seeds, request.prompts), group)
            runner.warm_up(request.prompts[0])
            mine = [runner.run(job, keep_images=job.seed == request.seeds[0])
                    for job in tqdm(jobs, desc="prompt sets", disable=not group.is_main)]
            results = gather_to_main(mine, group)
            if not group.is_main:
                return None
            on_cuda_in_half = request.sampling.precision == "autocast" and group.device.type == "cuda"
            run_info = {
                "config": str(request.config_path), "ckpt": request.ckpt_path.name, "sampler": "ddim", "eta": 0.0,
                "steps": request.sampling.steps, "scale": request.sampling.scale,
                "set_size": request.sampling.set_size, "latent_shape": list(request.sampling.shape),
                "prompts": list(request.prompts), "seeds": list(request.seeds), "seed_stride": SEED_STRIDE,
                "instrument": runner.instrument.description, "device": str(group.device),
                "precision": "float16 autocast" if on_cuda_in_half else "float32", "threads": request.threads,
                "processes": group.world_size, "torch": torch.__version__,
            }
            write_report(Path(folder), results, request.configurations, run_info, _notes(request))
            return Path(folder)
    finally:
        torch.set_num_threads(previous_threads)

"""Consistency evaluation of batch-shared attention: the whole run, on one process or sharded.

A *prompt set* is `set_size` images of one prompt generated together in one batch: sharing acts
within it. A *job* is one (configuration, seed, prompt set); image i of a set with seed s starts from
the noise of seed `s * SEED_STRIDE + i`, the same in every configuration, so differences between
configurations come from sharing alone. Each job is measured on its own:

With the synthetic objects of v1 (the default; the world v2 below):

- subject consistency: pairwise agreement, within the set, of the predicted labels of every
  attribute (class, colour, pattern) the prompt does not name (`ldm.data.synthetic.parse_prompt`),
  and the mean pairwise cosine similarity of the images' features;
- prompt alignment: accuracy of the class and of the colour / pattern the prompt names (with a CLIP
  feature model: the cosine of the image and prompt embeddings instead);
- layout diversity: the spread (population std) of predicted x, y and size within the set.
  Sharing is meant to make appearance consistent without collapsing layouts.

With the world v2 (ldm/data/world.py; `world` "v2"), a scene classifier and a subject segmenter
measure each set (`ldm.eval.metrics_v2`): agreement of every attribute the prompts leave open, colour
similarity inside the subject masks, diversity of the backgrounds (labels and colours outside the
masks), accuracy of every named attribute and of the class, layout spreads and mask overlap. A set
may be a story, one prompt per image (`ldm.eval.prompt_sets`).

Per (configuration, seed) the set values are averaged over prompt sets; per configuration the
report gives mean and sample std (ddof 1) over seeds. A value that does not apply (an attribute the
prompt names has no agreement, one it leaves open no accuracy) is NaN and written as an empty cell.

Images are measured as the 8-bit pictures the report shows, (B, 3, H, W) in [-1, 1] for the
classifier, PIL images for `transformers` processors. Quality numbers (results.csv, sets.csv) are
identical for identical arguments on the CPU; times and memory (timing.csv) are not.

The parts, each in its own module of `ldm.eval`:

- `metrics`, `metrics_v2`: the metrics of one prompt set (v1, world v2) and their descriptions;
- `prompt_sets`: the default prompt sets and stories (one prompt per image);
- `instruments`: what measures the images (attribute classifier, world v2 classifier and segmenter,
  DINO / CLIP feature models);
- `configurations`: the configurations compared, their syntax and the default list;
- `jobs`: jobs, their results and `SetRunner`, which generates and measures one job;
- `report`: aggregation over sets and seeds and the files written;
- `distributed`: sharding the jobs over processes;
- this module: the whole run (`EvalRequest`, `evaluate`) and its output folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ldm.eval.configurations import Configuration
from ldm.eval.instruments import AttributeInstrument, FeatureModelInstrument, load_world_instruments
from ldm.eval.jobs import SEED_STRIDE, Sampling, SetRunner, make_jobs
from ldm.eval.prompt_sets import SYNTHETIC_PROMPTS, WORLD_V2_PROMPTS
from ldm.eval.report import write_report
from ldm.generation.outputs import check_output_folder, new_numbered_folder

DEFAULT_PROMPTS_BY_WORLD = {"v1": SYNTHETIC_PROMPTS, "v2": WORLD_V2_PROMPTS}
DEFAULT_OUTPUT_ROOT = Path("outputs") / "consistency"
# Where scripts/train_world_instruments.py writes the world v2 instruments (configs/demo/v2/README.md).
WORLD_V2_CLASSIFIER = Path("models") / "demo" / "v2" / "scene_classifier.safetensors"
WORLD_V2_SEGMENTER = Path("models") / "demo" / "v2" / "segmenter.safetensors"


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
    model_world: Optional[str] = "v2"  # the synthetic world the model draws (None: another model)
    world: str = "v2"  # the instruments: "v2" (classifier_path, segmenter_path) or "v1" (the attribute classifier)
    segmenter_path: Optional[Path] = None


def check_results_folder(outdir: Optional[Path], root: Optional[Path] = None) -> None:
    """Refuse an `outdir` that holds anything (results are never overwritten) or cannot be written
    (without one: `root`, default DEFAULT_OUTPUT_ROOT read at the call, where a numbered folder will go)."""
    root = DEFAULT_OUTPUT_ROOT if root is None else root
    if outdir is not None and outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise FileExistsError(f"output folder {outdir} already exists and is not an empty folder; this run never "
                              "overwrites results: choose a new folder, or none for a numbered one")
    check_output_folder(outdir if outdir is not None else root)


def create_output_folder(outdir: Optional[Path], root: Optional[Path] = None) -> Path:
    """`outdir` if it does not exist or is empty; without one, the next `root`/run-NNNN
    (DEFAULT_OUTPUT_ROOT, outputs/consistency, read at the call, so a test can redirect it)."""
    root = DEFAULT_OUTPUT_ROOT if root is None else root
    if outdir is None:
        return new_numbered_folder(root, "run-")
    check_results_folder(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    return outdir


def _instrument(request: EvalRequest, device: torch.device) -> Any:
    if request.features is not None:
        return FeatureModelInstrument.load(request.features, request.feature_model, device)
    if request.world == "v2":
        return load_world_instruments(request.classifier_path or WORLD_V2_CLASSIFIER,
                                      request.segmenter_path or WORLD_V2_SEGMENTER, device)
    from ldm.eval.attribute_classifier import load_attribute_classifier
    return AttributeInstrument(load_attribute_classifier(request.classifier_path, device=device), device)


def segmenter_iou(segmenter_path: Path) -> Optional[dict[str, float]]:
    """The segmenter's IoU against the renderer's masks on held-out renders, {"clean", "degraded"}, from
    the instruments.json scripts/train_world_instruments.py writes beside it; None where it is missing."""
    record = Path(segmenter_path).parent / "instruments.json"
    try:
        values = json.loads(record.read_text(encoding="utf-8"))["segmenter_iou"]
        return {kind: float(values[kind]) for kind in ("clean", "degraded")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _notes(request: EvalRequest) -> list[str]:
    notes = []
    if len(request.seeds) < 3:
        notes.append(f"only {len(request.seeds)} seed(s): the spread over seeds is unreliable (use 3 or more)")
    if request.features is not None:
        notes.append(f"--features {request.features}: the attribute classifier was not used, so agreement, "
                     "accuracy and layout spread are left empty")
    elif request.model_world is None:
        notes.append(f"the world {request.world} instruments were trained on that synthetic world's renders; "
                     "for other models their labels mean little (use --features dino or clip)")
    elif request.model_world != request.world:
        notes.append(f"the world {request.world} instruments read that world's images, but this model draws the "
                     f"world {request.model_world}, so their labels mean little for it (use --world "
                     f"{request.model_world})")
    if request.sampling.set_size < 2:
        notes.append("sets of one image: nothing is shared, and within-set scores are empty")
    return notes


def evaluate(request: EvalRequest) -> Optional[Path]:
    """Generate and measure every job, write the report; returns the output folder (None on ranks > 0)."""
    from ldm.eval.distributed import broadcast_from_main, gather_to_main, process_group, shard
    from ldm.generation.model import choose_device, load_model, precision_used
    from tqdm import tqdm

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(request.threads)  # CPU results can depend on the thread count
    try:
        with process_group(choose_device(request.device)) as group:
            instrument = _instrument(request, group.device)  # before the slow model load: it may be missing
            torch.manual_seed(0)  # nothing should draw from the global generator; a stray draw stays reproducible
            model = load_model(request.config_path, request.ckpt_path, use_ema=request.use_ema, device=group.device,
                               verbose=group.is_main)
            runner = SetRunner(model, instrument, request.configurations, request.sampling, group.device)
            outcome: tuple[Optional[str], Optional[str]] = (None, None)
            if group.is_main:
                try:
                    outcome = (str(create_output_folder(request.outdir)), None)
                except OSError as error:
                    outcome = (None, str(error))
            folder, error = broadcast_from_main(outcome, group)  # every rank stops on rank 0's error
            if error:
                raise FileExistsError(error)
            jobs = shard(make_jobs(request.configurations, request.seeds, request.prompts), group)
            runner.warm_up(request.prompts[0])
            mine = [runner.run(job, keep_images=job.seed == request.seeds[0])
                    for job in tqdm(jobs, desc="prompt sets", disable=not group.is_main)]
            results = gather_to_main(mine, group)
            if not group.is_main:
                return None
            native = model.geometry.native_size
            run_info = {
                "config": str(request.config_path), "ckpt": request.ckpt_path.name,
                "ckpt_fingerprint": model.source["ckpt_fingerprint"], "sampler": "ddim", "eta": 0.0,
                "steps": request.sampling.steps, "scale": request.sampling.scale,
                "set_size": request.sampling.set_size, "latent_shape": list(model.geometry.latent_shape(native, native)),
                "prompts": list(request.prompts), "seeds": list(request.seeds), "seed_stride": SEED_STRIDE,
                "instrument": runner.instrument.description, "device": str(group.device),
                "precision": precision_used(request.sampling.precision, group.device), "threads": request.threads,
                "processes": group.world_size, "torch": torch.__version__, "world": request.world,
            }
            if request.world == "v2":
                run_info["segmenter_iou"] = segmenter_iou(request.segmenter_path or WORLD_V2_SEGMENTER)
            write_report(Path(folder), results, request.configurations, run_info, _notes(request),
                         runner.instrument.metric_set)
            return Path(folder)
    finally:
        torch.set_num_threads(previous_threads)

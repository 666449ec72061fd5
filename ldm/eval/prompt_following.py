"""Prompt following of a world v2 model: does each image show what its caption names?

Captions come from the world v2 grammar on a *held-out data seed*: item i of
`ldm.data.scenes.WorldScenes(seed=s, mention_prob=0.5)` is the caption the training data would have
had at that seed (the same distribution of named attributes as in training, each applicable one
with probability 1/2), but the demo model v2 trained on data seed `TRAINING_DATA_SEED` only, so
these (scene, caption) draws are new to it. Caption i of seed s is generated from noise seed
`s * NOISE_STRIDE + i`, the same at every guidance scale, so scales are compared image by image.
Images are generated plainly (no sharing) through the generation core (`ldm.generation.generate`:
DDIM, eta 0, the model's native size) and read back by the world v2 scene classifier
(`ldm.eval.scene_classifier`), as the 8-bit pictures a user sees.

An attribute is *named* by a caption when `ldm.data.prompts.parse_prompt` reads it there (the one
grammar); an image *shows* it when the classifier's label equals the named value (a None label, a
subject without that attribute, is wrong). Per scale and attribute the tally is (named, shown);
accuracy is shown / named. The subject is named by every caption: its accuracy is class accuracy.

Targets: class accuracy >= CLASS_TARGET and, for every attribute of TARGET_ATTRIBUTES
(the ones the issue lists: colour, pattern, wall, floor, every face attribute), accuracy >=
ATTRIBUTE_TARGET. Size, facing and position are named too and reported, but are not in the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

import torch
from PIL import Image

from ldm.data.prompts import caption, parse_prompt
from ldm.data.scenes import WorldScenes
from ldm.data.world import FACE_ATTRIBUTES, VOCABULARY
from ldm.errors import InvalidValue

if TYPE_CHECKING:
    from ldm.eval.scene_classifier import SceneClassifier
    from ldm.generation.model import LoadedModel

TRAINING_DATA_SEED = 2  # configs/demo/v2/demo-train.yaml, data.params.seed (both UNet stages)
# Far from every data seed of the v2 recipe (0-3 and 99): never seen by the UNet, the autoencoder or
# the instruments.
HELD_OUT_SEED = 1000
MENTION_PROB = 0.5  # as in training (configs/demo/v2/demo-train.yaml)
NOISE_STRIDE = 1_000_000  # caption i of data seed s starts from noise seed s * NOISE_STRIDE + i
# 800 captions of seed 1000 name every attribute at least 74 times (faces are 1 subject in 5 and each
# face attribute is named half the time); 10-19 min per scale on one thread for the 64 px demo model
# (v1's, the same UNet: 0.74 s per image on the idle machine, ANSWERS.md; 1.43 s of CPU time per image
# measured under load, configs/demo/v2/README.md).
DEFAULT_PROMPT_COUNT = 800
DEFAULT_SCALES = (2.0, 3.0, 5.0, 7.5)
TARGET_ATTRIBUTES: tuple[str, ...] = ("colour", "pattern", "wall", "floor", *FACE_ATTRIBUTES)
ATTRIBUTES: tuple[str, ...] = tuple(VOCABULARY)  # reported: the subject (class) and every attribute
ATTRIBUTE_TARGET = 0.85
CLASS_TARGET = 0.95
DEFAULT_OUTPUT_ROOT = Path("outputs") / "prompt-following"


@dataclass(frozen=True)
class HeldOutCaption:
    """Caption `index` of data seed `data_seed`, what it names, and the noise seed its image starts from."""

    data_seed: int
    index: int
    prompt: str
    named: dict[str, str]

    @property
    def noise_seed(self) -> int:
        return self.data_seed * NOISE_STRIDE + self.index


def check_held_out_seeds(seeds: Sequence[int], count: int) -> None:
    """Distinct non-negative seeds other than the UNet's training data seed; 1 <= count <= NOISE_STRIDE."""
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise InvalidValue("seeds", ",".join(map(str, seeds)), "give distinct non-negative data seeds, e.g. 1000")
    if TRAINING_DATA_SEED in seeds:
        raise InvalidValue("seeds", TRAINING_DATA_SEED, "is the demo model v2's training data seed, so its captions "
                                                        f"are not held out; use another, e.g. {HELD_OUT_SEED}")
    if max(seeds) >= 2 ** 63 // NOISE_STRIDE:
        raise InvalidValue("seeds", max(seeds), f"is too large; data seeds must be below {2 ** 63 // NOISE_STRIDE}")
    if not 1 <= count <= NOISE_STRIDE:
        raise InvalidValue("count", count, f"the number of captions per seed must be between 1 and {NOISE_STRIDE}")


def held_out_captions(seed: int, count: int, mention_prob: float = MENTION_PROB) -> list[HeldOutCaption]:
    """Captions 0..count-1 of `WorldScenes(seed)`, as the training data would caption them (nothing rendered)."""
    data = WorldScenes(count, seed=seed, mention_prob=mention_prob)
    captions = []
    for index in range(count):
        scene, named = data.scene(index)
        text = caption(scene, named)  # the grammar's writer; parse_prompt, its reader, says what is named
        captions.append(HeldOutCaption(seed, index, text, parse_prompt(text)))
    return captions


@dataclass(frozen=True)
class ImageReading:
    """One generated image: its caption, the guidance scale and the classifier's label per attribute."""

    caption: HeldOutCaption
    scale: float
    labels: dict[str, Optional[str]]

    def shows(self, attribute: str) -> Optional[bool]:
        """Whether the image shows the named value of `attribute`; None when the caption does not name it."""
        wanted = self.caption.named.get(attribute)
        return None if wanted is None else self.labels[attribute] == wanted


@dataclass(frozen=True)
class Tally:
    named: int
    shown: int

    @property
    def accuracy(self) -> float:
        return self.shown / self.named if self.named else math.nan


def tally(readings: Sequence[ImageReading]) -> dict[str, Tally]:
    """attribute -> (named, shown) over `readings`, for every attribute of ATTRIBUTES."""
    counts = {a: [0, 0] for a in ATTRIBUTES}
    for reading in readings:
        for attribute in ATTRIBUTES:
            judged = reading.shows(attribute)
            if judged is not None:
                counts[attribute][0] += 1
                counts[attribute][1] += int(judged)
    return {a: Tally(named, shown) for a, (named, shown) in counts.items()}


@dataclass(frozen=True)
class ScaleVerdict:
    """The issue's targets at one scale."""

    class_accuracy: float
    min_target_accuracy: float  # over TARGET_ATTRIBUTES named at least once
    min_target_attribute: str
    min_any_accuracy: float  # over every named attribute but the subject
    meets_targets: bool


def verdict(tallies: Mapping[str, Tally]) -> ScaleVerdict:
    """Class accuracy, the minimum over the target attributes and whether every target holds. An unnamed
    target attribute fails the targets (nothing shows that the model follows it)."""
    targets = {a: tallies[a].accuracy for a in TARGET_ATTRIBUTES}
    judged = {a: v for a, v in targets.items() if not math.isnan(v)}
    weakest = min(judged, key=lambda a: (judged[a], TARGET_ATTRIBUTES.index(a))) if judged else ""
    others = [tallies[a].accuracy for a in ATTRIBUTES if a != "subject" and tallies[a].named]
    class_accuracy = tallies["subject"].accuracy
    meets = (len(judged) == len(targets) and class_accuracy >= CLASS_TARGET
             and all(v >= ATTRIBUTE_TARGET for v in judged.values()))
    return ScaleVerdict(class_accuracy, judged[weakest] if judged else math.nan, weakest,
                        min(others) if others else math.nan, meets)


def choose_scale(verdicts: Mapping[float, ScaleVerdict]) -> float:
    """The selection rule of configs/demo/v2/README.md: the highest minimum target-attribute accuracy,
    ties to the lower scale; a scale where no target attribute was named ranks last."""
    def rank(scale: float) -> tuple[float, float]:
        weakest = verdicts[scale].min_target_accuracy
        return (-weakest if not math.isnan(weakest) else math.inf, scale)
    return min(verdicts, key=rank)


@dataclass(frozen=True)
class PromptFollowingRequest:
    """Everything a measurement needs, checked by the script before the model loads."""

    config_path: Path
    ckpt_path: Path
    classifier_path: Path
    seeds: tuple[int, ...] = (HELD_OUT_SEED,)
    count: int = DEFAULT_PROMPT_COUNT
    scales: tuple[float, ...] = DEFAULT_SCALES
    steps: int = 25
    batch_size: int = 16
    threads: int = 1
    device: str = "cpu"
    precision: str = "full"
    outdir: Optional[Path] = None  # None: a new outputs/prompt-following/run-NNNN
    grid_images: int = 8  # the first images of every scale in the grid, one row per scale

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        check_held_out_seeds(self.seeds, self.count)
        if not self.scales or len(set(self.scales)) != len(self.scales):
            raise InvalidValue("scales", ",".join(map(str, self.scales)),
                               "give distinct guidance scales, e.g. 2,3,5,7.5")
        for scale in self.scales:
            if not math.isfinite(scale) or scale <= 0:
                raise InvalidValue("scales", scale, "a guidance scale must be a positive finite number")
        for name in ("steps", "batch_size", "threads", "grid_images"):
            if getattr(self, name) < 1:
                raise InvalidValue(name, getattr(self, name), "must be at least 1")


def generate_and_read(model: "LoadedModel", classifier: "SceneClassifier", captions: Sequence[HeldOutCaption],
                      scale: float, request: PromptFollowingRequest,
                      progress: Optional[Callable[[], None]] = None) -> tuple[list[ImageReading], list[Image.Image]]:
    """Generate one image per caption at `scale` (no sharing) and read it with `classifier`.

    Captions must be consecutive items of one data seed, so that the request's seeds (first + k) are
    their noise seeds. `progress` is called after every sampler step."""
    from ldm.eval.instruments import images_to_tensor
    from ldm.generation.generate import generate
    from ldm.generation.request import GenerationRequest

    first = captions[0].noise_seed
    if [c.noise_seed for c in captions] != list(range(first, first + len(captions))):
        raise ValueError("captions must be consecutive items of one data seed")
    generation = GenerationRequest(prompt=tuple(c.prompt for c in captions), seed=first,
                                   batch_size=request.batch_size, sampler="ddim", steps=request.steps, scale=scale,
                                   eta=0.0, precision=request.precision)
    result = generate(model, generation, progress=(lambda _: progress()) if progress else None)
    images = result.images
    readings = []
    for start in range(0, len(images), request.batch_size):
        chunk = images[start:start + request.batch_size]
        labels = classifier.predict(images_to_tensor(chunk).to(next(classifier.parameters()).device))
        for offset in range(len(chunk)):
            readings.append(ImageReading(captions[start + offset], scale, {a: labels[a][offset] for a in ATTRIBUTES}))
    return readings, images


def evaluate_prompt_following(request: PromptFollowingRequest, show_progress: bool = True) -> Path:
    """Generate, read and report every (scale, seed, caption); returns the output folder."""
    import time

    from tqdm import tqdm

    from ldm.eval.consistency import create_output_folder
    from ldm.eval.instruments import load_world_classifier
    from ldm.eval.prompt_following_report import write_report
    from ldm.generation.model import choose_device, load_model

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(request.threads)  # CPU results can depend on the thread count
    try:
        device = choose_device(request.device)
        classifier = load_world_classifier(request.classifier_path, device)  # before the slow model load
        captions = {seed: held_out_captions(seed, request.count) for seed in request.seeds}
        torch.manual_seed(0)  # nothing should draw from the global generator; a stray draw stays reproducible
        model = load_model(request.config_path, request.ckpt_path, device=device, verbose=False)
        outdir = create_output_folder(request.outdir, DEFAULT_OUTPUT_ROOT)
        batches = -(-request.count // request.batch_size)
        bar = tqdm(total=len(request.scales) * len(request.seeds) * batches * request.steps, unit="step",
                   desc="prompt following", disable=not show_progress)
        readings: list[ImageReading] = []
        shown: dict[float, list[Image.Image]] = {}
        seconds: dict[float, float] = {}
        try:
            for scale in request.scales:
                start = time.perf_counter()
                for seed in request.seeds:
                    read, images = generate_and_read(model, classifier, captions[seed], scale, request,
                                                     progress=lambda: bar.update(1))
                    readings += read
                    shown.setdefault(scale, images[:request.grid_images])
                seconds[scale] = (time.perf_counter() - start) / (len(request.seeds) * request.count)
        finally:
            bar.close()
        run_info = {"config": str(request.config_path), "ckpt": request.ckpt_path.name,
                    "ckpt_fingerprint": model.source["ckpt_fingerprint"], "classifier": request.classifier_path.name,
                    "seeds": list(request.seeds), "count": request.count, "scales": list(request.scales),
                    "steps": request.steps, "sampler": "ddim", "eta": 0.0, "batch_size": request.batch_size,
                    "mention_prob": MENTION_PROB, "noise_stride": NOISE_STRIDE, "threads": request.threads,
                    "device": str(device), "precision": request.precision, "torch": torch.__version__,
                    "sharing": None}
        write_report(outdir, readings, shown, seconds, run_info)
        return outdir
    finally:
        torch.set_num_threads(previous_threads)


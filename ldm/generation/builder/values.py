"""What a front end collects for a run, as plain values, and the model-dependent defaults.

`RunValues` holds what the command line's flags or the web page's form carry, typed but unchecked
(None: not given, so the model's default). Field names are the request's where they coincide
(`batch_size`, `steps`, ...), so one table of flag names serves both; the sharing options are
`SharingValues`, under the fields `sharing.*`.

Defaults that differ between Stable Diffusion v1 (CompVis' values) and the shipped demo model
(CPU-quick) are filled by `with_model_defaults`, so a value given explicitly always wins.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from ldm.errors import SettingsError
from ldm.generation.limits import Limits
from ldm.generation.model import DEMO_SCALE

if TYPE_CHECKING:
    from ldm.generation.reference import Reference

SD_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
SD_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEMO_CONFIG = "configs/demo/v2/demo-inference.yaml"  # ldm.generation.model.DEMO_CONFIG, relative to the repository
DEMO_CKPT = "models/demo/v2/demo.safetensors"

# Defaults that depend on the model, by RunValues field: SD v1 (CompVis' txt2img) and the demo model.
SD_DEFAULTS: Mapping[str, Any] = dict(config=SD_CONFIG, ckpt=SD_CKPT, steps=50, scale=7.5, batch_size=3, n_iter=2)
DEMO_DEFAULTS: Mapping[str, Any] = dict(config=DEMO_CONFIG, ckpt=DEMO_CKPT, steps=25, scale=DEMO_SCALE, batch_size=4,
                                        n_iter=1)


@dataclass(frozen=True)
class SharingValues:
    """The batch-sharing options as typed (None: not given). `groups` None turns sharing off."""

    groups: Optional[str] = None  # "all", "mid,up.32", ...
    mode: Optional[str] = None
    anchors: Optional[int] = None
    steps: Optional[str] = None  # "START:END" fractions, e.g. "0:0.4"
    strength: Optional[float] = None
    # "WORD[,WORD...]" for each subject: a tuple (a repeated flag) or one text, subjects separated by ';'
    subjects: Union[None, str, tuple[str, ...]] = None
    dropout: Optional[float] = None
    adain: Optional[bool] = None
    subject_sharing: Optional[str] = None  # "pooled" or "isolated"

    def given(self) -> list[str]:
        """The options other than `groups` that were given, in field order."""
        return [name for name in ("mode", "anchors", "steps", "strength", "subjects", "dropout", "adain",
                                  "subject_sharing") if getattr(self, name) is not None]


@dataclass(frozen=True)
class RunValues:
    """A run as a front end collects it; `ldm.generation.builder.prepare_run` checks it."""

    # what to generate
    prompt: Optional[str] = None  # one text for every image
    prompts: Optional[tuple[str, ...]] = None  # or one text per image
    prompt_file: Optional[str] = None  # or a file of them, one per line
    negative_prompt: str = ""
    seed: int = 42
    batch_size: Optional[int] = None
    n_iter: Optional[int] = None
    fixed_code: bool = False
    sampler: str = "ddim"
    steps: Optional[int] = None
    scale: Optional[float] = None
    eta: float = 0.0
    height: Optional[int] = None
    width: Optional[int] = None
    init_image: Optional[str] = None  # a file: image-to-image
    strength: float = 0.75
    mask_image: Optional[str] = None  # a file: inpainting
    sharing: SharingValues = field(default_factory=SharingValues)
    compare: bool = False
    references: tuple[Union[str, "Reference"], ...] = ()  # files, or references read already
    reference_prompt: str = ""
    reference_cache: bool = True
    # the model
    demo: bool = False
    config: Optional[str] = None
    ckpt: Optional[str] = None
    use_ema: bool = False
    device: str = "auto"
    precision: str = "autocast"
    channels: Optional[int] = None  # the latent channels the user expects (checked against the config)
    factor: Optional[int] = None  # the autoencoder factor the user expects (checked against the config)
    # where the results go (None: nowhere checked; the caller saves them)
    outdir: Optional[str] = None
    save_samples: bool = True
    save_grid: bool = True
    images_per_row: int = 0  # 0: the batch size
    limits: Limits = field(default_factory=Limits)  # how large a run may be (Limits.none(): no bound)


def model_defaults(demo: bool, config: Optional[str] = None, ckpt: Optional[str] = None,
                   sd_defaults: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The defaults of the model a run uses: the demo model's, or SD v1's (`sd_defaults` overrides some,
    e.g. CompVis' img2img batch and guidance); the demo model takes no other config or checkpoint."""
    if demo and any(given not in (None, DEMO_DEFAULTS[name]) for name, given in (("config", config), ("ckpt", ckpt))):
        raise SettingsError("{demo} uses the shipped demo model; drop {demo} to give {config} and {ckpt}",
                            "demo", "config", "ckpt")
    return dict(DEMO_DEFAULTS) if demo else {**SD_DEFAULTS, **(sd_defaults or {})}


def with_model_defaults(values: RunValues, sd_defaults: Optional[Mapping[str, Any]] = None) -> RunValues:
    """`values` with every model-dependent value that was not given set to the model's default."""
    defaults = model_defaults(values.demo, values.config, values.ckpt, sd_defaults)
    return replace(values, **{name: default for name, default in defaults.items() if getattr(values, name) is None})

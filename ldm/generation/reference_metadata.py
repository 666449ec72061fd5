"""A reference PNG's metadata, bounded and type-checked before it drives anything.

A reference PNG says how to make its batch again (prompts, seeds, sampler, steps, size, ...), and that
batch is then generated: a tampered file could ask for 5,000 images, a seed torch cannot take, an index
outside its batch, a prompt of a megabyte, or pixels that are not the ones its metadata made (a resized
copy). `check_reference_metadata` refuses all of these, naming the key and what goes there, before the
metadata is used; the batch is bounded by the run's own limits. The sharing settings it records are the
sharing settings type's to check (`SharedAttentionSettings.from_metadata`), called here.
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Callable, Mapping

from PIL import Image

from ldm.errors import InvalidValue, format_value
from ldm.generation.limits import MAX_SEED, Limits
from ldm.sharing import SharedAttentionSettings

MAX_LATENT_CHANNELS = 256
FACTORS = tuple(2 ** k for k in range(7))  # autoencoder factors: 1 .. 64


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# key -> (test of its value, what goes there)
KINDS: Mapping[str, tuple[Callable[[Any], bool], str]] = {
    "prompt": (lambda v: isinstance(v, str), "a text"), "negative_prompt": (lambda v: isinstance(v, str), "a text"),
    "seed": (_whole, "a whole number"), "batch_index": (_whole, "a whole number"),
    "batch_prompts": (_texts, "a list of texts"),
    "batch_seeds": (lambda v: isinstance(v, list) and all(_whole(s) for s in v), "a list of whole numbers"),
    "sampler": (lambda v: isinstance(v, str), "a sampler name"), "steps": (_whole, "a whole number"),
    "scale": (_finite, "a finite number"), "eta": (_finite, "a finite number"),
    "H": (_whole, "a whole number"), "W": (_whole, "a whole number"), "C": (_whole, "a whole number"),
    "f": (_whole, "a whole number"),
    "references": (_texts, "a list of file names"), "ckpt": (lambda v: isinstance(v, str), "a file name"),
    "ckpt_fingerprint": (lambda v: isinstance(v, str), "a fingerprint"),
}


def check_reference_metadata(metadata: Mapping[str, Any], path: Path, image: Image.Image,
                             limits: Limits = Limits()) -> None:
    """Refuse metadata that is of the wrong type, out of range, inconsistent, or that does not describe
    `image` (the file's pixels); InvalidValue("references", path, ...) naming the key."""
    def refuse(problem: str) -> InvalidValue:
        return InvalidValue("references", str(path), f"{problem}; give a PNG this project wrote, unchanged")

    for key, (test, kind) in KINDS.items():
        if key in metadata and not test(metadata[key]):
            raise refuse(f"its metadata's {key} is {format_value(metadata[key])[:80]!r}, where {kind} goes")
    m = metadata
    count = len(m["batch_prompts"])
    if not 1 <= count <= limits.max_batch_size or len(m["batch_seeds"]) != count:
        raise refuse(f"its metadata describes a batch of {count} prompts and {len(m['batch_seeds'])} seeds; a batch "
                     f"has as many of each, from 1 to {limits.max_batch_size:g}")
    if not 0 <= m["batch_index"] < count:
        raise refuse(f"its metadata's batch_index {m['batch_index']} is outside its batch of {count}")
    if any(not 0 <= seed <= MAX_SEED for seed in m["batch_seeds"]) or m["seed"] != m["batch_seeds"][m["batch_index"]]:
        raise refuse("its metadata's seeds are not those of one batch (whole numbers from 0 to 2**63 - 1, the "
                     "image's own among them)")
    if m["prompt"] != m["batch_prompts"][m["batch_index"]]:
        raise refuse("its metadata's prompt is not its batch's prompt at its batch_index")
    longest = max(len(text) for text in [*m["batch_prompts"], m["negative_prompt"]])
    if longest > limits.max_prompt_chars:
        raise refuse(f"its metadata holds a prompt of {longest} characters, more than {limits.max_prompt_chars:g}")
    if not 1 <= m["steps"] <= limits.max_steps:
        raise refuse(f"its metadata's steps {m['steps']} is not from 1 to {limits.max_steps:g}")
    if not 1 <= m["C"] <= MAX_LATENT_CHANNELS or m["f"] not in FACTORS:
        raise refuse(f"its metadata's latent channels C {m['C']} and factor f {m['f']} describe no autoencoder")
    for key in ("H", "W"):
        if not m["f"] <= m[key] <= limits.max_side or m[key] % m["f"]:
            raise refuse(f"its metadata's {key} {m[key]} is not a multiple of f from {m['f']} to {limits.max_side:g}")
    if image.size != (m["W"], m["H"]):
        raise refuse(f"its pixels are {image.width}x{image.height} but its metadata says {m['W']}x{m['H']}: it was "
                     "resized or cropped after it was made, so its batch cannot be made again")
    try:
        SharedAttentionSettings.from_metadata(m.get("shared_attention"))
    except InvalidValue as error:
        raise refuse(f"its metadata's shared_attention settings cannot be made again ({error.field}: "
                     f"{error.problem})") from None

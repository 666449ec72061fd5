"""The page's form, made from txt2img's argparse options, and a submitted form turned back into flags.

Fields: the prompt (one text for every image, or one line per image), the basic sampling flags
(`BASIC_FLAGS`) and every option of `add_shared_attention_arguments`, the CLI's shared-attention
group, except two that the page sets itself: --shared-attn (the layer groups, shown as one checkbox
per group name of the model) and --compare (always on with sharing: the page shows both rows).
An option added to that group later appears on the page as a field of its kind, with its --help text
as the explanation: a checkbox for a flag without a value, a list for one with choices, a text box
otherwise.

A submitted form is a JSON object whose keys are the fields' flags (plus "prompt", "per_image" and
"groups"), its values strings as typed. `form_argv` writes each as one `--flag=value` token (so a
value starting with '-' stays a value) and leaves empty fields out, which means the CLI's default.
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from ldm.cli import UsageError, add_sampling_arguments, add_shared_attention_arguments

# Sampling flags the page shows, with the label it gives each.
BASIC_FLAGS = {"--n_samples": "images", "--seed": "seed", "--ddim_steps": "steps", "--scale": "guidance scale",
               "--negative-prompt": "negative prompt"}
# Shared-attention flags the page sets itself instead of showing a field.
PAGE_SET_FLAGS = ("--shared-attn", "--compare")
SHARING_PREFIX = "--shared-attn-"


@dataclass(frozen=True)
class FormField:
    """One field of the form: the CLI flag it sets, how it is shown and what it starts with."""

    flag: str  # e.g. "--ddim_steps"; also the field's key in a submitted form
    label: str
    help: str
    kind: str  # "text", "checkbox" or "select"
    choices: tuple[str, ...] = ()
    value: str = ""  # what the box starts with; "" leaves the CLI's default
    many: bool = False  # the flag takes several values (typed separated by spaces)


def _actions(add_arguments: Callable[[argparse.ArgumentParser], None]) -> list[argparse.Action]:
    """The options `add_arguments` defines, read from a throwaway parser."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return [action for action in parser._actions if action.option_strings]


def _help_text(action: argparse.Action) -> str:
    """--help's text for the option, with argparse's %-placeholders filled in."""
    text = action.help or ""
    try:
        return text % {**vars(action), "prog": "txt2img"}
    except (KeyError, TypeError, ValueError):
        return text.replace("%%", "%")


def _field(action: argparse.Action, label: str, value: Any = None) -> FormField:
    flag = max(action.option_strings, key=len)
    if action.nargs == 0:  # store_true and the like: the flag alone
        return FormField(flag, label, _help_text(action), "checkbox")
    shown = "" if value is None else str(value)
    if action.choices is not None:
        return FormField(flag, label, _help_text(action), "select", tuple(str(c) for c in action.choices), shown)
    many = action.nargs not in (None, "?")
    return FormField(flag, label, _help_text(action), "text", value=shown, many=many)


def basic_fields(defaults: argparse.Namespace) -> list[FormField]:
    """The sampling fields, filled with `defaults` (txt2img's options for the page's model)."""
    by_flag = {max(a.option_strings, key=len): a for a in _actions(add_sampling_arguments)}
    return [_field(by_flag[flag], label, getattr(defaults, by_flag[flag].dest, None))
            for flag, label in BASIC_FLAGS.items()]


def sharing_fields() -> list[FormField]:
    """Every shared-attention option of the CLI but the two the page sets itself; empty by default."""
    fields = []
    for action in _actions(add_shared_attention_arguments):
        flag = max(action.option_strings, key=len)
        if flag in PAGE_SET_FLAGS:
            continue
        name = flag[len(SHARING_PREFIX):] if flag.startswith(SHARING_PREFIX) else flag.lstrip("-")
        fields.append(_field(action, name.replace("-", " ").replace("_", " ")))
    return fields


def per_image_prompts(values: Mapping[str, Any]) -> Optional[list[str]]:
    """The prompts, one per image, when the form asks for that; None for one prompt for every image."""
    if not values.get("per_image"):
        return None
    prompts = [line.strip() for line in str(values.get("prompt", "")).splitlines() if line.strip()]
    if not prompts:
        raise UsageError("the prompt box is empty: write one prompt per line, one image each")
    return prompts


def form_argv(values: Mapping[str, Any], fields: Sequence[FormField], prompt_file: Path) -> list[str]:
    """A submitted form as txt2img flags; per-image prompts are read from `prompt_file` (the caller
    writes `per_image_prompts(values)` there), and there are as many images as prompts."""
    prompts = per_image_prompts(values)
    if prompts is None:
        argv = ["--prompt=" + " ".join(str(values.get("prompt", "")).split())]
    else:
        argv = [f"--from-file={prompt_file}", f"--n_samples={len(prompts)}"]
    groups = values.get("groups") or []
    if not isinstance(groups, list):
        raise UsageError("the layer groups must be a list of group names")
    groups = [str(group) for group in groups]
    if groups:
        argv += ["--shared-attn=" + ",".join(groups), "--compare"]
    for field in fields:
        value = values.get(field.flag)
        if field.kind == "checkbox":
            argv += [field.flag] if value else []
        elif prompts is not None and field.flag == "--n_samples":
            continue  # one image per prompt
        elif value is not None and str(value).strip():
            text = str(value).strip()
            argv += [field.flag, *shlex.split(text)] if field.many else [f"{field.flag}={text}"]
    return argv

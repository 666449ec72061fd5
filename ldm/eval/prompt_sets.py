"""Prompt sets of the consistency evaluation: one line of a prompt file per set, and the default lists.

A line is either one prompt, repeated for every image of the set, or a *story*: prompts joined by
STORY_SEPARATOR, one per image ("a red chair in a green room | a red chair in a blue room"); image i
of the set gets part i mod k of a k-part story, so a story of 4 fills a set of 4 exactly. Stories are
read by the world v2 grammar (`ldm.data.prompts.parse_prompt`) only: the synthetic objects' parser of
v1 reads a line as one prompt.
"""
from __future__ import annotations

from typing import Sequence, Union

from ldm.data.prompts import parse_prompt
from ldm.errors import InvalidValue

STORY_SEPARATOR = "|"

# v1 (ldm.data.synthetic): a class alone, a named colour, a named pattern.
SYNTHETIC_PROMPTS = ("a chair", "a table", "a lamp", "a vase", "a red chair", "a striped vase")
# The world v2 (ldm.data.world): subjects alone, named subject attributes, a named background the same
# in every image, stories whose backgrounds differ within the set (the subject named alike, or left
# open), and faces with and without named attributes.
WORLD_V2_PROMPTS = (
    "a chair",
    "a lamp",
    "a red striped chair",
    "a vase in a green room",
    "a table on a wooden floor",
    "a red chair in a green room | a red chair in a blue room | a red chair on grass | a red chair on a tiled floor",
    "a lamp in a white room | a lamp in a yellow room | a lamp on a carpet | a lamp on a wooden floor",
    "a face",
    "a face with glasses",
    "a face with curly blond hair wearing a red shirt",
    "a face against a blue background | a face against a red background | a face against a green background "
    "| a face against a white background",
)


def is_story(line: str) -> bool:
    return STORY_SEPARATOR in line


def story_parts(line: str) -> tuple[str, ...]:
    """The prompts of a line: its parts for a story, else (line,); refuses an empty part."""
    parts = tuple(part.strip() for part in line.split(STORY_SEPARATOR))
    if not all(parts):
        raise InvalidValue("prompt", line, f"a story has an empty part; write prompts joined by ' {STORY_SEPARATOR} '")
    return parts


def image_prompts(line: str, set_size: int) -> tuple[str, ...]:
    """The prompt of every image of a set of `set_size` images (image i: part i mod k)."""
    parts = story_parts(line)
    return tuple(parts[i % len(parts)] for i in range(set_size))


def generation_prompt(line: str, set_size: int) -> Union[str, tuple[str, ...]]:
    """What the generation core gets: the line itself for one repeated prompt, the per-image prompts
    for a story (`ldm.generation.request.GenerationRequest.prompt`)."""
    return image_prompts(line, set_size) if is_story(line) else line


def check_world_prompt_sets(lines: Sequence[str]) -> None:
    """Every prompt of every line reads in the world v2 grammar (an InvalidValue naming the word if not)."""
    for line in lines:
        for part in story_parts(line):
            parse_prompt(part)


def refuse_stories(lines: Sequence[str]) -> None:
    """The synthetic objects' metrics read one prompt per set: a story is an error there."""
    for line in lines:
        if is_story(line):
            raise InvalidValue("prompt", line, "is a story (one prompt per image), which only the world v2's "
                                               "instruments measure")

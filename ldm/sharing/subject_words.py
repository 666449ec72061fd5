"""Where each subject is named in each prompt: the text tokens whose cross-attention makes its mask.

A subject is a tuple of words, alternatives of one another (`SharedAttentionSettings.subjects`); its
tokens in a prompt are the tokens of every occurrence of any of its words. A word written `WORD#N`
names the N-th occurrence of WORD alone, so two subjects of one kind can be told apart by the order
in which a prompt names them ("a face with glasses and a face with red hair": `face#1`, `face#2`).

Checked before anything runs, each an `InvalidValue` of `subjects` naming the image:
- every prompt names every subject (at least N occurrences for `WORD#N`);
- with several subjects, a prompt that names one of them more than once (without `#N`) is ambiguous:
  which occurrence is that subject, and which might be another's? The error suggests `#N`.
With a single subject every occurrence counts, as it always has ("a chair next to a chair").
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from ldm.errors import InvalidValue

Positions = list[list[tuple[int, ...]]]  # [subject][image] -> token positions (0 = the start token)


def prompt_words(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", prompt.lower())


def split_occurrence(word: str) -> tuple[str, Optional[int]]:
    """'face#2' -> ('face', 2); 'chair' -> ('chair', None). Lower-cased."""
    text, _, number = word.lower().partition("#")
    return text, int(number) if number else None


def _describe(words: Sequence[str]) -> str:
    return ",".join(words)


def check_prompts_name_subjects(prompts: Sequence[str], subjects: Sequence[Sequence[str]]) -> None:
    """Every prompt names every subject, unambiguously when there are several (see the module docstring)."""
    for words in subjects:
        for index, prompt in enumerate(prompts):
            counts = prompt_words(prompt)
            present = 0
            for word in words:
                text, number = split_occurrence(word)
                found = counts.count(text)
                present += found >= (number or 1)
                if len(subjects) > 1 and number is None and found > 1:
                    raise InvalidValue("subjects", _describe(words),
                                       f"the prompt of image {index} ({prompt!r}) names {text!r} {found} times, so "
                                       f"which one is this subject is ambiguous; write {text}#1, {text}#2, ... for "
                                       "the first, second ... occurrence")
            if not present:
                raise InvalidValue("subjects", _describe(words),
                                   f"the prompt of image {index} ({prompt!r}) contains none of the subject words "
                                   f"{_describe(words)!r}; name the subject in every prompt or change its words")


def _runs(ids: Sequence[int], run: Sequence[int]) -> list[int]:
    """Start indices of every occurrence of the id sequence `run` in `ids`."""
    return [start for start in range(len(ids) - len(run) + 1) if list(ids[start:start + len(run)]) == list(run)]


def subject_token_positions(tokenizer, prompts: Sequence[str], subjects: Sequence[Sequence[str]],
                            max_length: int = 77) -> Positions:
    """For each subject and each prompt, the positions (in the text encoder's sequence, 0 = the start
    token) of the tokens of its words' occurrences (the N-th only, for `WORD#N`). The CLIP tokenizer
    encodes a lower-case word the same alone as inside a sentence, so a word's tokens are found as a
    run of its own ids."""
    check_prompts_name_subjects(prompts, subjects)
    out: Positions = []
    for words in subjects:
        wanted = [(tokenizer.encode(text), number) for text, number in map(split_occurrence, words)]
        per_image = []
        for index, prompt in enumerate(prompts):
            ids = tokenizer.encode(prompt)
            found: set[int] = set()
            for run, number in wanted:
                starts = _runs(ids, run)
                if number is not None:
                    starts = starts[number - 1:number]
                for start in starts:
                    found.update(range(1 + start, 1 + start + len(run)))  # +1: the start token
            found = {p for p in found if p < max_length - 1}
            if not found:
                raise InvalidValue("subjects", _describe(words),
                                   f"the subject words of the prompt of image {index} ({prompt!r}) are not within "
                                   f"its first {max_length - 2} tokens; shorten the prompt")
            per_image.append(tuple(sorted(found)))
        out.append(per_image)
    return out


def per_subject(positions: Sequence) -> Positions:
    """Token positions as [subject][image]; one subject's positions given as [image] (a sequence of
    sequences of ints, as for a single subject) are taken as that one subject's."""
    items = list(positions)
    one_subject = all(isinstance(p, int) for image in items for p in image)
    if one_subject:
        return [[tuple(image) for image in items]]
    return [[tuple(image) for image in per_image] for per_image in items]

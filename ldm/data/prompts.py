"""The one prompt grammar of the world v2: scenes -> captions (`caption`), prompts -> attributes (`parse_prompt`).

Training captions, evaluation prompt sets and the command line all go through these two functions,
so a word means the same thing everywhere. A caption always names the subject and any chosen
subset of its other attributes (`ldm.data.world.attributes_of`):

    a chair
    a small red striped chair facing left on the left in a green room on a wooden floor
    a lamp on grass
    a face with dark skin, curly blond hair and glasses wearing a red shirt against a blue background
    a face with no glasses

What a prompt does not name is left to `ldm.data.world.sample_scene` (`scene_for_prompt`).
The parser reads the words the captions use plus a few synonyms (plurals, "stripes", "wood floor",
"spectacles", "backdrop" ...). Context decides what a colour word belongs to: "red hair", "a red
shirt", "a red room", "a red background", otherwise the furniture's colour. A word the world does
not know, two values for one attribute, or face and furniture words together are refused with an
`InvalidValue` naming the word, so a typo never silently becomes "unnamed".
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

import numpy as np

from ldm.data.world import APPLIES_TO, VOCABULARY, Scene, attributes_of, sample_scene
from ldm.errors import InvalidValue

PATTERN_CAPTION = {"solid": "plain", "striped": "striped", "dotted": "dotted", "checked": "checked"}
POSITION_CAPTION = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
FLOOR_CAPTION = {"wood": "on a wooden floor", "tiles": "on a tiled floor", "carpet": "on a carpet",
                 "grass": "on grass"}

SUBJECT_WORDS = {**{s: s for s in VOCABULARY["subject"]}, **{s + "s": s for s in VOCABULARY["subject"]},
                 "portrait": "face", "person": "face"}
PATTERN_WORDS = {"plain": "solid", "solid": "solid", "striped": "striped", "stripes": "striped",
                 "stripy": "striped", "dotted": "dotted", "dots": "dotted", "spotted": "dotted",
                 "polka": "dotted", "checked": "checked", "checkered": "checked", "chequered": "checked",
                 "checks": "checked"}
SIZE_WORDS = {"small": "small", "little": "small", "medium": "medium", "large": "large", "big": "large"}
POSITION_WORDS = {"left": "left", "right": "right", "centre": "centre", "center": "centre", "middle": "centre"}
FLOOR_WORDS = {"wooden": "wood", "wood": "wood", "tiled": "tiles", "tiles": "tiles", "tile": "tiles",
               "carpet": "carpet", "carpeted": "carpet", "rug": "carpet", "grass": "grass", "grassy": "grass",
               "lawn": "grass"}
HAIR_COLOUR_WORDS = {**{c: c for c in VOCABULARY["hair_colour"]}, "blonde": "blond", "gray": "grey"}
BACKGROUND_COLOUR_WORDS = {**{c: c for c in VOCABULARY["wall"]}, "gray": "grey"}
HAIR_WORDS = {**{w: ("hair_colour", c) for w, c in HAIR_COLOUR_WORDS.items()},
              **{s: ("hair_style", s) for s in VOCABULARY["hair_style"]}}
# Head words that claim the colour word(s) before them.
SHIRT_HEADS = ("shirt", "shirts", "top", "jumper", "sweater")
WALL_HEADS = ("room", "rooms", "wall", "walls")
BACKDROP_HEADS = ("background", "backdrop")
GLASSES_HEADS = ("glasses", "spectacles", "specs")
NEGATIONS = ("no", "without")
STOP_WORDS = frozenset("a an the with and in on of at wearing against front before floor facing to "
                       "is photo picture image".split())


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene, named: Iterable[str] = ()) -> str:
    """A caption naming `scene.subject` and the attributes in `named` (a subset of its attributes)."""
    named = set(named) - {"subject"}
    extra = named - set(attributes_of(scene.subject))
    if extra:
        raise InvalidValue("named", sorted(extra), f"a {scene.subject} has only {list(attributes_of(scene.subject))}")
    if scene.subject == "face":
        return _face_caption(scene, named)
    words = []
    if "size" in named:
        words.append(scene.size)
    if "pattern" in named and scene.pattern == "solid":
        words.append("plain")  # "a plain red chair": plain reads before a colour, other patterns after it
    if "colour" in named:
        words.append(scene.colour)
    if "pattern" in named and scene.pattern != "solid":
        words.append(PATTERN_CAPTION[scene.pattern])
    words.append(scene.subject)
    if "facing" in named:
        words.append(f"facing {scene.facing}")
    if "position" in named:
        words.append(POSITION_CAPTION[scene.position])
    if "wall" in named:
        words.append(f"in a {scene.wall} room")
    if "floor" in named:
        words.append(FLOOR_CAPTION[scene.floor])
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _face_caption(scene: Scene, named: set[str]) -> str:
    features = []
    if "skin" in named:
        features.append(f"{scene.skin} skin")
    hair = [scene.hair_style] * ("hair_style" in named) + [scene.hair_colour] * ("hair_colour" in named)
    if hair:
        features.append(" ".join(hair) + " hair")
    if "glasses" in named:
        features.append("glasses" if scene.glasses == "yes" else "no glasses")
    text = "a face" + (" with " + _join(features) if features else "")
    if "shirt" in named:
        text += f" wearing a {scene.shirt} shirt"
    if "backdrop" in named:
        text += f" against a {scene.backdrop} background"
    return text


class _Reading:
    """What has been read from one prompt so far; refuses a second, different value for an attribute."""

    def __init__(self, prompt: str) -> None:
        self.prompt, self.found = prompt, {}

    def set(self, name: str, value: str, word: str) -> None:
        if self.found.get(name, value) != value:
            raise InvalidValue("prompt", self.prompt, f"names two values of {name}: {self.found[name]!r} and "
                                                       f"{value!r} ({word!r}); a prompt describes one scene")
        self.found[name] = value

    def fail(self, problem: str) -> None:
        raise InvalidValue("prompt", self.prompt, problem)


def _modifier(words: list[str], head: int, table: Mapping[str, str], used: set[int]) -> Optional[int]:
    """Index of the word just before `head` if it is in `table` (and not used yet), else None."""
    before = head - 1
    return before if before >= 0 and before not in used and words[before] in table else None


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a prompt names, {attribute: value} in `VOCABULARY` order; what it leaves out is absent."""
    words = re.findall(r"[a-z]+", prompt.lower())
    reading, used = _Reading(prompt), set()
    # First the head words that claim the words before them ("red hair", "a blue room", "no glasses").
    for i, word in enumerate(words):
        if word == "hair":
            used.add(i)
            j = i - 1  # up to two modifiers: "curly red hair", "red curly hair", "red hair", "curly hair"
            while j >= max(0, i - 2) and j not in used and words[j] in HAIR_WORDS:
                name, value = HAIR_WORDS[words[j]]
                reading.set(name, value, words[j])
                used.add(j)
                j -= 1
        elif word == "skin":
            j = _modifier(words, i, {s: s for s in VOCABULARY["skin"]}, used)
            if j is None:
                reading.fail(f"'skin' needs a tone before it, one of {list(VOCABULARY['skin'])}")
            used.update((i, j))
            reading.set("skin", words[j], words[j])
        elif word in SHIRT_HEADS + WALL_HEADS + BACKDROP_HEADS:
            name, table = (("shirt", {c: c for c in VOCABULARY["shirt"]}) if word in SHIRT_HEADS else
                           ("wall" if word in WALL_HEADS else "backdrop", BACKGROUND_COLOUR_WORDS))
            j = _modifier(words, i, table, used)
            used.add(i)
            if j is not None:
                used.add(j)
                reading.set(name, table[words[j]], words[j])
            elif name != "wall":  # "in a room" names no wall colour, which is fine
                reading.fail(f"'{word}' needs a colour before it, one of {sorted(set(table.values()))}")
        elif word in GLASSES_HEADS:
            negated = i > 0 and words[i - 1] in NEGATIONS
            used.update((i, i - 1) if negated else (i,))
            reading.set("glasses", "no" if negated else "yes", word)
        elif word == "facing":
            if i + 1 >= len(words) or words[i + 1] not in VOCABULARY["facing"]:
                reading.fail("'facing' needs 'left' or 'right' after it")
            used.update((i, i + 1))
            reading.set("facing", words[i + 1], words[i + 1])
    # Then the words that stand on their own.
    for i, word in enumerate(words):
        if i in used or word in STOP_WORDS:
            continue
        for name, table in (("subject", SUBJECT_WORDS), ("pattern", PATTERN_WORDS), ("size", SIZE_WORDS),
                            ("position", POSITION_WORDS), ("floor", FLOOR_WORDS),
                            ("colour", {c: c for c in VOCABULARY["colour"]})):
            if word in table:
                reading.set(name, table[word], word)
                break
        else:
            if word in BACKGROUND_COLOUR_WORDS or word in HAIR_COLOUR_WORDS or word in VOCABULARY["skin"]:
                reading.fail(f"{word!r} is a colour of walls, backdrops, hair or skin only ('a {word} room', "
                             f"'{word} hair', '{word} skin'); furniture colours are {list(VOCABULARY['colour'])}")
            reading.fail(f"the word {word!r} is not in the demo world's vocabulary; it knows subjects "
                         f"{list(VOCABULARY['subject'])} and their attributes {list(VOCABULARY)[1:]} "
                         "(see ldm/data/prompts.py)")
    found = reading.found
    kinds = {"face" if APPLIES_TO[name] == ("face",) else "furniture" for name in found if name != "subject"}
    subject = found.get("subject")
    if subject is not None:
        kinds.add("face" if subject == "face" else "furniture")
    if len(kinds) > 1:
        reading.fail("mixes face and furniture words; a face has "
                     f"{list(attributes_of('face'))}, furniture {list(attributes_of('chair'))}")
    return {name: found[name] for name in VOCABULARY if name in found}


def scene_for_prompt(prompt: str, rng: np.random.Generator) -> Scene:
    """A random scene that shows what `prompt` names; every attribute it leaves out is sampled."""
    return sample_scene(rng, parse_prompt(prompt))

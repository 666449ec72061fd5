"""Is a named attribute (a colour, a pattern) present in the text encoder's output? Linear probes.

The prompts are the synthetic world's captions (`ldm.data.synthetic.caption`): every class x colour x
pattern combination, with every subset of the mentions. A probe for an attribute uses the prompts that
name it ("a red chair", "a red striped chair", "a plain red chair" for colour), encodes them with the
model's text encoder (the UNet's context, (B, T, C)), takes one feature vector per prompt from a chosen
place (`FEATURES`) and fits a multinomial logistic regression predicting the named value.

Train / test split by held-out prompts: the test prompts are those of a few class-attribute
combinations never seen in training (value i of the attribute with class i mod 4: red chair, orange
table, ..., purple table; plain chair, striped table, dotted lamp, checked vase), so the probe must read
the attribute, not recall a prompt. Every value and every class occurs in both halves. A feature that
knew only the class would score 0 on this split, below chance (1 / number of values), because each
test class is seen in training only with the other values.

Conventions
- Token positions index the encoder's sequence: 0 is the start token, then the prompt's tokens, then
  the end-of-text token; the rest is padding (also end-of-text ids in SD v1). A word's feature is its
  last sub-token's output (the causal transformer has seen the whole word there).
- Probes are plain torch, full batch, a fixed number of Adam steps from a seeded initialisation, on
  features standardised with the training half's mean and std. Deterministic on the CPU.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ldm.data.synthetic import CLASSES, COLOURS, PATTERN_WORDS, PATTERNS, Attributes, caption

ATTRIBUTES = ("colour", "pattern")
# Where a prompt's feature vector is read (see `prompt_features`).
FEATURES = {
    "word": "the attribute word's token",
    "class": "the class noun's token",
    "end": "the end-of-text token",
    "mean": "mean over the prompt's tokens (start and end included, padding not)",
    "class_embedding": "control: the class noun's input embedding (token + position), before the transformer",
}


@dataclass(frozen=True)
class Prompt:
    """One caption and what it names; `colour` / `pattern` None when the caption leaves them out."""

    text: str
    cls: str
    colour: Optional[str] = None
    pattern: Optional[str] = None

    def word(self, role: str) -> Optional[str]:
        """The word of `role` ("class", "colour", "pattern") in the caption, or None if not named."""
        if role == "class":
            return self.cls
        value = getattr(self, role)
        if value is None or role == "colour":
            return value
        return PATTERN_WORDS[value]  # the caption word: "solid" is written "plain"


def values_of(attribute: str) -> tuple[str, ...]:
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute {attribute!r} is not one of {ATTRIBUTES}")
    return tuple(COLOURS) if attribute == "colour" else PATTERNS


def make_prompt(cls: str, colour: Optional[str] = None, pattern: Optional[str] = None) -> Prompt:
    """The synthetic world's caption of a class with the given colour and / or pattern named."""
    attrs = Attributes(cls=cls, colour=colour or next(iter(COLOURS)), pattern=pattern or PATTERNS[0],
                       size="medium", x=0.0, y=0.0, facing="right")
    mention = tuple(name for name, value in (("colour", colour), ("pattern", pattern)) if value is not None)
    return Prompt(caption(attrs, mention), cls, colour, pattern)


def naming_prompts(attribute: str) -> list[Prompt]:
    """Every distinct caption that names `attribute`: alone and together with the other attribute."""
    other = "pattern" if attribute == "colour" else "colour"
    prompts = []
    for cls, value in itertools.product(CLASSES, values_of(attribute)):
        for other_value in (None, *values_of(other)):
            prompts.append(make_prompt(cls, **{attribute: value, other: other_value}))
    return prompts


def is_held_out(prompt: Prompt, attribute: str) -> bool:
    """The test half: value i of the attribute together with class i mod (number of classes)."""
    value = getattr(prompt, attribute)
    return CLASSES.index(prompt.cls) == values_of(attribute).index(value) % len(CLASSES)


def word_positions(tokenizer, text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(word, its token positions in the encoder's sequence) for each space-separated word of `text`.

    Position 0 is the start token. The caption words are plain lower-case words, which the CLIP tokenizer
    encodes one by one, so a word's tokens in the sentence are its tokens alone; checked against the
    whole sentence."""
    words, position = [], 1
    for word in text.split():
        count = len(tokenizer.encode(word))
        words.append((word, tuple(range(position, position + count))))
        position += count
    if position - 1 != len(tokenizer.encode(text)):
        raise ValueError(f"prompt {text!r} does not tokenize word by word; use plain space-separated words")
    return words


def token_roles(tokenizer, prompt: Prompt, attribute: Optional[str], max_length: int) -> dict[str, tuple[int, ...]]:
    """Token positions of `prompt` by role, a partition of range(max_length): "start", "attribute" (the
    word naming `attribute`, when given and named), "class", "other" (remaining words), "end" (the
    end-of-text token) and "padding"."""
    roles: dict[str, list[int]] = {"start": [0], "attribute": [], "class": [], "other": []}
    wanted = {"attribute": prompt.word(attribute) if attribute else None, "class": prompt.word("class")}
    words = word_positions(tokenizer, prompt.text)
    end = 1 + sum(len(positions) for _, positions in words)
    if end >= max_length:
        raise ValueError(f"prompt {prompt.text!r} does not fit in {max_length} tokens")
    for word, positions in words:
        role = next((r for r, w in wanted.items() if w == word and not roles[r]), "other")
        roles[role] += positions
    roles["end"], roles["padding"] = [end], list(range(end + 1, max_length))
    return {role: tuple(positions) for role, positions in roles.items()}


@torch.no_grad()
def prompt_features(model, prompts: Sequence[Prompt], attribute: str) -> dict[str, torch.Tensor]:
    """feature name (FEATURES) -> (len(prompts), C) float32, read from the model's text encoder."""
    encoder = model.cond_stage_model
    texts = [p.text for p in prompts]
    context = model.get_learned_conditioning(texts).float()  # (B, T, C): what the UNet attends to
    embedded = encoder.transformer.text_model.embeddings(encoder.tokenize(texts).to(encoder.device)).float()  # (B, T, C)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURES}
    for i, prompt in enumerate(prompts):
        roles = token_roles(encoder.tokenizer, prompt, attribute, encoder.max_length)
        real = [0, *roles["attribute"], *roles["class"], *roles["other"], *roles["end"]]
        rows["word"].append(context[i, roles["attribute"][-1]])
        rows["class"].append(context[i, roles["class"][-1]])
        rows["end"].append(context[i, roles["end"][0]])
        rows["mean"].append(context[i, real].mean(dim=0))
        rows["class_embedding"].append(embedded[i, roles["class"][-1]])
    return {name: torch.stack(values).cpu() for name, values in rows.items()}


@dataclass(frozen=True)
class LinearProbe:
    """Multinomial logistic regression on standardised features: logits = ((x - mean) / std) W + b."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (D, K)
    bias: torch.Tensor  # (K,)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return (((features - self.mean) / self.std) @ self.weight + self.bias).argmax(dim=-1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(features) == labels).float().mean().item()


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, steps: int = 500,
                     lr: float = 0.05, weight_decay: float = 1e-3, seed: int = 0) -> LinearProbe:
    """Fit a probe to features (n, D) and integer labels (n,) with `steps` full-batch Adam steps on the
    cross-entropy plus `weight_decay` * ||W||^2, from weights drawn from `seed` (std 0.01)."""
    features = features.detach().float().cpu()
    mean, std = features.mean(dim=0), features.std(dim=0, unbiased=False).clamp_min(1e-6)
    x = (features - mean) / std  # (n, D)
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(x.shape[1], num_classes, generator=generator)).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight + bias, labels) + weight_decay * weight.square().sum()
            loss.backward()
            optimizer.step()
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def variance_share(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the features' total variance across prompts that the label's group means explain
    (between-group sum of squares / total sum of squares): 1 = the features vary only with the label."""
    centred = features - features.mean(dim=0)
    total = centred.square().sum()
    between = sum((labels == k).sum() * centred[labels == k].mean(dim=0).square().sum() for k in labels.unique())
    return (between / total).item() if total > 0 else float("nan")


@dataclass(frozen=True)
class ProbeResult:
    attribute: str
    feature: str
    train_accuracy: float
    test_accuracy: float
    chance: float
    variance_share: float  # over all prompts of the probe
    train_prompts: int
    test_prompts: int


def probe_attribute(model, attribute: str, *, steps: int = 500, seed: int = 0) -> list[ProbeResult]:
    """One probe per place in FEATURES for `attribute`, trained and tested on the held-out split."""
    prompts = naming_prompts(attribute)
    values = values_of(attribute)
    labels = torch.tensor([values.index(getattr(p, attribute)) for p in prompts])
    test = torch.tensor([is_held_out(p, attribute) for p in prompts])
    results = []
    for name, features in prompt_features(model, prompts, attribute).items():
        probe = fit_linear_probe(features[~test], labels[~test], len(values), steps=steps, seed=seed)
        results.append(ProbeResult(attribute, name, probe.accuracy(features[~test], labels[~test]),
                                   probe.accuracy(features[test], labels[test]), 1.0 / len(values),
                                   variance_share(features, labels), int((~test).sum()), int(test.sum())))
    return results

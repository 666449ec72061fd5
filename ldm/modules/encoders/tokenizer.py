"""Byte-level BPE tokenizer of CLIP (the tokenizer SD v1's text encoder was trained with).

Produces the same ids as the tokenizer of openai/clip-vit-large-patch14, without transformers or open_clip.

Assumptions:
- The vocabulary has 49408 entries: 256 byte symbols, the same 256 with the end-of-word mark "</w>",
  48894 merged symbols (one per merge rule, in rank order), then "<|startoftext|>" (49406) and
  "<|endoftext|>" (49407). It is read from local files only; `find_vocabulary` gives the search order.
  Nothing is downloaded and nothing is read at import time.
- Text is cleaned as CLIP does: ftfy.fix_text (when ftfy is installed; otherwise only NFC normalisation),
  html unescaping, whitespace collapsed, lowercase.
- Output ids are (B, max_length) int64: BOS, the prompt's tokens, EOS, then EOS again as padding (SD v1's
  convention). A prompt that does not fit keeps its first max_length - 2 tokens and EOS stays last.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ldm.files import read_text

DEFAULT_REPO_ID = "openai/clip-vit-large-patch14"
OPEN_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP keeps only the first merges of the 16e6 BPE file: 49152 symbols minus the 256 bytes and 2 specials.
NUM_MERGES = 49152 - 256 - 2
MAX_VOCABULARY_BYTES = 64 * 2 ** 20  # CLIP's vocab.json is 1.6 MiB
# CLIP's word splitting keeps these English contractions as words of their own ("don't" -> "don", "'t").
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


# ----------------------------------------------------------------------------- vocabulary files


def byte_symbols() -> dict[int, str]:
    """Map each byte to the character that stands for it in the vocabulary.

    BPE merges text symbols, so every byte needs a visible stand-in: printable Latin-1 bytes stand for
    themselves, the others (controls, space, ...) are moved to chr(256 + n) so no symbol is whitespace.
    The insertion order is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(b for b in range(256) if b not in mapping):
        mapping[byte] = chr(256 + offset)
    return mapping


@dataclass(frozen=True)
class BPEVocabulary:
    token_ids: dict[str, int]
    merge_ranks: dict[tuple[str, str], int]
    source: Path


def _vocabulary_from_open_clip_file(path: Path) -> BPEVocabulary:
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]  # line 0 is a version header
    symbols = list(byte_symbols().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return BPEVocabulary({t: i for i, t in enumerate(tokens)}, {m: r for r, m in enumerate(merges)}, path)


def _vocabulary_from_hub_files(directory: Path) -> BPEVocabulary:
    hint = "a CLIP tokenizer folder (vocab.json and merges.txt)"
    token_ids = json.loads(read_text(directory / "vocab.json", "CLIP vocabulary", hint, MAX_VOCABULARY_BYTES))
    lines = read_text(directory / "merges.txt", "CLIP merges file", hint, MAX_VOCABULARY_BYTES).split("\n")
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    return BPEVocabulary(token_ids, {m: r for r, m in enumerate(merges)}, directory)


def _is_hub_vocab_dir(path: Path) -> bool:
    return (path / "vocab.json").is_file() and (path / "merges.txt").is_file()


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, honouring HF_HUB_CACHE, then HF_HOME, then XDG_CACHE_HOME."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg_cache).expanduser() / "huggingface" / "hub"


def _hf_cache_snapshot(repo_id: str) -> Optional[Path]:
    repo_dir = hf_hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    snapshots = sorted(p for p in (repo_dir / "snapshots").glob("*") if _is_hub_vocab_dir(p))
    main_ref = repo_dir / "refs" / "main"
    if main_ref.is_file():
        # Several snapshots may be cached; the one "main" points to is what from_pretrained would use.
        current = repo_dir / "snapshots" / main_ref.read_text().strip()
        if current in snapshots:
            return current
    return snapshots[0] if snapshots else None


def _open_clip_bpe_file() -> Optional[Path]:
    # find_spec locates the package without importing it (importing open_clip pulls in timm and takes seconds).
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / OPEN_CLIP_BPE_FILE
        if candidate.is_file():
            return candidate
    return None


def find_vocabulary(path: str | os.PathLike | None = None, repo_id: str = DEFAULT_REPO_ID) -> Path:
    """Where to read the vocabulary from, first found of:

    1. `path`: a directory with vocab.json + merges.txt (as on the hub), or a bpe_simple_vocab_16e6.txt.gz;
    2. the Hugging Face cache: `<cache>/models--openai--clip-vit-large-patch14/snapshots/*/`;
    3. the bpe_simple_vocab_16e6.txt.gz shipped inside the open_clip_torch package.
    """
    if path is not None:
        explicit = Path(path).expanduser()
        if _is_hub_vocab_dir(explicit) or (explicit.is_file() and explicit.name.endswith(".txt.gz")):
            return explicit
        raise FileNotFoundError(
            f"CLIP vocabulary path {str(explicit)!r} is neither a directory holding vocab.json and merges.txt "
            f"nor a {OPEN_CLIP_BPE_FILE}-style .txt.gz file; point it at one of those"
        )
    found = _hf_cache_snapshot(repo_id) or _open_clip_bpe_file()
    if found is None:
        raise FileNotFoundError(
            "No CLIP BPE vocabulary found (nothing is downloaded). Looked in the Hugging Face cache "
            f"{hf_hub_cache_dir()} for {repo_id} and in the open_clip package. Either `pip install "
            f"open_clip_torch` (it ships {OPEN_CLIP_BPE_FILE}), or put vocab.json and merges.txt of "
            f"{DEFAULT_REPO_ID} in a directory and pass that directory as the tokenizer path."
        )
    return found


def load_vocabulary(source: Path) -> BPEVocabulary:
    vocab = _vocabulary_from_hub_files(source) if source.is_dir() else _vocabulary_from_open_clip_file(source)
    missing = [t for t in (BOS_TOKEN, EOS_TOKEN) if t not in vocab.token_ids]
    if missing:
        raise ValueError(f"vocabulary at {source} lacks the special tokens {missing}; is it a CLIP vocabulary?")
    return vocab


# ----------------------------------------------------------------------------- text to words


@functools.cache
def _ftfy_fix() -> Callable[[str], str]:
    try:
        import ftfy  # optional, imported on first use so importing this module stays cheap
    except ImportError:
        return lambda text: unicodedata.normalize("NFC", text)
    return ftfy.fix_text


def clean_text(text: str) -> str:
    """CLIP's prompt cleanup: fix broken unicode, unescape html, collapse whitespace, lowercase."""
    text = _ftfy_fix()(text)
    text = html.unescape(html.unescape(text))  # twice: captions scraped from the web are often double-escaped
    return " ".join(text.split()).lower()


def _char_kind(char: str) -> str:
    if char.isspace():
        return "space"
    category = unicodedata.category(char)[0]
    return {"L": "letter", "N": "number"}.get(category, "symbol")


def split_words(text: str) -> list[tuple[int, int]]:
    """CLIP's pre-tokenization, as (start, end) spans of `text`; whitespace separates and is dropped.

    At each position the first rule that applies wins: a special token, a contraction from CONTRACTIONS,
    a run of letters, a single digit (numbers are split digit by digit), a run of other symbols.
    """
    spans, i = [], 0
    while i < len(text):
        kind = _char_kind(text[i])
        if kind == "space":
            i += 1
            continue
        fixed = next((w for w in (BOS_TOKEN, EOS_TOKEN, *CONTRACTIONS) if text.startswith(w, i)), None)
        end = i + (len(fixed) if fixed else 1)
        if fixed is None and kind != "number":
            while end < len(text) and _char_kind(text[end]) == kind:
                end += 1
        spans.append((i, end))
        i = end
    return spans


# ----------------------------------------------------------------------------- tokenizer


@dataclass
class TokenizerOutput:
    input_ids: torch.Tensor  # (B, max_length) int64
    truncated: list[Optional[str]]  # per prompt: cleaned text from the first word not fully kept, or None


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer. `tokenizer(texts)` gives padded (B, 77) ids and what was cut."""

    def __init__(self, vocabulary: BPEVocabulary) -> None:
        self.vocabulary = vocabulary
        self.token_ids = vocabulary.token_ids
        self.tokens = {i: t for t, i in self.token_ids.items()}
        self.bos_id, self.eos_id = self.token_ids[BOS_TOKEN], self.token_ids[EOS_TOKEN]
        self.pad_id = self.eos_id
        self._byte_symbols = byte_symbols()
        self._symbol_bytes = {s: b for b, s in self._byte_symbols.items()}
        self._word_cache: dict[str, list[int]] = {}

    @classmethod
    def from_default(cls, path: str | os.PathLike | None = None, repo_id: str = DEFAULT_REPO_ID) -> "CLIPTokenizer":
        """Load from `path`, else the HF cache of `repo_id`, else open_clip's BPE file (see find_vocabulary)."""
        return cls(load_vocabulary(find_vocabulary(path, repo_id)))

    @property
    def source(self) -> Path:
        return self.vocabulary.source

    def _bpe(self, symbols: list[str]) -> list[str]:
        ranks = self.vocabulary.merge_ranks
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right, without overlaps
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, word: str) -> list[int]:
        if word not in self._word_cache:
            if word in (BOS_TOKEN, EOS_TOKEN):
                ids = [self.token_ids[word]]
            else:
                symbols = [self._byte_symbols[b] for b in word.encode("utf-8")]
                symbols[-1] += END_OF_WORD  # the end-of-word mark lets BPE tell word endings from word middles
                ids = [self.token_ids[token] for token in self._bpe(symbols)]
            self._word_cache[word] = ids
        return self._word_cache[word]

    def _encode_with_starts(self, text: str) -> tuple[list[int], list[int], str]:
        """Token ids, the start (in the cleaned text) of the word each token belongs to, the cleaned text."""
        cleaned = clean_text(text)
        ids, starts = [], []
        for start, end in split_words(cleaned):
            word_ids = self._word_ids(cleaned[start:end])
            ids += word_ids
            starts += [start] * len(word_ids)
        return ids, starts, cleaned

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without length limit."""
        return self._encode_with_starts(text)[0]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens dropped); words come back separated by single spaces."""
        symbols = "".join(self.tokens[int(i)] for i in ids if int(i) not in (self.bos_id, self.eos_id))
        text = bytes(self._symbol_bytes[s] for s in symbols).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()

    def _row(self, text: str, max_length: int) -> tuple[list[int], Optional[str]]:
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for BOS and EOS; use at least 2 (SD v1: 77)")
        ids, starts, cleaned = self._encode_with_starts(text)
        room = max_length - 2  # BOS and EOS always take two places
        cut = cleaned[starts[room] :] if len(ids) > room else None
        kept = ids[:room]
        return [self.bos_id, *kept, self.eos_id] + [self.pad_id] * (room - len(kept)), cut

    def truncated_text(self, text: str, max_length: int = 77) -> Optional[str]:
        """The (cleaned) part of `text` that does not fit in `max_length` tokens, or None if all fits."""
        return self._row(text, max_length)[1]

    def __call__(self, texts: str | Sequence[str], max_length: int = 77) -> TokenizerOutput:
        rows = [self._row(text, max_length) for text in ([texts] if isinstance(texts, str) else texts)]
        input_ids = torch.tensor([ids for ids, _ in rows], dtype=torch.int64)
        input_ids = input_ids.reshape(len(rows), max_length)  # (B, max_length), also when B == 0
        return TokenizerOutput(input_ids=input_ids, truncated=[cut for _, cut in rows])

"""Specification of the CLIP text encoder and tokenizer (ldm/modules/encoders/{clip_text,tokenizer,modules}.py).

References are independent implementations from PyPI: transformers' CLIPTokenizer and CLIPTextModel, fed
with vocabulary files converted here from open_clip's BPE file and with our random weights.
"""
from __future__ import annotations

import gzip
import json
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ldm.modules.encoders import tokenizer as tokenizer_module
from ldm.modules.encoders.clip_text import CLIPTextConfig, CLIPTextModel
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizer import CLIPTokenizer
from tests.conftest import REFERENCE_KEYS

BOS, EOS = 49406, 49407
TINY_TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
PROMPTS = [
    "a photo of a cat",
    "",
    "A Photo Of A CAT, trending on ArtStation!!!",
    "don't stop; it's WE'LL they're you've I'm she'd",
    "'sup 'T!'s ...",
    "1024x768 resolution, 3.14159 pi, 2nd place, 100%",
    "café naïve cafe\u0301 Ångström façade",
    "東京の夜景, 서울, Москва, ελληνικά, عربى",
    "🐱 cat emoji 👍🏽 and ♥ ★ ©",
    "(masterpiece:1.2), [[best quality]], {a|b}, <lora:x:0.5> #tag @user",
    "tabs\tand\nnewlines   and    spaces",
    "a<|endoftext|>b <|startoftext|>",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(f"word{i} painting" for i in range(60)),  # far longer than 77 tokens
]


def open_clip_bpe_file() -> Path:
    found = tokenizer_module._open_clip_bpe_file()
    if found is None:  # a required dependency (setup.py): its absence is a failure, not a reason to skip
        pytest.fail("open_clip_torch is not installed; its BPE file is the vocabulary these tests use "
                    "(pip install -e \".[test]\")")
    return found


def write_hub_vocab_files(directory: Path) -> Path:
    """Convert open_clip's BPE file into the vocab.json + merges.txt layout of openai/clip-vit-large-patch14."""
    lines = gzip.open(open_clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1:48895]  # line 0 is the header; CLIP uses the first 48894 merges
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(tokenizer_module.load_vocabulary(open_clip_bpe_file()))


@pytest.fixture(scope="module")
def hub_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hub_vocab_files(tmp_path_factory.mktemp("clip-vit-large-patch14"))


@pytest.fixture
def empty_offline_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache, offline mode, and sockets that refuse to connect: any download attempt fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the text encoder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path / "hf_home" / "hub"


# ----------------------------------------------------------------------------- tokenizer


def test_known_prompt_gives_clip_ids(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer(["a photo of a cat"]).input_ids
    assert ids.dtype == torch.int64 and ids.shape == (1, 77)
    assert ids[0].tolist() == [BOS, 320, 1125, 539, 320, 2368] + [EOS] * 71


def test_rows_are_bos_tokens_eos_then_eos_padding(tokenizer: CLIPTokenizer) -> None:
    prompts = PROMPTS[:-1]
    ids = tokenizer(prompts, max_length=77).input_ids
    for prompt, row in zip(prompts, ids.tolist()):
        body = tokenizer.encode(prompt)
        assert 0 < len(body) <= 75 or prompt == ""
        assert row == [BOS, *body, EOS] + [EOS] * (75 - len(body))


def test_long_prompt_keeps_first_75_tokens_and_eos_last(tokenizer: CLIPTokenizer) -> None:
    prompt = " ".join(["cat"] * 75 + ["zebra", "giraffe"])
    output = tokenizer([prompt, "a cat"])
    cat = tokenizer.encode("cat")[0]
    assert output.input_ids[0].tolist() == [BOS] + [cat] * 75 + [EOS]
    assert output.truncated == ["zebra giraffe", None]
    assert tokenizer.truncated_text(prompt) == "zebra giraffe"
    assert tokenizer.truncated_text("a cat") is None


def test_ids_match_transformers_tokenizer(tokenizer: CLIPTokenizer, hub_vocab_dir: Path) -> None:
    reference = transformers.CLIPTokenizer.from_pretrained(str(hub_vocab_dir), local_files_only=True)
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(tokenizer(PROMPTS).input_ids, expected.input_ids)


def test_hub_files_and_open_clip_file_give_same_ids(tokenizer: CLIPTokenizer, hub_vocab_dir: Path) -> None:
    from_hub_files = CLIPTokenizer.from_default(hub_vocab_dir)
    assert from_hub_files.source == hub_vocab_dir
    assert torch.equal(from_hub_files(PROMPTS).input_ids, tokenizer(PROMPTS).input_ids)


def test_cleanup_unescapes_html_collapses_whitespace_and_lowercases(tokenizer: CLIPTokenizer) -> None:
    messy = tokenizer(["  Fish &amp;amp; CHIPS\n\t at  NOON "]).input_ids
    assert torch.equal(messy, tokenizer(["fish & chips at noon"]).input_ids)


def test_cleanup_fixes_unicode_with_ftfy_like_clip(tokenizer: CLIPTokenizer) -> None:
    import ftfy  # noqa: F401  (in the test extra: CLIP cleans text with it, so its absence must fail)
    broken = "it\u2019s a \ufb01ne caf\u00c3\u00a9"  # curly quote, "fi" ligature, mojibake of "é"
    assert torch.equal(tokenizer([broken]).input_ids, tokenizer(["it's a fine café"]).input_ids)


def test_decode_inverts_encode(tokenizer: CLIPTokenizer) -> None:
    text = "a café in 東京, 2 cats 🐱 don't sleep"
    assert tokenizer.decode([BOS, *tokenizer.encode(text), EOS]) == "a café in 東京 , 2 cats 🐱 don 't sleep"


# ----------------------------------------------------------------------------- vocabulary search


@pytest.mark.parametrize("variable, cache_subdir", [("HF_HUB_CACHE", ""), ("HF_HOME", "hub")])
def test_vocabulary_found_in_hf_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, cache_subdir: str
) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(tmp_path))
    repo = tmp_path / cache_subdir / "models--openai--clip-vit-large-patch14"
    snapshot = write_hub_vocab_files(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    assert CLIPTokenizer.from_default().source == snapshot


def test_open_clip_file_used_offline_without_importing_open_clip(
    empty_offline_hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "open_clip", raising=False)
    tokenizer = CLIPTokenizer.from_default()
    assert tokenizer.source == open_clip_bpe_file()
    assert "open_clip" not in sys.modules
    assert tokenizer(["a photo of a cat"]).input_ids[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]


def test_missing_vocabulary_error_says_what_to_install(
    empty_offline_hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenizer_module, "_open_clip_bpe_file", lambda: None)
    with pytest.raises(FileNotFoundError, match="open_clip_torch"):
        CLIPTokenizer.from_default()
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        CLIPTokenizer.from_default(empty_offline_hf_cache / "nowhere")


# ----------------------------------------------------------------------------- text model


def test_full_size_embedder_has_sd_v1_checkpoint_keys() -> None:
    prefix = "cond_stage_model."
    expected = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        if key.startswith(prefix):
            expected[key[len(prefix) :]] = (shape, dtype)
    with torch.device("meta"):
        embedder = FrozenCLIPEmbedder(device="cpu")
    actual = {k: (str(tuple(v.shape)), str(v.dtype)) for k, v in embedder.state_dict().items()}
    assert len(expected) == 197
    assert actual == expected


def tiny_models(vocab_size: int = 1000) -> tuple[CLIPTextModel, transformers.CLIPTextModel]:
    """Our tiny model with random weights, and transformers' CLIPTextModel holding the same weights."""
    torch.manual_seed(0)
    ours = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **TINY_TEXT_CONFIG)).eval()
    with torch.no_grad():
        for param in ours.parameters():  # LayerNorms start at 1/0; randomise them so they are tested too
            param.normal_(0.0, 0.2)
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **TINY_TEXT_CONFIG,
    )
    config._attn_implementation = "eager"  # an attention path independent of ours
    reference = transformers.CLIPTextModel(config).eval()
    # transformers 5 builds CLIPTextModel without the `text_model.` level and keeps position_ids unsaved.
    reference_keys = set(reference.state_dict())
    weights = {}
    for key, value in ours.state_dict().items():
        if key not in reference_keys:
            key = key.removeprefix("text_model.")
        if key in reference_keys:
            weights[key] = value
    assert set(weights) == reference_keys
    reference.load_state_dict(weights, strict=True)
    return ours, reference


def padded_batch(vocab_size: int) -> torch.Tensor:
    torch.manual_seed(1)
    bos, eos = vocab_size - 2, vocab_size - 1
    rows = []
    for length in (0, 5, 30, 75):  # prompt tokens between BOS and EOS, the rest is EOS padding
        body = torch.randint(0, vocab_size - 2, (length,)).tolist()
        rows.append([bos, *body, eos] + [eos] * (75 - length))
    return torch.tensor(rows)  # (4, 77)


@torch.no_grad()
def test_last_hidden_state_matches_transformers() -> None:
    ours, reference = tiny_models()
    input_ids = padded_batch(1000)
    expected = reference(input_ids=input_ids).last_hidden_state
    actual = ours(input_ids)
    assert actual.shape == (4, 77, 64)
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-5


@torch.no_grad()
def test_penultimate_layer_matches_transformers_clip_skip() -> None:
    ours, reference = tiny_models()
    input_ids = padded_batch(1000)
    hidden_states = reference(input_ids=input_ids, output_hidden_states=True).hidden_states
    final_layer_norm = getattr(reference, "text_model", reference).final_layer_norm
    expected = final_layer_norm(hidden_states[-2])
    actual = ours(input_ids, layer="penultimate")
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-5
    assert not torch.allclose(actual, ours(input_ids))


# ----------------------------------------------------------------------------- FrozenCLIPEmbedder


def test_embedder_is_frozen_and_encodes_prompts_offline(empty_offline_hf_cache: Path) -> None:
    torch.manual_seed(0)
    embedder = FrozenCLIPEmbedder(device="cuda", text_config=TINY_TEXT_CONFIG)  # device is ignored
    assert not embedder.transformer.training
    assert not any(p.requires_grad for p in embedder.parameters())
    assert embedder.tokenizer.source == open_clip_bpe_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # short prompts must not warn
        context = embedder.encode(["a photo of a cat", "a dog"])
    assert context.shape == (2, 77, 64) and context.device.type == "cpu"
    ids = embedder.tokenizer(["a photo of a cat", "a dog"]).input_ids
    assert torch.equal(context, embedder.transformer(ids))


def test_embedder_warns_once_naming_the_cut_words(empty_offline_hf_cache: Path) -> None:
    embedder = FrozenCLIPEmbedder(text_config=TINY_TEXT_CONFIG)
    long_prompt = " ".join(["cat"] * 75 + ["zebra", "giraffe"])
    with pytest.warns(UserWarning) as caught:
        context = embedder([long_prompt, "a dog"])
    assert context.shape == (2, 77, 64)
    cut_warnings = [str(w.message) for w in caught if "was cut" in str(w.message)]
    assert len(cut_warnings) == 1
    message = cut_warnings[0]
    assert "'zebra giraffe'" in message and "a dog" not in message

"""The word-level tokenizer built from the training captions: transformers round trip, [UNK] words."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from diffusion_attribution.models import tokenizer as tokenizer_module
from diffusion_attribution.models.tokenizer import (
    SPECIAL_TOKENS,
    build_word_tokenizer,
    caption_words,
    is_word_level,
    report_unknown_words,
)

CAPTIONS = [
    "a red circle on a black background",
    "striped blue square, white background",
    "a gray background with a hollow yellow cross",
]
PROMPTS = [*CAPTIONS, "A RED Circle ON a white background", "", "red, red, red"]


@pytest.fixture(autouse=True)
def fresh_unknown_word_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees unknown words as never reported before."""
    monkeypatch.setattr(tokenizer_module, "_reported_unknown", set())


def ids(tokenizer, prompts: list[str], max_length: int = 16) -> list[list[int]]:
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length).input_ids


def test_vocabulary_is_specials_then_caption_words() -> None:
    tokenizer = build_word_tokenizer(CAPTIONS, max_length=16)
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    words = sorted({w for c in CAPTIONS for w in caption_words(c)})
    assert len(vocab) == len(SPECIAL_TOKENS) + len(words) == len(tokenizer)
    assert "," in vocab and "striped" in vocab
    assert tokenizer.eos_token_id != 2  # CLIPTextModel reads eos_token_id == 2 as a legacy config
    assert is_word_level(tokenizer)


def test_encoding_layout() -> None:
    tokenizer = build_word_tokenizer(CAPTIONS, max_length=16)
    encoded = ids(tokenizer, ["a red circle"])[0]
    vocab = tokenizer.get_vocab()
    body = [vocab["a"], vocab["red"], vocab["circle"]]
    assert encoded[:5] == [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    assert encoded[5:] == [tokenizer.pad_token_id] * 11
    assert ids(tokenizer, ["A RED Circle"]) == ids(tokenizer, ["a red circle"])  # lower-cased
    assert ids(tokenizer, ["red,blue"])[0][1:4] == [vocab["red"], vocab[","], vocab["blue"]]
    long = ids(tokenizer, [" ".join(["red"] * 40)])[0]
    assert len(long) == 16  # truncated to the text encoder's positions


@pytest.mark.parametrize("loader", [AutoTokenizer, PreTrainedTokenizerFast])
def test_save_and_load_round_trip(loader, tmp_path: Path) -> None:
    tokenizer = build_word_tokenizer(CAPTIONS, max_length=16)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = loader.from_pretrained(tmp_path / "tokenizer")
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert ids(loaded, PROMPTS) == ids(tokenizer, PROMPTS)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.model_max_length == 16
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(loaded, name) == getattr(tokenizer, name), name
    assert is_word_level(loaded)


def test_unknown_words_map_to_unk_and_are_reported_once() -> None:
    tokenizer = build_word_tokenizer(CAPTIONS, max_length=16)
    encoded = ids(tokenizer, ["a purple circle"])[0]
    assert encoded[2] == tokenizer.unk_token_id == tokenizer.get_vocab()["[UNK]"]
    assert encoded[1] == tokenizer.get_vocab()["a"]
    with pytest.warns(UserWarning, match=r"\['purple'\]"):
        assert report_unknown_words(tokenizer, ["a purple circle"]) == {"purple"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second report of the same word would raise here
        assert report_unknown_words(tokenizer, ["purple square", "a red circle"]) == {"purple"}
    with pytest.warns(UserWarning, match=r"\['violet'\]") as record:
        report_unknown_words(tokenizer, ["violet, purple"])
    assert len(record) == 1 and "purple" not in str(record[0].message)  # only the new word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert report_unknown_words(tokenizer, CAPTIONS) == set()


def test_model_reports_unknown_prompt_words(tiny_model) -> None:
    with pytest.warns(UserWarning, match="zebra"):
        input_ids = tiny_model.tokenize(["a zebra circle on a black background"])
    assert input_ids.shape == (1, tiny_model.max_length)
    assert input_ids[0, 2].item() == tiny_model.tokenizer.unk_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model.tokenize(["a zebra square"])

"""A word-level tokenizer built from the training captions (saved with the model).

The tiny model learns its text encoder from scratch, so a closed vocabulary of the caption words is
all it needs; a word outside it maps to [UNK] and is reported once.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# [EOS] is deliberately not id 2: CLIPTextModel treats eos_token_id == 2 as a legacy config.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
# A placeholder such as `<new1>` (a customization token, Custom Diffusion style) is one word: the
# tokenizer holds it as an added token, matched before punctuation splits it into "<", "new1", ">".
_PLACEHOLDER = re.compile(r"<[^<>\s]+>")
_WORD = re.compile(r"<[^<>\s]+>|\w+|[^\w\s]")


def caption_words(caption: str) -> list[str]:
    return _WORD.findall(caption.lower())


def build_word_tokenizer(captions: Iterable[str], max_length: int = 16) -> PreTrainedTokenizerFast:
    all_words = sorted({w for c in captions for w in caption_words(c)})
    placeholders = [w for w in all_words if _PLACEHOLDER.fullmatch(w)]
    words = [w for w in all_words if not _PLACEHOLDER.fullmatch(w)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    backend.post_processor = TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        model_max_length=max_length,
    )
    if placeholders:  # after the word vocabulary, as a customization would add them
        tokenizer.add_tokens(placeholders)
    return tokenizer


def is_word_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and isinstance(backend.model, WordLevel)


_reported_unknown: set[str] = set()


def report_unknown_words(tokenizer: PreTrainedTokenizerBase, captions: Iterable[str]) -> set[str]:
    """Warn once per word a word-level tokenizer does not know (it becomes [UNK])."""
    if not is_word_level(tokenizer):
        return set()
    vocab = tokenizer.get_vocab()
    unknown = {w for c in captions for w in caption_words(c) if w not in vocab}
    new = unknown - _reported_unknown
    if new:
        _reported_unknown.update(new)
        warnings.warn(
            f"Words not in the model's vocabulary map to [UNK]: {sorted(new)}. The model was trained "
            "on captions without them; use the training captions' words in prompts.",
            stacklevel=3,
        )
    return unknown

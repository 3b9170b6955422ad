"""A small real Hugging Face tokenizer for tests, built with the ``tokenizers`` library.

``build_model_dir(path)`` trains a byte-level BPE (GPT-2 style pre-tokenizer and decoder, so any
UTF-8 text round-trips and multi-byte characters span several tokens) on text with accented
letters, CJK and emoji, and saves it as a Hugging Face model directory: ``tokenizer.json`` with a
``<s> $A`` template post-processor (BOS added on encode, as Llama-style models do) and a
``tokenizer_config.json`` naming ``<s>``/``</s>``. Training is deterministic for a given corpus.

``hf_model_dir`` is a session fixture over it; reuse it by importing it into a test module or a
``conftest.py`` (``from tests.fakes.tokenizer import hf_model_dir  # noqa: F401``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

__all__ = ["BOS", "CORPUS", "EOS", "build_model_dir", "corpus_words", "hf_model_dir"]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
CORPUS = (
    "Prefill-as-a-Service streams KV across datacenters. The decode cluster computes from t1. ",
    "Café naïve façade, déjà vu — Ünïcödé ß ø å. ",
    "日本語のテキストを東京で処理します。 北京 和 上海 的 数据中心 東京 日本語 テキスト。 ",
    "Emoji too: 🚀✨🙂 and math ∑∫≈≠. ",
    "the quick brown fox jumps over the lazy dog 0123456789 ",
)


def build_model_dir(path: Path, vocab_size: int = 420) -> Path:
    """Train the tokenizer and write a Hugging Face model directory at ``path``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([line * 20 for line in CORPUS], trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK,
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return path


def corpus_words() -> list[str]:
    """The corpus's distinct pre-tokens (GPT-2 regex) that start with a space, in first-seen
    order: text made of them pre-tokenizes back into the same pieces."""
    from tokenizers import pre_tokenizers

    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words: dict[str, None] = {}
    for line in CORPUS:
        for _, (start, end) in splitter.pre_tokenize_str(line):
            piece = line[start:end]
            if piece.startswith(" ") and piece.strip():
                words[piece] = None
    return list(words)


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face model directory holding the test tokenizer (built once per session)."""
    return build_model_dir(tmp_path_factory.mktemp("hf_model"))

"""Tokenizers: the contract every served tokenizer meets, the reference model's byte tokenizer
(the embedded default), and ``load_tokenizer``, which picks the served model's own.

``Tokenizer`` is what the router and the engines need from a tokenizer: ``encode`` a prompt as
the served model does (special tokens such as BOS included), ``decode`` output ids (special
tokens skipped), the vocabulary size and the special ids. Two implementations:

- ``ByteTokenizer``: UTF-8 bytes as ids 0..255, then BOS/EOS/PAD; the reference engine's default,
  needing no files;
- ``engines.hf_tokenizer.HfTokenizer``: the served model's Hugging Face ``tokenizer.json`` (with
  ``tokenizer_config.json``'s special tokens and chat template), as TensorRT-LLM encodes and
  decodes with it.

Streaming text is made by ``router.detokenize.IncrementalDetokenizer`` over either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from trtllm_prfaas.errors import ConfigError, InvalidRequestError

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "NUM_SPECIAL_TOKENS",
    "PAD_ID",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "Tokenizer",
    "eos_id_of",
    "load_tokenizer",
    "model_vocabulary",
    "validate_token_ids",
]

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
NUM_SPECIAL_TOKENS = 3
VOCAB_SIZE = 256 + NUM_SPECIAL_TOKENS


class Tokenizer(Protocol):
    """What the router and the engines use of a tokenizer. Pure: any thread, no I/O."""

    @property
    def vocab_size(self) -> int:
        """Ids of this tokenizer lie in ``[0, vocab_size)``."""

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None:
        """The id that ends generation (TensorRT-LLM's default ``end_id``); None if none."""

    @property
    def chat_template(self) -> str | None:
        """The model's default chat template (Jinja source), None when it has none."""

    def encode(self, text: str) -> list[int]:
        """A prompt's ids exactly as the served model tokenizes it (BOS included if it adds it)."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids``, special tokens skipped; incomplete UTF-8 -> U+FFFD."""


class ByteTokenizer:
    """UTF-8 bytes as tokens; ``encode`` prepends BOS, ``decode`` drops special tokens."""

    vocab_size = VOCAB_SIZE
    bos_id = BOS_ID
    eos_id = EOS_ID
    chat_template: str | None = None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS_ID, *ids] if add_bos else ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if 0 <= t < 256).decode("utf-8", errors="replace")

    def validate(self, token_ids: Sequence[int]) -> None:
        """Raise InvalidRequestError naming the first id outside the vocabulary."""
        validate_token_ids(token_ids, VOCAB_SIZE)


def validate_token_ids(token_ids: Sequence[int], vocab_size: int) -> None:
    """Raise InvalidRequestError naming the first id outside ``[0, vocab_size)``."""
    for index, token in enumerate(token_ids):
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(
                f"token id {token} at position {index} is outside the vocabulary [0, {vocab_size})"
            )


def load_tokenizer(tokenizer_dir: str) -> Tokenizer:
    """The served model's tokenizer from its Hugging Face directory; ``""``: the byte tokenizer.
    Reads files (call it where config is loaded). Raises ConfigError naming a missing or
    unreadable file, or a tokenizer without an EOS token (generation could never stop)."""
    if not tokenizer_dir:
        return ByteTokenizer()
    from trtllm_prfaas.engines.hf_tokenizer import HfTokenizer

    tokenizer = HfTokenizer.from_dir(tokenizer_dir)
    eos_id_of(tokenizer)
    return tokenizer


def eos_id_of(tokenizer: Tokenizer) -> int:
    """The tokenizer's EOS id; ConfigError when it names none."""
    if tokenizer.eos_id is None:
        raise ConfigError(
            "the tokenizer names no EOS token (tokenizer_config.json 'eos_token'): "
            "generation could not stop"
        )
    return tokenizer.eos_id


def model_vocabulary(tokenizer_dir: str) -> dict[str, int]:
    """``ModelConfig`` overrides giving the reference model ``tokenizer_dir``'s vocabulary
    (``vocab_size``, ``eos_id``); ``{}`` for ``""`` (the byte tokenizer's own)."""
    if not tokenizer_dir:
        return {}
    tokenizer = load_tokenizer(tokenizer_dir)
    return {"vocab_size": tokenizer.vocab_size, "eos_id": eos_id_of(tokenizer)}

"""Byte-level tokenizer of the reference model: ids 0..255 are bytes, then the special tokens."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from trtllm_prfaas.errors import InvalidRequestError

__all__ = ["BOS_ID", "EOS_ID", "NUM_SPECIAL_TOKENS", "PAD_ID", "VOCAB_SIZE", "ByteTokenizer"]

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
NUM_SPECIAL_TOKENS = 3
VOCAB_SIZE = 256 + NUM_SPECIAL_TOKENS


class ByteTokenizer:
    """UTF-8 bytes as tokens; ``encode`` prepends BOS, ``decode`` drops special tokens."""

    vocab_size = VOCAB_SIZE
    bos_id = BOS_ID
    eos_id = EOS_ID

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS_ID, *ids] if add_bos else ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if 0 <= t < 256).decode("utf-8", errors="replace")

    def validate(self, token_ids: Sequence[int]) -> None:
        """Raise InvalidRequestError naming the first id outside the vocabulary."""
        for index, token in enumerate(token_ids):
            if not 0 <= token < VOCAB_SIZE:
                raise InvalidRequestError(
                    f"token id {token} at position {index} is outside the vocabulary "
                    f"[0, {VOCAB_SIZE})"
                )


class StreamingDecoder:
    """Turns tokens into text as they arrive without splitting multi-byte UTF-8 characters."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: Sequence[int]) -> str:
        return self._decoder.decode(bytes(t for t in token_ids if 0 <= t < 256))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)

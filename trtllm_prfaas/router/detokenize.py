"""Incremental detokenization: output token ids -> streamed text pieces, for every door.

Contract of ``IncrementalDetokenizer`` (one per request, one thread): ``push(ids)`` returns the
new text those ids complete, ``flush()`` (once, at the end) the rest. Joined, the pieces are
exactly ``tokenizer.decode(all ids)``, the unary text (special tokens skipped). No piece but the
last ends inside a UTF-8 sequence: text whose decode still ends in U+FFFD (a character whose
remaining bytes are in tokens yet to come) is held back until the next token completes it; a
sequence that stays invalid is released, as U+FFFD, once a later token follows it, since the
unary text has that U+FFFD too.

Technique (read, not copied): the prefix-offset method of vLLM's ``detokenize_incrementally``
(vllm-project/vllm ``vllm/transformers_utils/detokenizer_utils.py``, commit c89fefc) that
TensorRT-LLM's own ``TransformersTokenizer.trtllm_decode_incrementally`` adapts
(``tensorrt_llm/llmapi/tokenizer.py``, stored copy 315650635): the tokens already emitted since
the previous emission are decoded again as context (``prefix``), so a BPE token whose text
depends on its neighbours (SentencePiece's leading-space marker, byte-level fragments of one
character) yields exactly its share of the joint decode; new text is released only when the
window's decode grows and does not end in U+FFFD. Unlike those, the window starts at the first
output token (no prompt tokens as context), because the unary text TensorRT-LLM returns is the
decode of the output ids alone, and ``flush`` emits what the whole output's decode adds to
what was streamed, so the joined pieces equal it even for decoders that are not
prefix-consistent (logged when the streamed text was not a prefix of it).
Hugging Face ``TextStreamer`` (``transformers/generation/streamers.py``) instead releases text up
to the last space; the offsets above release every completed character at once.

Cost: two decodes of the short window per push, one decode of the whole output at ``flush``.
"""

from __future__ import annotations

from collections.abc import Sequence

from trtllm_prfaas.engines.tokenizer import Tokenizer
from trtllm_prfaas.telemetry.logging import get_logger

__all__ = ["IncrementalDetokenizer"]

log = get_logger(__name__)

_REPLACEMENT = "\ufffd"  # what a decode gives for bytes that are not (yet) a whole character


class IncrementalDetokenizer:
    """Streams the text of one request's output ids; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: emitted tokens kept as context for the next decode
        self._read = 0  # tokens whose text has been emitted
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

    def push(self, token_ids: Sequence[int]) -> str:
        """The text ``token_ids`` complete ("" while it is still held back)."""
        self._ids += token_ids
        if len(self._ids) == self._read:
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        window_text = self._tok.decode(self._ids[self._prefix :])
        if len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT):
            return ""  # nothing visible yet (a special token), or a character still incomplete
        return self._emit(window_text[len(prefix_text) :])

    def flush(self) -> str:
        """The rest of the text, held back or not: the whole output's decode minus what was
        emitted. Call once, after the last ``push``."""
        whole, emitted = self._tok.decode(self._ids), self.text
        if whole.startswith(emitted):
            return self._emit(whole[len(emitted) :])
        log.warning(
            "detokenize_diverged",
            num_tokens=len(self._ids),
            note="the streamed text is not a prefix of the whole decode",
        )
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        return self._emit(self._tok.decode(self._ids[self._prefix :])[len(prefix_text) :])

    def _emit(self, piece: str) -> str:
        self._prefix, self._read = self._read, len(self._ids)
        self._pieces.append(piece)
        return piece

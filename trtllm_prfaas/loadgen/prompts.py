"""Deterministic prompts of an exact token count, in the served model's tokens.

Byte tokenizer (no ``tokenizer`` given): a prompt of ``n`` tokens is BOS plus ``n - 1`` ASCII
bytes. As text (``text_input``) it is the ``n - 1`` characters (the server's tokenizer adds
BOS); as token ids (``input_ids``) it is ``[BOS, *bytes]``. With the served model's tokenizer
given (a Hugging Face directory's), the text is the shortest prefix of the same words that it
encodes into ``n`` ids (BOS included where it adds one; ``text_of_tokens``), and the ids are
that encoding.

The bytes are words from a fixed list chosen by ``random.Random(f"{seed}:{index}")``, after a
header naming the request, so two requests share no prefix beyond a few tokens (the paper's case
study has no prefix hits) and the same ``(seed, index)`` always gives the same prompt.
"""

from __future__ import annotations

import random

from trtllm_prfaas.engines.tokenizer import BOS_ID, Tokenizer

__all__ = ["prompt_ids", "prompt_text", "text_of_tokens"]

_WORDS = (
    "prefill", "decode", "cache", "block", "layer", "token", "relay", "cluster", "router",
    "link", "egress", "queue", "threshold", "remote", "local", "hybrid", "linear", "attention",
    "state", "stream", "datacenter", "bandwidth", "latency", "throughput", "schedule",
    "transfer", "prefix", "service", "model", "request", "batch",
)  # fmt: skip


def prompt_text(num_tokens: int, index: int, seed: int, tokenizer: Tokenizer | None = None) -> str:
    """ASCII text of ``num_tokens`` tokens: ``num_tokens - 1`` characters (>= 1) for the byte
    tokenizer (``tokenizer`` None), else sized by ``tokenizer`` (``text_of_tokens``)."""
    if tokenizer is not None:
        words = _words(num_tokens * 8, index, seed)  # BPE packs a few characters per token
        return text_of_tokens(tokenizer, words, max(num_tokens, 2))
    return _words(max(num_tokens - 1, 1), index, seed)


def _words(num_chars: int, index: int, seed: int) -> str:
    rng = random.Random(f"{seed}:{index}")
    parts = [f"{index}/{seed}:"]
    length = len(parts[0])
    while length < num_chars:
        word = rng.choice(_WORDS)
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:num_chars]


def prompt_ids(
    num_tokens: int, index: int, seed: int, tokenizer: Tokenizer | None = None
) -> list[int]:
    """``[BOS, *bytes of prompt_text(...)]`` (exactly ``max(num_tokens, 2)`` ids), or with
    ``tokenizer`` its encoding of ``prompt_text(..., tokenizer)``."""
    if tokenizer is not None:
        return tokenizer.encode(prompt_text(num_tokens, index, seed, tokenizer))
    return [BOS_ID, *prompt_text(num_tokens, index, seed).encode("ascii")]


def text_of_tokens(tokenizer: Tokenizer, text: str, num_tokens: int) -> str:
    """The shortest prefix of ``text`` (repeated as needed) that ``tokenizer`` encodes into at
    least ``num_tokens`` ids (BOS included where it adds one): exactly ``num_tokens`` unless one
    character adds two tokens at the boundary. Binary search: a longer prefix never has fewer
    tokens, and each prompt costs ~log2(characters) encodes."""
    if num_tokens <= len(tokenizer.encode("")) or not text:
        return ""
    repeated = text
    while len(tokenizer.encode(repeated)) < num_tokens:
        repeated += repeated
    low, high = 0, len(repeated)  # encode(repeated[:low]) < num_tokens <= encode(...[:high])
    while high - low > 1:
        middle = (low + high) // 2
        if len(tokenizer.encode(repeated[:middle])) < num_tokens:
            low = middle
        else:
            high = middle
    return repeated[:high]

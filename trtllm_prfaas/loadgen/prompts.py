"""Deterministic prompts of an exact token count for the reference engine's byte tokenizer.

A prompt of ``n`` tokens is BOS plus ``n - 1`` ASCII bytes. As text (``text_input``) it is the
``n - 1`` characters (the server's tokenizer adds BOS); as token ids (``input_ids``) it is
``[BOS, *bytes]``. With another tokenizer the text is still valid and deterministic, but its
token count is the server's business.

The bytes are words from a fixed list chosen by ``random.Random(f"{seed}:{index}")``, after a
header naming the request, so two requests share no prefix beyond a few tokens (the paper's case
study has no prefix hits) and the same ``(seed, index)`` always gives the same prompt.
"""

from __future__ import annotations

import random

from trtllm_prfaas.engines.tokenizer import BOS_ID

__all__ = ["prompt_ids", "prompt_text"]

_WORDS = (
    "prefill", "decode", "cache", "block", "layer", "token", "relay", "cluster", "router",
    "link", "egress", "queue", "threshold", "remote", "local", "hybrid", "linear", "attention",
    "state", "stream", "datacenter", "bandwidth", "latency", "throughput", "schedule",
    "transfer", "prefix", "service", "model", "request", "batch",
)  # fmt: skip


def prompt_text(num_tokens: int, index: int, seed: int) -> str:
    """ASCII text of ``num_tokens - 1`` characters (``num_tokens`` tokens with BOS); >= 1 char."""
    num_chars = max(num_tokens - 1, 1)
    rng = random.Random(f"{seed}:{index}")
    parts = [f"{index}/{seed}:"]
    length = len(parts[0])
    while length < num_chars:
        word = rng.choice(_WORDS)
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:num_chars]


def prompt_ids(num_tokens: int, index: int, seed: int) -> list[int]:
    """``[BOS, *bytes of prompt_text(...)]``: exactly ``max(num_tokens, 2)`` token ids."""
    return [BOS_ID, *prompt_text(num_tokens, index, seed).encode("ascii")]

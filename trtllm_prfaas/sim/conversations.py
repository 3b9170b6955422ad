"""Traces with token-level identity: multi-turn conversations and shared documents.

The simulator's modelled prefix caches (``sim/caches.py``) need to know which requests share
which blocks, so these traces carry real prompts (token ids) and each request's chained block
hashes, computed exactly as the router's ``PrefixIndex.hashes_for`` does (the full blocks of all
but the last prompt token, under a :class:`~trtllm_prfaas.kv.hashing.CacheKey`). The same
prompts can be sent through the live router (the parity test does), so both see the same hashes.

A conversation starts with one of ``num_system_prompts`` shared system prompts (drawn uniformly),
then each turn appends a user message; the next turn's prompt is the previous prompt, the
assistant's reply (``output_tokens``) and a new user message, so a conversation's prompts grow
and each extends the last. Conversations start as a Poisson process; a conversation's turns
follow each other after exponential think times (mean ``think_s``, counted from the previous
turn's arrival: a trace is made before the run, so it cannot wait for the reply).

A shared-document trace (many questions over a few long documents) is the same with one turn
per conversation and the documents as the shared prefix: :func:`shared_documents`.

Memory: one token array per conversation (its last prompt); a turn's prompt is a view of it,
and its hashes a slice of the conversation's one hash pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.kv.hashing import CacheKey, block_hashes
from trtllm_prfaas.policy.profile import FloatArray
from trtllm_prfaas.sim.caches import SIM_CACHE_KEY
from trtllm_prfaas.sim.traffic import NO_HOLDER, IntArray, Trace

__all__ = ["ConversationModel", "Conversations", "make_conversations", "shared_documents"]

_VOCAB = 256  # token ids are bytes, as the reference engine's tokenizer (any id would hash)


@dataclass(frozen=True)
class ConversationModel:
    """Multi-turn traffic (see the module doc). User message lengths are uniform in
    ``[user_tokens / 2, 3 * user_tokens / 2]``."""

    num_conversations: int
    rate_per_s: float  # conversation starts per second
    num_turns: int = 4
    num_system_prompts: int = 4
    system_prompt_tokens: int = 4096
    user_tokens: int = 1000
    output_tokens: int = 200
    think_s: float = 30.0

    def __post_init__(self) -> None:
        counts = (self.num_conversations, self.num_turns, self.num_system_prompts)
        if min(counts) < 1 or self.rate_per_s <= 0 or self.think_s < 0:
            raise ConfigError(
                "ConversationModel needs num_conversations, num_turns, num_system_prompts >= 1, "
                f"rate_per_s > 0 and think_s >= 0; got {counts}, {self.rate_per_s}, {self.think_s}"
            )
        if min(self.system_prompt_tokens, self.output_tokens) < 0 or self.user_tokens < 2:
            raise ConfigError("ConversationModel token counts must be >= 0 (user_tokens >= 2)")


def shared_documents(
    num_questions: int,
    rate_per_s: float,
    num_documents: int = 4,
    document_tokens: int = 32_768,
    question_tokens: int = 200,
) -> ConversationModel:
    """Many one-turn questions over a few long documents (the document is the shared prefix)."""
    return ConversationModel(
        num_questions, rate_per_s, 1, num_documents, document_tokens, question_tokens, 0, 0.0
    )


@dataclass(frozen=True)
class Conversations:
    """Requests in arrival order: arrival times, prompts (token ids), which conversation and
    turn each belongs to."""

    arrival_s: FloatArray
    prompts: list[npt.NDArray[np.int32]]
    conversation: IntArray
    turn: IntArray

    def trace(self, tokens_per_block: int = 32, key: CacheKey = SIM_CACHE_KEY) -> Trace:
        """The simulator's :class:`Trace` with each request's block hashes (its
        ``hashes_for`` under ``key``). One hash pass per conversation."""
        chains: dict[int, list[int]] = {}
        longest: dict[int, npt.NDArray[np.int32]] = {}
        for c, prompt in zip(self.conversation.tolist(), self.prompts, strict=True):
            if len(prompt) > len(longest.get(c, ())):
                longest[c] = prompt
        for c, tokens in longest.items():
            chains[c] = block_hashes(tokens.tolist(), tokens_per_block, key)
        hashes = tuple(
            chains[c][: (len(p) - 1) // tokens_per_block]
            for c, p in zip(self.conversation.tolist(), self.prompts, strict=True)
        )
        n = len(self.prompts)
        zeros = np.zeros(n, dtype=np.int64)
        lengths = np.asarray([len(p) for p in self.prompts], dtype=np.int64)
        return Trace(
            self.arrival_s, lengths, zeros, np.zeros(n, dtype=np.bool_), zeros + NO_HOLDER,
            prompt_hashes=hashes, tokens_per_block=tokens_per_block,
        )  # fmt: skip


def make_conversations(model: ConversationModel, seed: int) -> Conversations:
    """A reproducible multi-turn trace (see the module doc)."""
    rng = np.random.default_rng(seed)
    m = model
    systems = [rng.integers(0, _VOCAB, m.system_prompt_tokens, dtype=np.int32)
               for _ in range(m.num_system_prompts)]  # fmt: skip
    starts = np.cumsum(rng.exponential(1.0 / m.rate_per_s, m.num_conversations))
    rows: list[tuple[float, int, int, npt.NDArray[np.int32]]] = []
    for c in range(m.num_conversations):
        parts = [systems[int(rng.integers(m.num_system_prompts))]]
        ends, at = [], float(starts[c])
        for turn in range(m.num_turns):
            lo = m.user_tokens // 2
            parts.append(rng.integers(0, _VOCAB, int(rng.integers(lo, lo + m.user_tokens + 1)),
                                      dtype=np.int32))  # fmt: skip
            ends.append(sum(len(x) for x in parts))
            if turn + 1 < m.num_turns:
                parts.append(rng.integers(0, _VOCAB, m.output_tokens, dtype=np.int32))
        tokens = np.concatenate(parts)
        for turn, end in enumerate(ends):
            rows.append((at, c, turn, tokens[:end]))
            at += float(rng.exponential(m.think_s)) if m.think_s > 0 else 0.0
    rows.sort(key=lambda r: (r[0], r[1]))
    return Conversations(
        np.asarray([r[0] for r in rows], dtype=np.float64),
        [r[3] for r in rows],
        np.asarray([r[1] for r in rows], dtype=np.int64),
        np.asarray([r[2] for r in rows], dtype=np.int64),
    )

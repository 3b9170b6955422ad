"""The two traces of ``bench/prefix.py`` and the client that plays them through the router.

Both are built from one seed, so the cache-aware and the cache-blind run get the same trace:

- **multi-turn** (:class:`Conversation`): a few shared system prompts; conversation ``i`` uses
  system prompt ``i % num_system_prompts`` and starts ``i * stagger_s`` after the run begins;
  turn ``k`` is sent ``think_s`` after turn ``k - 1`` has answered, its prompt the whole
  history (system prompt, every earlier user turn and the answer the router returned to it)
  plus the new user turn. The answers are the served tokens, so the two runs' histories stay
  equal exactly as long as the served tokens are bit-exact (checked by the bench).
- **shared-document** (:class:`Question`): many questions over a few long documents, each
  prompt a document followed by its question, arriving at seeded Poisson offsets.

Prompts are byte-tokenizer ids (``loadgen.prompts.prompt_ids``: BOS, then ASCII words chosen by
``(seed, index)``); sampling is seeded per request (temperature 0.7), so a token computed from
different KV shows.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import tritonclient.grpc.aio as grpcaio

from trtllm_prfaas.loadgen.client import (
    RequestSpec,
    StreamedIds,
    stream_request,
    stream_request_of,
)
from trtllm_prfaas.loadgen.prompts import prompt_ids
from trtllm_prfaas.loadgen.stats import OK

__all__ = [
    "Conversation",
    "Outcome",
    "Question",
    "multi_turn_trace",
    "play_conversations",
    "play_questions",
    "shared_document_trace",
]

MODEL = "tensorrt_llm"
TEMPERATURE = 0.7


@dataclass(frozen=True)
class Conversation:
    index: int
    start_s: float  # after the run begins
    think_s: float  # between an answer and the next turn
    system: list[int]  # BOS + the shared system prompt
    user_turns: list[list[int]]  # each turn's new tokens (no BOS)


@dataclass(frozen=True)
class Question:
    index: int
    start_s: float
    document: int  # which document
    prompt: list[int]  # BOS + the document + the question


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it. ``key`` names it across runs: ``(conversation,
    turn)`` or ``(question, 0)``."""

    key: tuple[int, int]
    num_prompt_tokens: int
    ttft_s: float | None
    token_ids: list[int]
    error: str = ""


def _text_ids(num_tokens: int, index: int, seed: int) -> list[int]:
    return prompt_ids(num_tokens + 1, index, seed)[1:]  # without the BOS


def multi_turn_trace(
    seed: int,
    num_conversations: int,
    num_turns: int,
    num_system_prompts: int,
    system_tokens: int,
    user_tokens: int,
    stagger_s: float,
    think_s: float,
) -> list[Conversation]:
    systems = [prompt_ids(system_tokens, 10_000 + s, seed) for s in range(num_system_prompts)]
    return [
        Conversation(
            index=i,
            start_s=i * stagger_s,
            think_s=think_s,
            system=systems[i % num_system_prompts],
            user_turns=[_text_ids(user_tokens, 1000 * (i + 1) + k, seed) for k in range(num_turns)],
        )
        for i in range(num_conversations)
    ]


def shared_document_trace(
    seed: int,
    num_documents: int,
    document_tokens: int,
    num_questions: int,
    question_tokens: int,
    rate_rps: float,
) -> list[Question]:
    documents = [prompt_ids(document_tokens, 20_000 + d, seed) for d in range(num_documents)]
    rng = random.Random(f"{seed}:shared-document")
    questions, start_s = [], 0.0
    for q in range(num_questions):
        document = rng.randrange(num_documents)
        prompt = documents[document] + _text_ids(question_tokens, 30_000 + q, seed)
        questions.append(Question(q, start_s, document, prompt))
        start_s += rng.expovariate(rate_rps)
    return questions


# ---- the client --------------------------------------------------------------------------------


async def ask(
    client: Any,
    key: tuple[int, int],
    prompt: list[int],
    max_tokens: int,
    seed: int,
    timeout_s: float,
) -> Outcome:
    """Stream one request; never raises for a failed request (its ``error`` says why)."""
    spec = RequestSpec(key[0], len(prompt), prompt, max_tokens, TEMPERATURE, seed)
    streamed, sent_at = StreamedIds(), time.monotonic()
    request = stream_request_of(MODEL, spec, ["output_ids"])
    status, reason = await stream_request(client, request, streamed.add, timeout_s)
    if status != OK:
        return Outcome(key, len(prompt), None, streamed.ids, f"{status}: {reason}")
    ttft = None if streamed.first_at is None else streamed.first_at - sent_at
    return Outcome(key, len(prompt), ttft, streamed.ids)


async def play_conversations(
    address: str, trace: list[Conversation], max_tokens: int, seed: int, timeout_s: float
) -> list[Outcome]:
    """Every conversation at once, each one's turns in order; a failed turn ends its
    conversation (its history has no answer to go on with)."""
    outcomes: list[Outcome] = []
    client = grpcaio.InferenceServerClient(address)

    async def converse(conv: Conversation) -> None:
        await asyncio.sleep(conv.start_s)
        history = list(conv.system)
        for turn, user in enumerate(conv.user_turns):
            prompt = history + user
            key = (conv.index, turn)
            outcome = await ask(client, key, prompt, max_tokens, seed + 7919 * conv.index + turn,
                                timeout_s)  # fmt: skip
            outcomes.append(outcome)
            if outcome.error:
                return
            history = prompt + outcome.token_ids
            await asyncio.sleep(conv.think_s)

    try:
        await asyncio.gather(*(converse(conv) for conv in trace))
    finally:
        await client.close()
    return sorted(outcomes, key=lambda o: o.key)


async def play_questions(
    address: str, trace: list[Question], max_tokens: int, seed: int, timeout_s: float
) -> list[Outcome]:
    client = grpcaio.InferenceServerClient(address)

    async def one(question: Question) -> Outcome:
        await asyncio.sleep(question.start_s)
        key = (question.index, 0)
        return await ask(client, key, question.prompt, max_tokens, seed + question.index,
                         timeout_s)  # fmt: skip

    try:
        outcomes = await asyncio.gather(*(one(q) for q in trace))
    finally:
        await client.close()
    return sorted(outcomes, key=lambda o: o.key)

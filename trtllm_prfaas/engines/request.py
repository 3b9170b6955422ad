"""Requests of the reference engine: sampling parameters, states, and the connector-facing view.

``LlmRequest`` exposes what KV cache connectors read from TensorRT-LLM's request object
(``request_id``, ``get_tokens(0)``, ``context_current_position``,
``is_generation_only_request``), so the same connector code runs against both engines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from trtllm_prfaas.errors import InvalidRequestError, PrfaasError

__all__ = ["LlmRequest", "RequestOutput", "RequestState", "SamplingParams"]


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy; otherwise sampling seeded by ``seed`` (deterministic).

    ``num_skipped_draws``: random draws this request's generator skips before its first token.
    A decode request that continues after a first token sampled elsewhere (the prompt-plus-first-
    token handoff) skips that token's draw, so it samples exactly as a single-engine run."""

    max_tokens: int = 16
    temperature: float = 0.0
    seed: int = 0
    ignore_eos: bool = False
    num_skipped_draws: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be > 0, got {self.max_tokens}")
        if not self.temperature >= 0.0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.num_skipped_draws < 0:
            raise InvalidRequestError(
                f"num_skipped_draws must be >= 0, got {self.num_skipped_draws}"
            )


class RequestState(Enum):
    WAITING = "waiting"  # queued, no blocks yet
    LOADING = "loading"  # parked: the connector is loading its KV asynchronously
    CONTEXT = "context"  # prefill chunks still to compute
    GENERATION = "generation"  # decoding one token per iteration
    SAVING = "saving"  # finished; blocks pinned until the connector reports the save done
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(frozen=True)
class RequestOutput:
    """What one iteration produced for a request: new tokens and, at the end, why it ended."""

    request_id: int
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "length", "stop", "aborted", "error"
    error: PrfaasError | None = None
    num_connector_tokens: int = 0  # on the finishing output: prompt tokens the connector supplied
    num_cached_tokens: int = 0  # on the finishing output: prompt tokens reused from the cache


@dataclass
class LlmRequest:
    request_id: int
    prompt_token_ids: list[int]
    sampling: SamplingParams
    deadline: float  # time.monotonic() by which it must have been admitted
    state: RequestState = RequestState.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    state_slot: int = -1
    num_reserved_blocks: int = 0
    num_computed_tokens: int = 0
    num_connector_tokens: int = 0  # prompt tokens the connector supplied
    num_cached_tokens: int = 0  # prompt tokens reused from the engine's own prefix cache
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full prompt blocks
    num_committed_blocks: int = 0  # leading prompt blocks named in the prefix cache
    snapshot_slot: int | None = None  # state snapshot matched, held until the prompt is done
    is_generation_only_request: bool = False
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def py_request_id(self) -> int:
        return self.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def context_current_position(self) -> int:
        return self.num_computed_tokens

    @property
    def context_remaining_length(self) -> int:
        return max(0, self.prompt_len - self.num_computed_tokens)

    def get_tokens(self, beam: int) -> list[int]:
        """All tokens so far (prompt then outputs); beam width is 1."""
        if beam != 0:
            raise IndexError(f"beam {beam} requested, beam width is 1")
        return self.prompt_token_ids + self.output_token_ids

    def num_tokens_total(self) -> int:
        """Worst-case length: prompt plus every token it may generate."""
        return self.prompt_len + self.sampling.max_tokens

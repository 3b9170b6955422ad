"""The requests a connector sees, upstream's connector data types, and what a client sees.

Requests: connectors see only fields the 1.2 ``LlmRequest`` binding exposes (``bindings.cpp``
385050988); ``get_num_new_matched_tokens`` gets the C++ view (``CppRequestView``: no ``py_*``
attributes; see ``mark_ready_requests`` in 00fdcbf: "the req we get from the C++ call is
different"), ``update_state_after_alloc`` and ``request_finished`` the Python one
(``FakeLlmRequest``). There is no ``connector_params``, no ``py_disaggregated_params`` (absent in
1.2: TRTLLM_AUDIT.md 3a).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


# ---------------------------------------------------------------- upstream's connector types
@dataclass
class RequestData:
    """``kv_cache_connector.RequestData`` (same fields)."""

    request_id: int
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int


@dataclass
class SchedulerOutput:
    """``kv_cache_connector.SchedulerOutput`` (same fields)."""

    new_requests: list[RequestData] = field(default_factory=list)
    cached_requests: list[RequestData] = field(default_factory=list)


class State(Enum):
    """The ``LlmRequestState`` values this loop uses."""

    CONTEXT_INIT = "context_init"
    GENERATION_IN_PROGRESS = "generation_in_progress"
    GENERATION_COMPLETE = "generation_complete"
    LOADING = "disagg_generation_trans_in_progress"  # parked by an async load
    SAVING = "disagg_context_trans_in_progress"  # finished, blocks pinned by an async save


class CppRequestView:
    """The C++ ``LlmRequest`` as the binding exposes it: what ``get_num_new_matched_tokens``
    gets. No ``py_*`` attribute, no project-only field."""

    __slots__ = ("_req",)

    def __init__(self, req: FakeLlmRequest) -> None:
        self._req = req

    request_id = property(lambda self: self._req.request_id)
    prompt_len = property(lambda self: self._req.prompt_len)
    orig_prompt_len = property(lambda self: self._req.prompt_len)
    max_new_tokens = property(lambda self: self._req.max_new_tokens)
    context_current_position = property(lambda self: self._req.context_current_position)
    prepopulated_prompt_len = property(lambda self: self._req.prepopulated_prompt_len)
    is_generation_only_request = property(lambda self: self._req.is_generation_only_request)
    is_context_only_request = property(lambda self: False)
    is_dummy_request = property(lambda self: False)
    cache_salt_id = property(lambda self: None)

    def get_tokens(self, beam: int | None = None) -> list[int]:
        tokens = list(self._req.tokens)
        return tokens if beam is not None else [tokens]


class FakeLlmRequest:
    """The Python ``LlmRequest`` (binding fields plus ``py_request_id`` and friends): what
    ``update_state_after_alloc`` and ``request_finished`` get."""

    __slots__ = (
        "context_chunk_size",
        "context_current_position",
        "is_generation_only_request",
        "max_new_tokens",
        "prepopulated_prompt_len",
        "prompt_len",
        "request_id",
        "state",
        "tokens",
    )  # fmt: skip

    def __init__(self, rid: int, prompt: list[int], max_new: int, gen_only: bool) -> None:
        self.request_id, self.tokens, self.prompt_len = rid, list(prompt), len(prompt)
        self.max_new_tokens, self.is_generation_only_request = max_new, gen_only
        self.context_current_position = self.prepopulated_prompt_len = self.context_chunk_size = 0
        self.state = State.CONTEXT_INIT

    py_request_id = property(lambda self: self.request_id)
    py_prompt_len = property(lambda self: self.prompt_len)
    py_orig_prompt_len = property(lambda self: self.prompt_len)
    py_max_new_tokens = property(lambda self: self.max_new_tokens)
    orig_prompt_len = py_orig_prompt_len
    is_context_only_request = property(lambda self: False)
    is_dummy_request = property(lambda self: False)
    cache_salt_id = property(lambda self: None)
    is_first_context_chunk = property(
        lambda self: self.context_current_position == self.prepopulated_prompt_len
    )
    context_remaining_length = property(
        lambda self: self.prompt_len - self.context_current_position
    )

    def get_tokens(self, beam: int | None = None) -> list[int]:
        return list(self.tokens) if beam is not None else [list(self.tokens)]


@dataclass
class Result:
    """What the client of one request sees."""

    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    is_finished: bool = False

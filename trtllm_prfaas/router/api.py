"""The seam between the front door and whatever serves requests: the ``Orchestrator`` contract.

The front door (``frontdoor.py``) turns a KServe v2 request into a ``GenerateRequest`` and asks
an ``Orchestrator`` for its tokens. Two implementations sit behind the seam:
``LocalEngineOrchestrator`` (one in-process reference engine: single-engine mode and the ground
truth) and the disaggregated router (prefill local or remote, decode local). The front door only
sees this module.

Contract of ``Orchestrator.generate(request)``:

- It is an async generator (``async def`` with ``yield``, so it has ``aclose()``), consumed on
  the caller's event loop. It yields ``TokenChunk``s in order; exactly the last one has
  ``is_final=True`` and a ``finish_reason`` ("length", "stop"). Concatenating every chunk's
  ``token_ids`` gives the request's output tokens and concatenating every ``text`` gives their
  text (the orchestrator decodes incrementally, never splitting a UTF-8 character across
  chunks). With ``streaming=False`` it may coalesce everything into one chunk.
- Errors are raised from the generator, never yielded, and are from ``trtllm_prfaas.errors``:
  ``InvalidRequestError`` (bad input: the message names what was wrong), ``AdmissionRejected``
  (valid, but no capacity now), ``TransferTimeout`` (a leg or the whole request missed its
  deadline), ``EngineError`` / ``ConnectorError`` / ``TransportError`` (a failure while running).
  Nothing runs before the first ``__anext__``; validation errors are raised there.
- Deadline: ``request.deadline_s`` is the time budget in seconds for the whole request, measured
  from the first ``__anext__``. When it runs out the request is cancelled in the engine(s) and
  ``TransferTimeout`` is raised. ``generate`` never hangs past its deadline.
- Cancellation: if the consumer stops iterating early (``aclose()``, which ``async with
  contextlib.aclosing(...)`` guarantees, or the consuming task is cancelled, which raises
  ``CancelledError`` at the pending ``await``), the orchestrator cancels the request so every
  engine it touched frees its blocks. Cancellation is idempotent and never raises.
- Thread-safety: ``generate`` may be called concurrently from one event loop; ``is_ready`` and
  the properties may be called from any thread and never block.
- Tokenizer: ``tokenizer`` is the served model's (``engines/tokenizer.py``'s ``Tokenizer``: the
  reference byte tokenizer, or a Hugging Face model directory's). ``encode`` and the text of
  every chunk use it; the doors that need more than ids use it too (the OpenAI door renders
  chat prompts with its ``chat_template``). Implementations set it in ``__init__``; it never
  changes afterwards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from trtllm_prfaas.engines.tokenizer import Tokenizer

__all__ = ["GenerateRequest", "Orchestrator", "TokenChunk"]


@dataclass(frozen=True)
class GenerateRequest:
    """One generation request, already tokenized and validated for shape by the front door.

    ``request_id`` is unique among in-flight requests (logs and metrics carry it);
    ``temperature == 0`` is greedy, otherwise sampling seeded by ``seed`` (deterministic);
    ``deadline_s`` is the budget in seconds for the whole request (see the module docstring).
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float
    seed: int
    streaming: bool
    deadline_s: float


@dataclass(frozen=True)
class TokenChunk:
    """Tokens produced since the previous chunk, their text, and whether the request is done."""

    token_ids: list[int]
    text: str
    is_final: bool = False
    finish_reason: str | None = None  # set on the final chunk: "length" or "stop"


class Orchestrator(ABC):
    """Serves ``GenerateRequest``s; see the module docstring for the full contract."""

    tokenizer: Tokenizer  # the served model's; set by each implementation's __init__

    @property
    @abstractmethod
    def model_name(self) -> str:
        """The model name served to clients (``tensorrt_llm`` by default, like Triton's llmapi)."""

    @property
    @abstractmethod
    def max_seq_len(self) -> int:
        """Longest prompt plus ``max_tokens`` a request may have."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Token ids must lie in ``[0, vocab_size)``."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Tokenize a prompt exactly as the engines expect it (BOS included). Pure, any thread."""

    @abstractmethod
    def is_ready(self) -> bool:
        """True while new requests can be served. Never blocks."""

    @abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenChunk, None]:
        """Yield the request's chunks as tokens arrive; implement as ``async def`` + ``yield``."""

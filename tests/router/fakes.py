"""A scripted in-process Orchestrator for front-door unit tests: it yields given chunks, raises a
given error, or hangs after its chunks until cancelled, and records what it saw."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator

from trtllm_prfaas.engines.tokenizer import ByteTokenizer
from trtllm_prfaas.router.api import GenerateRequest, Orchestrator, TokenChunk


class FakeOrchestrator(Orchestrator):
    def __init__(
        self,
        chunks: list[TokenChunk] | None = None,
        error: Exception | None = None,
        hang: bool = False,
        ready: bool = True,
        model_name: str = "tensorrt_llm",
    ) -> None:
        self.chunks = (
            chunks if chunks is not None else [TokenChunk([72, 105], "Hi", True, "length")]
        )
        self.error, self.hang, self.ready, self._model_name = error, hang, ready, model_name
        self.tokenizer = ByteTokenizer()
        self.requests: list[GenerateRequest] = []
        self.cancelled: list[str] = []
        self.started = threading.Event()
        self.cancelled_event = threading.Event()

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_seq_len(self) -> int:
        return 64

    @property
    def vocab_size(self) -> int:
        return ByteTokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def is_ready(self) -> bool:
        return self.ready

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenChunk, None]:
        self.requests.append(request)
        self.started.set()
        finished = False
        try:
            for chunk in self.chunks:
                yield chunk
            if self.error is not None:
                raise self.error
            if self.hang:
                await asyncio.Event().wait()  # until cancelled
            finished = True
        finally:
            if not finished:
                self.cancelled.append(request.request_id)
                self.cancelled_event.set()

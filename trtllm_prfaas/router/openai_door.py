"""The OpenAI-compatible door: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health``, as a FastAPI app that ``http_door.HttpDoor`` serves (port 9000 by default, the port
of Triton's OpenAI frontend, ``server/python/openai/openai_frontend/main.py`` ``--openai-port``).

Requests go to the same ``Orchestrator.generate`` as the gRPC door (routing, deadlines, KV relay
and metrics are the router's, one code path); ``openai_protocol.py`` turns bodies into
``GenerateRequest``s (what is honoured and what is refused is listed there).

Answers follow the OpenAI API as the official ``openai`` client reads them:

- unary: ``text_completion`` / ``chat.completion`` objects with ``usage``;
- ``stream: true``: server-sent events, one ``data: {chunk}`` per text piece (chat opens with a
  ``{"role": "assistant"}`` delta), the last one carrying ``finish_reason``; with
  ``stream_options.include_usage`` every chunk has ``"usage": null`` and one more chunk with no
  choices carries the usage; the stream ends with ``data: [DONE]``;
- errors: ``{"error": {"message", "type", "param", "code"}}`` with 400 (``param`` names the
  field), 404 (unknown model; ``code`` ``model_not_found``), 429 (``AdmissionRejected``: no
  capacity now), 503 (not ready, or a worker died under the request), 504 (the deadline passed),
  500 (anything else), from the same error kinds the gRPC door maps (``servicer.status_for``).
  An error after a stream has started is one ``data: {"error": ...}`` event, then ``[DONE]``
  (the ``openai`` client raises it as ``APIError``).

Stop strings: the text is cut before the first one, ``finish_reason`` is "stop", and the
request is cancelled in the engines at once (usage counts the tokens generated until then).

Cancellation: a client that disconnects cancels its request (the engines free its blocks):
while a unary request runs, a watcher reads the connection for ``http.disconnect``; once a
stream has started, Starlette's ``StreamingResponse`` does (ASGI spec < 2.4, as uvicorn's HTTP
protocols declare) and cancels the stream. Each request's generator is iterated by one task of
its own (``_Run``), because the orchestrator's deadline is a task-scoped ``asyncio.timeout``.

Deadline: ``OpenAIConfig.request_timeout_s`` per request, enforced by the orchestrator; the door
gives up ``_DEADLINE_MARGIN_S`` later in any case.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from trtllm_prfaas.engines.tokenizer import Tokenizer
from trtllm_prfaas.errors import (
    ConfigError,
    ModelNotFound,
    NotReady,
    PrfaasError,
    TransferTimeout,
)
from trtllm_prfaas.router.api import Orchestrator
from trtllm_prfaas.router.openai_protocol import (
    ChatPrompt,
    FieldError,
    OpenAIRequest,
    ParseContext,
    StopCutter,
    parse_chat,
    parse_completion,
)
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.vocabulary import kind_of

__all__ = ["OPENAI_PORT", "OpenAIConfig", "build_openai_app"]

log = get_logger(__name__)

OPENAI_PORT = 9000
_DEADLINE_MARGIN_S = 5.0  # the orchestrator ends a late request itself; this is a backstop
_SSE_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class OpenAIConfig:
    request_timeout_s: float = 300.0  # each request's deadline (the gRPC door's default)
    max_body_bytes: int = 64 * 2**20  # a larger body is refused before it is parsed
    owned_by: str = "trtllm-prfaas"

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0 or self.max_body_bytes <= 0:
            raise ConfigError("OpenAIConfig: request_timeout_s and max_body_bytes must be > 0")


class RequestCancelled(PrfaasError):
    """The client went away (or the server is stopping) before the request finished."""


# ---------------------------------------------------------------------------- error mapping
def http_error_for(exc: BaseException) -> tuple[int, str, str | None]:
    """(HTTP status, OpenAI error ``type``, ``code``) of a failed request: its row in
    ``vocabulary.ERROR_KINDS``, the table the gRPC door's ``status_for`` reads."""
    kind = kind_of(exc)
    return kind.http_status, kind.openai_type, kind.openai_code


def _error_body(exc: BaseException, status: int, kind: str, code: str | None) -> dict[str, Any]:
    if isinstance(exc, PrfaasError):
        message = str(exc)
    else:  # a bug: keep serving, tell the client it was ours
        message = f"internal error: {type(exc).__name__}: {exc}"
    param = exc.param if isinstance(exc, FieldError) else None
    if isinstance(exc, ModelNotFound):
        param = "model"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _json(body: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status, media_type="application/json")


def _sse(body: Any) -> bytes:
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


# ---------------------------------------------------------------------------- one request
@dataclass(frozen=True)
class _Piece:
    text: str
    num_tokens: int  # output tokens generated so far
    finish_reason: str | None = None  # set on the last piece


@dataclass
class _Run:
    """One request's generation on a task of its own; its pieces come through ``next()``."""

    orchestrator: Orchestrator
    request: OpenAIRequest
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_tokens: int = 0
    _queue: asyncio.Queue[_Piece | BaseException] = field(default_factory=asyncio.Queue)
    _task: asyncio.Task[None] | None = None

    def start(self) -> _Run:
        self._task = asyncio.create_task(self._produce(), name=self.request.gen.request_id)
        return self

    async def next(self) -> _Piece:
        """The next piece; raises the request's error. Never waits past the deadline."""
        deadline_at = self.started + self.request.gen.deadline_s + _DEADLINE_MARGIN_S
        try:
            async with asyncio.timeout(max(deadline_at - time.monotonic(), 0.0)):
                item = await self._queue.get()
        except TimeoutError:
            self.cancel()
            message = f"request {self.request.gen.request_id} missed its deadline"
            raise TransferTimeout(message) from None
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        """Cancel the generation (the orchestrator frees the request's blocks). Idempotent;
        synchronous, so it is safe in a ``finally`` of a cancelled task."""
        if self._task is not None:
            self._task.cancel()

    async def _produce(self) -> None:
        cutter = StopCutter(self.request.stops)
        try:
            async with contextlib.aclosing(self.orchestrator.generate(self.request.gen)) as chunks:
                async for chunk in chunks:
                    self._count(len(chunk.token_ids))
                    text = cutter.push(chunk.text)
                    if cutter.stopped is not None:  # leaving the loop cancels the request
                        self._queue.put_nowait(_Piece(text, self.num_tokens, "stop"))
                        return
                    if chunk.is_final:
                        reason = chunk.finish_reason or "stop"
                        self._queue.put_nowait(_Piece(text + cutter.flush(), self.num_tokens,
                                                      reason))  # fmt: skip
                        return
                    if text:
                        self._queue.put_nowait(_Piece(text, self.num_tokens))
        except asyncio.CancelledError:
            self._queue.put_nowait(RequestCancelled(f"request {self.request.gen.request_id} "
                                                    "was cancelled"))  # fmt: skip
            raise
        except Exception as exc:  # handed to the handler, which answers with it
            self._queue.put_nowait(exc)

    def _count(self, num_new: int) -> None:
        if num_new:
            now = time.monotonic()
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
            self.num_tokens += num_new

    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    def tpot_s(self) -> float | None:
        if self.first_token_at is None or self.last_token_at is None or self.num_tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (self.num_tokens - 1)


async def _watch_disconnect(request: Request, run: _Run) -> None:
    """Cancel ``run`` when the client disconnects (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    log.info("client_disconnected", request_id=run.request.gen.request_id)
    run.cancel()


# ---------------------------------------------------------------------------- response shapes
@dataclass(frozen=True)
class _Shape:
    """How one endpoint words its objects."""

    rpc: str
    id_prefix: str
    unary_object: str
    chunk_object: str
    is_chat: bool

    def unary_choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        if self.is_chat:
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "logprobs": None,
                    "finish_reason": finish_reason}  # fmt: skip
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        if self.is_chat:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": delta.get("content", ""), "logprobs": None,
                "finish_reason": finish_reason}  # fmt: skip


_COMPLETIONS = _Shape("openai.completions", "cmpl-", "text_completion", "text_completion", False)
_CHAT = _Shape("openai.chat", "chatcmpl-", "chat.completion", "chat.completion.chunk", True)


def _usage(num_prompt: int, num_completion: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}  # fmt: skip


# ---------------------------------------------------------------------------- the door
class _OpenAIDoor:
    """The handlers' state: the orchestrator, the chat prompt renderer, config, metrics."""

    def __init__(self, orchestrator: Orchestrator, tokenizer: Tokenizer, config: OpenAIConfig,
                 metrics: RouterMetrics | None) -> None:  # fmt: skip
        self.orchestrator = orchestrator
        self.chat = ChatPrompt(tokenizer, orchestrator)
        self.config = config
        self.metrics = metrics
        self.created = int(time.time())

    async def serve(self, request: Request, shape: _Shape,
                    parse: Callable[[bytes, ParseContext], OpenAIRequest]) -> Response:  # fmt: skip
        """Parse (in a worker thread: templates and tokenizers may be slow), then answer."""
        request_id = f"{shape.id_prefix}{uuid.uuid4().hex}"
        try:
            if not self.orchestrator.is_ready():
                raise NotReady("the server is not ready")
            body = await self._body(request)
            context = ParseContext(self.orchestrator, self.chat, request_id,
                                   self.config.request_timeout_s)  # fmt: skip
            parsed = await asyncio.to_thread(parse, body, context)
        except Exception as exc:
            return self._failed(exc, shape, request_id)
        log.debug("request_received", request_id=request_id, rpc=shape.rpc,
                  num_prompt_tokens=len(parsed.gen.prompt_token_ids))  # fmt: skip
        run = _Run(self.orchestrator, parsed).start()
        if parsed.is_stream:
            return await self._stream(request, run, shape)
        return await self._unary(request, run, shape)

    async def _body(self, request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.config.max_body_bytes:
                raise FieldError(f"the request body exceeds {self.config.max_body_bytes} bytes",
                                 None)  # fmt: skip
            chunks.append(chunk)
        return b"".join(chunks)

    async def _unary(self, request: Request, run: _Run, shape: _Shape) -> Response:
        watcher = asyncio.create_task(_watch_disconnect(request, run))
        texts: list[str] = []
        try:
            while (piece := await run.next()).finish_reason is None:
                texts.append(piece.text)
        except Exception as exc:
            return self._failed(exc, shape, run.request.gen.request_id)
        finally:
            watcher.cancel()
            run.cancel()
        texts.append(piece.text)
        self._succeeded(run, shape)
        gen = run.request.gen
        return _json({
            "id": gen.request_id, "object": shape.unary_object, "created": int(time.time()),
            "model": self.orchestrator.model_name,
            "choices": [shape.unary_choice("".join(texts), piece.finish_reason)],
            "usage": _usage(len(gen.prompt_token_ids), piece.num_tokens),
        })  # fmt: skip

    async def _stream(self, request: Request, run: _Run, shape: _Shape) -> Response:
        """Wait for the first piece (so an early error is an HTTP status), then stream."""
        watcher = asyncio.create_task(_watch_disconnect(request, run))
        try:
            first = await run.next()
        except Exception as exc:
            run.cancel()
            return self._failed(exc, shape, run.request.gen.request_id)
        finally:
            watcher.cancel()  # from here Starlette's StreamingResponse watches the client
        events = self._events(run, first, shape)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip

    async def _events(self, run: _Run, first: _Piece, shape: _Shape) -> AsyncIterator[bytes]:
        gen = run.request.gen
        head = {"id": gen.request_id, "object": shape.chunk_object, "created": int(time.time()),
                "model": self.orchestrator.model_name}  # fmt: skip
        if run.request.include_usage:
            head["usage"] = None
        try:
            if shape.is_chat:
                opening = shape.chunk_choice({"role": "assistant", "content": ""}, None)
                yield _sse({**head, "choices": [opening]})
            piece = first
            while True:
                delta = {"content": piece.text} if piece.text else {}
                if delta or piece.finish_reason is not None:
                    yield _sse(
                        {**head, "choices": [shape.chunk_choice(delta, piece.finish_reason)]}
                    )
                if piece.finish_reason is not None:
                    break
                piece = await run.next()
            if run.request.include_usage:
                usage = _usage(len(gen.prompt_token_ids), piece.num_tokens)
                yield _sse({**head, "choices": [], "usage": usage})
            self._succeeded(run, shape)
        except asyncio.CancelledError:  # the client left (Starlette cancels the stream)
            self._record_failure(RequestCancelled("client left"), shape, gen.request_id, 499)
            raise
        except Exception as exc:  # the status line has gone: the error is an event
            status, kind, code = http_error_for(exc)
            self._record_failure(exc, shape, gen.request_id, status)
            yield _sse(_error_body(exc, status, kind, code))
        finally:
            run.cancel()
        yield _SSE_DONE

    # ------------------------------------------------------------------------ bookkeeping
    def _failed(self, exc: Exception, shape: _Shape, request_id: str) -> Response:
        status, kind, code = http_error_for(exc)
        self._record_failure(exc, shape, request_id, status)
        return _json(_error_body(exc, status, kind, code), status)

    def _record_failure(self, exc: Exception, shape: _Shape, request_id: str, status: int) -> None:
        if isinstance(exc, RequestCancelled):
            log.info("request_cancelled", request_id=request_id, rpc=shape.rpc)
        elif isinstance(exc, PrfaasError):
            log.info("request_failed", request_id=request_id, rpc=shape.rpc, status=status,
                     error=str(exc))  # fmt: skip
        else:
            log.exception("request_crashed", request_id=request_id, rpc=shape.rpc, exc_info=exc)
        if self.metrics is not None:
            name = "CANCELLED" if isinstance(exc, RequestCancelled) else str(status)
            self.metrics.record_frontdoor(self.orchestrator.model_name, shape.rpc, name)

    def _succeeded(self, run: _Run, shape: _Shape) -> None:
        if self.metrics is None:
            return
        model = self.orchestrator.model_name
        self.metrics.record_frontdoor(model, shape.rpc, "OK")
        self.metrics.observe_latency(model, run.ttft_s(), run.tpot_s())

    def models(self) -> dict[str, Any]:
        card = {"id": self.orchestrator.model_name, "object": "model", "created": self.created,
                "owned_by": self.config.owned_by}  # fmt: skip
        return {"object": "list", "data": [card]}


def build_openai_app(
    orchestrator: Orchestrator,
    tokenizer: Tokenizer | None = None,
    config: OpenAIConfig | None = None,
    metrics: RouterMetrics | None = None,
) -> FastAPI:
    """The OpenAI door as an ASGI app for ``HttpDoor`` (see the module docstring).

    ``tokenizer``: the served model's, whose chat template renders chat prompts; by default the
    orchestrator's own (``Orchestrator.tokenizer``), given only to test a template apart from
    the orchestrator. Raises ConfigError when that template does not parse."""
    tokenizer = orchestrator.tokenizer if tokenizer is None else tokenizer
    door = _OpenAIDoor(orchestrator, tokenizer, config or OpenAIConfig(), metrics)
    app = FastAPI(title="trtllm-prfaas OpenAI-compatible API", docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await door.serve(request, _COMPLETIONS, parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await door.serve(request, _CHAT, parse_chat)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return _json(door.models())

    @app.get("/v1/models/{model}")
    async def retrieve_model(model: str) -> Response:
        if model != orchestrator.model_name:
            missing = ModelNotFound(f"The model `{model}` does not exist")
            return _json(_error_body(missing, *http_error_for(missing)), 404)
        return _json(door.models()["data"][0])

    @app.get("/health")
    async def health() -> Response:
        if orchestrator.is_ready():
            return Response(status_code=200)
        not_ready = NotReady("the server is not ready")
        return _json(_error_body(not_ready, *http_error_for(not_ready)), 503)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        error = {"message": str(exc.detail), "type": kind, "param": None, "code": None}
        return _json({"error": error}, exc.status_code)

    return app

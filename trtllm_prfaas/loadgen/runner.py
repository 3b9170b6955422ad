"""The bench run: probe the server, draw the workload, send it, scrape the router, report.

Arrivals are open-loop Poisson at ``rate_rps`` (exponential gaps from their own seeded stream;
the first request goes at once) or closed-loop with ``concurrency`` requests always in flight.
Sending stops after ``num_requests`` or ``duration_s`` seconds, whichever comes first; requests
in flight then finish within their own deadline (``request_timeout_s``). The whole run has a
deadline too (``run_timeout_s``; by default ``duration_s + request_timeout_s + 5`` when a
duration is set, else 3600 s): what is still in flight then is cancelled and counted
``CANCELLED``, what was never sent is counted ``num_not_sent``. So
``num_requests == num_ok + num_failed + num_not_sent`` always holds, and nothing hangs.
"""

from __future__ import annotations

import asyncio
import enum
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from trtllm_prfaas.engines.tokenizer import Tokenizer, load_tokenizer
from trtllm_prfaas.errors import ConfigError, PrfaasError
from trtllm_prfaas.loadgen.client import RequestSpec, ServerInfo, probe, send_one
from trtllm_prfaas.loadgen.lengths import LengthSampler
from trtllm_prfaas.loadgen.progress import ProgressBar
from trtllm_prfaas.loadgen.prompts import prompt_ids, prompt_text
from trtllm_prfaas.loadgen.report import BenchReport
from trtllm_prfaas.loadgen.scrape import MetricsSnapshot, MetricsUnavailable, router_delta, scrape
from trtllm_prfaas.loadgen.stats import RequestRecord, summarize

__all__ = [
    "DEFAULT_MAX_PROMPT_TOKENS",
    "BenchConfig",
    "BenchError",
    "PromptKind",
    "poisson_gaps",
    "run_bench",
]

DEFAULT_MAX_PROMPT_TOKENS = 8192  # when neither the flag nor the server says


class BenchError(PrfaasError):
    """The bench could not run: the server is unreachable or does not serve the model."""


class PromptKind(enum.Enum):
    TEXT = "text"  # text_input: what every llmapi-style server accepts
    IDS = "ids"  # input_ids: exact token counts, needs a server that accepts them


@dataclass(frozen=True)
class BenchConfig:
    """One run. Exactly one of ``rate_rps`` and ``concurrency`` is set."""

    url: str
    model: str = "tensorrt_llm"
    num_requests: int = 100
    rate_rps: float | None = None
    concurrency: int | None = 1
    max_tokens: int = 32
    max_prompt_tokens: int | None = None  # None: from the server, else the default
    temperature: float = 0.0
    prompt_kind: PromptKind = PromptKind.TEXT
    seed: int = 0
    duration_s: float | None = None
    request_timeout_s: float = 60.0
    run_timeout_s: float | None = None
    probe_timeout_s: float = 10.0
    metrics_url: str | None = None
    tokenizer_dir: str = ""  # the served model's HF directory: prompts sized in its tokens

    def __post_init__(self) -> None:
        if (self.rate_rps is None) == (self.concurrency is None):
            raise ConfigError("give exactly one of rate_rps and concurrency")
        positive = {"num_requests": self.num_requests, "max_tokens": self.max_tokens,
                    "rate_rps": self.rate_rps, "concurrency": self.concurrency,
                    "duration_s": self.duration_s, "request_timeout_s": self.request_timeout_s,
                    "run_timeout_s": self.run_timeout_s,
                    "max_prompt_tokens": self.max_prompt_tokens}  # fmt: skip
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")

    @property
    def effective_run_timeout_s(self) -> float:
        if self.run_timeout_s is not None:
            return self.run_timeout_s
        if self.duration_s is not None:
            return self.duration_s + self.request_timeout_s + 5.0
        return 3600.0


def poisson_gaps(rate_rps: float, seed: int, num: int) -> list[float]:
    """``num`` exponential inter-arrival gaps (seconds, mean ``1 / rate_rps``), seeded."""
    rng = random.Random(f"arrivals:{seed}")
    return [rng.expovariate(rate_rps) for _ in range(num)]


async def run_bench(config: BenchConfig, progress_stream: TextIO | None = None) -> BenchReport:
    """Run ``config`` against the server; ``progress_stream`` (e.g. stderr) gets the bar.

    Raises BenchError when the server cannot be probed or cannot take the prompt kind."""
    client = grpcclient_aio.InferenceServerClient(config.url)
    try:
        info = await _probe(client, config)
        max_prompt, source = _max_prompt_tokens(config, info)
        lengths = LengthSampler(max_prompt, config.seed).sample(config.num_requests)
        tokenizer = load_tokenizer(config.tokenizer_dir) if config.tokenizer_dir else None
        specs = [_spec(config, i, n, tokenizer) for i, n in enumerate(lengths)]
        before = _scrape(config.metrics_url)
        bar = ProgressBar(len(specs), progress_stream or sys.stderr, progress_stream is not None)
        records = await _send_all(client, config, info, specs, bar)
        bar.finish()
        after = _scrape(config.metrics_url)
    finally:
        await client.close()
    router, metrics_error = None, None
    if isinstance(before, MetricsSnapshot) and isinstance(after, MetricsSnapshot):
        router = router_delta(before, after)
    else:
        metrics_error = next((x for x in (before, after) if isinstance(x, str)), None)
    return BenchReport(config.url, config.model, _mode(config), config.num_requests, max_prompt,
                       source, summarize(records), router, metrics_error)  # fmt: skip


async def _probe(client: Any, config: BenchConfig) -> ServerInfo:
    try:
        info = await probe(client, config.model, config.max_tokens, config.probe_timeout_s)
    except InferenceServerException as exc:
        raise BenchError(f"cannot probe model '{config.model}' at {config.url}: "
                         f"{exc.message()}") from exc  # fmt: skip
    if config.prompt_kind is PromptKind.IDS and not info.has_input_ids:
        raise BenchError(f"model '{config.model}' does not accept input_ids; use text prompts")
    return info


def _max_prompt_tokens(config: BenchConfig, info: ServerInfo) -> tuple[int, str]:
    if config.max_prompt_tokens is not None:
        return config.max_prompt_tokens, "flag"
    if info.max_prompt_tokens is not None and info.max_prompt_tokens > 0:
        return info.max_prompt_tokens, "server"
    return DEFAULT_MAX_PROMPT_TOKENS, "default"


def _spec(
    config: BenchConfig, index: int, num_tokens: int, tokenizer: Tokenizer | None = None
) -> RequestSpec:
    prompt: str | list[int]
    if config.prompt_kind is PromptKind.IDS:
        prompt = prompt_ids(num_tokens, index, config.seed, tokenizer)
    else:
        prompt = prompt_text(num_tokens, index, config.seed, tokenizer)
    return RequestSpec(index, num_tokens, prompt, config.max_tokens, config.temperature,
                       config.seed + index)  # fmt: skip


def _scrape(url: str | None) -> MetricsSnapshot | str | None:
    """A snapshot, the reason there is none (a string), or None when no URL was given."""
    if url is None:
        return None
    try:
        return scrape(url, time.monotonic())
    except MetricsUnavailable as exc:
        return str(exc)


def _mode(config: BenchConfig) -> dict[str, Any]:
    return {"arrivals": "poisson" if config.rate_rps is not None else "concurrency",
            "rate_rps": config.rate_rps, "concurrency": config.concurrency,
            "max_tokens": config.max_tokens, "prompt_kind": config.prompt_kind.value,
            "seed": config.seed}  # fmt: skip


async def _send_all(
    client: Any, config: BenchConfig, info: ServerInfo, specs: list[RequestSpec], bar: ProgressBar
) -> list[RequestRecord]:
    """Send ``specs`` by the configured arrivals within the run's deadline; every sent request
    has a record when this returns."""
    records: list[RequestRecord] = []

    def sink(record: RequestRecord) -> None:
        records.append(record)
        bar.finished(record.is_ok)

    async def send(spec: RequestSpec) -> None:
        bar.sent()
        await send_one(client, config.model, spec, info, config.request_timeout_s, sink)

    stop_at = time.monotonic() + (config.duration_s or float("inf"))
    try:
        async with asyncio.timeout(config.effective_run_timeout_s), asyncio.TaskGroup() as group:
            if config.rate_rps is not None:
                await _open_loop(group, send, specs, poisson_gaps(config.rate_rps, config.seed,
                                                                  len(specs)), stop_at)  # fmt: skip
            else:
                shared = iter(specs)
                for _ in range(config.concurrency or 1):
                    group.create_task(_closed_loop(send, shared, stop_at))
    except TimeoutError:
        pass  # in-flight requests were cancelled and recorded as CANCELLED
    return sorted(records, key=lambda r: r.index)


async def _open_loop(
    group: asyncio.TaskGroup,
    send: Callable[[RequestSpec], Any],
    specs: list[RequestSpec],
    gaps: list[float],
    stop_at: float,
) -> None:
    """Start each request at its Poisson arrival time (the first at once), until ``stop_at``."""
    arrive_at = time.monotonic()
    for spec, gap in zip(specs, gaps, strict=True):
        if arrive_at >= stop_at:
            return
        await asyncio.sleep(max(arrive_at - time.monotonic(), 0.0))
        group.create_task(send(spec))
        arrive_at += gap


async def _closed_loop(send: Callable[[RequestSpec], Any], specs: Any, stop_at: float) -> None:
    """One of ``concurrency`` workers: send the next spec when the previous one finished."""
    for spec in specs:  # a shared iterator: each spec goes to exactly one worker
        if time.monotonic() >= stop_at:
            return
        await send(spec)

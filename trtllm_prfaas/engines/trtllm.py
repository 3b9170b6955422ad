"""The engine adapter over TensorRT-LLM's LLM API (PyTorch backend), with the PrfaaS connector.

``TrtllmEngine`` gives a worker the same surface as ``ReferenceEngine`` (see ``engines/base.py``)
over ``tensorrt_llm.LLM``: ``add_request`` starts ``LLM.generate_async(..., streaming=True)`` on the
adapter's event-loop thread, a task per request consumes the streamed results, and ``step()``
returns the new tokens as ``RequestOutput``s. TensorRT-LLM itself schedules, batches, owns the KV
pool and hosts the connector (``kv_connector_config``) in every worker process it spawns.

``tensorrt_llm`` is imported only when an engine is built; without it ``DependencyMissing`` says
so. ``llm_kwargs(config)`` is the exact ``LLM(...)`` argument set (pure, testable on CPU).

PrfaaS plans. On TensorRT-LLM 1.2 no request-level field reaches the connector for a context
request: ``DisaggregatedParams.opaque_state`` is forwarded only for generation-only requests
(``tensorrt_llm/executor/base_worker.py`` ``BaseWorker._enqueue_request``, stored copy
1131391427; ``../shared/TRTLLM_AUDIT.md`` 3a), so the former ``opaque_state`` carrier never
reached it and is gone. Instead the plan travels beside the request (``docs/design/
trtllm_path.md`` section 3): ``add_request(..., plan=)`` posts it to the connector's plan server
(rank 0 of the ranks TensorRT-LLM spawned, ``plan_endpoints``) and waits for the acknowledgement
before ``generate_async``; the connector's scheduler takes it by the digest of the prompt token
ids, which ``generate_async`` passes to the executor unchanged. ``transfer_status`` asks every
rank. The connector inside the spawned workers is configured by the ``TRTLLM_PRFAAS_*`` variables
(``deploy/env.py``: ``TRTLLM_PRFAAS_PLAN_BIND`` and its key files), which must be in this
process's environment before the engine is built (only ``TRTLLM``/``TLLM`` variables reach them).

Unverified without a GPU: that ``GenerationResult`` streams cumulative ``outputs[0].token_ids``
under ``async for``; the ``finish_reason`` strings; ``GenerationResult.abort()`` freeing the
request's blocks.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from trtllm_prfaas.connector.plans import Plan
from trtllm_prfaas.engines.base import LoopBridge, RemoteFlights
from trtllm_prfaas.engines.remote_plans import RemotePlans
from trtllm_prfaas.engines.request import RequestOutput, SamplingParams
from trtllm_prfaas.errors import (
    ConfigError,
    DeadlineExceeded,
    DependencyMissing,
    EngineError,
    InvalidRequestError,
    PrfaasError,
)
from trtllm_prfaas.transport import InboundStatus
from trtllm_prfaas.transport.config import RelaySecurity

__all__ = [
    "CONNECTOR_MODULE",
    "CONNECTOR_SCHEDULER_CLASS",
    "CONNECTOR_WORKER_CLASS",
    "TrtllmEngine",
    "TrtllmEngineConfig",
    "import_tensorrt_llm",
    "llm_kwargs",
]

CONNECTOR_MODULE = "trtllm_prfaas.connector.prfaas"
CONNECTOR_SCHEDULER_CLASS = "PrfaasConnectorScheduler"
CONNECTOR_WORKER_CLASS = "PrfaasConnectorWorker"
_PIP_HINT = "tensorrt-llm  (GPU machines only; see docs/deployment.md)"
_FINISH_REASONS = {"length": "length", "stop": "stop", "cancelled": "aborted"}  # "timeout": error


# --------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class TrtllmEngineConfig:
    """What ``LLM(...)`` is built from; defaults follow the decode preset (engines/h20_decode)."""

    model: str  # Hugging Face checkpoint directory or hub id
    tokens_per_block: int = 32
    tensor_parallel_size: int = 1
    max_batch_size: int = 20
    max_num_tokens: int = 8192
    max_seq_len: int | None = None
    enable_chunked_prefill: bool = True
    free_gpu_memory_fraction: float = 0.9
    trust_remote_code: bool = False
    num_blocks_hint: int = 0  # for load reports only: TensorRT-LLM sizes the real pool itself
    max_in_flight: int = 1024  # requests handed to TensorRT-LLM and not finished
    start_timeout_s: float = 30.0  # generate_async must accept a request within this
    poll_interval_s: float = 0.01  # step() waits at most this long for an output
    extra_llm_args: Mapping[str, Any] = field(default_factory=dict)  # more LLM-API fields
    # The connector ranks' plan servers (TRTLLM_PRFAAS_PLAN_BIND, port + rank), in rank order.
    plan_endpoints: tuple[str, ...] = ()
    plan_security: RelaySecurity | None = field(default=None, repr=False)
    plan_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("TrtllmEngineConfig.model must name a checkpoint")
        for name in ("tokens_per_block", "tensor_parallel_size", "max_batch_size",
                     "max_num_tokens", "max_in_flight"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrtllmEngineConfig.{name} must be > 0")
        if self.plan_endpoints and self.plan_security is None:
            raise ConfigError("TrtllmEngineConfig.plan_endpoints need plan_security")
        if not 0 < self.free_gpu_memory_fraction <= 1:
            raise ConfigError("TrtllmEngineConfig.free_gpu_memory_fraction must be in (0, 1]")
        clash = set(self.extra_llm_args) & _OWNED_ARGS
        if clash:
            raise ConfigError(f"extra_llm_args may not override {sorted(clash)}")


_OWNED_ARGS = frozenset(
    {"model", "backend", "kv_cache_config", "kv_connector_config", "cuda_graph_config",
     "pipeline_parallel_size", "max_beam_width"}
)  # fmt: skip


def import_tensorrt_llm() -> SimpleNamespace:
    """``LLM``, ``KvCacheConfig``, ``KvCacheConnectorConfig`` and ``SamplingParams``, imported
    now; ``DependencyMissing`` when TensorRT-LLM is absent."""
    try:
        root = importlib.import_module("tensorrt_llm")
        llmapi = importlib.import_module("tensorrt_llm.llmapi")
        llm_args = importlib.import_module("tensorrt_llm.llmapi.llm_args")
    except ImportError as exc:
        raise DependencyMissing("tensorrt_llm", _PIP_HINT) from exc
    return SimpleNamespace(
        LLM=root.LLM,
        KvCacheConfig=llmapi.KvCacheConfig,
        KvCacheConnectorConfig=llm_args.KvCacheConnectorConfig,
        SamplingParams=llmapi.SamplingParams,
    )


def llm_kwargs(config: TrtllmEngineConfig, trt: SimpleNamespace) -> dict[str, Any]:
    """The keyword arguments of ``LLM(...)``: PyTorch backend, the PrfaaS connector, block reuse
    on, CUDA graphs off, no pipeline parallelism, beam width 1 (the connector API's limits)."""
    kwargs: dict[str, Any] = dict(
        model=config.model,
        backend="pytorch",
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=1,
        max_batch_size=config.max_batch_size,
        max_num_tokens=config.max_num_tokens,
        max_beam_width=1,
        enable_chunked_prefill=config.enable_chunked_prefill,
        trust_remote_code=config.trust_remote_code,
        cuda_graph_config=None,
        kv_cache_config=trt.KvCacheConfig(
            enable_block_reuse=True,
            tokens_per_block=config.tokens_per_block,
            free_gpu_memory_fraction=config.free_gpu_memory_fraction,
        ),
        kv_connector_config=trt.KvCacheConnectorConfig(
            connector_module=CONNECTOR_MODULE,
            connector_scheduler_class=CONNECTOR_SCHEDULER_CLASS,
            connector_worker_class=CONNECTOR_WORKER_CLASS,
        ),
    )
    if config.max_seq_len is not None:
        kwargs["max_seq_len"] = config.max_seq_len
    kwargs.update(config.extra_llm_args)
    return kwargs


# --------------------------------------------------------------------------------- engine
@dataclass
class _Flight:
    request_id: int
    num_blocks: int  # worst case, for the load report's estimate
    result: Any = None  # tensorrt_llm GenerationResult
    task: asyncio.Task[None] | None = None
    num_seen: int = 0  # tokens already reported


class TrtllmEngine(RemoteFlights):
    """``LLM.generate_async`` behind the worker's engine surface; a context manager.

    Threads: the caller's (add_request, step, abort, close) and the adapter's event loop, which
    alone touches ``GenerationResult`` objects. ``close()`` aborts what is in flight, stops the
    loop and shuts the LLM down.
    """

    def __init__(self, config: TrtllmEngineConfig) -> None:
        self.config = config
        self._control_timeout_s = config.start_timeout_s
        self.connector = None  # the connector lives in TensorRT-LLM's worker processes
        self._trt = import_tensorrt_llm()
        self.plans = RemotePlans(config.plan_endpoints, config.plan_security, config.plan_timeout_s)
        try:
            self.llm = self._trt.LLM(**llm_kwargs(config, self._trt))
        except BaseException:
            self.plans.close()
            raise
        self._bridge = LoopBridge("trtllm-results")
        self._flights: dict[int, _Flight] = {}
        self._ids = itertools.count(1)

    # ---------------------------------------------------------------- the worker's surface
    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        request_id: int | None = None,
        plan: Plan | None = None,
    ) -> int:
        """Post the plan (if any; acknowledged first), then hand the request to TensorRT-LLM;
        raises at once when it is refused."""
        rid, num_blocks = self._admit(prompt_token_ids, sampling, request_id)
        if plan is not None:  # generate_async runs exactly these ids: they are the claim
            self.plans.submit(plan, prompt_token_ids, rid)
        flight = _Flight(rid, num_blocks)
        start = self._start(flight, list(prompt_token_ids), sampling)
        try:
            self._bridge.call(start, self.config.start_timeout_s)
        except PrfaasError:
            raise
        except (ValueError, TypeError) as exc:  # TensorRT-LLM's input validation
            raise InvalidRequestError(f"TensorRT-LLM refused request {rid}: {exc}") from exc
        except Exception as exc:
            raise EngineError(f"TensorRT-LLM failed to start request {rid}: {exc!r}") from exc
        self._flights[rid] = flight
        return rid

    def transfer_status(self, transfer_uuid: str, num_tokens: int) -> InboundStatus | None:
        """The transfer of ``num_tokens`` claimed tokens over every connector rank (None:
        unknown everywhere, or the ranks cannot be asked)."""
        return self.plans.transfer_status(transfer_uuid, num_tokens)

    def load_outcome(self, transfer_uuid: str, num_tokens: int) -> str:
        """``loaded``, ``load_failed`` or ``unclaimed``: what the connector ranks did with a
        decode's transfer (``RemotePlans.load_outcome``), asked at its first token."""
        return self.plans.load_outcome(transfer_uuid, num_tokens)

    def close(self) -> None:
        """Abort what is in flight, stop the loop thread, shut TensorRT-LLM down, close the plan
        client. Idempotent."""
        for request_id in list(self._flights):
            self.abort(request_id)
        self._bridge.close()
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.plans.close()

    def __enter__(self) -> TrtllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- on the loop thread
    async def _start(
        self,
        flight: _Flight,
        prompt: list[int],
        sampling: SamplingParams,
    ) -> None:
        trt = self._trt
        options: dict[str, Any] = dict(
            max_tokens=sampling.max_tokens, ignore_eos=sampling.ignore_eos
        )
        if sampling.temperature > 0:  # TensorRT-LLM samples greedily when none is given
            options.update(temperature=sampling.temperature, seed=sampling.seed)
        flight.result = self.llm.generate_async(
            prompt, sampling_params=trt.SamplingParams(**options), streaming=True
        )
        flight.task = asyncio.get_running_loop().create_task(self._consume(flight))

    async def _consume(self, flight: _Flight) -> None:
        rid = flight.request_id
        try:
            async for result in flight.result:
                completion = result.outputs[0]
                token_ids = list(completion.token_ids)  # cumulative in streaming mode
                new, flight.num_seen = token_ids[flight.num_seen :], len(token_ids)
                if result.finished:
                    self._bridge.put(self._final(rid, new, str(completion.finish_reason)))
                    return
                if new:
                    self._bridge.put(RequestOutput(rid, new))
            error = EngineError(
                f"request {rid}: TensorRT-LLM's stream ended without a final output"
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never silent: the request ends with the cause
            error = EngineError(f"request {rid} failed in TensorRT-LLM: {exc!r}")
        self._bridge.put(RequestOutput(rid, [], True, "error", error))

    @staticmethod
    def _final(rid: int, new: list[int], reason: str) -> RequestOutput:
        """The finishing output; "timeout" and unknown reasons end the request as an error."""
        if reason == "timeout":
            error: PrfaasError = DeadlineExceeded(f"request {rid}: TensorRT-LLM timed it out")
            return RequestOutput(rid, new, True, "error", error)
        if reason not in _FINISH_REASONS:
            error = EngineError(f"request {rid}: unknown finish_reason {reason!r}")
            return RequestOutput(rid, new, True, "error", error)
        return RequestOutput(rid, new, True, _FINISH_REASONS[reason])

    async def _abort_remote(self, flight: _Flight) -> None:
        """Abort in TensorRT-LLM (which frees its blocks, or keeps them pinned for a save)."""
        if flight.result is not None:
            flight.result.abort()
        if flight.task is not None:
            flight.task.cancel()

"""``FakeExecutor``: one deployment (one ``LLM``), its construction, client side and loop.

Construction (``py_executor_creator.py`` 1083207948 ``create_py_executor``): the connector module
is imported by name from ``kv_connector_config``; on every tensor-parallel rank a worker half is
built with ``(llm_args)`` only, and on rank 0 the scheduler half too, both at once on a two-thread
pool. Then (``py_executor.py`` 736889464 ``_maybe_init_kv_connector_manager``) each rank's worker
gets ``register_kv_caches(get_unique_primary_pool())``: its own pool holding its head shard. The
fake ``mpi_rank()`` and the environment set while the halves are built: ``ranks``.

One iteration (``py_executor.py`` 736889464 ``_executor_loop`` / ``_executor_loop_overlap``):
  schedule: active requests that are not parked or saving, up to ``max_batch_size``; context
      requests take a chunk of up to ``chunk_size`` tokens whose end is block-aligned unless it
      is the prompt's end (TensorRT-LLM's plain chunking; no "last token alone" rule).
  ``prepare_resources``, ``_kv_connector_start_batch``: ``connector_manager``.
  ``_forward_step``: ``forward``.
  sampling and responses (``forward``): with the overlap scheduler (the default of
      ``TorchLlmArgs``; the project's ``model.yaml`` leaves it on) a batch's tokens reach the host
      one iteration later, so a finished request is found (``_handle_responses``) and terminated
      after the next forward, in which it ran once more.
  ``_kv_connector_terminate_requests``: ``connector_manager``.
"""

from __future__ import annotations

import copy
import importlib
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from tests.connector.fake_device import CpuDevice, Device
from tests.connector.trtllm_fake.blocks import BlockManager
from tests.connector.trtllm_fake.forward import ForwardSteps
from tests.connector.trtllm_fake.model import FakeModel
from tests.connector.trtllm_fake.ranks import (
    Rank,
    build_in_rank,
    environment,
    install_fake_tensorrt_llm,
    uninstall_fake_tensorrt_llm,
)
from tests.connector.trtllm_fake.requests import FakeLlmRequest, Result, State


@dataclass(frozen=True)
class ConnectorSpec:
    """``kv_connector_config``: where the executor finds the two halves."""

    module: str
    scheduler_class: str
    worker_class: str


PRFAAS_CONNECTOR = ConnectorSpec(
    "trtllm_prfaas.connector.prfaas", "PrfaasConnectorScheduler", "PrfaasConnectorWorker"
)


def _llm_args(
    model: FakeModel, tp_size: int, spec: ConnectorSpec, overlap: bool, partial_reuse: bool
) -> Any:
    """What ``TorchLlmArgs`` carries that a connector may read (no ``connector_options``)."""
    return SimpleNamespace(
        model=model.name,
        backend="pytorch",
        tensor_parallel_size=tp_size,
        pipeline_parallel_size=1,
        max_beam_width=1,
        enable_chunked_prefill=True,
        disable_overlap_scheduler=not overlap,
        cuda_graph_config=None,
        kv_cache_config=SimpleNamespace(
            tokens_per_block=model.tokens_per_block,
            dtype="auto",
            enable_block_reuse=True,
            enable_partial_reuse=partial_reuse,
            copy_on_partial_reuse=True,
        ),
        scheduler_config=SimpleNamespace(capacity_scheduler_policy="GUARANTEED_NO_EVICT"),
        kv_connector_config=SimpleNamespace(
            connector_module=spec.module,
            connector_scheduler_class=spec.scheduler_class,
            connector_worker_class=spec.worker_class,
        ),
    )


class FakeExecutor(ForwardSteps):
    """One deployment (one ``LLM``): ``tp_size`` ranks driven in lockstep, one KV block layout.

    A context manager; ``close()`` removes the fake ``tensorrt_llm`` modules once the last
    executor closes. The connector's own process-wide state is the test's to close."""

    def __init__(
        self,
        model: FakeModel | None = None,
        *,
        tp_size: int = 1,
        chunk_size: int = 32,
        env: Mapping[str, str] | None = None,
        device: Device | None = None,
        connector: ConnectorSpec = PRFAAS_CONNECTOR,
        overlap_scheduler: bool = True,
        partial_reuse: bool = True,
        max_batch_size: int = 8,
    ) -> None:
        self.model = model = model or FakeModel()
        if model.num_kv_heads % tp_size or chunk_size % model.tokens_per_block:
            raise ValueError("heads must split evenly over ranks; chunk_size must be whole blocks")
        self.tp_size, self.chunk_size, self.overlap = tp_size, chunk_size, overlap_scheduler
        self.max_batch_size, self.device = max_batch_size, device or CpuDevice()
        self.llm_args = _llm_args(model, tp_size, connector, overlap_scheduler, partial_reuse)
        self.blocks = BlockManager(
            model.num_blocks, model.tokens_per_block, partial_reuse, self._copy_tokens
        )
        self._init_state()
        install_fake_tensorrt_llm(tp_size)
        self._closed = False
        try:
            with environment(env or {}):
                self.scheduler, workers = self._build_halves(connector)
            self.ranks = [self._start_rank(rank, worker) for rank, worker in enumerate(workers)]
        except BaseException:
            self.close()
            raise

    def _build_halves(self, spec: ConnectorSpec) -> tuple[Any, list[Any]]:
        module = importlib.import_module(spec.module)
        worker_cls, scheduler_cls = (
            getattr(module, spec.worker_class),
            getattr(module, spec.scheduler_class),
        )
        workers, scheduler = [], None
        for rank in range(self.tp_size):
            with ThreadPoolExecutor(max_workers=2) as pool:
                args = copy.deepcopy(self.llm_args)
                worker = pool.submit(build_in_rank, rank, worker_cls, args)
                if rank == 0:
                    scheduler = pool.submit(build_in_rank, 0, scheduler_cls, args).result()
                workers.append(worker.result())
        return scheduler, workers

    def _start_rank(self, rank: int, worker: Any) -> Rank:
        pool = self.device.make_pool(self.model.pool_shape(self.tp_size), self.model.dtype)
        state = Rank(rank, worker, pool, self.device.make_stream())
        self._call(state, "register_kv_caches", pool)
        return state

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            uninstall_fake_tensorrt_llm()

    def __enter__(self) -> FakeExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- client side
    def add_request(
        self, prompt: list[int], max_tokens: int, *, generation_only: bool = False
    ) -> int:
        """Enqueue ``prompt`` for ``max_tokens`` new tokens (``LLM.generate_async``)."""
        rid = next(self._ids)
        req = FakeLlmRequest(rid, prompt, max_tokens, generation_only)
        self.requests[rid], self.results[rid] = req, Result()
        self.waiting.append(req)
        return rid

    def has_work(self) -> bool:
        return bool(self.waiting or self.active or self.blocks.pinned or self._previous)

    def parked(self) -> list[int]:
        return [r.request_id for r in self.active if r.state is State.LOADING]

    def leak_report(self) -> list[str]:
        problems = [f"request {r.request_id} still {r.state.value}" for r in self.active]
        problems += [f"request {r.request_id} still waiting" for r in self.waiting]
        problems += [f"blocks pinned for request {rid}" for rid in self.blocks.pinned]
        problems += [f"block {b} still referenced" for b, n in enumerate(self.blocks.refs) if n]
        for r in self.ranks:
            for name, group in (("new", r.new), ("pending", r.pending), ("done", r.local_done)):
                if group.saving or group.loading:
                    problems.append(f"rank {r.rank} {name} async: {group}")
        return problems

    # --------------------------------------------------------------------------- iteration
    def step(self) -> None:
        """One pass of the executor loop on every rank. Raises (and stays dead) where the
        upstream loop would die."""
        if self.dead is not None:
            raise RuntimeError("the executor loop died earlier") from self.dead
        marks = [len(r.log) for r in self.ranks]
        try:
            self._iteration()
        except BaseException as exc:
            self.dead = exc
            raise
        finally:
            self.iterations.append([r.log[m:] for r, m in zip(self.ranks, marks, strict=True)])

    def _iteration(self) -> None:
        batch = self._schedule()
        if batch:
            self._prepare_resources(batch)
            batch = self._start_batch(batch)
        if batch and self._forward(batch):
            if self.overlap:
                if self._previous is not None:
                    self._apply_samples(self._previous)
                samples = self._sample(batch)
                self._update_states(batch)
                if self._previous is not None:
                    self._process(self._previous_batch)
                self._previous, self._previous_batch = samples, batch
            else:
                samples = self._sample(batch)
                self._update_states(batch)
                self._apply_samples(samples)
                self._process(batch)
        elif self._previous is not None and not self.active:
            self._previous, self._previous_batch = None, []
        self._get_finished()

    # ---- scheduling (GUARANTEED_NO_EVICT capacity, plain chunking) ----
    def _blocks_to_completion(self, req: FakeLlmRequest) -> int:
        total = -(-(req.prompt_len + req.max_new_tokens) // self.model.tokens_per_block)
        return total - len(self.blocks.blocks.get(req.request_id, []))

    def _schedule(self) -> list[FakeLlmRequest]:
        while self.waiting and len(self.active) < self.max_batch_size:
            reserved = sum(self._blocks_to_completion(r) for r in self.active)
            if self.blocks.num_free() - reserved < self._blocks_to_completion(self.waiting[0]):
                break
            self.active.append(self.waiting.pop(0))
        runnable = (State.CONTEXT_INIT, State.GENERATION_IN_PROGRESS)
        batch = [r for r in self.active if r.state in runnable][: self.max_batch_size]
        for req in batch:
            if req.state is State.CONTEXT_INIT:
                req.context_chunk_size = self._chunk(req.context_current_position, req.prompt_len)
        return batch

    def _chunk(self, begin: int, length: int) -> int:
        """Tokens of the next context chunk: up to ``chunk_size``, ending on a block boundary
        unless it ends the prompt."""
        end = min(begin + self.chunk_size, length)
        if end < length:
            end = max(end // self.model.tokens_per_block * self.model.tokens_per_block, begin + 1)
        return end - begin


def drive(
    *executors: FakeExecutor,
    until: Callable[[], bool],
    timeout_s: float = 20.0,
    what: str = "condition",
) -> None:
    """Step every executor in turn until ``until()`` holds; AssertionError past the deadline."""
    deadline = time.monotonic() + timeout_s
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s} s")
        for executor in executors:
            executor.step()
        time.sleep(0.001)

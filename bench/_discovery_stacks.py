"""The settings of ``bench/discovery.py``, the KServe v2 requests it sends, and its two stacks
(static and plaintext; discovered, two replicas, Curve) started through ``_discovery_procs``."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from _discovery_procs import Router, Scraper, State, Testbed

from trtllm_prfaas.config import TestbedKeys
from trtllm_prfaas.discovery import EventKind, MemberEvent
from trtllm_prfaas.testbed.processes import WorkerProcess

MODEL = "tensorrt_llm"
NAMESPACE = "bench-discovery"
CLUSTER = "dc-local"
DECODE_ID, PREFILL_ID = "bench-decode", "bench-prefill"
THRESHOLD_TOKENS = 100  # the bench's prompts stay below: the local route
# One torch thread per worker: steadier latencies on a shared machine.
WORKER_FLAGS = ["--model-preset", "tiny", "--num-blocks", "512", "--chunk-size", "64",
                "--num-threads", "1"]  # fmt: skip


@dataclass(frozen=True)
class Settings:
    lease_ttl_s: int = 2  # the workers' registrations (the minimum etcd allows, see the worker)
    worker_lost_s: float = 3.0  # the routers' (the CLI's default)
    num_worker_kills: int = 3  # SIGKILL + restart of the decode worker
    num_freezes: int = 1  # SIGSTOP of the decode worker (then SIGKILL + restart)
    num_failovers: int = 3  # SIGKILL of the leading replica
    # per stack, alternating request by request; a p99 over 300 swung 0.82-1.16 between runs
    # here (its 3rd worst request); over 1000 (its 10th worst) a run gave 0.984
    num_requests: int = 1000
    warmup_requests: int = 10  # per stack, before measuring
    prompt_tokens: int = 16
    max_tokens: int = 4
    poll_ms: float = 10.0


QUICK = Settings(num_worker_kills=1, num_failovers=1, num_requests=40, warmup_requests=3)


def prompt(n: int) -> list[int]:
    """A deterministic ``n``-token prompt (token ids below the tiny preset's vocabulary)."""
    return [256] + [(i * 131 + n) % 256 for i in range(n - 1)]


def tensor(name: str, datatype: str, values: list[Any], dtype: Any) -> grpcclient.InferInput:
    array = np.array(values, dtype=dtype)
    infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    return infer_input


def llm_inputs(tokens: list[int], max_tokens: int, streaming: bool) -> list[grpcclient.InferInput]:
    """The llmapi model's inputs (seeded sampling, so a stream does not stop early on EOS)."""
    return [
        tensor("input_ids", "INT32", tokens, np.int32),
        tensor("sampling_param_max_tokens", "INT32", [max_tokens], np.int32),
        tensor("sampling_param_temperature", "FP32", [0.7], np.float32),
        tensor("sampling_param_seed", "UINT64", [9], np.uint64),
        tensor("streaming", "BOOL", [streaming], bool),
    ]


# ---- the two stacks ---------------------------------------------------------------------------


@dataclass
class Stacks:
    bed: Testbed
    keys: TestbedKeys
    s: Settings
    static: Router | None = None
    replicas: list[tuple[Router, Scraper]] | None = None
    decode: WorkerProcess | None = None
    puts: queue.Queue[tuple[float, MemberEvent]] | None = None

    def router_flags(self) -> list[str]:
        return ["--threshold-tokens", str(THRESHOLD_TOKENS), "--fixed-threshold",
                "--worker-lost-s", f"{self.s.worker_lost_s:g}"]  # fmt: skip

    def discovered_worker_flags(self, worker_id: str) -> list[str]:
        """Everything but ``--role`` and ``--cluster``."""
        return [*WORKER_FLAGS, "--curve-keys", str(self.keys.both),
                "--discovery", self.bed.etcd_url, "--namespace", NAMESPACE,
                "--lease-ttl-s", str(self.s.lease_ttl_s), "--worker-id", worker_id]  # fmt: skip

    def replica_flags(self) -> list[str]:
        return [*self.router_flags(), "--curve-keys", str(self.keys.router),
                "--discovery", self.bed.etcd_url, "--namespace", NAMESPACE]  # fmt: skip

    def start_replica(self) -> tuple[Router, Scraper]:
        router = self.bed.start_routers(self.replica_flags())[0]
        return router, self.bed.scrape(router)

    def start_stacks(self) -> None:
        """Both stacks but the discovered decode worker: workers first, all at once, then the
        static router and two replicas, all at once."""
        local = ["--cluster", CLUSTER, *WORKER_FLAGS]
        workers = self.bed.start_workers({
            "static-decode": ["--role", "decode", *local, "--plaintext"],
            "static-prefill": ["--role", "prefill", *local, "--plaintext"],
            PREFILL_ID: ["--role", "prefill", "--cluster", CLUSTER,
                         *self.discovered_worker_flags(PREFILL_ID)],
        })  # fmt: skip
        listed = [f"{CLUSTER}/{role}={workers[f'static-{role}'].control.removeprefix('tcp://')}"
                  for role in ("decode", "prefill")]  # fmt: skip
        static = [
            *self.router_flags(),
            "--plaintext",
            *[f for w in listed for f in ("--worker", w)],
        ]
        self.static, *replicas = self.bed.start_routers(static, *[self.replica_flags()] * 2)
        self.replicas = [(router, self.bed.scrape(router)) for router in replicas]

    def start_decode(self) -> float:
        """Start the discovered decode worker; its join time (put to routable on every replica)."""
        flags = ["--role", "decode", "--cluster", CLUSTER, *self.discovered_worker_flags(DECODE_ID)]
        assert self.puts is not None
        while not self.puts.empty():  # earlier events (the killed one's delete, other puts)
            self.puts.get_nowait()
        self.decode = self.bed.start_workers({DECODE_ID: flags})[DECODE_ID]
        put_at = self.put_time(DECODE_ID)
        up = [scraper.first(lambda st: is_up(st, DECODE_ID), put_at, 10.0)
              for _, scraper in self.live_replicas()]  # fmt: skip
        return max(up) - put_at

    def put_time(self, worker_id: str, timeout_s: float = 10.0) -> float:
        """When the bench's watch saw the next put of ``worker_id``'s record."""
        assert self.puts is not None
        deadline = time.monotonic() + timeout_s
        while True:
            at, event = self.puts.get(timeout=max(deadline - time.monotonic(), 0.01))
            if event.kind is EventKind.PUT and event.key.endswith("/" + worker_id):
                return at

    def live_replicas(self) -> list[tuple[Router, Scraper]]:
        assert self.replicas is not None
        return [(r, sc) for r, sc in self.replicas if r.process.poll() is None]


def is_up(state: State, worker: str) -> bool:
    return state.get(("prfaas_worker_up", worker)) == 1.0


def leads(state: State) -> bool:
    return state.get(("prfaas_router_is_leader", "")) == 1.0

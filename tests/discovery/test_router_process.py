"""``prfaas router --discovery`` as a real process over real registering workers and a real etcd.

The router starts with no workers (ready line ``workers: {}``; requests UNAVAILABLE); workers
started with ``--discovery`` join and serve single-engine tokens through stock tritonclient.
``etcd.stop()``: the router keeps serving with the last membership, logs
``discovery_disconnected`` and sets ``prfaas_discovery_connected`` to 0; a worker started while
etcd is away registers once it is back (``etcd.start()``), the router's watch resumes and finds
it. A worker's role change (SetRole) updates its registration. SIGTERM: the router exits 0.

Every process started here is stopped by PID (SIGTERM, then SIGKILL) even when a test fails.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.etcd_server import EtcdServer
from tests.harness import WorkerProcess, spawn_worker, wait_for
from tests.router.builders import llm_inputs
from tests.router.test_router_command import MODEL, ask, prompt, reference, scrape
from trtllm_prfaas.discovery import decode_record, open_membership, parse_discovery
from trtllm_prfaas.testbed.processes import launch_prfaas, read_ready_line, stop_process
from trtllm_prfaas.worker import protocol as p

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--model-preset", "tiny", "--plaintext", "--num-blocks", "512", "--chunk-size", "64"]
NS = "router-process"


class Router:
    """A ``prfaas router --discovery`` child; its log (INFO, JSON) goes to a file, not a pipe."""

    def __init__(self, etcd: EtcdServer, log_path: Path) -> None:
        self.log_path = log_path
        args = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--plaintext",
                "--threshold-tokens", "100", "--fixed-threshold",
                "--discovery", etcd.url, "--namespace", NS]  # fmt: skip
        with log_path.open("w") as log:
            self.process = launch_prfaas("router", args, log_level="INFO", json_logs=True,
                                         stderr=log, cwd=ROOT)  # fmt: skip
        self.ready = read_ready_line(self.process, "router", time.monotonic() + 60.0)

    def metric(self, name: str) -> float | None:
        for family in text_string_to_metric_families(scrape(self.ready["metrics"])):
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
        return None

    def log_events(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stop(self) -> int:
        code = stop_process(self.process, 30.0)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s}s"
        time.sleep(0.05)
    return time.monotonic() - started


def start(procs: dict[str, WorkerProcess], etcd: EtcdServer, name: str, role: str,
          cluster: str, *extra: str) -> WorkerProcess:  # fmt: skip
    flags = [*COMMON, "--discovery", etcd.url, "--namespace", NS, "--lease-ttl-s", "3",
             "--worker-id", name, *extra]  # fmt: skip
    procs[name] = spawn_worker(role, cluster, *flags)
    return procs[name]


def test_router_follows_etcd_and_survives_its_outage(
    etcd: EtcdServer, procs: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    router = Router(etcd, tmp_path / "router.log")
    try:
        assert router.ready["workers"] == {} and router.ready["discovery"] == etcd.url
        assert router.metric("prfaas_discovery_connected") == 1.0
        with pytest.raises(InferenceServerException, match=r"UNAVAILABLE.*no worker has joined"):
            _infer(router.ready["listen"])
        start(procs, etcd, "decode", "decode", "dc-local")
        start(procs, etcd, "pd-prefill", "prefill", "dc-local")
        start(procs, etcd, "prfaas", "prefill", "dc-remote")
        wait_until(lambda: router.metric("prfaas_discovery_workers") == 3, 5.0, "3 workers")
        for n in (40, 600):  # local, remote
            assert ask(router.ready["listen"], prompt(n), 8) == reference(prompt(n), 8), n

        etcd.stop()
        wait_until(lambda: router.metric("prfaas_discovery_connected") == 0.0, 5.0, "gauge 0")
        assert any(e["event"] == "discovery_disconnected" for e in router.log_events())
        for n in (40, 600):  # the last membership still serves
            assert ask(router.ready["listen"], prompt(n), 8) == reference(prompt(n), 8), n
        late = start(procs, etcd, "pd-prefill-2", "prefill", "dc-local")
        assert late.ready["registered"] is False  # etcd is away: it keeps trying

        etcd.start()
        resumed_s = wait_until(
            lambda: router.metric("prfaas_discovery_workers") == 4, 15.0, "the late joiner"
        )
        assert router.metric("prfaas_discovery_connected") == 1.0
        events = [e["event"] for e in router.log_events()]
        assert "discovery_connected" in events and "worker_added" in events
        print({"etcd_back_to_late_worker_routable_s": resumed_s})
        assert ask(router.ready["listen"], prompt(40), 8) == reference(prompt(40), 8)
        assert router.stop() == 0
    finally:
        router.stop()


def test_a_role_change_updates_the_registration(
    etcd: EtcdServer, procs: dict[str, WorkerProcess]
) -> None:
    worker = start(procs, etcd, "flexible", "prefill", "dc-local")
    key = f"/{NS}/workers/dc-local/flexible"

    def registered_role() -> str:
        with open_membership(parse_discovery(etcd.url)) as store:
            return decode_record(store.list_prefix(key)[key], key).role

    assert registered_role() == "prefill"
    with worker.client() as client:
        client.send(p.SetRole("decode", drain_timeout_s=10.0))
        info = wait_for(client, p.WorkerInfo, lambda m: m.role == "decode", timeout_s=30.0)
    wait_until(lambda: registered_role() == "decode", 5.0, "the record's new role")
    with open_membership(parse_discovery(etcd.url)) as store:
        record = decode_record(store.list_prefix(key)[key], key)
    assert record.relay_endpoint == info.relay_endpoint != ""


def _infer(address: str) -> None:
    client = grpcclient.InferenceServerClient(address)
    try:
        client.infer(MODEL, llm_inputs(None, 2, None, None, None, prompt(5)), client_timeout=10)
    finally:
        client.close()

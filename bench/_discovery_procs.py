"""The processes of ``bench/discovery.py``: etcd, ``prfaas worker`` and ``prfaas router``
children on loopback, a scraper that stamps when each router's gauges change, and one owner
(``Testbed``) that stops every process it started by PID, on success and on failure.

Nothing here imports from ``tests/``: the bench runs from a clean checkout without them.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from trtllm_prfaas.testbed.etcd import start_etcd, stop_etcd
from trtllm_prfaas.testbed.processes import (
    WorkerProcess,
    launch_prfaas,
    read_ready_line,
    start_workers,
    stop_process,
)

ROOT = Path(__file__).resolve().parents[1]
LOG_LEVEL = "WARNING"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
# The gauges the scraper follows: (metric, label) -> value; label "" for unlabelled ones.
FOLLOWED = {"prfaas_worker_up": "worker", "prfaas_router_is_leader": ""}
State = dict[tuple[str, str], float]


def free_port() -> int:
    """A loopback port nothing listens on (bound, read back, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Router:
    """A ``prfaas router`` child: ``ready`` is its JSON ready line; its log goes to a file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        with log_path.open("w") as log:
            self.process = launch_prfaas("router", args, log_level=LOG_LEVEL, json_logs=True,
                                         stderr=log, cwd=ROOT)  # fmt: skip
        self.ready: dict[str, Any] = {}

    def wait_ready(self, deadline: float) -> dict[str, Any]:
        self.ready = read_ready_line(self.process, "prfaas router", deadline)
        return self.ready

    @property
    def address(self) -> str:
        return str(self.ready["listen"])

    def scrape(self, timeout_s: float = 2.0) -> State:
        """The followed gauges now (raises OSError if the router does not answer)."""
        with urllib.request.urlopen(self.ready["metrics"], timeout=timeout_s) as response:
            text = response.read().decode()
        state: State = {}
        for family in text_string_to_metric_families(text):
            label = FOLLOWED.get(family.name)
            if label is None:
                continue
            for sample in family.samples:
                if sample.name == family.name:
                    state[(family.name, sample.labels.get(label, ""))] = sample.value
        return state

    def stop(self) -> int:
        code = stop_process(self.process, STOP_TIMEOUT_S)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


class Scraper:
    """Scrapes one router every ``poll_s`` on a thread and keeps ``(time, state)`` each time the
    followed gauges changed. ``pause()`` stops scraping (the latency rounds must not pay for it)."""

    def __init__(self, router: Router, poll_s: float) -> None:
        self.router = router
        self.poll_s = poll_s
        self.history: list[tuple[float, State]] = []
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._closed = threading.Event()
        self._running.set()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last: State | None = None
        while not self._closed.is_set():
            if not self._running.wait(0.1):
                continue
            try:
                state = self.router.scrape()
            except OSError:  # a killed router: nothing to record
                state = None
            stamped_at = time.monotonic()
            if state is not None and state != last:
                with self._lock:
                    self.history.append((stamped_at, state))
                last = state
            time.sleep(self.poll_s)

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def latest(self) -> State | None:
        """The gauges as last scraped (None before the first scrape)."""
        with self._lock:
            return self.history[-1][1] if self.history else None

    def first(self, predicate: Callable[[State], bool], after: float, timeout_s: float) -> float:
        """When the gauges first satisfied ``predicate`` at or after ``after`` (a state that
        already held then counts from ``after``); RuntimeError past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                history = list(self.history)
            before = [s for t, s in history if t < after]
            if before and predicate(before[-1]):
                return after
            for stamped_at, state in history:
                if stamped_at >= after and predicate(state):
                    return stamped_at
            if time.monotonic() > deadline:
                raise RuntimeError(f"router {self.router.address}: not within {timeout_s}s")
            time.sleep(self.poll_s)

    def close(self) -> None:
        self._closed.set()
        self._running.set()
        self._thread.join(5.0)


class Testbed:
    """Owns every process the bench starts; ``close()`` stops them all by PID (routers first,
    then workers, then etcd), also after a failure halfway."""

    def __init__(self, directory: Path, poll_s: float) -> None:
        self.directory = directory
        self.poll_s = poll_s
        self.etcd: subprocess.Popen[str] | None = None
        self.etcd_url = ""
        self.routers: list[Router] = []
        self.scrapers: list[Scraper] = []
        self.workers: list[WorkerProcess] = []

    def start_etcd(self) -> str:
        client_port, peer_port = free_port(), free_port()
        deadline = time.monotonic() + START_TIMEOUT_S
        self.etcd = start_etcd((), ["127.0.0.1"], self.directory, deadline,
                               client_port=client_port,
                               peer_url=f"http://127.0.0.1:{peer_port}")  # fmt: skip
        self.etcd_url = f"etcd://127.0.0.1:{client_port}"
        return self.etcd_url

    def start_routers(self, *args: list[str]) -> list[Router]:
        """Routers (one per argument list) serving on free loopback ports with metrics, all
        launched at once; ready when this returns."""
        routers = []
        for flags in args:
            flags = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", *flags]
            routers.append(Router(flags, self.directory / f"router-{len(self.routers)}.log"))
            self.routers.append(routers[-1])
        deadline = time.monotonic() + START_TIMEOUT_S
        for router in routers:
            router.wait_ready(deadline)
        return routers

    def scrape(self, router: Router) -> Scraper:
        scraper = Scraper(router, self.poll_s)
        self.scrapers.append(scraper)
        return scraper

    def start_workers(self, specs: dict[str, list[str]]) -> dict[str, WorkerProcess]:
        """``prfaas worker`` processes (name -> flags, ``--role`` and ``--cluster`` included),
        launched at once; ready when this returns (all stopped if one fails)."""
        workers = start_workers(specs, START_TIMEOUT_S, LOG_LEVEL)
        self.workers += workers.values()
        return workers

    def close(self) -> None:
        for scraper in self.scrapers:
            scraper.close()
        for router in self.routers:
            router.stop()
        for worker in self.workers:
            worker.stop(STOP_TIMEOUT_S)
        if self.etcd is not None:
            stop_etcd(self.etcd)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

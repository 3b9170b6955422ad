"""``prfaas router``: the router as its own process, in front of a static list of workers
and/or the workers registered in etcd.

It runs the same :class:`~trtllm_prfaas.router.service.RouterService` that ``prfaas up`` runs
in-process (orchestrator, KServe v2 gRPC front door, ``/metrics``), configured from flags and an
optional YAML file::

    prfaas router --listen 0.0.0.0:8001 --metrics-listen 0.0.0.0:8002 \\
        --http-listen 0.0.0.0:8000 --openai-listen 0.0.0.0:9000 \\
        --worker dc-remote/prefill=prefill-remote:7000 \\
        --worker dc-local/prefill=prefill-local:7000 \\
        --worker dc-local/decode=decode-local:7000

``--worker CLUSTER/ROLE=HOST:PORT`` names a worker's control endpoint (its ``prfaas worker
--control``); workers of a PrfaaS cluster (``--prfaas-cluster``, default ``dc-remote``) are the
remote prefill pool, all others are local PD workers. Worker ``i`` of a cluster and role is
named ``CLUSTER-ROLE-i`` in logs and metrics.

Contract:
- Start: every listed worker must answer a ping within ``--connect-timeout-s`` (each in turn) and
  report the role it is listed with; otherwise the command prints why and exits 1. Bad flags exit
  2 (argparse); a bad ``--config`` file exits 1 with a ConfigError naming the key.
- Ready: one JSON line on stdout, ``{"event": "ready", "listen": "HOST:PORT", "metrics": URL or
  null, "http": the KServe v2 REST door's URL or null, "openai": the OpenAI-compatible door's URL
  or null, "workers": {name: endpoint}}``, printed only once the front doors serve (as ``prfaas
  worker`` prints its own ready line).
  ``--http-listen`` (KServe v2 REST with the generate extension, ``router/kserve_rest.py``; off
  unless given) serves the same orchestrator as the gRPC door, and so does ``--openai-listen``
  (the OpenAI-compatible API, ``router/openai_door.py``; Triton's OpenAI frontend uses 9000).
- SIGTERM / SIGINT: the front door stops taking new RPCs at once; requests in flight get
  ``--grace-s`` to finish (then they are cancelled on their workers); the process exits 0.

Membership: ``--discovery etcd://HOST:PORT[,HOST:PORT] --namespace NS`` (default namespace
``prfaas``) also routes to every worker registered under ``/NS/workers/`` (``prfaas worker
--discovery``), as they come and go (``router/discovered.py``): a worker that registers is
routable within a second, one whose record is deleted (SIGTERM) or whose lease expired
(SIGKILL) leaves routing, one that comes back rejoins. The ``--worker`` list may then be empty:
the router starts anyway, waits up to 5 s for the first listing, and answers UNAVAILABLE until a
worker has joined (the ready line's ``workers`` are those joined by then). If etcd goes away the
router keeps the last membership (logged, ``prfaas_discovery_connected`` 0) and catches up when
it is back. The worker's PrfaaS flag comes from its record, not from ``--prfaas-cluster``.

Replicas: with ``--discovery`` the router also campaigns for leadership among the routers of
its namespace (``discovery/leader.py``: the key ``/NS/leader`` under a 3 s lease). Only the
leader runs the control loop's long-timescale work (the threshold, drains and role conversions)
and publishes it to ``/NS/policy``; the others follow it and route every request themselves. A
killed leader is replaced within the lease TTL; SIGTERM resigns at once. The ready line names
this replica (``replica``); ``prfaas_router_is_leader`` says whether it leads.

Modules: this one runs the process (start, ready line, signals, drain); ``router/settings.py``
reads the file and merges the flags into :class:`RouterSettings`; ``router/flags.py`` declares
the flags; ``router/wiring.py`` joins etcd membership and leadership to the running service.

The YAML file's keys are :class:`RouterFile`'s fields (flags win over the file; ``--worker``
flags, when given, replace the file's ``workers``); an unknown key or a value of the wrong type is
refused.

Control plane: ``--curve-keys FILE`` (the router's key pair as ``client_public``/
``client_secret`` and the workers' control public key as ``server_public``, the relay sender's
layout; ``config.write_testbed_keyset`` writes ``router.json``) makes every worker socket a
CurveZMQ client, and a worker admits it only if its own key file allows this router's key. A
router with a key a worker does not allow gets no answer and fails the start like a silent
worker. ``--plaintext`` (explicit, logged as a warning per worker) is the other choice; one of
the two is required.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.router.flags import add_arguments
from trtllm_prfaas.router.service import RouterService
from trtllm_prfaas.router.settings import (
    RouterFile,
    RouterSettings,
    WorkerAddress,
    load_settings,
    name_workers,
    parse_listen,
    parse_worker,
)
from trtllm_prfaas.router.wiring import start_campaign, start_discovery
from trtllm_prfaas.telemetry.logging import get_logger

__all__ = [
    "RouterFile",
    "RouterSettings",
    "WorkerAddress",
    "add_arguments",
    "load_settings",
    "name_workers",
    "parse_listen",
    "parse_worker",
    "run",
]

log = get_logger(__name__)


# ---------------------------------------------------------------------------- running
def run(command: str, args: argparse.Namespace) -> int:
    """Start, print the ready line, serve until SIGTERM/SIGINT, drain, exit 0. A signal before
    the ready line has its default effect (nothing is being served yet: no drain is owed)."""
    settings = load_settings(args)
    service = _start(settings)
    stop = threading.Event()
    leadership = discovered = None
    try:
        discovered = start_discovery(settings, service)
        leadership = start_campaign(settings, service)
    except BaseException:
        if discovered is not None:
            discovered.membership.close()
        service.close()
        raise
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        ready = _ready_line(settings, service)
        ready["replica"] = leadership.replica_id if leadership is not None else None
        print(json.dumps(ready), flush=True)
        # Python runs signal handlers on the main thread only; a wait without a timeout is cut
        # short only by a signal delivered to this thread, so wake up now and then to run them.
        while not stop.wait(0.5):
            pass
        log.info("router_stopping", grace_s=settings.frontdoor.shutdown_grace_s)
    finally:
        try:
            if leadership is not None:  # resign first: another replica leads at once
                service.run_on_loop(leadership.stop(), 10.0)
            if discovered is not None:  # no worker joins or leaves while the doors drain
                service.run_on_loop(discovered.close(), 15.0)
                discovered.membership.close()
        finally:
            service.close()
    print(json.dumps({"event": "stopped", "listen": service.address}), file=sys.stderr)
    return 0


def _start(settings: RouterSettings) -> RouterService:
    """A started RouterService whose workers answered with the roles they are listed with."""
    metrics = settings.metrics_listen
    service = RouterService(
        settings.router,
        settings.frontdoor,
        metrics_port=None if metrics is None else metrics[1],
        metrics_host=None if metrics is None else metrics[0].strip("[]"),  # a socket address
        http_port=None if settings.http_listen is None else settings.http_listen[1],
        http_host=None if settings.http_listen is None else settings.http_listen[0],
        openai_port=None if settings.openai_listen is None else settings.openai_listen[1],
        openai_host=None if settings.openai_listen is None else settings.openai_listen[0],
    )
    # Workers are pinged one after another, each with its own connect timeout.
    start_timeout_s = settings.router.connect_timeout_s * len(settings.workers) + 30.0
    try:
        service.start(timeout_s=start_timeout_s)
    except OSError as exc:  # the metrics port (the front door raises ConfigError itself)
        raise ConfigError(f"--metrics-listen cannot bind: {exc}") from exc
    try:
        _check_roles(settings, service)
    except BaseException:
        service.close()
        raise
    return service


def _check_roles(settings: RouterSettings, service: RouterService) -> None:
    states = service.orchestrator.cluster.workers
    for name, worker in settings.worker_names().items():
        reported = states[name].role
        if reported != worker.role:
            raise ConfigError(
                f"--worker {worker.cluster}/{worker.role}={worker.host}:{worker.port}: "
                f"the worker there reports role {reported!r}"
            )


def _ready_line(settings: RouterSettings, service: RouterService) -> dict[str, Any]:
    metrics = service.metrics_server
    return {
        "event": "ready",
        "listen": service.address,
        "metrics": metrics.url if metrics is not None else None,
        "http": service.http_url,
        "openai": service.openai_url,
        "workers": {name: w.endpoint for name, w in service.orchestrator.cluster.workers.items()},
        "discovery": None if settings.discovery is None else settings.discovery.url,
        "namespace": settings.namespace if settings.discovery is not None else None,
    }

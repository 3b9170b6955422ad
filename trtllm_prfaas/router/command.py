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
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec

from trtllm_prfaas.config import load_control_security, load_yaml
from trtllm_prfaas.discovery import open_membership
from trtllm_prfaas.discovery.leader import EtcdLeadership, LeaderConfig
from trtllm_prfaas.discovery.membership import (
    DEFAULT_NAMESPACE,
    DiscoveryConfig,
    check_name,
    parse_discovery,
)
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.router.control import ControlConfig
from trtllm_prfaas.router.discovered import DiscoveredWorkers
from trtllm_prfaas.router.orchestrator import RouterConfig, WorkerSpec
from trtllm_prfaas.router.service import RouterService
from trtllm_prfaas.router.servicer import FrontDoorConfig
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.telemetry.metrics import DiscoveryMetrics
from trtllm_prfaas.transport import RelaySecurity

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

ROLES = ("prefill", "decode")
DEFAULT_LISTEN = "0.0.0.0:8001"
DEFAULT_PRFAAS_CLUSTERS = ("dc-remote",)
DEFAULT_GRACE_S = 25.0  # under Kubernetes' 30 s default; compose gives the router 35 s
_DISCOVERY_WAIT_S = 5.0  # at start: the first listing and the workers it names, at most this


@dataclass(frozen=True, kw_only=True)
class WorkerAddress:
    """One ``--worker CLUSTER/ROLE=HOST:PORT``."""

    cluster: str
    role: str
    host: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"


Seconds = Annotated[float, msgspec.Meta(gt=0)]


class RouterFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``--config`` YAML file: every key optional, each one a flag's twin."""

    listen: str | None = None  # --listen
    metrics_listen: str | None = None  # --metrics-listen
    http_listen: str | None = None  # --http-listen: KServe v2 REST
    openai_listen: str | None = None  # --openai-listen: the OpenAI-compatible API
    workers: list[str] | None = None  # --worker, one string each
    discovery: str | None = None  # --discovery etcd://HOST:PORT[,HOST:PORT]
    namespace: str | None = None  # --namespace
    prfaas_clusters: list[str] | None = None  # --prfaas-cluster
    model_name: str | None = None  # --model-name
    tokenizer_dir: str | None = None  # --tokenizer: the served model's Hugging Face directory
    threshold_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    link_gbps: Annotated[float, msgspec.Meta(gt=0)] | None = None
    fixed_threshold: bool | None = None  # True: no control loop, t stays threshold_tokens
    connect_timeout_s: Seconds | None = None
    announce_timeout_s: Seconds | None = None
    prefill_timeout_s: Seconds | None = None
    worker_silence_s: Seconds | None = None
    worker_lost_s: Seconds | None = None
    request_timeout_s: Seconds | None = None
    grace_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    curve_keys: str | None = None  # --curve-keys: the router's control-plane key file
    plaintext: bool | None = None  # --plaintext: control sockets without Curve (warned)


@dataclass(frozen=True, kw_only=True)
class RouterSettings:
    """Everything the command runs with, flags and file merged and validated."""

    listen: tuple[str, int]
    metrics_listen: tuple[str, int] | None
    http_listen: tuple[str, int] | None
    openai_listen: tuple[str, int] | None
    workers: tuple[WorkerAddress, ...]
    prfaas_clusters: tuple[str, ...]
    router: RouterConfig
    frontdoor: FrontDoorConfig
    discovery: DiscoveryConfig | None = None  # None: the static list only
    namespace: str = DEFAULT_NAMESPACE

    def worker_names(self) -> dict[str, WorkerAddress]:
        return name_workers(self.workers)


def name_workers(workers: tuple[WorkerAddress, ...]) -> dict[str, WorkerAddress]:
    """``CLUSTER-ROLE-i`` -> address, ``i`` counting within the cluster and role, in order."""
    names: dict[str, WorkerAddress] = {}
    counts: dict[tuple[str, str], int] = {}
    for worker in workers:
        i = counts.get((worker.cluster, worker.role), 0)
        counts[(worker.cluster, worker.role)] = i + 1
        names[f"{worker.cluster}-{worker.role}-{i}"] = worker
    return names


# ---------------------------------------------------------------------------- parsing values
def parse_listen(text: str, what: str = "--listen", min_port: int = 0) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ConfigError names ``what``. An IPv6 host keeps its
    brackets (``[::1]:8001`` -> ``("[::1]", 8001)``), as gRPC and ZeroMQ addresses want it."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or (":" in host and host[0] != "["):
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT")
    port = int(port_text)
    if not min_port <= port < 65536:
        raise ConfigError(f"{what} {text!r}: port must be in {min_port}..65535")
    return host, port


def parse_worker(text: str, what: str = "--worker") -> WorkerAddress:
    """``CLUSTER/ROLE=HOST:PORT`` -> WorkerAddress; ConfigError names ``what`` and the text."""
    name, sep, address = text.partition("=")
    cluster, slash, role = name.partition("/")
    if not sep or not slash or not cluster:
        raise ConfigError(f"{what} {text!r}: expected CLUSTER/ROLE=HOST:PORT")
    if role not in ROLES:
        raise ConfigError(f"{what} {text!r}: role must be one of {list(ROLES)}, not {role!r}")
    host, port = parse_listen(address, f"{what} {text!r}: address", min_port=1)
    return WorkerAddress(cluster=cluster, role=role, host=host, port=port)


def _parse_namespace(text: str, what: str = "--namespace") -> str:
    return check_name(text, what)


def _argparse_type(parse: Any) -> Any:
    """Turn a ConfigError-raising parser into an argparse ``type`` (bad flags exit 2)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = parse.__name__
    return convert


# ---------------------------------------------------------------------------- flags
def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="router YAML file")
    listen = _argparse_type(parse_listen)
    _optional(parser, "--listen", listen, f"KServe v2 gRPC (default {DEFAULT_LISTEN})", "HOST:PORT")
    _optional(
        parser, "--metrics-listen", listen, "Prometheus /metrics (default: none)", "HOST:PORT"
    )
    _optional(parser, "--http-listen", listen, "KServe v2 REST (default: none)", "HOST:PORT")
    _optional(
        parser, "--openai-listen", listen, "OpenAI-compatible API (default: none)", "HOST:PORT"
    )
    parser.add_argument(
        "--worker",
        action="append",
        default=None,
        type=_argparse_type(parse_worker),
        metavar="CLUSTER/ROLE=HOST:PORT",
        help="a worker's control endpoint; repeat for each worker (ROLE: prefill or decode)",
    )
    parser.add_argument(
        "--discovery",
        type=_argparse_type(parse_discovery),
        default=None,
        metavar="etcd://HOST:PORT[,HOST:PORT]",
        help="also route to the workers registered in etcd, as they come and go",
    )
    parser.add_argument(
        "--namespace",
        type=_argparse_type(_parse_namespace),
        default=None,
        help=f"membership namespace (keys /NS/workers/...; default {DEFAULT_NAMESPACE})",
    )
    parser.add_argument(
        "--prfaas-cluster",
        action="append",
        default=None,
        metavar="CLUSTER",
        help="a PrfaaS (remote prefill) cluster; repeatable (default: dc-remote)",
    )
    parser.add_argument("--model-name", default=None, help="served model (default tensorrt_llm)")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        metavar="DIR",
        help="the served model's Hugging Face directory (default: the reference byte tokenizer)",
    )
    parser.add_argument(
        "--curve-keys",
        type=Path,
        default=None,
        metavar="FILE",
        help="control-plane Curve keys: this router's pair and the workers' public key",
    )
    parser.add_argument(
        "--plaintext",
        action="store_true",
        default=None,
        help="control sockets without encryption or authentication (warned)",
    )
    positive = _above(0.0)
    _optional(parser, "--threshold-tokens", _at_least(int, 0), "initial t (default 1024)")
    _optional(parser, "--link-gbps", positive, "PrfaaS egress capacity (default: measured)")
    parser.add_argument(
        "--fixed-threshold", action="store_true", default=None, help="keep t (no control loop)"
    )
    _optional(parser, "--connect-timeout-s", positive, "each worker must answer by then (30)")
    _optional(parser, "--announce-timeout-s", positive, "decode waits this for its transfer (30)")
    _optional(parser, "--prefill-timeout-s", positive, "no t1 by then: decode runs it all (120)")
    _optional(parser, "--worker-silence-s", positive, "a silent prefill worker is given up (10)")
    _optional(parser, "--worker-lost-s", positive, "a dead connection is noticed within this (3)")
    _optional(parser, "--request-timeout-s", positive, "deadline when the client sets none (300)")
    _optional(
        parser,
        "--grace-s",
        _at_least(float, 0.0),
        f"SIGTERM: requests in flight get this ({DEFAULT_GRACE_S:g})",
    )


def _optional(
    parser: argparse.ArgumentParser, flag: str, kind: Any, help_text: str, metavar: str = "N"
) -> None:
    """A flag whose absence is None (so a ``--config`` value or the default applies)."""
    parser.add_argument(flag, type=kind, default=None, help=help_text, metavar=metavar)


def _above(low: float) -> Any:
    """An argparse type: a float > ``low`` (anything else exits 2 naming the flag)."""

    def number_above(text: str) -> float:
        value = float(text)
        if not value > low:
            raise argparse.ArgumentTypeError(f"must be > {low:g}, got {text}")
        return value

    return number_above


def _at_least(kind: Any, low: float) -> Any:
    """An argparse type: a ``kind`` number >= ``low``."""

    def number_at_least(text: str) -> Any:
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        return value

    number_at_least.__name__ = kind.__name__
    return number_at_least


# ---------------------------------------------------------------------------- settings
def read_router_file(path: Path) -> RouterFile:
    """The YAML file as a RouterFile; ConfigError names the file and the key."""
    data = load_yaml(path)
    try:
        return msgspec.convert(data, RouterFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"router config {path}: {exc}") from exc


def load_settings(args: argparse.Namespace) -> RouterSettings:
    """Flags over the ``--config`` file over defaults, validated (files are read here)."""
    file = read_router_file(args.config) if args.config is not None else RouterFile()
    flags = _flag_values(args)
    merged: dict[str, Any] = {
        name: flags[name] if flags.get(name) is not None else getattr(file, name)
        for name in RouterFile.__struct_fields__
    }
    if flags["plaintext"]:  # one security choice: a flag's replaces the file's other one
        merged["curve_keys"] = None
    elif flags["curve_keys"] is not None:
        merged["plaintext"] = None
    where = f"router config {args.config}: " if args.config is not None else ""
    return _settings(merged, where)


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, under their RouterFile names (parsed values; None when absent)."""
    values = {name: getattr(args, name, None) for name in RouterFile.__struct_fields__}
    values["workers"] = args.worker
    values["discovery"] = args.discovery
    values["prfaas_clusters"] = args.prfaas_cluster
    values["tokenizer_dir"] = None if args.tokenizer is None else str(args.tokenizer)
    values["curve_keys"] = None if args.curve_keys is None else str(args.curve_keys)
    return values


def _parsed(value: Any, parse: Any, what: str) -> Any:
    """A flag arrives parsed; the same value from the file is still text (named ``what``)."""
    return parse(value, what) if isinstance(value, str) else value


def _settings(v: dict[str, Any], where: str) -> RouterSettings:
    listen = _parsed(v["listen"] or DEFAULT_LISTEN, parse_listen, f"{where}listen")
    metrics = v["metrics_listen"]
    metrics = None if metrics is None else _parsed(metrics, parse_listen, f"{where}metrics_listen")
    http = v["http_listen"]
    http = None if http is None else _parsed(http, parse_listen, f"{where}http_listen")
    openai = v["openai_listen"]
    openai = None if openai is None else _parsed(openai, parse_listen, f"{where}openai_listen")
    workers = tuple(_parsed(w, parse_worker, f"{where}workers:") for w in v["workers"] or ())
    prfaas = tuple(v["prfaas_clusters"] or DEFAULT_PRFAAS_CLUSTERS)
    discovery = v["discovery"]
    discovery = None if discovery is None else _parsed(discovery, parse_discovery,
                                                       f"{where}discovery")  # fmt: skip
    namespace = _parsed(v["namespace"] or DEFAULT_NAMESPACE, _parse_namespace, f"{where}namespace")
    _check_workers(workers, prfaas, is_discovering=discovery is not None)
    specs = tuple(
        WorkerSpec(name, w.endpoint, w.cluster in prfaas)
        for name, w in name_workers(workers).items()
    )
    return RouterSettings(
        listen=listen,
        metrics_listen=metrics,
        http_listen=http,
        openai_listen=openai,
        workers=workers,
        prfaas_clusters=prfaas,
        router=_router_config(specs, v),
        frontdoor=_frontdoor_config(listen, v),
        discovery=discovery,
        namespace=namespace,
    )


def _check_workers(
    workers: tuple[WorkerAddress, ...], prfaas: tuple[str, ...], *, is_discovering: bool = False
) -> None:
    if not workers and not is_discovering:
        raise ConfigError(
            "no workers: give --worker CLUSTER/ROLE=HOST:PORT (or workers: in a --config), "
            "or --discovery etcd://HOST:PORT to find them"
        )
    endpoints = [w.endpoint for w in workers]
    twice = sorted({e for e in endpoints if endpoints.count(e) > 1})
    if twice:
        raise ConfigError(f"workers listed twice: {twice}")
    for w in workers:
        if w.cluster in prfaas and w.role != "prefill":
            raise ConfigError(
                f"--worker {w.cluster}/{w.role}: {w.cluster} is a PrfaaS cluster, which holds "
                "prefill workers only (decode runs in the local PD cluster)"
            )
    if is_discovering:  # workers register as they start: none may be listed yet
        return
    if not any(w.role == "decode" for w in workers):
        raise ConfigError("the router needs at least one decode worker (ROLE decode)")
    if not any(w.role == "prefill" for w in workers):
        raise ConfigError("the router needs at least one prefill worker (ROLE prefill)")


def _router_config(specs: tuple[WorkerSpec, ...], v: dict[str, Any]) -> RouterConfig:
    defaults = RouterConfig(())
    control = None if v["fixed_threshold"] else ControlConfig(link_gbps=v["link_gbps"])
    timeouts = ("announce_timeout_s", "prefill_timeout_s", "worker_silence_s", "worker_lost_s",
                "connect_timeout_s")  # fmt: skip
    return RouterConfig(
        specs,
        model_name=v["model_name"] or defaults.model_name,
        tokenizer_dir=v["tokenizer_dir"] or defaults.tokenizer_dir,
        threshold_tokens=_default(v["threshold_tokens"], defaults.threshold_tokens),
        control=control,
        control_security=_control_security(v),
        **{name: _default(v[name], getattr(defaults, name)) for name in timeouts},
    )


def _control_security(v: dict[str, Any]) -> RelaySecurity:
    """Curve from ``curve_keys`` or plaintext when chosen; a flag wins over the file's other
    choice (``--plaintext`` over a file's ``curve_keys`` and the reverse)."""
    keys = Path(v["curve_keys"]) if v["curve_keys"] else None
    return load_control_security(keys, bool(v["plaintext"]), "router")


def _frontdoor_config(listen: tuple[str, int], v: dict[str, Any]) -> FrontDoorConfig:
    defaults = FrontDoorConfig()
    return FrontDoorConfig(
        host=listen[0],
        port=listen[1],
        request_timeout_s=_default(v["request_timeout_s"], defaults.request_timeout_s),
        shutdown_grace_s=_default(v["grace_s"], DEFAULT_GRACE_S),
    )


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


# ---------------------------------------------------------------------------- running
def run(command: str, args: argparse.Namespace) -> int:
    """Start, print the ready line, serve until SIGTERM/SIGINT, drain, exit 0. A signal before
    the ready line has its default effect (nothing is being served yet: no drain is owed)."""
    settings = load_settings(args)
    service = _start(settings)
    stop = threading.Event()
    leadership = discovered = None
    try:
        discovered = _discover(settings, service)
        leadership = _campaign(settings, service)
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
        stop.wait()
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


def _discover(settings: RouterSettings, service: RouterService) -> DiscoveredWorkers | None:
    """With ``--discovery``: watch the registered workers and route to them as they come and
    go (``router/discovered.py``); waits a few seconds for the first listing."""
    if settings.discovery is None:
        return None
    membership = open_membership(settings.discovery)
    discovered = DiscoveredWorkers(
        service.orchestrator,
        membership,
        settings.namespace,
        DiscoveryMetrics(service.registry),
    )
    try:
        service.run_on_loop(discovered.start(wait_s=_DISCOVERY_WAIT_S), _DISCOVERY_WAIT_S + 10.0)
    except BaseException:
        membership.close()
        raise
    return discovered


def _campaign(settings: RouterSettings, service: RouterService) -> EtcdLeadership | None:
    """With ``--discovery``: campaign for leadership among the namespace's routers (returns at
    once) and let it decide whether this control loop leads or follows."""
    if settings.discovery is None:
        return None
    replica_id = f"{socket.gethostname()}:{os.getpid()}@{service.address}"
    config = LeaderConfig(
        endpoints=settings.discovery.endpoints,
        namespace=settings.namespace,
        replica_id=replica_id,
    )
    leadership = EtcdLeadership(config, metrics=service.metrics)
    service.orchestrator.control.replica = leadership
    service.run_on_loop(leadership.start(), 10.0)
    return leadership


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

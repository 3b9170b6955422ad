"""``prfaas router``'s settings: the ``--config`` YAML file (:class:`RouterFile`), the values
its flags and keys take (``HOST:PORT``, ``CLUSTER/ROLE=HOST:PORT``), and the merge of flags
over file over defaults into one validated :class:`RouterSettings` (``load_settings``).

Flags win over the file; ``--worker`` flags, when given, replace the file's ``workers``; an
unknown key or a value of the wrong type is refused with a ConfigError naming the file and the
key. A flag arrives parsed (``router/flags.py``); the same value from the file is parsed here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec

from trtllm_prfaas.config import load_control_security, load_yaml
from trtllm_prfaas.discovery.membership import (
    DEFAULT_NAMESPACE,
    DiscoveryConfig,
    check_name,
    parse_discovery,
)
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.router.control import ControlConfig
from trtllm_prfaas.router.orchestrator import RouterConfig, WorkerSpec
from trtllm_prfaas.router.servicer import FrontDoorConfig
from trtllm_prfaas.transport import RelaySecurity
from trtllm_prfaas.vocabulary import Role, parse_role

__all__ = [
    "DEFAULT_GRACE_S",
    "DEFAULT_LISTEN",
    "DEFAULT_PRFAAS_CLUSTERS",
    "RouterFile",
    "RouterSettings",
    "WorkerAddress",
    "load_settings",
    "name_workers",
    "parse_listen",
    "parse_namespace",
    "parse_worker",
    "read_router_file",
]

DEFAULT_LISTEN = "0.0.0.0:8001"
DEFAULT_PRFAAS_CLUSTERS = ("dc-remote",)
DEFAULT_GRACE_S = 25.0  # under Kubernetes' 30 s default; compose gives the router 35 s


@dataclass(frozen=True, kw_only=True)
class WorkerAddress:
    """One ``--worker CLUSTER/ROLE=HOST:PORT``."""

    cluster: str
    role: Role
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
    prefix_routing: bool | None = None  # --[no-]prefix-routing: False routes cache-blind


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


# ---------------------------------------------------------------------------- values
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
    checked = parse_role(role, f"{what} {text!r}")
    host, port = parse_listen(address, f"{what} {text!r}: address", min_port=1)
    return WorkerAddress(cluster=cluster, role=checked, host=host, port=port)


def parse_namespace(text: str, what: str = "--namespace") -> str:
    return check_name(text, what)


# ---------------------------------------------------------------------------- merging
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
    namespace = _parsed(v["namespace"] or DEFAULT_NAMESPACE, parse_namespace, f"{where}namespace")
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
        if w.cluster in prfaas and w.role != Role.PREFILL:
            raise ConfigError(
                f"--worker {w.cluster}/{w.role}: {w.cluster} is a PrfaaS cluster, which holds "
                "prefill workers only (decode runs in the local PD cluster)"
            )
    if is_discovering:  # workers register as they start: none may be listed yet
        return
    if not any(w.role == Role.DECODE for w in workers):
        raise ConfigError("the router needs at least one decode worker (ROLE decode)")
    if not any(w.role == Role.PREFILL for w in workers):
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
        prefix_routing=_default(v["prefix_routing"], defaults.prefix_routing),
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

"""Configuration loading: the only module that reads files or the environment.

Everything below the CLI edge receives frozen dataclasses. This module turns files, presets and
``TRTLLM_PRFAAS_*`` environment variables into them, and raises ConfigError naming the file and
field when something is wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from trtllm_prfaas.connector.prfaas_runtime import PrfaasConnectorConfig, Role, rank_endpoint
from trtllm_prfaas.deploy.env import ENV_PREFIX, ENV_VARS
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.transport import CurveKeys, RelayConfig, RelaySecurity, generate_keypair
from trtllm_prfaas.transport.config import Z85_KEY_LEN

__all__ = [
    "MODEL_PRESETS",
    "CurveKeyFile",
    "TestbedKeys",
    "connector_config_from_env",
    "load_control_security",
    "load_relay_security",
    "load_yaml",
    "model_preset",
    "write_testbed_keys",
    "write_testbed_keyset",
]

T = TypeVar("T")

# Named model shapes: "default" is the reference engine's; "tiny" keeps tests and CI quick.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": dict(
        num_layers=4,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        linear_num_heads=2,
        mlp_hidden_size=96,
        tokens_per_block=16,
        attention_tile_blocks=2,
        max_seq_len=8192,
        attention_init_gain=3.0,  # tokens depend on the relayed full-attention KV (reference.py)
    ),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model preset {name!r} unknown; choose from {sorted(MODEL_PRESETS)}")
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


@dataclass(frozen=True)
class CurveKeyFile:
    """A JSON key file: ``server_public`` always; ``server_secret`` + ``allowed_clients`` on
    receivers; ``client_public`` + ``client_secret`` on senders (Z85 strings)."""

    path: Path

    def load(self) -> CurveKeys:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"curve key file {self.path}: {exc}") from exc
        return _curve_keys(raw, self.path)

    def load_control(self, side: str) -> CurveKeys:
        """The control-plane keys of ``side``. A worker's file (``side="worker"``) must have a
        ``control`` section with the relay's field names: its control ``server_public``/
        ``server_secret`` and the routers' public keys as ``allowed_clients``. A router's file
        (``"router"``) has the relay sender's layout at the top level: its own pair as
        ``client_public``/``client_secret``, the workers' control key as ``server_public``."""
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"curve key file {self.path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"curve key file {self.path}: top level must be a mapping")
        if side == "router":
            return _curve_keys(raw, self.path)
        section = raw.get("control")
        if not isinstance(section, dict):
            raise ConfigError(
                f"curve key file {self.path}: no control section (the worker's control key pair "
                "and allowed_clients, the routers' public keys; config.write_testbed_keyset)"
            )
        return _curve_keys(section, self.path)


def _curve_keys(raw: Mapping[str, Any], source: Path) -> CurveKeys:
    def key(name: str) -> bytes | None:
        value = raw.get(name)
        return None if value is None else str(value).encode()

    server_public = key("server_public")
    if server_public is None:
        raise ConfigError(f"curve key file {source}: server_public is required")
    allowed = frozenset(str(k).encode() for k in raw.get("allowed_clients", []))
    return CurveKeys(
        server_public, key("server_secret"), key("client_public"), key("client_secret"), allowed
    )


def load_relay_security(keys_file: Path | None, plaintext: bool) -> RelaySecurity:
    """Curve from ``keys_file``, or plaintext only when asked for explicitly."""
    if keys_file is not None and plaintext:
        raise ConfigError("--curve-keys and --plaintext are mutually exclusive")
    if keys_file is not None:
        return RelaySecurity(curve=CurveKeyFile(keys_file).load())
    if plaintext:
        return RelaySecurity.insecure_plaintext()
    raise ConfigError("the KV relay needs --curve-keys FILE (encrypted) or --plaintext")


def load_control_security(keys_file: Path | None, plaintext: bool, side: str) -> RelaySecurity:
    """The control plane's security from the same key file and ``--plaintext`` flag as the relay.

    ``side`` is ``"worker"`` (Curve server: the file's ``control`` section must hold its pair and
    the allowed routers) or ``"router"`` (Curve client: its pair and the workers' public key)."""
    if keys_file is not None and plaintext:
        raise ConfigError("--curve-keys and --plaintext are mutually exclusive")
    if plaintext:
        return RelaySecurity.insecure_plaintext()
    if keys_file is None:
        raise ConfigError("the control plane needs --curve-keys FILE (encrypted) or --plaintext")
    keys = CurveKeyFile(keys_file).load_control(side)
    try:
        if side == "worker":
            keys.require_server()
        else:
            keys.require_client()
    except ConfigError as exc:
        raise ConfigError(f"curve key file {keys_file}: control plane ({side}): {exc}") from exc
    return RelaySecurity(curve=keys)


@dataclass(frozen=True)
class TestbedKeys:
    """Key files of one testbed (JSON, mode 0600). Relay: ``receiver`` (decode), ``sender``
    (prefill), ``both`` (a worker whose role can change holds the keys both roles need). Each
    worker file has a ``control`` section (the workers' control key pair, the router allowed);
    ``router`` is the router's pair with the workers' control public key (sender layout)."""

    __test__ = False

    receiver: Path
    sender: Path
    both: Path
    router: Path


def write_testbed_keyset(directory: Path) -> TestbedKeys:
    """Fresh Curve keys for a testbed: relay, control plane and router files, mode 0600."""
    server_public, server_secret = generate_keypair()
    client_public, client_secret = generate_keypair()
    control_public, control_secret = generate_keypair()
    router_public, router_secret = generate_keypair()
    control = {
        "server_public": control_public.decode(),
        "server_secret": control_secret.decode(),
        "allowed_clients": [router_public.decode()],
    }
    receiver = {
        "server_public": server_public.decode(),
        "server_secret": server_secret.decode(),
        "allowed_clients": [client_public.decode()],
    }
    sender = {
        "server_public": server_public.decode(),
        "client_public": client_public.decode(),
        "client_secret": client_secret.decode(),
    }
    router = {
        "server_public": control_public.decode(),
        "client_public": router_public.decode(),
        "client_secret": router_secret.decode(),
    }
    contents = {
        "relay-receiver.json": {**receiver, "control": control},
        "relay-sender.json": {**sender, "control": control},
        "relay-both.json": {**receiver, **sender, "control": control},
        "router.json": router,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in contents.items():
        path = directory / name
        path.write_text(json.dumps(content))
        path.chmod(0o600)
    return TestbedKeys(*(directory / name for name in contents))


def write_testbed_keys(directory: Path) -> tuple[Path, Path]:
    """Fresh Curve keys for a testbed: (receiver key file, sender key file), mode 0600; both
    also carry the control section (``write_testbed_keyset`` has every file)."""
    keys = write_testbed_keyset(directory)
    return keys.receiver, keys.sender


# ---- the GPU path: the connector inside TensorRT-LLM reads TRTLLM_PRFAAS_* (deploy/env.py) ----


def connector_config_from_env(environ: Mapping[str, str] | None = None) -> PrfaasConnectorConfig:
    """The PrfaaS connector's configuration from the ``TRTLLM_PRFAAS_*`` variables (the list and
    meanings are in ``trtllm_prfaas.deploy.env``), with its Curve key files read. ``environ``
    defaults to this process's environment. ConfigError names the variable that is wrong."""
    env = os.environ if environ is None else environ
    role_text = _env(env, "ROLE")
    try:
        role = Role(role_text)
    except ValueError as exc:
        raise ConfigError(
            f"TRTLLM_PRFAAS_ROLE: expected prefill or decode, got {role_text!r}"
        ) from exc
    own_public, own_secret = _key(env, "CURVE_PUBLIC_KEY_FILE"), _key(env, "CURVE_SECRET_KEY_FILE")
    if role is Role.DECODE:
        paths = [p.strip() for p in _env(env, "CURVE_CLIENT_KEY_FILE").split(",") if p.strip()]
        clients = frozenset(_key_file(Path(p), "CURVE_CLIENT_KEY_FILE") for p in paths)
        curve = CurveKeys(own_public, own_secret, allowed_client_public_keys=clients)
    else:
        server = _key(env, "CURVE_SERVER_KEY_FILE")
        curve = CurveKeys(server, client_public_key=own_public, client_secret_key=own_secret)
    streams = _number(env, "NUM_STREAMS", int)
    has_link = role is Role.PREFILL and _value(env, "LINK_GBPS") is not None
    link_gbps = _number(env, "LINK_GBPS", float) if has_link else None
    credit_bytes = _number(env, "RECV_BUFFER_BYTES", int)
    try:
        relay = RelayConfig(
            RelaySecurity(curve=curve),
            num_streams=streams,
            link_gbps=link_gbps,
            credit_bytes=credit_bytes,
        )
    except ConfigError as exc:  # name the variables, not the dataclass field
        raise ConfigError(
            "TRTLLM_PRFAAS_NUM_STREAMS / TRTLLM_PRFAAS_LINK_GBPS / "
            f"TRTLLM_PRFAAS_RECV_BUFFER_BYTES: {exc}"
        ) from exc
    timeout_s = _number(env, "TRANSFER_TIMEOUT_S", float)
    is_decode = role is Role.DECODE
    return PrfaasConnectorConfig(
        role,
        relay,
        receiver_endpoint=_env(env, "RELAY_BIND") if is_decode else "tcp://127.0.0.1:0",
        transfer_timeout_s=timeout_s,
        load_timeout_s=timeout_s,
        plan_endpoint=_endpoint(env, "PLAN_BIND"),
        plan_security=_plan_security(env, own_public, own_secret),
        relay_advertise=_endpoint(env, "RELAY_ADVERTISE") if is_decode else None,
    )


def _endpoint(env: Mapping[str, str], name: str) -> str | None:
    """An optional ``transport://host:port`` variable (a required one must be set)."""
    value = _value(env, name)
    required = any(v.is_required for v in ENV_VARS if v.name == ENV_PREFIX + name)
    if value is None and not required:
        return None
    text = _env(env, name)
    try:
        rank_endpoint(text, 0)
    except ConfigError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name}: {exc}") from exc
    return text


def _plan_security(env: Mapping[str, str], public: bytes, secret: bytes) -> RelaySecurity:
    """The plan server: this connector's own key pair, the listed worker keys as clients."""
    listed = _env(env, "PLAN_CLIENT_KEY_FILE")
    if listed == "plaintext":
        return RelaySecurity.insecure_plaintext()
    paths = [p.strip() for p in listed.split(",") if p.strip()]
    clients = frozenset(_key_file(Path(p), "PLAN_CLIENT_KEY_FILE") for p in paths)
    return RelaySecurity(CurveKeys(public, secret, allowed_client_public_keys=clients))


def _env(env: Mapping[str, str], name: str) -> str:
    """A required variable's text."""
    value = _value(env, name)
    if not value:
        raise ConfigError(f"{ENV_PREFIX}{name}: required (see docs/deployment.md)")
    return value


def _value(env: Mapping[str, str], name: str) -> str | None:
    """The variable's text, else the default ``deploy/env.py`` documents for it (or None)."""
    var = ENV_PREFIX + name
    return env.get(var, "").strip() or next(v.default for v in ENV_VARS if v.name == var)


def _number(env: Mapping[str, str], name: str, kind: Callable[[str], T]) -> T:
    text = _value(env, name)
    try:
        return kind(text or "")
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name}: not a number: {text!r}") from exc


def _key(env: Mapping[str, str], name: str) -> bytes:
    return _key_file(Path(_env(env, name)), name)


def _key_file(path: Path, name: str) -> bytes:
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name}: cannot read {path}: {exc}") from exc
    if len(key) != Z85_KEY_LEN:
        raise ConfigError(
            f"{ENV_PREFIX}{name}: {path} holds {len(key)} bytes, not a "
            f"{Z85_KEY_LEN}-character Z85 Curve key (docker/gen_curve_keys.py writes them)"
        )
    return key

"""Configuration loading: the only module that reads files or the environment.

Everything below the CLI edge receives frozen dataclasses. This module turns files, presets and
``TRTLLM_PRFAAS_*`` environment variables into them, and raises ConfigError naming the file and
field when something is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.transport import CurveKeys, RelaySecurity, generate_keypair

__all__ = [
    "MODEL_PRESETS",
    "CurveKeyFile",
    "load_relay_security",
    "load_yaml",
    "model_preset",
    "write_testbed_keys",
]

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


def write_testbed_keys(directory: Path) -> tuple[Path, Path]:
    """Fresh Curve keys for a testbed: (receiver key file, sender key file), mode 0600."""
    server_public, server_secret = generate_keypair()
    client_public, client_secret = generate_keypair()
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
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / "relay-receiver.json", directory / "relay-sender.json")
    for path, content in zip(paths, (receiver, sender), strict=True):
        path.write_text(json.dumps(content))
        path.chmod(0o600)
    return paths

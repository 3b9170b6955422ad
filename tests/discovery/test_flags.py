"""The membership flags of ``prfaas router`` and ``prfaas worker``: parsed, merged with a
``--config`` file, refused with a message naming what was wrong; the advertised control
endpoint of a worker bound to a wildcard."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

import pytest

from trtllm_prfaas import cli
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.router import command as router_command
from trtllm_prfaas.worker import command as worker_command
from trtllm_prfaas.worker.registration import advertised_control


def router_settings(*flags: str) -> router_command.RouterSettings:
    parser = argparse.ArgumentParser()
    router_command.add_arguments("router", parser)
    return router_command.load_settings(parser.parse_args(["--plaintext", *flags]))


def test_a_discovering_router_needs_no_worker_list() -> None:
    settings = router_settings("--discovery", "etcd://127.0.0.1:2379,10.0.0.2:2379")
    assert settings.discovery is not None and settings.workers == ()
    assert settings.discovery.endpoints == (("127.0.0.1", 2379), ("10.0.0.2", 2379))
    assert settings.namespace == "prfaas"
    with pytest.raises(ConfigError, match="or --discovery etcd://HOST:PORT"):
        router_settings()  # neither a list nor discovery


def test_discovery_and_namespace_from_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("discovery: etcd://etcd:2379\nnamespace: prod\n")
    settings = router_settings("--config", str(path))
    assert settings.discovery is not None and settings.discovery.url == "etcd://etcd:2379"
    assert settings.namespace == "prod"
    assert router_settings("--config", str(path), "--namespace", "canary").namespace == "canary"
    path.write_text("discovery: http://etcd:2379\n")
    with pytest.raises(ConfigError, match=r"router config .*discovery 'http://etcd:2379'"):
        router_settings("--config", str(path))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--discovery", "etcd://h"], "--discovery 'etcd://h': 'h' is not HOST:PORT"),
        (["--namespace", "../x"], "--namespace '../x': use letters"),
    ],
)
def test_bad_worker_flags_exit_2_naming_the_flag(
    flags: list[str], message: str, capsys: Any
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["worker", "--role", "decode", "--cluster", "c", *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_worker_flags_parse() -> None:
    parser = argparse.ArgumentParser()
    worker_command.add_arguments("worker", parser)
    flags = ["--discovery", "etcd://e:2379", "--namespace", "ns", "--lease-ttl-s", "3"]
    args = parser.parse_args(["--role", "decode", "--cluster", "c", *flags])
    assert args.discovery.url == "etcd://e:2379" and args.namespace == "ns"
    assert args.lease_ttl_s == 3.0 and args.advertise_control == ""


def test_advertised_control_replaces_a_wildcard_host() -> None:
    assert advertised_control("tcp://127.0.0.1:7000") == "tcp://127.0.0.1:7000"
    assert advertised_control("tcp://0.0.0.0:7000", "tcp://decode-a:7000") == (
        "tcp://decode-a:7000"
    )
    host = socket.gethostbyname(socket.gethostname())
    assert advertised_control("tcp://0.0.0.0:7000") == f"tcp://{host}:7000"
    with pytest.raises(ConfigError, match="--advertise-control 'decode-a:7000'"):
        advertised_control("tcp://0.0.0.0:7000", "decode-a:7000")

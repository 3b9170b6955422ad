"""Every `command:` of both compose files is parsed by the real `prfaas` argument parsers.

The parsers are built as ``cli.main`` builds them (the top-level parser, then the subcommand's
``add_arguments``); an unknown flag or a bad value fails the test naming the service. Past the
parser, each command's configuration is built as its process builds it (``build_config`` for a
worker, ``load_settings`` for a router), with the key files the compose files mount replaced by
files of the same layout written here, so a flag combination the process would refuse at start
is refused here too. ``${VAR:-default}`` is read as its default, as compose does with VAR unset.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DOCKER_DIR
from trtllm_prfaas import cli
from trtllm_prfaas.config import write_testbed_keyset

COMPOSE_FILES = sorted(DOCKER_DIR.glob("compose*.yml"))
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")
# Commands that are not `prfaas`: the service, its executable and how it is checked.
OTHER_COMMANDS = {"wan-link": "sh", "etcd": "etcd", "curve-keys": "python"}


def interpolate(value: Any) -> Any:
    """``${VAR:-default}`` -> default (empty without one), recursively: compose with VAR unset."""
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def services(path: Path) -> dict[str, dict[str, Any]]:
    return dict(interpolate(yaml.safe_load(path.read_text()))["services"])


def prfaas_commands(path: Path) -> dict[str, list[str]]:
    """Service -> argv of each service whose entrypoint is the image's `prfaas`."""
    return {
        name: [str(arg) for arg in service["command"]]
        for name, service in services(path).items()
        if "command" in service and "entrypoint" not in service and name not in OTHER_COMMANDS
    }


def parse(argv: list[str], what: str) -> tuple[str, argparse.Namespace]:
    """(subcommand, its namespace) as ``cli.main`` parses argv; fails naming ``what``."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            top, rest = cli._build_parser().parse_known_args(argv)
            assert top.command in cli.COMMANDS, f"{what}: {argv[0]!r} is no prfaas command"
            module = importlib.import_module(cli.COMMANDS[top.command][0])
            parser = argparse.ArgumentParser(prog=f"prfaas {top.command}")
            module.add_arguments(top.command, parser)
            args = parser.parse_args(rest)
    except SystemExit as exc:
        pytest.fail(f"{what}: prfaas refuses {argv}: {stderr.getvalue().strip()} ({exc.code})")
    return str(top.command), args


@pytest.fixture(scope="module")
def key_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Container key directory -> a host directory of the same layout."""
    testbed = tmp_path_factory.mktemp("keys")
    write_testbed_keyset(testbed)  # the CPU file's curve-keys service writes these
    curve = tmp_path_factory.mktemp("curve")
    subprocess.run(  # the GPU file's curve-keys service runs this script
        [sys.executable, str(DOCKER_DIR / "gen_curve_keys.py"), str(curve)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return {"/etc/prfaas/keys": testbed, "/etc/prfaas/curve": curve}


def on_host(argv: list[str], key_dirs: dict[str, Path]) -> list[str]:
    out = []
    for arg in argv:
        for inside, outside in key_dirs.items():
            if arg == inside or arg.startswith(inside + "/"):
                arg = str(outside) + arg.removeprefix(inside)
        out.append(arg)
    return out


def every_command() -> Iterator[Any]:
    for path in COMPOSE_FILES:
        for name in prfaas_commands(path):
            yield pytest.param(path, name, id=f"{path.name}:{name}")


@pytest.mark.parametrize(("path", "name"), list(every_command()))
def test_command_parses_and_configures(path: Path, name: str, key_dirs: dict[str, Path]) -> None:
    argv = prfaas_commands(path)[name]
    command, args = parse(on_host(argv, key_dirs), f"{path.name} service {name}")
    module = importlib.import_module(cli.COMMANDS[command][0])
    if command == "worker":
        module.build_config(args)  # files read, flags cross-checked: ConfigError fails the test
    elif command == "router":
        module.load_settings(args)
    else:
        pytest.fail(f"{path.name} service {name}: no check for `prfaas {command}` yet")


def test_both_files_run_workers_and_a_router() -> None:
    for path in COMPOSE_FILES:
        commands = [argv[0] for argv in prfaas_commands(path).values()]
        assert commands.count("router") == 1, path.name
        assert commands.count("worker") >= 2, path.name


def test_an_unknown_flag_is_caught() -> None:
    """The check itself: a flag `prfaas worker` does not have fails, naming it."""
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --no-such-flag"):
        parse(["worker", "--role", "decode", "--cluster", "c", "--no-such-flag"], "probe")


def test_other_commands_are_the_shaper_etcd_and_the_key_writer() -> None:
    for path in COMPOSE_FILES:
        for name, service in services(path).items():
            if name in prfaas_commands(path):
                continue
            entry = service.get("entrypoint") or service.get("command")
            if entry is None:  # the image's own CMD: only Triton (tritonserver under mpirun)
                assert service["image"].startswith("prfaas-triton:"), (path.name, name)
                continue
            assert entry[0] == OTHER_COMMANDS[name], (path.name, name)
            if name == "curve-keys":
                script = Path(entry[1]).name
                assert any(f"./{script}:" in v for v in service["volumes"]), (path.name, name)


def test_etcd_flags_are_etcds() -> None:
    """The CPU file's etcd command uses flags Debian's etcd-server has (its --help)."""
    etcd = shutil.which("etcd")
    if etcd is None:
        pytest.skip("no etcd binary: make etcd-tool installs Debian's etcd-server")
    help_text = subprocess.run(
        [etcd, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    known = set(re.findall(r"--[a-z0-9-]+", help_text.stdout + help_text.stderr))
    argv = services(DOCKER_DIR / "compose.cpu.yml")["etcd"]["command"]
    flags = {arg for arg in argv[1:] if arg.startswith("--")}
    assert flags and flags <= known, flags - known


# ---------------------------------------------------------------------------- topology
# (moved from tests/router/test_router_command.py, which checked the static list only)
@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_router_reaches_every_worker_service_as_it_runs(
    path: Path, key_dirs: dict[str, Path]
) -> None:
    """The router's workers are the file's worker services, by its static list (each entry names
    a service, its control port, cluster and role) or through etcd (every worker registers in
    the router's etcd and namespace, advertising its own service name and control port)."""
    from trtllm_prfaas.router import command

    all_services = services(path)
    commands = prfaas_commands(path)
    argv = commands["router"]
    settings = command.load_settings(parse(on_host(argv, key_dirs), "router")[1])
    running = {name for name, cmd in commands.items() if cmd[0] == "worker"}
    if settings.discovery is None:
        for worker in settings.workers:
            worker_argv = commands[worker.host]
            assert flag(worker_argv, "--control") == f"tcp://0.0.0.0:{worker.port}", worker
            assert (flag(worker_argv, "--cluster"), flag(worker_argv, "--role")) == (
                worker.cluster,
                worker.role,
            )
        assert {w.host for w in settings.workers} == running
    else:
        assert not settings.workers, "one membership: etcd"
        store = flag(argv, "--discovery")
        for name in running:
            worker_argv = commands[name]
            assert flag(worker_argv, "--discovery") == store, name
            assert flag(worker_argv, "--namespace") == flag(argv, "--namespace"), name
            port = flag(worker_argv, "--control").rsplit(":", 1)[1]
            assert flag(worker_argv, "--advertise-control") == f"tcp://{name}:{port}", name
        host, port = store.removeprefix("etcd://").split(":")
        etcd = all_services[host]["command"]
        assert f"http://0.0.0.0:{port}" in etcd[etcd.index("--listen-client-urls") + 1]
    tokenizers = {flag(commands[name], "--tokenizer", "") for name in running}
    assert tokenizers == {settings.router.tokenizer_dir}  # the router speaks its workers' tokens
    ports = all_services["router"]["ports"]
    assert any(p.endswith(f":{settings.listen[1]}") for p in ports), ports
    grace_s = settings.frontdoor.shutdown_grace_s
    assert seconds(all_services["router"]["stop_grace_period"]) > grace_s  # no SIGKILL mid-drain


def test_decode_relay_is_reachable_from_both_datacenters() -> None:
    """A decode worker bound on a wildcard advertises its service name, which both the local PD
    network and the WAN resolve (to its address on each), never the bound 0.0.0.0."""
    path = DOCKER_DIR / "compose.cpu.yml"
    all_services = services(path)
    for name, argv in prfaas_commands(path).items():
        if argv[0] == "worker" and flag(argv, "--role") == "decode":
            assert flag(argv, "--relay").startswith("tcp://0.0.0.0:"), name
            port = flag(argv, "--relay").rsplit(":", 1)[1]
            assert flag(argv, "--advertise-relay") == f"tcp://{name}:{port}", name
            assert set(all_services[name]["networks"]) == {"dc-local", "wan"}, name


def flag(argv: list[str], name: str, absent: str | None = None) -> str:
    if name not in argv and absent is not None:
        return absent
    return str(argv[argv.index(name) + 1])


def seconds(text: str) -> float:
    assert text.endswith("s"), text
    return float(text[:-1])


def test_cpu_workers_run_the_model_the_compose_run_checks_against() -> None:
    """`make compose-test` compares the testbed's tokens with one engine of this preset."""
    from tests.deploy.test_compose_run import PRESET

    for name, argv in prfaas_commands(DOCKER_DIR / "compose.cpu.yml").items():
        if argv[0] == "worker":
            assert flag(argv, "--model-preset", "default") == PRESET, name

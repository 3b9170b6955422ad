"""``prfaas router`` as a real process in front of three real reference workers (PrfaaS prefill,
PD-P, PD-D): its ready line, tokens through stock ``tritonclient.grpc`` equal to a single-engine
run (remote and local), SIGTERM mid-request (the request completes, new ones are refused, exit
0), a worker that never answers or answers with another role (exit 1, within the deadline), bad
flags (exit 2) and bad ``--config`` keys (exit 1, the key named), and every compose file's
``router`` command parsed by the command's real parser against the compose file's own workers.
The workers' control plane is Curve (``write_testbed_keyset``): the router serves with its key
file (``--curve-keys``); a router whose key no worker allows gets no answer and fails the start.

Every process started here is stopped by PID (SIGTERM, then SIGKILL) even when a test fails.
"""

from __future__ import annotations

import argparse
import json
import queue
import selectors
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.harness import WorkerProcess, spawn_worker, wait_for
from tests.router.builders import (  # noqa: F401 (ask, prompt, reference: other tests import them here)
    MODEL,
    SEED,
    TEMPERATURE,
    ask,
    ids_of,
    is_final,
    llm_inputs,
    prompt,
    reference,
    stream,
)
from trtllm_prfaas import cli
from trtllm_prfaas.config import (
    TestbedKeys,
    load_control_security,
    write_testbed_keyset,
)
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.router import command
from trtllm_prfaas.testbed.processes import launch_prfaas, stop_process
from trtllm_prfaas.transport import generate_keypair
from trtllm_prfaas.worker.protocol import LoadReport

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--model-preset", "tiny", "--num-blocks", "512", "--chunk-size", "64"]
THRESHOLD = 100
NEW_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a channel that shares no connection


# ---------------------------------------------------------------------------- processes
class RouterProcess:
    """A ``prfaas router`` child: ``ready`` is its JSON ready line; ``stop()`` by PID."""

    def __init__(self, *args: str) -> None:
        self.process = launch_prfaas("router", args, stderr=subprocess.PIPE, cwd=ROOT)
        self.ready: dict[str, Any] = {}

    def wait_ready(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """The ready line; raises with the process's stderr if it exits or stays silent."""
        stdout = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline and self.process.poll() is None:
                if selector.select(timeout=0.2):
                    line = stdout.readline()
                    if line.startswith("{") and json.loads(line).get("event") == "ready":
                        self.ready = json.loads(line)
                        return self.ready
        self.stop()
        raise AssertionError(f"router not ready (exit {self.process.returncode}): {self.stderr()}")

    def exit_code(self, timeout_s: float) -> int:
        """Wait for the process to end by itself within ``timeout_s``."""
        return self.process.wait(timeout_s)

    def stderr(self) -> str:
        stderr = self.process.stderr
        return stderr.read() if stderr is not None and self.process.poll() is not None else ""

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code. Idempotent."""
        return stop_process(self.process, timeout_s)

    def __enter__(self) -> RouterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> TestbedKeys:
    return write_testbed_keyset(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def workers(keys: TestbedKeys) -> Iterator[dict[str, WorkerProcess]]:
    procs: dict[str, WorkerProcess] = {}
    control = load_control_security(keys.router, False, "router")
    curve = ["--curve-keys", str(keys.both)]
    try:
        for name in ("dc-local/decode", "dc-local/prefill", "dc-remote/prefill"):
            cluster, role = name.split("/")
            procs[name] = spawn_worker(role, cluster, *COMMON, *curve, control_security=control)
        procs["dc-local/decode"].ready["keys"] = str(keys.router)  # the router's key file
        yield procs
    finally:
        codes = {name: proc.stop() for name, proc in procs.items()}
        assert all(code == 0 for code in codes.values()), codes


def worker_flags(procs: dict[str, WorkerProcess]) -> list[str]:
    """``--worker CLUSTER/ROLE=HOST:PORT`` for each worker (control is tcp://HOST:PORT)."""
    flags: list[str] = []
    for name, proc in procs.items():
        flags += ["--worker", f"{name}={proc.control.removeprefix('tcp://')}"]
    return flags


def router_args(procs: dict[str, WorkerProcess], *extra: str) -> list[str]:
    keys = ["--curve-keys", procs["dc-local/decode"].ready["keys"]]
    return ["--listen", "127.0.0.1:0", "--threshold-tokens", str(THRESHOLD), "--fixed-threshold",
            *keys, *worker_flags(procs), *extra]  # fmt: skip


def assert_workers_idle(procs: dict[str, WorkerProcess]) -> None:
    """Leak check: every worker ends with nothing running and every KV block free."""
    for name, proc in procs.items():
        with proc.client() as client:
            info = client.ping(10)
            report = wait_for(client, LoadReport, lambda m: m.num_running == 0, timeout_s=20)
            assert report.num_free_blocks == info.num_blocks, name


def free_port() -> int:
    """A loopback port nothing listens on (bound, read back, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------- tokens
def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


# ---------------------------------------------------------------------------- serving
def test_serves_remote_and_local_requests_with_single_engine_tokens(workers: Any) -> None:
    with RouterProcess(*router_args(workers, "--metrics-listen", "127.0.0.1:0")) as router:
        ready = router.wait_ready()
        assert ready["listen"].startswith("127.0.0.1:") and not ready["listen"].endswith(":0")
        assert sorted(ready["workers"]) == [
            "dc-local-decode-0", "dc-local-prefill-0", "dc-remote-prefill-0"]  # fmt: skip
        for length in (40, 600):  # local (l <= t), remote (l > t)
            assert ask(ready["listen"], prompt(length), 8) == reference(prompt(length), 8), length
        text = scrape(ready["metrics"])
        assert 'route="remote"' in text and 'route="local"' in text, text
        assert router.stop() == 0
    assert_workers_idle(workers)


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(workers: Any) -> None:
    max_tokens, tokens = 150, prompt(300)
    with RouterProcess(*router_args(workers, "--grace-s", "60")) as router:
        address = router.wait_ready()["listen"]
        client = grpcclient.InferenceServerClient(address)
        received: queue.Queue[tuple[float, Any]] = queue.Queue()
        client.start_stream(lambda result, error: received.put((time.monotonic(), error or result)))
        try:
            inputs = llm_inputs(None, max_tokens, TEMPERATURE, SEED, True, tokens)
            client.async_stream_infer(MODEL, inputs, request_id="in-flight")
            responses = [received.get(timeout=60)[1]]  # the first token: the request is in flight
            router.process.send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()
            refused = _new_request_refused(address)
            while hasattr(responses[-1], "get_response") and not is_final(responses[-1]):
                final_at, response = received.get(timeout=60)
                responses.append(response)
        finally:
            client.stop_stream()
            client.close()
        assert all(hasattr(r, "get_response") for r in responses), responses[-1]
        assert final_at > signalled_at  # it was still streaming when the signal came
        # gRPC core ends a call that reaches a stopping server CANCELLED (UNAVAILABLE once its
        # port is closed); either way the request was not served.
        assert "CANCELLED" in refused or "UNAVAILABLE" in refused, refused or "still accepted"
        assert router.exit_code(timeout_s=30) == 0, router.stderr()  # well before the 60 s grace
    assert [t for r in responses for t in ids_of(r)] == reference(tokens, max_tokens)
    assert_workers_idle(workers)


def _new_request_refused(address: str, timeout_s: float = 10.0) -> str:
    """The error a new request on a new connection gets once the router drains (it may still
    be accepted for the few milliseconds before the router handles the signal); '' if none."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # its own subchannel pool: a new connection, not the streaming client's (gRPC shares
        # a connection between channels to the same target by default)
        client = grpcclient.InferenceServerClient(address, channel_args=NEW_CONNECTION)
        try:
            client.infer(MODEL, llm_inputs(None, 1, None, None, None, prompt(5)), client_timeout=5)
        except InferenceServerException as exc:
            return str(exc)
        finally:
            client.close()
        time.sleep(0.05)
    return ""


# ---------------------------------------------------------------------------- start failures
def test_a_router_whose_key_no_worker_allows_fails_the_start(workers: Any, tmp_path: Path) -> None:
    """Right worker key, own key pair not in any worker's allow-list: the workers refuse the
    handshake, nothing answers the ping, the start fails (exit 1) naming the first worker."""
    public, secret = generate_keypair()
    router_file = json.loads(Path(workers["dc-local/decode"].ready["keys"]).read_text())
    router_file.update(client_public=public.decode(), client_secret=secret.decode())
    stranger = tmp_path / "stranger.json"
    stranger.write_text(json.dumps(router_file))
    args = router_args(workers, "--connect-timeout-s", "2")
    args[args.index("--curve-keys") + 1] = str(stranger)
    with RouterProcess(*args) as router:
        code, stderr = router.exit_code(timeout_s=60), router.stderr()
    assert code == 1, stderr
    assert "did not answer" in stderr, stderr


def test_a_router_without_keys_or_plaintext_is_refused(workers: Any, capsys: Any) -> None:
    args = router_args(workers)
    del args[args.index("--curve-keys") : args.index("--curve-keys") + 2]
    assert cli.main(["router", *args]) == 1
    assert "--curve-keys FILE (encrypted) or --plaintext" in capsys.readouterr().err


def test_a_worker_that_never_answers_fails_the_start_within_the_deadline(workers: Any) -> None:
    silent = f"127.0.0.1:{free_port()}"
    args = router_args(workers, "--worker", f"dc-local/decode={silent}", "--connect-timeout-s", "2")
    started = time.monotonic()
    with RouterProcess(*args) as router:
        code = router.exit_code(timeout_s=60)
        elapsed, stderr = time.monotonic() - started, router.stderr()
    assert code == 1, stderr
    assert f"dc-local-decode-1 at tcp://{silent} did not answer" in stderr, stderr
    assert elapsed < 30, elapsed  # the deadline, plus the interpreter's start-up


def test_sigterm_while_waiting_for_a_worker_ends_the_start_at_once(workers: Any) -> None:
    silent = f"127.0.0.1:{free_port()}"
    args = router_args(
        workers, "--worker", f"dc-local/decode={silent}", "--connect-timeout-s", "60"
    )
    with RouterProcess(*args) as router:
        time.sleep(3.0)  # importing and pinging the live workers; still waiting for the silent one
        assert router.process.poll() is None
        router.process.send_signal(signal.SIGTERM)
        assert router.exit_code(timeout_s=10) == -signal.SIGTERM  # nothing served: no drain owed


def test_a_worker_listed_with_the_wrong_role_fails_the_start(workers: Any) -> None:
    decode = workers["dc-local/decode"].control.removeprefix("tcp://")
    prefill = workers["dc-local/prefill"].control.removeprefix("tcp://")
    args = ["--listen", "127.0.0.1:0", "--worker", f"dc-local/prefill={decode}",
            "--worker", f"dc-local/decode={prefill}",
            "--curve-keys", workers["dc-local/decode"].ready["keys"]]  # fmt: skip
    with RouterProcess(*args) as router:
        code, stderr = router.exit_code(timeout_s=60), router.stderr()
    assert code == 1, stderr
    assert f"dc-local/prefill={decode}: the worker there reports role 'decode'" in stderr, stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--worker", "dc-local-decode"], "expected CLUSTER/ROLE=HOST:PORT"),
        (["--worker", "dc-local/leader=h:1"], "role must be one of ['prefill', 'decode']"),
        (["--worker", "dc-local/decode=h:http"], "expected HOST:PORT"),
        (["--listen", "0.0.0.0:70000"], "port must be in 0..65535"),
        (["--listen", "::1:8001"], "expected HOST:PORT"),
        (["--grace-s", "-1"], "--grace-s: must be >= 0"),
        (["--connect-timeout-s", "0"], "--connect-timeout-s: must be > 0"),
        (["--discovery", "http://h:2379"], "--discovery 'http://h:2379': expected etcd://"),
        (["--discovery", "etcd://h:2379,h"], "'h' is not HOST:PORT"),
        (["--namespace", "a/b"], "--namespace 'a/b': use letters"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(flags: list[str], message: str, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["router", *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("threshold_tokens: 10\nthreshhold: 3\n", "unknown field `threshhold`"),
        ("threshold_tokens: many\n", "Expected `int | null`, got `str` - at `$.threshold_tokens`"),
        ("grace_s: -2\n", "Expected `float` >= 0.0 - at `$.grace_s`"),
        ("workers: [dc-local/decode=h]\n", "workers: 'dc-local/decode=h': address"),
        ("- a list\n", "top level must be a mapping"),
    ],
)
def test_bad_config_keys_exit_1_naming_the_key(
    content: str, message: str, tmp_path: Path, capsys: Any
) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(content)
    assert cli.main(["router", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("prfaas router: error:") and message in err, err


def test_config_file_values_and_flags_over_them(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "listen: 127.0.0.1:9001\nmetrics_listen: '[::1]:9002'\nthreshold_tokens: 2048\n"
        "link_gbps: 25\nprefill_timeout_s: 60\ngrace_s: 5\nprfaas_clusters: [far]\n"
        "tokenizer_dir: /models/hf\nworker_lost_s: 1.5\nplaintext: true\n"
        "workers: [far/prefill=p:7000, near/prefill=q:7000,\n"
        "          near/decode=d:7000, near/decode=e:7000]\n"
    )
    settings = command.load_settings(parse(["--config", str(path), "--threshold-tokens", "512"]))
    assert settings.listen == ("127.0.0.1", 9001) and settings.metrics_listen == ("[::1]", 9002)
    specs = {s.name: (s.endpoint, s.is_prfaas) for s in settings.router.workers}
    assert specs == {
        "far-prefill-0": ("tcp://p:7000", True),
        "near-prefill-0": ("tcp://q:7000", False),
        "near-decode-0": ("tcp://d:7000", False),
        "near-decode-1": ("tcp://e:7000", False),
    }
    router = settings.router
    assert (router.threshold_tokens, router.prefill_timeout_s) == (512, 60.0)  # flag wins
    assert (router.tokenizer_dir, router.worker_lost_s) == ("/models/hf", 1.5)
    assert router.control is not None and router.control.link_gbps == 25.0
    assert settings.frontdoor.shutdown_grace_s == 5.0
    assert router.control_security is not None and router.control_security.curve is None
    flagged = command.load_settings(parse(["--config", str(path), "--worker", "far/prefill=x:1",
                                           "--worker", "near/decode=y:2"]))  # fmt: skip
    assert [s.endpoint for s in flagged.router.workers] == ["tcp://x:1", "tcp://y:2"]


def test_prefix_routing_key_and_flags(tmp_path: Path) -> None:
    """``prefix_routing: false`` (or ``--no-prefix-routing``) routes cache-blind; a flag wins
    over the file; absent, the router routes by prefix."""
    workers = ["--plaintext", "--worker", "far/prefill=p:1", "--worker", "near/decode=d:1"]
    assert command.load_settings(parse(workers)).router.prefix_routing is True
    path = tmp_path / "router.yaml"
    path.write_text("prefix_routing: false\n")
    blind = command.load_settings(parse(["--config", str(path), *workers]))
    assert blind.router.prefix_routing is False
    over = command.load_settings(parse(["--config", str(path), "--prefix-routing", *workers]))
    assert over.router.prefix_routing is True
    flag = command.load_settings(parse(["--no-prefix-routing", *workers]))
    assert flag.router.prefix_routing is False
    path.write_text("prefix_routing: sometimes\n")
    with pytest.raises(ConfigError, match="prefix_routing"):
        command.load_settings(parse(["--config", str(path), *workers]))


def test_worker_lists_that_cannot_serve_are_refused() -> None:
    cases = {
        ("a/decode=h:1",): "at least one prefill worker",
        ("a/prefill=h:1",): "at least one decode worker",
        ("dc-remote/decode=h:1", "a/prefill=h:2"): "dc-remote is a PrfaaS cluster",
        ("a/decode=h:1", "a/prefill=h:1"): "workers listed twice: ['tcp://h:1']",
        (): "no workers",
    }
    for workers, message in cases.items():
        flags = [arg for w in workers for arg in ("--worker", w)]
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            command.load_settings(parse(flags))


def parse(argv: list[str]) -> argparse.Namespace:
    """The command's real parser, as ``cli.main`` builds it."""
    parser = argparse.ArgumentParser(prog="prfaas router")
    command.add_arguments("router", parser)
    return parser.parse_args(argv)

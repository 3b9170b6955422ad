"""The CPU compose testbed (docker/compose.cpu.yml), run for real: `make compose-test`.

Builds the images without a registry (scripts/compose_images.sh: a debootstrapped Debian base,
cached; the project's wheels from the build context), brings the testbed up under a project name
of its own, serves requests through the router's published port with stock tritonclient, and
tears it down (containers, networks, the key volume) whatever happens. The Docker engine is
started here (``dockerd --storage-driver vfs``) when none runs, and stopped by PID afterwards.

It runs only when PRFAAS_COMPOSE_TEST=1 (the make target sets it): a plain ``make test`` skips it.
Asked for but impossible here (not root, no Docker, no compose binary), it fails saying why.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.deploy.conftest import DOCKER_DIR, ROOT
from tests.router.builders import ask, prompt, reference
from trtllm_prfaas.config import model_preset
from trtllm_prfaas.testbed.processes import stop_process

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("PRFAAS_COMPOSE_TEST") != "1",
        reason="runs the Docker compose testbed: `make compose-test` (PRFAAS_COMPOSE_TEST=1)",
    ),
    pytest.mark.timeout(2700),  # a first build under vfs included (about 6 min under overlay2)
]

COMPOSE_FILE = DOCKER_DIR / "compose.cpu.yml"
BUILD_TIMEOUT_S = 1200.0
# Containers start, workers warm up and register, the router finds them: about 30 s under
# overlay2; under vfs creating each container copies its 1.35 GB image first.
UP_TIMEOUT_S = {"overlay2": 240.0, "vfs": 1200.0}
PRESET = "default"  # the compose workers' model: no --model-preset, the reference engine's own
LOCAL_LENGTH, REMOTE_LENGTH = 40, 1500  # the router's t is 1024 tokens (its default)


def run(*argv: str, timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run a command; its stdout, or a test failure with its output."""
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def compose_binary() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False,
                      timeout=20).returncode == 0:  # fmt: skip
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("no compose binary: apt-get install docker-compose (make compose-tool)")


def engine_driver() -> str:
    """The running engine's storage driver (overlay2, vfs, ...)."""
    return run("docker", "info", "--format", "{{.Driver}}", timeout_s=30).strip()


def engine_answers() -> bool:
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A Docker engine: the running one, or ``dockerd --storage-driver vfs`` started here (its
    image store, /var/lib/docker, outlives it: the base image stays cached) and stopped by PID."""
    if os.geteuid() != 0:
        pytest.fail("make compose-test needs root (debootstrap, dockerd, tc in containers)")
    if shutil.which("docker") is None or shutil.which("dockerd") is None:
        pytest.fail("make compose-test needs docker and dockerd: apt-get install docker.io")
    if engine_answers():
        yield
        return
    log_dir = tmp_path_factory.mktemp("dockerd")
    process = start_dockerd(storage_driver(), log_dir)
    try:
        yield
    finally:
        stop_process(process, timeout_s=30)


def storage_driver() -> str:
    """overlay2 where the kernel has overlayfs, else vfs; PRFAAS_DOCKER_STORAGE_DRIVER overrides.
    Under vfs every layer and every container is a full copy of its image (about 1.3 GB per
    service here): the testbed works, but its start takes minutes and disk grows by gigabytes."""
    chosen = os.environ.get("PRFAAS_DOCKER_STORAGE_DRIVER")
    if chosen:
        return chosen
    has_overlay = "overlay" in Path("/proc/filesystems").read_text().split()
    return "overlay2" if has_overlay else "vfs"


def start_dockerd(driver: str, log_dir: Path) -> subprocess.Popen[str]:
    """``dockerd --storage-driver DRIVER``, answering within 60 s; if it exits at once (overlay2
    refused by this kernel or file system), ``vfs``, which works everywhere."""
    log_path = log_dir / f"dockerd-{driver}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            ["dockerd", "--storage-driver", driver], stdout=log, stderr=subprocess.STDOUT, text=True
        )
    deadline = time.monotonic() + 60
    while not engine_answers():
        if process.poll() is not None and driver != "vfs":
            return start_dockerd("vfs", log_dir)
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process, timeout_s=30)
            pytest.fail(f"dockerd did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    return process


@dataclass
class Testbed:
    """One compose project of the CPU testbed; calling it runs a compose subcommand on it."""

    __test__ = False

    compose: list[str]
    project: str
    env: dict[str, str]
    grpc_address: str
    metrics_url: str
    figures: dict[str, float] = field(default_factory=dict)

    def __call__(self, *argv: str, timeout_s: float = 120) -> str:
        base = [*self.compose, "-p", self.project, "-f", str(COMPOSE_FILE)]
        return run(*base, *argv, timeout_s=timeout_s, env=self.env)

    def logs(self, tail: int) -> str:
        """The services' last log lines, or why they could not be read (never raises)."""
        base = [*self.compose, "-p", self.project, "-f", str(COMPOSE_FILE)]
        try:
            result = subprocess.run([*base, "logs", "--no-color", "--tail", str(tail)],
                                    capture_output=True, text=True, timeout=60, env=self.env,
                                    check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            return "(compose logs timed out)"
        return result.stdout + result.stderr

    def exited_services(self) -> list[str]:
        """Services with an exited container (the label filter reads the same for compose v1
        and v2, whose own ``ps --filter`` spell the state differently)."""
        project = f"label=com.docker.compose.project={self.project}"
        service = '{{.Label "com.docker.compose.service"}}'
        text = run("docker", "ps", "--all", "--filter", project, "--filter", "status=exited",
                   "--format", service, timeout_s=60)  # fmt: skip
        return text.split()

    def wan_sent_bytes(self) -> int:
        """Bytes the WAN's root qdisc sent (prefill-remote's egress), from `tc -s` in wan-link."""
        text = self("exec", "-T", "wan-link", "tc", "-s", "qdisc", "show", "dev", "eth0")
        sent = re.search(r"qdisc \S+ [0-9a-f]+: root .*?\n\s*Sent (\d+) bytes", text, re.S)
        assert sent is not None, text
        return int(sent.group(1))


@pytest.fixture(scope="module")
def testbed(docker_engine: None) -> Iterator[Testbed]:
    compose = compose_binary()
    started = time.monotonic()
    run(str(ROOT / "scripts" / "compose_images.sh"), timeout_s=BUILD_TIMEOUT_S)
    built_s = time.monotonic() - started
    grpc_port, metrics_port = free_port(), free_port()
    # COMPOSE_HTTP_TIMEOUT: under vfs, creating a container copies its image (minutes)
    ports = {"ROUTER_GRPC_PORT": str(grpc_port), "ROUTER_METRICS_PORT": str(metrics_port)}
    env = {**os.environ, **ports, "COMPOSE_HTTP_TIMEOUT": "600"}
    project = f"prfaas-ct-{uuid.uuid4().hex[:8]}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    bed = Testbed(compose, project, env, f"127.0.0.1:{grpc_port}", metrics_url)
    bed.figures["build_s"] = built_s
    try:
        started = time.monotonic()
        up_timeout_s = UP_TIMEOUT_S.get(engine_driver(), max(UP_TIMEOUT_S.values()))
        bed("up", "-d", timeout_s=up_timeout_s)
        wait_until_serving(bed, deadline=time.monotonic() + up_timeout_s)
        bed.figures["up_s"] = time.monotonic() - started
        yield bed
    except BaseException:
        print(bed.logs(tail=60))
        raise
    finally:
        started = time.monotonic()
        bed("down", "--volumes", "--remove-orphans", "--timeout", "40", timeout_s=180)
        bed.figures["down_s"] = time.monotonic() - started
        print(f"compose testbed: { {k: round(v, 1) for k, v in bed.figures.items()} }")


def wait_until_serving(bed: Testbed, deadline: float) -> None:
    """Until the router answers is_server_ready and knows every worker, as registered in etcd
    (``prfaas_discovery_workers``); fails early, with the logs, if a container exited."""
    while time.monotonic() < deadline:
        exited = bed.exited_services()
        if set(exited) - {"curve-keys"}:
            pytest.fail(f"containers exited: {exited}\n{bed.logs(tail=40)}")
        if (
            router_ready(bed.grpc_address)
            and metric(bed.metrics_url, "prfaas_discovery_workers") == 3
        ):
            return
        time.sleep(1)
    pytest.fail(f"router not serving or not knowing 3 workers in time\n{bed.logs(tail=60)}")


def router_ready(address: str) -> bool:
    client = grpcclient.InferenceServerClient(address)
    try:
        return bool(client.is_server_ready(client_timeout=2))
    except InferenceServerException:  # not listening yet
        return False
    finally:
        client.close()


def metric(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of a router metric's samples with these labels (0 when absent or unreachable)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:  # the metrics server is not up yet
        return 0.0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


# ---------------------------------------------------------------------------- the run
def test_local_and_remote_requests_give_single_engine_tokens(testbed: Testbed) -> None:
    started = time.monotonic()
    local = prompt(LOCAL_LENGTH)
    assert ask(testbed.grpc_address, local, 8, timeout_s=120.0) == reference(local, 8, PRESET)
    assert metric(testbed.metrics_url, "prfaas_requests_total", route="local") >= 1

    remote = prompt(REMOTE_LENGTH)
    sent_before = testbed.wan_sent_bytes()
    assert ask(testbed.grpc_address, remote, 8, timeout_s=120.0) == reference(remote, 8, PRESET)
    assert metric(testbed.metrics_url, "prfaas_requests_total", route="remote") >= 1
    relayed = testbed.wan_sent_bytes() - sent_before
    kv_bytes = model_preset(PRESET).kv_spec.s_kv(REMOTE_LENGTH - 1)  # all but the last token
    testbed.figures.update(wan_sent_bytes=relayed, kv_bytes=kv_bytes)
    assert relayed >= kv_bytes, (relayed, kv_bytes)  # the KV crossed the shaped WAN
    testbed.figures["requests_s"] = time.monotonic() - started

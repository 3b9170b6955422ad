"""docker/: every compose file validates with a compose binary; the topology is what docs say.

Validation needs `docker compose` (the plugin) or Debian's `docker-compose`; neither needs a
running Docker engine for `config`. Without either, the validation test skips and says so (CI
gets one with `apt-get install -y docker-compose`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DOCKER_DIR, ROOT

COMPOSE_FILES = sorted(DOCKER_DIR.glob("compose*.yml"))


def compose_command() -> list[str] | None:
    """`docker compose` when the plugin works, else `docker-compose`, else None."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=20, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_a_gpu_and_a_cpu_testbed() -> None:
    assert {p.name for p in COMPOSE_FILES} == {"compose.gpu.yml", "compose.cpu.yml"}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_validates(path: Path) -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no compose binary: install Debian's docker-compose or the compose plugin")
    result = subprocess.run(
        [*command, "-f", str(path), "config", "-q"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_two_datacenters_joined_only_by_a_shaped_wan(path: Path) -> None:
    services = load(path)["services"]
    shaper = services["wan-link"]
    assert "NET_ADMIN" in shaper["cap_add"]
    assert shaper["network_mode"].startswith("service:")
    remote = services[shaper["network_mode"].removeprefix("service:")]
    assert remote["networks"] == ["wan"]  # one interface: all its egress is shaped
    script = (DOCKER_DIR / "wan-shaper.sh").read_text()
    assert "tbf rate" in script and "tc qdisc" in script
    assert any("dc-local" in s.get("networks", []) for s in services.values())


def test_gpu_testbed_runs_triton_with_both_rendered_repositories() -> None:
    services = load(DOCKER_DIR / "compose.gpu.yml")["services"]
    for role in ("prefill", "decode"):
        triton = services[f"triton-{role}"]
        assert triton["environment"]["TRTLLM_PRFAAS_ROLE"] == role
        env_file = (DOCKER_DIR / triton["env_file"]).resolve()
        assert env_file == ROOT / f"plugins/triton/model_repository/{role}/tensorrt_llm/prfaas.env"
        assert triton["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    dockerfile = (DOCKER_DIR / "triton.Dockerfile").read_text()
    assert "-trtllm-python-py3" in dockerfile
    assert "--no-deps" in dockerfile  # the image's CUDA torch and tensorrt_llm stay untouched


def test_cpu_testbed_runs_reference_workers_in_both_datacenters() -> None:
    services = load(DOCKER_DIR / "compose.cpu.yml")["services"]
    commands = [s.get("command") or [None] for s in services.values()]
    workers = [c for c in commands if c[0] == "worker"]
    roles = {(c[c.index("--role") + 1], c[c.index("--cluster") + 1]) for c in workers}
    assert roles == {("prefill", "dc-remote"), ("prefill", "dc-local"), ("decode", "dc-local")}
    assert all(c[c.index("--engine") + 1] == "reference" for c in workers)
    assert services["router"]["command"][0] == "router"
    assert services["etcd"]["command"][0] == "etcd"


def test_cpu_image_needs_no_registry_and_no_index() -> None:
    """The CPU image starts from the debootstrapped base (no registry) and installs the project
    and its pinned CPU torch from the build context's wheelhouse (no PyPI)."""
    dockerfile = (DOCKER_DIR / "cpu.Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert froms and all(f == "${BASE_IMAGE}" for f in froms), froms
    assert "ARG BASE_IMAGE=prfaas-base:bookworm" in dockerfile
    assert "pip install --no-index" in dockerfile and "COPY build/wheelhouse" in dockerfile
    assert "torch.__version__ == '2.13.0+cpu'" in dockerfile
    script = (ROOT / "scripts" / "compose_images.sh").read_text()
    assert "debootstrap --variant=minbase" in script and "docker import" in script
    images = {s.get("image") for s in load(DOCKER_DIR / "compose.cpu.yml")["services"].values()}
    assert images == {"prfaas-cpu:${PRFAAS_TAG:-latest}",
                      "${PRFAAS_BASE_IMAGE:-prfaas-base:bookworm}"}  # fmt: skip
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") :].count("!build/wheelhouse") == 1  # the context is small


def test_gpu_testbed_workers_reach_their_tritons_plan_servers() -> None:
    """Each worker posts plans where its Triton's connector binds them, for every rank, signed
    with the key pair the rendered env file's plan server accepts, and tokenizes with the served
    model's directory."""
    services = load(DOCKER_DIR / "compose.gpu.yml")["services"]
    for role in ("prefill", "decode"):
        command = services[f"worker-{role}"]["command"]
        flags = dict(zip(command[1::2], command[2::2], strict=False))
        model_dir = ROOT / f"plugins/triton/model_repository/{role}/tensorrt_llm"
        env = dict(
            line.split("=", 1)
            for line in (model_dir / "prfaas.env").read_text().splitlines()
            if line and not line.startswith("#")
        )
        model = yaml.safe_load((model_dir / "1" / "model.yaml").read_text())
        plan_port = env["TRTLLM_PRFAAS_PLAN_BIND"].rsplit(":", 1)[1]
        assert flags["--triton-plan-endpoint"] == f"tcp://triton-{role}:{plan_port}"
        assert int(flags["--triton-tp-size"]) == model["tensor_parallel_size"]
        assert flags["--tokenizer"] == model["model"]
        key_dir = flags["--triton-plan-keys"]
        assert env["TRTLLM_PRFAAS_PLAN_CLIENT_KEY_FILE"] == f"{key_dir}/worker.public"
        mounts = services[f"worker-{role}"]["volumes"]
        assert any(m.endswith(f":{key_dir}:ro") for m in mounts)
        assert any(m.endswith(f":{model['model']}:ro") for m in mounts)


def test_compose_defaults_of_relay_variables_are_deploy_envs_defaults() -> None:
    from trtllm_prfaas.deploy.env import ENV_VARS

    defaults = {var.name: var.default for var in ENV_VARS}
    pattern = re.compile(r"\$\{(TRTLLM_PRFAAS_[A-Z0-9_]+):-([^}]*)\}")
    found = 0
    for path in COMPOSE_FILES:
        for name, value in pattern.findall(path.read_text()):
            if value:  # an empty default leaves the variable unset (the connector's default)
                assert value == defaults[name], (path.name, name)
                found += 1
    assert found >= 1

"""The GPU check's CPU-side parts: arguments, the check list and line format, the skip logic
without a GPU or TensorRT-LLM, the rendered repositories and environments it would start, the
worker flags (parsed by the real ``prfaas worker`` parser), the runner's deadline and cleanup,
and the dry run. Nothing here needs a GPU; no test starts a server."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import ROOT
from tests.fakes import tokenizer as fake_tokenizer
from tests.fakes.llmapi_triton import FakeLlmapiTriton
from trtllm_prfaas.config import connector_config_from_env
from trtllm_prfaas.deploy import gpu_check, gpu_steps
from trtllm_prfaas.deploy.contract import parse_model_config
from trtllm_prfaas.deploy.env import DeployRole
from trtllm_prfaas.deploy.gpu_check import (
    CHECKS,
    Check,
    CheckResult,
    Environment,
    Session,
    Status,
    parse_args,
    skip_reason,
)
from trtllm_prfaas.deploy.gpu_serving import (
    RelayCounts,
    Serving,
    generate_relayed,
    stream_text,
    warm_prefix_prompts,
    worker_args,
)
from trtllm_prfaas.deploy.gpu_stack import Stack, StackLayout, render
from trtllm_prfaas.errors import EngineError
from trtllm_prfaas.worker import command as worker_command

LINE = re.compile(r"^(PASS|FAIL|SKIP) [a-z0-9_]+: \S.*$")
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
NO_GPU = Environment(None, None, 0, False, False, False)
FULL = Environment("1.2.1", "26.07", 2, True, True, True)


@pytest.fixture
def llmapi_dir(tmp_path: Path) -> Path:
    """Stand-ins for NVIDIA's model.py/helpers.py (the image has the real ones)."""
    directory = tmp_path / "llmapi"
    directory.mkdir()
    for name in ("model.py", "helpers.py"):
        (directory / name).write_text("# NVIDIA's llmapi file stands here\n")
    return directory


def config_for(tmp_path: Path, llmapi_dir: Path, *extra: str) -> gpu_check.GpuCheckConfig:
    return parse_args([
        "--model", str(tmp_path / "model"), "--workdir", str(tmp_path / "work"),
        "--repo-root", str(ROOT), "--llmapi-dir", str(llmapi_dir), *extra,
    ])  # fmt: skip


# ---- arguments ---------------------------------------------------------------------------------
def test_arguments_and_their_bounds(tmp_path: Path) -> None:
    config = parse_args(["--model", "/m"])
    assert (config.model, config.deadline_s, config.max_tokens, config.dry_run) == (
        Path("/m"), 570.0, 16, False,
    )  # fmt: skip
    assert config.workdir.is_dir() and config.workdir.name.startswith("prfaas-gpu-check-")
    config.workdir.rmdir()
    assert parse_args(["--model", "/m", "--workdir", str(tmp_path), "--dry-run"]).dry_run
    for bad in (["--deadline-s", "600"], ["--deadline-s", "0"], ["--max-tokens", "1"], []):
        argv = bad if not bad else ["--model", "/m", *bad]
        with pytest.raises(SystemExit):
            parse_args(argv)


# ---- the check list ----------------------------------------------------------------------------
def test_the_checks_cover_the_audits_first_gpu_checks_in_a_runnable_order() -> None:
    names = [check.name for check in CHECKS]
    assert len(set(names)) == len(names)
    assert set(gpu_steps.STEPS) == set(names)  # every check has a body
    # the audit's "What to check first on a GPU", items 1-6, and the extra items
    for name in ("versions", "relayed_equals_local", "tp2_relayed_equals_local", "warm_prefix",
                 "cross_device_index_put", "genai_perf_front_door", "connector_contract_cuda",
                 "decoupled_policy", "prefill_refuses_streaming"):  # fmt: skip
        assert name in names
    environment_needs = {"trtllm", "cuda", "gpus2", "triton", "contract_tests", "genai_perf"}
    for index, check in enumerate(CHECKS):
        for need in check.needs:
            assert need in environment_needs or need in names[:index], (check.name, need)
    assert sum(check.cap_s for check in CHECKS) > gpu_check.DEFAULT_DEADLINE_S  # total binds


def test_one_line_per_result() -> None:
    assert CheckResult("cuda", Status.PASS, "2 device(s)").line() == "PASS cuda: 2 device(s)"
    folded = CheckResult("x", Status.FAIL, "Traceback:\n  line 1\n\nboom").line()
    assert folded == "FAIL x: Traceback: | line 1 | boom"
    long = CheckResult("x", Status.SKIP, "y" * 1000).line()
    assert len(long) < 420 and long.endswith("...") and LINE.match(long)


# ---- skip logic --------------------------------------------------------------------------------
def test_without_gpu_or_tensorrt_llm_every_gpu_check_says_why_it_skips() -> None:
    results: dict[str, CheckResult] = {}
    for check in CHECKS:
        reason = skip_reason(check, NO_GPU, results)
        status = Status.SKIP if reason else Status.PASS
        results[check.name] = CheckResult(check.name, status, reason or "")
    assert results["repositories"].status is Status.PASS  # renders anywhere
    assert "tensorrt_llm is not installed" in results["versions"].detail
    assert results["cuda"].detail == "no CUDA device visible to torch"
    assert results["cross_device_index_put"].detail == "needs cuda (SKIP)"
    assert results["warm_prefix"].detail == "needs relayed_equals_local (SKIP)"
    assert all(r.status is Status.SKIP for n, r in results.items() if n != "repositories")


def test_skip_reasons_with_a_gpu() -> None:
    by_name = {check.name: check for check in CHECKS}
    one_gpu = Environment("1.2.1", "26.07", 1, True, False, False)
    tp2 = by_name["tp2_relayed_equals_local"]
    passed = {n: CheckResult(n, Status.PASS, "") for n in ("repositories", "serving_tp1")}
    assert skip_reason(tp2, one_gpu, passed) == "TP=2 needs 2 GPUs, found 1"
    assert skip_reason(tp2, FULL, passed) is None
    assert "gpu_contract.py" in str(skip_reason(by_name["connector_contract_cuda"], one_gpu, {}))
    assert skip_reason(by_name["genai_perf_front_door"], one_gpu, passed) == (
        "genai-perf is not installed"
    )
    failed = {"triton_tp1": CheckResult("triton_tp1", Status.FAIL, "boom")}
    assert skip_reason(by_name["decoupled_policy"], FULL, failed) == "needs triton_tp1 (FAIL)"


# ---- what it would start -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_gpus", "tp", "prefill", "decode", "fraction"),
    [(1, 1, "0", "0", 0.35), (2, 1, "0", "1", 0.8), (2, 2, "0,1", "0,1", 0.35),
     (4, 2, "0,1", "2,3", 0.8)],
)  # fmt: skip
def test_rendered_stack(
    tmp_path: Path, llmapi_dir: Path, num_gpus: int, tp: int, prefill: str, decode: str,
    fraction: float,
) -> None:  # fmt: skip
    layout = StackLayout(tmp_path / "model", tmp_path, tp, num_gpus, 18000, llmapi_dir)
    plan = render(layout)
    for role, gpus in ((DeployRole.PREFILL, prefill), (DeployRole.DECODE, decode)):
        triton = plan.tritons[role]
        model_dir = triton.repo_dir / "tensorrt_llm"
        config = parse_model_config((model_dir / "config.pbtxt").read_text())
        assert config.model_transaction_policy.decoupled is (role is DeployRole.DECODE)
        doc = yaml.safe_load((model_dir / "1" / "model.yaml").read_text())
        assert doc["tensor_parallel_size"] == tp
        assert doc["model"] == str(tmp_path / "model")
        assert doc["kv_cache_config"]["free_gpu_memory_fraction"] == fraction
        assert (model_dir / "1" / "model.py").read_text().startswith("# NVIDIA")
        env_file = dict(
            line.split("=", 1)
            for line in (model_dir / "prfaas.env").read_text().splitlines()
            if line and not line.startswith("#")
        )
        assert {**env_file, "CUDA_VISIBLE_DEVICES": gpus} == triton.env
        for path in (triton.env[k] for k in triton.env if k.endswith("_KEY_FILE")):
            assert Path(path).is_file() and len(Path(path).read_bytes()) == 40
        secret = Path(triton.env["TRTLLM_PRFAAS_CURVE_SECRET_KEY_FILE"])
        assert secret.stat().st_mode & 0o777 == 0o600
        assert connector_config_from_env(triton.env).role.value == role.value  # as Triton reads
        # upstream's llmapi launch: mpirun -n 1, auto-complete off, this server's own shm prefix
        assert triton.command[:5] == ["mpirun", "--allow-run-as-root", "-n", "1", "tritonserver"]
        assert "--disable-auto-complete-config" in triton.command
        assert f"--model-repository={triton.repo_dir}" in triton.command
    assert plan.tritons[DeployRole.DECODE].env["TRTLLM_PRFAAS_RELAY_BIND"].startswith("tcp://127")
    ports = [
        arg.split("=")[1] for t in plan.tritons.values() for arg in t.command if "-port=" in arg
    ]
    for role in DeployRole:
        ports += [e.rsplit(":", 1)[1] for e in layout.plan_endpoints(role)]
        assert plan.tritons[role].env["TRTLLM_PRFAAS_PLAN_BIND"] == layout.plan_endpoints(role)[0]
    relay_port = int(
        plan.tritons[DeployRole.DECODE].env["TRTLLM_PRFAAS_RELAY_BIND"].rsplit(":")[-1]
    )
    ports += [str(relay_port + rank) for rank in range(tp)]
    assert len(set(ports)) == len(ports) == 6 + 3 * tp  # no two listeners share a port


@pytest.mark.parametrize("role", list(DeployRole), ids=lambda r: r.value)
def test_worker_flags_parse_with_the_real_worker_parser(
    tmp_path: Path, llmapi_dir: Path, role: DeployRole
) -> None:
    plan = render(StackLayout(tmp_path / "model", tmp_path, 1, 2, 18000, llmapi_dir))
    parser = argparse.ArgumentParser()
    worker_command.add_arguments("worker", parser)
    args = parser.parse_args(worker_args(plan, role))
    config = worker_command.build_config(args)
    assert config.triton is not None
    assert config.triton.url == plan.tritons[role].grpc_url
    # the worker posts plans to every rank's plan server, the ones this Triton's connector binds
    assert list(config.triton.plan_endpoints) == plan.layout.plan_endpoints(role)
    assert plan.tritons[role].env["TRTLLM_PRFAAS_PLAN_BIND"] == plan.layout.plan_endpoints(role)[0]
    assert config.triton.tokenizer_dir == str(plan.layout.model)
    assert args.role == role.value and args.engine == "triton"
    if role is DeployRole.DECODE:
        assert args.advertise_relay == plan.tritons[role].env["TRTLLM_PRFAAS_RELAY_BIND"]


def test_warm_prefix_prompts_share_several_blocks_of_prefix() -> None:
    first, second = warm_prefix_prompts()
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert first != second and shared > 32 * 4 * 4  # > 4 blocks even at 4 chars/token


# ---- runner ------------------------------------------------------------------------------------
class FakeServing:
    closed = 0

    def close(self) -> None:
        FakeServing.closed += 1


def test_runner_bounds_every_check_and_stops_what_it_started(
    tmp_path: Path, llmapi_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    deadlines: dict[str, float] = {}

    def step(name: str):
        def run(session: Session, deadline: float) -> str:
            deadlines[name] = deadline
            session.serving = FakeServing()
            now[0] += 100.0  # each step takes 100 s of the fake clock
            if name == "cuda":
                raise RuntimeError("driver gone")
            return "ok"

        return run

    checks = (Check("versions", "v", ("trtllm",)), Check("cuda", "c", ("cuda",), cap_s=30.0),
              Check("repositories", "r", ()), Check("a", "a", ()), Check("b", "b", ()),
              Check("c", "c", ()), Check("d", "d", ()), Check("e", "e", ()))  # fmt: skip
    monkeypatch.setattr(gpu_check, "CHECKS", checks)
    monkeypatch.setattr(gpu_steps, "STEPS", {c.name: step(c.name) for c in checks})
    session = Session(config_for(tmp_path, llmapi_dir, "--deadline-s", "450"), FULL)
    lines: list[str] = []
    results = gpu_check.run_checks(session, lambda r: lines.append(r.line()), lambda: now[0])
    assert [r.status for r in results] == [Status.PASS, Status.FAIL, *[Status.PASS] * 3,
                                           Status.SKIP, Status.SKIP, Status.SKIP]  # fmt: skip
    assert lines[1] == "FAIL cuda: RuntimeError: driver gone"
    assert lines[-1] == "SKIP e: the total deadline was reached"
    assert deadlines["cuda"] == 130.0  # its own cap
    assert deadlines["b"] == 450.0  # the total deadline is shorter than its cap
    assert FakeServing.closed >= 1 and session.serving is None  # stopped on the way out
    assert all(LINE.match(line) for line in lines)
    assert gpu_check.summary(results) == ("summary: 4 pass, 1 fail, 3 skip", 1)


def test_summary_exit_status() -> None:
    def result(name: str, status: Status) -> CheckResult:
        return CheckResult(name, status, "")

    ok = [result("versions", Status.PASS), result("cuda", Status.PASS)]
    assert gpu_check.summary(ok)[1] == 0
    no_gpu = [result("versions", Status.SKIP), result("cuda", Status.SKIP)]
    assert gpu_check.summary(no_gpu)[1] == 2
    assert gpu_check.summary([*ok, result("x", Status.FAIL)])[1] == 1


# ---- the whole command on this CPU machine -----------------------------------------------------
def test_main_without_a_gpu_skips_and_says_so(
    tmp_path: Path, llmapi_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setattr(gpu_check, "probe_environment", lambda root: NO_GPU)
    argv = ["--model", str(tmp_path), "--workdir", str(tmp_path / "w"), "--llmapi-dir",
            str(llmapi_dir)]  # fmt: skip
    assert gpu_check.main(argv) == 2
    lines = capsys.readouterr().out.splitlines()
    checks = [line for line in lines if LINE.match(line)]
    assert [line.split()[1].rstrip(":") for line in checks] == [c.name for c in CHECKS]
    assert "PASS repositories:" in "\n".join(checks)
    assert lines[-1].startswith("summary: 1 pass, 0 fail, 15 skip; no GPU path was checked")


def test_dry_run_prints_the_plan_and_starts_nothing(
    tmp_path: Path, llmapi_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run started a process")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(gpu_check, "probe_environment", lambda root: FULL)
    argv = ["--model", "/models/small", "--workdir", str(tmp_path / "w"), "--llmapi-dir",
            str(llmapi_dir), "--dry-run"]  # fmt: skip
    assert gpu_check.main(argv) == 0
    out = capsys.readouterr().out
    for check in CHECKS:
        assert f"PLAN {check.name}: " in out
    assert "would SKIP" not in out  # everything can run with FULL
    commands = [line for line in out.splitlines() if " triton: mpirun " in line]
    assert len(commands) == 4  # two servers, TP 1 and TP 2
    assert all("--disable-auto-complete-config" in line for line in commands)
    assert "tp2 decode env: " in out and "TRTLLM_PRFAAS_ROLE=decode" in out
    assert "tp1 decode worker: prfaas worker --role decode" in out
    assert "tp1 repositories: ok" in out and "tp2 repositories: ok" in out
    assert (tmp_path / "w" / "tp2" / "decode" / "tensorrt_llm" / "config.pbtxt").is_file()


def test_the_shell_wrapper(tmp_path: Path) -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=10)
    assert os.access(SCRIPT, os.X_OK)
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        [str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert done.returncode == 0 and "--dry-run" in done.stdout
    done = subprocess.run(
        [str(SCRIPT), "--model", str(tmp_path), "--workdir", str(tmp_path / "w"), "--dry-run"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "PLAN tp2_relayed_equals_local: " in done.stdout
    assert "import tensorrt_llm" not in SCRIPT.read_text()


def test_no_module_imports_tensorrt_llm_at_import_time() -> None:
    code = (
        "import sys; import trtllm_prfaas.deploy.gpu_check, trtllm_prfaas.deploy.gpu_steps; "
        "sys.exit(any(m.startswith('tensorrt_llm') for m in sys.modules))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)


def test_log_check_flags_known_failures_but_not_the_decodes_planless_baselines(
    tmp_path: Path, llmapi_dir: Path
) -> None:
    plan = render(StackLayout(tmp_path / "model", tmp_path, 1, 1, 18000, llmapi_dir))
    stack = Stack(plan)  # never started: only its log files are read
    prefill_log = plan.tritons[DeployRole.PREFILL].log_path
    decode_log = plan.tritons[DeployRole.DECODE].log_path
    decode_log.write_text("I1206 model loaded\nprfaas_plan_missing request_id=3 num_tokens=9\n")
    prefill_log.write_text("I1206 model loaded\n")
    session = Session(config_for(tmp_path, llmapi_dir), FULL, stack=stack)
    assert "known failure patterns" in gpu_steps.logs_step(session, 0.0)
    prefill_log.write_text("prfaas_plan_missing request_id=1\n")
    decode_log.write_text(
        "RuntimeError: [TensorRT-LLM][ERROR] Assertion failed: There must be at least one "
        "uncomputed token in the prompt!\n"
    )
    with pytest.raises(gpu_check.CheckFailed) as failed:
        gpu_steps.logs_step(session, 0.0)
    assert "prefill: prfaas_plan_missing" in str(failed.value)
    assert "decode: RuntimeError" in str(failed.value)


class FakeTokenizer:
    """ids are characters' code points (enough to test the comparison logic)."""

    class _Encoding:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    def encode(self, text: str) -> FakeTokenizer._Encoding:
        return self._Encoding([ord(c) for c in text])

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize(
    ("relayed", "counted", "error"),
    [
        (" 125.", (1, 0), None),
        (" 125.", (0, 1), "did not use the relay"),  # the audit's silent recompute (3a)
        (" 126.", (1, 0), "relayed ' 126.' != local ' 125.'"),
    ],
)
def test_relayed_equals_local_demands_equal_text_and_a_counted_relay(
    tmp_path: Path, llmapi_dir: Path, monkeypatch: pytest.MonkeyPatch,
    relayed: str, counted: tuple[int, int], error: str | None,
) -> None:  # fmt: skip
    counts = iter([RelayCounts(0, 0), RelayCounts(*counted)])

    class Serving:
        url = "127.0.0.1:1"

        def relay_counts(self) -> RelayCounts:
            return next(counts)

    monkeypatch.setattr(gpu_steps, "_tokenizer", lambda model: FakeTokenizer())
    monkeypatch.setattr(
        gpu_steps, "generate_relayed", lambda url, ids, n, t: [ord(c) for c in relayed]
    )
    monkeypatch.setattr(gpu_steps, "generate_local", lambda plan, prompt, n, t: " 125.")
    session = Session(config_for(tmp_path, llmapi_dir), FULL, serving=Serving())
    deadline = time.monotonic() + 30
    if error is None:
        detail = gpu_steps.relayed_step(session, deadline)
        assert "tokens equal, counted relayed" in detail
    else:
        with pytest.raises(gpu_check.CheckFailed, match=re.escape(error)):
            gpu_steps.relayed_step(session, deadline)


def test_the_installed_project_is_compared_with_the_checkout(
    tmp_path: Path, llmapi_dir: Path
) -> None:
    # this venv installs the checkout (editable), so they are equal here
    session = Session(config_for(tmp_path, llmapi_dir), FULL)
    assert "equals" in gpu_steps.installed_project_step(session, time.monotonic() + 60)
    other = tmp_path / "other"
    (other / "trtllm_prfaas").mkdir(parents=True)
    (other / "trtllm_prfaas" / "__init__.py").write_text("# a different checkout\n")
    stale = Session(
        parse_args(["--model", "/m", "--workdir", str(tmp_path / "w"), "--repo-root", str(other)]),
        FULL,
    )
    with pytest.raises(gpu_check.CheckFailed, match="rebuild the image from this checkout"):
        gpu_steps.installed_project_step(stale, time.monotonic() + 60)


# ---- the request helpers against the llmapi Triton fake (tests/fakes, rebuilt from upstream) ---
hf_model_dir = fake_tokenizer.hf_model_dir  # the session fixture


def test_requests_to_the_llmapi_model_as_the_gpu_check_sends_them(hf_model_dir: Path) -> None:
    prompt = "Fact 1: 1 squared is 1. Fact 2: 2 squared is 4."
    with (
        FakeLlmapiTriton(hf_model_dir, decoupled=True) as decode,
        FakeLlmapiTriton(hf_model_dir, decoupled=False) as prefill,
    ):
        # the decode's local answer: ModelStreamInfer, streaming false, the final text
        text = stream_text(decode.address, prompt, 12, streaming=False, timeout_s=20)
        assert text == decode.llm.reference(prompt, 12).text and text
        # cumulative streamed text: the last response is the whole answer too
        assert stream_text(decode.address, prompt, 12, streaming=True, timeout_s=20) == text
        # the non-decoupled prefill refuses streaming (upstream model.py), as the check expects
        with pytest.raises(EngineError, match="Streaming is only supported in decoupled mode"):
            stream_text(prefill.address, prompt, 2, streaming=True, timeout_s=20)
        policies = {
            url: gpu_steps._model_config(url).get("model_transaction_policy", {})
            for url in (decode.address, prefill.address)
        }
        assert policies[decode.address].get("decoupled") is True
        assert not policies[prefill.address].get("decoupled", False)


def test_relayed_request_helper_against_the_router_front_door() -> None:
    """``generate_relayed`` as the check calls the router: ``input_ids`` in, ``output_ids`` out,
    here against the project's front door over a reference engine (greedy, so deterministic)."""
    from tests.router.conftest import make_engine
    from trtllm_prfaas.engines.request import SamplingParams
    from trtllm_prfaas.router.frontdoor import FrontDoor, FrontDoorConfig
    from trtllm_prfaas.router.local import LocalEngineOrchestrator

    prompt = [5, 17, 42, 7, 99, 3, 11, 64, 21, 8]
    expected = make_engine().generate([prompt], SamplingParams(max_tokens=6))[0]
    with (
        LocalEngineOrchestrator(make_engine()) as orchestrator,
        FrontDoor(orchestrator, FrontDoorConfig(port=0)) as door,
    ):
        ids = generate_relayed(door.address, prompt, 6, timeout_s=60)
    assert ids == list(expected) and len(ids) == 6


def test_serving_starts_both_workers_and_the_router_and_stops_them(
    hf_model_dir: Path, tmp_path: Path, llmapi_dir: Path
) -> None:
    """``Serving`` against two llmapi Triton fakes standing in for the GPU servers: both
    ``prfaas worker --engine triton`` processes come up with the check's flags, the router
    connects to them and serves, the relay counters start at zero, and ``close`` stops it all."""
    import dataclasses

    import tritonclient.grpc as grpcclient

    layout = StackLayout(hf_model_dir, tmp_path, 1, 1, 18500, llmapi_dir)
    plan = render(layout)
    with (
        FakeLlmapiTriton(hf_model_dir, decoupled=False) as prefill,
        FakeLlmapiTriton(hf_model_dir, decoupled=True) as decode,
    ):
        urls = {DeployRole.PREFILL: prefill.address, DeployRole.DECODE: decode.address}
        tritons = {r: dataclasses.replace(t, grpc_url=urls[r]) for r, t in plan.tritons.items()}
        plan = dataclasses.replace(plan, tritons=tritons)
        with Serving(plan, timeout_s=90) as serving:
            assert serving.relay_counts() == RelayCounts(0.0, 0.0)
            client = grpcclient.InferenceServerClient(serving.url)
            try:
                assert client.is_model_ready("tensorrt_llm")
            finally:
                client.close()
            processes = [w.process for w in serving.workers.values()]
            assert len(processes) == 2 and all(p.poll() is None for p in processes)
        assert all(p.poll() is not None for p in processes)  # stopped by close()


@pytest.mark.parametrize("fails", [False, True])
def test_contract_check_runs_the_7a_runner_and_names_its_failures(
    tmp_path: Path, llmapi_dir: Path, fails: bool
) -> None:
    """A stand-in for ``tests/connector/gpu_contract.py`` with its output format (one
    ``PASS|FAIL|SKIP  name (s) detail`` line per check, ``DONE  N failed`` last)."""
    runner = tmp_path / "repo" / "tests" / "connector"
    runner.mkdir(parents=True)
    for package in (runner.parent, runner):
        (package / "__init__.py").write_text("")
    lines = ["INFO  torch x, H100", "PASS  device_pool_is_cuda (0.01s)"]
    lines += ["FAIL  test_warm_prefix (0.20s) AssertionError: x"] if fails else []
    lines += [f"DONE  {int(fails)} failed"]
    (runner / "gpu_contract.py").write_text(
        f"import sys\nprint({chr(10).join(lines)!r})\nsys.exit({int(fails)})\n"
    )
    config = parse_args(["--model", "/m", "--workdir", str(tmp_path / "w"),
                         "--repo-root", str(tmp_path / "repo")])  # fmt: skip
    session = Session(config, FULL)
    if fails:
        with pytest.raises(gpu_check.CheckFailed, match=r"DONE  1 failed; \['test_warm_prefix'\]"):
            gpu_steps.contract_step(session, time.monotonic() + 60)
    else:
        assert gpu_steps.contract_step(session, time.monotonic() + 60) == (
            "DONE  0 failed (1 passed)"
        )


def test_skip_flag(tmp_path: Path, llmapi_dir: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    config = config_for(tmp_path, llmapi_dir, "--skip", "connector_contract_cuda",
                        "--skip", "genai_perf_front_door")  # fmt: skip
    assert config.skip == {"connector_contract_cuda", "genai_perf_front_door"}
    with pytest.raises(SystemExit):
        config_for(tmp_path, llmapi_dir, "--skip", "no_such_check")
    monkeypatch.setattr(gpu_check, "probe_environment", lambda root: FULL)
    argv = ["--model", "/m", "--workdir", str(tmp_path / "w"), "--llmapi-dir", str(llmapi_dir),
            "--skip", "connector_contract_cuda", "--dry-run"]  # fmt: skip
    assert gpu_check.main(argv) == 0
    out = capsys.readouterr().out
    assert "PLAN connector_contract_cuda: " in out and "(would SKIP: --skip)" in out
    assert out.count("would SKIP") == 1


def test_connector_bases_probe_runs_apart_and_sees_the_project_bases_without_tensorrt_llm(
    tmp_path: Path, llmapi_dir: Path
) -> None:
    session = Session(config_for(tmp_path, llmapi_dir), FULL)
    with pytest.raises(gpu_check.CheckFailed, match="no TensorRT-LLM base class") as failed:
        gpu_steps.connector_bases_step(session, time.monotonic() + 120)
    assert "trtllm_prfaas.connector" in str(failed.value)
    assert "tensorrt_llm" not in sys.modules  # the probe ran in a child process


def test_cross_device_probe_runs_apart_and_reports_a_probe_failure(
    tmp_path: Path, llmapi_dir: Path
) -> None:
    session = Session(config_for(tmp_path, llmapi_dir), FULL)
    with pytest.raises(gpu_check.CheckFailed, match=r"the probe failed: .*CUDA"):
        gpu_steps.cross_device_step(session, time.monotonic() + 120)  # CPU torch: no CUDA

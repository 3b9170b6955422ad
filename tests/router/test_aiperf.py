"""NVIDIA's ``aiperf`` against the OpenAI door of a real ``prfaas up`` testbed, asserting on what
aiperf itself exports (request count, no errors, tokens per request).

aiperf is heavy (transformers, pandas, ZeroMQ services) and pins its own dependencies, so it
lives in a scratch environment, never in the project's venv (``.venv-aiperf``, ignored by git).
The test runs when ``PRFAAS_AIPERF`` names an ``aiperf`` executable and skips, saying so,
otherwise: ``make aiperf-test`` creates the scratch venv if needed (``pip install aiperf``) and
runs this module with it. Opt-in rather than "whenever the venv exists": each profile starts
aiperf's service processes (~15 s), which ``make test`` should not pay.

The testbed is the in-process ``Testbed`` that ``prfaas up`` runs (router with the disaggregated
orchestrator, prefill and decode worker processes, the emulated inter-DC link), serving the
tests' real Hugging Face tokenizer (``hf_model_dir``, with a chat template); aiperf gets the
same directory, so its synthetic prompts have the lengths it asks for in the served model's
tokens. Token counts are the door's ``usage`` (``--use-server-token-count``): aiperf re-encoding
the text a tiny random-weight model writes (broken UTF-8 pieces, U+FFFD) counts about twice the
tokens generated, and warns so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.tokenizer import hf_model_dir  # noqa: F401 (session fixture)

MODEL = "tensorrt_llm"
REPO = Path(__file__).resolve().parents[2]
NUM_REQUESTS = 12
OUTPUT_TOKENS = 6
PROMPT_TOKENS = 24  # over the testbed's threshold (16): prefill remote, KV over the emulated link
AIPERF_TIMEOUT_S = 240.0  # aiperf starts several service processes; the profile itself is short


def aiperf_executable() -> str | None:
    """The executable ``PRFAAS_AIPERF`` names (relative paths from the repository root)."""
    given = os.environ.get("PRFAAS_AIPERF", "")
    if not given:
        return None
    found = shutil.which(given) or shutil.which(str(REPO / given))
    return str(Path(found).resolve()) if found else None  # absolute: aiperf runs in tmp_path


AIPERF = aiperf_executable()
pytestmark = pytest.mark.skipif(
    AIPERF is None,
    reason="aiperf is opt-in: it lives in a scratch venv (heavy, pins its own dependencies); "
    "`make aiperf-test` installs it there and runs this with PRFAAS_AIPERF set"
    + (
        f" (PRFAAS_AIPERF={os.environ['PRFAAS_AIPERF']!r} is no executable)"
        if os.environ.get("PRFAAS_AIPERF")
        else ""
    ),
)


def run_aiperf(url: str, tokenizer_dir: Path, out: Path, endpoint: str, streaming: bool) -> Any:
    """One short closed-loop profile; returns aiperf's exported JSON summary."""
    assert AIPERF is not None
    argv = [
        AIPERF, "profile", "--model", MODEL, "--url", url, "--endpoint-type", endpoint,
        "--tokenizer", str(tokenizer_dir), "--request-count", str(NUM_REQUESTS),
        "--concurrency", "2", "--prompt-input-tokens-mean", str(PROMPT_TOKENS),
        "--prompt-input-tokens-stddev", "0", "--output-tokens-mean", str(OUTPUT_TOKENS),
        "--output-tokens-stddev", "0",
        "--random-seed", "7", "--ui-type", "none", "--output-artifact-dir", str(out),
        "--workers-max", "2", "--request-timeout-seconds", "60", "--use-server-token-count",
    ]  # fmt: skip
    if streaming:
        argv.append("--streaming")
    # no HF_HUB_OFFLINE: aiperf 0.13 then looks a local tokenizer path up as a hub repo id
    done = subprocess.run(argv, capture_output=True, text=True, timeout=AIPERF_TIMEOUT_S,
                          cwd=out, check=False)  # fmt: skip
    tail = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert done.returncode == 0, f"aiperf exited {done.returncode}:\n{tail}"
    exports = sorted(out.rglob("profile_export_aiperf.json"))
    assert exports, f"aiperf wrote no profile_export_aiperf.json under {out}: {done.stdout[-2000:]}"
    return json.loads(exports[0].read_text())


def metric(summary: dict[str, Any], name: str, stat: str = "avg") -> float:
    value = summary[name]
    return float(value[stat] if isinstance(value, dict) else value)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | trim }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(hf_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The tests' HF tokenizer with a chat template (aiperf's default endpoint is chat)."""
    path = tmp_path_factory.mktemp("aiperf") / "model"
    shutil.copytree(hf_model_dir, path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def testbed(model_dir: Path) -> Any:
    """``prfaas up``'s testbed serving ``model_dir``'s tokenizer, the OpenAI door on a free port."""
    from trtllm_prfaas.testbed.spec import TestbedConfig
    from trtllm_prfaas.testbed.up import Testbed

    config = TestbedConfig(model_preset="tiny", grpc_port=0, metrics_port=0, openai_port=0,
                           num_blocks=512, threshold_tokens=PROMPT_TOKENS - 8,
                           tokenizer_dir=str(model_dir))  # fmt: skip
    with Testbed(config) as bed:
        assert bed.router is not None and bed.router.openai_url is not None
        yield bed


@pytest.mark.parametrize(
    ("endpoint", "streaming"),
    [("completions", False), ("chat", True)],
    ids=["completions", "chat-stream"],
)
def test_aiperf_profile_against_the_openai_door(
    testbed: Any, model_dir: Path, tmp_path: Path, endpoint: str, streaming: bool
) -> None:
    before = dict(testbed.router.orchestrator.counters)
    summary = run_aiperf(testbed.router.openai_url, model_dir, tmp_path, endpoint, streaming)
    shown = ("request_count", "request_throughput", "request_latency", "time_to_first_token",
             "output_token_throughput", "output_sequence_length")  # fmt: skip
    print(f"aiperf {endpoint} stream={streaming}:", json.dumps({k: summary.get(k) for k in shown}))
    assert metric(summary, "request_count") == NUM_REQUESTS
    assert "error_request_count" not in summary or metric(summary, "error_request_count") == 0
    assert not summary.get("error_summary"), summary.get("error_summary")
    assert metric(summary, "request_throughput") > 0
    assert 0 < metric(summary, "request_latency", "p99") < 60_000  # ms
    # the door's own usage (--use-server-token-count; aiperf re-tokenizing a tiny random model's
    # text is no count of its tokens): at most what was asked, fewer only where the model ended
    # at EOS (ignore_eos is refused); the prompt as the served tokenizer counts it
    assert 0 < metric(summary, "output_sequence_length", "max") <= OUTPUT_TOKENS
    assert metric(summary, "usage_prompt_tokens", "min") >= PROMPT_TOKENS
    if streaming:
        assert 0 < metric(summary, "time_to_first_token") <= metric(summary, "request_latency")
    after = testbed.router.orchestrator.counters  # each aiperf request went through the router
    assert sum(after[k] - before[k] for k in ("local", "remote")) >= NUM_REQUESTS, after
    assert after["remote"] - before["remote"] >= NUM_REQUESTS // 2, after  # prefill remote

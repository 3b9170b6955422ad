"""The whole stack over the served model's own Hugging Face tokenizer (``prfaas up --tokenizer``):
a real byte-level BPE trained in the session (``tests/fakes/tokenizer.py``), workers whose
reference model has its vocabulary (``--tokenizer`` on ``prfaas worker``), the router tokenizing
with it (``RouterConfig.tokenizer_dir``), and stock ``tritonclient.grpc``.

Checked: prompts are routed by their tokenizer token count, not their bytes; output ids equal a
single-engine run of the same tokenizer-sized model, local and remote (KV relayed); streamed
``text_output`` pieces join to exactly the unary text, and over an output whose multi-byte
characters span tokens no piece holds U+FFFD (none ends inside a UTF-8 sequence)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from tests.fakes import tokenizer as fake_tokenizer
from tests.router.builders import MODEL, ids_of, llm_inputs, stream, text_of
from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.hf_tokenizer import HfTokenizer
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.engines.tokenizer import model_vocabulary
from trtllm_prfaas.testbed import demo
from trtllm_prfaas.testbed.spec import TestbedConfig, load_testbed_config
from trtllm_prfaas.testbed.up import Testbed

hf_model_dir = fake_tokenizer.hf_model_dir  # the session fixture

THRESHOLD = 40
# (tokenizer tokens, bytes + BOS): 58/187 goes remote; 19/68 stays local by its 19 tokens,
# where byte tokenization (68) would have sent it remote.
REMOTE = "東京の日本語テキスト、Café naïve façade 🚀✨ " * 3
LOCAL = "北京 和 上海 的 数据中心 東京 日本語 テキスト。"
MAX_TOKENS, TEMPERATURE = 6, 0.8  # demo.reference_tokens samples at 0.8


@pytest.fixture(scope="module")
def testbed(hf_model_dir: Path) -> Iterator[Testbed]:
    config = TestbedConfig(model_preset="tiny", grpc_port=0, metrics_port=0, num_blocks=512,
                           threshold_tokens=THRESHOLD, tokenizer_dir=str(hf_model_dir))  # fmt: skip
    with Testbed(config) as bed:
        yield bed


@pytest.fixture
def client(testbed: Testbed) -> Iterator[grpcclient.InferenceServerClient]:
    assert testbed.router is not None
    client = grpcclient.InferenceServerClient(testbed.router.address)
    yield client
    client.close()


def _clean_seed(config: TestbedConfig, tokenizer: HfTokenizer, prompt: str) -> int:
    """A seed whose single-engine output is valid UTF-8 with a character split across tokens
    (a random model mostly emits broken byte sequences; the stream must not add any)."""
    model = model_preset(config.model_preset, seed=config.model_seed,
                         **model_vocabulary(config.tokenizer_dir))  # fmt: skip
    engine = ReferenceEngine(EngineConfig(model=model, num_blocks=config.num_blocks))
    ids = tokenizer.encode(prompt)
    for first in range(0, 256, 16):
        seeds = range(first, first + 16)
        rids = {engine.add_request(ids, SamplingParams(MAX_TOKENS, TEMPERATURE, s)): s
                for s in seeds}  # fmt: skip
        out: dict[int, list[int]] = {rid: [] for rid in rids}
        while engine.has_unfinished():
            for step in engine.step():
                out[step.request_id] += step.new_token_ids
        for rid, tokens in out.items():
            text = tokenizer.decode(tokens)
            split = any("\ufffd" in tokenizer.decode([t]) for t in tokens)
            if "\ufffd" not in text and split and len(text.encode()) > len(text):
                return rids[rid]
    raise AssertionError(f"no seed in 0..255 gives a clean multi-byte output for {prompt!r}")


def _streamed(client: Any, prompt: str, seed: int) -> tuple[list[str], list[int]]:
    inputs = llm_inputs(prompt, MAX_TOKENS, TEMPERATURE, seed, streaming=True)
    responses = stream(client, inputs, timeout_s=60)
    assert all(hasattr(r, "as_numpy") for r in responses), responses
    texts = [text_of(r) for r in responses]  # cumulative, as llmapi streams: each a prefix
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts)), texts
    pieces = [b[len(a) :] for a, b in itertools.pairwise(["", *texts])]
    return pieces, [t for r in responses for t in ids_of(r)]


def test_streamed_text_over_the_served_tokenizer(
    testbed: Testbed, client: Any, hf_model_dir: Path
) -> None:
    tokenizer = HfTokenizer.from_dir(hf_model_dir)
    router = testbed.router
    assert router is not None
    orchestrator = router.orchestrator
    assert orchestrator.vocab_size == tokenizer.vocab_size
    assert orchestrator.encode(REMOTE) == tokenizer.encode(REMOTE)
    seeds = {p: _clean_seed(testbed.config, tokenizer, p) for p in (REMOTE, LOCAL)}
    results = [demo.DemoResult(p, p, seed, MAX_TOKENS) for p, seed in seeds.items()]
    want = dict(zip(seeds, demo.reference_tokens(testbed.config, results), strict=True))
    for prompt, seed in seeds.items():
        pieces, ids = _streamed(client, prompt, seed)
        assert ids == want[prompt], prompt  # equal to one engine with the same vocabulary
        unary = client.infer(MODEL, llm_inputs(prompt, MAX_TOKENS, TEMPERATURE, seed),
                             client_timeout=60)  # fmt: skip
        assert ids_of(unary) == ids
        assert "".join(pieces) == text_of(unary) == tokenizer.decode(ids)
        assert not any("\ufffd" in piece for piece in pieces), pieces
        assert len(text_of(unary).encode()) > len(text_of(unary))  # multi-byte characters
    routed = {r.request.prompt_tokens: r.decision for r in orchestrator.route_log}
    assert set(routed) == {len(tokenizer.encode(REMOTE)), len(tokenizer.encode(LOCAL))}
    assert routed[len(tokenizer.encode(REMOTE))].is_remote
    local = routed[len(tokenizer.encode(LOCAL))]
    assert not local.is_remote and len(LOCAL.encode()) + 1 > local.threshold_tokens
    assert orchestrator.counters["relay_recomputed"] == 0  # decoded from the relayed KV


def test_broken_byte_sequences_stream_as_the_unary_text(testbed: Testbed, client: Any) -> None:
    """Any seed: what the random model emits (cut characters, stray continuation bytes) streams
    as exactly the unary text, and no piece but the last ends in U+FFFD."""
    for seed in (1, 2, 3):
        pieces, ids = _streamed(client, REMOTE, seed)
        unary = client.infer(MODEL, llm_inputs(REMOTE, MAX_TOKENS, TEMPERATURE, seed),
                             client_timeout=60)  # fmt: skip
        assert ids_of(unary) == ids and "".join(pieces) == text_of(unary)
        assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])


def test_up_and_worker_flags_carry_the_tokenizer(hf_model_dir: Path) -> None:
    """``prfaas up --tokenizer DIR`` reaches the router config and every worker's argv, and
    ``prfaas worker --tokenizer DIR`` (reference engine) sizes the model to the vocabulary."""
    import argparse

    from trtllm_prfaas.testbed import up
    from trtllm_prfaas.worker import command

    parser = argparse.ArgumentParser()
    up.add_arguments("up", parser)
    args = parser.parse_args(["--tokenizer", str(hf_model_dir)])
    config = load_testbed_config(args.config, tokenizer_dir=str(args.tokenizer))
    assert config.tokenizer_dir == str(hf_model_dir)
    for argv in config.worker_args().values():
        assert argv[argv.index("--tokenizer") + 1] == str(hf_model_dir)
        worker = argparse.ArgumentParser()
        command.add_arguments("worker", worker)
        model = command.build_config(worker.parse_args([*argv, "--plaintext"])).engine.model
        tokenizer = HfTokenizer.from_dir(hf_model_dir)
        assert (model.vocab_size, model.eos_id) == (tokenizer.vocab_size, tokenizer.eos_id)
    assert "--tokenizer" not in load_testbed_config(None).worker_args()["dc-local-decode-0"]


def test_single_engine_mode_streams_the_same_text(hf_model_dir: Path, serve: Any) -> None:
    """``LocalEngineOrchestrator`` over the tokenizer-sized model, behind the same front door:
    the same detokenizer, so the same guarantees and the same tokens as the router."""
    from trtllm_prfaas.router.local import LocalEngineOrchestrator

    tokenizer = HfTokenizer.from_dir(hf_model_dir)
    config = TestbedConfig(model_preset="tiny", num_blocks=512, tokenizer_dir=str(hf_model_dir))
    seed = _clean_seed(config, tokenizer, REMOTE)
    want = demo.reference_tokens(config, [demo.DemoResult("r", REMOTE, seed, MAX_TOKENS)])[0]
    model = model_preset("tiny", **model_vocabulary(str(hf_model_dir)))
    engine = ReferenceEngine(EngineConfig(model=model, num_blocks=512))
    with LocalEngineOrchestrator(engine, tokenizer=tokenizer) as orchestrator:
        client = serve(orchestrator)[1]
        pieces, ids = _streamed(client, REMOTE, seed)
        assert ids == want and "".join(pieces) == tokenizer.decode(ids)
        assert not any("\ufffd" in piece for piece in pieces), pieces
        assert orchestrator.leak_report() == []

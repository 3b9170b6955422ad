"""The OpenAI door with the official ``openai`` client: completions and chat, unary and
streamed, usage (also streamed), seeds, stop strings, the same tokens as the gRPC door for the
same prompt and seed, OpenAI-shaped errors, and a disconnecting client that frees its request.

The door is the real app (``build_openai_app``) served by the real HTTP stack (``HttpDoor``:
uvicorn on 127.0.0.1, port 0) over the tiny reference engine of ``conftest.py``; every test ends
with the engine idle and clean (the ``orchestrator`` fixture's leak check)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.tokenizer import hf_model_dir  # noqa: F401 (session fixture)
from tests.router.builders import ids_of, llm_inputs, text_of
from tests.router.conftest import ServeFn, make_engine
from tests.router.fakes import FakeOrchestrator
from tests.router.test_router_command import keys, workers  # noqa: F401 (module fixtures)
from trtllm_prfaas.engines.hf_tokenizer import HfTokenizer
from trtllm_prfaas.engines.tokenizer import ByteTokenizer
from trtllm_prfaas.router.api import Orchestrator, TokenChunk
from trtllm_prfaas.router.http_door import HttpDoor, HttpDoorConfig
from trtllm_prfaas.router.local import LocalEngineOrchestrator
from trtllm_prfaas.router.openai_door import build_openai_app
from trtllm_prfaas.router.openai_protocol import SIMPLE_CHAT_TEMPLATE, ChatPrompt

MODEL = "tensorrt_llm"
PROMPT = "Prefill-as-a-Service streams KV"
USER = [{"role": "user", "content": "Where does the prefill run?"}]

DoorFn = Callable[..., tuple[HttpDoor, openai.OpenAI]]


@pytest.fixture
def open_door() -> Iterator[DoorFn]:
    """``open_door(orchestrator)`` serves the OpenAI app and returns it with a client (no
    retries: a 429/5xx must reach the test); both are closed at teardown, even on failure."""
    opened: list[Any] = []

    def start(orch: Orchestrator, tokenizer: Any = None) -> tuple[HttpDoor, openai.OpenAI]:
        app = build_openai_app(orch, tokenizer or ByteTokenizer())
        door = HttpDoor(app, HttpDoorConfig(port=0), name="openai")
        door.start()
        opened.append(door)
        client = openai.OpenAI(base_url=f"{door.url}/v1", api_key="unused", max_retries=0,
                               timeout=30.0)  # fmt: skip
        opened.append(client)
        return door, client

    yield start
    for thing in reversed(opened):
        thing.close()


@pytest.fixture
def client(open_door: DoorFn, orchestrator: LocalEngineOrchestrator) -> openai.OpenAI:
    return open_door(orchestrator, orchestrator.tokenizer)[1]


def _engine_idle(orch: LocalEngineOrchestrator, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not orch.call(lambda engine: engine.has_unfinished()) and orch.leak_report() == []:
            return True
        time.sleep(0.02)
    return False


# ------------------------------------------------------------------------------ completions
def test_completion_equals_the_grpc_door(
    client: openai.OpenAI, serve: ServeFn, orchestrator: LocalEngineOrchestrator
) -> None:
    """Same prompt and seed (sampled) -> the same text and token count as tritonclient gets."""
    grpc_client = serve(orchestrator)[1]
    for temperature, seed in ((0.0, 0), (0.9, 1234)):
        grpc = grpc_client.infer(MODEL, llm_inputs(PROMPT, max_tokens=12, temperature=temperature,
                                                   seed=seed))  # fmt: skip
        done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                         temperature=temperature, seed=seed)  # fmt: skip
        assert done.choices[0].text == text_of(grpc)
        assert done.usage is not None
        assert done.usage.completion_tokens == len(ids_of(grpc))
        assert done.usage.prompt_tokens == len(orchestrator.encode(PROMPT))
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
        assert done.choices[0].finish_reason == "length"
        assert done.object == "text_completion" and done.model == MODEL


def test_completion_stream_joins_to_the_unary_text_with_usage(client: openai.OpenAI) -> None:
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0.7, seed=5)
    unary = client.completions.create(**args)  # type: ignore[call-overload]
    chunks = list(client.completions.create(**args, stream=True,  # type: ignore[call-overload]
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert len(chunks) > 2  # streamed, not one blob
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == unary.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.usage is None for c in text_chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage == unary.usage


def test_token_id_prompt_is_the_text_prompt(
    client: openai.OpenAI, orchestrator: LocalEngineOrchestrator
) -> None:
    ids = orchestrator.encode(PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_seed_reproduces_and_differs(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                         temperature=1.0, seed=seed)  # fmt: skip
        return done.choices[0].text

    assert sample(7) == sample(7)
    assert sample(8) == sample(8)
    assert sample(7) != sample(8)


# ------------------------------------------------------------------------------ chat
def test_chat_unary_and_stream_over_the_simple_template(
    client: openai.OpenAI, orchestrator: LocalEngineOrchestrator
) -> None:
    args = dict(model=MODEL, messages=USER, max_completion_tokens=8, temperature=0.5, seed=3)
    unary = client.chat.completions.create(**args)  # type: ignore[call-overload]
    prompt = f"<|user|>\n{USER[0]['content']}\n<|assistant|>\n"  # SIMPLE_CHAT_TEMPLATE
    assert unary.usage is not None
    assert unary.usage.prompt_tokens == len(orchestrator.encode(prompt))
    assert unary.choices[0].message.role == "assistant"
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                           temperature=0.5, seed=3)  # fmt: skip
    assert unary.choices[0].message.content == completion.choices[0].text  # same prompt ids

    streamed = dict(args, stream=True, stream_options={"include_usage": True})
    chunks = list(client.chat.completions.create(**streamed))  # type: ignore[call-overload]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == unary.usage
    assert unary.object == "chat.completion" and chunks[0].object == "chat.completion.chunk"


def test_chat_renders_the_served_tokenizers_template(hf_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """The HF tokenizer's template (chat_template.jinja) writes BOS itself; the prompt is
    encoded without adding another, as trtllm-serve's add_special_tokens=False does."""
    model_dir = tmp_path / "model"
    shutil.copytree(hf_model_dir, model_dir)
    (model_dir / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | trim }}\n"
        "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tokenizer = HfTokenizer.from_dir(model_dir)
    chat = ChatPrompt(tokenizer, FakeOrchestrator())
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Café?"}]
    text = chat.render(messages)
    assert text == "<s>[system] Be brief.\n[user] Café?\n[assistant] "
    ids = chat.encode(messages)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(tokenizer.bos_id) == 1 and ids[0] == tokenizer.bos_id


def test_simple_template_is_documented_one() -> None:
    chat = ChatPrompt(ByteTokenizer(), FakeOrchestrator())
    assert "<|assistant|>" in SIMPLE_CHAT_TEMPLATE
    assert chat.render(USER) == f"<|user|>\n{USER[0]['content']}\n<|assistant|>\n"


def test_hf_tokenizer_without_template_refuses_chat(
    open_door: DoorFn,
    hf_model_dir: Path,  # noqa: F811
) -> None:
    _, client = open_door(FakeOrchestrator(), HfTokenizer.from_dir(hf_model_dir))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4)  # type: ignore[arg-type]
    assert caught.value.param == "messages" and "chat template" in caught.value.message


# ------------------------------------------------------------------------------ stop strings
def test_stop_string_cuts_the_text_and_cancels(
    client: openai.OpenAI, orchestrator: LocalEngineOrchestrator
) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0)
    text = full.choices[0].text
    stop = text[6:8]
    want = text[: text.find(stop)]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0,
                                    stop=[stop, "\x00never"])  # fmt: skip
    assert cut.choices[0].text == want
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage is not None and cut.usage.completion_tokens < 40
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40,
                                         temperature=0, stop=stop, stream=True)  # fmt: skip
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == want
    assert pieces[-1].choices[0].finish_reason == "stop"
    assert _engine_idle(orchestrator)


# ------------------------------------------------------------------------------ models, health
def test_models_and_health(open_door: DoorFn, orchestrator: LocalEngineOrchestrator) -> None:
    door, client = open_door(orchestrator)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("llama")
    assert httpx.get(f"{door.url}/health", timeout=5).status_code == 200
    _, not_ready = open_door(FakeOrchestrator(ready=False))
    response = httpx.get(f"{not_ready.base_url}".removesuffix("/v1/") + "/health", timeout=5)
    assert response.status_code == 503
    with pytest.raises(openai.InternalServerError) as caught:
        not_ready.completions.create(model=MODEL, prompt="x")
    assert caught.value.status_code == 503


# ------------------------------------------------------------------------------ errors
def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="llama", prompt=PROMPT)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert caught.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="llama", messages=USER)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"temperature": "hot"}, "temperature", "float"),
        ({"temperature": 3.5}, "temperature", "[0, 2]"),
        ({"top_p": 0.5}, "top_p", "top-p"),
        ({"n": 2}, "n", "n=1"),
        ({"frequency_penalty": 0.5}, "frequency_penalty", "frequency penalty"),
        ({"logprobs": 2}, "logprobs", "log probabilities"),
        ({"extra_body": {"ignore_eos": True}}, "ignore_eos", "ignoring EOS"),
        ({"extra_body": {"colour": "red"}}, "colour", "Unrecognized request argument"),
        ({"max_tokens": 0}, "max_tokens", "> 0"),
        ({"max_tokens": 5000}, "max_tokens", "maximum context length"),
        ({"prompt": ["a", "b"]}, "prompt", "2 prompts"),
        ({"prompt": [1, 99999]}, "prompt", "vocabulary"),
        ({"stop": [""]}, "stop", "empty"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ],
)
def test_bad_field_is_400_naming_it(
    client: openai.OpenAI, fields: dict[str, Any], param: str, words: str
) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**args)
    assert caught.value.param == param
    assert words in caught.value.message
    assert caught.value.type == "invalid_request_error"


def test_malformed_body_is_400_and_the_door_keeps_serving(
    open_door: DoorFn, orchestrator: LocalEngineOrchestrator
) -> None:
    door, client = open_door(orchestrator, orchestrator.tokenizer)
    for body in (b"{not json", b"[1, 2]", b'{"model": "tensorrt_llm"}'):
        response = httpx.post(f"{door.url}/v1/completions", content=body, timeout=5)
        assert response.status_code == 400, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    huge = "x" * (10 * 2**20)  # a 10 MB prompt: refused by length, the door keeps serving
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=huge, max_tokens=4)
    assert caught.value.param == "prompt"
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        ("AdmissionRejected", 429, openai.RateLimitError),
        ("WorkerLost", 503, openai.InternalServerError),
        ("TransferTimeout", 504, openai.InternalServerError),
        ("EngineError", 500, openai.InternalServerError),
    ],
)
def test_failures_map_to_http_statuses(
    open_door: DoorFn, error: str, status: int, kind: type[openai.APIStatusError]
) -> None:
    from trtllm_prfaas import errors

    fake = FakeOrchestrator(chunks=[], error=getattr(errors, error)(f"scripted {error}"))
    _, client = open_door(fake)
    with pytest.raises(kind) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert caught.value.status_code == status
    assert f"scripted {error}" in caught.value.message


def test_error_after_the_stream_started_is_an_event(open_door: DoorFn) -> None:
    from trtllm_prfaas.errors import WorkerLost

    fake = FakeOrchestrator(chunks=[TokenChunk([72], "H")], error=WorkerLost("decode died"))
    _, client = open_door(fake)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True)
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert "decode died" in caught.value.message
    assert caught.value.code == "worker_lost"


# ------------------------------------------------------------------------------ disconnects
def test_disconnecting_stream_cancels_its_request(open_door: DoorFn) -> None:
    fake = FakeOrchestrator(chunks=[TokenChunk([72], "H")], hang=True)
    door, _ = open_door(fake)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "stream": True}
    with httpx.stream("POST", f"{door.url}/v1/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    assert fake.cancelled_event.wait(5.0), "the request was not cancelled"
    assert fake.cancelled == [fake.requests[0].request_id]


def test_disconnecting_unary_client_cancels_its_request(open_door: DoorFn) -> None:
    fake = FakeOrchestrator(chunks=[], hang=True)
    door, _ = open_door(fake)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 20}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{door.url}/v1/completions", json=body, timeout=1.0)
    assert fake.started.is_set()
    assert fake.cancelled_event.wait(5.0), "the request was not cancelled"


def test_disconnect_frees_the_engines_blocks(open_door: DoorFn) -> None:
    """A long request on the real engine: the client leaves after the first event and the
    engine is idle with every block free long before the request could have finished."""
    with LocalEngineOrchestrator(make_engine(num_blocks=320)) as orch:
        door, _ = open_door(orch, orch.tokenizer)
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4000, "temperature": 0,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{door.url}/v1/completions", json=body,
                          timeout=10) as response:  # fmt: skip
            lines = response.iter_lines()  # (dropping this iterator would close the connection)
            assert next(lines).startswith("data: ")
            assert orch.call(lambda engine: engine.has_unfinished())  # ~700 tokens to its EOS
        assert _engine_idle(orch, timeout_s=3.0), orch.leak_report()


# ------------------------------------------------------------------------------ prfaas up
def test_testbed_serves_the_openai_door_with_the_grpc_doors_tokens() -> None:
    """``prfaas up``'s router (the disaggregated orchestrator over worker processes) serves the
    OpenAI door beside gRPC: a prompt over the threshold (remote prefill, KV relayed) and one
    under it (local) get the gRPC door's text for the same seed, unary and streamed."""
    import tritonclient.grpc as grpcclient

    from trtllm_prfaas.testbed.spec import TestbedConfig
    from trtllm_prfaas.testbed.up import Testbed

    config = TestbedConfig(model_preset="tiny", grpc_port=0, metrics_port=0, openai_port=0,
                           num_blocks=512, threshold_tokens=40)  # fmt: skip
    with Testbed(config) as bed:
        assert bed.router is not None and bed.router.openai_url is not None
        assert "OpenAI-compatible API" in bed.describe()
        grpc_client = grpcclient.InferenceServerClient(bed.router.address)
        client = openai.OpenAI(base_url=f"{bed.router.openai_url}/v1", api_key="unused",
                               max_retries=0, timeout=60.0)  # fmt: skip
        try:
            for prompt in ("remote " * 12, "local"):
                grpc = grpc_client.infer(MODEL, llm_inputs(prompt, max_tokens=6, temperature=0.8,
                                                           seed=11))  # fmt: skip
                args = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=0.8, seed=11)
                done = client.completions.create(**args)  # type: ignore[call-overload]
                assert done.choices[0].text == text_of(grpc)
                assert done.usage is not None
                assert done.usage.completion_tokens == len(ids_of(grpc))
                pieces = client.completions.create(**args, stream=True)  # type: ignore[call-overload]
                assert "".join(p.choices[0].text for p in pieces) == text_of(grpc)
            counters = bed.router.orchestrator.counters
            assert counters["remote"] >= 3 and counters["local"] >= 3, counters
        finally:
            client.close()
            grpc_client.close()


# ------------------------------------------------------------------------------ prfaas router
def test_prfaas_router_takes_openai_listen() -> None:
    import argparse

    from trtllm_prfaas.router import command

    parser = argparse.ArgumentParser()
    command.add_arguments("router", parser)
    base = ["--plaintext", "--worker", "dc-local/prefill=h:1", "--worker", "dc-local/decode=h:2"]
    args = parser.parse_args(["--openai-listen", "0.0.0.0:9000", *base])
    assert command.load_settings(args).openai_listen == ("0.0.0.0", 9000)
    assert command.load_settings(parser.parse_args(base)).openai_listen is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--openai-listen", "nine-thousand", *base])


def test_prfaas_router_process_serves_openai_with_single_engine_tokens(workers: Any) -> None:  # noqa: F811
    """A real ``prfaas router --openai-listen`` process in front of real workers (the fixtures
    of ``test_router_command``): the ready line names the door; a local and a remote prompt
    (token ids) answer the single-engine tokens' text; SIGTERM exits 0 with the workers idle."""
    from tests.router import test_router_command as rc

    args = rc.router_args(workers, "--openai-listen", "127.0.0.1:0")
    with rc.RouterProcess(*args) as router:
        url = router.wait_ready()["openai"]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           timeout=60.0) as client:  # fmt: skip
            assert [m.id for m in client.models.list().data] == [MODEL]
            for length in (40, 600):  # local (l <= t), remote (l > t)
                tokens = rc.prompt(length)
                sampling = {"temperature": rc.TEMPERATURE, "seed": rc.SEED}
                done = client.completions.create(
                    model=MODEL, prompt=tokens, max_tokens=8, **sampling
                )  # type: ignore[arg-type]
                want = rc.reference(tokens, 8)
                assert done.choices[0].text == ByteTokenizer().decode(want), length
                assert done.usage is not None and done.usage.completion_tokens == len(want)
        assert router.stop() == 0
    rc.assert_workers_idle(workers)


def test_malformed_and_huge_bodies_do_not_hurt_a_concurrent_stream(
    open_door: DoorFn, orchestrator: LocalEngineOrchestrator
) -> None:
    """While a completion streams, the door gets bodies that are no JSON, a JSON of the wrong
    shape and a 10 MB prompt: each is refused with a 400, and the stream still ends with the
    unary text, after those refusals."""
    import threading

    door, client = open_door(orchestrator)
    args: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=120, temperature=0.0)
    unary = client.completions.create(**args).choices[0].text
    got: dict[str, Any] = {}

    def run() -> None:
        stream = client.completions.create(**args, stream=True)
        got["text"] = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        got["ended_at"] = time.monotonic()

    worker = threading.Thread(target=run)
    worker.start()
    with httpx.Client(base_url=door.url, timeout=30) as http:
        for body in (b"\xff" * 4096, b'{"model": "tensorrt_llm", "prompt": ', b"[]"):
            response = http.post("/v1/completions", content=body)
            assert response.status_code == 400, response.text
        huge = http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 10_000_000,
                                                   "max_tokens": 4})  # fmt: skip
        refused_at = time.monotonic()
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "prompt"
    worker.join(60)
    assert not worker.is_alive()
    assert got["text"] == unary != ""
    assert got["ended_at"] > refused_at  # the stream was in flight the whole time
    assert _engine_idle(orchestrator)

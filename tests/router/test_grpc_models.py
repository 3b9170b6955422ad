"""The front door's two models, ``tensorrt_llm`` (upstream ``llmapi``) and ``ensemble`` (the classic
``inflight_batcher_llm`` ensemble), against stock ``tritonclient.grpc`` over one tiny engine.

Checked: each model's ModelMetadata / ModelConfig is the contract (``deploy/contract.py``, and
for llmapi the config the llmapi fake rebuilt from upstream); a client written for llmapi
(cumulative streamed text) and one written for the ensemble (per-response text) end with the
unary text; undeclared inputs and wrong datatypes are refused in Triton's words; features the
engine cannot honour are refused naming the input; neutral values pass; the payload genai-perf's
``tensorrtllm`` converter builds passes perf_analyzer's input-name check and runs.
"""

from __future__ import annotations

import queue
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from tests.fakes import llmapi_model
from tests.router.builders import MODEL, ids_of, is_final, llm_inputs, tensor, text_of
from trtllm_prfaas.deploy import contract

ENSEMBLE = "ensemble"
PROMPT = "Prefill-as-a-Service moves KVCache across datacenters."
# What genai-perf --service-kind triton --backend tensorrtllm puts in each request (besides
# "model"): perf_analyzer genai-perf ``inputs/converters/tensorrtllm_converter.py`` (263c5f6 per
# the audit section 4e; 053bdb7 read here: text_input, max_tokens, stream with --streaming,
# min_length with deterministic output lengths, --extra-inputs as given).
GENAI_PERF_KEYS = ("text_input", "max_tokens", "exclude_input_in_output", "stream", "min_length")
_NP = {"TYPE_STRING": object, "TYPE_INT32": np.int32, "TYPE_UINT64": np.uint64,
       "TYPE_FP32": np.float32, "TYPE_BOOL": bool}  # fmt: skip


def ensemble_inputs(
    text: str = PROMPT, max_tokens: int | None = 12, **extra: Any
) -> list[grpcclient.InferInput]:
    """Ensemble inputs shaped [1, 1] (batch dimension first, as perf_analyzer and upstream's
    ``end_to_end_grpc_client.py`` send them); ``extra`` maps input name -> value."""
    decls = {d.name: d for d in contract.ENSEMBLE_INPUTS}
    values: dict[str, Any] = {"text_input": text.encode(), "max_tokens": max_tokens, **extra}
    inputs = []
    for name, value in values.items():
        if value is None:
            continue
        decl = decls[name]
        datatype = "BYTES" if decl.data_type == "TYPE_STRING" else decl.data_type[5:]
        array = np.array([[value]], dtype=_NP[decl.data_type])
        infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def streamed(client: Any, model: str, inputs: list[Any], timeout_s: float = 20.0) -> list[Any]:
    """Every response (or the error) of one request on a fresh stream, up to the final one."""
    received: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put(error or result))
    try:
        client.async_stream_infer(model, inputs, request_id="q")
        items = []
        while True:
            items.append(received.get(timeout=timeout_s))
            if not hasattr(items[-1], "get_response") or is_final(items[-1]):
                return items
    finally:
        client.stop_stream()


def refused(client: Any, model: str, inputs: list[Any]) -> str:
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    return str(info.value.message())


def _entries(config: Any) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    inputs = [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input]
    return inputs, [(o.name, o.data_type, list(o.dims)) for o in config.output]


# ------------------------------------------------------------------------------------ contract
def test_llmapi_metadata_and_config_are_upstreams(client) -> None:
    config = client.get_model_config(MODEL).config
    upstream = llmapi_model.model_config(decoupled=True)  # what the llmapi fake rebuilt
    inputs, outputs = _entries(config)
    want_inputs, want_outputs = _entries(upstream)
    assert inputs == [*want_inputs, ("input_ids", mc.TYPE_INT32, [-1], True)]
    assert outputs == [*want_outputs, ("output_ids", mc.TYPE_INT32, [-1])]
    assert [i[0] for i in inputs if not i[3]] == ["text_input"]
    assert (config.backend, config.max_batch_size) == ("python", 0)
    assert config.model_transaction_policy.decoupled
    meta = client.get_model_metadata(MODEL)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs][:3] == [
        ("text_input", "BYTES", [-1]), ("image_url", "BYTES", [-1]), ("streaming", "BOOL", [1])
    ]  # fmt: skip
    assert [t.name for t in meta.outputs] == [o[0] for o in outputs]


def test_ensemble_metadata_and_config_are_the_classic_contract(client) -> None:
    config = client.get_model_config(ENSEMBLE).config
    assert (config.platform, config.max_batch_size) == ("ensemble", 1)
    assert config.model_transaction_policy.decoupled
    inputs, outputs = _entries(config)
    assert [i[0] for i in inputs if not i[3]] == ["text_input", "max_tokens"]  # as upstream
    by_name = {i[0]: i for i in inputs}
    assert by_name["text_input"][1:3] == (mc.TYPE_STRING, [1])
    assert by_name["max_tokens"][1:3] == (mc.TYPE_INT32, [1])
    assert by_name["stream"][1:3] == (mc.TYPE_BOOL, [1])
    assert by_name["bad_words"][1:3] == by_name["stop_words"][1:3] == (mc.TYPE_STRING, [-1])
    for name in ("end_id", "pad_id", "top_k", "temperature", "top_p", "seed", "random_seed",
                 "exclude_input_in_output", "min_length"):  # fmt: skip
        assert by_name[name][3], name
    assert outputs[0][0] == "text_output"
    assert len({o[0] for o in outputs}) == len(outputs)  # upstream's duplicate declared once
    meta = client.get_model_metadata(ENSEMBLE)
    assert meta.platform == "ensemble"
    shapes = {t.name: list(t.shape) for t in meta.inputs}
    assert shapes["text_input"] == [-1, 1] and shapes["bad_words"] == [-1, -1]  # batch first


def test_genai_perf_payload_passes_perf_analyzer_input_check_and_runs(client) -> None:
    """perf_analyzer's DataLoader refuses a JSON key that is neither an input nor an output of
    the model config ("The input or output 'X' is not found in the model configuration",
    ``src/data_loader.cc``); every key genai-perf sends is declared by ``ensemble``."""
    config = client.get_model_config(ENSEMBLE).config
    declared = {i.name for i in config.input} | {o.name for o in config.output}
    assert set(GENAI_PERF_KEYS) <= declared
    assert "sampling_param_max_tokens" not in declared  # llmapi's names are not the ensemble's
    payload = ensemble_inputs(PROMPT, 10, exclude_input_in_output=True, stream=True)
    pieces = streamed(client, ENSEMBLE, payload)
    assert all(hasattr(r, "as_numpy") for r in pieces), pieces
    unary = client.infer(ENSEMBLE, ensemble_inputs(PROMPT, 10, exclude_input_in_output=True))
    assert "".join(text_of(r) for r in pieces) == text_of(unary) != ""
    assert "min_length" in refused(client, ENSEMBLE, ensemble_inputs(min_length=10))
    assert text_of(client.infer(ENSEMBLE, ensemble_inputs(PROMPT, 10, min_length=1,
                                exclude_input_in_output=True))) == text_of(unary)  # fmt: skip


# ------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize(("temperature", "seed"), [(None, None), (0.8, 7)])
def test_llmapi_and_ensemble_clients_end_with_the_unary_text(client, temperature, seed) -> None:
    unary = text_of(client.infer(MODEL, llm_inputs(PROMPT, 16, temperature, seed)))
    assert unary
    llmapi = streamed(client, MODEL, llm_inputs(PROMPT, 16, temperature, seed, streaming=True))
    assert len(llmapi) > 1
    texts = [text_of(r) for r in llmapi]  # an llmapi client keeps the last (cumulative) text
    assert texts[-1] == unary and all(unary.startswith(t) for t in texts)
    sampling = {"temperature": temperature, "random_seed": seed, "exclude_input_in_output": True}
    ensemble = streamed(client, ENSEMBLE, ensemble_inputs(PROMPT, 16, stream=True, **sampling))
    assert len(ensemble) > 1 and all(r.as_numpy("output_ids") is None for r in ensemble)
    assert "".join(text_of(r) for r in ensemble) == unary  # an ensemble client joins the pieces
    assert text_of(client.infer(ENSEMBLE, ensemble_inputs(PROMPT, 16, **sampling))) == unary
    sampling["exclude_input_in_output"] = None  # unary output then starts with the input
    whole = text_of(client.infer(ENSEMBLE, ensemble_inputs(PROMPT, 16, **sampling)))
    assert whole == PROMPT + unary


def test_finish_and_stop_reason_only_when_asked(client) -> None:
    plain = streamed(client, MODEL, llm_inputs(PROMPT, 4, streaming=True))
    assert all(r.as_numpy("finish_reason") is None for r in plain)
    asked = [*llm_inputs(PROMPT, 4, streaming=True), tensor("return_finish_reason", "BOOL", [True]),
             tensor("return_stop_reason", "BOOL", [True])]  # fmt: skip
    responses = streamed(client, MODEL, asked)
    reasons = [bytes(r.as_numpy("finish_reason")[0]) for r in responses]
    assert reasons == [b"None"] * (len(responses) - 1) + [b"length"]  # str(None) until the end
    assert {bytes(r.as_numpy("stop_reason")[0]) for r in responses} == {b"None"}


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("model", [MODEL, ENSEMBLE])
def test_undeclared_inputs_are_refused_in_tritons_words(client, model) -> None:
    inputs = llm_inputs() if model == MODEL else ensemble_inputs()
    message = refused(client, model, [*inputs, tensor("bogus", "INT32", [1])])
    assert f"unexpected inference input 'bogus' for model '{model}'" in message
    other = tensor("max_tokens" if model == MODEL else "sampling_param_max_tokens", "INT32", [3])
    assert "unexpected inference input" in refused(client, model, [*inputs, other])
    assert "unexpected inference input 'input_ids'" in refused(
        client, ENSEMBLE, [*ensemble_inputs(), tensor("input_ids", "INT32", [256, 65])]
    )
    wrong = tensor("temperature" if model == ENSEMBLE else "sampling_param_temperature", "INT32",
                   [1])  # fmt: skip
    assert f"data-type is 'INT32', but model '{model}' expects 'FP32'" in refused(
        client, model, [*inputs, wrong]
    )


LLMAPI_UNHONOURABLE = {
    "image_url": ("BYTES", [b"http://x/cat.png"], "multimodal"),
    "lora_name": ("BYTES", [b"adapter"], "LoRA"),
    "lora_id": ("UINT64", [3], "LoRA"),
    "sampling_param_best_of": ("INT32", [2], "best_of"),
    "sampling_param_top_k": ("INT32", [5], "top-k"),
    "sampling_param_top_p": ("FP32", [0.9], "top-p"),
    "sampling_param_frequency_penalty": ("FP32", [0.5], "frequency penalty"),
    "sampling_param_presence_penalty": ("FP32", [0.5], "presence penalty"),
    "sampling_param_stop": ("BYTES", [b"\n"], "stop strings"),
    "sampling_param_return_perf_metrics": ("BOOL", [True], "perf metrics"),
    "return_cumulative_logprob": ("BOOL", [True], "log probabilities"),
    "stop": ("BOOL", [True], "stop request"),
}
ENSEMBLE_UNHONOURABLE = {
    "stop_words": ("\n", "stop words"),
    "bad_words": ("foo", "bad words"),
    "beam_width": (2, "beam search"),
    "end_id": (2, "end id"),
    "top_k": (5, "top-k"),
    "top_p": (0.5, "top-p"),
    "repetition_penalty": (1.2, "repetition penalty"),
    "return_log_probs": (True, "log_probs"),
    "num_return_sequences": (2, "several sequences"),
    "decoder_text_input": ("x", "encoder-decoder"),
    "guided_decoding_guide_type": ("json", "guided decoding"),
}


@pytest.mark.parametrize("name", list(LLMAPI_UNHONOURABLE))
def test_llmapi_features_the_engine_cannot_honour_are_refused(client, name) -> None:
    datatype, values, feature = LLMAPI_UNHONOURABLE[name]
    message = refused(client, MODEL, [*llm_inputs(), tensor(name, datatype, values)])
    assert f"input '{name}'" in message and feature in message
    assert len(ids_of(client.infer(MODEL, llm_inputs(max_tokens=3)))) == 3  # still serving


@pytest.mark.parametrize("name", list(ENSEMBLE_UNHONOURABLE))
def test_ensemble_features_the_engine_cannot_honour_are_refused(client, name) -> None:
    value, feature = ENSEMBLE_UNHONOURABLE[name]
    if isinstance(value, str):
        value = value.encode()
    message = refused(client, ENSEMBLE, ensemble_inputs(**{name: value}))
    assert f"input '{name}'" in message and feature in message


def test_refusal_in_a_stream_names_the_feature(client) -> None:
    (error,) = streamed(client, ENSEMBLE, ensemble_inputs(stream=True, stop_words=b"\n"))
    assert isinstance(error, InferenceServerException)
    assert "stop_words" in error.message() and "q" in error.message()


def test_neutral_values_are_honoured(client) -> None:
    greedy = client.infer(MODEL, llm_inputs(PROMPT, 8))
    neutral = [*llm_inputs(PROMPT, 8, temperature=0.9, seed=3),
               tensor("sampling_param_top_k", "INT32", [1]),  # top-k 1 is greedy
               tensor("sampling_param_top_p", "FP32", [1.0]),
               tensor("sampling_param_best_of", "INT32", [1]),
               tensor("sampling_param_frequency_penalty", "FP32", [0.0]),
               tensor("sampling_param_stop", "BYTES", [b""]),
               tensor("stop", "BOOL", [False])]  # fmt: skip
    assert ids_of(client.infer(MODEL, neutral)) == ids_of(greedy)
    plain = ensemble_inputs(PROMPT, 8, exclude_input_in_output=True)
    ensemble = ensemble_inputs(PROMPT, 8, exclude_input_in_output=True, beam_width=1, top_k=0,
                               top_p=1.0, pad_id=0, length_penalty=1.0, stop_words=b"",
                               return_log_probs=False)  # fmt: skip
    assert text_of(client.infer(ENSEMBLE, ensemble)) == text_of(client.infer(ENSEMBLE, plain))


def test_ensemble_requires_max_tokens_and_one_seed(client) -> None:
    n = len(contract.ENSEMBLE_INPUTS)
    assert refused(client, ENSEMBLE, ensemble_inputs(max_tokens=None)) == (
        f"expected number of inputs between 2 and {n} but got 1 inputs for model 'ensemble'. "
        "Got input(s) ['text_input'], but missing required input(s) ['max_tokens']. Please "
        "provide all required input(s)."
    )  # Triton core's wording (tests/fakes/triton_core.py)
    assert "missing required input(s) ['text_input']" in refused(
        client, MODEL, llm_inputs(text=None)
    )
    assert "random_seed" in refused(client, ENSEMBLE, ensemble_inputs(seed=1, random_seed=1))
    assert "text_input" in refused(client, ENSEMBLE, ensemble_inputs(text=""))


def test_metrics_count_each_model_under_its_name(client, registry) -> None:
    client.infer(ENSEMBLE, ensemble_inputs(max_tokens=2))
    refused(client, ENSEMBLE, ensemble_inputs(max_tokens=None))
    client.infer(MODEL, llm_inputs(max_tokens=2))
    value = registry.get_sample_value
    labels = {"model": ENSEMBLE, "rpc": "ModelInfer"}
    assert value("prfaas_frontdoor_requests_total", {**labels, "status": "OK"}) == 1.0
    assert value("prfaas_frontdoor_requests_total", {**labels, "status": "INVALID_ARGUMENT"}) == 1
    assert value("prfaas_frontdoor_requests_total",
                 {"model": MODEL, "rpc": "ModelInfer", "status": "OK"}) == 1.0  # fmt: skip


# ---------------------------------------------------------------- through the PrfaaS router
def test_both_models_through_the_disaggregated_router() -> None:
    """The same orchestrator serves both models: a long prompt goes to the remote prefill (its
    KV relayed), a short one stays local, and each model's client gets the same text."""
    from trtllm_prfaas.testbed.spec import TestbedConfig
    from trtllm_prfaas.testbed.up import Testbed

    config = TestbedConfig(model_preset="tiny", grpc_port=0, metrics_port=0, num_blocks=512,
                           threshold_tokens=40)  # fmt: skip
    with Testbed(config) as bed:
        assert bed.router is not None
        client = grpcclient.InferenceServerClient(bed.router.address)
        try:
            for prompt in (PROMPT * 2, "short one"):
                sampling = {"temperature": 0.8, "random_seed": 5, "exclude_input_in_output": True}
                asked = ensemble_inputs(prompt, 6, stream=True, **sampling)
                pieces = streamed(client, ENSEMBLE, asked, 60)
                llmapi = streamed(client, MODEL, llm_inputs(prompt, 6, 0.8, 5, streaming=True), 60)
                assert "".join(text_of(r) for r in pieces) == text_of(llmapi[-1]) != ""
        finally:
            client.close()
        decisions = [r.decision.is_remote for r in bed.router.orchestrator.route_log]
        assert decisions == [True, True, False, False]
        assert bed.router.orchestrator.counters["relay_recomputed"] == 0


def test_typed_contents_reach_the_ensemble(serve, orchestrator) -> None:
    """A KServe client that sends typed ``contents`` (not tritonclient's raw bytes): the same
    text; an FP16 input, which has no typed field, is refused naming the input."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    door, client = serve(orchestrator)
    want = text_of(client.infer(ENSEMBLE, ensemble_inputs(PROMPT, 6, exclude_input_in_output=True)))
    request = service_pb2.ModelInferRequest(model_name=ENSEMBLE, id="typed")
    typed = {"text_input": ("BYTES", "bytes_contents", PROMPT.encode()),
             "max_tokens": ("INT32", "int_contents", 6),
             "exclude_input_in_output": ("BOOL", "bool_contents", True)}  # fmt: skip
    for name, (datatype, field, value) in typed.items():
        tensor_ = request.inputs.add(name=name, datatype=datatype, shape=[1, 1])
        getattr(tensor_.contents, field).append(value)
    with grpc.insecure_channel(door.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=20)
        assert response.id == "typed" and response.outputs[0].name == "text_output"
        assert response.raw_output_contents[0][4:].decode() == want
        request.inputs.add(name="prompt_embedding_table", datatype="FP16", shape=[1, 1, 1])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_embedding_table" in str(info.value.details())


# ------------------------------------------------------------------------- hostile requests
def test_malformed_and_huge_requests_do_not_hurt_a_concurrent_stream(serve, orchestrator) -> None:
    """While an ``ensemble`` stream runs, each model gets a 10 MB prompt (refused by length)
    and the door gets a body that is no protobuf at all (grpcio refuses it before any handler
    runs):
    the stream still ends with the unary text, after those refusals, and the door keeps
    serving both models."""
    import threading
    import time

    import grpc

    door, client = serve(orchestrator)
    args = {"exclude_input_in_output": True}
    unary = text_of(client.infer(ENSEMBLE, ensemble_inputs(PROMPT, 120, **args)))
    got: dict[str, Any] = {}

    def run() -> None:
        got["pieces"] = streamed(client, ENSEMBLE, ensemble_inputs(PROMPT, 120, stream=True,
                                                                   **args), 60)  # fmt: skip
        got["ended_at"] = time.monotonic()

    worker = threading.Thread(target=run)
    worker.start()
    huge = "a" * 10_000_000
    with grpcclient.InferenceServerClient(door.address) as other:
        for model, inputs in ((MODEL, llm_inputs(huge, 4)), (ENSEMBLE, ensemble_inputs(huge, 4))):
            assert "exceeds the max length" in refused(other, model, inputs)
        with grpc.insecure_channel(door.address) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            with pytest.raises(grpc.RpcError) as caught:
                infer(b"\xff" * 4096, timeout=10)  # bytes as sent: not a ModelInferRequest
        refused_at = time.monotonic()
        # grpcio's own answer to an undecodable request (UNKNOWN, naming the parse error)
        assert caught.value.code() == grpc.StatusCode.UNKNOWN, caught.value
        assert "Error parsing message" in str(caught.value.details())
    worker.join(60)
    assert not worker.is_alive()
    assert "".join(text_of(r) for r in got["pieces"]) == unary
    assert got["ended_at"] > refused_at  # the stream was in flight the whole time
    assert text_of(client.infer(MODEL, llm_inputs(PROMPT, 4)))
    assert text_of(client.infer(ENSEMBLE, ensemble_inputs(PROMPT, 4)))

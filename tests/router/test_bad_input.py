"""Every bad input gets INVALID_ARGUMENT (or NOT_FOUND) naming what was wrong, unary and
in-stream, and the server keeps serving afterwards."""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.router.builders import MODEL, ids_of, llm_inputs, stream, tensor

LONG_TEXT = "x" * 5000  # the tiny model's max_seq_len is 4096

BAD_INPUTS = {
    "neither prompt": (llm_inputs(text=None), "text_input"),
    "both prompts": (llm_inputs(input_ids=[256, 65]), "input_ids"),
    "empty text": (llm_inputs(text=""), "text_input"),
    "max_tokens zero": (llm_inputs(max_tokens=0), "sampling_param_max_tokens"),
    "max_tokens negative": (llm_inputs(max_tokens=-3), "sampling_param_max_tokens"),
    "max_tokens ill-typed": (
        [*llm_inputs(max_tokens=None), tensor("sampling_param_max_tokens", "INT64", [4])],
        "sampling_param_max_tokens",
    ),
    "max_tokens two values": (
        [*llm_inputs(max_tokens=None), tensor("sampling_param_max_tokens", "INT32", [4, 5])],
        "sampling_param_max_tokens",
    ),
    "temperature ill-typed": (
        [*llm_inputs(), tensor("sampling_param_temperature", "INT32", [1])],
        "sampling_param_temperature",
    ),
    "temperature negative": (llm_inputs(temperature=-0.5), "sampling_param_temperature"),
    "seed negative": (
        [*llm_inputs(), tensor("sampling_param_seed", "INT64", [-1])],
        "sampling_param_seed",
    ),
    "text ill-typed": (
        [tensor("text_input", "INT32", [1]), tensor("sampling_param_max_tokens", "INT32", [4])],
        "text_input",
    ),
    "streaming ill-typed": (
        [*llm_inputs(), tensor("streaming", "INT32", [1])],
        "streaming",
    ),
    "prompt too long": (llm_inputs(text=LONG_TEXT), "text_input"),
    "prompt + max_tokens too long": (llm_inputs(text="hi", max_tokens=4095), "max length"),
    "token outside vocabulary": (llm_inputs(text=None, input_ids=[256, 9999]), "input_ids"),
    "empty input_ids": (llm_inputs(text=None, input_ids=[]), "input_ids"),
    "unknown input": ([*llm_inputs(), tensor("bogus", "INT32", [1])], "bogus"),
}


def _still_serves(client) -> None:
    assert len(ids_of(client.infer(MODEL, llm_inputs(max_tokens=3)))) == 3


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_unary_bad_input(client, case) -> None:
    inputs, named = BAD_INPUTS[case]
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, inputs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    assert named in info.value.message()
    _still_serves(client)


@pytest.mark.parametrize("case", ["neither prompt", "max_tokens zero", "prompt too long"])
def test_stream_bad_input_is_an_in_stream_error(client, case) -> None:
    inputs, named = BAD_INPUTS[case]
    (error,) = stream(client, [*inputs, tensor("streaming", "BOOL", [True])], request_id="bad-1")
    assert isinstance(error, InferenceServerException)
    assert named in error.message() and "bad-1" in error.message()
    _still_serves(client)
    assert len(stream(client, llm_inputs(max_tokens=3, streaming=True))) == 3


def test_unknown_model_is_not_found(client) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("no_such_model", llm_inputs())
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, llm_inputs(), model_version="7")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    _still_serves(client)


def test_unknown_requested_output(client) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, llm_inputs(), outputs=[grpcclient.InferRequestedOutput("logits")])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "logits" in info.value.message()
    result = client.infer(
        MODEL, llm_inputs(max_tokens=2), outputs=[grpcclient.InferRequestedOutput("output_ids")]
    )
    assert result.as_numpy("text_output") is None and len(ids_of(result)) == 2


def test_message_limit_is_raised_above_4_mib(client) -> None:
    huge = "y" * (5 << 20)  # over grpcio's default 4 MiB: reaches validation, not a transport error
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, llm_inputs(text=huge))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "text_input" in info.value.message()
    _still_serves(client)

"""Triton core's checks of an inference request against a model config, as the llmapi fake needs
them (sources and message formats: the docstring of ``tests/fakes/llmapi_triton.py``)."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import deserialize_bytes_tensor

__all__ = ["NUMPY_TYPES", "PROTOCOL_TYPES", "CoreError", "normalize"]

PROTOCOL_TYPES = {"STRING": "BYTES"}  # KServe datatype of a TYPE_*; the others are spelled alike
NUMPY_TYPES: dict[str, Any] = {"BOOL": np.bool_, "INT32": np.int32, "UINT64": np.uint64,
                               "FP32": np.float32, "INT64": np.int64}  # fmt: skip


class CoreError(Exception):
    """A request refused before the model sees it (gRPC status + message)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _log_request(request: Any) -> str:
    return f"[request id: {request.id or '<id_unknown>'}] "


def normalize(request: Any, config: Any) -> dict[str, np.ndarray[Any, Any]]:
    """Triton core's checks of one request against the model config; the decoded inputs."""
    declared = {i.name: i for i in config.input}
    names = [t.name for t in request.inputs]
    required = [i.name for i in config.input if not i.optional]
    if not len(required) <= len(names) <= len(declared):
        missing = [n for n in required if n not in names]
        got = "[" + ",".join(f"'{n}'" for n in names) + "]"
        need = "[" + ",".join(f"'{n}'" for n in missing) + "]"
        raise CoreError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{_log_request(request)}expected number of inputs between {len(required)} and "
            f"{len(declared)} but got {len(names)} inputs for model '{config.name}'. Got "
            f"input(s) {got}, but missing required input(s) {need}. Please provide all "
            "required input(s).",
        )
    decoded = {}
    for index, tensor in enumerate(request.inputs):
        spec = declared.get(tensor.name)
        if spec is None:
            raise CoreError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unexpected inference input '{tensor.name}' for model '{config.name}'",
            )
        decoded[tensor.name] = _check_tensor(request, index, tensor, spec, config.name)
    return decoded


def _check_tensor(request: Any, index: int, tensor: Any, spec: Any, model: str) -> Any:
    expected = mc.DataType.Name(spec.data_type).removeprefix("TYPE_")
    expected = PROTOCOL_TYPES.get(expected, expected)
    prefix = _log_request(request)
    if tensor.datatype != expected:
        raise CoreError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{prefix}inference input '{tensor.name}' data-type is '{tensor.datatype}', but "
            f"model '{model}' expects '{expected}'",
        )
    shape, dims = list(tensor.shape), list(spec.dims)
    if len(shape) != len(dims) or any(d not in (-1, s) for d, s in zip(dims, shape, strict=True)):
        raise CoreError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{prefix}unexpected shape for input '{tensor.name}' for model '{model}'. Expected "
            f"[{','.join(map(str, dims))}], got [{','.join(map(str, shape))}]. ",
        )
    raw = request.raw_input_contents[index] if request.raw_input_contents else b""
    if tensor.datatype == "BYTES":
        array = deserialize_bytes_tensor(raw) if raw else np.asarray([], dtype=np.object_)
    else:
        array = np.frombuffer(raw, dtype=NUMPY_TYPES[tensor.datatype])
    count = int(np.prod(shape)) if shape else 1
    if array.size != count:
        raise CoreError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{prefix}unexpected number of elements for input '{tensor.name}' for model "
            f"'{model}'. Expected {count}, got {array.size}",
        )  # [modelled: Triton reports a byte-size mismatch here]
    return array.reshape(shape)

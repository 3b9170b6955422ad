"""The KServe v2 REST door (Triton's HTTP endpoint, :8000 by default), served by ``http_door.py``.

Endpoints, as Triton's HTTP frontend serves them (triton-inference-server/server
``docs/protocol/README.md`` and ``extension_generate.md``, stored id 6515304894, commit 0bd93bc;
what stock ``tritonclient.http`` 2.73 sends and reads: ``_utils._get_inference_request``,
``_infer_result.InferResult``):

- ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2/models/{m}[/versions/{v}]/ready``: 200,
  or 400 when not ready (Triton's ``HandleServerHealth`` answers EVHTP_RES_BADREQ);
- ``GET /v2`` (server metadata), ``GET /v2/models/{m}[/versions/{v}]`` (model metadata),
  ``.../config`` (the ModelConfig protobuf as JSON, field names as in config.pbtxt);
- ``POST .../infer``: KServe v2 JSON tensors, with Triton's binary tensor extension (an
  ``Inference-Header-Content-Length`` header, ``binary_data_size`` inputs, ``binary_data`` /
  ``binary_data_output`` outputs), which ``tritonclient.http`` uses by default;
- ``POST .../generate`` and ``.../generate_stream`` (Triton's generate extension): a JSON object
  whose keys (top level and ``parameters``) that name a model input become one-element tensors
  (other keys are request parameters the models ignore, as in Triton); the response carries
  ``model_name``, ``model_version`` and every output (one element: the value; several: a list).
  ``generate_stream`` answers ``text/event-stream``: ``data: {...}`` per response; a request
  that fails before its first response gets a JSON error with its status, a later failure a
  ``data: {"error": ...}`` event. Streaming per token follows the model's own input (``stream``
  for ``ensemble``, ``streaming`` for ``tensorrt_llm``), as for TensorRT-LLM's Triton models.

One code path with gRPC: every request becomes the ``ModelInferRequest`` the gRPC door decodes
and is run by the same ``KServeServicer`` handlers (``ModelInfer``, ``ModelStreamInfer``) over the
same orchestrator and metrics, so routing, deadlines, metrics and errors are the gRPC door's.
Errors: ``{"error": "..."}`` with the HTTP status of the gRPC code ``servicer.status_for`` maps
the error kind to (INVALID_ARGUMENT 400, NOT_FOUND 404, UNAVAILABLE 503, DEADLINE_EXCEEDED 504,
INTERNAL 500); a body that is not the JSON the endpoint takes is 400 naming the field.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import struct
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf import json_format
from tritonclient.grpc import service_pb2

from trtllm_prfaas.errors import InvalidRequestError
from trtllm_prfaas.router import kserve
from trtllm_prfaas.router.api import Orchestrator
from trtllm_prfaas.router.servicer import FrontDoorConfig, KServeServicer, status_for
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.telemetry.metrics import RouterMetrics

__all__ = ["HEADER_LENGTH", "HTTP_STATUS", "rest_app"]

log = get_logger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor extension
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_NUMPY = {"BOOL": "?", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
          "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "FP16": "<f2",
          "FP32": "<f4", "FP64": "<f8"}  # fmt: skip

# The status of the failure the servicer reported last in this request's context (a holder
# shared with the tasks the servicer starts, which copy the context).
_failure: contextvars.ContextVar[list[grpc.StatusCode]] = contextvars.ContextVar("rest_failure")


class _Aborted(Exception):
    """The servicer aborted the call (``context.abort``) with a gRPC status and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _HttpContext:
    """What the servicer's handlers use of a gRPC context, for an HTTP request.

    ``timeout_s``: the client's deadline, from Triton's ``timeout`` request parameter
    (microseconds, as ``tritonclient.http`` ``infer(timeout=...)`` sends it); None: the
    servicer's ``request_timeout_s`` applies, as for a gRPC client without a deadline."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self.timeout_s = timeout_s

    def time_remaining(self) -> float | None:
        return self.timeout_s

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


class _RestServicer(KServeServicer):
    """The gRPC door's handlers, noting each failure's status for the HTTP response."""

    def _failed(self, exc: Exception, rpc: str, request_id: str, model_name: str) -> str:
        holder = _failure.get(None)
        if holder is not None:
            holder.append(status_for(exc))
        return super()._failed(exc, rpc, request_id, model_name)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


# ------------------------------------------------------------------------- request decoding
@dataclass(frozen=True)
class _Wanted:
    """How the client wants outputs back: all binary, or per output."""

    binary_default: bool
    binary: Mapping[str, bool]


def _split_body(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """The JSON header and the binary tail of a request body (binary tensor extension)."""
    size = len(body)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError as exc:
            raise InvalidRequestError(f"header '{HEADER_LENGTH}' is not an integer") from exc
        if not 0 <= size <= len(body):
            raise InvalidRequestError(f"header '{HEADER_LENGTH}' {size} exceeds the body")
    try:
        document = json.loads(body[:size])
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"failed to parse the request JSON buffer: {exc}") from exc
    if not isinstance(document, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return document, body[size:]


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [item for element in data for item in _flatten(element)]
    return [data]


def _encode(name: str, datatype: str, values: list[Any]) -> bytes:
    """JSON ``data`` as the raw little-endian contents the gRPC path decodes."""
    if datatype == "BYTES":
        out = []
        for value in values:
            if not isinstance(value, str):
                raise InvalidRequestError(f"input '{name}': BYTES data must be strings")
            element = value.encode("utf-8")
            out.append(struct.pack("<I", len(element)) + element)
        return b"".join(out)
    dtype = _NUMPY.get(datatype)
    if dtype is None:
        return b""  # the gRPC decoding names the datatype the model expects
    if datatype == "BOOL" and not all(isinstance(v, bool) for v in values):
        raise InvalidRequestError(f"input '{name}': BOOL data must be true or false")
    if any(isinstance(v, str | dict | None) for v in values):
        raise InvalidRequestError(f"input '{name}': {datatype} data must be numbers")
    try:
        return bytes(np.asarray(values, dtype=dtype).tobytes())
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequestError(f"input '{name}': data is not {datatype}: {exc}") from exc


def _field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidRequestError(f"{where}: '{key}' is missing or not a {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "string", list: "list", int: "integer", dict: "object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _infer_request(model: str, version: str, document: Mapping[str, Any], tail: bytes) -> Any:
    """The ``ModelInferRequest`` a KServe v2 JSON (+ binary) request stands for."""
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    if "id" in document:
        request.id = str(_field(document, "id", str, "request"))
    inputs = _field(document, "inputs", list, "request")
    offset = 0
    for index, tensor in enumerate(inputs):
        where = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            raise InvalidRequestError(f"{where} must be an object")
        name = _field(tensor, "name", str, where)
        datatype = _field(tensor, "datatype", str, f"input '{name}'")
        shape = _field(tensor, "shape", list, f"input '{name}'")
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidRequestError(f"input '{name}': 'shape' must be a list of integers")
        parameters = tensor.get("parameters") or {}
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(tail):
                raise InvalidRequestError(f"input '{name}': 'binary_data_size' overruns the body")
            raw, offset = tail[offset : offset + size], offset + size
        elif "data" in tensor:
            raw = _encode(name, datatype, _flatten(tensor["data"]))
        else:
            raise InvalidRequestError(f"input '{name}': 'data' is missing")
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    for index, output in enumerate(document.get("outputs") or []):
        if not isinstance(output, dict):
            raise InvalidRequestError(f"outputs[{index}] must be an object")
        request.outputs.add(name=_field(output, "name", str, f"outputs[{index}]"))
    return request


def _timeout_s(parameters: Any) -> float | None:
    """Triton's ``timeout`` request parameter (microseconds) in seconds; None when absent."""
    if not isinstance(parameters, dict) or "timeout" not in parameters:
        return None
    value = parameters["timeout"]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidRequestError("parameter 'timeout' must be a positive integer (microseconds)")
    return value / 1e6


def _wanted(document: Mapping[str, Any]) -> _Wanted:
    parameters = document.get("parameters") or {}
    default = bool(isinstance(parameters, dict) and parameters.get("binary_data_output", False))
    binary: dict[str, bool] = {}
    for output in document.get("outputs") or []:
        params = output.get("parameters") or {}
        if isinstance(params, dict) and "binary_data" in params:
            binary[output["name"]] = bool(params["binary_data"])
    return _Wanted(default, binary)


# --------------------------------------------------------------------------- responses
def _values(datatype: str, raw: bytes) -> list[Any]:
    """Decoded output values as JSON takes them (BYTES: strings)."""
    if datatype == "BYTES":
        out: list[Any] = []
        offset = 0
        while offset < len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            out.append(raw[offset + 4 : offset + 4 + length].decode("utf-8", errors="replace"))
            offset += 4 + length
        return out
    values: list[Any] = np.frombuffer(raw, dtype=np.dtype(_NUMPY[datatype])).tolist()
    return values


def _infer_json(response: Any, wanted: _Wanted) -> Response:
    """A ``ModelInferResponse`` as Triton's HTTP endpoint writes it (binary where asked)."""
    outputs: list[dict[str, Any]] = []
    tail: list[bytes] = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.shape)}  # fmt: skip
        if wanted.binary.get(tensor.name, wanted.binary_default):
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = _values(tensor.datatype, raw)
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name,
                                "model_version": response.model_version}  # fmt: skip
    if response.id:
        document["id"] = response.id
    document["outputs"] = outputs
    header = json.dumps(document).encode()
    if not tail:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(tail), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})  # fmt: skip


def _generate_json(response: Any) -> dict[str, Any]:
    """A response as the generate extension writes it: one element -> the value, else a list."""
    document: dict[str, Any] = {"model_name": response.model_name,
                                "model_version": response.model_version}  # fmt: skip
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        values = _values(tensor.datatype, raw)
        document[tensor.name] = values[0] if len(values) == 1 else values
    return document


def _generate_request(model: Any, name: str, version: str, document: Mapping[str, Any]) -> Any:
    """The ``ModelInferRequest`` a generate-extension JSON object stands for."""
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidRequestError("'parameters' must be an object")
    fields = {**{k: v for k, v in document.items() if k != "parameters"}, **parameters}
    request = service_pb2.ModelInferRequest(model_name=name, model_version=version)
    for key, value in fields.items():
        decl = model.input_decls.get(key)
        if decl is None:
            continue  # a request parameter, as Triton passes keys that name no input
        datatype = kserve.kserve_datatype(decl)
        values = _flatten(value)
        if isinstance(value, str | int | float) and datatype == "BOOL" and value in (0, 1):
            values = [bool(value)]
        if datatype not in ("BYTES", "BOOL") and any(isinstance(v, bool) for v in values):
            values = [int(v) for v in values]
        request.inputs.add(name=key, datatype=datatype, shape=[len(values)])
        request.raw_input_contents.append(_encode(key, datatype, values))
    return request


# ------------------------------------------------------------------------------ the app
class _Door:
    """The handlers, over one servicer (the gRPC door's code path)."""

    def __init__(self, servicer: _RestServicer) -> None:
        self.servicer = servicer

    def _model(self, name: str, version: str) -> Any:
        if not self.servicer._serves(name, version):
            raise self.servicer._not_found(name, version)
        return self.servicer.models[name]

    async def infer(self, name: str, version: str, request: Request) -> Response:
        try:
            self._model(name, version)
            body = await request.body()
            document, tail = _split_body(body, request.headers.get(HEADER_LENGTH))
            infer = _infer_request(name, version, document, tail)
            wanted = _wanted(document)
            context = _HttpContext(_timeout_s(document.get("parameters")))
            response = await _unless_client_leaves(
                request, self.servicer.ModelInfer(infer, context)
            )
        except _Aborted as exc:
            return _error(_status(exc.code), exc.details)
        except InvalidRequestError as exc:
            return _error(400, str(exc))
        except _ClientLeft:
            return Response(status_code=499)
        except Exception as exc:  # the model lookup: ModelNotFound
            return _error(_status(status_for(exc)), str(exc))
        return _infer_json(response, wanted)

    async def generate(self, name: str, version: str, request: Request) -> Response:
        try:
            infer, context = await self._generate_request(name, version, request)
            answer = self.servicer.ModelInfer(infer, context)
            response = await _unless_client_leaves(request, answer)
        except _Aborted as exc:
            return _error(_status(exc.code), exc.details)
        except _ClientLeft:
            return Response(status_code=499)  # nobody reads it ("client closed request")
        except Exception as exc:
            return _error(_status(status_for(exc)), str(exc))
        return JSONResponse(_generate_json(response))

    async def _generate_request(
        self, name: str, version: str, request: Request
    ) -> tuple[Any, _HttpContext]:
        """The request and its context (``timeout``: top level or in ``parameters``)."""
        model = self._model(name, version)
        document, _ = _split_body(await request.body(), None)
        timeout = {"timeout": document["timeout"]} if "timeout" in document else None
        context = _HttpContext(_timeout_s(timeout or document.get("parameters")))
        return _generate_request(model, name, version, document), context

    async def generate_stream(self, name: str, version: str, request: Request) -> Response:
        try:
            infer, context = await self._generate_request(name, version, request)
        except Exception as exc:
            return _error(_status(status_for(exc)), str(exc))
        holder: list[grpc.StatusCode] = []
        responses: Any = self.servicer.ModelStreamInfer(_one(infer), context)
        try:
            first = await _first(responses, holder)
        except BaseException:
            await responses.aclose()
            raise
        if first.error_message:  # failed before its first response: a plain JSON error
            await responses.aclose()
            code = holder[0] if holder else grpc.StatusCode.INTERNAL
            return _error(_status(code), first.error_message)
        return StreamingResponse(_events(first, responses),
                                 media_type="text/event-stream; charset=utf-8")  # fmt: skip

    async def model_metadata(self, name: str, version: str) -> Response:
        try:
            model = self._model(name, version)
        except Exception as exc:
            return _error(404, str(exc))
        meta = kserve.model_metadata(model.name, model.inputs, model.outputs, model.platform,
                                     model.max_batch_size)  # fmt: skip

        def tensor(t: Any) -> dict[str, Any]:
            return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}

        return JSONResponse({"name": meta.name, "versions": list(meta.versions),
                             "platform": meta.platform,
                             "inputs": [tensor(t) for t in meta.inputs],
                             "outputs": [tensor(t) for t in meta.outputs]})  # fmt: skip

    async def model_config(self, name: str, version: str) -> Response:
        try:
            model = self._model(name, version)
        except Exception as exc:
            return _error(404, str(exc))
        config = kserve.model_config(model.name, model.inputs, model.outputs,
                                     backend=model.backend, platform=model.platform,
                                     max_batch_size=model.max_batch_size)  # fmt: skip
        document = json_format.MessageToDict(config, preserving_proto_field_name=True)
        return JSONResponse(_int_dims(document))

    async def model_ready(self, name: str, version: str) -> Response:
        ready = self.servicer._serves(name, version) and self.servicer.orchestrator.is_ready()
        return Response(status_code=200 if ready else 400)


class _ClientLeft(Exception):
    """The client disconnected before its unary answer; the request was cancelled."""


async def _unless_client_leaves(request: Request, call: Any) -> Any:
    """Await ``call`` (a unary handler whose request body is already read); if the client
    disconnects first, cancel it (the servicer closes the orchestrator's generator, which
    cancels the request in its engines and frees its blocks) and raise ``_ClientLeft``."""
    task = asyncio.ensure_future(call)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise _ClientLeft("the client disconnected")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read: only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _one(request: Any) -> AsyncIterator[Any]:
    yield request


async def _first(responses: Any, holder: list[grpc.StatusCode]) -> Any:
    """The stream's first response (its failure status lands in ``holder``)."""
    token = _failure.set(holder)
    try:
        return await responses.__anext__()
    finally:
        _failure.reset(token)


async def _events(first: Any, responses: Any) -> AsyncIterator[bytes]:
    """``data: {...}`` per response; a failure is ``data: {"error": ...}``. Closing the
    generator (the client left) closes the servicer's stream, which cancels the request."""
    try:
        response: Any = first
        while True:
            if response.error_message:
                yield _event({"error": response.error_message})
                return
            yield _event(_generate_json(response.infer_response))
            final = response.infer_response.parameters.get(kserve.FINAL_RESPONSE_PARAM)
            if final is not None and final.bool_param:
                return
            try:
                response = await responses.__anext__()
            except StopAsyncIteration:
                return
    finally:
        await responses.aclose()


def _event(document: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def _int_dims(value: Any) -> Any:
    """ModelConfig JSON with int64 dims as numbers (protobuf's JSON writes them as strings)."""
    if isinstance(value, dict):
        return {k: ([int(d) for d in v] if k == "dims" else _int_dims(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_int_dims(v) for v in value]
    return value


def rest_app(
    orchestrator: Orchestrator,
    config: FrontDoorConfig | None = None,
    metrics: RouterMetrics | None = None,
) -> FastAPI:
    """The KServe v2 REST app over ``orchestrator`` (serve it with ``http_door.HttpDoor`` on the
    orchestrator's loop). ``config`` is the gRPC door's (server name/version, request timeout)."""
    config = config or FrontDoorConfig()
    door = _Door(_RestServicer(orchestrator, config, metrics))
    app = FastAPI(title="trtllm-prfaas KServe v2", docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if orchestrator.is_ready() else 400)

    @app.get("/v2")
    async def server_metadata() -> Response:
        return JSONResponse({"name": config.server_name, "version": config.server_version,
                             "extensions": ["generate"]})  # fmt: skip

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        _routes(app, door, prefix)
    return app


def _routes(app: FastAPI, door: _Door, prefix: str) -> None:
    """The per-model endpoints under ``prefix`` (with or without a version)."""

    @app.get(prefix)
    async def model_metadata(name: str, version: str = "") -> Response:
        return await door.model_metadata(name, version)

    @app.get(prefix + "/config")
    async def model_config(name: str, version: str = "") -> Response:
        return await door.model_config(name, version)

    @app.get(prefix + "/ready")
    async def model_ready(name: str, version: str = "") -> Response:
        return await door.model_ready(name, version)

    @app.post(prefix + "/infer")
    async def infer(name: str, request: Request, version: str = "") -> Response:
        return await door.infer(name, version, request)

    @app.post(prefix + "/generate")
    async def generate(name: str, request: Request, version: str = "") -> Response:
        return await door.generate(name, version, request)

    @app.post(prefix + "/generate_stream")
    async def generate_stream(name: str, request: Request, version: str = "") -> Response:
        return await door.generate_stream(name, version, request)

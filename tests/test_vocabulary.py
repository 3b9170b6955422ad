"""The one vocabulary of roles and error kinds (``trtllm_prfaas/vocabulary.py``): the wire keeps
its strings, an unknown role is refused naming it, an unknown error kind is a generic internal
error, and every door reads its status from the same table."""

from __future__ import annotations

import grpc
import msgspec
import pytest

from trtllm_prfaas import errors
from trtllm_prfaas.discovery.records import BadRecord, decode_record
from trtllm_prfaas.router.openai_door import http_error_for
from trtllm_prfaas.router.servicer import status_for
from trtllm_prfaas.vocabulary import ERROR_KINDS, Role, error_from_wire, kind_of, parse_role
from trtllm_prfaas.worker import protocol as p


def test_roles_keep_their_wire_strings() -> None:
    frame = p.encode_message(p.SetRole(Role.DECODE, drain_timeout_s=1.0))
    as_text = msgspec.msgpack.encode({"type": "SetRole", "role": "decode", "drain_timeout_s": 1.0})
    assert frame == as_text
    decoded = p.decode_message(frame)
    assert isinstance(decoded, p.SetRole) and decoded.role is Role.DECODE
    assert decoded.role == "decode"  # a StrEnum: the role code written with strings still works


def test_an_unknown_role_is_refused_naming_it() -> None:
    frame = msgspec.msgpack.encode({"type": "SetRole", "role": "judge"})
    with pytest.raises(msgspec.ValidationError, match=r"SetRole\.role 'judge'"):
        p.decode_message(frame)
    report = p.LoadReport("w", 0, 0, 0, 0, 0)  # a sender that does not say its role
    assert p.decode_message(p.encode_message(report)).role == ""
    record = (b'{"name": "w", "cluster": "c", "role": "judge", "is_prfaas": false, '
              b'"control_endpoint": "tcp://h:1"}')  # fmt: skip
    with pytest.raises(BadRecord, match="role 'judge'"):
        decode_record(record)
    with pytest.raises(errors.ConfigError, match=r"--role: .* not 'judge'"):
        parse_role("judge", "--role")


def test_error_kinds_round_trip_and_unknown_ones_are_internal() -> None:
    for name, kind in ERROR_KINDS.items():
        if issubclass(kind.error, errors.PrfaasError):
            back = error_from_wire(name, "why")
            assert type(back) is kind.error and str(back) == "why"
    assert type(error_from_wire("SomeNewerError", "why")) is errors.EngineError
    assert type(error_from_wire("DependencyMissing", "why")) is errors.EngineError
    assert type(error_from_wire("TimeoutError", "")) is errors.EngineError


@pytest.mark.parametrize(
    ("exc", "code", "http"),
    [
        (errors.InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
        (errors.ModelNotFound("x"), grpc.StatusCode.NOT_FOUND, 404),
        (errors.AdmissionRejected("x"), grpc.StatusCode.UNAVAILABLE, 429),
        (errors.NotReady("x"), grpc.StatusCode.UNAVAILABLE, 503),
        (errors.WorkerLost("x"), grpc.StatusCode.UNAVAILABLE, 503),
        (errors.TransferTimeout("x"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (errors.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (errors.EngineError("x"), grpc.StatusCode.INTERNAL, 500),
        (KeyError("a bug"), grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_each_door_reads_the_same_table(
    exc: BaseException, code: grpc.StatusCode, http: int
) -> None:
    assert status_for(exc) is code
    assert http_error_for(exc)[0] == http
    assert kind_of(exc).grpc_status == code.name

"""The words that cross process boundaries, each defined once: worker roles and error kinds.

Roles: :class:`Role` is a ``StrEnum`` whose values are the strings on the wire (``"prefill"``,
``"decode"``), so a ``Role`` compares and hashes equal to its string and encodes as it (msgpack,
JSON, YAML, argv). Everything that reads a role from outside (a control message, an etcd record,
a flag, a config file) goes through :func:`parse_role`, whose error names the bad value and where
it came from.

Error kinds: a failed request crosses the control plane as data, ``Tokens.error_kind`` naming
the exception class (``"AdmissionRejected"``). :data:`ERROR_KINDS` is the one table from a kind
to its exception class and the status each front door ends the request with (the gRPC code for
KServe v2 over gRPC, and, through it, KServe v2 REST's HTTP status; the OpenAI-compatible door's
HTTP status, ``type`` and ``code``). :func:`kind_of` finds an exception's row (its nearest
class in the table, so a subclass takes its parent's statuses); :func:`error_from_wire` turns a
kind back into an exception: a kind this table does not know (a newer worker's, or a bug's
class name) becomes an :class:`~trtllm_prfaas.errors.EngineError`, a generic internal error,
and is logged.

A leaf module: it imports only ``errors`` and logging (no grpc: the gRPC code is its name, as
``grpc.StatusCode[name]`` reads it), so workers and routers can both use it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from msgspec import Struct
from msgspec.structs import force_setattr

from trtllm_prfaas import errors
from trtllm_prfaas.errors import ConfigError, PrfaasError
from trtllm_prfaas.telemetry.logging import get_logger

__all__ = [
    "ERROR_KINDS",
    "INTERNAL",
    "ROLE_NAMES",
    "ErrorKind",
    "Role",
    "error_from_wire",
    "is_kind",
    "kind_of",
    "parse_role",
    "role_field",
]

log = get_logger(__name__)


class Role(enum.StrEnum):
    """A worker's role: which half of a request it runs."""

    PREFILL = "prefill"  # runs prompts (max_tokens=1) and relays their KV to a decode worker
    DECODE = "decode"  # claims relayed KV (or computes it) and decodes


ROLE_NAMES = tuple(role.value for role in Role)


def parse_role(text: str, what: str = "role") -> Role:
    """``text`` as a Role; ConfigError names ``what`` and the bad value."""
    try:
        return Role(text)
    except ValueError:
        raise ConfigError(f"{what}: role must be one of {list(ROLE_NAMES)}, not {text!r}") from None


def role_field(struct: Struct, what: str, *, allow_empty: bool = False) -> None:
    """For a msgspec struct's ``__post_init__``: make its ``role`` field a :class:`Role`, or
    raise a ValueError (a ``msgspec.ValidationError`` when decoding) naming ``what`` and the
    value. ``allow_empty``: ``""`` (a sender that does not say) stays as it is."""
    role = struct.role  # type: ignore[attr-defined]
    if allow_empty and role == "":
        return
    try:
        force_setattr(struct, "role", Role(role))
    except ValueError:
        raise ValueError(f"{what} {role!r}: expected one of {list(ROLE_NAMES)}") from None


@dataclass(frozen=True)
class ErrorKind:
    """One row of the error vocabulary: a kind on the wire and what each door answers."""

    name: str  # on the wire (``Tokens.error_kind``): the class name
    error: type[BaseException]
    grpc_status: str  # a ``grpc.StatusCode`` member name (KServe REST maps it to HTTP)
    http_status: int  # the OpenAI-compatible door's status
    openai_type: str = "server_error"  # its error ``type``
    openai_code: str | None = None  # and ``code``


def _row(
    error: type[BaseException],
    grpc_status: str,
    http_status: int,
    openai_type: str = "server_error",
    openai_code: str | None = None,
) -> ErrorKind:
    return ErrorKind(error.__name__, error, grpc_status, http_status, openai_type, openai_code)


INTERNAL = _row(PrfaasError, "INTERNAL", 500)
_INVALID = "invalid_request_error"
_TIMEOUT = "timeout"

ERROR_KINDS: Mapping[str, ErrorKind] = MappingProxyType({
    row.name: row
    for row in (
        INTERNAL,
        _row(errors.ConfigError, "INTERNAL", 500),
        _row(errors.InvalidRequestError, "INVALID_ARGUMENT", 400, _INVALID),
        _row(errors.ModelNotFound, "NOT_FOUND", 404, _INVALID, "model_not_found"),
        _row(errors.AdmissionRejected, "UNAVAILABLE", 429, "rate_limit_error", "no_capacity"),
        _row(errors.NotReady, "UNAVAILABLE", 503, openai_code="not_ready"),
        _row(errors.EngineError, "INTERNAL", 500),
        # A request (or leg) past its deadline is DEADLINE_EXCEEDED on every door, as a
        # transfer's timeout is (the gRPC door said INTERNAL until 2026-12-06).
        _row(errors.DeadlineExceeded, "DEADLINE_EXCEEDED", 504, openai_code=_TIMEOUT),
        _row(errors.ConnectorError, "INTERNAL", 500),
        _row(errors.TransportError, "INTERNAL", 500),
        _row(errors.TransferTimeout, "DEADLINE_EXCEEDED", 504, openai_code=_TIMEOUT),
        _row(errors.WorkerLost, "UNAVAILABLE", 503, openai_code="worker_lost"),
        _row(TimeoutError, "DEADLINE_EXCEEDED", 504, openai_code=_TIMEOUT),  # asyncio's too
    )
})  # fmt: skip


def kind_of(exc: BaseException) -> ErrorKind:
    """The row of ``exc``'s nearest class in the table; :data:`INTERNAL` for anything else."""
    for cls in type(exc).__mro__:
        row = ERROR_KINDS.get(cls.__name__)
        if row is not None and row.error is cls:
            return row
    return INTERNAL


def is_kind(kind: str, error: type[BaseException]) -> bool:
    """Whether the wire kind ``kind`` names ``error`` (exactly, as the worker sent it)."""
    return kind == error.__name__


def error_from_wire(kind: str, message: str, **context: object) -> PrfaasError:
    """The exception a worker reported as ``kind`` (``Tokens.error_kind``) with ``message``.
    A kind not in the table (or not a project error) is an EngineError, logged with
    ``context`` (the request id, the worker)."""
    row = ERROR_KINDS.get(kind)
    error = row.error if row is not None else None
    if error is None or not issubclass(error, PrfaasError):
        log.warning("unknown_error_kind", error_kind=kind, error=message, **context)
        return errors.EngineError(message or kind)
    return error(message or kind)

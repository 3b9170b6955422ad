"""The registration record: what a worker puts under ``/<namespace>/workers/<cluster>/<name>``.

JSON (readable with ``etcdctl get --prefix /<namespace>/workers/``), one :class:`WorkerRecord`
per worker, version 1. It carries membership only, what a router needs to connect: the worker's
name, cluster, role, whether it is a PrfaaS (remote prefill) worker, and its control endpoint as
routers reach it. Load, queues and relay goodput stay on the ZeroMQ control plane (the router
reads the rest of ``WorkerInfo`` from the worker itself after it connects).

Decoding is strict: JSON types are not coerced, a required field missing, a role other than
``prefill``/``decode`` (``vocabulary.Role``; the error names it), a PrfaaS decode worker, an
endpoint that is not ``tcp://HOST:PORT``, or
a record whose name or cluster disagrees with its key is refused with :class:`BadRecord`, and the
reader (``router/discovered.py``) logs it and counts it instead of routing to it. Unknown fields
are accepted so a newer worker can add some without breaking older routers.
"""

from __future__ import annotations

import re

import msgspec

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.vocabulary import Role, role_field

__all__ = ["RECORD_VERSION", "BadRecord", "WorkerRecord", "decode_record", "encode_record"]

RECORD_VERSION = 1
_ENDPOINT = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):([0-9]{1,5})")
_WILDCARDS = ("0.0.0.0", "*", "[::]")


class BadRecord(ConfigError):
    """A registration that cannot be routed to; the message says why."""


class WorkerRecord(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # unique in its cluster; the router's name for the worker
    cluster: str
    role: str  # a Role once constructed or decoded
    is_prfaas: bool  # a member of a PrfaaS (remote prefill) cluster
    control_endpoint: str  # tcp://HOST:PORT as routers reach it (never a wildcard host)
    relay_endpoint: str = ""  # decode: its relay receiver (informational; WorkerInfo rules)
    model_id: str = ""
    version: int = RECORD_VERSION

    def __post_init__(self) -> None:
        role_field(self, "role")


_decoder = msgspec.json.Decoder(WorkerRecord, strict=True)


def encode_record(record: WorkerRecord) -> bytes:
    check_record(record)
    return msgspec.json.encode(record)


def decode_record(value: bytes, key: str | None = None) -> WorkerRecord:
    """The record under ``key``; :class:`BadRecord` names what is wrong."""
    try:
        record = _decoder.decode(value)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRecord(f"not a WorkerRecord: {exc}") from exc
    check_record(record)
    if key is not None:
        parts = key.split("/")
        cluster, name = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", key)
        if (record.cluster, record.name) != (cluster, name):
            raise BadRecord(
                f"record names {record.cluster}/{record.name} but lives under {cluster}/{name}"
            )
    return record


def check_record(record: WorkerRecord) -> None:
    if record.version < 1:
        raise BadRecord(f"version {record.version} < 1")
    if not record.name or not record.cluster or "/" in record.name + record.cluster:
        raise BadRecord(f"name {record.name!r} / cluster {record.cluster!r}: empty or has '/'")
    if record.is_prfaas and record.role != Role.PREFILL:
        raise BadRecord(f"{record.name}: a PrfaaS worker must be a prefill worker")
    match = _ENDPOINT.fullmatch(record.control_endpoint)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise BadRecord(f"control_endpoint {record.control_endpoint!r}: expected tcp://HOST:PORT")
    if match.group(1) in _WILDCARDS:
        raise BadRecord(f"control_endpoint {record.control_endpoint!r}: a wildcard host")

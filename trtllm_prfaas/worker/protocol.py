"""Control protocol between the router and workers, version 1 (msgpack, tagged structs).

The worker binds a ZeroMQ ROUTER socket; each router (or test) connects one DEALER. Every message
is one frame: a msgpack-encoded struct from the union below, tagged by its class name.

Router -> worker
    ``Submit``   run a request. On a prefill worker it runs the prompt (L tokens) with
                 ``max_tokens=1`` and relays the KV of all L tokens to ``relay_endpoint`` (one
                 endpoint per decode tensor-parallel rank, comma-separated) under
                 ``transfer_uuid``; its one token is t1. On a decode worker the request is the
                 prompt followed by t1 (``num_skipped_draws=1``): it waits until that transfer
                 has fully arrived (announced within ``announce_timeout_s``), then decodes from
                 t1, claiming the L relayed tokens. Without ``transfer_uuid`` a worker simply
                 runs the request end to end. ``relay_from_tokens`` (D, from the decode's
                 grant) on both legs: the prefill relays only blocks ``[D, L)`` and the states;
                 the decode holds ``[0, D)`` itself (pinned with its slot) and, should its
                 engine not hold them at admission after all, computes the prompt itself.
    ``Reserve``  hold one decode slot for ``request_id`` (a reservation id) for up to ``ttl_s``
                 until the decode leg that names it (``Submit.reservation_id``) arrives; the
                 worker is the authority on its slots (``worker/slots.py``). Answered with a
                 ``Tokens`` for the reservation id and no tokens: ``finished=False`` grants it,
                 ``finished=True`` with ``error_kind="AdmissionRejected"`` refuses it (no free
                 slot, not a decode worker, draining) and ``error_message`` says why. The slot
                 is freed when the decode leg finishes, on ``Cancel`` of the reservation id, or
                 after ``ttl_s`` unused. Idempotent. ``prefix_hashes`` (the prompt's chained
                 block hashes up to the prefix the router's index says this node holds) asks
                 the worker to hold that cached prefix with the slot: it matches them as its
                 engine's admission will, references what matched (blocks and, for a hybrid
                 model, the state snapshot) until the slot is freed, and the grant's
                 ``num_cached_tokens`` says how many tokens that is (D, block aligned, maybe
                 less than the router thought; 0 without block reuse).
    ``Cancel``   abort a request; its blocks are freed. ``Cancel`` of a reservation id frees
                 the slot (and aborts a leg still running on it); ``Cancel`` of a leg keeps its
                 reservation (the router may submit the leg again).
    ``Ping``     ask for ``WorkerInfo``.
    ``SetRole``  switch between the prefill and decode roles: the worker stops taking new requests
                 (its ``LoadReport`` says ``is_draining``), finishes the ones it has (those still
                 running at ``drain_timeout_s`` are aborted with an error), rebuilds its connector
                 runtime for the new role with the relay security it was started with (a decode
                 role binds a new relay receiver), then answers ``WorkerInfo`` with the new role
                 and relay endpoint to every router it knows. Idempotent: the current role answers
                 ``WorkerInfo`` at once.
Worker -> router
    ``Tokens``        new tokens of a request; the last one has ``finished`` set; errors travel
                      as data (``error_kind`` names the class from ``errors.py``).
    ``TransferDone``  a prefill's relay transfer ended (``error`` empty when acknowledged).
    ``LoadReport``    every ``load_report_interval_s``: queue depth, running requests, free
                      slots and blocks (what the router balances on).
    ``KvEvents``      what the worker's prefix cache stored and removed (feeds the router's
                      prefix index): ``batch`` is the engine's drained ``KvEventBatch`` as is
                      (``kv/events.py``: chained block hashes, event ids, the dropped count), at
                      most ``MAX_KV_EVENTS_PER_MESSAGE`` events per message, sent with the load
                      reports to every router the worker knows; only workers whose
                      ``WorkerInfo.prefix_cache`` is ``"events"`` send it. A router new to the
                      worker, or one that sent ``Ping`` (it joined or reconnected), gets
                      ``snapshot`` instead of that report's batch: everything the engine holds
                      (``KvSnapshot``, taken right after the drain), then the batches after it.
    ``WorkerInfo``    answer to ``Ping``, and after a role change.

Roles are the strings of ``vocabulary.Role`` (``"prefill"``, ``"decode"``); a message naming any
other role fails to decode (``msgspec.ValidationError`` naming the role), and a decoded role is a
``Role``. Error kinds are the names in ``vocabulary.ERROR_KINDS``; an unknown one still decodes
(a newer peer's) and the router reads it as a generic internal error.

Fields added since version 1 all have defaults (``SetRole``, ``LoadReport.is_draining``/``role``,
``WorkerInfo.kv_*``, ``Submit.num_skipped_draws``, ``Submit.reservation_id``,
``KvEvents.batch``/``snapshot``, ``WorkerInfo.prefix_cache``/``kv_layout``/``kv_dtype``,
``LoadReport``'s prefix-cache counters, ``Reserve.prefix_hashes``,
``Submit.relay_from_tokens``/``fills_cache``, ``LoadReport.relay_*`` sender counters), so
version-1 peers interoperate; a decode ``Submit`` without a reservation is admitted as before
(queued), and counts as a taken slot. ``LoadReport.num_free_slots`` of a decode worker counts
reservations.
"""

from __future__ import annotations

import msgspec

from trtllm_prfaas.kv.events import KvEventBatch, KvSnapshot
from trtllm_prfaas.vocabulary import role_field

__all__ = [
    "MAX_KV_EVENTS_PER_MESSAGE",
    "PROTOCOL_VERSION",
    "Cancel",
    "KvEvents",
    "LoadReport",
    "Message",
    "Ping",
    "Reserve",
    "SetRole",
    "Submit",
    "Tokens",
    "TransferDone",
    "WorkerInfo",
    "decode_message",
    "encode_message",
]

PROTOCOL_VERSION = 1
# A larger drained batch is split (event ids stay consecutive across the messages): ~30 bytes
# per removal hash, ~40 per stored block, so one message stays well under a megabyte.
MAX_KV_EVENTS_PER_MESSAGE = 1024


class Submit(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    ignore_eos: bool = False
    transfer_uuid: str | None = None
    relay_endpoint: str | None = None  # prefill workers: the decode node's relay receiver
    deadline_s: float = 300.0  # budget for the whole request on this worker
    announce_timeout_s: float = 10.0  # decode workers: wait this long for the transfer
    num_skipped_draws: int = 0  # sampling draws already spent on tokens sampled elsewhere (t1)
    reservation_id: str | None = None  # decode legs: the slot granted to a ``Reserve``
    relay_from_tokens: int = 0  # D: the decode node holds [0, D); relay [D, L) only
    # A cache move's receiving leg on a prefill worker that accepts moves: like a decode leg,
    # the prompt is the moved prefix plus one token, held until the transfer is whole, claimed,
    # and its blocks stay in the worker's prefix cache for the real prefill leg that follows
    fills_cache: bool = False


class Reserve(msgspec.Struct, tag=True, frozen=True):
    request_id: str  # the reservation id (unique per routing of a request)
    ttl_s: float = 300.0  # freed if no decode leg names it by then (the router died)
    prefix_hashes: list[int] = []  # hold this cached prefix with the slot (see above)


class Cancel(msgspec.Struct, tag=True, frozen=True):
    request_id: str


class Ping(msgspec.Struct, tag=True, frozen=True):
    version: int = PROTOCOL_VERSION


class SetRole(msgspec.Struct, tag=True, frozen=True):
    role: str  # a Role once constructed or decoded (typed str until every sender passes a Role)
    drain_timeout_s: float = 300.0  # in-flight requests left after this are aborted

    def __post_init__(self) -> None:
        role_field(self, f"{type(self).__name__}.role")


class Tokens(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    error_kind: str = ""  # e.g. "InvalidRequestError", "AdmissionRejected"
    error_message: str = ""
    num_connector_tokens: int = 0  # prompt tokens that came over the relay (on finish)
    num_cached_tokens: int = 0  # prompt tokens the worker's own prefix cache supplied (on finish)


class TransferDone(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    error: str = ""


class LoadReport(msgspec.Struct, tag=True, frozen=True):
    worker_id: str
    queue_depth: int
    num_running: int
    num_free_slots: int
    num_free_blocks: int
    num_pending_decodes: int
    relay_bytes_sent: int = 0
    relay_goodput_gbps: float = 0.0
    is_draining: bool = False  # a role change is pending: send no new requests
    role: str = ""  # a Role, or "" from a sender that does not say

    def __post_init__(self) -> None:
        role_field(self, "LoadReport.role", allow_empty=True)

    # Prefix cache (block reuse on), totals since the engine started (a role change restarts
    # them): requests that asked the cache, their prompt tokens, the tokens served from it.
    num_prefix_queries: int = 0
    num_prefix_query_tokens: int = 0
    num_prefix_reused_tokens: int = 0
    num_cached_blocks: int = 0  # named blocks in the pool (referenced or evictable)
    num_block_evictions: int = 0

    # Relay sender counters, totals over this worker's senders (``transport/stats.py``; they
    # restart with a sender): payload handed to the streams, time link-bound (pacer or full
    # stream queues with credited data ready) and the payload handed over meanwhile, time
    # waiting for credit, summed send-queue delay over chunks sent, and the kernel's TCP view
    # (0 without ``TCP_INFO``): retransmitted and sent segments, and the delivery rate of the
    # connections while the link holds them back. The router's link estimate
    # (``policy/link_estimate.py``) reads them to tell a slow link from a slow producer.
    relay_bytes_out: int = 0
    relay_link_wait_s: float = 0.0
    relay_link_wait_bytes: int = 0
    relay_credit_wait_s: float = 0.0
    relay_send_delay_sum_s: float = 0.0
    relay_chunks_sent: int = 0
    relay_tcp_retrans: int = 0
    relay_tcp_segs_out: int = 0
    relay_tcp_delivery_gbps: float = 0.0  # at the report: the kernel's link rate (0: not limiting)
    relay_tcp_bound_s: float = 0.0  # time the kernel showed the link limiting, and its rate
    relay_tcp_bound_gbit: float = 0.0  # integrated over that time (gigabits)
    # At the report, not a total: payload handed to the senders and not yet acknowledged
    # (queued for credit, the pacer or stream room, or on the wire). The router divides it by
    # its live link estimate: the prospective relay delay (``router/control.py``).
    relay_bytes_backlog: int = 0


class KvEvents(msgspec.Struct, tag=True, frozen=True):
    worker_id: str
    stored: list[int] = []  # version-1 shape (no chain, no ids): unused, kept for old peers
    removed: list[int] = []
    batch: KvEventBatch | None = None  # the engine's events in order (``kv/events.py``)
    snapshot: KvSnapshot | None = None  # all it holds, for a router new to it (applied first)


class WorkerInfo(msgspec.Struct, tag=True, frozen=True):
    worker_id: str
    role: str  # a Role once constructed or decoded
    cluster: str
    model_id: str
    max_seq_len: int
    tokens_per_block: int
    num_blocks: int
    max_num_seqs: int
    relay_endpoint: str = ""  # decode workers: where prefill workers send KV
    kv_bytes_per_token: int = 0  # S_kv(l) = kv_state_bytes + kv_bytes_per_token * l
    kv_state_bytes: int = 0
    # How the router may know this worker's prefix cache: "" none (block reuse off: it reuses
    # nothing), "events" (it sends ``KvEvents``), "approximate" (it reuses blocks but reports
    # nothing, e.g. TensorRT-LLM inside Triton: the router guesses from its own routing).
    prefix_cache: str = ""
    kv_layout: str = ""  # with model_id, kv_dtype, tokens_per_block: the blocks' CacheKey
    kv_dtype: str = ""
    version: int = PROTOCOL_VERSION


Message = (
    Submit
    | Cancel
    | Ping
    | SetRole
    | Reserve
    | Tokens
    | TransferDone
    | LoadReport
    | KvEvents
    | WorkerInfo
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode_message(message: Message) -> bytes:
    return _encoder.encode(message)


def decode_message(frame: bytes) -> Message:
    """Decode one frame; raises ``msgspec.ValidationError``/``DecodeError`` on bad input."""
    message: Message = _decoder.decode(frame)
    return message

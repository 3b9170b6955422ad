"""A worker: one engine, its PrfaaS connector, and a control endpoint for routers.

The serve loop interleaves three things, never blocking longer than ``idle_poll_s``:
control messages (submit, cancel, ping), one engine iteration when there is work, and periodic
load reports. Every request has a deadline on the worker. Failures travel back as ``Tokens`` with
``error_kind`` set; the loop itself never dies of a request's failure.

PrfaaS plans. A request with a ``transfer_uuid`` reaches the connector as a ``Plan`` posted beside
it (``connector/plans.py``): a prefill's plan covers its whole prompt and names the decode's relay
endpoints; a decode request is the prompt followed by t1, and its plan covers all but that last
token. A decode request is held here until its transfer has fully arrived in host memory (on every
tensor-parallel rank), so the connector's load cannot fail once it claimed the tokens; a transfer
not announced within ``announce_timeout_s``, or one that failed, is computed here instead (or
fails, per ``fallback``). The held decodes and the plans live in ``worker/held.py``.

Over a remote Triton engine (``WorkerConfig.triton``) the connector runs inside Triton: the engine
posts plans to the connector's plan endpoint and answers transfer-status queries from it, a
prefill sends no ``TransferDone``, and the role is fixed by the Triton deployment (``SetRole`` to
another role is answered with the current ``WorkerInfo``).

Prefix cache. With block reuse on (``EngineConfig.enable_block_reuse``, ``prfaas worker
--enable-block-reuse``) the worker says so in ``WorkerInfo.prefix_cache = "events"`` and, with
every load report, sends the engine's KV cache events to every router it knows, or its snapshot
to a router new to it or that pinged it; the load report carries the cache's counters. What
goes to whom is ``worker/prefix_reports.py``'s (``PrefixReporter``). A Triton worker says
``"approximate"``: TensorRT-LLM reuses blocks inside Triton, but no events reach this process,
so routers guess from their own routing history.

Pinned prefixes (issue 15 item 4). A ``Reserve`` with ``prefix_hashes`` on a decode worker whose
engine ``SupportsPrefixPins`` holds that cached prefix with the slot (as admission will match
it); the grant says how many tokens (``Tokens.num_cached_tokens``, D) and the router has the
prefill relay only ``[D, L)``. The pin is given back with the slot: the decode leg's end,
``Cancel`` of the reservation, its ``ttl_s``, a role change.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from trtllm_prfaas.connector.plans import Plan
from trtllm_prfaas.connector.prfaas_runtime import PrfaasConnectorConfig, Role
from trtllm_prfaas.engines.base import SupportsPrefixPins, describe
from trtllm_prfaas.engines.request import RequestOutput, SamplingParams
from trtllm_prfaas.errors import DeadlineExceeded, PrfaasError
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport import InboundStatus, RelaySecurity
from trtllm_prfaas.transport.security import ServerAuth, secure_server
from trtllm_prfaas.transport.stats import relay_report_fields
from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.assembly import (
    Assembly,
    WorkerConfig,
    WorkerRole,
    assemble,
    assemble_triton,
)
from trtllm_prfaas.worker.held import HeldDecodes, prefill_plan, remote_load, transfer_status
from trtllm_prfaas.worker.prefix_reports import PrefixReporter
from trtllm_prfaas.worker.slots import DecodeSlots

__all__ = ["WorkerConfig", "WorkerRole", "WorkerServer"]

log = get_logger(__name__)

# Handshake failures the control socket's monitor reports (libzmq zmq_socket_monitor: PROTOCOL
# for a plaintext peer on a Curve socket, a mechanism mismatch; AUTH for a ZAP refusal).
_REFUSAL_NAMES: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed_protocol",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed_auth",
}
_REFUSALS = sum(int(e) for e in _REFUSAL_NAMES)


@dataclass
class _Tracked:
    identity: bytes
    engine_id: int
    deadline: float
    verify: p.Submit | None = None  # a remote decode with a plan: check its load at 1st output
    num_relayed_tokens: int = 0  # what a remote connector reported loading (on finish)


@dataclass(frozen=True)
class _RoleChange:
    role: WorkerRole
    deadline: float  # monotonic seconds: abort what is still running after this


class WorkerServer:
    """Owns the engine, the connector runtime (relay sockets) and the control socket."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.role = config.role
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._assemble(config.role)
        try:
            self._open_control(config)
        except BaseException:
            self._built.close()
            self._ctx.destroy(linger=0)
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller = zmq.Poller()  # kept: ``Socket.poll`` would build one per call
        self._poller.register(self.socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._role_change: _RoleChange | None = None
        self._ids = itertools.count(1)
        self._requests: dict[str, _Tracked] = {}
        self._by_engine_id: dict[int, str] = {}
        self._held = HeldDecodes(config.fallback)  # relayed decodes waiting for their KV
        self._slots = DecodeSlots(describe(self.engine).max_num_seqs)  # routers reserve these
        self._pins: dict[str, tuple[int, int]] = {}  # reservation id -> (pin id, tokens held)
        self._routers: set[bytes] = set()
        self._prefix = PrefixReporter(config)
        self._transfer_owner: dict[int, tuple[bytes, str]] = {}  # prefill: who hears TransferDone
        self._next_report = 0.0
        self._stop = threading.Event()

    def _open_control(self, config: WorkerConfig) -> None:
        """Bind the control ROUTER: a Curve server whose ZAP handler (this context's
        ``ServerAuth``) admits only the allowed router keys, or plaintext (warned). A peer
        refused at the handshake never delivers a message; the socket's monitor logs it."""
        security = config.control_security or RelaySecurity.insecure_plaintext()
        self._auth = ServerAuth(self._ctx, security, plane="control")
        try:
            self.socket = self._ctx.socket(zmq.ROUTER)
            self.socket.linger = 0
            secure_server(self.socket, security)
            self._monitor = self.socket.get_monitor_socket(_REFUSALS)
            self.socket.bind(config.control_endpoint)
        except BaseException:
            self._auth.close()
            raise
        if security.curve is None:
            note = "no encryption, no authentication: anyone reaching it may submit"
            log.warning(
                "control_plaintext", side="worker", endpoint=config.control_endpoint, note=note
            )

    def _assemble(self, role: WorkerRole) -> None:
        """(Re)build the connector runtime and engine for ``role``; the relay config is kept."""
        c = self.config
        if c.triton is not None:
            built = assemble_triton(c.triton, role, c.advertise_relay)
        else:
            runtime_role = Role.DECODE if role is WorkerRole.DECODE else Role.PREFILL
            connector = PrfaasConnectorConfig(
                runtime_role, c.relay, c.relay_endpoint, c.transfer_timeout_s, c.load_timeout_s,
                relay_advertise=c.advertise_relay or None,
                accept_moves=c.accept_cache_moves and role is WorkerRole.PREFILL,
            )  # fmt: skip
            built = assemble(c.engine, connector, c.fallback)
        self._built: Assembly = built
        self.runtime, self.engine, self.relay_endpoint = (
            built.runtime,
            built.engine,
            built.relay_endpoint,
        )
        self.role = role

    # ------------------------------------------------------------------------- lifecycle
    def serve(self) -> None:
        """Run until ``stop()``. Each pass: control messages, one engine step, load report."""
        log.info(
            "worker_serving",
            worker_id=self.config.worker_id,
            endpoint=self.endpoint,
            role=self.role.value,
            relay=self.relay_endpoint,
        )
        while not self._stop.is_set():
            wait_s = self.config.idle_poll_s
            if self.engine.has_unfinished():
                wait_s = 0.0
            elif self._held:  # held decodes only: check their transfers, do not spin
                wait_s = self._held.poll_s(is_remote=self.runtime is None)
            self._poll_control(wait_s)
            self._release_held()
            self._expire_deadlines()
            if self.engine.has_unfinished():
                self._step()
            self._convert_if_drained()
            self._report_load()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Abort what is left, close the relay and control sockets. Idempotent."""
        self._stop.set()
        for request_id in list(self._requests):
            self._abort(request_id, "aborted")
        self._unpin_all()
        self._built.close()
        with contextlib.suppress(zmq.ZMQError):
            self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=0)
        self._auth.close()
        self._ctx.term()

    def __enter__(self) -> WorkerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> p.WorkerInfo:
        engine = describe(self.engine)
        mode, layout, dtype = self._prefix.info_fields()
        return p.WorkerInfo(
            self.config.worker_id,
            self.role.value,
            self.config.cluster,
            engine.model_id,
            engine.max_seq_len,
            engine.tokens_per_block,
            engine.num_blocks,
            engine.max_num_seqs,
            self.relay_endpoint,
            kv_bytes_per_token=engine.kv_bytes_per_token,
            kv_state_bytes=engine.kv_state_bytes,
            prefix_cache=mode,
            kv_layout=layout,
            kv_dtype=dtype,
        )

    # ---------------------------------------------------------------------- control plane
    def _poll_control(self, timeout_s: float) -> None:
        if not self._poller.poll(int(timeout_s * 1000)):
            return
        self._log_refusals()
        while True:
            try:
                identity, frame = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not exactly [identity, frame]: ignore the malformed message
                log.warning("control_malformed_envelope")
                continue
            if identity not in self._routers:
                self._routers.add(identity)
                self._prefix.owe_snapshot(identity)
            self._handle(identity, frame)

    def _log_refusals(self) -> None:
        """Log each peer whose handshake failed (no Curve, a key not allowed, a bad greeting)."""
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            log.warning(
                "control_peer_refused",
                worker_id=self.config.worker_id,
                handshake=_REFUSAL_NAMES.get(int(event["event"]), str(event["event"])),
                code=int(event["value"]),
                endpoint=event["endpoint"].decode("utf-8", "replace"),
            )

    def _handle(self, identity: bytes, frame: bytes) -> None:
        try:
            message = p.decode_message(frame)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("control_bad_message", error=str(exc))
            return
        if isinstance(message, p.Submit):
            self._submit(identity, message)
        elif isinstance(message, p.Cancel):
            self._cancel(message.request_id)
        elif isinstance(message, p.Reserve):
            self._reserve(identity, message)
        elif isinstance(message, p.Ping):  # a router that joins or reconnects: resync it too
            self._send(identity, self.info())
            self._prefix.owe_snapshot(identity)
        elif isinstance(message, p.SetRole):
            self._set_role(identity, message)

    def _send(self, identity: bytes, message: p.Message) -> None:
        try:
            self.socket.send_multipart([identity, p.encode_message(message)], zmq.NOBLOCK)
        except zmq.Again:  # the router is gone or not reading: it has its own deadlines
            log.warning("control_send_dropped", kind=type(message).__name__)

    def _submit(self, identity: bytes, submit: p.Submit) -> None:
        if self._role_change is not None:
            message = f"worker {self.config.worker_id} is draining for a role change"
            self._send(identity, _error_tokens(submit.request_id, "AdmissionRejected", message))
            return
        if submit.request_id in self._requests or submit.request_id in self._held:
            message = "request id already in use"
            self._send(identity, _error_tokens(submit.request_id, "InvalidRequestError", message))
            return
        why = self._bad_relay_from(submit) or self._bad_fill(submit)
        if why:
            self._send(identity, _error_tokens(submit.request_id, "InvalidRequestError", why))
            return
        if self.role is WorkerRole.DECODE and not self._take_slot(submit):
            message = (
                f"worker {self.config.worker_id}: reservation {submit.reservation_id} is gone "
                f"and no decode slot is free ({self._slots.capacity} taken)"
            )
            self._send(identity, _error_tokens(submit.request_id, "AdmissionRejected", message))
            return
        if submit.transfer_uuid and (self.role is WorkerRole.DECODE or submit.fills_cache):
            self._held.hold(identity, submit, time.monotonic())
            return
        plan = None
        if self.role is WorkerRole.PREFILL and submit.transfer_uuid:
            plan = prefill_plan(submit)
        self._add(identity, submit, plan)

    def _bad_relay_from(self, submit: p.Submit) -> str:
        """Why ``Submit.relay_from_tokens`` cannot be right here ("" when it can): D must be a
        block multiple below the prompt's L (a decode leg's prompt is L plus t1)."""
        start = submit.relay_from_tokens
        if not start:
            return ""
        tpb = describe(self.engine).tokens_per_block
        num_relayed = len(submit.prompt_token_ids) - (self.role is WorkerRole.DECODE)
        if start < 0 or start % tpb or start >= num_relayed or not submit.transfer_uuid:
            return (
                f"relay_from_tokens {start} must be a multiple of {tpb} below the relayed "
                f"prompt's {num_relayed} tokens, on a request with a transfer_uuid"
            )
        return ""

    def _bad_fill(self, submit: p.Submit) -> str:
        """Why a cache move's receiving leg cannot run here ("" when it can)."""
        if not submit.fills_cache:
            return ""
        if self.role is not WorkerRole.PREFILL or self.runtime is None:
            return f"fills_cache: worker {self.config.worker_id} is no reference prefill worker"
        if self.runtime.receiver is None or not submit.transfer_uuid:
            return (
                f"fills_cache: worker {self.config.worker_id} accepts no cache moves "
                "(accept_cache_moves) or the leg names no transfer_uuid"
            )
        return ""

    # -------------------------------------------------------------------- decode slots
    def _reserve(self, identity: bytes, message: p.Reserve) -> None:
        """Grant a decode slot (an empty, unfinished ``Tokens`` whose ``num_cached_tokens`` is
        the prefix pinned with it) or refuse it, saying why."""
        rid, why = message.request_id, ""
        if self._role_change is not None:
            why = "it is draining for a role change"
        elif self.role is not WorkerRole.DECODE:
            why = f"it is a {self.role.value} worker"
        elif not self._slots.reserve(rid, message.ttl_s, time.monotonic(), self._num_unreserved()):
            why = f"all {self._slots.capacity} decode slots are taken"
        if not why:
            num_pinned = self._pin(rid, message.prefix_hashes)
            self._send(identity, p.Tokens(rid, [], num_cached_tokens=num_pinned))
            return
        log.info("reservation_refused", worker_id=self.config.worker_id, request_id=rid, why=why)
        message_text = f"worker {self.config.worker_id} refused a decode slot: {why}"
        self._send(identity, _error_tokens(rid, "AdmissionRejected", message_text))

    def _pin(self, reservation_id: str, block_hashes: list[int]) -> int:
        """Hold the slot's cached prefix (once: a retried ``Reserve`` gets the same answer);
        the tokens held, 0 when the engine cannot pin or holds none of it."""
        if reservation_id in self._pins:
            return self._pins[reservation_id][1]
        engine = self.engine
        if not block_hashes or not isinstance(engine, SupportsPrefixPins):
            return 0
        pin_id, num_tokens = engine.pin_prefix(list(block_hashes))
        if pin_id:
            self._pins[reservation_id] = (pin_id, num_tokens)
        log.info("prefix_pinned", worker_id=self.config.worker_id, request_id=reservation_id,
                 num_tokens=num_tokens, num_asked=len(block_hashes))  # fmt: skip
        return num_tokens

    def _unpin(self, reservation_id: str | None) -> None:
        pin = self._pins.pop(reservation_id, None) if reservation_id else None
        if pin is not None and isinstance(self.engine, SupportsPrefixPins):
            self.engine.unpin_prefix(pin[0])

    def _unpin_all(self) -> None:
        for reservation_id in list(self._pins):
            self._unpin(reservation_id)

    def _end_leg(self, leg_id: str) -> None:
        """Leg ``leg_id`` is over here: its slot (and the prefix pinned with it) is free."""
        self._unpin(self._slots.leg_ended(leg_id))

    def _take_slot(self, submit: p.Submit) -> bool:
        """A decode leg's slot: its reservation, or (gone: expired) a free one taken now; a leg
        without a reservation (a version-1 router) is admitted and counted as unreserved."""
        rid = submit.reservation_id
        if rid is None:
            return True
        if rid not in self._slots:
            now, unreserved = time.monotonic(), self._num_unreserved()
            if not self._slots.reserve(rid, submit.deadline_s, now, unreserved):
                return False
        return self._slots.attach(rid, submit.request_id)

    def _cancel(self, request_id: str) -> None:
        """``Cancel``: of a reservation id, free its slot and end its legs; of a leg, end the
        leg but keep its reservation (the router may submit it again)."""
        for leg_id in self._slots.release(request_id):
            self._abort(leg_id, "aborted")
        self._unpin(request_id)
        self._slots.detach(request_id)
        self._abort(request_id, "aborted")

    def _num_unreserved(self) -> int:
        """Decodes here that came without a reservation (they take slots too)."""
        legs = [*self._requests, *self._held.request_ids()]
        return sum(1 for leg_id in legs if not self._slots.has_leg(leg_id))

    def _num_free_slots(self) -> int:
        """Free slots for routers: the engine's, and on a decode worker no more than the
        reservations leave."""
        free = self.engine.slots.num_free
        if self.role is WorkerRole.DECODE:
            free = min(free, self._slots.num_free(self._num_unreserved()))
        return free

    def _add(self, identity: bytes, submit: p.Submit, plan: Plan | None) -> None:
        exporting = plan is not None and self.role is WorkerRole.PREFILL and not submit.fills_cache
        max_tokens = 1 if exporting else submit.max_tokens  # a relayed prefill ends at t1
        ignore_eos = submit.ignore_eos or exporting
        try:
            sampling = SamplingParams(
                max_tokens, submit.temperature, submit.seed, ignore_eos, submit.num_skipped_draws
            )
            engine_id = next(self._ids)
            self.engine.add_request(submit.prompt_token_ids, sampling, engine_id, plan)
        except PrfaasError as exc:
            self._end_leg(submit.request_id)
            self._send(identity, _error_tokens(submit.request_id, type(exc).__name__, str(exc)))
            return
        deadline = time.monotonic() + submit.deadline_s
        tracked = _Tracked(identity, engine_id, deadline)
        if plan is not None and self.role is WorkerRole.DECODE and self.runtime is None:
            tracked.verify = submit  # the connector runs elsewhere: ask it how the load went
        self._requests[submit.request_id] = tracked
        self._by_engine_id[engine_id] = submit.request_id
        if exporting and self.runtime is not None:  # a remote connector reports nothing here
            self._transfer_owner[engine_id] = (identity, submit.request_id)

    def _release_held(self) -> None:
        """Held decodes whose transfer is decided join the engine or get their error."""
        now, is_remote = time.monotonic(), self.runtime is None
        for done in self._held.release(now, self._transfer_status, is_remote):
            if done.error_kind:
                self._end_leg(done.submit.request_id)
                error = _error_tokens(done.submit.request_id, done.error_kind, done.error_message)
                self._send(done.identity, error)
            else:
                self._add(done.identity, done.submit, done.plan)

    def _transfer_status(self, submit: p.Submit) -> InboundStatus | None:
        """A held decode's transfer status (``held.transfer_status``); the bench's echo worker
        overrides it (``bench/_echo.py``)."""
        return transfer_status(submit, self.runtime, self.engine)

    # ------------------------------------------------------------------------ data plane
    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a broken iteration: end every request it touched, go on
            log.error("engine_step_failed", error=repr(exc))
            for request_id in list(self._requests):
                self._abort(request_id, "error", exc)
            return
        for out in outputs:
            self._emit(out)
        self._emit_transfer_results()

    def _emit(self, out: RequestOutput) -> None:
        request_id = self._by_engine_id.get(out.request_id)
        tracked = self._requests.get(request_id) if request_id else None
        if request_id is None or tracked is None:
            return
        if tracked.verify is not None and not self._verified_load(request_id, tracked):
            return
        error = out.error
        message = p.Tokens(
            request_id,
            list(out.new_token_ids),
            out.finished,
            out.finish_reason,
            type(error).__name__ if error else "",
            str(error) if error else "",
            max(out.num_connector_tokens, tracked.num_relayed_tokens),
            out.num_cached_tokens,
        )
        if out.finished:
            self._forget(request_id)
            self._end_leg(request_id)
        self._send(tracked.identity, message)

    def _verified_load(self, request_id: str, tracked: _Tracked) -> bool:
        """A remote decode's first output: ask the connector ranks how its load went. Loaded:
        the relayed tokens are reported on finish. Failed on some rank (TensorRT-LLM cannot fail
        a parked request, so its output is suspect): abort it and run the request again here
        without the plan, loudly. False when the output must be dropped."""
        submit = tracked.verify
        assert submit is not None
        tracked.verify = None
        num_loaded = remote_load(self.engine, submit)
        if num_loaded is not None:
            tracked.num_relayed_tokens = num_loaded
            return True
        log.error("relay_load_failed_recomputing", request_id=request_id,
                  transfer_uuid=submit.transfer_uuid)  # fmt: skip
        self.engine.abort(tracked.engine_id)
        self._forget(request_id)
        self._add(tracked.identity, submit, None)
        return False

    def _emit_transfer_results(self) -> None:
        worker = self.engine.connector.worker if self.engine.connector else None
        results = getattr(worker, "transfer_errors", {})
        for engine_id, error in list(results.items()):
            del results[engine_id]
            request_id = self._transfer_owner.pop(engine_id, None)
            if request_id is not None:
                self._send(request_id[0], p.TransferDone(request_id[1], error or ""))

    def _forget(self, request_id: str) -> None:
        tracked = self._requests.pop(request_id, None)
        if tracked is not None:
            self._by_engine_id.pop(tracked.engine_id, None)

    def _abort(self, request_id: str, reason: str, error: BaseException | None = None) -> None:
        self._held.drop(request_id)
        self._end_leg(request_id)
        tracked = self._requests.get(request_id)
        if tracked is None:
            return
        self.engine.abort(tracked.engine_id)
        self._forget(request_id)
        kind = type(error).__name__ if error else ""
        self._send(
            tracked.identity,
            p.Tokens(request_id, [], True, reason, kind, str(error) if error else ""),
        )

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for reservation_id in self._slots.expire(now):
            self._unpin(reservation_id)
            log.warning("reservation_expired", worker_id=self.config.worker_id,
                        request_id=reservation_id, note="no decode leg came for it")  # fmt: skip
        for request_id, tracked in list(self._requests.items()):
            if now > tracked.deadline:
                error = DeadlineExceeded(
                    f"request {request_id} passed its deadline on worker {self.config.worker_id}"
                )
                self._abort(request_id, "error", error)

    # ---------------------------------------------------------------------- role change
    def _set_role(self, identity: bytes, message: p.SetRole) -> None:
        try:
            role = WorkerRole(message.role)
        except ValueError:
            log.warning("set_role_unknown", role=message.role)
            return
        if role is self.role and self._role_change is None:
            self._send(identity, self.info())
            return
        if self.config.triton is not None:  # the Triton deployment's connector fixes the role
            log.warning("set_role_unsupported", role=role.value, engine="triton")
            self._send(identity, self.info())
            return
        deadline = time.monotonic() + message.drain_timeout_s
        self._role_change = _RoleChange(role, deadline)
        log.info("worker_draining", worker_id=self.config.worker_id, target=role.value)
        self._next_report = 0.0  # tell routers about the drain at once

    def _is_idle(self) -> bool:
        return not (
            self.engine.has_unfinished() or self._held or self._requests or self._transfer_owner
        )

    def _convert_if_drained(self) -> None:
        """Once drained (or past the drain deadline), rebuild for the new role and announce it."""
        change = self._role_change
        if change is None:
            return
        if not self._is_idle():
            if time.monotonic() < change.deadline:
                return
            for request_id in list(self._requests):
                self._abort(request_id, "error", DeadlineExceeded("role change drain timed out"))
        self._unpin_all()
        self._built.close()
        self._transfer_owner.clear()
        self._slots.clear()
        self._role_change = None
        try:
            self._assemble(change.role)
        except PrfaasError as exc:  # e.g. no receiver keys for a decode role: keep the old one
            log.error("role_change_failed", role=change.role.value, error=str(exc))
            self._assemble(self.role)
        self._slots.capacity = describe(self.engine).max_num_seqs
        log.info("worker_role", worker_id=self.config.worker_id, role=self.role.value,
                 relay=self.relay_endpoint)  # fmt: skip
        for identity in self._routers:  # the answer to SetRole: the role now in force
            self._send(identity, self.info())
        self._next_report = 0.0

    def _report_load(self) -> None:
        now = time.monotonic()
        if now < self._next_report or not self._routers:
            return
        self._next_report = now + self.config.load_report_interval_s
        engine = self.engine
        senders = self.runtime.senders.values() if self.runtime is not None else ()
        links = [sender.stats() for sender in list(senders)]
        report = p.LoadReport(
            self.config.worker_id,
            len(engine.waiting) + len(self._held),
            len(engine.running),
            self._num_free_slots(),
            engine.blocks.num_available,
            len(self._held),
            relay_bytes_sent=sum(link.bytes_acked for link in links),
            relay_goodput_gbps=max((link.goodput_gbps for link in links), default=0.0),
            is_draining=self._role_change is not None,
            role=self.role.value,
            **self._prefix.counters(engine),
            **relay_report_fields(links),
        )
        for identity in self._routers:
            self._send(identity, report)
        for identities, message in self._prefix.messages(engine, self._routers):
            for identity in identities:
                self._send(identity, message)


def _error_tokens(request_id: str, kind: str, message: str) -> p.Tokens:
    return p.Tokens(request_id, [], True, "error", kind, message)

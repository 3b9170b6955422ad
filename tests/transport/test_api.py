"""Relay API contracts: misuse errors, timeouts on waits, the allocator hook, TCP_INFO reading."""

from __future__ import annotations

import os
import platform
import socket
import sys
import time

import pytest

from tests.transport.conftest import Relay, make_config
from trtllm_prfaas.errors import ConfigError, TransferTimeout, TransportError
from trtllm_prfaas.transport import HeapAllocator, ItemKey, Kind, RelayReceiver, TransferStatus
from trtllm_prfaas.transport.buffers import retain_freed_heap
from trtllm_prfaas.transport.stats import SendCounters, read_tcp_info


class RecordingAllocator(HeapAllocator):
    """A stand-in for a block pool: records what it hands out and gets back."""

    def __init__(self) -> None:
        super().__init__(max_cached_bytes=0)
        self.allocated: list[tuple[ItemKey, int]] = []
        self.freed: list[ItemKey] = []

    def allocate(self, key: ItemKey, nbytes: int) -> memoryview:
        self.allocated.append((key, nbytes))
        return super().allocate(key, nbytes)

    def free(self, key: ItemKey, buffer: memoryview) -> None:
        self.freed.append(key)
        super().free(key, buffer)


def test_allocator_hook_supplies_and_gets_back_buffers(relay: Relay) -> None:
    config = make_config()
    pool = RecordingAllocator()
    with relay.receiver(config, allocator=pool) as rx, relay.sender(rx.endpoint, config) as tx:
        handle = tx.open_transfer("t-pool", "req-1", deadline_s=5.0)
        handle.send(Kind.FULL_BLOCK, 0, (2, 5), bytes(range(256)) * 1000, last_in_layer=False)
        handle.send(Kind.STATE, 0, (0, 0), b"s" * 100)
        handle.finish()
        handle.wait(timeout_s=5.0)
        blocks, state = rx.wait_layer("t-pool", 0, timeout_s=1.0)
        assert (
            bytes(blocks.buffer) == bytes(range(256)) * 1000 and bytes(state.buffer) == b"s" * 100
        )
        assert [
            (k.item_index, k.kind, k.block_start, k.block_end, n) for k, n in pool.allocated
        ] == [
            (0, Kind.FULL_BLOCK, 2, 5, 256_000),
            (1, Kind.STATE, 0, 0, 100),
        ]
        rx.release_layer("t-pool", 0)
        assert sorted(k.item_index for k in pool.freed) == [0, 1]
        with pytest.raises(ValueError):
            bytes(blocks.buffer)  # released views cannot be read by mistake
        rx.release("t-pool")


def test_default_receiver_keeps_frames_and_assembles_on_demand(relay: Relay) -> None:
    config = make_config(chunk_bytes=64 << 10)
    big = bytes(range(256)) * 1000  # 256_000 bytes: 4 chunks
    with relay.receiver(config) as rx, relay.sender(rx.endpoint, config) as tx:
        handle = tx.open_transfer("t-frames", "req-1", deadline_s=5.0)
        handle.send(Kind.FULL_BLOCK, 0, (0, 4), big, last_in_layer=False)
        handle.send(Kind.STATE, 0, (0, 0), b"s" * 100)
        handle.finish()
        handle.wait(timeout_s=5.0)
        blocks, state = rx.wait_layer("t-frames", 0, timeout_s=1.0)
        assert [offset for offset, _ in blocks.chunks] == [0, 65536, 131072, 196608]
        assert b"".join(bytes(piece) for _, piece in blocks.chunks) == big
        assert bytes(blocks.buffer) == big and blocks.buffer is blocks.buffer  # assembled once
        assert state.buffer is state.chunks[0][1]  # one chunk: the frame itself, no copy
        state.buffer[0] = ord("t")  # writable, like an allocator's buffer
        assert bytes(state.buffer) == b"t" + b"s" * 99
        rx.release_layer("t-frames", 0)
        for item in (blocks, state):
            with pytest.raises(ValueError):
                bytes(item.buffer)  # released: never read by mistake
        rx.release("t-frames")
        assert rx.stats().buffered_bytes == 0


def test_retain_freed_heap_only_raises() -> None:
    if platform.libc_ver()[0] != "glibc":
        assert not retain_freed_heap(1 << 20)
        return
    assert retain_freed_heap(64 << 20)
    assert retain_freed_heap(1 << 20)  # smaller: already covered, nothing lowered


def test_misuse_raises_and_waits_time_out(relay: Relay) -> None:
    config = make_config()
    with relay.receiver(config) as rx, relay.sender(rx.endpoint, config) as tx:
        handle = tx.open_transfer("t-misuse", "req-2", deadline_s=5.0)
        with pytest.raises(TransportError, match="kind"):
            handle.send(Kind.CONTROL, 0, (0, 1), b"x")
        with pytest.raises(TransportError, match="empty"):
            handle.send(Kind.FULL_BLOCK, 0, (0, 1), b"")
        handle.send(Kind.FULL_BLOCK, 0, (0, 1), b"x")
        with pytest.raises(TransportError, match="last_in_layer"):
            handle.send(Kind.FULL_BLOCK, 0, (1, 2), b"y")
        with pytest.raises(TransferTimeout, match="not done"):
            handle.wait(
                timeout_s=0.05
            )  # finish() not called yet: the wait times out, not the transfer
        handle.finish()
        with pytest.raises(TransportError, match="after finish"):
            handle.send(Kind.FULL_BLOCK, 1, (0, 1), b"z")
        handle.wait(timeout_s=5.0)
        assert handle.status is TransferStatus.DONE and not handle.failed
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match="layer 0 of transfer nope"):
            rx.wait_layer("nope", 0, timeout_s=0.1)
        assert time.monotonic() - start < 0.5
        with pytest.raises(TransportError, match="without layer 7"):
            rx.wait_layer("t-misuse", 7, timeout_s=1.0)
        rx.release("t-misuse")
        with pytest.raises(TransportError, match="released"):
            rx.wait_layer("t-misuse", 0, timeout_s=1.0)


def test_sender_close_fails_open_transfers(relay: Relay) -> None:
    config = make_config()
    with relay.receiver(config) as rx:
        tx = relay.sender(rx.endpoint, config)
        handle = tx.open_transfer("t-open", "req-3", deadline_s=30.0)
        tx.close()
        with pytest.raises(TransportError, match="closed"):
            handle.wait(timeout_s=1.0)
        with pytest.raises(TransportError, match="closed RelaySender"):
            tx.open_transfer("t-after", "req-4")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO is Linux-only")
def test_tcp_info_reads_loopback_counters() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            client.sendall(b"x" * 100_000)
            conn.recv(1)
            info = read_tcp_info(client.fileno())
            assert info is not None
            assert (info.local_port, info.remote_port) == (
                client.getsockname()[1],
                server.getsockname()[1],
            )
            assert info.total_retrans == 0 and info.bytes_acked > 0
            assert client.fileno() >= 0  # the fd stays the caller's
    assert read_tcp_info(10_000) is None  # not an open fd


def _cpus_of(native_id: int | None) -> str:
    """``Cpus_allowed_list`` of one thread of this process (Linux)."""
    with open(f"/proc/self/task/{native_id}/status") as f:
        return next(x for x in f if x.startswith("Cpus_allowed_list")).split()[1]


def _zmq_io_threads() -> set[int]:
    out = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            if f.read().startswith("ZMQbg/IO"):
                out.add(int(tid))
    return out


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="CPU pinning needs Linux and at least 2 CPUs to be observable",
)
def test_cpu_affinity_pins_the_relay_threads_and_moves_bytes(relay: Relay) -> None:
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    config = make_config(cpu_affinity=frozenset({cpu}))
    before = _zmq_io_threads()
    rx = relay.receiver(config)
    with rx, relay.sender(rx.endpoint, config) as tx:
        handle = tx.open_transfer("pinned", "r")
        payload = bytes(range(256)) * 1024
        handle.send(Kind.FULL_BLOCK, 0, (0, 1), payload)
        handle.finish()
        handle.wait(timeout_s=10)
        assert _cpus_of(tx._thread.native_id) == str(cpu)
        assert _cpus_of(rx._io._thread.native_id) == str(cpu)
        zmq_io = _zmq_io_threads() - before
        assert len(zmq_io) == 2 and {_cpus_of(t) for t in zmq_io} == {str(cpu)}
        assert rx.wait_layer("pinned", 0, 5.0)[0].buffer.tobytes() == payload
        rx.release("pinned")
    assert os.sched_getaffinity(0) == allowed  # the caller's thread is left alone


def test_cpu_affinity_is_checked_at_the_boundary() -> None:
    with pytest.raises(ConfigError, match="cpu_affinity"):
        make_config(cpu_affinity=frozenset())
    with pytest.raises(ConfigError, match="cpu_affinity"):
        make_config(cpu_affinity=frozenset({-1}))
    if hasattr(os, "sched_getaffinity"):
        unavailable = frozenset({max(os.sched_getaffinity(0)) + 1000})
        with pytest.raises(ConfigError, match="not available"):
            RelayReceiver(make_config(cpu_affinity=unavailable))


def test_goodput_counts_busy_time_not_idle_gaps() -> None:
    counters = SendCounters(num_streams=1)
    gbit = 125_000_000  # bytes
    # Transfer 1: 1 Gbit in flight from t=0 to its ack at t=1; idle until t=10.
    counters.on_chunk(0, gbit, queued_s=0.0, now_s=0.0)
    counters.on_settled(gbit, acked=True, now_s=1.0)
    # Transfer 2: 1 Gbit from t=10, acked at t=11; then a failed one with nothing acked.
    counters.on_chunk(0, gbit, queued_s=10.0, now_s=10.0)
    counters.on_settled(gbit, acked=True, now_s=11.0)
    counters.on_chunk(0, 1000, queued_s=20.0, now_s=20.0)
    stats = counters.snapshot("tcp://x:1", {}, 0, now_s=30.0)
    assert stats.goodput_gbps == pytest.approx(1.0)  # 2 Gbit over 2 busy seconds, not 11
    counters.on_settled(1000, acked=False, now_s=25.0)
    assert counters.snapshot("tcp://x:1", {}, 0, 30.0).goodput_gbps == pytest.approx(2 / 7)

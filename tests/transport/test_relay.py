"""Real loopback transfers through RelaySender/RelayReceiver (127.0.0.1 only)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.transport.conftest import (
    Relay,
    curve_security,
    free_loopback_port,
    make_config,
    wait_until,
)
from trtllm_prfaas.errors import TransferTimeout, TransportError
from trtllm_prfaas.transport import (
    CorruptChunk,
    InboundStatus,
    Kind,
    RelayReceiver,
    RelaySender,
    TransferStatus,
)

# KV-shaped: [num_blocks, kv_factor, num_kv_heads * tokens_per_block * head_dim] per layer
NUM_LAYERS, NUM_BLOCKS, ROW = 4, 6, 2 * 16 * 64


def kv_layers(num_layers: int = NUM_LAYERS, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(NUM_BLOCKS, 2, ROW, generator=gen).to(torch.bfloat16) for _ in range(num_layers)
    ]


def assert_layers_equal(rx: RelayReceiver, tid: str, layers: list[torch.Tensor]) -> None:
    for i, expected in enumerate(layers):
        (item,) = rx.wait_layer(tid, i, timeout_s=5.0)
        assert item.key.kind is Kind.FULL_BLOCK and (item.key.block_start, item.key.block_end) == (
            0,
            NUM_BLOCKS,
        )
        got = torch.frombuffer(item.buffer, dtype=torch.bfloat16).reshape(expected.shape)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("num_streams", [1, 4])
@pytest.mark.parametrize("secure", [False, True])
def test_loopback_transfer_is_byte_exact(
    relay: Relay, curve_keys, num_streams: int, secure: bool
) -> None:
    security = curve_security(curve_keys) if secure else make_config().security
    config = make_config(num_streams=num_streams, security=security)
    layers = kv_layers()
    state = torch.randn(3, 128)  # a linear-attention recurrent state
    with relay.receiver(config) as rx, relay.sender(rx.endpoint, config) as tx:
        assert tx.wait_ready(timeout_s=5.0)
        handle = tx.open_transfer("t-exact", "req-1", deadline_s=10.0)
        for i, layer in enumerate(layers):
            assert handle.send(Kind.FULL_BLOCK, i, (0, NUM_BLOCKS), layer)
        assert handle.send(Kind.STATE, NUM_LAYERS, (0, 0), state)
        handle.finish()
        handle.wait(timeout_s=10.0)
        assert handle.status is TransferStatus.DONE
        assert_layers_equal(rx, "t-exact", layers)
        (item,) = rx.wait_layer("t-exact", NUM_LAYERS, 1.0)
        assert item.key.kind is Kind.STATE
        assert torch.equal(
            torch.frombuffer(item.buffer, dtype=torch.float32).reshape(3, 128), state
        )
        assert rx.wait_transfer("t-exact", 1.0) == frozenset(range(NUM_LAYERS + 1))
        assert rx.stats().num_connections == num_streams  # really N TCP connections
        stats = tx.stats()
        assert stats.bytes_acked == sum(t.nbytes for t in layers) + state.nbytes
        assert stats.bytes_in_flight == 0
        assert stats.tcp_total_retrans == 0  # read from TCP_INFO; 0 on loopback
        assert all(s.bytes_sent > 0 for s in stats.streams)
        rx.release("t-exact")
        assert rx.stats().buffered_bytes == 0


def test_corrupt_chunk_fails_transfer_and_tells_sender(relay: Relay) -> None:
    config = make_config()

    def flip_one(header, payload: memoryview) -> bytes:
        if header.layer == 1 and header.offset == 0:
            broken = bytearray(payload)
            broken[7] ^= 0xFF
            return bytes(broken)
        return payload

    with relay.receiver(config) as rx, relay.sender(rx.endpoint, config, chunk_hook=flip_one) as tx:
        handle = tx.open_transfer("t-corrupt", "req-2", deadline_s=5.0)
        for i, layer in enumerate(kv_layers()):
            handle.send(Kind.FULL_BLOCK, i, (0, NUM_BLOCKS), layer)
        handle.finish()
        with pytest.raises(TransportError, match="corrupt chunk") as info:
            handle.wait(timeout_s=5.0)
        assert not isinstance(info.value, TransferTimeout)
        assert handle.status is TransferStatus.FAILED
        with pytest.raises(CorruptChunk, match="corrupt chunk"):
            rx.wait_layer("t-corrupt", 1, timeout_s=1.0)
        assert rx.status("t-corrupt") is InboundStatus.FAILED
        assert rx.stats().corrupt_chunks == 1 and rx.stats().buffered_bytes == 0


def test_unknown_curve_client_is_refused_within_deadline(relay: Relay, curve_keys) -> None:
    server = make_config(security=curve_security(curve_keys))
    intruder = make_config(security=curve_security(curve_keys, client="intruder"))
    with relay.receiver(server) as rx, relay.sender(rx.endpoint, intruder) as tx:
        start = time.monotonic()
        handle = tx.open_transfer("t-intruder", "req-3", deadline_s=1.5)
        handle.send(Kind.FULL_BLOCK, 0, (0, NUM_BLOCKS), kv_layers(1)[0])
        handle.finish()
        with pytest.raises(TransportError, match="Curve key"):
            handle.wait(timeout_s=5.0)
        assert time.monotonic() - start < 1.5 + 0.5
        assert rx.status("t-intruder") is None and rx.stats().bytes_received == 0


def test_dead_peer_times_out_within_deadline_and_frees(relay: Relay) -> None:
    config = make_config()
    with relay.sender(f"tcp://127.0.0.1:{free_loopback_port()}", config) as tx:
        start = time.monotonic()
        handle = tx.open_transfer("t-dead", "req-4", deadline_s=0.5)
        handle.send(Kind.FULL_BLOCK, 0, (0, NUM_BLOCKS), kv_layers(1)[0])
        handle.finish()
        with pytest.raises(TransferTimeout, match=r"deadline.*no credit ever arrived"):
            handle.wait(timeout_s=5.0)
        assert 0.5 <= time.monotonic() - start < 1.0
        assert tx.stats().bytes_in_flight == 0 and not tx._transfers
        assert handle.send(Kind.FULL_BLOCK, 1, (0, 1), b"x") is False  # failure is data


def test_receiver_restart_fails_inflight_then_later_transfer_succeeds(relay: Relay) -> None:
    config = make_config(credit_bytes=64 << 10, chunk_bytes=16 << 10)
    layers = kv_layers()
    rx = relay.receiver(config)
    endpoint = rx.endpoint
    with relay.sender(endpoint, config) as tx:
        stuck = tx.open_transfer("t-inflight", "req-5", deadline_s=10.0)
        for i, layer in enumerate(layers):  # 4 x 48 KiB > 64 KiB credit: stalls unreleased
            stuck.send(Kind.FULL_BLOCK, i, (0, NUM_BLOCKS), layer)
        stuck.finish()
        assert wait_until(lambda: rx.stats().bytes_received > 0, 5.0)
        rx.close()
        with pytest.raises(TransportError, match="lost its connection"):
            stuck.wait(timeout_s=5.0)
        assert tx.stats().bytes_queued == 0  # its unsent bytes left the backlog with it
        assert tx.stats().bytes_in_flight == 0
        # The first lost stream fails the transfer; the others' disconnects may be seen a few ms
        # later. A transfer started on a stream whose loss is not yet seen fails too, by design
        # (its bytes may have gone into the dead connection), so wait until the sender has seen
        # every stream go before starting the next one.
        assert wait_until(lambda: tx.num_connections() == 0, 5.0)
        with relay.receiver(config, endpoint) as rx2:
            later = tx.open_transfer("t-later", "req-6", deadline_s=10.0)
            for i, layer in enumerate(layers[:1]):
                later.send(Kind.FULL_BLOCK, i, (0, NUM_BLOCKS), layer)
            later.finish()
            later.wait(timeout_s=10.0)
            assert_layers_equal(rx2, "t-later", layers[:1])
            rx2.release("t-later")


def test_credit_bounds_receiver_buffer(relay: Relay) -> None:
    credit = 96 << 10
    config = make_config(credit_bytes=credit, chunk_bytes=16 << 10)
    layers = kv_layers(num_layers=12)  # 12 x 48 KiB = 576 KiB through a 96 KiB window
    with relay.receiver(config) as rx, relay.sender(rx.endpoint, config) as tx:
        handle = tx.open_transfer("t-credit", "req-7", deadline_s=20.0)
        for i, layer in enumerate(layers):
            handle.send(Kind.FULL_BLOCK, i, (0, NUM_BLOCKS), layer)
        handle.finish()
        # The relay's backlog (queued behind credit + sent, not acknowledged) is all of it.
        total = sum(layer.nbytes for layer in layers)
        assert wait_until(lambda: _backlog(tx) == total, 5.0), tx.stats()
        assert tx.stats().bytes_queued >= total - credit
        for i, expected in enumerate(layers):
            (item,) = rx.wait_layer("t-credit", i, timeout_s=10.0)
            assert bytes(item.buffer) == expected.view(torch.uint8).numpy().tobytes()
            time.sleep(0.01)  # a slow consumer
            rx.release_layer("t-credit", i)
        handle.wait(timeout_s=10.0)
        assert _backlog(tx) == 0
        assert 48 << 10 <= rx.stats().max_buffered_bytes <= credit
        rx.release("t-credit")


def _backlog(tx: RelaySender) -> int:
    stats = tx.stats()
    return stats.bytes_queued + stats.bytes_in_flight


def test_paced_transfer_takes_at_least_bytes_over_rate(relay: Relay) -> None:
    config = make_config(link_gbps=0.2, chunk_bytes=64 << 10, pacing_burst_bytes=64 << 10)
    payload = torch.randint(0, 255, (2 << 20,), dtype=torch.uint8)  # 2 MiB at 25 MB/s ~ 84 ms
    with relay.receiver(config) as rx, relay.sender(rx.endpoint, config) as tx:
        start = time.monotonic()
        handle = tx.open_transfer("t-paced", "req-8", deadline_s=10.0)
        handle.send(Kind.FULL_BLOCK, 0, (0, 1), payload)
        handle.finish()
        handle.wait(timeout_s=10.0)
        elapsed = time.monotonic() - start
        assert elapsed >= payload.nbytes / (0.2e9 / 8)
        rx.release("t-paced")


def test_layer_signalled_before_transfer_ends(relay: Relay) -> None:
    config = make_config()
    layers = kv_layers(num_layers=2)
    with relay.receiver(config) as rx, relay.sender(rx.endpoint, config) as tx:
        handle = tx.open_transfer("t-layered", "req-9", deadline_s=10.0)
        handle.send(Kind.FULL_BLOCK, 0, (0, NUM_BLOCKS), layers[0])
        rx.wait_layer("t-layered", 0, timeout_s=5.0)
        assert rx.completed_layers("t-layered") == {0}
        assert rx.status("t-layered") is InboundStatus.RECEIVING
        assert handle.status is TransferStatus.OPEN
        handle.send(Kind.FULL_BLOCK, 1, (0, NUM_BLOCKS), layers[1])
        handle.finish()
        handle.wait(timeout_s=5.0)
        assert rx.completed_layers("t-layered") == {0, 1}
        rx.release("t-layered")


def test_cancel_drops_receiver_buffers(relay: Relay) -> None:
    config = make_config()
    with relay.receiver(config) as rx, relay.sender(rx.endpoint, config) as tx:
        handle = tx.open_transfer("t-cancel", "req-10", deadline_s=10.0)
        handle.send(Kind.FULL_BLOCK, 0, (0, NUM_BLOCKS), kv_layers(1)[0])
        rx.wait_layer("t-cancel", 0, timeout_s=5.0)
        handle.cancel()
        with pytest.raises(TransportError, match="cancelled"):
            handle.wait(timeout_s=1.0)
        assert wait_until(lambda: rx.status("t-cancel") is InboundStatus.FAILED, 2.0)
        assert rx.stats().buffered_bytes == 0


def test_many_senders_share_one_receiver(relay: Relay) -> None:
    config = make_config(num_streams=2)
    layers = kv_layers(num_layers=2)
    with (
        relay.receiver(config) as rx,
        relay.sender(rx.endpoint, config) as a,
        relay.sender(rx.endpoint, config) as b,
    ):
        handles = [tx.open_transfer(f"t-{n}", f"req-{n}", 10.0) for n, tx in (("a", a), ("b", b))]
        workers = [threading.Thread(target=_send_all, args=(h, layers)) for h in handles]
        for w in workers:
            w.start()
        for w in workers:
            w.join(10.0)
        for h in handles:
            h.wait(timeout_s=10.0)
            assert_layers_equal(rx, h.transfer_id, layers)
            rx.release(h.transfer_id)


def _send_all(handle, layers: list[torch.Tensor]) -> None:
    for i, layer in enumerate(layers):
        handle.send(Kind.FULL_BLOCK, i, (0, NUM_BLOCKS), layer)
    handle.finish()


def test_consumer_abandoning_a_transfer_stops_the_sender_at_once(relay: Relay) -> None:
    """A decode request cancelled mid-transfer releases its inbound transfer; the sender must
    hear it (and free the prefill's pinned blocks) now, not at its deadline."""
    config = make_config()
    layers = kv_layers()
    with relay.receiver(config) as rx, relay.sender(rx.endpoint, config) as tx:
        assert tx.wait_ready(timeout_s=5.0)
        handle = tx.open_transfer("t-abandoned", "req-9", deadline_s=60.0)
        handle.send(Kind.FULL_BLOCK, 0, (0, NUM_BLOCKS), layers[0])
        rx.wait_layer("t-abandoned", 0, timeout_s=5.0)
        start = time.monotonic()
        rx.release("t-abandoned")  # the consumer gives up before the transfer completed
        with pytest.raises(TransportError, match="released transfer t-abandoned"):
            handle.wait(timeout_s=10.0)
        assert time.monotonic() - start < 5.0
        assert handle.status is TransferStatus.FAILED

"""Relay goodput vs raw TCP on loopback, measured side by side in one run.

Moves ``--gib`` GiB of KV-shaped blocks (bf16 ``[num_blocks, 2, heads*tokens*head_dim]`` per
layer) five ways: plain Python sockets with 4 threads (the baseline), the same with the sending
threads pinned to one core and the receiving threads to another (``raw_pinned``, like the relay
below), the same landing in one reused chunk-sized buffer (``raw_scratch``, the baseline of
earlier versions, for comparison), the relay with 4 plaintext streams, and the relay with 4
Curve streams. The relay's sender pins its I/O threads to the first CPU and its receiver to the
second (``RelayConfig.cpu_affinity``, when the host has two); the anchor of
``relay_over_raw_tcp`` is raw TCP at its best, pinned or not. As in a deployment, the receiving
side runs in its own process (spawned once, serving every measurement): the relay's consumer
there waits for each layer and releases it, as a decode worker would; each raw stream
``recv_into``s its own warm destination region (``CREDIT_BYTES`` in all, the most the relay may
hold), wrapping around. A measurement runs from the sender's first byte to the receiver's "all
arrived". Each way runs once small to warm up, then ``--repeats`` times interleaved; the best of
each is reported (the host is shared, so the best run is the least disturbed one), with the
least CPU (user + system, both processes) per GiB it took, which other users disturb less.
Prints one JSON line with ``--json``.

Like for like: both sides move the same bytes from the same source tensor into preallocated,
recycled memory, and neither consumer reads the bytes after they land (the relay's land in
the ZeroMQ frames it keeps, readable as ``ReceivedItem.chunks``, which is how the connector
places them). The raw baseline does what the relay must not skip: it has no framing, no
checksums, no credits and no deadlines.

Figures (2-core shared VM, load in brackets; ``cpu`` is CPU-s/GiB relay vs raw):
- first version (1 MiB chunks, XXH64, copy into heap buffers): 0.28-0.41; cpu 1.2 vs 0.48.
- 2 MiB chunks, XXH3, frames kept, glibc thresholds raised: 0.59-0.70 [load 1.2-2.5];
  cpu 0.61-0.70 vs 0.40-0.48.
- + pinned relay threads, 1 MiB chunks (now): 0.71-0.76 in 4 A/B rounds against 0.59-0.70
  unpinned; relay 24.6-28.8 Gbit/s against raw 34-41; cpu 0.52-0.63 vs 0.40-0.46. Raw TCP
  pinned the same way is slower (26-28 Gbit/s), so the anchor stays the unpinned raw.

Why not 0.8 on this box: both ends share two cores, so goodput goes inversely with CPU per byte,
and the relay's floor is raw's kernel copies (its ZeroMQ I/O threads spend about what raw TCP
spends) plus the checksums. Measured by switching parts off (diagnostics, not options): without
any checksum the relay reached 0.87-0.93 of raw (cpu 0.49-0.51 vs 0.45-0.47); without only the
receiver's it stayed at 0.65-0.75; without only the sender's it reached 0.87-0.89. The sender's
XXH3 pass reads the source from DRAM (~0.1 CPU-s/GiB under this load, against ~0.04 alone),
the receiver's reads a frame the kernel has just written. Measured and not kept: io_threads=2,
2-8 MiB chunks unpinned, a shallower send queue (``sndhwm_msgs`` 1-2), hashing with the GIL
held (64 KiB streaming updates: no change), hashing in the caller's thread at ``send()`` (it
looked better only because this benchmark reuses one source tensor, which then stays cached).
Measured and not done: hashing each chunk after ZeroMQ has sent it, while its bytes are still
in the pinned core's cache, gained about 0.1 (0.70-0.80 against 0.51-0.74 in 6 A/B rounds,
without verifying), but needs the checksum to travel after its chunk (a wire change that delays
each layer's completion until its last checksum lands) and still does not reach 0.8.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from _relay_peer import side_cpus

from trtllm_prfaas.transport import (
    CurveKeys,
    Kind,
    RelayConfig,
    RelayReceiver,
    RelaySecurity,
    RelaySender,
    as_byte_view,
    generate_keypair,
)

NUM_STREAMS = 4
LAYER_BYTES = 32 << 20  # one layer's blocks per send
CHUNK_BYTES = 1 << 20  # per message: RelayConfig's default; fits a core's L2 when pinned
CREDIT_BYTES = 128 << 20
TIMEOUT_S = 600.0
REGION_BYTES = CREDIT_BYTES // NUM_STREAMS  # each raw stream's destination


def kv_layers(total_bytes: int) -> list[torch.Tensor]:
    """Layers of bf16 KV blocks summing to ``total_bytes`` (one buffer reused: no RAM blowup)."""
    num_layers = max(1, total_bytes // LAYER_BYTES)
    row = 2 * 16 * 128  # num_kv_heads * tokens_per_block * head_dim
    blocks = LAYER_BYTES // (2 * row * 2)
    layer = torch.randn(blocks, 2, row).to(torch.bfloat16)  # (num_blocks, kv_factor, row)
    return [layer] * num_layers


def relay_config(security: RelaySecurity, cpus: frozenset[int] | None) -> RelayConfig:
    return RelayConfig(
        security=security,
        num_streams=NUM_STREAMS,
        chunk_bytes=CHUNK_BYTES,
        credit_bytes=CREDIT_BYTES,
        cpu_affinity=cpus,
    )


def _pin(cpus: frozenset[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


# ---- receiving process ------------------------------------------------------------------------


def serve(conn: Connection) -> None:
    """Child process: serve measurements until told to stop (``None``).

    Relay receivers are long-lived (one per security mode, opened by ``("open", name, sec)``),
    as on a decode worker, so their recycled host buffers are warm like the raw sink's buffer.
    """
    with contextlib.ExitStack() as stack, contextlib.redirect_stdout(sys.stderr):
        receivers: dict[str, RelayReceiver] = {}
        # Warm destinations for the raw sink, as the relay's are warm (recycled host buffers):
        # CREDIT_BYTES in all, the most the relay may hold; "scratch" is one reused chunk.
        regions = [memoryview(bytearray(b"\1" * REGION_BYTES)) for _ in range(NUM_STREAMS)]
        scratch = [memoryview(bytearray(CHUNK_BYTES)) for _ in range(NUM_STREAMS)]
        while (command := conn.recv()) is not None:
            if command[0] == "raw":
                pin = side_cpus()[1] if command[3] else None
                _serve_raw(conn, command[1], scratch if command[2] else regions, pin)
            elif command[0] == "open":
                rx = stack.enter_context(RelayReceiver(relay_config(command[2], side_cpus()[1])))
                receivers[command[1]] = rx
                conn.send(rx.endpoint)
            else:
                _serve_relay(conn, receivers[command[1]], command[2], command[3])


def _serve_raw(
    conn: Connection, per_stream: int, regions: list[memoryview], pin: frozenset[int] | None
) -> None:
    """Each stream ``recv_into``s its own destination region, wrapping around at its end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        conn.send(listener.getsockname()[1])
        received = [0] * NUM_STREAMS

        def sink(peer: socket.socket, index: int) -> None:
            _pin(pin)
            region = regions[index]
            with peer:
                while (left := per_stream - received[index]) > 0:
                    at = received[index] % region.nbytes
                    n = peer.recv_into(region[at : at + min(left, region.nbytes - at)])
                    if not n:
                        break
                    received[index] += n

        threads = []
        for index in range(NUM_STREAMS):
            peer, _ = listener.accept()
            if index == 0:
                cpu_start = _cpu_s()
            threads.append(threading.Thread(target=sink, args=(peer, index)))
            threads[-1].start()
        for thread in threads:
            thread.join()
        conn.send((sum(received), _cpu_s() - cpu_start))


def _serve_relay(conn: Connection, rx: RelayReceiver, transfer_id: str, num_layers: int) -> None:
    conn.send("ready")
    cpu_start = _cpu_s()
    for layer in range(num_layers):
        rx.wait_layer(transfer_id, layer, TIMEOUT_S)
        rx.release_layer(transfer_id, layer)
    rx.wait_transfer(transfer_id, TIMEOUT_S)
    rx.release(transfer_id)
    conn.send((rx.stats().bytes_received, _cpu_s() - cpu_start))


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    times = os.times()
    return times.user + times.system


# ---- sending process --------------------------------------------------------------------------


Run = tuple[float, float]  # (goodput in Gbit/s, CPU seconds of both processes)


def raw_tcp_gbps(
    conn: Connection, payload: memoryview, total_bytes: int, scratch: bool, pinned: bool = False
) -> Run:
    """NUM_STREAMS threads, each sending total/N bytes over its own TCP socket; ``pinned``: the
    sending threads on the sender's core and the sinks on the receiver's, like the relay."""
    per_stream = total_bytes // NUM_STREAMS
    conn.send(("raw", per_stream, scratch, pinned))
    port = conn.recv()
    pin = side_cpus()[0] if pinned else None

    def source() -> None:
        _pin(pin)
        with socket.create_connection(("127.0.0.1", port)) as peer:
            sent = 0
            while sent < per_stream:
                n = min(payload.nbytes, per_stream - sent)
                peer.sendall(payload[:n])
                sent += n

    start, cpu_start = time.perf_counter(), _cpu_s()
    threads = [threading.Thread(target=source) for _ in range(NUM_STREAMS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    received, rx_cpu_s = conn.recv()
    elapsed = time.perf_counter() - start
    return received * 8 / elapsed / 1e9, _cpu_s() - cpu_start + rx_cpu_s


def relay_gbps(conn: Connection, tx: RelaySender, name: str, layers: list[torch.Tensor]) -> Run:
    """One relay transfer of ``layers`` over ``tx``: first send until the receiver has it all."""
    transfer_id = f"bench-{next(_transfer_ids)}"
    conn.send(("relay", name, transfer_id, len(layers)))
    conn.recv()  # the consumer is waiting
    before = _bytes_received.get(name, 0)
    start, cpu_start = time.perf_counter(), _cpu_s()
    handle = tx.open_transfer(transfer_id, "bench", deadline_s=TIMEOUT_S)
    for index, layer in enumerate(layers):
        handle.send(Kind.FULL_BLOCK, index, (0, layer.shape[0]), layer)
    handle.finish()
    handle.wait(timeout_s=TIMEOUT_S)
    received, rx_cpu_s = conn.recv()
    elapsed = time.perf_counter() - start
    _bytes_received[name] = received  # cumulative on that receiver
    return (received - before) * 8 / elapsed / 1e9, _cpu_s() - cpu_start + rx_cpu_s


_transfer_ids = itertools.count()
_bytes_received: dict[str, int] = {}


def open_sender(
    stack: contextlib.ExitStack, conn: Connection, name: str, rx: RelaySecurity, tx: RelaySecurity
) -> RelaySender:
    """Open the child's receiver ``name`` and a sender to it, ready to go."""
    conn.send(("open", name, rx))
    sender = stack.enter_context(RelaySender(conn.recv(), relay_config(tx, side_cpus()[0])))
    sender.wait_ready(timeout_s=5.0)
    return sender


def curve_pair() -> tuple[RelaySecurity, RelaySecurity]:
    """(receiver, sender) Curve security with fresh keys."""
    server, client = generate_keypair(), generate_keypair()
    rx = CurveKeys(server[0], server[1], allowed_client_public_keys=frozenset({client[0]}))
    tx = CurveKeys(server[0], client_public_key=client[0], client_secret_key=client[1])
    return RelaySecurity(curve=rx), RelaySecurity(curve=tx)


def measure(conn: Connection, gib: float, repeats: int) -> dict[str, Any]:
    """Warm up, then the best of ``repeats`` interleaved runs of each way."""
    layers = kv_layers(int(gib * (1 << 30)))
    total = sum(layer.nbytes for layer in layers)
    payload = as_byte_view(layers[0])
    plain = RelaySecurity.insecure_plaintext()
    with contextlib.ExitStack() as stack:
        senders = {
            "relay": open_sender(stack, conn, "relay", plain, plain),
            "curve": open_sender(stack, conn, "curve", *curve_pair()),
        }
        ways: dict[str, Callable[[list[torch.Tensor]], Run]] = {
            "raw": lambda ls: raw_tcp_gbps(conn, payload, _nbytes(ls), scratch=False),
            "raw_pinned": lambda ls: raw_tcp_gbps(conn, payload, _nbytes(ls), False, True),
            "raw_scratch": lambda ls: raw_tcp_gbps(conn, payload, _nbytes(ls), scratch=True),
            "relay": lambda ls: relay_gbps(conn, senders["relay"], "relay", ls),
            "curve": lambda ls: relay_gbps(conn, senders["curve"], "curve", ls),
        }
        for way in ways.values():
            way(layers[: max(1, len(layers) // 4)])
        runs: dict[str, list[Run]] = {name: [] for name in ways}
        for _ in range(repeats):
            for name, way in ways.items():
                runs[name].append(way(layers))
    best = {name: max(gbps for gbps, _ in rs) for name, rs in runs.items()}
    cpu = {name: min(cpu_s for _, cpu_s in rs) * (1 << 30) / total for name, rs in runs.items()}
    # The anchor is raw TCP at its best, pinned like the relay or not (unpinned wins here).
    raw, relay, curve = max(best["raw"], best["raw_pinned"]), best["relay"], best["curve"]
    return {
        "relay_over_raw_tcp": round(relay / raw, 3),
        "relay_gbps": round(relay, 3),
        "raw_tcp_gbps": round(raw, 3),
        "raw_unpinned_gbps": round(best["raw"], 3),
        "raw_pinned_gbps": round(best["raw_pinned"], 3),
        "relay_cpus": [sorted(c) if c else None for c in side_cpus()],
        "curve_gbps": round(curve, 3),
        "curve_over_plain": round(curve / relay, 3),
        "relay_over_raw_scratch": round(relay / best["raw_scratch"], 3),
        "raw_scratch_gbps": round(best["raw_scratch"], 3),
        "cpu_s_per_gib": {name: round(value, 3) for name, value in cpu.items()},
        "bytes": total,
        "num_layers": len(layers),
        "layer_bytes": LAYER_BYTES,
        "chunk_bytes": CHUNK_BYTES,
        "credit_bytes": CREDIT_BYTES,
        "num_streams": NUM_STREAMS,
        "repeats": repeats,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _nbytes(layers: list[torch.Tensor]) -> int:
    return sum(layer.nbytes for layer in layers)


def other_figures(gib: float, repeats: int) -> dict[str, Any]:
    """The other benchmarks' headline figures (each module also runs on its own)."""
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    mooncake = importlib.import_module("transport_mooncake").measure(gib, repeats)
    shaped = importlib.import_module("transport_shaped").measure()
    layerwise = importlib.import_module("layerwise")
    model = layerwise.bench_model(8)
    exposed = min(layerwise.measure_exposed(model, 8192)["exposed_s"] for _ in range(3))
    bulk = min(layerwise.measure_bulk(model, 8192) for _ in range(3))
    keys = (
        "relay_over_mooncake",
        "mooncake_gbps",
        "mooncake_error",
        "shaped_over_iperf3",
        "rate_change_tracked_s",
        "iperf3_gbps",
        "skipped",
    )
    figures = {k: v for source in (mooncake, shaped) for k, v in source.items() if k in keys}
    figures["shaped_relay_gbps"] = shaped.get("relay_gbps")
    figures["layerwise_exposed_fraction"] = round(exposed / bulk, 4)
    figures["layerwise_target_max"] = round(1 / model.num_layers + 0.05, 4)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0, help="GiB moved per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs; best is kept")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument(
        "--all",
        action="store_true",
        help="add the issue's other figures: Mooncake baseline, shaped link vs iperf3 (root), "
        "layer-wise exposed fraction (several minutes)",
    )
    args = parser.parse_args(argv)
    parent, child = multiprocessing.get_context("spawn").Pipe()
    receiver = multiprocessing.get_context("spawn").Process(target=serve, args=(child,))
    receiver.start()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = measure(parent, args.gib, args.repeats)
    finally:
        parent.send(None)
        receiver.join(30.0)
    if args.all:
        with contextlib.redirect_stdout(sys.stderr):
            result.update(other_figures(args.gib, args.repeats))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Relay goodput vs raw TCP on loopback, measured side by side in one run.

Moves ``--gib`` GiB of KV-shaped blocks (bf16 ``[num_blocks, 2, heads*tokens*head_dim]`` per
layer) three ways: plain Python sockets with 4 threads (the baseline), the relay with 4
plaintext streams, and the relay with 4 Curve streams. The relay's consumer waits for each
layer and releases it, as a decode worker would. Each way runs once small to warm up, then
``--repeats`` times interleaved; the best of each is reported (the host is shared, so the best
run is the least disturbed one). Prints one JSON line with ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable

import torch

from trtllm_prfaas.telemetry.logging import configure_logging
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
CHUNK_BYTES = 1 << 20


def kv_layers(total_bytes: int) -> list[torch.Tensor]:
    """Layers of bf16 KV blocks summing to ``total_bytes`` (one buffer reused: no RAM blowup)."""
    num_layers = max(1, total_bytes // LAYER_BYTES)
    row = 2 * 16 * 128  # num_kv_heads * tokens_per_block * head_dim
    blocks = LAYER_BYTES // (2 * row * 2)
    layer = torch.randn(blocks, 2, row).to(torch.bfloat16)  # (num_blocks, kv_factor, row)
    return [layer] * num_layers


def raw_tcp_gbps(payload: memoryview, total_bytes: int) -> float:
    """Goodput of NUM_STREAMS threads each sending total/N bytes over its own TCP socket."""
    per_stream = total_bytes // NUM_STREAMS
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = [0] * NUM_STREAMS

    def sink(conn: socket.socket, index: int) -> None:
        buf = bytearray(CHUNK_BYTES)
        with conn:
            while received[index] < per_stream:
                n = conn.recv_into(buf)
                if n == 0:
                    break
                received[index] += n

    def source() -> None:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            sent = 0
            while sent < per_stream:
                n = min(payload.nbytes, per_stream - sent)
                conn.sendall(payload[:n])
                sent += n

    start = time.perf_counter()
    senders = [threading.Thread(target=source) for _ in range(NUM_STREAMS)]
    for t in senders:
        t.start()
    sinks = []
    for index in range(NUM_STREAMS):
        conn, _ = listener.accept()
        sinks.append(threading.Thread(target=sink, args=(conn, index)))
        sinks[-1].start()
    for t in senders + sinks:
        t.join()
    elapsed = time.perf_counter() - start
    listener.close()
    return sum(received) * 8 / elapsed / 1e9


def relay_gbps(
    layers: list[torch.Tensor], security_rx: RelaySecurity, security_tx: RelaySecurity
) -> float:
    """Goodput of one relay transfer of ``layers`` (open to ack, consumer releasing layers)."""
    common = {"num_streams": NUM_STREAMS, "chunk_bytes": CHUNK_BYTES, "credit_bytes": 128 << 20}
    rx_config = RelayConfig(security=security_rx, **common)  # type: ignore[arg-type]
    tx_config = RelayConfig(security=security_tx, **common)  # type: ignore[arg-type]
    total = sum(layer.nbytes for layer in layers)
    with RelayReceiver(rx_config) as rx, RelaySender(rx.endpoint, tx_config) as tx:
        tx.wait_ready(timeout_s=5.0)
        start = time.perf_counter()
        handle = tx.open_transfer("bench", "bench", deadline_s=600.0)
        for index, layer in enumerate(layers):
            handle.send(Kind.FULL_BLOCK, index, (0, layer.shape[0]), layer)
        handle.finish()
        for index in range(len(layers)):
            rx.wait_layer("bench", index, timeout_s=600.0)
            rx.release_layer("bench", index)
        handle.wait(timeout_s=600.0)
        elapsed = time.perf_counter() - start
        rx.release("bench")
    return total * 8 / elapsed / 1e9


def curve_pair() -> tuple[RelaySecurity, RelaySecurity]:
    """(receiver, sender) Curve security with fresh keys."""
    server, client = generate_keypair(), generate_keypair()
    rx = CurveKeys(server[0], server[1], allowed_client_public_keys=frozenset({client[0]}))
    tx = CurveKeys(server[0], client_public_key=client[0], client_secret_key=client[1])
    return RelaySecurity(curve=rx), RelaySecurity(curve=tx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0, help="GiB moved per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs; best is kept")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    configure_logging("ERROR")  # keep stdout to the one JSON line (plaintext warnings are expected)
    configure_logging("ERROR")  # keep stdout to the one JSON line (plaintext warnings are expected)
    layers = kv_layers(int(args.gib * (1 << 30)))
    total = sum(layer.nbytes for layer in layers)
    payload = as_byte_view(layers[0])
    plain = RelaySecurity.insecure_plaintext()
    curve_rx, curve_tx = curve_pair()
    ways: dict[str, Callable[[list[torch.Tensor], int], float]] = {
        "raw": lambda ls, n: raw_tcp_gbps(payload, n),
        "relay": lambda ls, n: relay_gbps(ls, plain, plain),
        "curve": lambda ls, n: relay_gbps(ls, curve_rx, curve_tx),
    }
    best = dict.fromkeys(ways, 0.0)
    warm = layers[: max(1, len(layers) // 8)]
    with contextlib.redirect_stdout(sys.stderr):  # structlog prints; stdout is the result
        for way in ways.values():
            way(warm, sum(layer.nbytes for layer in warm))
        for _ in range(args.repeats):
            for name, way in ways.items():
                best[name] = max(best[name], way(layers, total))
    raw, relay, curve = best["raw"], best["relay"], best["curve"]
    result = {
        "relay_over_raw_tcp": round(relay / raw, 3),
        "relay_gbps": round(relay, 3),
        "raw_tcp_gbps": round(raw, 3),
        "curve_gbps": round(curve, 3),
        "curve_over_plain": round(curve / relay, 3),
        "bytes": total,
        "num_layers": len(layers),
        "layer_bytes": LAYER_BYTES,
        "chunk_bytes": CHUNK_BYTES,
        "num_streams": NUM_STREAMS,
        "repeats": args.repeats,
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

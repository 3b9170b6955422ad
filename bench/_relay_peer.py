"""One side of a relay benchmark, run as its own process (possibly inside a network namespace).

    python bench/_relay_peer.py recv --bind tcp://10.201.0.2:0 [--layers-per-transfer 8 ...]
    python bench/_relay_peer.py send --endpoint tcp://10.201.0.2:PORT [--bytes N | --seconds S]

Both sides talk to their parent in JSON lines on stdout and stop when stdin closes (or a
``stop`` line arrives). Transfers are named ``t-0``, ``t-1``, ... so that the two sides agree
on them without a control channel; each carries ``--layers-per-transfer`` layers of bf16 KV
blocks ``(num_blocks, 2, heads * tokens * head_dim)`` of ``--layer-bytes`` each.

- ``recv`` prints ``{"endpoint": ...}``, then a sample ``{"t": monotonic_s, "bytes": n}`` every
  ``--sample-s`` (``n`` = the receiver's ``bytes_received``: payload fully arrived, so a trace of
  these is what crossed the link), and consumes every transfer in order like a decode worker
  (wait for each layer, release it, release the transfer). On stop: ``{"done": ..., ...}``.
- ``send`` prints ``{"ready": ...}`` once every stream finished its handshake, then keeps
  ``--depth`` transfers in flight until ``--bytes`` were acknowledged, ``--seconds`` passed or
  stdin closed; it ends with ``{"result": {...}}`` (bytes acknowledged, elapsed from the first
  send to the last acknowledgement, goodput, and the sender's LinkStats figures).

CLOCK_MONOTONIC is shared by every network namespace, so the parent can line up ``t`` with the
instants it changes the link.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # torch and the relay load only in the peer processes (tests stay light)
    import torch

    from trtllm_prfaas.transport import RelayConfig, RelayReceiver, RelaySender, TransferHandle

PEER_SCRIPT = Path(__file__).resolve()

ROW = 2 * 16 * 128  # num_kv_heads * tokens_per_block * head_dim (bf16 elements)
TIMEOUT_S = 120.0
_OUT: TextIO = sys.stdout  # the parent's pipe, kept before main() redirects stdout to stderr


def kv_layer(layer_bytes: int) -> torch.Tensor:
    """One layer of bf16 KV blocks, ``(num_blocks, 2, ROW)``, about ``layer_bytes`` bytes."""
    import torch

    num_blocks = max(1, layer_bytes // (2 * ROW * 2))
    generator = torch.Generator().manual_seed(0)  # the same bytes in every process (checks)
    return torch.randn(num_blocks, 2, ROW, generator=generator).to(torch.bfloat16)


def emit(record: dict[str, Any]) -> None:
    """One JSON line to the parent (stdout is reserved for these; logs go to stderr)."""
    _OUT.write(json.dumps(record) + "\n")
    _OUT.flush()


def watch_stdin(stop: threading.Event) -> threading.Thread:
    """Set ``stop`` when stdin closes or says ``stop``."""

    def run() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    thread = threading.Thread(target=run, name="peer-stdin", daemon=True)
    thread.start()
    return thread


def config(args: argparse.Namespace) -> RelayConfig:
    from trtllm_prfaas.transport import RelayConfig, RelaySecurity
    from trtllm_prfaas.transport.pinning import parse_cpus

    return RelayConfig(
        security=RelaySecurity.insecure_plaintext(),
        num_streams=args.streams,
        chunk_bytes=args.chunk_bytes,
        credit_bytes=args.credit_bytes,
        cpu_affinity=parse_cpus(args.cpus),
    )


def side_cpus() -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """(sending side, receiving side) CPU pins: one core each when this host lets the
    process use two or more, else no pinning (None, None)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return None, None
    return frozenset(cpus[:1]), frozenset(cpus[1:2])


def cpus_arg(cpus: frozenset[int] | None) -> str | None:
    """``--cpus`` value for a peer (``None``: the option is left out)."""
    return None if cpus is None else ",".join(str(c) for c in sorted(cpus))


# ---- parent side ------------------------------------------------------------------------------


class PeerError(RuntimeError):
    """A peer process failed, exited early or did not answer in time (with its stderr tail)."""


def peer_argv(role: str, **options: object) -> list[str]:
    """``python _relay_peer.py ROLE --opt value ...`` (options with ``None`` left out)."""
    argv = [sys.executable, str(PEER_SCRIPT), role]
    for name, value in options.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


class Peer:
    """Parent side of a child speaking JSON lines on stdout; it stops when its stdin closes.

    Context manager. ``close`` stops the child by its PID: stdin closed, then SIGTERM, then
    SIGKILL, each after a timeout, and joins the reader thread.
    """

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.records: list[dict[str, Any]] = []  # every JSON line so far, in order
        self._cond = threading.Condition()
        self._cursor = 0
        self._eof = False
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, name=f"peer-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError), self._cond:
                self.records.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def expect(self, key: str, timeout_s: float) -> dict[str, Any]:
        """The next record (after the last one returned) that has ``key``; PeerError if none."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                while self._cursor < len(self.records):
                    record = self.records[self._cursor]
                    self._cursor += 1
                    if key in record:
                        return record
                left_s = deadline - time.monotonic()
                if self._eof or left_s <= 0:
                    why = "exited" if self._eof else f"no answer in {timeout_s:.3g} s"
                    raise PeerError(self.describe(f"{why} before sending {key!r}"))
                self._cond.wait(left_s)

    def send_line(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def describe(self, what: str) -> str:
        """``what`` with the child's exit status and the tail of its stderr."""
        if self._eof:  # stdout closed: the exit status follows at once
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2.0)
        tail = ""
        if not self._stderr.closed:
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace")[-1200:].strip()
        return f"{self.name}: {what} (rc={self.proc.poll()}): {tail}"

    def stop_input(self) -> None:
        """Close the child's stdin: it finishes, prints its last records and exits."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()

    def close(self, timeout_s: float = 30.0) -> int:
        """Stop the child (see the class docstring); its exit status. Idempotent."""
        self.stop_input()
        for signal_child, wait_s in ((None, timeout_s), (self.proc.terminate, 5.0)):
            if signal_child is not None:
                signal_child()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait_s)
                break
        else:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5.0)
        self._stderr.close()
        return self.proc.returncode

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- receiving side ---------------------------------------------------------------------------


def receive(args: argparse.Namespace) -> None:
    from trtllm_prfaas.transport import RelayReceiver

    stop = threading.Event()
    watch_stdin(stop)
    with RelayReceiver(config(args), args.bind) as rx:
        emit({"endpoint": rx.endpoint})
        sampler = threading.Thread(target=sample, args=(rx, args.sample_s, stop), daemon=True)
        sampler.start()
        num_transfers = consume(rx, args.layers_per_transfer, stop)
        sampler.join(5.0)
        stats = rx.stats()
        emit(
            {
                "done": True,
                "bytes": stats.bytes_received,
                "transfers_consumed": num_transfers,
                "transfers_failed": stats.transfers_failed,
                "corrupt_chunks": stats.corrupt_chunks,
                "tcp_total_retrans": stats.tcp_total_retrans,
            }
        )


def sample(rx: RelayReceiver, period_s: float, stop: threading.Event) -> None:
    """Print ``(t, bytes_received)`` every ``period_s`` on a fixed schedule (no drift)."""
    next_t = time.monotonic()
    while not stop.is_set():
        emit({"t": time.monotonic(), "bytes": rx.stats().bytes_received})
        next_t += period_s
        stop.wait(max(0.0, next_t - time.monotonic()))


def consume(rx: RelayReceiver, num_layers: int, stop: threading.Event) -> int:
    """Consume ``t-0``, ``t-1``, ... layer by layer until ``stop``; the number consumed."""
    for index in itertools.count():
        transfer_id = f"t-{index}"
        for layer in range(num_layers):
            if not wait_layer(rx, transfer_id, layer, stop):
                return index
            rx.release_layer(transfer_id, layer)
        rx.wait_transfer(transfer_id, TIMEOUT_S)
        rx.release(transfer_id)
    return 0  # unreachable: count() never ends


def wait_layer(rx: RelayReceiver, transfer_id: str, layer: int, stop: threading.Event) -> bool:
    """Wait for a layer in short slices so that ``stop`` is noticed; False once stopped."""
    from trtllm_prfaas.errors import TransferTimeout

    while not stop.is_set():
        with contextlib.suppress(TransferTimeout):
            rx.wait_layer(transfer_id, layer, timeout_s=0.1)
            return True
    return False


# ---- sending side -----------------------------------------------------------------------------


def send(args: argparse.Namespace) -> None:
    from trtllm_prfaas.transport import RelaySender

    stop = threading.Event()
    watch_stdin(stop)
    layer = kv_layer(args.layer_bytes)
    transfer_bytes = layer.nbytes * args.layers_per_transfer
    num_transfers = None if args.bytes is None else max(1, -(-args.bytes // transfer_bytes))
    with RelaySender(args.endpoint, config(args)) as tx:
        emit({"ready": tx.wait_ready(timeout_s=10.0)})
        first = pump(tx, layer, args, range(args.warmup_transfers), None, stop)
        before = tx.stats().bytes_acked
        start = time.monotonic()
        count = num_transfers if num_transfers is not None else 1 << 62
        end = pump(tx, layer, args, range(first, first + count), args.seconds, stop)
        elapsed_s = time.monotonic() - start
        stats = tx.stats()
    acked = stats.bytes_acked - before
    emit(
        {
            "result": {
                "bytes_acked": acked,
                "elapsed_s": elapsed_s,
                "gbps": acked * 8 / elapsed_s / 1e9,
                "link_goodput_gbps": stats.goodput_gbps,
                "tcp_total_retrans": stats.tcp_total_retrans,
                "num_streams": len(stats.streams),
                "transfers": end - first,
                "transfer_bytes": transfer_bytes,
            }
        }
    )


def pump(
    tx: RelaySender,
    layer: torch.Tensor,
    args: argparse.Namespace,
    indices: range,
    seconds: float | None,
    stop: threading.Event,
) -> int:
    """Send transfers ``t-<i>`` for i in ``indices`` with ``args.depth`` in flight, until done,
    ``seconds`` passed or ``stop``; every one acknowledged on return. The next index."""
    from trtllm_prfaas.transport import Kind

    in_flight: deque[TransferHandle] = deque()
    start = time.monotonic()
    index = indices.start
    for index in indices:
        if stop.is_set() or (seconds is not None and time.monotonic() - start >= seconds):
            break
        handle = tx.open_transfer(f"t-{index}", "bench", deadline_s=TIMEOUT_S)
        for number in range(args.layers_per_transfer):
            handle.send(Kind.FULL_BLOCK, number, (0, layer.shape[0]), layer)
        handle.finish()
        in_flight.append(handle)
        while len(in_flight) >= args.depth:
            in_flight.popleft().wait(TIMEOUT_S)
    else:
        index = indices.stop
    while in_flight:
        in_flight.popleft().wait(TIMEOUT_S)
    return index


# ---- command line -----------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["recv", "send"])
    parser.add_argument("--bind", default="tcp://127.0.0.1:0", help="recv: endpoint to bind")
    parser.add_argument("--endpoint", help="send: the receiver's endpoint")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    parser.add_argument("--credit-bytes", type=int, default=128 << 20)
    parser.add_argument("--layer-bytes", type=int, default=32 << 20)
    parser.add_argument("--layers-per-transfer", type=int, default=8)
    parser.add_argument("--depth", type=int, default=2, help="send: transfers in flight")
    parser.add_argument("--bytes", type=int, help="send: stop after this many bytes")
    parser.add_argument("--seconds", type=float, help="send: stop after this long")
    parser.add_argument("--warmup-transfers", type=int, default=0, help="send: untimed first")
    parser.add_argument("--sample-s", type=float, default=0.05, help="recv: sampling period")
    parser.add_argument("--cpus", default=None, help="pin the relay's threads, e.g. 0 or 0,1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with contextlib.redirect_stdout(sys.stderr):  # stray prints must not corrupt the JSON lines
        if args.role == "recv":
            receive(args)
        else:
            send(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

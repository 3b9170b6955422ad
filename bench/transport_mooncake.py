"""Relay goodput vs Mooncake Transfer Engine's TCP transport on loopback, in the same run.

    python bench/transport_mooncake.py --json [--gib 1.0] [--repeats 2]

Both move ``--gib`` GiB of bf16 KV-shaped layers (``(num_blocks, 2, 16*128*2)``, 32 MiB each)
from one process to another on 127.0.0.1; nothing else runs in the parent.

- Relay: a receiver process (``_relay_peer.py recv``, consuming layer by layer like a decode
  worker) and a sender process (``_relay_peer.py send``): 4 plaintext streams, 1 MiB chunks,
  128 MiB of credit, two 256 MiB transfers in flight; one untimed warm-up transfer first. Goodput
  = bytes acknowledged / (first send .. last acknowledgement).
- Mooncake: a target process registers a 128 MiB destination (4 layers, the relay's credit) and
  an initiator process registers the source layer; both ``initialize("127.0.0.1",
  "P2PHANDSHAKE", "tcp", "")``, so no metadata server. After one untimed write, three ways are
  timed, each layer going to slot ``layer % 4`` of the destination: ``sync`` (one
  ``transfer_sync_write`` per layer), ``batch`` (``batch_transfer_sync_write`` of 4 layers) and
  ``threads`` (4 threads, one slot each, like 4 streams). The best way is the baseline, and the
  target checks that its slot 0 holds the source's bytes.

Each measurement starts fresh processes; ``--repeats`` rounds interleave Mooncake and relay and
the best of each is kept (the host is shared). With two or more CPUs each round runs both
unpinned and pinned (sending process or relay sender threads on the first CPU, receiving side
on the second; the ``*_pinned`` ways): pinning helps the relay (22.6-26.3 against 20.4-21.1
Gbit/s) and hurts Mooncake (9.6-11.1 against 15.3-16.1), and each side is judged at its best.
``relay_over_mooncake`` = relay / Mooncake: 1.64 in the last run here (load 1.4).

Installing Mooncake (done here when missing; ``mooncake_error`` says why when it fails)::

    apt-get install -y libibverbs1          # engine.so links libibverbs.so.1 (root only)
    python -m pip install --target ~/.cache/trtllm-prfaas/mooncake-site \\
        mooncake-transfer-engine-non-cuda   # a private site dir: the project venv stays as is

Mooncake runs only in its own processes, with that directory on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _relay_peer import (
    Peer,
    PeerError,
    cpus_arg,
    emit,
    kv_layer,
    peer_argv,
    side_cpus,
)

LAYER_BYTES = 32 << 20
SLOTS = 4  # destination layers: 128 MiB, the relay's credit
NUM_STREAMS = 4
TIMEOUT_S = 600.0
PACKAGE = "mooncake-transfer-engine-non-cuda"
DEFAULT_SITE = Path.home() / ".cache" / "trtllm-prfaas" / "mooncake-site"
MODES = ("sync", "batch", "threads")
RELAY_OPTIONS: dict[str, object] = {
    "streams": NUM_STREAMS,
    "chunk_bytes": 1 << 20,
    "credit_bytes": SLOTS * LAYER_BYTES,
    "layer_bytes": LAYER_BYTES,
    "layers_per_transfer": 8,
}


# ---- installing Mooncake ----------------------------------------------------------------------


def ensure_mooncake(site: Path) -> str | None:
    """Install libibverbs1 and the wheel when missing; ``None`` when importable, else why not."""
    if ctypes.util.find_library("ibverbs") is None:
        if os.geteuid() != 0:
            return "libibverbs.so.1 missing and not root: run apt-get install -y libibverbs1"
        error = apt_install("libibverbs1")
        if error is not None:
            return error
    if not (site / "mooncake" / "engine.so").exists():
        command = [sys.executable, "-m", "pip", "install", "-q", "--target", str(site), PACKAGE]
        done = run_quiet(command, 600.0)
        if done.returncode != 0:
            return f"{' '.join(command)} failed: {tail(done.stderr)}"
    probe = [sys.executable, "-c", "from mooncake.engine import TransferEngine"]
    done = run_quiet(probe, 120.0, env=mooncake_env(site))
    return None if done.returncode == 0 else f"import mooncake.engine failed: {tail(done.stderr)}"


def apt_install(package: str) -> str | None:
    """``apt-get install -y package`` (after ``apt-get update`` if the first try fails)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = run_quiet(["apt-get", "install", "-y", "-q", package], 600.0, env=env)
    if done.returncode != 0:
        run_quiet(["apt-get", "update", "-q"], 600.0, env=env)
        done = run_quiet(["apt-get", "install", "-y", "-q", package], 600.0, env=env)
    return None if done.returncode == 0 else f"apt-get install {package}: {tail(done.stderr)}"


def run_quiet(
    command: list[str], timeout_s: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(command, 127, "", str(exc))


def tail(text: str, limit: int = 600) -> str:
    return " ".join(text.split())[-limit:]


def mooncake_env(site: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


# ---- Mooncake peers (run as ``--peer target|initiator`` in their own processes) ----------------


def start_engine() -> Any:
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    check(engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", ""), "initialize")
    return engine


def check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"mooncake {what} returned {status}")


def target() -> None:
    """Register the destination, print where it is, wait for stdin to close, check slot 0."""
    import torch

    engine = start_engine()
    region = torch.zeros(SLOTS * LAYER_BYTES, dtype=torch.uint8)
    check(engine.register_memory(region.data_ptr(), region.nbytes), "register_memory")
    session = f"127.0.0.1:{engine.get_rpc_port()}"
    emit({"session": session, "addr": region.data_ptr(), "len": region.nbytes})
    sys.stdin.read()
    expected = kv_layer(LAYER_BYTES).view(torch.uint8).flatten()
    matches = bool(torch.equal(region[: expected.numel()], expected))
    engine.unregister_memory(region.data_ptr())
    emit({"done": True, "slot0_matches": matches})


def initiator(session: str, dest: int, total_bytes: int) -> None:
    """One untimed write, then every way in MODES; prints ``{"result": {mode: gbps}}``."""
    engine = start_engine()
    layer = kv_layer(LAYER_BYTES)
    source, nbytes = layer.data_ptr(), layer.nbytes
    check(engine.register_memory(source, nbytes), "register_memory")
    num_layers = max(1, total_bytes // nbytes)
    slots = [dest + slot * nbytes for slot in range(SLOTS)]

    def sync(layers: range) -> None:
        for index in layers:
            check(
                engine.transfer_sync_write(session, source, slots[index % SLOTS], nbytes), "write"
            )

    def batch(layers: range) -> None:
        for first in range(layers.start, layers.stop, SLOTS):
            group = range(first, min(first + SLOTS, layers.stop))
            addresses = [slots[index % SLOTS] for index in group]
            status = engine.batch_transfer_sync_write(
                session, [source] * len(group), addresses, [nbytes] * len(group)
            )
            check(status, "batch write")

    def threads(layers: range) -> None:
        workers = [
            threading.Thread(target=sync, args=(range(slot, layers.stop, SLOTS),))
            for slot in range(SLOTS)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    sync(range(1))
    result: dict[str, float] = {}
    for name, way in (("sync", sync), ("batch", batch), ("threads", threads)):
        start = time.perf_counter()
        way(range(num_layers))
        result[name] = num_layers * nbytes * 8 / (time.perf_counter() - start) / 1e9
    engine.unregister_memory(source)
    emit({"result": result, "bytes": num_layers * nbytes})


# ---- one measurement each ---------------------------------------------------------------------


Pins = tuple[frozenset[int] | None, frozenset[int] | None]  # (sending side, receiving side)
UNPINNED: Pins = (None, None)


def _pin_args(cpus: frozenset[int] | None) -> list[str]:
    text = cpus_arg(cpus)
    return [] if text is None else ["--cpus", text]


def mooncake_once(site: Path, total_bytes: int, pins: Pins = UNPINNED) -> dict[str, float]:
    """Fresh target and initiator processes (each pinned to its side's CPUs, if given);
    Gbit/s of each way. Raises PeerError."""
    this = str(Path(__file__).resolve())
    env = mooncake_env(site)
    target_argv = [sys.executable, this, "--peer", "target", *_pin_args(pins[1])]
    with Peer("mooncake-target", target_argv, env) as tgt:
        where = tgt.expect("session", 120.0)
        argv = [sys.executable, this, "--peer", "initiator", "--session", where["session"]]
        argv += ["--addr", str(where["addr"]), "--bytes", str(total_bytes)]
        argv += _pin_args(pins[0])
        with Peer("mooncake-initiator", argv, env) as ini:
            result: dict[str, float] = ini.expect("result", TIMEOUT_S)["result"]
        tgt.stop_input()
        if not tgt.expect("done", 60.0)["slot0_matches"]:
            raise PeerError("mooncake: the target's slot 0 does not hold the source bytes")
    return result


def relay_once(total_bytes: int, pins: Pins = UNPINNED) -> dict[str, Any]:
    """Fresh receiver and sender processes (the relay's threads pinned to each side's CPUs, if
    given); the sender's result (``gbps`` and LinkStats)."""
    rx_options = {**RELAY_OPTIONS, "cpus": cpus_arg(pins[1])}
    recv = peer_argv("recv", bind="tcp://127.0.0.1:0", sample_s=1.0, **rx_options)
    with Peer("relay-recv", recv) as rx:
        endpoint = rx.expect("endpoint", 120.0)["endpoint"]
        tx_options = {**RELAY_OPTIONS, "cpus": cpus_arg(pins[0])}
        send = peer_argv("send", endpoint=endpoint, bytes=total_bytes, **tx_options)
        with Peer("relay-send", [*send, "--warmup-transfers", "1"]) as tx:
            result: dict[str, Any] = tx.expect("result", TIMEOUT_S)["result"]
    return result


def measure(gib: float = 1.0, repeats: int = 2, site: Path = DEFAULT_SITE) -> dict[str, Any]:
    """Interleaved rounds of Mooncake then relay; the report (see the module docstring)."""
    total = max(LAYER_BYTES, int(gib * (1 << 30)))
    error = ensure_mooncake(site)
    mooncake: dict[str, float] = {}
    relay: list[dict[str, Any]] = []
    modes = {"": UNPINNED, "_pinned": side_cpus()} if side_cpus()[0] else {"": UNPINNED}
    for _ in range(repeats):
        for suffix, pins in modes.items():
            if error is None:
                try:
                    for name, gbps in mooncake_once(site, total, pins).items():
                        key = name + suffix
                        mooncake[key] = max(gbps, mooncake.get(key, 0.0))
                except PeerError as exc:
                    error = str(exc)
            relay.append({**relay_once(total, pins), "pinned": bool(suffix)})
    return report(relay, mooncake, error, total, repeats)


def report(
    relay: list[dict[str, Any]],
    mooncake: dict[str, float],
    error: str | None,
    total_bytes: int,
    repeats: int,
) -> dict[str, Any]:
    """The JSON figures; ``relay_over_mooncake`` is ``None`` (with ``mooncake_error``) when
    Mooncake did not run."""
    relay_gbps = max((run["gbps"] for run in relay), default=None)
    mooncake_gbps = max(mooncake.values()) if mooncake and error is None else None
    ratio = None
    if relay_gbps is not None and mooncake_gbps:
        ratio = round(relay_gbps / mooncake_gbps, 3)
    return {
        "relay_over_mooncake": ratio,
        "relay_gbps": None if relay_gbps is None else round(relay_gbps, 3),
        "mooncake_gbps": None if mooncake_gbps is None else round(mooncake_gbps, 3),
        "mooncake_error": error,
        "mooncake_ways_gbps": {name: round(gbps, 3) for name, gbps in mooncake.items()},
        "relay_runs_gbps": [round(run["gbps"], 3) for run in relay],
        "relay_runs_pinned": [run.get("pinned", False) for run in relay],
        "relay_tcp_total_retrans": max((run["tcp_total_retrans"] or 0 for run in relay), default=0),
        "bytes": total_bytes,
        "layer_bytes": LAYER_BYTES,
        "num_streams": NUM_STREAMS,
        "repeats": repeats,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0, help="GiB moved per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; best kept")
    parser.add_argument("--site", type=Path, default=DEFAULT_SITE, help="Mooncake's site dir")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--peer", choices=["target", "initiator"], help=argparse.SUPPRESS)
    parser.add_argument("--session", help=argparse.SUPPRESS)
    parser.add_argument("--addr", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpus", help=argparse.SUPPRESS)  # a peer pins itself (and its threads)
    args = parser.parse_args(argv)
    if args.cpus:
        from trtllm_prfaas.transport.pinning import parse_cpus

        os.sched_setaffinity(0, parse_cpus(args.cpus) or set())
    with contextlib.redirect_stdout(sys.stderr):
        if args.peer == "target":
            target()
            return 0
        if args.peer == "initiator":
            initiator(args.session, args.addr, args.bytes)
            return 0
        result = measure(args.gib, args.repeats, args.site)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU pinning of a relay endpoint's threads (``RelayConfig.cpu_affinity``).

Why: on a busy host the relay's cost per byte is two copies in the kernel (done by ZeroMQ's I/O
thread) and one XXH3 pass (done by the relay's Python I/O thread). Pinned to the same core, the
kernel's copy of a chunk reads what the checksum has just pulled into that core's cache instead
of reading DRAM again: ``bench/transport.py`` measured ~10% less CPU per byte and ~12% more
goodput on a 2-core host. Unpinned (the default) the scheduler places the threads freely.

What is pinned: ZeroMQ's I/O threads (``ZMQ_THREAD_AFFINITY_CPU_ADD``, set on the context
before its first socket starts them) and the relay's own I/O thread (``sched_setaffinity`` on
itself when it starts). Callers' threads are left alone. Linux only.
"""

from __future__ import annotations

import os

import zmq

from trtllm_prfaas.errors import ConfigError

__all__ = ["check_cpus", "parse_cpus", "pin_current_thread", "relay_context"]


def parse_cpus(text: str | None, what: str = "cpu_affinity") -> frozenset[int] | None:
    """Comma-separated CPU numbers (``"2,3"``); None or empty: no pinning. ConfigError names
    ``what`` (the flag or variable the text came from) when a part is not a number."""
    if not text:
        return None
    try:
        return frozenset(int(part) for part in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"{what}: expected CPU numbers like 2,3, got {text!r}") from exc


def check_cpus(cpus: frozenset[int] | None) -> None:
    """Raise ConfigError unless ``cpus`` (if any) can be pinned to by this process."""
    if cpus is None:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("cpu_affinity: CPU pinning needs Linux (os.sched_setaffinity)")
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        missing = sorted(cpus - allowed)
        raise ConfigError(
            f"cpu_affinity: CPUs {missing} are not available to this process "
            f"(allowed: {sorted(allowed)})"
        )


def relay_context(io_threads: int, cpus: frozenset[int] | None) -> zmq.Context[zmq.Socket[bytes]]:
    """A ZeroMQ context whose I/O threads will run on ``cpus`` (anywhere if None)."""
    check_cpus(cpus)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=io_threads)
    for cpu in sorted(cpus or ()):
        ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)
    return ctx


def pin_current_thread(cpus: frozenset[int] | None) -> None:
    """Pin the calling thread to ``cpus`` (no-op if None; checked by ``relay_context``)."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)

"""A relay across a tc-tbf-shaped WAN between two network namespaces: the link estimate
(``policy/link_estimate.py`` fed by the sender's counters, as the router feeds it) reads the
shaped rate within 20%, and follows a live ``tc qdisc change`` to a fifth of it.

What carries the estimate here is the kernel's view (``TCP_INFO``): the receiver's credit, not
the sender's queues, is what holds the sender back on this path (the relay's credit round trip
crosses the same shaped link), so the application never reads as link-bound; the backlogged
connections' delivery-rate samples do. Needs root and iproute2: skipped otherwise.
"""

from __future__ import annotations

import json
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trtllm_prfaas.testbed.netns import Network, WanShape, missing_requirements
from trtllm_prfaas.testbed.processes import stop_process

ROOT = Path(__file__).resolve().parents[2]
NUM, NBYTES = 40, 2 << 20  # 80 MiB: ~2.5 s at 200 Mbit/s before the change, the rest at 40

needs_root = pytest.mark.skipif(bool(missing_requirements()), reason=missing_requirements())


def _spawn(net: Network, datacenter: str, log: Path, *args: str) -> subprocess.Popen[str]:
    """A ``_tbf_relay`` process in ``datacenter``, its stderr to ``log``; stopped by PID."""
    argv = [*net.exec_prefix(datacenter), sys.executable, "-m", "tests.transport._tbf_relay"]
    with log.open("w") as err:  # the child keeps its own copy of the fd
        return subprocess.Popen([*argv, *args], stdout=subprocess.PIPE, stderr=err,
                                text=True, cwd=ROOT)  # fmt: skip


def _rows(sender: subprocess.Popen[str], net: Network, change_at_s: float) -> list[dict[str, Any]]:
    """The sender's samples; the WAN drops to 40 Mbit/s once a sample passes ``change_at_s``."""
    rows: list[dict[str, Any]] = []
    for line in Lines(sender).until(time.monotonic() + 60.0):
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if row["t_s"] >= change_at_s and net.shape.rate != "40mbit":
            net.set_wan_rate("40mbit")
            row["changed"] = True
        rows.append(row)
    return rows


class Lines:
    """A process's stdout lines through a reader thread, so every wait has a deadline."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.queue.put(line)
        self.queue.put(None)  # end of output

    def until(self, deadline: float) -> Iterator[str]:
        """Lines until the output ends or ``deadline`` (monotonic) passes."""
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                return
            if line is None:
                return
            yield line


def _ready(receiver: subprocess.Popen[str]) -> bool:
    """The receiver's ``ready`` line within 20 s (its logs come first)."""
    return any(line.strip() == "ready" for line in Lines(receiver).until(time.monotonic() + 20))


@needs_root
def test_estimate_reads_a_tbf_link_and_follows_a_live_rate_change(tmp_path: Path) -> None:
    with Network(WanShape(rate="200mbit")) as net:
        endpoint = f"tcp://{net.wan_address('dc-local')}:5555"
        receiver = _spawn(
            net, "dc-local", tmp_path / "receiver.log", "receiver", endpoint, str(NUM)
        )
        sender: subprocess.Popen[str] | None = None
        try:
            assert _ready(receiver)
            sender_log = tmp_path / "sender.log"
            sender = _spawn(net, "dc-remote", sender_log, "sender", endpoint, str(NUM), str(NBYTES))
            rows = _rows(sender, net, change_at_s=1.5)
            assert sender.wait(30.0) == 0, sender_log.read_text()[-3000:]
        finally:
            if sender is not None:
                stop_process(sender, 5.0)
            stop_process(receiver, 5.0)
    changed = next(k for k, row in enumerate(rows) if row.get("changed"))
    # One period's sample is one instant of the kernel's rate samples: judge the median of the
    # periods before the change and of those after it (one period to settle).
    before = statistics.median(row["estimate_gbps"] for row in rows[max(changed - 4, 0) : changed])
    after = statistics.median(row["estimate_gbps"] for row in rows[changed + 1 : -1])
    # tbf counts frame bytes; TCP payload is ~96% of them at a 1500-byte MTU.
    assert before == pytest.approx(0.2 * 0.96, rel=0.2), rows
    assert after == pytest.approx(0.04 * 0.96, rel=0.2), rows
    assert all(row["link_bound_share"] < 0.2 for row in rows)  # the kernel's view did it

"""The two ends of a relay across the namespace WAN, for ``test_link_tbf.py`` (each runs as a
process inside its namespace: ``ip netns exec NS python -m tests.transport._tbf_relay ...``).

``receiver ENDPOINT NUM``: bind, print ``ready``, receive and release transfers ``t-0 ..
t-(NUM-1)`` (each within 60 s), then wait to be stopped (at most 30 s).
``sender ENDPOINT NUM BYTES``: send NUM transfers of BYTES, four in flight, as fast as the link
takes them; sample the sender's counters every 0.25 s into a link estimate (provisioned 10 Gbps)
and print one JSON line per sample (``t_s``, ``estimate_gbps``, ``sent_gbps``, link-bound share,
TCP delivery rate).
"""

from __future__ import annotations

import json
import sys
import threading
import time

from trtllm_prfaas.policy import link_estimate as le
from trtllm_prfaas.transport import Kind, RelayConfig, RelayReceiver, RelaySecurity, RelaySender

CONFIG = RelayConfig(security=RelaySecurity.insecure_plaintext(), connect_timeout_s=10.0)


def receiver(endpoint: str, num: int) -> None:
    with RelayReceiver(CONFIG, endpoint) as rx:
        print("ready", flush=True)
        for k in range(num):
            rx.wait_transfer(f"t-{k}", timeout_s=60.0)
            rx.release(f"t-{k}")
        time.sleep(30.0)  # until stopped: closing now could cut the last ACKs off the slow link


def _counters(tx: RelaySender) -> le.RelayCounters:
    s = tx.stats()
    return le.RelayCounters(
        time.monotonic(), s.bytes_sent, s.link_wait_s, s.link_wait_bytes, s.credit_wait_s,
        s.tcp_bound_s, s.tcp_bound_gbit, s.tcp_total_retrans or 0, s.tcp_segs_out or 0,
        s.bytes_acked,
    )  # fmt: skip


def _sample(tx: RelaySender, stop: threading.Event) -> None:
    est, before, start = le.initial_estimate(10.0, 10.0), _counters(tx), time.monotonic()
    while not stop.wait(0.25):
        after = _counters(tx)
        p = le.period(before, after)
        if p is not None:
            est = le.update(le.LinkEstimateConfig(), est, [p], after.now_s)
            row = {"t_s": round(after.now_s - start, 2), "estimate_gbps": est.gbps,
                   "sent_gbps": p.sent_gbps, "link_bound_share": p.link_bound_share,
                   "bound_gbps": p.bound_gbps, "credit_share": p.credit_wait_share,
                   "tcp_share": p.tcp_bound_share, "tcp_gbps": p.tcp_gbps}  # fmt: skip
            print(json.dumps(row), flush=True)
        before = after


def sender(endpoint: str, num: int, nbytes: int) -> None:
    payload = bytes(nbytes)
    stop = threading.Event()
    with RelaySender(endpoint, CONFIG) as tx:
        if not tx.wait_ready(10.0):
            raise SystemExit("sender: streams not ready within 10 s")
        sampler = threading.Thread(target=_sample, args=(tx, stop))
        sampler.start()
        try:
            handles = []
            for k in range(num):
                handle = tx.open_transfer(f"t-{k}", f"req-{k}", deadline_s=60.0)
                handle.send(Kind.FULL_BLOCK, 0, (0, 1), payload)
                handle.finish()
                handles.append(handle)
                if len(handles) >= 4:
                    handles.pop(0).wait(timeout_s=60.0)
            for handle in handles:
                handle.wait(timeout_s=60.0)
        finally:
            stop.set()
            sampler.join(5.0)


if __name__ == "__main__":
    role, endpoint, *rest = sys.argv[1:]
    if role == "receiver":
        receiver(endpoint, int(rest[0]))
    else:
        sender(endpoint, int(rest[0]), int(rest[1]))

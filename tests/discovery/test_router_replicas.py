"""Two ``prfaas router --discovery`` processes on one etcd: exactly one leads
(``prfaas_router_is_leader``); SIGKILL of the leader hands leadership to the other within the
lease TTL + 1 s, and both answered requests before, the survivor after (single-engine tokens).

Every process started here is stopped by PID (SIGTERM, then SIGKILL) even when a test fails.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.discovery.test_router_process import Router, start, wait_until
from tests.etcd_server import EtcdServer
from tests.harness import WorkerProcess
from tests.router.test_router_command import ask, prompt, reference
from trtllm_prfaas.discovery.leader import DEFAULT_TTL_S


def _is_leader(router: Router) -> bool:
    return router.metric("prfaas_router_is_leader") == 1.0


def test_leader_sigkill_hands_over_within_the_ttl_and_both_keep_answering(
    etcd: EtcdServer,
    procs: dict[str, WorkerProcess],
    tmp_path: Path,
) -> None:
    start(procs, etcd, "decode", "decode", "dc-local")
    start(procs, etcd, "pd-prefill", "prefill", "dc-local")
    routers = [Router(etcd, tmp_path / f"router-{k}.log") for k in range(2)]
    try:
        assert routers[0].ready["replica"] != routers[1].ready["replica"]
        wait_until(lambda: sum(_is_leader(r) for r in routers) == 1, 10.0, "one leader")
        for router in routers:
            wait_until(lambda r=router: r.metric("prfaas_discovery_workers") == 2, 10.0, "workers")  # type: ignore[misc]
            assert ask(router.ready["listen"], prompt(40), 8) == reference(prompt(40), 8)
        leader, follower = sorted(routers, key=_is_leader, reverse=True)
        assert sum(_is_leader(r) for r in routers) == 1

        leader.process.kill()  # SIGKILL: its lease is left to expire
        killed_at = time.monotonic()
        leader.process.wait(10.0)
        wait_until(lambda: _is_leader(follower), DEFAULT_TTL_S + 1.0, "the follower leads")
        failover_s = time.monotonic() - killed_at
        print({"leader_failover_s": round(failover_s, 3), "ttl_s": DEFAULT_TTL_S})
        assert failover_s <= DEFAULT_TTL_S + 1.0
        assert ask(follower.ready["listen"], prompt(40), 8) == reference(prompt(40), 8)
        events = [e["event"] for e in follower.log_events()]
        assert "leader_elected" in events
        assert follower.stop() == 0
    finally:
        for router in routers:
            router.stop()

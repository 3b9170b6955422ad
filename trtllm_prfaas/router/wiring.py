"""``prfaas router --discovery``: membership and leadership wired into a started RouterService.

``start_discovery`` watches the workers registered under ``/NS/workers/`` and routes to them as
they come and go (``router/discovered.py``); ``start_campaign`` campaigns for leadership among
the namespace's routers (``discovery/leader.py``) and lets the result decide whether this
replica's control loop leads or follows. Without ``--discovery`` both return None.
"""

from __future__ import annotations

import os
import socket

from trtllm_prfaas.discovery import open_membership
from trtllm_prfaas.discovery.leader import EtcdLeadership, LeaderConfig
from trtllm_prfaas.router.discovered import DiscoveredWorkers
from trtllm_prfaas.router.service import RouterService
from trtllm_prfaas.router.settings import RouterSettings
from trtllm_prfaas.telemetry.metrics import DiscoveryMetrics

__all__ = ["DISCOVERY_WAIT_S", "start_campaign", "start_discovery"]

DISCOVERY_WAIT_S = 5.0  # at start: the first listing and the workers it names, at most this


def start_discovery(settings: RouterSettings, service: RouterService) -> DiscoveredWorkers | None:
    """With ``--discovery``: watch the registered workers and route to them as they come and
    go (``router/discovered.py``); waits a few seconds for the first listing."""
    if settings.discovery is None:
        return None
    membership = open_membership(settings.discovery)
    discovered = DiscoveredWorkers(
        service.orchestrator,
        membership,
        settings.namespace,
        DiscoveryMetrics(service.registry),
    )
    try:
        service.run_on_loop(discovered.start(wait_s=DISCOVERY_WAIT_S), DISCOVERY_WAIT_S + 10.0)
    except BaseException:
        membership.close()
        raise
    return discovered


def start_campaign(settings: RouterSettings, service: RouterService) -> EtcdLeadership | None:
    """With ``--discovery``: campaign for leadership among the namespace's routers (returns at
    once) and let it decide whether this control loop leads or follows."""
    if settings.discovery is None:
        return None
    replica_id = f"{socket.gethostname()}:{os.getpid()}@{service.address}"
    config = LeaderConfig(
        endpoints=settings.discovery.endpoints,
        namespace=settings.namespace,
        replica_id=replica_id,
    )
    leadership = EtcdLeadership(config, metrics=service.metrics)
    service.orchestrator.control.replica = leadership
    service.run_on_loop(leadership.start(), 10.0)
    return leadership

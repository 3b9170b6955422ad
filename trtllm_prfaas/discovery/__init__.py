"""Worker membership: workers register under a lease, routers list and watch them.

``membership.py`` is the interface (its docstring is the contract), ``static.py`` the in-process
store built from a ``--worker`` list, ``etcd.py`` the etcd v3 store, ``records.py`` the record a
worker registers. ``open_membership(config)`` opens the store a ``--discovery`` URL names.
Router leader election lives beside them (``leader.py``).
"""

from __future__ import annotations

from trtllm_prfaas.discovery.membership import (
    DEFAULT_LEASE_TTL_S,
    DiscoveryConfig,
    DiscoveryUnavailable,
    EventKind,
    MemberEvent,
    Membership,
    Registration,
    Watch,
    parse_discovery,
    worker_key,
    worker_prefix,
)
from trtllm_prfaas.discovery.records import BadRecord, WorkerRecord, decode_record, encode_record
from trtllm_prfaas.discovery.static import StaticMembership

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "BadRecord",
    "DiscoveryConfig",
    "DiscoveryUnavailable",
    "EventKind",
    "MemberEvent",
    "Membership",
    "Registration",
    "StaticMembership",
    "Watch",
    "WorkerRecord",
    "decode_record",
    "encode_record",
    "open_membership",
    "parse_discovery",
    "worker_key",
    "worker_prefix",
]


def open_membership(config: DiscoveryConfig, *, call_timeout_s: float = 2.0) -> Membership:
    """The store ``config`` names (etcd today); its client is imported here, lazily."""
    from trtllm_prfaas.discovery.etcd import EtcdMembership

    return EtcdMembership(config, call_timeout_s=call_timeout_s)

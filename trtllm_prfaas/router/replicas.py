"""Router replicas: which one runs the long-timescale work, and how the others follow it.

Several routers may serve the same workers. One of them, the *leader*, runs the control loop's
long-timescale work: it moves the threshold ``t`` and the cache policy, drains nodes and converts
their roles, and publishes what followers need (:class:`PublishedPolicy`). The others, the
*followers*, keep routing every request themselves (the short timescale: ``policy.route`` on
their own cluster view) with the policy the leader last published.

:class:`Replica` is the seam the control loop sees; it knows nothing of etcd:

- ``is_leader()`` -- may this replica act now? Asked by the control loop before each tick and
  before each role conversion; cheap (no I/O), may change at any call. An implementation must
  turn False *before* another replica can become leader (``discovery/leader.py``: the lease's
  local deadline passes before etcd can expire it).
- ``publish(policy)`` -- the leader's policy for the followers; fenced: a replica that is no
  longer leader publishes nothing (returns False). Awaited on the router's loop; bounded by the
  implementation's call timeout; never raises for a store that is down (returns False, logs).
- ``followed()`` -- the last policy published by a leader, or None; no I/O (the implementation
  keeps it current from a watch).

:class:`SoleReplica` is the embedded default (``prfaas up``, a router without ``--discovery``):
always the leader, publishing nowhere. :class:`LocalReplica` replicas share a
:class:`LocalBoard` in one process (tests, the simulator): the board says who leads.
"""

from __future__ import annotations

import abc

import msgspec

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.controller import CachePolicy, ControllerState

__all__ = [
    "LocalBoard",
    "LocalReplica",
    "PublishedPolicy",
    "Replica",
    "SoleReplica",
    "followed_state",
    "next_publication",
]


class PublishedPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """What the leader publishes for followers (JSON under ``/<namespace>/policy``).

    ``sequence`` grows with each publication of one leader; ``leader_id`` names it (a new leader
    starts its own sequence). Unknown fields are ignored, so a newer leader may add some."""

    leader_id: str
    sequence: int
    threshold_tokens: float
    cache_policy: str  # policy.controller.CachePolicy value: "scarce" or "abundant"
    draining: tuple[str, ...] = ()  # worker names the leader drains (no new work for them)
    version: int = 1

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes) -> PublishedPolicy:
        """Decode a publication; ``ConfigError`` naming what is wrong if it is malformed."""
        try:
            return msgspec.json.decode(data, type=cls)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ConfigError(f"malformed published policy: {exc}") from exc


def next_publication(
    leader_id: str, last: PublishedPolicy | None, state: ControllerState, draining: tuple[str, ...]
) -> PublishedPolicy | None:
    """The leader's next publication of ``state`` and its drains; None when ``last`` (this
    leader's previous one) already says the same."""
    threshold, cache = state.threshold_tokens, state.cache_policy.value
    if last is not None and (last.threshold_tokens, last.cache_policy, last.draining) == (
        threshold,
        cache,
        draining,
    ):
        return None
    sequence = last.sequence + 1 if last is not None else 1
    return PublishedPolicy(
        leader_id=leader_id,
        sequence=sequence,
        threshold_tokens=threshold,
        cache_policy=cache,
        draining=draining,
    )


def followed_state(policy: PublishedPolicy, before: ControllerState, now: float) -> ControllerState:
    """A follower's controller state under the leader's ``policy`` (an unknown cache policy
    keeps the one in force)."""
    try:
        cache = CachePolicy(policy.cache_policy)
    except ValueError:
        cache = before.cache_policy
    return ControllerState(
        policy.threshold_tokens, cache, now, before.healthy_since_s, before.low_egress_since_s
    )


class Replica(abc.ABC):
    """This router's part among its replicas (see the module doc for the contract)."""

    has_followers = True  # False: nobody reads publications (the control loop skips them)

    @abc.abstractmethod
    def is_leader(self) -> bool:
        """True while this replica may run the long-timescale work; no I/O."""

    @abc.abstractmethod
    async def publish(self, policy: PublishedPolicy) -> bool:
        """Publish ``policy`` for the followers if still leader; True when stored."""

    @abc.abstractmethod
    def followed(self) -> PublishedPolicy | None:
        """The last policy a leader published (None before any); no I/O."""

    @property
    @abc.abstractmethod
    def replica_id(self) -> str:
        """This replica's name (in the leader key and in publications)."""


class SoleReplica(Replica):
    """The only router: always leader, nothing to publish to (the embedded default)."""

    has_followers = False

    def __init__(self, replica_id: str = "router") -> None:
        self._id = replica_id

    @property
    def replica_id(self) -> str:
        return self._id

    def is_leader(self) -> bool:
        return True

    async def publish(self, policy: PublishedPolicy) -> bool:
        return True

    def followed(self) -> PublishedPolicy | None:
        return None


class LocalBoard:
    """In-process stand-in for the leader key and the policy key: ``leader_id`` leads."""

    def __init__(self, leader_id: str | None = None) -> None:
        self.leader_id = leader_id
        self.policy: PublishedPolicy | None = None


class LocalReplica(Replica):
    """A replica whose leadership and publications live on a shared :class:`LocalBoard`."""

    def __init__(self, board: LocalBoard, replica_id: str) -> None:
        self.board, self._id = board, replica_id

    @property
    def replica_id(self) -> str:
        return self._id

    def is_leader(self) -> bool:
        return self.board.leader_id == self._id

    async def publish(self, policy: PublishedPolicy) -> bool:
        if not self.is_leader():  # fenced, as the etcd transaction is
            return False
        self.board.policy = policy
        return True

    def followed(self) -> PublishedPolicy | None:
        return self.board.policy

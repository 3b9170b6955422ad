"""Leader election among router replicas through an etcd lease (``etcd-sdk-python``).

Keys, under ``/<namespace>/``:

- ``leader``: the leader's replica id, attached to its lease. A replica *campaigns* with one
  transaction: "if ``leader`` does not exist (create revision 0), put my id under my lease". The
  winner keeps its lease alive every ``ttl_s / 3``; when it dies (SIGKILL, host lost) nobody
  renews the lease, etcd expires it within ``ttl_s`` and deletes the key; on SIGTERM the leader
  *resigns*: it revokes its lease, which deletes the key at once.
- ``policy``: the leader's :class:`~trtllm_prfaas.router.replicas.PublishedPolicy` (JSON, no
  lease: a new follower reads the last one even while no leader is elected). Written in a
  transaction fenced on ``leader`` holding the writer's id, so a deposed leader writes nothing.

Followers watch both keys (``leader`` deleted: campaign at once; ``policy`` put: keep it for
:meth:`EtcdLeadership.followed`) and read them again every ``poll_s`` in case a watch broke
(etcd restarted, a stream reset): a missed event costs at most ``poll_s``.

Two leaders never act at once. ``is_leader()`` is computed from the clock: True only until
``sent + ttl - step_down_margin_s``, ``sent`` being when the last successful keep-alive (or the
lease grant) was *sent*. etcd cannot expire the lease before ``sent + ttl`` (it reset the lease's
TTL when the request *arrived*, later), and no other replica can win before the lease expires; so
a leader that cannot reach etcd stops acting before anyone else may start, with
``step_down_margin_s`` (0.25 s) for clock-rate differences and scheduling. A control tick that
began just before the deadline still finishes; that tick is the only overlap.

TTL: ``ttl_s = 3`` by default. A killed leader is replaced within the TTL plus etcd's expiry
check (its lessor scans every 0.5 s) plus one watch event, under 4 s in all, as quick as a lost
worker is found (``RouterConfig.worker_lost_s = 3``); keep-alives every second survive two lost
ones; and 3 s stays above etcd's minimum lease TTL (1.5 x its 1 s election timeout by default),
which it would silently round up to. ``call_timeout_s = 1``: a keep-alive that takes longer
than a third of the TTL is as good as lost.

Every etcd call runs in a worker thread (``asyncio.to_thread``) with a gRPC timeout of
``call_timeout_s``, so the router's event loop never blocks on etcd. The client is built with
endpoints that are never marked "failed" (pyetcd's default would refuse to retry an endpoint for
300 s after one error), so it reconnects as soon as etcd is back.

Usage (the router's wiring)::

    endpoints = parse_discovery(url).endpoints      # discovery/membership.py
    leadership = EtcdLeadership(LeaderConfig(endpoints=endpoints, namespace=ns,
                                             replica_id=name), metrics=metrics)
    await leadership.start()          # campaigns in the background; returns at once
    orchestrator.control.replica = leadership   # the control loop leads or follows
    ...
    await leadership.stop()           # resigns: another replica leads at once
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trtllm_prfaas.discovery.etcd import connect_etcd
from trtllm_prfaas.errors import ConfigError, PrfaasError
from trtllm_prfaas.router.replicas import PublishedPolicy, Replica
from trtllm_prfaas.tasks import cancel_and_wait
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.telemetry.metrics import RouterMetrics

__all__ = ["DEFAULT_TTL_S", "EtcdLeadership", "LeaderConfig", "connect_etcd"]

log = get_logger(__name__)

DEFAULT_TTL_S = 3  # see the module doc


@dataclass(frozen=True, kw_only=True)
class LeaderConfig:
    """One replica's election settings (values explained in the module doc)."""

    endpoints: tuple[tuple[str, int], ...]
    namespace: str
    replica_id: str
    ttl_s: int = DEFAULT_TTL_S
    call_timeout_s: float = 1.0
    poll_s: float = 1.0  # followers re-read the keys this often (a missed watch event)
    step_down_margin_s: float = 0.25

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("LeaderConfig.endpoints: at least one etcd HOST:PORT")
        if not self.namespace.strip("/") or not self.replica_id:
            raise ConfigError("LeaderConfig: namespace and replica_id must not be empty")
        if self.ttl_s < 2:
            raise ConfigError(
                f"LeaderConfig.ttl_s must be >= 2 s (etcd's minimum), got {self.ttl_s}"
            )
        if not 0 < self.call_timeout_s <= self.ttl_s / 2 or not self.poll_s > 0:
            raise ConfigError("LeaderConfig: need 0 < call_timeout_s <= ttl_s / 2 and poll_s > 0")
        if not 0 <= self.step_down_margin_s < self.ttl_s / 2:
            raise ConfigError("LeaderConfig.step_down_margin_s must be in [0, ttl_s / 2)")

    @property
    def leader_key(self) -> str:
        return f"/{self.namespace.strip('/')}/leader"

    @property
    def policy_key(self) -> str:
        return f"/{self.namespace.strip('/')}/policy"


class EtcdLeadership(Replica):
    """Campaigns for leadership on ``start()``; leads or follows until ``stop()``."""

    def __init__(
        self,
        config: LeaderConfig,
        metrics: RouterMetrics | None = None,
        on_change: Callable[[bool], None] | None = None,
        client: Any = None,
    ) -> None:
        self.config, self.metrics, self.on_change = config, metrics, on_change
        self._client = (
            client
            if client is not None
            else connect_etcd(config.endpoints, config.call_timeout_s, retry_s=0.0)  # never benched
        )
        self._lease_id: int | None = None
        self._valid_until = 0.0  # monotonic s: leader until then, if not renewed
        self._leading = False
        self._policy: PublishedPolicy | None = None
        self.leader_id: str | None = None  # the leader last seen (None: none elected)
        self.num_elections_won = 0
        self._wake = asyncio.Event()
        self._watch_ids: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        if metrics is not None:
            metrics.set_leader(False)

    # ------------------------------------------------------------------------ Replica
    @property
    def replica_id(self) -> str:
        return self.config.replica_id

    def is_leader(self) -> bool:
        return self._leading and time.monotonic() < self._valid_until

    def followed(self) -> PublishedPolicy | None:
        return self._policy

    async def publish(self, policy: PublishedPolicy) -> bool:
        if not self.is_leader():
            return False
        c, tx = self.config, self._client.transactions
        try:
            ok, _ = await self._call(
                self._client.transaction,
                compare=[tx.value(c.leader_key) == c.replica_id],
                success=[tx.put(c.policy_key, policy.to_json())],
                failure=[],
            )
        except Exception as exc:  # etcd down: the followers keep the last policy
            log.warning("policy_publish_failed", replica=c.replica_id, error=repr(exc))
            return False
        if ok:
            self._policy = policy
        return bool(ok)

    # ---------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Campaign in the background (returns at once; ``is_leader()`` tells the outcome)."""
        if self._closed:
            raise RuntimeError("EtcdLeadership was stopped: make a new one")
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run())

    async def stop(self, resign: bool = True) -> None:
        """Stop campaigning. ``resign``: revoke the lease, so another replica leads at once;
        False leaves the lease to expire (what a killed process does; for tests). Idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        # bounded, logged if it does not end, and the caller's cancellation is not swallowed
        await cancel_and_wait([task], self.config.call_timeout_s + 2.0, f"leader {self.replica_id}")
        await self._cancel_watches()
        if self._leading:
            self._set_leading(False, "resigned" if resign else "stopped")
        if resign:
            await self._revoke()
        with contextlib.suppress(Exception):  # closes its channels: a thread, bounded as well
            await self._call(self._client.close)

    async def __aenter__(self) -> EtcdLeadership:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        while True:
            try:
                if await self._campaign():
                    await self._lead()
                else:
                    await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd unreachable or answering errors: say so, retry
                log.warning("leader_election_error", replica=self.replica_id, error=repr(exc))
                if self._leading and not self.is_leader():
                    self._set_leading(False, "lease_not_renewed")
                await asyncio.sleep(self.config.poll_s)

    async def _campaign(self) -> bool:
        """Try to become leader if nobody is; True when this replica won."""
        await self._read_policy()
        holder = await self._read_leader()
        if holder is not None:
            return False
        c, tx = self.config, self._client.transactions
        sent = time.monotonic()
        lease = await self._call(self._client.lease, c.ttl_s)
        ok, _ = await self._call(
            self._client.transaction,
            compare=[tx.create(c.leader_key) == 0],
            success=[tx.put(c.leader_key, c.replica_id, lease=lease.id)],
            failure=[],
        )
        if self.metrics is not None:
            self.metrics.record_election("won" if ok else "lost")
        if not ok:  # another replica was quicker: learn who
            self._lease_id = lease.id
            await self._revoke()
            await self._read_leader()
            return False
        self._lease_id, self.leader_id = lease.id, c.replica_id
        self._valid_until = sent + min(int(lease.ttl), c.ttl_s) - c.step_down_margin_s
        self.num_elections_won += 1
        self._set_leading(True, "elected")
        return True

    async def _lead(self) -> None:
        """Renew the lease every ``ttl_s / 3`` until it cannot be renewed or is gone."""
        c = self.config
        while True:
            await asyncio.sleep(c.ttl_s / 3)
            if not self.is_leader():
                return await self._step_down("lease_not_renewed")
            sent = time.monotonic()
            try:
                ttl = await self._call(self._keep_alive, self._lease_id)
                holder = await self._read_leader()
            except Exception as exc:  # keep trying until the deadline; is_leader() ends it
                log.warning("leader_renew_failed", replica=c.replica_id, error=repr(exc))
                continue
            if ttl <= 0 or holder != c.replica_id:
                return await self._step_down("lease_lost")
            self._valid_until = sent + min(ttl, c.ttl_s) - c.step_down_margin_s

    async def _follow(self) -> None:
        """Wait until the leader key may be gone (a watch event, or ``poll_s``)."""
        self._wake.clear()
        await self._ensure_watches()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.poll_s):
                await self._wake.wait()

    async def _step_down(self, reason: str) -> None:
        self._set_leading(False, reason)
        await self._revoke()

    def _set_leading(self, leading: bool, reason: str) -> None:
        was, self._leading = self._leading, leading
        if was == leading:
            return
        if leading:
            log.info("leader_elected", replica=self.replica_id, ttl_s=self.config.ttl_s,
                     lease=self._lease_id)  # fmt: skip
        else:
            log.warning("leader_stepped_down", replica=self.replica_id, reason=reason)
            if self.leader_id == self.replica_id:
                self.leader_id = None
        if self.metrics is not None:
            self.metrics.set_leader(leading)
            if not leading:
                self.metrics.record_step_down(reason)
        if self.on_change is not None:
            self.on_change(leading)

    # ---------------------------------------------------------------------- etcd calls
    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` in a worker thread; its own gRPC timeout bounds it, this one too.
        ``asyncio.timeout``, not ``wait_for``: Python 3.11's ``wait_for`` returns the result of
        a call that finishes as the task is cancelled and drops the cancellation (gh-86296),
        which left a stopped leader's task running on, "cancelling", in ``_lead``."""
        async with asyncio.timeout(self.config.call_timeout_s + 0.5):
            return await asyncio.to_thread(fn, *args, **kwargs)

    def _keep_alive(self, lease_id: int) -> int:
        """One keep-alive round trip; the lease's TTL now (0 or less: it expired)."""
        ttl = 0
        for response in self._client.refresh_lease(lease_id):
            ttl = int(response.TTL)
        return ttl

    async def _revoke(self) -> None:
        """Revoke this replica's lease (deletes its leader key); best effort, bounded."""
        lease_id, self._lease_id = self._lease_id, None
        if lease_id is None:
            return
        try:
            await self._call(self._client.revoke_lease, lease_id)
        except Exception as exc:  # etcd down: the lease expires by itself within ttl_s
            log.warning("lease_revoke_failed", replica=self.replica_id, error=repr(exc))

    async def _read_leader(self) -> str | None:
        value, _ = await self._call(self._client.get, self.config.leader_key)
        holder = value.decode("utf-8", "replace") if value is not None else None
        if holder != self.leader_id:
            log.info("leader_observed", replica=self.replica_id, leader=holder)
            self.leader_id = holder
        return holder

    async def _read_policy(self) -> None:
        value, _ = await self._call(self._client.get, self.config.policy_key)
        if value is not None:
            self._take_policy(value)

    def _take_policy(self, value: bytes) -> None:
        try:
            policy = PublishedPolicy.from_json(value)
        except PrfaasError as exc:  # a bad publication is ignored; the last good one stays
            log.warning("policy_ignored", replica=self.replica_id, error=str(exc))
            return
        if policy != self._policy:
            log.info("policy_followed", replica=self.replica_id, leader=policy.leader_id,
                     sequence=policy.sequence, threshold=policy.threshold_tokens)  # fmt: skip
            self._policy = policy

    # ------------------------------------------------------------------------ watches
    async def _ensure_watches(self) -> None:
        """Watch ``leader`` and ``policy`` (again, after a broken stream); failures are retried
        on the next follow."""
        if self._watch_ids:
            return
        c = self.config
        try:
            for key in (c.leader_key, c.policy_key):
                watch_id = await self._call(self._client.add_watch_callback, key, self._on_watch)
                self._watch_ids.append(watch_id)
        except Exception as exc:
            log.warning("leader_watch_failed", replica=self.replica_id, error=repr(exc))
            await self._cancel_watches()

    def _on_watch(self, response: Any) -> None:
        """pyetcd's watch thread: hand the response to the loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._on_watch_event, response)

    def _on_watch_event(self, response: Any) -> None:
        if isinstance(response, Exception):  # the stream broke: watch again on the next follow
            self._watch_ids.clear()
            self._wake.set()
            return
        for event in getattr(response, "events", ()):
            key = bytes(event.key).decode("utf-8", "replace")
            is_delete = type(event).__name__ == "DeleteEvent"
            if key == self.config.leader_key and is_delete:
                self._wake.set()  # no leader: campaign now
            elif key == self.config.policy_key and not is_delete:
                self._take_policy(bytes(event.value))

    async def _cancel_watches(self) -> None:
        ids, self._watch_ids = self._watch_ids, []
        for watch_id in ids:
            with contextlib.suppress(Exception):  # a broken stream has no watch left to cancel
                await self._call(self._client.cancel_watch, watch_id)

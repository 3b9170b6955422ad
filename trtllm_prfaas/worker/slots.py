"""A decode worker's slots: the one authority on how many decodes it takes.

Several routers (replicas) may send decodes to one worker; each one only knows what it sent
itself, so counting slots on the router side would oversubscribe. A router therefore *reserves*
a slot (``protocol.Reserve``) before the request's prefill starts, and the worker grants it only
while it has a free slot; a refused router tries another decode node, or answers the client
``UNAVAILABLE``.

A slot is held by a reservation id from its grant until one of:

- the request's decode leg finishes on this worker (tokens, an error, its deadline): the legs
  that named the reservation (``Submit.reservation_id``) are attached to it, and the end of
  one of them ends the request here;
- the router releases it (``Cancel`` of the reservation id: the request ended elsewhere, was
  cancelled, or never needed its decode leg, as a one-token answer);
- it is not used within ``ttl_s`` (the router died between grant and decode leg). A slot with a
  leg attached does not expire: the leg has its own deadline.

``Cancel`` of a leg only detaches it: a router that re-submits the leg (the relay's source died:
the same leg again, computed here) keeps its slot. Requests that came without a reservation
(version-1 routers, tests that submit directly) take no reservation but count as taken slots, so
reservations are never granted past ``capacity`` while they run.

Plain bookkeeping on the serve loop's thread (no locks, no I/O); time is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DecodeSlots"]


@dataclass
class _Slot:
    expires_at: float  # monotonic s; ignored while a leg is attached
    legs: set[str] = field(default_factory=set)


class DecodeSlots:
    """Reservations of one decode worker with ``capacity`` slots (its ``max_num_seqs``)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._slots: dict[str, _Slot] = {}  # reservation id -> its slot
        self._leg_slot: dict[str, str] = {}  # attached leg id -> reservation id

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, reservation_id: object) -> bool:
        return reservation_id in self._slots

    def has_leg(self, leg_id: str) -> bool:
        return leg_id in self._leg_slot

    def num_free(self, num_unreserved: int) -> int:
        """Slots left when ``num_unreserved`` requests without a reservation also run here."""
        return max(self.capacity - len(self._slots) - num_unreserved, 0)

    def reserve(self, reservation_id: str, ttl_s: float, now: float, num_unreserved: int) -> bool:
        """Grant a slot (True), or refuse when none is free (False). Idempotent: a reservation
        already held is granted again (a router retrying its ``Reserve``)."""
        if reservation_id in self._slots:
            return True
        if self.num_free(num_unreserved) <= 0:
            return False
        self._slots[reservation_id] = _Slot(now + ttl_s)
        return True

    def attach(self, reservation_id: str, leg_id: str) -> bool:
        """Leg ``leg_id`` runs on reservation ``reservation_id``; False if that is not held
        (expired or released: the leg must find a free slot as an unreserved one)."""
        slot = self._slots.get(reservation_id)
        if slot is None:
            return False
        slot.legs.add(leg_id)
        self._leg_slot[leg_id] = reservation_id
        return True

    def detach(self, leg_id: str) -> None:
        """Leg ``leg_id`` was cancelled: its slot stays held (until released, re-used by a
        re-submitted leg, or its ``ttl_s``)."""
        reservation_id = self._leg_slot.pop(leg_id, None)
        slot = self._slots.get(reservation_id) if reservation_id else None
        if slot is not None:
            slot.legs.discard(leg_id)

    def leg_ended(self, leg_id: str) -> str | None:
        """Leg ``leg_id`` finished (tokens or an error): its request is over here and its slot
        is free. Returns the reservation released, if any."""
        reservation_id = self._leg_slot.pop(leg_id, None)
        if reservation_id is not None:
            self.release(reservation_id)
        return reservation_id

    def release(self, reservation_id: str) -> list[str]:
        """Free reservation ``reservation_id``; returns the legs still attached to it."""
        slot = self._slots.pop(reservation_id, None)
        if slot is None:
            return []
        for leg_id in slot.legs:
            self._leg_slot.pop(leg_id, None)
        return sorted(slot.legs)

    def expire(self, now: float) -> list[str]:
        """Free the reservations unused past their ``ttl_s``; returns their ids."""
        expired = [r for r, s in self._slots.items() if not s.legs and now >= s.expires_at]
        for reservation_id in expired:
            del self._slots[reservation_id]
        return expired

    def clear(self) -> None:
        """Forget every reservation (the worker changed role)."""
        self._slots.clear()
        self._leg_slot.clear()

"""The engine's device-pool block manager and state-slot allocator (plain Python, no tensors).

Blocks are reserved for a request's worst case (prompt + max_tokens) when it is admitted and
handed out as its sequence grows, so a running request can never run out of blocks mid-decode.
"""

from __future__ import annotations

from trtllm_prfaas.errors import AdmissionRejected

__all__ = ["BlockManager", "SlotAllocator"]


class BlockManager:
    """Free list of block ids with reservations; every id is free, reserved-unused or in use."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, ...
        self._reserved = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_available(self) -> int:
        """Blocks neither in use nor promised to an admitted request."""
        return len(self._free) - self._reserved

    def can_reserve(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_available

    def reserve(self, num_blocks: int) -> None:
        if not self.can_reserve(num_blocks):
            raise AdmissionRejected(
                f"KV block pool exhausted: need {num_blocks} blocks, "
                f"{self.num_available} available of {self.num_blocks}"
            )
        self._reserved += num_blocks

    def take(self, num_blocks: int) -> list[int]:
        """Hand out reserved blocks (the caller reserved them before)."""
        if num_blocks > self._reserved:
            raise AssertionError(f"take({num_blocks}) exceeds the {self._reserved} reserved")
        self._reserved -= num_blocks
        return [self._free.pop() for _ in range(num_blocks)]

    def release(self, block_ids: list[int], unused_reservation: int) -> None:
        """Return a finished request's blocks and whatever of its reservation it never took."""
        self._free.extend(reversed(block_ids))
        self._reserved -= unused_reservation

    def leak_report(self) -> str | None:
        if self.num_free == self.num_blocks and self._reserved == 0:
            return None
        return f"{self.num_blocks - self.num_free} blocks in use, {self._reserved} reserved"


class SlotAllocator:
    """Recurrent-state slots: one per admitted request."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise AdmissionRejected(f"no free sequence slot (max_num_seqs={self.num_slots})")
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

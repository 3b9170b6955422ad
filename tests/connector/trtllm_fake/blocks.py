"""One rank's KV block bookkeeping: allocation, reuse with the prefix match, pinning.

Plain Python with no tensors: the one device copy (a partly matched block's first tokens) is a
callable the executor passes in. ``TllmCheckError`` stands for a failed C++ ``TLLM_CHECK``, here
and in the executor's ``setPrepopulatedPromptLen``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class TllmCheckError(RuntimeError):
    """A failed ``TLLM_CHECK`` in TensorRT-LLM's C++ (raised out of the executor loop)."""


class BlockManager:
    """One rank's block bookkeeping (identical on every rank: allocation is deterministic).

    Reuse (``kvCacheManager.cpp`` 126178160 ``loadOrAllocateBlocks``, ``storeBlocks``,
    ``storeContextBlocks``): a stored block is keyed by (the tokens before it, its own tokens);
    matching walks the prompt minus its last token block by block, a full match continues, and
    with partial reuse (``enable_partial_reuse``, on by default in ``KvCacheConfig``) the best
    common prefix with a stored block ends the match: a block in use or with children is copied
    into a private block (``copy_on_partial_reuse``), a free leaf leaves the tree and is reused.
    Stored blocks stay matchable after release until an allocation evicts them (never-stored
    free blocks go first)."""

    def __init__(
        self, num_blocks: int, tpb: int, partial_reuse: bool, copy: Callable[[int, int, int], None]
    ) -> None:
        self.tpb, self.partial_reuse, self._copy = tpb, partial_reuse, copy
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.children: dict[tuple[int, ...], dict[tuple[int, ...], int]] = {}
        self.key_of: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.blocks: dict[int, list[int]] = {}  # request id -> its block ids, in order
        self.pinned: dict[int, list[int]] = {}  # request id -> blocks pinned by a save

    def num_free(self) -> int:
        return len(self.free)

    def cached_block(self, tokens: list[int]) -> int | None:
        """The stored block whose key ends exactly at the end of ``tokens`` (None if absent)."""
        start = (len(tokens) - 1) // self.tpb * self.tpb
        return self.children.get(tuple(tokens[:start]), {}).get(tuple(tokens[start:]))

    def add_sequence(self, rid: int, tokens: list[int], input_len: int) -> int:
        """Allocate ``ceil(input_len / tpb)`` blocks, reusing what matches of
        ``tokens[: input_len - 1]``; return the matched token count."""
        limit, matched, num_matched = input_len - 1, [], 0
        for start in range(0, limit, self.tpb):
            parent, own = tuple(tokens[:start]), tuple(tokens[start : min(start + self.tpb, limit)])
            stored = self.children.get(parent, {})
            block = stored.get(own) if len(own) == self.tpb else None
            if block is not None:
                self._claim(block)
                matched.append(block)
                num_matched += self.tpb
                continue
            best = max(((_common(own, key), b) for key, b in stored.items()), default=(0, -1))
            if self.partial_reuse and best[0] > 0:
                matched.append(self._reuse_partly(best[1], best[0]))
                num_matched += best[0]
            break
        fresh = [self._allocate() for _ in range(-(-input_len // self.tpb) - len(matched))]
        self.blocks[rid] = matched + fresh
        return num_matched

    def _reuse_partly(self, block: int, num_tokens: int) -> int:
        parent, own = self.key_of[block]
        if self.refs[block] == 0 and not self.children.get(parent + own):
            self._forget(block)  # a free leaf: out of the tree, reused privately
            self._claim(block)
            return block
        self._claim(block)  # in use or has children: copy its matched tokens
        copy = self._allocate()
        self._copy(block, copy, num_tokens)
        self._unref(block)
        return copy

    def add_token(self, rid: int, num_tokens: int) -> None:
        """The sequence now holds ``num_tokens`` tokens: a new block when the last one is full."""
        if num_tokens > len(self.blocks[rid]) * self.tpb:
            self.blocks[rid].append(self._allocate())

    def store(self, rid: int, tokens: list[int], num_with_kv: int, partial: bool) -> None:
        """Make the request's blocks holding computed KV matchable: full ones, and with
        ``partial`` (a released request) the last partly filled one; first writer wins."""
        for b, block in enumerate(self.blocks.get(rid, [])):
            start, end = b * self.tpb, min((b + 1) * self.tpb, num_with_kv)
            if end <= start or (end - start < self.tpb and not partial):
                return
            parent, own = tuple(tokens[:start]), tuple(tokens[start:end])
            old = self.key_of.get(block)
            if old is not None and (old[0] != parent or own[: len(old[1])] != old[1]):
                continue  # the block holds another prefix (a shared or stale key)
            if old is not None:
                self._forget(block)  # grown since it was stored: re-key it
            self.children.setdefault(parent, {}).setdefault(own, block)
            if self.children[parent][own] == block:
                self.key_of[block] = (parent, own)

    def release(self, rid: int, pin: bool) -> None:
        blocks = self.blocks.pop(rid)
        if pin:
            self.pinned[rid] = blocks
            return
        for block in blocks:
            self._unref(block)

    def unpin(self, rid: int) -> None:
        for block in self.pinned.pop(rid):
            self._unref(block)

    def _claim(self, block: int) -> None:
        self.refs[block] += 1
        self.free.pop(block, None)

    def _unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None  # most recently freed last

    def _forget(self, block: int) -> None:
        parent, own = self.key_of.pop(block)
        del self.children[parent][own]

    def _allocate(self) -> int:
        uncached = next((b for b in self.free if b not in self.key_of), None)
        block = uncached if uncached is not None else next(iter(self.free), None)
        if block is None:
            raise TllmCheckError("Can't allocate new blocks. No free blocks left.")
        if block in self.key_of:
            self._forget(block)  # evicted from the reuse tree
        self._claim(block)
        return block


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix of ``a`` and ``b``."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n

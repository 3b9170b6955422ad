"""Content keys for KV blocks and recurrent-state snapshots.

A full block's key is a chained 64-bit xxh64 hash::

    root    = xxh64(DOMAIN_BLOCK || key bytes)
    hash_i  = xxh64(hash_{i-1} as u64 LE || key bytes || tokens of block i as int32 LE)

so a block's hash names its whole prefix: changing a token in block ``i`` changes hashes ``i``
onward and none before. The :class:`CacheKey` (model, layout, dtype, TP rank, salt) is mixed into
the root and into every link, so caches that must not share bytes get disjoint hashes. Only FULL
blocks are hashed: a partial tail block is never reusable.

:func:`prefix_hash` names an exact-length prefix (a recurrent-state snapshot). It hashes the length
too, in its own domain, so it never equals a block hash by construction of the input.

Everything is deterministic across processes and machines (no Python ``hash()``, no seeds).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from trtllm_prfaas.errors import ConfigError, InvalidRequestError

__all__ = ["CacheKey", "block_hashes", "prefix_hash"]

_DOMAIN_BLOCK = b"prfaas.kv.block.v1\x00"
_DOMAIN_PREFIX = b"prfaas.kv.prefix.v1\x00"
_INT32_MAX = 2**31 - 1
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class CacheKey:
    """Everything besides the tokens that decides whether two caches' bytes are interchangeable.

    ``layout`` names the byte layout (e.g. ``"HND"``), ``dtype`` the element type (e.g.
    ``"bfloat16"``); ``cache_salt`` isolates tenants that must never share a cache.
    """

    model_id: str
    layout: str
    dtype: str
    tp_rank: int
    cache_salt: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.tp_rank, bool) or not isinstance(self.tp_rank, int) or self.tp_rank < 0:
            raise ConfigError(f"CacheKey.tp_rank must be an int >= 0, got {self.tp_rank!r}")

    def to_bytes(self) -> bytes:
        """A canonical, unambiguous encoding: length-prefixed UTF-8 strings, then the rank."""
        out = bytearray()
        for text in (self.model_id, self.layout, self.dtype, self.cache_salt):
            raw = text.encode("utf-8")
            out += struct.pack("<I", len(raw)) + raw
        out += struct.pack("<q", self.tp_rank)
        return bytes(out)


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    """Tokens as little-endian int32 bytes; raises InvalidRequestError outside [0, 2^31)."""
    arr = np.asarray(token_ids, dtype=np.int64)
    if arr.ndim != 1:
        raise InvalidRequestError(f"token_ids must be 1-D, got shape {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _INT32_MAX):
        raise InvalidRequestError("token ids must lie in [0, 2^31)")
    return arr.astype("<i4").tobytes()


def block_hashes(token_ids: Sequence[int], tokens_per_block: int, key: CacheKey) -> list[int]:
    """Chained hashes of the FULL blocks of ``token_ids`` (a trailing partial block is skipped).

    Returns one unsigned 64-bit int per full block. Pure and deterministic.
    """
    if tokens_per_block < 1:
        raise ConfigError(f"tokens_per_block must be >= 1, got {tokens_per_block}")
    data = _token_bytes(token_ids)
    key_bytes = key.to_bytes()
    stride = 4 * tokens_per_block  # bytes of one block's tokens
    parent = xxhash.xxh64_intdigest(_DOMAIN_BLOCK + key_bytes)
    hashes: list[int] = []
    pack, digest = _U64.pack, xxhash.xxh64_intdigest  # one digest call per block: the router
    for start in range(0, len(data) - stride + 1, stride):  # hashes every prompt it routes
        parent = digest(pack(parent) + key_bytes + data[start : start + stride])
        hashes.append(parent)
    return hashes


def prefix_hash(token_ids: Sequence[int], key: CacheKey) -> int:
    """Hash of the exact prefix ``token_ids`` (any length, length included) under ``key``.

    Names a recurrent-state snapshot taken after exactly ``len(token_ids)`` tokens.
    """
    h = xxhash.xxh64()
    h.update(_DOMAIN_PREFIX)
    h.update(key.to_bytes())
    h.update(struct.pack("<Q", len(token_ids)))
    h.update(_token_bytes(token_ids))
    return h.intdigest()

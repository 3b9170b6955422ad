"""KV cache geometry, block hashing and the hybrid prefix-cache pool (pure Python + torch).

- :mod:`.spec`: :class:`KVSpec` (exact bytes per token/block, ``S_kv(l)``) and the paper's fitted
  1T model (:func:`paper_1t_kv_spec`).
- :mod:`.hashing`: chained block hashes and exact-length prefix hashes under a :class:`CacheKey`.
- :mod:`.pool`: :class:`HybridPrefixCachePool`, host storage for prefix-cache blocks,
  transfer-cache blocks and recurrent-state snapshots.
"""

from __future__ import annotations

from trtllm_prfaas.kv.hashing import CacheKey, block_hashes, prefix_hash
from trtllm_prfaas.kv.pool import HybridPrefixCachePool, LeakReport, PoolStats, TransferId
from trtllm_prfaas.kv.spec import (
    MIB,
    TABLE5,
    KVSpec,
    PaperKVSpec,
    Table5Row,
    paper_1t_kv_spec,
)

__all__ = [
    "MIB",
    "TABLE5",
    "CacheKey",
    "HybridPrefixCachePool",
    "KVSpec",
    "LeakReport",
    "PaperKVSpec",
    "PoolStats",
    "Table5Row",
    "TransferId",
    "block_hashes",
    "paper_1t_kv_spec",
    "prefix_hash",
]

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trtllm_prfaas.errors import ConfigError, InvalidRequestError
from trtllm_prfaas.kv import CacheKey, block_hashes, prefix_hash


def make_key(**overrides: object) -> CacheKey:
    fields: dict[str, object] = dict(model_id="m", layout="HND", dtype="bfloat16", tp_rank=0)
    fields.update(overrides)
    return CacheKey(**fields)  # type: ignore[arg-type]


TOKENS = list(range(100, 164))  # 64 tokens = 4 full blocks of 16


def test_only_full_blocks_are_hashed() -> None:
    key = make_key()
    assert len(block_hashes(TOKENS, 16, key)) == 4
    assert len(block_hashes(TOKENS[:63], 16, key)) == 3
    assert block_hashes([], 16, key) == []
    assert block_hashes(TOKENS[:15], 16, key) == []


def test_hashes_are_unsigned_64_bit_and_prefix_stable() -> None:
    key = make_key()
    full = block_hashes(TOKENS, 16, key)
    assert all(0 <= h < 2**64 for h in full)
    assert block_hashes(TOKENS[:40], 16, key) == full[:2]


def test_changing_one_token_changes_that_block_and_later_only() -> None:
    key = make_key()
    base = block_hashes(TOKENS, 16, key)
    for block in range(4):
        tokens = list(TOKENS)
        tokens[block * 16 + 5] += 1
        changed = block_hashes(tokens, 16, key)
        assert changed[:block] == base[:block]
        assert all(c != b for c, b in zip(changed[block:], base[block:], strict=True))


def test_same_block_content_at_different_positions_differs() -> None:
    tokens = [7] * 48
    hashes = block_hashes(tokens, 16, make_key())
    assert len(set(hashes)) == 3


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": "m2"},
        {"layout": "NHD"},
        {"dtype": "float8"},
        {"tp_rank": 1},
        {"cache_salt": "tenant-a"},
    ],
)
def test_every_key_field_gives_disjoint_hashes(change: dict[str, object]) -> None:
    base = set(block_hashes(TOKENS, 16, make_key()))
    other = set(block_hashes(TOKENS, 16, make_key(**change)))
    assert base.isdisjoint(other)
    assert prefix_hash(TOKENS, make_key()) != prefix_hash(TOKENS, make_key(**change))


def test_key_encoding_is_unambiguous() -> None:
    a = make_key(model_id="ab", layout="c")
    b = make_key(model_id="a", layout="bc")
    assert a.to_bytes() != b.to_bytes()
    assert block_hashes(TOKENS, 16, a) != block_hashes(TOKENS, 16, b)


def test_block_size_changes_hashes() -> None:
    key = make_key()
    assert block_hashes(TOKENS, 16, key)[1] != block_hashes(TOKENS, 32, key)[0]


def test_prefix_hash_depends_on_exact_length() -> None:
    key = make_key()
    hashes = {prefix_hash(TOKENS[:n], key) for n in range(60, 65)}
    assert len(hashes) == 5
    assert prefix_hash(TOKENS, key) == prefix_hash(tuple(TOKENS), key)
    assert prefix_hash(TOKENS[:16], key) != block_hashes(TOKENS[:16], 16, key)[0]
    assert prefix_hash([], key) != prefix_hash([], make_key(tp_rank=3))


def test_deterministic_across_processes() -> None:
    code = (
        "from trtllm_prfaas.kv import CacheKey, block_hashes, prefix_hash;"
        "k = CacheKey('m', 'HND', 'bfloat16', 0);"
        "t = list(range(100, 164));"
        "print(block_hashes(t, 16, k), prefix_hash(t, k))"
    )
    # A fresh interpreter with a different str-hash seed must agree with this one.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    argv = [sys.executable, "-c", code]
    run = subprocess.run(argv, capture_output=True, text=True, check=True, env=env, timeout=60)
    key = make_key()
    assert run.stdout == f"{block_hashes(TOKENS, 16, key)} {prefix_hash(TOKENS, key)}\n"


def test_bad_inputs() -> None:
    key = make_key()
    with pytest.raises(InvalidRequestError):
        block_hashes([-1] * 16, 16, key)
    with pytest.raises(InvalidRequestError):
        prefix_hash([2**31], key)
    with pytest.raises(ConfigError):
        block_hashes(TOKENS, 0, key)
    with pytest.raises(ConfigError, match="tp_rank"):
        make_key(tp_rank=-1)

from __future__ import annotations

import pytest

from trtllm_prfaas.errors import ConfigError, InvalidRequestError
from trtllm_prfaas.kv import MIB, TABLE5, KVSpec, PaperKVSpec, paper_1t_kv_spec


def make_spec(**overrides: int) -> KVSpec:
    fields = dict(
        num_full_layers=4,
        num_kv_heads=2,
        head_dim=8,
        tokens_per_block=16,
        dtype_bytes=2,
        kv_factor=2,
        state_bytes=1000,
    )
    fields.update(overrides)
    return KVSpec(**fields)


def test_bytes_per_token_and_block() -> None:
    spec = make_spec()
    assert spec.bytes_per_token == 4 * 2 * 2 * 8 * 2  # layers * kv * heads * head_dim * dtype
    assert spec.block_bytes == spec.bytes_per_token * 16
    assert spec.layer_block_bytes * spec.num_full_layers == spec.block_bytes
    assert spec.block_shape == (4, 2, 2 * 16 * 8)


def test_mla_kv_factor_halves_bytes() -> None:
    assert make_spec(kv_factor=1).bytes_per_token * 2 == make_spec().bytes_per_token


def test_s_kv_is_state_plus_linear_tokens() -> None:
    spec = make_spec()
    assert spec.s_kv(0) == 1000
    assert spec.s_kv(100) == 1000 + 100 * spec.bytes_per_token


def test_block_counts() -> None:
    spec = make_spec()
    assert [spec.num_blocks_for(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]
    assert [spec.num_full_blocks(n) for n in (0, 15, 16, 33)] == [0, 0, 1, 2]
    with pytest.raises(InvalidRequestError):
        spec.s_kv(-1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_full_layers", 0),
        ("num_kv_heads", 0),
        ("head_dim", -1),
        ("tokens_per_block", 0),
        ("dtype_bytes", 3),
        ("kv_factor", 3),
        ("state_bytes", -1),
        ("head_dim", True),
    ],
)
def test_validation_names_the_field(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=field):
        make_spec(**{field: value})


def test_paper_fit_reproduces_table5_kv_size() -> None:
    spec = paper_1t_kv_spec()
    for row in TABLE5:
        fitted_mib = spec.s_kv_bytes(row.num_tokens) / MIB
        assert fitted_mib == pytest.approx(row.kv_mib, rel=0.03)
    # ~172 MiB of fixed state plus ~16.7 KiB per token
    assert spec.fixed_bytes / MIB == pytest.approx(172.0, rel=0.01)
    assert spec.bytes_per_token == pytest.approx(17143, rel=0.01)


def test_paper_fit_reproduces_table5_kv_throughput() -> None:
    spec = paper_1t_kv_spec()
    for row in TABLE5:
        assert spec.prefill_latency_s(row.num_tokens) == pytest.approx(row.prefill_latency_s)
        gbps = spec.s_kv_bytes(row.num_tokens) * 8 / 1e9 / spec.prefill_latency_s(row.num_tokens)
        assert gbps == pytest.approx(row.kv_gbps, rel=0.03)
        assert spec.kv_throughput_gbps(row.num_tokens) == pytest.approx(gbps)


def test_paper_latency_interpolates_and_extrapolates() -> None:
    spec = paper_1t_kv_spec()
    mid = (8 * 1024 + 32 * 1024) / 2
    assert spec.prefill_latency_s(mid) == pytest.approx((0.72 + 1.84) / 2)
    slope_low = (0.72 - 0.44) / (7 * 1024)
    assert spec.prefill_latency_s(0) == pytest.approx(0.44 - 1024 * slope_low)
    slope_high = (7.40 - 1.84) / (96 * 1024)
    assert spec.prefill_latency_s(256 * 1024) == pytest.approx(7.40 + 128 * 1024 * slope_high)
    with pytest.raises(InvalidRequestError):
        spec.prefill_latency_s(-1)


def test_paper_spec_validation() -> None:
    with pytest.raises(ConfigError, match="latency_points"):
        PaperKVSpec(fixed_bytes=0, bytes_per_token=1, latency_points=((1, 1.0), (1, 2.0)))
    with pytest.raises(ConfigError, match="bytes_per_token"):
        PaperKVSpec(fixed_bytes=0, bytes_per_token=0, latency_points=((1, 1.0), (2, 2.0)))

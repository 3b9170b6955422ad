"""Wire format, config validation, payload views and pacing: pure units, no sockets."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from trtllm_prfaas.errors import ConfigError, TransportError
from trtllm_prfaas.transport import (
    CurveKeys,
    RelayConfig,
    RelaySecurity,
    as_byte_view,
    generate_keypair,
)
from trtllm_prfaas.transport.pacing import TokenBucket
from trtllm_prfaas.transport.wire import (
    WIRE_VERSION,
    Control,
    Header,
    Kind,
    checksum,
    control_header,
    decode_header,
    encode_header,
)


def data_header(**overrides: object) -> Header:
    fields: dict[str, object] = {
        "version": WIRE_VERSION,
        "kind": Kind.FULL_BLOCK,
        "transfer_id": "t-1",
        "request_id": "r-1",
        "layer": 3,
        "block_start": 4,
        "block_end": 8,
        "item_index": 0,
        "layer_items": 1,
        "offset": 1024,
        "length": 512,
        "total_bytes": 4096,
        "checksum": checksum(b"x" * 512),
    }
    fields.update(overrides)
    return Header(**fields)  # type: ignore[arg-type]


def raw(**fields: object) -> bytes:
    base: dict[str, object] = {
        "version": WIRE_VERSION,
        "kind": 1,
        "transfer_id": "t",
        "length": 1,
        "total_bytes": 1,
    }
    base.update(fields)
    return msgspec.msgpack.encode(base)


def test_round_trip_data_and_control() -> None:
    h = data_header()
    assert decode_header(encode_header(h)) == h
    c = control_header(Control.CREDIT, "t-1", value=1 << 40)
    assert decode_header(encode_header(c)) == c
    assert (
        decode_header(encode_header(data_header(checksum=(1 << 64) - 1))).checksum == (1 << 64) - 1
    )


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        (raw(layer="x"), "$.layer"),
        (raw(kind=9), "$.kind"),
        (raw(version=99), "version"),
        (raw(transfer_id=""), "transfer_id"),
        (raw(offset=4, length=4, total_bytes=6), "length"),
        (raw(layer=-1), "layer"),
        (raw(block_start=5, block_end=2), "block_end"),
        (raw(kind=3), "control"),
        (raw(item_index=2, layer_items=1), "item_index"),
        (msgspec.msgpack.encode({"version": 1, "kind": 1}), "transfer_id"),
        (b"\xc1garbage", "not msgpack"),
    ],
)
def test_malformed_header_names_field(frame: bytes, field: str) -> None:
    with pytest.raises(TransportError, match=field.replace("$", r"\$")):
        decode_header(frame)


def test_config_validation_names_field() -> None:
    plain = RelaySecurity.insecure_plaintext()
    with pytest.raises(ConfigError, match="num_streams"):
        RelayConfig(security=plain, num_streams=0)
    with pytest.raises(ConfigError, match="credit_bytes"):
        RelayConfig(security=plain, chunk_bytes=1 << 20, credit_bytes=1 << 10)
    with pytest.raises(ConfigError, match="link_gbps"):
        RelayConfig(security=plain, link_gbps=0.0)
    with pytest.raises(ConfigError, match="connect_timeout_s"):
        RelayConfig(security=plain, connect_timeout_s=-1)
    with pytest.raises(ConfigError, match="curve"):
        RelaySecurity()
    with pytest.raises(ConfigError, match="server_public_key"):
        CurveKeys(server_public_key=b"short")
    pub, _ = generate_keypair()
    with pytest.raises(ConfigError, match="client_secret_key"):
        CurveKeys(server_public_key=pub, client_public_key=pub).require_client()


def test_byte_views_share_memory() -> None:
    t = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    view = as_byte_view(t)
    assert view.nbytes == 24 and view.format == "B"
    t[0, 0] = 7.0  # shared, not copied
    assert bytes(view[:2]) == t[0, 0].view(torch.int16).numpy().tobytes()
    assert as_byte_view(np.zeros((2, 3), dtype=np.float32)).nbytes == 24
    with pytest.raises(TransportError, match="contiguous"):
        as_byte_view(torch.zeros(4, 4).t())
    with pytest.raises(TransportError, match="unsupported"):
        as_byte_view(object())


def test_token_bucket_paces() -> None:
    bucket = TokenBucket(rate_gbps=8e-3, burst_bytes=1000, now_s=0.0)  # 1 MB/s
    assert not bucket.try_take(1000, 0.0)
    assert bucket.wait_s(1000, 0.0) == pytest.approx(1e-3)
    assert bucket.try_take(1000, 1e-3)
    assert not bucket.try_take(500, 1.2e-3)
    assert bucket.try_take(500, 1.5e-3)

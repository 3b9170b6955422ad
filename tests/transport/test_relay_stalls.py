"""No peer holds the receiver's credit budget past its transfer's bounds (issue 13, item 4).

A peer (authorised: it holds an allowed key) that stalls mid-transfer, announces an endless
deadline, or completes transfers nobody claims, blocks another peer's transfer at most until
its own transfer's deadline (capped at ``max_deadline_s``) or ``unclaimed_hold_s``; then its
buffers and credit go back and the other transfer completes. Real loopback relays, two senders
(two peers) into one receiver whose budget fits one transfer.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.transport.conftest import Relay, make_config
from trtllm_prfaas.errors import TransferTimeout, TransportError
from trtllm_prfaas.transport import InboundStatus, Kind, TransferHandle

LAYER = torch.arange(48 << 10, dtype=torch.uint8)  # 48 KiB: one fits the 64 KiB budget, two don't
BUDGET = dict(credit_bytes=64 << 10, chunk_bytes=16 << 10, expired_grace_s=0.2)


def _send(handle: TransferHandle, num_layers: int) -> None:
    for layer in range(num_layers):
        assert handle.send(Kind.FULL_BLOCK, layer, (0, 1), LAYER)
    handle.finish()


def _other_completes_after(relay: Relay, config_kw: dict[str, float], stall: str) -> float:
    """Peer A holds the budget as ``stall`` says; returns how long peer B's transfer took."""
    config = make_config(**BUDGET, **config_kw)
    with (
        relay.receiver(config) as rx,
        relay.sender(rx.endpoint, config) as peer_a,
        relay.sender(rx.endpoint, config) as peer_b,
    ):
        assert peer_a.wait_ready(5.0) and peer_b.wait_ready(5.0)
        if stall == "mid-transfer":  # 2 layers through a budget the consumer never frees
            hog = peer_a.open_transfer("t-hog", "req-a", deadline_s=1.0)
            _send(hog, 2)
        elif stall == "endless-deadline":
            hog = peer_a.open_transfer("t-hog", "req-a", deadline_s=1e6)
            _send(hog, 2)
        else:  # complete, never claimed
            hog = peer_a.open_transfer("t-hog", "req-a", deadline_s=30.0)
            _send(hog, 1)
            hog.wait(timeout_s=5.0)
            assert rx.status("t-hog") is InboundStatus.COMPLETE
        deadline = time.monotonic() + 5.0
        while rx.stats().buffered_bytes < 48 << 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        if stall == "endless-deadline":  # B's own deadline is capped too: let A age first
            time.sleep(0.5)
        start = time.monotonic()
        other = peer_b.open_transfer("t-other", "req-b", deadline_s=20.0)
        _send(other, 1)
        other.wait(timeout_s=20.0)  # raises if B never got through
        took = time.monotonic() - start
        (item,) = rx.wait_layer("t-other", 0, timeout_s=1.0)
        assert bytes(item.buffer) == LAYER.numpy().tobytes()
        rx.release("t-other")
        if stall == "never-claimed":
            assert rx.stats().transfers_unclaimed_dropped == 1
            with pytest.raises(TransportError, match="unclaimed"):
                rx.wait_transfer("t-hog", 1.0)
        elif stall == "endless-deadline":  # the receiver's cap ended it, and told the peer
            with pytest.raises(TransportError, match="expired on the receiver"):
                hog.wait(timeout_s=5.0)
            with pytest.raises(TransferTimeout, match="expired on the receiver"):
                rx.wait_transfer("t-hog", 1.0)
        else:  # its own deadline ended it (an honest sender cancels; else the receiver expires it)
            with pytest.raises(TransportError, match="deadline"):
                hog.wait(timeout_s=5.0)
            with pytest.raises(TransportError, match=r"cancelled|expired"):
                rx.wait_transfer("t-hog", 1.0)
        assert rx.stats().buffered_bytes == 0
        return took


def test_peer_stalled_mid_transfer_blocks_others_only_until_its_deadline(relay: Relay) -> None:
    took = _other_completes_after(relay, {}, "mid-transfer")
    assert 0.3 < took < 1.0 + 0.2 + 2.0  # waited for the hog's deadline (+grace), no longer


def test_endless_deadline_is_capped_by_the_receiver(relay: Relay) -> None:
    took = _other_completes_after(relay, {"max_deadline_s": 1.0}, "endless-deadline")
    assert 0.3 < took < 1.0 + 0.2 + 2.0


def test_complete_transfer_nobody_claims_gives_its_credit_back(relay: Relay) -> None:
    took = _other_completes_after(relay, {"unclaimed_hold_s": 1.0}, "never-claimed")
    assert 0.3 < took < 1.0 + 2.0


def test_claimed_complete_transfer_is_kept_past_the_hold(relay: Relay) -> None:
    config = make_config(**BUDGET, unclaimed_hold_s=0.3)
    with relay.receiver(config) as rx, relay.sender(rx.endpoint, config) as tx:
        handle = tx.open_transfer("t-claimed", "req-c", deadline_s=10.0)
        _send(handle, 1)
        handle.wait(timeout_s=5.0)
        rx.wait_layer("t-claimed", 0, timeout_s=1.0)  # a consumer is reading it
        time.sleep(0.8)
        assert rx.status("t-claimed") is InboundStatus.COMPLETE
        assert rx.stats().transfers_unclaimed_dropped == 0
        rx.release("t-claimed")


def test_bounds_are_validated() -> None:
    from trtllm_prfaas.errors import ConfigError

    for name in ("max_deadline_s", "unclaimed_hold_s"):
        with pytest.raises(ConfigError, match=name):
            make_config(**{name: 0.0})

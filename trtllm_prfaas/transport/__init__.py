"""KV relay transport: versioned wire format, multi-stream ZeroMQ sender/receiver, stats.

Sender side (prefill worker)::

    with RelaySender(receiver_endpoint, config) as sender:
        handle = sender.open_transfer(transfer_id, request_id, deadline_s=10.0)
        handle.send(Kind.FULL_BLOCK, layer, (0, num_blocks), layer_kv_tensor)  # non-blocking
        handle.finish()
        handle.wait(timeout_s=10.0)  # raises TransportError / TransferTimeout on failure

Receiver side (decode worker)::

    with RelayReceiver(config, "tcp://127.0.0.1:0") as receiver:
        items = receiver.wait_layer(transfer_id, layer, timeout_s=5.0)  # per-layer signal
        ...  # load items[i].buffer (a memoryview; .chunks: the pieces, no copy) into the pool
        receiver.release_layer(transfer_id, layer)  # buffers back, credit back to the sender
        receiver.release(transfer_id)  # when the whole transfer is consumed
"""

from __future__ import annotations

from trtllm_prfaas.transport.buffers import BufferAllocator, HeapAllocator, ItemKey, as_byte_view
from trtllm_prfaas.transport.config import CurveKeys, RelayConfig, RelaySecurity
from trtllm_prfaas.transport.handle import TransferHandle, TransferStatus
from trtllm_prfaas.transport.reassembly import CorruptChunk, InboundStatus, ReceivedItem
from trtllm_prfaas.transport.receiver import RelayReceiver
from trtllm_prfaas.transport.security import generate_keypair
from trtllm_prfaas.transport.sender import RelaySender
from trtllm_prfaas.transport.stats import LinkStats, ReceiverStats, StreamStats, TcpInfo
from trtllm_prfaas.transport.wire import Control, Header, Kind

__all__ = [
    "BufferAllocator",
    "Control",
    "CorruptChunk",
    "CurveKeys",
    "Header",
    "HeapAllocator",
    "InboundStatus",
    "ItemKey",
    "Kind",
    "LinkStats",
    "ReceivedItem",
    "ReceiverStats",
    "RelayConfig",
    "RelayReceiver",
    "RelaySecurity",
    "RelaySender",
    "StreamStats",
    "TcpInfo",
    "TransferHandle",
    "TransferStatus",
    "as_byte_view",
    "generate_keypair",
]

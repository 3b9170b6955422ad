"""The connector's device layer (connector/device.py) over the strict shim, and the shim itself:
device memory is never host memory, staged bytes exist only once their event completed, and a
load is complete only once its copy ran."""

from __future__ import annotations

import numpy
import pytest
import torch

from tests.connector.strict_device import POISON_BYTE, HostAccess, StrictDevice
from trtllm_prfaas.connector.device import DeviceBackend, backend_for, block_runs

SHAPE = (8, 2, 2, 4)  # (blocks, layers, kv_factor, row)


def _pool(device: StrictDevice) -> tuple[object, torch.Tensor]:
    pool = device.make_pool(SHAPE, torch.float32)
    truth = torch.arange(numpy.prod(SHAPE), dtype=torch.float32).view(SHAPE)
    pool._data.copy_(truth)  # type: ignore[attr-defined]
    return pool, truth


def test_block_runs_cover_ids_in_order() -> None:
    assert list(block_runs([3, 4, 5, 9, 0, 1])) == [(0, 3, 6), (3, 9, 10), (4, 0, 2)]
    assert list(block_runs([])) == []


@pytest.mark.parametrize(
    "touch",
    [
        lambda p: p.numpy(),
        lambda p: p.cpu(),
        lambda p: p.data_ptr(),
        lambda p: p.tolist(),
        lambda p: numpy.asarray(p),
        lambda p: torch.frombuffer(p, dtype=torch.uint8),
        lambda p: memoryview(p),
        lambda p: p[torch.tensor([0, 1]), 0],
        lambda p: p[0],
        lambda p: torch.sum(p),
        lambda p: torch.zeros(2, 2, 4).copy_(p[0:2, 0]),  # blocking copy
        lambda p: list(p),
    ],
)
def test_the_strict_pool_cannot_be_read_as_host_memory(touch) -> None:
    pool, _ = _pool(StrictDevice())
    with pytest.raises((HostAccess, TypeError, ValueError)):
        touch(pool)


def test_backend_for_picks_the_shim_namespace_and_host_for_cpu() -> None:
    device = StrictDevice()
    pool, _ = _pool(device)
    backend = backend_for(pool)
    assert backend.is_async and backend.cuda is device.cuda
    assert not backend_for(torch.zeros(SHAPE)).is_async


def test_staged_bytes_are_poison_until_their_event_completed() -> None:
    device = StrictDevice()
    pool, truth = _pool(device)
    stream = device.make_stream()
    staged = backend_for(pool).stage_blocks(pool, 1, [2, 3, 6], stream)
    assert (staged.host.view(torch.uint8) == POISON_BYTE).all()  # nothing ran yet
    assert staged.event.query() is False  # the first poll: the GPU is not there yet
    assert staged.event.query() is True
    assert torch.equal(staged.host, truth[[2, 3, 6], 1])


def test_a_load_is_pending_until_its_event_and_reads_its_staging_when_it_runs() -> None:
    device = StrictDevice()
    pool, truth = _pool(device)
    stream = device.make_stream()
    rows = torch.full((2, 2, 4), -1.0)
    landing = backend_for(pool).write_blocks(pool, 0, [5, 1], rows, stream)
    rows.fill_(99.0)  # the caller may reuse its buffer at once: the backend staged it
    with pytest.raises(HostAccess, match="still pending"):
        device.read_block(pool, 5, 0)
    assert torch.equal(device.read_block(pool, 5, 1), truth[5, 1])  # other layers untouched
    landing.event.synchronize()
    assert (device.read_block(pool, 5, 0) == -1).all() and (
        device.read_block(pool, 1, 0) == -1
    ).all()
    landing.keep[0].fill_(3.0)  # reusing the staging after completion changes nothing
    assert (device.read_block(pool, 1, 0) == -1).all()


def test_a_kernel_on_the_stream_runs_after_the_copies_before_it() -> None:
    device = StrictDevice()
    pool, _ = _pool(device)
    stream = device.make_stream()
    backend_for(pool).write_blocks(pool, 0, [4], torch.zeros(1, 2, 4), stream)
    device.write_token_rows(pool, 4, 0, 0, torch.ones(2, 1, 4), stream)  # flushes the copy first
    block = device.read_block(pool, 4, 0)
    assert (block[:, :4] == 1).all() and (block[:, 4:] == 0).all()


def test_copies_must_be_async_pinned_and_on_a_stream() -> None:
    device = StrictDevice()
    pool, _ = _pool(device)
    pageable = DeviceBackend(device.cuda, lambda shape, dtype: torch.empty(shape, dtype=dtype))
    with pytest.raises(HostAccess, match="pageable"):
        pageable.stage_blocks(pool, 0, [0], device.make_stream())
    with pytest.raises(HostAccess, match=r"outside cuda\.stream"):
        device.empty_pinned((1, 2, 4), torch.float32).copy_(pool[0:1, 0], non_blocking=True)
    with device.cuda.stream(device.make_stream()), pytest.raises(HostAccess, match="non_blocking"):
        device.empty_pinned((1, 2, 4), torch.float32).copy_(pool[0:1, 0])

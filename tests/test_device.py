"""The device layer's CPU path: loads on the loader thread land in order, errors surface, small
loads skip the thread when it is idle, and a load needed at once never queues behind others.
(The CUDA path is in test_gpu.py.)"""

from __future__ import annotations

import threading
from unittest import mock

import pytest
import torch

import offload.device as device_layer
from offload.device import Transfers


def test_cpu_loads_run_in_order_on_the_loader_thread():
    transfers = Transfers(torch.device("cpu"))
    slot = torch.zeros(4 << 20, dtype=torch.uint8)  # above ASYNC_MIN_BYTES: goes to the thread
    first, second = torch.full_like(slot, 1), torch.full_like(slot, 2)
    gate = threading.Event()
    where: list[str] = []
    blocker = transfers.fill(lambda: (gate.wait(5), where.append(threading.current_thread().name)), 1 << 30)
    a = transfers.copy(slot, first)
    b = transfers.copy(slot, second)  # the same slot again: must land after the first
    assert not transfers.done(blocker) and not transfers.done(a) and not transfers.done(b)
    gate.set()
    transfers.wait(b)
    assert transfers.done(a) and transfers.done(b)
    assert torch.equal(slot, second)
    assert where and where[0].startswith("offload-loader")
    transfers.close()


def test_a_small_prefetch_runs_inline_only_when_the_loader_is_idle():
    transfers = Transfers(torch.device("cpu"))
    slot, record = torch.zeros(1024, dtype=torch.uint8), torch.arange(1024, dtype=torch.int64).to(torch.uint8)
    assert transfers.copy(slot, record) is None  # small, loader idle: done here, no handle
    assert torch.equal(slot, record)
    gate = threading.Event()
    transfers.fill(lambda: gate.wait(5), 1 << 30)  # a big load keeps the loader busy
    handle = transfers.copy(slot, torch.zeros_like(slot))  # queued behind it, in order
    assert handle is not None and not transfers.done(handle)
    gate.set()
    transfers.wait(handle)
    assert int(slot.sum()) == 0
    transfers.close()


def test_a_failed_load_raises_where_it_is_waited_for():
    transfers = Transfers(torch.device("cpu"))

    def broken():
        raise OSError("short read")

    with mock.patch.object(device_layer, "ASYNC_MIN_BYTES", 0):
        handle = transfers.fill(broken, 1 << 20)
    with pytest.raises(OSError, match="short read"):
        transfers.wait(handle)
    with pytest.raises(OSError, match="short read"):
        transfers.fill(broken, 10, needed_now=True)  # inline: raised at once
    transfers.close()


def test_cpu_copies_refuse_mismatched_buffers():
    transfers = Transfers(torch.device("cpu"))
    with pytest.raises(ValueError, match="same size"):
        transfers.copy(torch.zeros(8, dtype=torch.uint8), torch.zeros(9, dtype=torch.uint8))


def test_a_load_needed_now_overtakes_queued_prefetches_but_not_its_own_slot():
    """A demand load runs on the caller's thread at once, beside a busy loader; a queued load
    into the same buffer is cancelled first, so it cannot land afterwards."""
    transfers = Transfers(torch.device("cpu"))
    gate = threading.Event()
    transfers.fill(lambda: gate.wait(5), 1 << 30)  # keeps the loader busy
    slot = torch.zeros(1 << 20, dtype=torch.uint8)
    other = torch.zeros_like(slot)
    stale = transfers.copy(slot, torch.full_like(slot, 1))  # queued behind the busy load
    queued_elsewhere = transfers.copy(other, torch.full_like(slot, 3))
    assert transfers.copy(slot, torch.full_like(slot, 2), needed_now=True, previous=stale) is None
    assert stale.cancelled() and int(slot.max()) == 2 and int(slot.min()) == 2  # done here, at once
    gate.set()
    transfers.wait(queued_elsewhere)
    assert int(other.min()) == 3 and int(slot.max()) == 2  # the cancelled copy never landed
    transfers.close()

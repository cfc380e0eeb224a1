"""Shared-memory slots for the batches a DataLoader worker sends (:class:`~data.collate.WireBatch`).

Through the DataLoader's pipe, a batch of ~0.6 MB costs the receiving process ~0.7-1.5 ms of CPU (the pipe holds
64 KB, so the bytes cross it in many reads and context switches, then are copied again while unpickling), most of
what limits two workers on two cores (BENCHMARKS 3b'). Here a worker instead copies its batch into one of
``SLOTS`` slots of a shared-memory buffer of its own (a torch tensor moved to shared memory, sent to the receiving
process once, by torch's usual descriptor passing) and sends only the slot's place and the arrays' layout. The
receiving process widens the arrays straight out of the slot into new tensors (nothing it returns shares the
slot) and then counts the slot as read, in a counter at the buffer's start that only it writes.

A worker reuses a slot only once the receiver has counted every batch sent from it and the next ``MARGIN``
ones: a DataLoader keeps ``prefetch_factor`` (2) batches per worker in flight, well below ``SLOTS``. A worker that
would wait longer than ``WAIT_S`` for a free slot (a consumer that stopped reading), a batch larger than the
buffer's slots, or a buffer that cannot be made (no shared memory), sends that batch in-band as before: this is a
faster path, never a different result. ``KD_PIPELINE_WIRE=inband`` turns it off.

The receiver keeps one buffer per worker process id; a buffer whose worker has exited is dropped when a new
buffer arrives. The counter is one 8-byte word written by the receiver after its copies are done and read by the
worker before it writes a slot; the margin of a whole batch between them keeps any reordering of those memory
accesses far from mattering.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .shard import NDArray

if TYPE_CHECKING:
    import torch

__all__ = ["MARGIN", "SLOTS", "WAIT_S", "reduce_to_slot"]

SLOTS = 6  # slots per worker
MARGIN = 1  # slots kept free beyond the ones in flight
WAIT_S = 2.0  # longest wait for a free slot before a batch goes in-band
_HEADER = 64  # the counter, then padding: slots start 64-byte aligned
_GROW = 1.25  # a slot is this much larger than the batch that made its buffer (batches vary in width)

Layout = list[tuple[str, str, tuple[int, ...], int]]


class _Buffer:
    """A worker's slots."""

    _serials = itertools.count()

    def __init__(self, slot_bytes: int) -> None:
        import torch

        self.serial = next(self._serials)
        self.slot_bytes = -(-slot_bytes // _HEADER) * _HEADER
        self.tensor = torch.zeros(_HEADER + SLOTS * self.slot_bytes, dtype=torch.uint8).share_memory_()  # type: ignore[no-untyped-call]
        self.bytes: NDArray = self.tensor.numpy()
        self.read: NDArray = self.bytes[:8].view(np.uint64)  # batches the receiver has read (it alone writes)
        self.sent = 0
        self.shared = False  # the tensor itself has gone to the receiver


_mine: _Buffer | None = None  # this worker's buffer
_disabled = False  # a buffer could not be made here: in-band from now on
_theirs: dict[int, tuple[int, torch.Tensor]] = {}  # receiver: worker pid -> (serial, buffer)


def reduce_to_slot(arrays: dict[str, NDArray], layout: Layout, total: int) -> tuple[Any, tuple[Any, ...]] | None:
    """In a DataLoader worker: copy ``arrays`` (placed at ``layout``'s offsets, ``total`` bytes) into a free slot
    and return the ``__reduce__`` value that rebuilds the widened batch from it; None to send it in-band."""
    global _mine, _disabled
    from torch.utils.data import get_worker_info

    if _disabled or get_worker_info() is None or os.environ.get("KD_PIPELINE_WIRE") == "inband":
        return None
    buf = _mine
    if buf is None or total > buf.slot_bytes:
        try:
            buf = _mine = _Buffer(int(total * _GROW))
        except (RuntimeError, OSError):  # no shared memory here
            _disabled = True
            return None
    deadline = 0.0
    while buf.sent - int(buf.read[0]) >= SLOTS - MARGIN:
        now = time.monotonic()
        deadline = deadline or now + WAIT_S
        if now > deadline:
            return None
        time.sleep(0.0002)
    base = _HEADER + (buf.sent % SLOTS) * buf.slot_bytes
    layout = [(name, np.dtype(dtype).newbyteorder("=").str, shape, start) for name, dtype, shape, start in layout]
    for (_, dtype, shape, start), arr in zip(layout, arrays.values(), strict=True):
        buf.bytes[base + start : base + start + arr.nbytes].view(dtype).reshape(shape)[...] = arr
    buf.sent += 1
    tensor = None if buf.shared else buf.tensor
    buf.shared = True
    return _from_slot, (os.getpid(), buf.serial, tensor, base, layout)


def _from_slot(pid: int, serial: int, tensor: torch.Tensor | None, base: int, layout: Layout) -> dict[str, Any]:
    """Receiver: the batch in worker ``pid``'s slot at ``base``, widened into new tensors; the slot counted read."""
    from .collate import WIDE_DTYPES

    if tensor is not None:
        for old in [p for p in _theirs if p != pid and not _alive(p)]:
            del _theirs[old]
        _theirs[pid] = (serial, tensor)
    if pid not in _theirs or _theirs[pid][0] != serial:
        raise RuntimeError(f"a batch of DataLoader worker {pid} names a shared buffer this process never received")
    import torch

    data: NDArray = _theirs[pid][1].numpy()
    out: dict[str, Any] = {}
    for name, dtype, shape, start in layout:
        t = torch.from_numpy(np.frombuffer(data, dtype, math.prod(shape), base + start).reshape(shape))
        out[name] = t.to(WIDE_DTYPES.get(name, t.dtype), copy=True)  # always a copy: the slot is reused
    data[:8].view(np.uint64)[0] += 1
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

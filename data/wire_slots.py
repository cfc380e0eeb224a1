"""Shared-memory slots for the batches a DataLoader worker sends (:class:`~data.collate.WireBatch`).

Through the DataLoader's pipe, a batch of ~0.6 MB costs the receiving process ~0.7-1.5 ms of CPU (the pipe holds
64 KB, so the bytes cross it in many reads and context switches, then are copied again while unpickling), most of
what limits two workers on two cores (BENCHMARKS 3b'). Here a worker's result queue (multiprocessing's
ForkingPickler, for which ``data.collate`` registers this path; plain ``pickle`` and ``copy`` never take it)
instead copies the batch into one of ``SLOTS`` slots of a shared-memory buffer of the worker's own (a torch
tensor moved to shared memory, sent by torch's usual descriptor passing with each batch until the receiver has
acknowledged it) and sends only the buffer's token, the slot's place and the arrays' layout. The receiver widens
the arrays straight out of the slot into new tensors (nothing it returns shares the slot) and then counts the
slot as read, in a counter in the buffer's header that only it writes.

A worker reuses a slot only once the receiver has counted every batch sent from it and the next ``MARGIN``
ones. A DataLoader keeps ``prefetch_factor`` batches per worker in flight (2 by default; more for the workers
still running when others have finished an IterableDataset); a worker that finds no free slot waits, sleeping
ever longer (up to ``WAIT_S`` in all), then sends that batch in-band. So do a batch larger than the buffer's
slots once a bigger buffer cannot be had, every batch while shared memory is short (a buffer is made only when
``/dev/shm`` has ``FREE_SHARE`` times its size free; failures are retried after ``RETRY_AFTER`` batches), and
every batch with ``KD_PIPELINE_WIRE=inband``. Nothing raised here leaves the function: an exception while a
queue's feeder thread pickles would drop the batch and leave the DataLoader waiting for it forever.

The receiver keeps one buffer per worker process id, checks every message's random token against it (a batch
naming a buffer it does not hold is an error, never a misread), and drops the buffers of exited workers whenever
a new buffer arrives and at most once a second otherwise. The read counter is one 8-byte word written by the
receiver after its copies and read by the worker before it writes a slot; the margin of a whole batch between
them keeps any reordering of those memory accesses far from mattering.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .shard import NDArray

if TYPE_CHECKING:
    import torch

__all__ = ["MARGIN", "SLOTS", "WAIT_S", "reduce_to_slot"]

SLOTS = 6  # slots per worker
MARGIN = 1  # slots kept free beyond the ones in flight
WAIT_S = 2.0  # longest wait for a free slot before a batch goes in-band
FREE_SHARE = 4  # make a buffer only where /dev/shm has this many times its size free
RETRY_AFTER = 256  # batches sent in-band after a buffer could not be made, before trying again
_HEADER = 64  # read counter (uint64), acknowledged flag (uint64), token (16 bytes); slots start 64-byte aligned
_GROW = 1.25  # a slot is this much larger than the batch that made its buffer (batches vary in width)

Layout = list[tuple[str, str, tuple[int, ...], int]]


class _Buffer:
    """A worker's slots."""

    def __init__(self, slot_bytes: int) -> None:
        import torch

        self.token = os.urandom(16)
        self.slot_bytes = -(-slot_bytes // _HEADER) * _HEADER
        size = _HEADER + SLOTS * self.slot_bytes
        if Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free < FREE_SHARE * size:
            raise OSError(f"/dev/shm has less than {FREE_SHARE} x {size} bytes free")
        # torch 2.13 reserves the pages (posix_fallocate): a full /dev/shm is an error here, not a later SIGBUS;
        # older releases may not, hence the free-space margin above
        self.tensor = torch.zeros(size, dtype=torch.uint8).share_memory_()  # type: ignore[no-untyped-call]
        self.bytes: NDArray = self.tensor.numpy()
        self.bytes[16:32] = np.frombuffer(self.token, np.uint8)
        self.sent = 0

    def read(self) -> int:
        return int(self.bytes[:8].view(np.uint64)[0])

    def acknowledged(self) -> bool:
        return bool(self.bytes[8:16].view(np.uint64)[0])


_mine: _Buffer | None = None  # this worker's buffer
_skip = 0  # batches to send in-band before trying to make a buffer again
_theirs: dict[int, tuple[bytes, torch.Tensor]] = {}  # receiver: worker pid -> (token, buffer)
_lock = threading.Lock()  # two pin-memory threads (two loaders) may receive at once
_next_prune = 0.0


def reduce_to_slot(arrays: dict[str, NDArray], layout: Layout, total: int) -> tuple[Any, tuple[Any, ...]] | None:
    """In a DataLoader worker: copy ``arrays`` (placed at ``layout``'s offsets, ``total`` bytes) into a free slot
    and return the ``__reduce__`` value that rebuilds the widened batch from it; None to send it in-band."""
    try:
        return _to_slot(arrays, layout, total)
    except Exception:  # never drop a batch: in-band instead
        return None


def _to_slot(arrays: dict[str, NDArray], layout: Layout, total: int) -> tuple[Any, tuple[Any, ...]] | None:
    global _mine, _skip
    from torch.utils.data import get_worker_info

    if get_worker_info() is None or os.environ.get("KD_PIPELINE_WIRE") == "inband":
        return None
    buf = _mine
    if buf is None or total > buf.slot_bytes:
        if _skip > 0:
            _skip -= 1
            return None
        try:
            buf = _mine = _Buffer(int(total * _GROW))
        except (RuntimeError, OSError):  # shared memory short: in-band for a while
            _skip = RETRY_AFTER
            return None
    waited, pause = 0.0, 0.0002
    while buf.sent - buf.read() >= SLOTS - MARGIN:
        if waited >= WAIT_S:
            return None
        time.sleep(pause)
        waited += pause
        pause = min(2 * pause, 0.01)
    base = _HEADER + (buf.sent % SLOTS) * buf.slot_bytes
    layout = [(name, np.dtype(dtype).newbyteorder("=").str, shape, start) for name, dtype, shape, start in layout]
    for (_, dtype, shape, start), arr in zip(layout, arrays.values(), strict=True):
        buf.bytes[base + start : base + start + arr.nbytes].view(dtype).reshape(shape)[...] = arr
    buf.sent += 1
    tensor = None if buf.acknowledged() else buf.tensor  # sent until the receiver says it holds it
    return _from_slot, (os.getpid(), buf.token, tensor, base, layout)


def _from_slot(pid: int, token: bytes, tensor: torch.Tensor | None, base: int, layout: Layout) -> dict[str, Any]:
    """Receiver: the batch in worker ``pid``'s slot at ``base``, widened into new tensors; the slot counted read."""
    global _next_prune
    import torch

    from .collate import WIDE_DTYPES

    with _lock:
        now = time.monotonic()
        if tensor is not None or now > _next_prune:
            for old in [p for p in _theirs if p != pid and not _alive(p)]:
                _theirs.pop(old, None)
            _next_prune = now + 1.0
        if tensor is not None and bytes(tensor.numpy()[16:32]) == token:
            _theirs[pid] = (token, tensor)
            tensor.numpy()[8:16].view(np.uint64)[0] = 1  # acknowledged: the worker stops sending it
        held = _theirs.get(pid)
    if held is None or held[0] != token:
        raise RuntimeError(f"a batch of DataLoader worker {pid} names a shared buffer this process does not hold")
    data: NDArray = held[1].numpy()
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

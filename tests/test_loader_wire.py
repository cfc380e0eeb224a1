"""Batches that leave DataLoader workers narrow (``WireBatch``) and are widened where they are read.

Each batch read through worker processes is checked against the examples the test wrote (the store's raw arrays,
independent of the loader), against the dtypes of ``data.collate``'s contract, and against the same dataset
iterated in the main process (no pickling at all); and the pickled batch is checked to carry the stored dtypes.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kd_pipeline.data.collate import IGNORE_INDEX, WIDE_DTYPES, WireBatch, collate, collate_arrays
from kd_pipeline.data.dataset import StoreDataset
from kd_pipeline.data.reader import open_store
from tests.conftest import write_store
from tests.test_dataset import DTYPES

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

PUBLIC = DTYPES  # the dtypes every consumer has always received (tests/test_dataset.py)


def through_workers(path: Path, workers: int = 2, **kw: Any) -> list[dict[str, torch.Tensor]]:
    ds = StoreDataset(path, num_workers=workers, **kw)
    return list(DataLoader(ds, batch_size=None, num_workers=workers))


def in_main(path: Path, workers: int = 2, **kw: Any) -> list[dict[str, torch.Tensor]]:
    return list(StoreDataset(path, num_workers=workers, **kw))


def assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype, k
            assert torch.equal(x[k], y[k]), k


def test_causal_lm_batches_from_workers_hold_the_stored_values(tmp_path: Path) -> None:
    written = write_store(tmp_path / "s", "zarr", "causal-lm", shards=4, rows=5)
    batches = through_workers(tmp_path / "s", batch_size=3, block_shards=1, seed=3)
    assert_same(batches, in_main(tmp_path / "s", batch_size=3, block_shards=1, seed=3))
    seen = []
    for batch in batches:
        assert {k: v.dtype for k, v in batch.items()} == PUBLIC
        L = batch["input_ids"].shape[1]
        for b, idx in enumerate(batch["index"].tolist()):
            if batch["example_weight"][b] == 0:
                continue
            seen.append(idx)
            ex, n = written[idx], len(written[idx]["input_ids"])
            # float64 comparisons with the written arrays: widening must be exact
            np.testing.assert_array_equal(batch["input_ids"][b, :n].numpy(), ex["input_ids"].astype(np.int64))
            assert batch["input_ids"][b, n:].eq(0).all()
            assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (L - n)
            np.testing.assert_array_equal(batch["target_ids"][b, : n - 1].numpy(), ex["target_ids"].astype(np.int64))
            np.testing.assert_array_equal(
                batch["target_logprobs"][b, : n - 1].double().numpy(),
                ex["target_logprobs"].astype(np.float16).astype(np.float64),
            )
            np.testing.assert_array_equal(batch["tail_mass"][b, : n - 1].numpy(), ex["tail_mass"].astype(np.float32))
            assert batch["labels"][b, : n - 1].tolist() == ex["input_ids"][1:].tolist()
            assert batch["labels"][b, n - 1 :].eq(IGNORE_INDEX).all()
    assert sorted(seen) == list(range(len(written)))


@pytest.mark.parametrize("task", ["masked-lm", "seq-cls"])
def test_other_tasks_from_workers_equal_the_main_process(tmp_path: Path, task: str) -> None:
    written = write_store(tmp_path / "s", "arrow", task, shards=4, rows=4)
    batches = through_workers(tmp_path / "s", batch_size=3, block_shards=1)
    assert_same(batches, in_main(tmp_path / "s", batch_size=3, block_shards=1))
    extra = {"positions": torch.int64} if task == "masked-lm" else {}
    for batch in batches:
        assert {k: v.dtype for k, v in batch.items()} == PUBLIC | extra
        for b, idx in enumerate(batch["index"].tolist()):
            ids = written[idx]["target_ids"]
            got = batch["target_ids"][b] if task == "seq-cls" else batch["target_ids"][b, : len(ids)]
            np.testing.assert_array_equal(got.numpy(), (ids[0] if task == "seq-cls" else ids).astype(np.int64))


def test_a_pickled_batch_carries_the_stored_dtypes(tmp_path: Path) -> None:
    write_store(tmp_path / "s", "zarr", "causal-lm", shards=1, rows=6)
    store = open_store(tmp_path / "s")
    examples = [store[i] for i in range(6)]
    arrays = collate_arrays(examples, "causal-lm")
    assert arrays["target_ids"].dtype == np.uint16 and arrays["target_logprobs"].dtype == np.float16
    assert arrays["input_ids"].dtype == np.uint16 and arrays["attention_mask"].dtype == np.bool_
    narrow = sum(a.nbytes for a in arrays.values())
    wide = sum(t.numel() * t.element_size() for t in collate(examples, "causal-lm").values())
    payload = pickle.dumps(WireBatch(arrays))
    # the narrow arrays plus alignment and the layout; a widened batch would be ~2.5x that
    assert len(payload) < narrow + 1024 < wide
    received = pickle.loads(payload)
    assert isinstance(received, dict) and set(WIDE_DTYPES) <= received.keys()
    for name, tensor in collate(examples, "causal-lm").items():
        assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name
        assert received[name].is_contiguous()


# --- shared-memory slots (data/wire_slots.py) --------------------------------------------------------------------


@pytest.fixture
def slots(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``data.wire_slots`` with fresh state on both sides, restored afterwards."""
    from kd_pipeline.data import wire_slots

    monkeypatch.setattr(wire_slots, "_mine", None)
    monkeypatch.setattr(wire_slots, "_skip", 0)
    monkeypatch.setattr(wire_slots, "_theirs", {})
    return wire_slots


def test_worker_batches_go_through_shared_slots_and_equal_the_main_process(
    tmp_path: Path, slots: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 batches over 2 workers wrap each worker's ring of slots several times; every batch, kept until the end,
    equals the main process's (a slot reused under a batch still held would change it). The receiver holds one
    buffer per worker; with KD_PIPELINE_WIRE=inband none, and the same batches."""
    write_store(tmp_path / "s", "zarr", "causal-lm", shards=8, rows=5)
    expected = in_main(tmp_path / "s", batch_size=1, block_shards=1, seed=5)
    assert len(expected) >= 4 * slots.SLOTS
    assert_same(through_workers(tmp_path / "s", batch_size=1, block_shards=1, seed=5), expected)
    assert len(slots._theirs) == 2  # one buffer from each worker
    slots._theirs.clear()
    monkeypatch.setenv("KD_PIPELINE_WIRE", "inband")
    assert_same(through_workers(tmp_path / "s", batch_size=1, block_shards=1, seed=5), expected)
    assert slots._theirs == {}


def _as_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process plays a DataLoader worker (it sends) and the receiver (it loads) at once."""
    import torch.utils.data

    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())


def _send(arrays: dict[str, np.ndarray]) -> bytes:
    from multiprocessing.reduction import ForkingPickler

    return bytes(ForkingPickler.dumps(WireBatch(arrays)))  # as a DataLoader worker's queue pickles


WIDTH = 100  # a batch of 3 rows is 3,312 bytes: more than a message that only names a slot (< 1,024)
SLOT_MESSAGE = 1024


def _arrays(value: int, rows: int = 3) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.full((rows, WIDTH), value, np.dtype(">u2")),  # non-native byte order is widened right
        "target_logprobs": np.full((rows, WIDTH, 2), -0.5 * value, np.float16),
        "attention_mask": np.ones((rows, WIDTH), np.bool_),
        "example_weight": np.full(rows, float(value), np.float32),  # a dtype the receiver does not widen
    }


def _check(batch: dict[str, torch.Tensor], value: int, rows: int = 3) -> None:
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].eq(value).all()
    assert batch["target_logprobs"].dtype == torch.float32 and batch["target_logprobs"].eq(-0.5 * value).all()
    assert batch["attention_mask"].dtype == torch.int64 and batch["attention_mask"].eq(1).all()
    assert batch["example_weight"].dtype == torch.float32 and batch["example_weight"].eq(float(value)).all()
    assert batch["input_ids"].shape == (rows, WIDTH)


def test_a_slot_is_reused_only_after_it_was_read_and_results_never_share_it(
    slots: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _as_worker(monkeypatch)
    monkeypatch.setattr(slots, "WAIT_S", 0.05)
    first = pickle.loads(_send(_arrays(1)))  # holds slot 0's values in its own tensors
    free = slots.SLOTS - slots.MARGIN
    pending = [_send(_arrays(v)) for v in range(2, 2 + free)]  # never read yet: every free slot taken
    assert all(len(p) < SLOT_MESSAGE for p in pending)  # each names its slot; no batch bytes in the message
    sent = slots._mine.sent
    late = _send(_arrays(99))  # no slot free within WAIT_S: the batch goes in-band, its bytes in the message
    assert len(late) > 3 * WIDTH * 2 * 2 and slots._mine.sent == sent
    for v, p in enumerate(pending, start=2):
        _check(pickle.loads(p), v)
    _check(pickle.loads(late), 99)
    again = _send(_arrays(7))  # slots free again: through a slot
    assert len(again) < SLOT_MESSAGE
    _check(pickle.loads(again), 7)
    _check(first, 1)  # slot 0 was written twice since: the first batch's tensors are its own


def test_a_waiting_worker_takes_the_slot_freed_while_it_waits(slots: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    _as_worker(monkeypatch)
    monkeypatch.setattr(slots, "WAIT_S", 30.0)
    pending = [_send(_arrays(v)) for v in range(slots.SLOTS - slots.MARGIN)]  # the ring is full
    received: list[dict[str, torch.Tensor]] = []
    reader = threading.Timer(0.3, lambda: received.append(pickle.loads(pending[0])))
    reader.start()
    t0 = time.monotonic()
    message = _send(_arrays(50))  # waits for the read above, then takes the slot it freed
    assert time.monotonic() - t0 < 5.0 and len(message) < SLOT_MESSAGE
    reader.join()
    _check(received[0], 0)
    for v, p in enumerate(pending[1:], start=1):
        _check(pickle.loads(p), v)
    _check(pickle.loads(message), 50)


def test_a_wider_batch_gets_a_new_buffer_and_a_buffer_not_held_is_an_error(
    slots: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _as_worker(monkeypatch)
    _check(pickle.loads(_send(_arrays(1))), 1)
    token = slots._mine.token
    wide = _send(_arrays(2, rows=4))  # one row more than the slots made for 3 rows hold: a new buffer
    assert slots._mine.token != token
    _check(pickle.loads(wide), 2, rows=4)
    _check(pickle.loads(_send(_arrays(3))), 3)  # smaller batches use the new buffer's slots
    assert slots._mine.acknowledged()  # the receiver holds the new buffer: it is no longer sent along
    assert len(_send(_arrays(3))) < SLOT_MESSAGE
    import os

    held = slots._theirs[os.getpid()]
    slots._theirs[os.getpid()] = (bytes(16), held[1])  # another buffer under this pid (a reused pid)
    with pytest.raises(RuntimeError, match="does not hold"):
        pickle.loads(_send(_arrays(4)))
    slots._theirs.clear()  # a receiver that never got the buffer: refused, not misread
    with pytest.raises(RuntimeError, match="does not hold"):
        pickle.loads(_send(_arrays(5)))


def test_pickle_and_copy_in_a_worker_stay_in_band(slots: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A custom collate_fn that copies or pickles the WireBatch gets the values, and no slot is involved."""
    import copy

    _as_worker(monkeypatch)
    payload = pickle.dumps(WireBatch(_arrays(5)))
    assert len(payload) > 3 * WIDTH * 2 * 2
    _check(pickle.loads(payload), 5)
    _check(copy.deepcopy(WireBatch(_arrays(6))), 6)
    assert slots._mine is None and slots._theirs == {}


def test_outside_a_worker_a_batch_is_pickled_in_band(slots: Any) -> None:
    from multiprocessing.reduction import ForkingPickler

    payload = ForkingPickler.dumps(WireBatch(_arrays(5)))
    assert len(payload) > 3 * WIDTH * 2 * 2 and slots._mine is None
    _check(pickle.loads(payload), 5)


def test_short_shared_memory_sends_in_band_and_tries_again_later(slots: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    _as_worker(monkeypatch)
    monkeypatch.setattr(slots, "RETRY_AFTER", 2)
    usage, real = namedtuple("usage", "total used free"), shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 20, 1 << 20, 100))  # /dev/shm nearly full
    for v in range(3):  # the first fails to make a buffer, the next two do not try
        message = _send(_arrays(v))
        assert len(message) > 3 * WIDTH * 2 * 2 and slots._mine is None
        _check(pickle.loads(message), v)
    monkeypatch.setattr(shutil, "disk_usage", real)  # room again
    message = _send(_arrays(9))
    assert len(message) < SLOT_MESSAGE + 1024 and slots._mine is not None  # the buffer itself goes along once
    _check(pickle.loads(message), 9)


def test_an_error_in_the_slot_path_sends_in_band(slots: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything raised while a queue's feeder thread pickles would drop the batch (and hang the DataLoader)."""
    _as_worker(monkeypatch)

    def broken(*args: Any) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(slots, "_to_slot", broken)
    message = _send(_arrays(4))
    assert len(message) > 3 * WIDTH * 2 * 2
    _check(pickle.loads(message), 4)


def test_the_buffers_of_exited_workers_are_dropped(slots: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    slots._theirs[dead] = (bytes(16), torch.zeros(64, dtype=torch.uint8))
    _as_worker(monkeypatch)
    _check(pickle.loads(_send(_arrays(1))), 1)  # a new buffer arrives: exited workers' buffers go
    assert list(slots._theirs) == [os.getpid()]

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

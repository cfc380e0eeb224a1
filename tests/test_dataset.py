"""The streaming loader's promises, on real stores: order, rank/worker split, resume, lockstep, collation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kd_pipeline.data.dataset import IGNORE_INDEX, EpochOrder, StoreDataset, collate
from kd_pipeline.data.reader import open_store
from tests.conftest import write_store

# DataLoader warns when num_workers exceeds the machine's cores; the tests use 2 workers for correctness, not
# speed, so that warning is expected on a 1-core CI runner.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

SHARDS, ROWS = 7, 5  # 35 examples: no batch size used below divides it, so every run ends on a partial batch
N = SHARDS * ROWS


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dataset") / "store"
    write_store(path, "zarr", "causal-lm", shards=SHARDS, rows=ROWS)
    return path


def rank_batches(
    path: Path, *, world: int = 1, rank: int = 0, workers: int = 0, **kw: Any
) -> list[dict[str, torch.Tensor]]:
    """Every batch one rank yields in an epoch, through a DataLoader when ``workers`` > 0."""
    ds = StoreDataset(path, rank=rank, world_size=world, **kw)
    if workers == 0:
        return list(ds)
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    assert len(loader) == len(ds)
    return list(loader)


def global_order(
    path: Path, *, world: int, workers: int = 0, batch_size: int = 4, samples_seen: int = 0, **kw: Any
) -> np.ndarray:
    """Interleave the ranks' batches back into global positions (rank r, batch b, item t is position
    samples_seen + b*G + r + world*t); checks lockstep and that no position is served twice."""
    G = batch_size * world
    per_rank = [
        rank_batches(path, world=world, rank=r, workers=workers, batch_size=batch_size, samples_seen=samples_seen, **kw)
        for r in range(world)
    ]
    # lockstep: every rank yields one batch per global batch, the last one partial
    assert [len(b) for b in per_rank] == [-(-(N - samples_seen) // G)] * world, "ranks must yield the same batches"
    order = np.full(N - samples_seen, -1, dtype=np.int64)
    for r, batches in enumerate(per_rank):
        for b, batch in enumerate(batches):
            real = batch["example_weight"].numpy() > 0
            assert batch["example_weight"].dtype == torch.float32 and set(batch["example_weight"].tolist()) <= {0, 1}
            pos = b * G + r + world * np.arange(int(real.sum()))
            assert (order[pos] == -1).all(), "a position was served twice"
            order[pos] = batch["index"].numpy()[real]
    return order


def reference_order(path: Path, **kw: Any) -> np.ndarray:
    return np.concatenate([b["index"].numpy() for b in rank_batches(path, batch_size=N, **kw)])


# ---------------------------------------------------------------- order


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_order_independent_of_ranks_and_workers(store: Path, world: int, workers: int) -> None:
    ref = reference_order(store, block_shards=2)
    assert sorted(ref.tolist()) == list(range(N)) and (ref != np.arange(N)).any()
    got = global_order(store, world=world, workers=workers, block_shards=2)
    np.testing.assert_array_equal(got, ref)  # also: every index exactly once


def test_order_independent_of_batch_size(store: Path) -> None:
    orders = [np.concatenate([b["index"].numpy() for b in rank_batches(store, batch_size=bs)]) for bs in (1, 3, 8)]
    for o in orders[1:]:
        np.testing.assert_array_equal(o, orders[0])


def test_order_depends_on_seed_and_epoch_only(store: Path) -> None:
    base = reference_order(store, seed=1, epoch=0)
    np.testing.assert_array_equal(reference_order(store, seed=1, epoch=0), base)
    assert (reference_order(store, seed=1, epoch=1) != base).any()
    assert (reference_order(store, seed=2, epoch=0) != base).any()
    np.testing.assert_array_equal(reference_order(store, shuffle=False), np.arange(N))
    ds = StoreDataset(store, batch_size=N, seed=1)
    ds.set_epoch(1)
    np.testing.assert_array_equal(next(iter(ds))["index"].numpy(), reference_order(store, seed=1, epoch=1))


def test_shuffle_breaks_shard_locality_within_blocks(tmp_path: Path) -> None:
    write_store(tmp_path / "s", shards=8, rows=10)
    shard_of = np.arange(80) // 10
    for block_shards in (1, 4):
        order = reference_order(tmp_path / "s", block_shards=block_shards)
        same = float(np.mean(shard_of[order[1:]] == shard_of[order[:-1]]))
        if block_shards == 1:  # whole shards one after another: all 79 neighbours but the 7 at shard borders
            assert same == 72 / 79
        # memory: each block is a contiguous stretch of the order holding block_shards whole shards
        blocks = shard_of[order].reshape(-1, 10 * block_shards)
        assert all(len(set(b.tolist())) == block_shards for b in blocks)
    assert same < 0.5  # with 4 shards per block, ~1/4 of neighbours share a shard


def test_epoch_order_is_built_per_block() -> None:
    order = EpochOrder([3, 0, 4, 2, 5], seed=0, epoch=0, shuffle=True, block_shards=2)
    everything = order.indices(np.arange(len(order)))
    assert sorted(everything.tolist()) == list(range(14))
    shard, row = order.shard_of(everything)
    np.testing.assert_array_equal(np.array([0, 3, 3, 7, 9])[shard] + row, everything)


# ---------------------------------------------------------------- lockstep and resume


def test_lockstep_pads_an_empty_rank_with_a_zero_weight_example(store: Path) -> None:
    # G = 2 * 4 = 8: four full global batches, then 3 examples for 4 ranks
    per_rank = [rank_batches(store, world=4, rank=r, batch_size=2) for r in range(4)]
    assert [len(b) for b in per_rank] == [5, 5, 5, 5]
    assert len(StoreDataset(store, batch_size=2, rank=0, world_size=4)) == 5
    assert [len(b[-1]["index"]) for b in per_rank] == [1, 1, 1, 1]
    assert [b[-1]["example_weight"].tolist() for b in per_rank] == [[1.0], [1.0], [1.0], [0.0]]
    counted = np.concatenate([b["index"].numpy()[b["example_weight"].numpy() > 0] for bs in per_rank for b in bs])
    assert sorted(counted.tolist()) == list(range(N))


def test_drop_last_drops_the_partial_global_batch(store: Path) -> None:
    per_rank = [rank_batches(store, world=2, rank=r, batch_size=4, drop_last=True) for r in range(2)]
    assert [len(b) for b in per_rank] == [4, 4]  # 35 // 8
    assert all(len(b["index"]) == 4 for bs in per_rank for b in bs)
    ref = reference_order(store)
    got = np.concatenate([b["index"].numpy() for bs in per_rank for b in bs])
    assert sorted(got.tolist()) == sorted(ref[:32].tolist())


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_the_uninterrupted_tail(store: Path, workers: int) -> None:
    world, bs = 2, 3
    G = world * bs
    full = [rank_batches(store, world=world, rank=r, batch_size=bs) for r in range(world)]
    for steps in (1, 2, 5):
        seen = steps * G
        for r in range(world):
            resumed = rank_batches(store, world=world, rank=r, workers=workers, batch_size=bs, samples_seen=seen)
            assert len(resumed) == len(full[r]) - steps
            for a, b in zip(resumed, full[r][steps:], strict=True):
                assert a.keys() == b.keys()
                for key in a:
                    torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # any count (also one that is not a whole number of steps): the global order continues exactly
    ref = reference_order(store)
    for seen in (5, 17, N - 1, N):
        got = global_order(store, world=world, workers=workers, batch_size=bs, samples_seen=seen)
        np.testing.assert_array_equal(got, ref[seen:])


def test_state_dict_round_trips_through_json(store: Path) -> None:
    ds = StoreDataset(store, batch_size=4, seed=3, epoch=2)
    state = json.loads(json.dumps(ds.state_dict(samples_seen=12)))
    assert state["epoch"] == 2 and state["samples_seen"] == 12 and state["seed"] == 3
    fresh = StoreDataset(store, batch_size=4, seed=3)
    fresh.load_state_dict(state)
    assert (fresh.epoch, fresh.samples_seen) == (2, 12)
    tail = np.concatenate([b["index"].numpy() for b in fresh])
    np.testing.assert_array_equal(tail, reference_order(store, seed=3, epoch=2)[12:])
    fresh.set_epoch(3)  # a new epoch starts from its beginning
    assert fresh.samples_seen == 0 and len(fresh) == -(-N // 4)
    assert ds.state_dict(samples_seen=10 * N)["samples_seen"] == N


def test_load_state_dict_refuses_another_store_or_seed(store: Path, tmp_path: Path) -> None:
    write_store(tmp_path / "other", shards=SHARDS, rows=ROWS, seed=1)
    state = StoreDataset(tmp_path / "other", batch_size=4).state_dict(samples_seen=8)
    ds = StoreDataset(store, batch_size=4)
    with pytest.raises(ValueError, match="another store"):
        ds.load_state_dict(state)
    with pytest.raises(ValueError, match="seed=5"):
        ds.load_state_dict(StoreDataset(store, batch_size=4, seed=5).state_dict(samples_seen=8))
    with pytest.raises(ValueError, match="block_shards"):
        ds.load_state_dict(StoreDataset(store, batch_size=4, block_shards=1).state_dict(samples_seen=8))
    with pytest.raises(ValueError, match="not a StoreDataset state"):
        ds.load_state_dict({"epoch": 0})
    assert ds.samples_seen == 0


def test_bad_arguments_are_refused_together(store: Path) -> None:
    with pytest.raises(ValueError, match=r"batch_size must be >= 1.*rank < world_size"):
        StoreDataset(store, batch_size=0, rank=2, world_size=2)


# ---------------------------------------------------------------- collation


DTYPES = {
    "input_ids": torch.int64,
    "attention_mask": torch.int64,
    "target_ids": torch.int64,
    "target_logprobs": torch.float32,
    "tail_mass": torch.float32,
    "position_mask": torch.bool,
    "labels": torch.int64,
    "index": torch.int64,
    "example_weight": torch.float32,
}


def test_collate_causal_lm_aligns_targets_with_next_tokens(tmp_path: Path, backend: str) -> None:
    written = write_store(tmp_path / "s", backend, "causal-lm", shards=2, rows=6)
    for batch in StoreDataset(tmp_path / "s", batch_size=5):
        assert {k: v.dtype for k, v in batch.items()} == DTYPES
        B, L = batch["input_ids"].shape
        K = batch["target_ids"].shape[-1]
        assert batch["target_ids"].shape == batch["target_logprobs"].shape == (B, L - 1, K)
        assert batch["tail_mass"].shape == batch["position_mask"].shape == batch["labels"].shape == (B, L - 1)
        for b, idx in enumerate(batch["index"].tolist()):
            ex, n = written[idx], len(written[idx]["input_ids"])
            assert batch["input_ids"][b, :n].tolist() == ex["input_ids"].tolist()
            assert batch["input_ids"][b, n:].eq(0).all() and batch["attention_mask"][b].tolist() == [1] * n + [0] * (
                L - n
            )
            np.testing.assert_array_equal(batch["target_ids"][b, : n - 1].numpy(), ex["target_ids"])
            np.testing.assert_array_equal(
                batch["target_logprobs"][b, : n - 1].numpy(), ex["target_logprobs"].astype(np.float16)
            )
            np.testing.assert_array_equal(batch["tail_mass"][b, : n - 1].numpy(), ex["tail_mass"].astype(np.float32))
            assert batch["position_mask"][b].tolist() == [True] * (n - 1) + [False] * (L - n)
            # position i predicts token i + 1 (the student's logits[:, i])
            real = batch["position_mask"][b]
            assert batch["labels"][b][real].tolist() == batch["input_ids"][b, 1:n].tolist()
            assert batch["labels"][b][~real].eq(IGNORE_INDEX).all()
            assert batch["target_ids"][b, n - 1 :].eq(0).all()


def test_collate_masked_lm(tmp_path: Path, backend: str) -> None:
    written = write_store(tmp_path / "s", backend, "masked-lm", shards=2, rows=6)
    for batch in StoreDataset(tmp_path / "s", batch_size=4):
        assert {k: v.dtype for k, v in batch.items()} == DTYPES | {"positions": torch.int64}
        B, P = batch["positions"].shape
        assert batch["target_ids"].shape[:2] == batch["labels"].shape == batch["position_mask"].shape == (B, P)
        for b, idx in enumerate(batch["index"].tolist()):
            ex, n = written[idx], len(written[idx]["positions"])
            assert batch["positions"][b, :n].tolist() == ex["positions"].tolist()
            assert batch["positions"][b, n:].eq(0).all()
            assert batch["labels"][b].tolist() == ex["label"].tolist() + [IGNORE_INDEX] * (P - n)
            np.testing.assert_array_equal(batch["target_ids"][b, :n].numpy(), ex["target_ids"])
            assert batch["position_mask"][b].tolist() == [True] * n + [False] * (P - n)


def test_collate_seq_cls(tmp_path: Path, backend: str) -> None:
    written = write_store(tmp_path / "s", backend, "seq-cls", shards=2, rows=6)
    for batch in StoreDataset(tmp_path / "s", batch_size=4):
        assert {k: v.dtype for k, v in batch.items()} == DTYPES
        B, K = batch["target_ids"].shape
        assert batch["target_logprobs"].shape == (B, K) and batch["tail_mass"].shape == (B,)
        assert batch["position_mask"].all() and batch["labels"].shape == (B,)
        for b, idx in enumerate(batch["index"].tolist()):
            np.testing.assert_array_equal(batch["target_ids"][b].numpy(), written[idx]["target_ids"][0])
            assert batch["labels"][b].item() == written[idx]["label"][0]


def test_collate_seq_cls_without_labels_ignores_them(tmp_path: Path) -> None:
    write_store(tmp_path / "s", "zarr", "seq-cls", shards=1, rows=3)
    store = open_store(tmp_path / "s")
    examples = [{k: v for k, v in store[i].items() if k != "label"} for i in range(3)]
    assert collate(examples, "seq-cls")["labels"].tolist() == [IGNORE_INDEX] * 3


def test_collate_refuses_nothing_and_unknown_tasks(store: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        collate([], "causal-lm")
    with pytest.raises(ValueError, match="unknown task"):
        collate([open_store(store)[0]], "regression")

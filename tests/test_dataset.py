"""The streaming loader's promises, on real stores: blocks, dealing, decodes per epoch, memory, lockstep, resume.

Decodes are counted by wrapping the real ``StoreReader.load_shard`` (the wrapper appends one file per decode to a
directory, so DataLoader worker processes count too); nothing of the code under test is replaced.
"""

from __future__ import annotations

import gc
import json
import os
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kd_pipeline.data.dataset import IGNORE_INDEX, EpochOrder, StoreDataset, collate
from kd_pipeline.data.reader import StoreReader, open_store
from tests.conftest import write_store

# DataLoader warns when num_workers exceeds the machine's cores; the tests use 2 workers for correctness, not
# speed, so that warning is expected on a 1-core CI runner.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

SHARDS, ROWS = 8, 5  # 40 examples; block_shards=2 makes 4 blocks, enough for 2 ranks x 2 workers
N = SHARDS * ROWS
Batches = list[dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dataset") / "store"
    write_store(path, "zarr", "causal-lm", shards=SHARDS, rows=ROWS)
    return path


def rank_batches(path: Path, *, world: int = 1, rank: int = 0, workers: int = 0, **kw: Any) -> Batches:
    """Every batch one rank yields in an epoch, through a DataLoader with ``workers`` workers when > 0."""
    ds = StoreDataset(path, rank=rank, world_size=world, num_workers=workers, **kw)
    if workers == 0:
        return list(ds)
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    assert len(loader) == len(ds)
    return list(loader)


def job(path: Path, *, world: int = 1, workers: int = 0, **kw: Any) -> list[Batches]:
    """Every rank's batches; checks lockstep (every rank yields len(ds) batches) and the weights' values."""
    per_rank = [rank_batches(path, world=world, rank=r, workers=workers, **kw) for r in range(world)]
    expected = len(StoreDataset(path, rank=0, world_size=world, num_workers=workers, **kw))
    assert [len(b) for b in per_rank] == [expected] * world, "ranks must yield the same number of batches"
    for batch in (b for bs in per_rank for b in bs):
        assert batch["example_weight"].dtype == torch.float32 and set(batch["example_weight"].tolist()) <= {0, 1}
    return per_rank


def counted(batches: Batches) -> list[int]:
    """The indices of the examples that count (weight 1), in order."""
    return [i for b in batches for i in b["index"][b["example_weight"] > 0].tolist()]


def reference_order(path: Path, **kw: Any) -> np.ndarray:
    return np.concatenate([b["index"].numpy() for b in rank_batches(path, batch_size=N, **kw)])


@pytest.fixture
def decodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory that gets one file per real ``StoreReader.load_shard`` call, from any process."""
    where = tmp_path / "decodes"
    where.mkdir()
    real = StoreReader.load_shard

    def counting(self: StoreReader, record: Any, *, verify: bool) -> Any:
        (where / f"{record.name}.{os.getpid()}.{os.urandom(4).hex()}").touch()
        return real(self, record, verify=verify)

    monkeypatch.setattr(StoreReader, "load_shard", counting)
    yield where


def decoded(where: Path) -> Counter[str]:
    """Decodes per shard name so far; then starts counting afresh."""
    names = Counter(p.name.split(".")[0] for p in where.iterdir())
    for p in where.iterdir():
        p.unlink()
    return names


# ---------------------------------------------------------------- blocks and dealing


def test_one_consumer_reads_the_blocks_in_order(store: Path) -> None:
    order = EpochOrder([ROWS] * SHARDS, seed=0, epoch=0, shuffle=True, block_shards=2)
    ref = reference_order(store, block_shards=2)
    np.testing.assert_array_equal(ref, np.concatenate([order.block_indices(j) for j in range(len(order.blocks))]))
    assert sorted(ref.tolist()) == list(range(N)) and (ref != np.arange(N)).any()
    for bs in (1, 3, 8):  # one consumer: the order does not depend on the batch size
        np.testing.assert_array_equal(np.array(counted(rank_batches(store, batch_size=bs, block_shards=2))), ref)


@pytest.mark.parametrize(("world", "workers"), [(1, 2), (2, 0), (2, 2), (3, 1), (1, 3)])
def test_blocks_are_dealt_whole_to_ranks_and_workers(store: Path, world: int, workers: int) -> None:
    """Consumer (r, w) reads the blocks j with j % R == r and (j // R) % W == w, in order, each in its own order;
    rank batch b comes from worker b % W; every example exactly once in the job."""
    order = EpochOrder([ROWS] * SHARDS, seed=0, epoch=0, shuffle=True, block_shards=2)
    W = max(workers, 1)
    per_rank = job(store, world=world, workers=workers, batch_size=3, block_shards=2)
    everything: list[int] = []
    for r, batches in enumerate(per_rank):
        for w in range(W):
            stream = counted(batches[w::W])
            blocks = [j for j in range(len(order.blocks)) if j % world == r and (j // world) % W == w]
            expected = [i for j in blocks for i in order.block_indices(j).tolist()]
            assert stream == expected, (r, w)
            everything += stream
    assert sorted(everything) == list(range(N))


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
    assert order.block_rows.tolist() == [len(order.block_indices(j)) for j in range(3)]


# ---------------------------------------------------------------- decodes and memory


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 1), (1, 2), (2, 0), (2, 2)])
def test_each_shard_is_decoded_once_per_epoch_per_job(store: Path, decodes: Path, world: int, workers: int) -> None:
    names = [s.name for s in open_store(store).manifest.shards]
    for epoch in (0, 1):
        per_rank = job(store, world=world, workers=workers, batch_size=3, block_shards=2, epoch=epoch)
        assert decoded(decodes) == Counter(names), (epoch, world, workers)
        assert sorted(i for bs in per_rank for i in counted(bs)) == list(range(N))


def test_a_consumer_holds_at_most_block_shards_decoded_shards(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weak references to every decoded shard's arrays: when a shard is decoded, at most block_shards - 1 others
    are still alive (examples are views into them, so a kept example would keep its shard alive too)."""
    alive: list[weakref.ref[np.ndarray]] = []
    most = [0]
    real = StoreReader.load_shard

    def watching(self: StoreReader, record: Any, *, verify: bool) -> Any:
        gc.collect()
        most[0] = max(most[0], sum(r() is not None for r in alive))
        shard = real(self, record, verify=verify)
        alive.append(weakref.ref(shard.target_ids))
        return shard

    monkeypatch.setattr(StoreReader, "load_shard", watching)
    for block_shards in (1, 2, 3):
        alive.clear()
        most[0] = 0
        batches = rank_batches(store, batch_size=3, block_shards=block_shards)  # batches of 3 span blocks
        assert sorted(counted(batches)) == list(range(N)) and len(alive) == SHARDS
        assert most[0] == block_shards - 1, block_shards


# ---------------------------------------------------------------- lockstep


def test_lockstep_pads_short_consumers_with_zero_weight_stand_ins(store: Path) -> None:
    # block_shards=3: blocks of 15, 15 and 10 examples; rank 0 reads blocks 0 and 2 (25), rank 1 block 1 (15)
    per_rank = job(store, world=2, batch_size=4, block_shards=3)
    assert [len(b) for b in per_rank] == [7, 7]  # ceil(25 / 4)
    weights = [[float(b["example_weight"].sum()) for b in bs] for bs in per_rank]
    assert weights == [[4, 4, 4, 4, 4, 4, 1], [4, 4, 4, 3, 0, 0, 0]]
    stand_in = per_rank[1][-1]
    assert len(stand_in["index"]) == 1 and stand_in["index"].item() == per_rank[1][3]["index"][-1].item()
    assert sorted(counted(per_rank[0]) + counted(per_rank[1])) == list(range(N))
    # more ranks than blocks: rank 3 has nothing of its own and yields stand-ins only
    per_rank = job(store, world=4, batch_size=4, block_shards=3)
    assert [len(b) for b in per_rank] == [4, 4, 4, 4] and counted(per_rank[3]) == []
    assert sorted(i for bs in per_rank for i in counted(bs)) == list(range(N))


def test_drop_last_drops_each_consumers_partial_batch(store: Path) -> None:
    per_rank = job(store, world=2, batch_size=4, block_shards=3, drop_last=True)
    assert [len(b) for b in per_rank] == [6, 6]  # 25 // 4
    real = [b for bs in per_rank for b in bs if b["example_weight"].all()]
    assert all(len(b["index"]) == 4 for b in real) and len(real) == 6 + 3
    assert len(set(counted(per_rank[0]) + counted(per_rank[1]))) == 36


# ---------------------------------------------------------------- resume


def assert_same_batches(a: Batches, b: Batches) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_the_uninterrupted_tail(store: Path, workers: int) -> None:
    world, bs = 2, 3
    kw: dict[str, Any] = {"world": world, "workers": workers, "batch_size": bs, "block_shards": 2}
    full = job(store, **kw)
    for steps in (1, 2, 5, len(full[0])):
        for r in range(world):
            # through the constructor, as the training stage does
            resumed = rank_batches(store, rank=r, samples_seen=steps * bs * world, **kw)
            assert_same_batches(resumed, full[r][steps:])
        # through state_dict, as JSON
        state = json.loads(json.dumps(StoreDataset(store, **_ds(kw)).state_dict(samples_seen=steps * bs * world)))
        for r in range(world):
            ds = StoreDataset(store, rank=r, **_ds(kw))
            ds.load_state_dict(state)
            loader = DataLoader(ds, batch_size=None, num_workers=workers) if workers else ds
            assert_same_batches(list(loader), full[r][steps:])


def _ds(kw: dict[str, Any]) -> dict[str, Any]:
    """job()'s keywords as StoreDataset's."""
    out = {k: v for k, v in kw.items() if k not in ("world", "workers")}
    return out | {"world_size": kw["world"], "num_workers": kw["workers"]}


def resume_chain(path: Path, legs: list[tuple[int, int, int, int]], **kw: Any) -> list[int]:
    """Run an epoch in legs of (world, workers, batch_size, steps) (steps -1: to the end), each resumed from the
    previous one's state; returns every counted example of the job, checking lockstep within each leg."""
    state: dict[str, Any] | None = None
    seen_total, everything = 0, []
    for world, workers, bs, steps in legs:
        per_rank = []
        for r in range(world):
            ds = StoreDataset(path, rank=r, world_size=world, num_workers=workers, batch_size=bs, **kw)
            if state is not None:
                ds.load_state_dict(state)
            loader = DataLoader(ds, batch_size=None, num_workers=workers) if workers else ds
            got = list(loader)
            per_rank.append(got if steps < 0 else got[:steps])
            assert len(got) == len(ds)
        assert len({len(b) for b in per_rank}) == 1, "lockstep within the leg"
        everything += [i for bs_ in per_rank for i in counted(bs_)]
        seen_total += len(per_rank[0]) * bs * world
        state = json.loads(json.dumps(ds.state_dict(samples_seen=seen_total)))
    return everything


@pytest.mark.parametrize(
    "legs",
    [
        [(2, 2, 3, 2), (1, 0, 3, -1)],  # 4 consumers -> 1
        [(1, 0, 3, 5), (2, 2, 3, -1)],  # 1 -> 4
        [(2, 0, 3, 3), (1, 2, 4, -1)],  # other world, workers and batch size
        [(2, 1, 2, 3), (3, 0, 3, 2), (1, 2, 2, 1), (2, 2, 3, -1)],  # a chain of configurations
        [(2, 2, 3, 2), (2, 2, 3, 1), (1, 0, 3, 2), (2, 2, 3, -1)],  # back to an earlier one
    ],
)
def test_resume_across_ranks_workers_and_batch_sizes_misses_and_repeats_nothing(
    store: Path, legs: list[tuple[int, int, int, int]]
) -> None:
    assert sorted(resume_chain(store, legs, block_shards=2)) == list(range(N))


def test_resume_in_the_same_configuration_continues_its_leg(store: Path) -> None:
    """Resuming twice with the same configuration equals one uninterrupted run, batch for batch."""
    kw: dict[str, Any] = {"batch_size": 3, "block_shards": 2, "world_size": 2, "num_workers": 2}
    full = [b["index"].tolist() for b in StoreDataset(store, rank=1, **kw)]
    ds = StoreDataset(store, rank=1, **kw)
    ds.load_state_dict(json.loads(json.dumps(StoreDataset(store, **kw).state_dict(samples_seen=3 * 6))))
    state = ds.state_dict(samples_seen=5 * 6)
    assert [g["steps"] for g in state["legs"]] == [5]
    again = StoreDataset(store, rank=1, **kw)
    again.load_state_dict(state)
    assert [b["index"].tolist() for b in again] == full[5:]


def test_state_dict_round_trips_through_json(store: Path) -> None:
    ds = StoreDataset(store, batch_size=4, seed=3, epoch=2)
    state = json.loads(json.dumps(ds.state_dict(samples_seen=12)))
    assert state["epoch"] == 2 and state["samples_seen"] == 12 and state["seed"] == 3
    assert state["legs"] == [{"world_size": 1, "num_workers": 0, "batch_size": 4, "drop_last": False, "steps": 3}]
    assert len(json.dumps(state)) < 2000
    fresh = StoreDataset(store, batch_size=4, seed=3)
    fresh.load_state_dict(state)
    assert (fresh.epoch, fresh.samples_seen) == (2, 12)
    tail = np.concatenate([b["index"].numpy() for b in fresh])
    np.testing.assert_array_equal(tail, reference_order(store, seed=3, epoch=2)[12:])
    fresh.set_epoch(3)  # a new epoch starts from its beginning
    assert fresh.samples_seen == 0 and len(fresh) == -(-N // 4)
    assert ds.state_dict(samples_seen=100 * N)["samples_seen"] == N  # past the end: the epoch is finished


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
    with pytest.raises(ValueError, match="version 1"):
        ds.load_state_dict(ds.state_dict(samples_seen=8) | {"version": 1})
    assert ds.samples_seen == 0


def test_bad_arguments_are_refused_together(store: Path) -> None:
    with pytest.raises(ValueError, match=r"batch_size must be >= 1.*rank < world_size"):
        StoreDataset(store, batch_size=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="whole number of steps"):
        StoreDataset(store, batch_size=3, world_size=2, samples_seen=5)


def test_a_dataloader_with_another_worker_count_is_refused(store: Path) -> None:
    ds = StoreDataset(store, batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match="num_workers=2"):
        list(DataLoader(ds, batch_size=None, num_workers=2))


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

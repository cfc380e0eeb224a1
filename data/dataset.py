"""The streaming training loader: collated batches from a store; each shard decoded once per epoch per job.

    ds = data.StoreDataset("stores/pydoc-top32", batch_size=8, seed=0, num_workers=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)   # the same W; batch_size=None
    for epoch in range(start_epoch, epochs):
        ds.set_epoch(epoch)
        for step, batch in enumerate(loader, start=first_step):
            ...                                     # batch["input_ids"]: (B, L) int64, see `collate`
            ckpt["data"] = ds.state_dict(samples_seen=(step + 1) * batch_size * world_size)
    ds.load_state_dict(ckpt["data"])                # exact mid-epoch resume, also on other ranks / workers

Consumers: the job's R ranks times W DataLoader workers (W = ``num_workers``, 1 when 0: the main process) are
C = R * W consumers; consumer (r, w) is numbered c = r + R * w. The promises, each tested in tests/test_dataset.py:

1. Blocks (the canonical partitions). The covered shards are permuted with a generator seeded from (seed, epoch)
   (store order with ``shuffle=False``) and cut into P = ceil(S / ``block_shards``) blocks of consecutive shards;
   block j's examples are shuffled with a generator seeded from (seed, epoch, j). Which examples a block holds
   and their order within it are a function of the store, ``shards``/``split``, the seed, the epoch,
   ``shuffle`` and ``block_shards`` only: never of ranks, workers or the batch size.
2. Dealing. Block j goes to rank j % R and, among that rank's blocks, to worker (j // R) % W: whole blocks, so
   every shard is decoded by exactly one process per epoch (when every consumer has a block, P >= C), decode
   throughput grows with ranks and workers up to P consumers, and a consumer holds at most ``block_shards``
   decoded shards (it drops a block before decoding the next; examples a batch still needs from the old block
   are copied first). A rank's set of blocks does not depend on W.
3. Order within a rank. A consumer reads its blocks in increasing j, each in its order of 1, as one stream, cut
   into batches of ``batch_size`` (a batch may span two blocks). Rank batch b is batch b // W of worker b % W:
   the order in which the DataLoader (``batch_size=None``) takes batches from its workers. So with one rank and
   no workers the epoch order is the blocks' concatenation, as before; with more consumers the rank's order is
   a function of (R, W, batch_size) too. Iterated in the main process, a dataset declared with W workers yields
   the same sequence (it runs the W consumers in turn, holding W blocks).
4. Lockstep. Every consumer of the job yields M batches, M the most any consumer has (consumers' example counts
   differ by up to about one block); after its real batches a consumer yields stand-ins: a batch of one copy of
   its last example with ``example_weight`` 0, whose loss contribution must be (and, weighted, is) masked. So
   every rank yields W * M batches per epoch, as DDP needs. A consumer with no example at all (more consumers
   than blocks, or one that finished before a resume) decodes one shard to build its stand-in: the only case in
   which a shard is decoded twice in an epoch. ``drop_last=True`` drops each consumer's final partial batch.
5. Resume. ``samples_seen`` is the trainer's count steps * batch_size * world_size (global examples consumed,
   stand-ins counted; a whole number of steps). With the same (R, W, batch_size), resuming yields exactly the
   uninterrupted remainder, batch for batch (worker w of the new DataLoader plays consumer (w + steps) % W).
   A state saved under other R, W or batch_size is resumed exactly too: the state lists the epoch's earlier
   "legs" (their R, W, batch_size, drop_last and steps, a few numbers each), from which every block's consumed
   prefix follows; the remaining tails are dealt as in 2 to the new consumers. Nothing is missed or repeated.
   The constructor's ``samples_seen`` means steps of the current configuration from the epoch's start.
6. Every batch carries ``index`` (B,) int64, the examples' indices in store order among the covered examples,
   and ``example_weight`` (B,) float32 (1, or 0 for the stand-ins of 4).
7. Held-out split: ``split="eval"`` with ``eval_fraction=f`` covers the round(f * N) examples (at least one)
   whose content keys hash lowest, ``split="train"`` the others (:func:`held_out`). The key is a hash of the
   example's tokens, so the split is the same whatever the shard size, the number of shards, ranks or workers,
   and copies of an example always land on the same side. Only the keys column of each shard is read for it;
   a shard's selected rows are decoded with the shard, once.

Changed from the loader before issue 13 (which made every process decode every shard): the epoch order was one
global sequence dealt example by example (i to rank i % R, batch b to worker b % W), the same for any R and W;
now only the blocks and their inner order are (1), and a rank's order depends on (R, W, batch_size) (3);
``num_workers`` must be declared; ``samples_seen`` must be a whole number of steps; ``drop_last`` drops per
consumer; the state format is version 2 (version 1 states are refused).

With ``persistent_workers=True`` the workers keep the epoch they started with (they hold copies of the
dataset); call ``set_epoch`` before creating the DataLoader's iterator and leave persistent workers off.
The permutations come from numpy's PCG64 ``Generator.permutation``; numpy does not promise that stream
across major versions, so resume a run with the numpy it started with.

Start-up reads the root and, per 1,024 shards, one small summary of their example counts (data/segments.py): no
shard record, whose files' sizes and checksums are read (and with ``verify`` checked) when a consumer first
decodes the shard. Stores written before those summaries fall back to reading every record once (slower).
``split="train"|"eval"`` still reads every covered shard's keys column at start.

Through DataLoader workers, a batch leaves the worker with the store's narrow dtypes, packed in one buffer, and
is widened to the dtypes above when the reading process unpickles it (:class:`~data.collate.WireBatch`): what a
consumer receives is the same dict of tensors as in the main process.

This module and ``data.collate`` are the only modules of ``data`` that import torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .collate import IGNORE_INDEX, WireBatch, collate, collate_arrays, widen
from .manifest import Manifest
from .reader import StoreReader, open_store
from .segments import LazyShards
from .shard import NDArray, ShardData

__all__ = ["IGNORE_INDEX", "EpochOrder", "StoreDataset", "collate", "store_fingerprint"]

_STATE_FORMAT = "kd-loader-state"
_STATE_VERSION = 2
SPLITS = ("all", "train", "eval")


def held_out(keys: NDArray, fraction: float) -> NDArray:
    """Which examples a held-out split of ``fraction`` takes: (R,) bool, from the content keys (R, 16) uint8 alone.

    The first 8 bytes of a key (BLAKE2b-128 of the example's input ids), read as a little-endian uint64, are a
    uniform hash; the max(1, round(fraction * R)) examples with the smallest are held out (at most R - 1; copies
    of an example share its key, so they land on the same side and may add to the count). An exact count, at
    least one example however small the store, and the same examples whatever the order or sharding of the keys.
    """
    words = np.ascontiguousarray(keys[:, :8]).view("<u8").reshape(-1)  # (R,) uint64
    n = len(words)
    if n < 2:
        return np.zeros(n, dtype=bool)
    count = min(max(1, round(fraction * n)), n - 1)
    held: NDArray = words <= np.partition(words, count - 1)[count - 1]
    return held


def loader_fingerprint(manifest: Manifest) -> str:
    """The store digest a loader state records: version 2, from the root alone (the task and each segment's
    SHA-256, shard and row counts: a segment's SHA-256 covers its records, each of which holds its files'
    SHA-256s), so that a loader starts without reading any record; version 1, :func:`store_fingerprint`.

    Two copies of one store share it; a copy with the same records in other segments (re-merged) does not. A
    state saved with :func:`store_fingerprint` (the loader before this digest) is accepted too.
    """
    shards = manifest.shards
    if not isinstance(shards, LazyShards):
        return store_fingerprint(manifest)
    body = [manifest.task, "segments", [[r.sha256, r.shards, r.rows] for r in shards.refs]]
    return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


def store_fingerprint(manifest: Manifest) -> str:
    """A digest of a store's content and order: its task and every shard's name, row count and file SHA-256s.

    Two copies of one store share it; stores that differ in any shard (or in shard order) do not.
    """
    # the SHA-256 of ``json.dumps([task, [[name, rows, sorted [file, sha256] pairs], ...]])``, compact, fed one
    # shard at a time: memory stays bounded in the number of shards (records are read segment by segment). Every
    # record is read: the digest names the content, whatever segments hold it (a re-merged copy of a store has
    # other segments). A loader's state uses :func:`loader_fingerprint`, which reads no record.
    h = hashlib.sha256(b"[" + json.dumps(manifest.task).encode() + b",[")
    for i, s in enumerate(manifest.shards):
        entry = [s.name, s.rows, sorted((rel, f.sha256) for rel, f in s.files.items())]
        h.update((b"," if i else b"") + json.dumps(entry, separators=(",", ":")).encode())
    h.update(b"]]")
    return h.hexdigest()


class EpochOrder:
    """The blocks of one epoch and the order of the examples within each (built per block, never all N at once).

    Args:
        shard_rows: examples per covered shard, in store order.
        seed, epoch: the generator seeds; each block's shuffle is seeded from (seed, epoch, block).
        shuffle: False gives store order (blocks are then consecutive shards in store order).
        block_shards: shards per block.
    """

    def __init__(self, shard_rows: Sequence[int], *, seed: int, epoch: int, shuffle: bool, block_shards: int) -> None:
        rows = np.asarray(shard_rows, dtype=np.int64).reshape(-1)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.shard_rows = rows  # (S,)
        self.shard_starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)  # (S + 1,) store order
        n = len(rows)
        # Distinct seed words per use ((.., 0) shard order, (.., 1, j) block j), so no two streams coincide.
        self.shard_order = np.random.default_rng([seed, epoch, 0]).permutation(n) if shuffle else np.arange(n)
        self.blocks = [self.shard_order[i : i + block_shards] for i in range(0, n, block_shards)]
        firsts = np.arange(0, n, block_shards)
        self.block_rows = np.add.reduceat(rows[self.shard_order], firsts) if n else np.zeros(0, np.int64)  # (P,)
        self.block_starts = np.concatenate([[0], np.cumsum(self.block_rows)]).astype(np.int64)  # (P + 1,)
        self._cache: dict[int, NDArray] = {}

    def __len__(self) -> int:
        return int(self.block_starts[-1])

    def block_indices(self, j: int) -> NDArray:
        """Store-order indices of block ``j``'s examples, in their order: (rows in block,) int64."""
        if j not in self._cache:
            starts = self.shard_starts
            idx = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in self.blocks[j]]).astype(np.int64)
            if self.shuffle:
                idx = np.random.default_rng([self.seed, self.epoch, 1, j]).permutation(idx)
            if len(self._cache) >= 2:  # a consumer moves forward through its blocks: the two latest suffice
                self._cache.pop(next(iter(self._cache)))
            self._cache[j] = idx
        return self._cache[j]

    def indices(self, positions: NDArray) -> NDArray:
        """Store-order index at each position of the blocks' concatenation (the order of one consumer)."""
        blocks = np.searchsorted(self.block_starts, positions, side="right") - 1
        out = np.empty(len(positions), dtype=np.int64)
        for j in np.unique(blocks):
            sel = blocks == j
            out[sel] = self.block_indices(int(j))[positions[sel] - self.block_starts[j]]
        return out

    def shard_of(self, indices: NDArray) -> tuple[NDArray, NDArray]:
        """(shard, row within shard) of store-order indices."""
        shards = np.searchsorted(self.shard_starts, indices, side="right") - 1
        return shards, indices - self.shard_starts[shards]


@dataclasses.dataclass(frozen=True)
class Leg:
    """A stretch of an epoch run under one configuration: ``steps`` batches per rank (stand-ins included)."""

    world_size: int
    num_workers: int
    batch_size: int
    drop_last: bool
    steps: int

    @property
    def workers(self) -> int:
        """Consumers per rank: the DataLoader's workers, or the main process."""
        return max(self.num_workers, 1)

    def same_config(self, other: Leg) -> bool:
        return dataclasses.replace(self, steps=0) == dataclasses.replace(other, steps=0)


@dataclasses.dataclass
class Plan:
    """One leg's deal of the blocks' remaining examples to the C = R * W consumers (promises 2 to 4).

    consumer: (P,) the consumer of each block; remaining: (P,) examples left in each block; batches: (C,) real
    batches of each consumer; steps: M, the batches every consumer yields (the most of any).
    """

    consumer: NDArray
    remaining: NDArray
    batches: NDArray
    steps: int

    @classmethod
    def make(cls, block_rows: NDArray, offsets: NDArray, leg: Leg) -> Plan:
        R, W, B = leg.world_size, leg.workers, leg.batch_size
        j = np.arange(len(block_rows))
        consumer = j % R + R * ((j // R) % W)
        remaining = block_rows - offsets
        per = np.bincount(consumer, weights=remaining, minlength=R * W).astype(np.int64)  # (C,) examples
        batches = per // B if leg.drop_last else -(-per // B)
        return cls(consumer, remaining, batches, int(batches.max()) if len(batches) else 0)

    def consumed(self, leg: Leg) -> NDArray:
        """(P,) examples of each block consumed after ``leg.steps`` rank batches of this leg."""
        R, W, B = leg.world_size, leg.workers, leg.batch_size
        c = np.arange(R * W)
        k = min(leg.steps, W * self.steps)
        # rank batch b is batch b // W of worker b % W: worker w has taken ceil((k - w) / W) of its batches
        taken = np.minimum(np.maximum(-(-(k - c // R) // W), 0), self.batches) * B  # (C,) examples, stream prefix
        if len(self.consumer) == 0:
            return np.zeros(0, dtype=np.int64)
        order = np.lexsort((np.arange(len(self.consumer)), self.consumer))  # blocks by (consumer, j)
        rem, owner = self.remaining[order], self.consumer[order]
        ahead = np.cumsum(rem) - rem  # examples before each block, over all consumers in this order
        first = np.r_[True, owner[1:] != owner[:-1]]
        before = ahead - np.maximum.accumulate(np.where(first, ahead, 0))  # ... within its consumer's stream
        out = np.zeros_like(self.remaining)
        out[order] = np.clip(taken[owner] - before, 0, rem)
        return out


def _copy(example: dict[str, NDArray]) -> dict[str, NDArray]:
    """An example that owns its arrays (a shard's examples are views that keep the whole shard alive)."""
    return {k: np.array(v, copy=True) for k, v in example.items()}


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StoreDataset(IterableDataset[dict[str, torch.Tensor]]):
    """Collated batches of a store's examples for one rank (see the module doc for the order and the promises).

    Use it with ``DataLoader(ds, batch_size=None, num_workers=W)`` and ``num_workers=W`` here: it batches and
    collates itself, and its order and resume state depend on W.

    Args:
        store: a store path or URL, or an open :class:`~data.StoreReader`.
        batch_size: examples per batch on each rank.
        seed: seeds the shuffle (>= 0).
        shuffle: shuffle shards and, within blocks, examples; False gives store order.
        block_shards: shards per block: more mixes better and costs more memory (that many decoded shards per
            consumer); fewer evens out the consumers' shares (they differ by up to about one block).
        epoch: the epoch to iterate (see :meth:`set_epoch`).
        rank, world_size: this process's data-parallel rank; by default from torch.distributed when it is
            initialised, else 0 and 1. Resolved here, in the main process, because workers are not part of
            the process group.
        num_workers: the DataLoader's ``num_workers`` (0: iterated in the main process). A DataLoader with
            another count is refused when it starts.
        samples_seen: steps of ``epoch`` already taken under this configuration, times batch_size * world_size;
            iteration starts after them.
        drop_last: drop each consumer's final partial batch.
        shards: the store-order indices of the shards to cover; all by default. ``batch["index"]`` then counts
            examples of these shards only, in their store order.
        split: ``"all"`` (default), or ``"train"`` / ``"eval"``: the examples outside / inside the held-out
            fraction ``eval_fraction`` of the key space (see :func:`held_out`); ``batch["index"]`` then counts
            the covered examples only, in store order.
        eval_fraction: the held-out fraction for ``split``, in (0, 1).
        collate_fn: ``(examples, task) -> batch`` for each batch's stored examples (numpy dicts, as
            ``StoreReader`` gives them), returning tensors; by default :func:`collate` (narrow arrays in
            workers, widened where the batch is read). Another one (cross-tokenizer training's, which tokenizes the
            source texts for the student) must be picklable when ``num_workers`` > 0; its tensors leave workers as
            it made them. It does not change the order or the resume state.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | StoreReader,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        block_shards: int = 4,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        samples_seen: int = 0,
        drop_last: bool = False,
        shards: Sequence[int] | None = None,
        split: str = "all",
        eval_fraction: float = 0.0,
        collate_fn: Callable[[list[dict[str, NDArray]], str], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        default_rank, default_world = _default_rank_world()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        problems = []
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if block_shards < 1:
            problems.append(f"block_shards must be >= 1, got {block_shards}")
        if seed < 0 or epoch < 0 or samples_seen < 0 or num_workers < 0:
            problems.append(
                f"seed, epoch, samples_seen and num_workers must be >= 0, got {seed}, {epoch}, {samples_seen}, "
                f"{num_workers}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            problems.append(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        elif batch_size >= 1 and samples_seen % (batch_size * world_size):
            problems.append(
                f"samples_seen must be a whole number of steps (a multiple of batch_size * world_size = "
                f"{batch_size * world_size}), got {samples_seen}"
            )
        if split not in SPLITS:
            problems.append(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        elif split != "all" and not 0 < eval_fraction < 1:
            problems.append(f"split {split!r} needs 0 < eval_fraction < 1, got {eval_fraction}")
        if problems:
            raise ValueError("StoreDataset: " + "; ".join(problems))
        self.reader = store if isinstance(store, StoreReader) else open_store(store)
        self.task = self.reader.manifest.task
        n_shards = self.reader.num_shards
        self.shard_ids = list(range(n_shards)) if shards is None else [int(i) for i in shards]
        if len(set(self.shard_ids)) != len(self.shard_ids) or not all(0 <= i < n_shards for i in self.shard_ids):
            raise ValueError(f"StoreDataset: shards must be distinct indices in [0, {n_shards}), got {shards}")
        self.split, self.eval_fraction = split, (float(eval_fraction) if split != "all" else 0.0)
        # Rows of each covered shard that the split keeps (store order), or None for every row.
        self._rows: list[NDArray] | None = None
        if split != "all":
            keys = [self.reader.shard_keys(i) for i in self.shard_ids]  # (rows, 16) uint8 each
            held = held_out(np.concatenate(keys) if keys else np.zeros((0, 16), np.uint8), self.eval_fraction)
            starts = np.cumsum([0] + [len(k) for k in keys])
            self._rows = [
                np.flatnonzero(mine if split == "eval" else ~mine).astype(np.int64)
                for mine in (held[a:b] for a, b in itertools.pairwise(starts))
            ]
        if self._rows is not None:
            self._shard_rows = [len(r) for r in self._rows]
        else:  # from the root and the segments' summaries: no shard record is read (data/segments.py)
            records = self.reader.manifest.shards
            every = records.shard_rows() if isinstance(records, LazyShards) else [r.rows for r in records]
            self._shard_rows = [every[i] for i in self.shard_ids]
        self._num_examples = sum(self._shard_rows)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.block_shards = block_shards
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.collate_fn = collate_fn  # None: the narrow arrays of collate_arrays, widened where they are read
        self.fingerprint = loader_fingerprint(self.reader.manifest)
        self.epoch = epoch
        self.samples_seen = samples_seen
        self._legs: list[Leg] = []  # earlier legs of this epoch, under other configurations
        self._leg_start = 0  # samples_seen when the current leg began
        self._leg_length: tuple[Any, int] = (None, 0)  # (what it depends on, rank batches of the current leg)

    @property
    def num_examples(self) -> int:
        """Examples this dataset covers (all of the store's unless ``shards`` or ``split`` was given)."""
        return self._num_examples

    def _order(self) -> EpochOrder:
        return EpochOrder(
            self._shard_rows, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, block_shards=self.block_shards
        )

    def _leg(self, samples_seen: int) -> Leg:
        """The current configuration as a leg, with its steps taken at ``samples_seen``."""
        steps, rest = divmod(samples_seen - self._leg_start, self.batch_size * self.world_size)
        if steps < 0 or rest:
            raise ValueError(
                f"samples_seen {samples_seen} is not {self._leg_start} plus a whole number of steps of "
                f"batch_size * world_size = {self.batch_size * self.world_size}"
            )
        return Leg(self.world_size, self.num_workers, self.batch_size, self.drop_last, steps)

    def _plan(self, order: EpochOrder) -> tuple[NDArray, Plan, int]:
        """(offsets (P,) consumed by the earlier legs, this leg's plan, steps this leg has taken)."""
        offsets = np.zeros(len(order.blocks), dtype=np.int64)
        for leg in self._legs:
            offsets += Plan.make(order.block_rows, offsets, leg).consumed(leg)
        leg = self._leg(self.samples_seen)
        plan = Plan.make(order.block_rows, offsets, leg)
        return offsets, plan, min(leg.steps, leg.workers * plan.steps)

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch from ``samples_seen`` on (the same on every rank)."""
        _, plan, done = self._plan(self._order())
        return max(self.num_workers, 1) * plan.steps - done

    def set_epoch(self, epoch: int) -> None:
        """Iterate ``epoch`` next. A new epoch starts from its beginning (a resumed position is dropped)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.samples_seen, self._legs, self._leg_start = 0, [], 0
        self.epoch = epoch

    def state_dict(self, samples_seen: int) -> dict[str, Any]:
        """The loader position as a small JSON-able dict: the epoch's legs (a few numbers per configuration).

        Args:
            samples_seen: the trainer's count for the current epoch, steps * batch_size * world_size from the
                epoch's start (summed over the legs if the configuration changed); past the end means finished.
        """
        leg = self._leg(samples_seen)
        key = (self.epoch, tuple(self._legs), dataclasses.replace(leg, steps=0))
        if self._leg_length[0] != key:  # cached: a trainer may save a state after every batch
            _, plan, _ = self._plan(self._order())
            self._leg_length = (key, leg.workers * plan.steps)
        leg = dataclasses.replace(leg, steps=min(leg.steps, self._leg_length[1]))
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "samples_seen": self._leg_start + leg.steps * self.batch_size * self.world_size,
            "legs": [dataclasses.asdict(g) for g in [*self._legs, leg]],
            **self._order_fields(),
            "num_examples": self.num_examples,
            "store_fingerprint": self.fingerprint,
        }

    def _order_fields(self) -> dict[str, Any]:
        """What fixes the blocks and their order besides the store: a state must match them to resume."""
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "block_shards": self.block_shards,
            "shards": self.shard_ids,
            "split": self.split,
            "eval_fraction": self.eval_fraction,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s output, under this or another (world_size, num_workers, batch_size).

        Raises:
            ValueError: the state is not a loader state, or comes from another store, seed, shuffle,
                block_shards, shards or split (which would give other blocks); the message says which.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError("not a StoreDataset state (expected the dict that StoreDataset.state_dict returns)")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"loader state version {state.get('version')} is not {_STATE_VERSION} (version 1 states describe "
                "the order before each shard was decoded once per job; resume from the epoch's start instead)"
            )
        mine = self._order_fields()
        problems = []
        if state.get("store_fingerprint") != self.fingerprint and state.get("store_fingerprint") != store_fingerprint(
            self.reader.manifest
        ):  # the second: a state saved by the loader before loader_fingerprint (reads every record, only then)
            problems.append(
                f"it was saved for another store (fingerprint {str(state.get('store_fingerprint'))[:12]}, "
                f"this one is {self.fingerprint[:12]}); resume with the store the run started with"
            )
        for key, value in mine.items():
            if state.get(key) != value:
                problems.append(f"it has {key}={state.get(key)!r}, this dataset {key}={value!r}")
        epoch, seen, legs = state.get("epoch"), state.get("samples_seen"), []
        if not isinstance(epoch, int) or not isinstance(seen, int) or epoch < 0 or seen < 0:
            problems.append(f"epoch and samples_seen must be integers >= 0, got {epoch!r} and {seen!r}")
        try:
            legs = [Leg(**g) for g in state.get("legs", [])]
            fields = [(g.world_size, g.batch_size, g.num_workers + 1, g.steps + 1) for g in legs]
            if not legs or not all(isinstance(v, int) and v >= 1 for f in fields for v in f):
                raise TypeError
        except TypeError:
            problems.append(f"legs must be a non-empty list of legs, got {state.get('legs')!r}")
        if problems:
            raise ValueError("cannot resume from this loader state: " + "; ".join(problems))
        assert isinstance(epoch, int) and isinstance(seen, int)
        last = legs[-1]
        here = Leg(self.world_size, self.num_workers, self.batch_size, self.drop_last, 0)
        if last.same_config(here):  # the same configuration continues its leg: batch for batch as uninterrupted
            self._legs = [g for g in legs[:-1] if g.steps]
            self._leg_start = seen - last.steps * self.batch_size * self.world_size
        else:
            self._legs = [g for g in legs if g.steps]
            self._leg_start = seen
        self.epoch, self.samples_seen = epoch, seen

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self._order()
        offsets, plan, done = self._plan(order)
        W = max(self.num_workers, 1)
        info = get_worker_info()
        if info is not None:
            if info.num_workers != W:
                raise ValueError(
                    f"StoreDataset(num_workers={self.num_workers}) is read by a DataLoader with "
                    f"num_workers={info.num_workers}; pass the DataLoader's num_workers to StoreDataset (the "
                    "order and the resume state depend on it)"
                )
            # loader batch t is rank batch done + t, which comes from consumer (done + t) % W; t % W == info.id.
            # The batch leaves narrow and is widened when the reading process unpickles it (WireBatch).
            for arrays in self._consumer(order, offsets, plan, (done + info.id) % W, done):
                # unpickled as a dict of tensors
                yield WireBatch(arrays) if self.collate_fn is None else arrays  # type: ignore[misc]
            return
        # the main process plays the W consumers in the order the DataLoader would take their batches
        consumers = [self._consumer(order, offsets, plan, w, done) for w in range(W)]
        for b in range(done, W * plan.steps):
            batch = next(consumers[b % W])
            yield widen(batch) if self.collate_fn is None else batch

    def _consumer(self, order: EpochOrder, offsets: NDArray, plan: Plan, w: int, done: int) -> Iterator[dict[str, Any]]:
        """Worker ``w``'s batches of this rank, from its first one after rank batch ``done``, through M, as
        :func:`~data.collate.collate_arrays` gives them (narrow), or as ``collate_fn`` makes them."""
        R, W, B = self.world_size, max(self.num_workers, 1), self.batch_size
        mine = np.flatnonzero((plan.consumer == self.rank + R * w) & (plan.remaining > 0))  # its blocks, by j
        starts, counts = offsets[mine], plan.remaining[mine]
        ends = np.cumsum(counts)  # its stream: the blocks' remaining tails one after another
        total = int(ends[-1]) if len(ends) else 0
        real = int(plan.batches[self.rank + R * w])
        loaded: dict[int, ShardData] = {}  # decoded shards of the current block only
        block = -1
        last: tuple[dict[str, NDArray], int] | None = None  # (owned copy, index) of the latest example
        for t in range(max(-(-(done - w) // W), 0), plan.steps):
            if t >= real:  # lockstep: a stand-in, weight 0
                loaded.clear()
                if last is None:
                    last = self._stand_in(order)
                examples, indices, weight = [last[0]], np.array([last[1]]), np.zeros(1, np.float32)
            else:
                pos = np.arange(t * B, min((t + 1) * B, total), dtype=np.int64)
                which = np.searchsorted(ends, pos, side="right")  # index into mine of each position
                examples, parts = [], []
                for q in np.unique(which).tolist():
                    j = int(mine[q])
                    if j != block:  # drop the old block first; what this batch took from it gets copied
                        examples = [_copy(ex) for ex in examples]
                        loaded.clear()
                        block = j
                    sel = pos[which == q] - (ends[q] - counts[q]) + starts[q]
                    idx = order.block_indices(j)[sel]
                    examples += self._examples(order, loaded, idx)
                    parts.append(idx)
                indices, weight = np.concatenate(parts), np.ones(len(pos), np.float32)
                last = (_copy(examples[-1]), int(indices[-1]))
            if self.collate_fn is None:
                batch: dict[str, Any] = collate_arrays(examples, self.task)
                batch["index"] = indices.astype(np.int64, copy=False)
                batch["example_weight"] = weight
            else:  # a caller's collate (cross-tokenizer training's): its tensors go out as it made them
                batch = self.collate_fn(examples, self.task)
                batch["index"] = torch.from_numpy(indices)
                batch["example_weight"] = torch.from_numpy(weight)
            yield batch

    def _examples(self, order: EpochOrder, loaded: dict[int, ShardData], indices: NDArray) -> list[dict[str, NDArray]]:
        """The examples at store-order ``indices`` of one block, decoding its shards into ``loaded`` as needed."""
        shards, rows = order.shard_of(indices)
        if self._rows is not None:  # the split's r-th example of a shard is its row self._rows[s][r]
            rows = np.array([self._rows[s][r] for s, r in zip(shards.tolist(), rows.tolist(), strict=True)])
        for s in sorted(set(shards.tolist()) - set(loaded)):
            loaded[s] = self._decode(s)
        return [loaded[s].example(r, self.task) for s, r in zip(shards.tolist(), rows.tolist(), strict=True)]

    def _decode(self, s: int) -> ShardData:
        record = self.reader.manifest.shards[self.shard_ids[s]]
        return self.reader.load_shard(record, verify=self.reader.verify)

    def _stand_in(self, order: EpochOrder) -> tuple[dict[str, NDArray], int]:
        """An example for a consumer that has none of its own: the first of the epoch's first non-empty shard."""
        s = next(int(s) for s in order.shard_order if order.shard_rows[s] > 0)
        row = int(self._rows[s][0]) if self._rows is not None else 0
        return _copy(self._decode(s).example(row, self.task)), int(order.shard_starts[s])

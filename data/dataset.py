"""The streaming training loader: collated batches from a store, deterministic, split across ranks and workers.

    ds = data.StoreDataset("stores/pydoc-top32", batch_size=8, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)   # batch_size=None: ds batches
    for epoch in range(start_epoch, epochs):
        ds.set_epoch(epoch)
        for step, batch in enumerate(loader, start=first_step):
            ...                                     # batch["input_ids"]: (B, L) int64, see `collate`
            ckpt["data"] = ds.state_dict(samples_seen=(step + 1) * batch_size * world_size)
    ds.load_state_dict(ckpt["data"])                # exact mid-epoch resume

The promises (those mosaicml/streaming makes), each tested in tests/test_dataset.py:

1. The global example order of an epoch is a function of the store, the seed and the epoch only (and of
   ``shuffle`` / ``block_shards``), never of the number of ranks or DataLoader workers. The shard order is
   permuted with a generator seeded from (seed, epoch); consecutive shards are grouped into blocks of
   ``block_shards``; example indices are shuffled within each block. That breaks shard locality while a
   process holds at most about one block of decoded shards. ``shuffle=False`` gives store order.
2. Ranks: global sample i goes to rank i % world_size; each rank batches its own sequence into batches of
   ``batch_size``. So rank r's batch b is global positions b*G + r + world_size*t (G = batch_size * world_size),
   and the ranks' batch b together are exactly the global batch b.
3. Workers: batch b of a rank is built by DataLoader worker b % num_workers. The DataLoader (``batch_size=None``)
   takes batches from its workers round-robin, which reproduces the rank's batch order exactly for any number
   of workers. A worker decodes only the shards of the blocks its batches touch.
4. Resume: ``samples_seen`` (global examples of the epoch consumed, steps * batch_size * world_size) are
   skipped exactly; the rest is split as in 2 and 3, counted from there, so nothing is missing or repeated,
   whatever the number of workers (and, when samples_seen is a multiple of the new G, the number of ranks).
5. Lockstep: every rank yields the same number of batches per epoch, as DDP needs. The last, partial global
   batch is split as evenly as 2 makes it (rank sizes differ by at most one); a rank that would get no example
   gets a batch of one example with ``example_weight`` 0, whose loss contribution must be (and, weighted, is)
   masked, so nothing is counted twice. ``drop_last=True`` drops the final partial global batch instead.
6. Every batch carries ``index`` (B,) int64, the examples' indices in store order, and ``example_weight``
   (B,) float32 (1, or 0 for the padding example of 5).
7. Held-out split: ``split="eval"`` with ``eval_fraction=f`` covers the round(f * N) examples (at least one)
   whose content keys hash lowest, ``split="train"`` the others (:func:`held_out`). The key is a hash of the
   example's tokens, so the split is the same whatever the shard size, the number of shards, ranks or workers,
   and copies of an example always land on the same side. Only the keys column of each shard is read for it.

With ``persistent_workers=True`` the workers keep the epoch they started with (they hold copies of the
dataset); call ``set_epoch`` before creating the DataLoader's iterator and leave persistent workers off.
The permutations come from numpy's PCG64 ``Generator.permutation``; numpy does not promise that stream
across major versions, so resume a run with the numpy it started with.

This is the only module of ``data`` that imports torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .manifest import Manifest
from .reader import StoreReader, open_store
from .shard import NDArray, ShardData

__all__ = ["IGNORE_INDEX", "EpochOrder", "StoreDataset", "collate", "store_fingerprint"]

# The label that torch's cross-entropy ignores by default: padding and examples without a label.
IGNORE_INDEX = -100

_STATE_FORMAT = "kd-loader-state"
_STATE_VERSION = 1
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


def store_fingerprint(manifest: Manifest) -> str:
    """A digest of a store's content and order: its task and every shard's name, row count and file SHA-256s.

    Two copies of one store share it; stores that differ in any shard (or in shard order) do not.
    """
    shards = [[s.name, s.rows, sorted((rel, f.sha256) for rel, f in s.files.items())] for s in manifest.shards]
    text = json.dumps([manifest.task, shards], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class EpochOrder:
    """The global example order of one epoch, built one block at a time (never all N indices at once).

    Args:
        shard_rows: examples per shard, in store order.
        seed, epoch: the generator seeds; each block's shuffle is seeded from (seed, epoch, block).
        shuffle: False gives store order (blocks are then consecutive shards in store order).
        block_shards: shards per block.
    """

    def __init__(self, shard_rows: Sequence[int], *, seed: int, epoch: int, shuffle: bool, block_shards: int) -> None:
        rows = np.asarray(shard_rows, dtype=np.int64).reshape(-1)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.shard_starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)  # (S + 1,) store order
        n = len(rows)
        # Distinct seed words per use ((.., 0) shard order, (.., 1, j) block j), so no two streams coincide.
        shard_order = np.random.default_rng([seed, epoch, 0]).permutation(n) if shuffle else np.arange(n)
        self.blocks = [shard_order[i : i + block_shards] for i in range(0, n, block_shards)]
        self.block_starts = np.concatenate([[0], np.cumsum([rows[b].sum() for b in self.blocks])]).astype(np.int64)
        self.shard_block = np.zeros(n, dtype=np.int64)  # (S,): the block each shard belongs to
        for j, block in enumerate(self.blocks):
            self.shard_block[block] = j
        self._cache: dict[int, NDArray] = {}

    def __len__(self) -> int:
        return int(self.block_starts[-1])

    def block_indices(self, j: int) -> NDArray:
        """Store-order indices of block ``j``'s examples, in epoch order: (rows in block,) int64."""
        if j not in self._cache:
            starts = self.shard_starts
            idx = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in self.blocks[j]]).astype(np.int64)
            if self.shuffle:
                idx = np.random.default_rng([self.seed, self.epoch, 1, j]).permutation(idx)
            if len(self._cache) >= 2:  # positions only move forward: the two latest blocks are all we reuse
                self._cache.pop(next(iter(self._cache)))
            self._cache[j] = idx
        return self._cache[j]

    def indices(self, positions: NDArray) -> NDArray:
        """Store-order index of the example at each epoch position (positions ascending): same shape, int64."""
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


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StoreDataset(IterableDataset[dict[str, torch.Tensor]]):
    """Collated batches of a store's examples for one rank, in the deterministic epoch order (see module doc).

    Use it with ``DataLoader(ds, batch_size=None, num_workers=W)``: it batches and collates itself.

    Args:
        store: a store path or URL, or an open :class:`~data.StoreReader`.
        batch_size: examples per batch on each rank.
        seed: seeds the shuffle (>= 0).
        shuffle: shuffle shards and, within blocks, examples; False gives store order.
        block_shards: shards per shuffle block: more mixes better, costs more memory (that many decoded shards
            per worker).
        epoch: the epoch to iterate (see :meth:`set_epoch`).
        rank, world_size: this process's data-parallel rank; by default from torch.distributed when it is
            initialised, else 0 and 1. Resolved here, in the main process, because workers are not part of
            the process group.
        samples_seen: global examples of ``epoch`` already consumed; iteration starts after them.
        drop_last: drop the final partial global batch instead of splitting it over the ranks.
        shards: the store-order indices of the shards to cover; all by default. ``batch["index"]`` then counts
            examples of these shards only, in their store order.
        split: ``"all"`` (default), or ``"train"`` / ``"eval"``: the examples outside / inside the held-out
            fraction ``eval_fraction`` of the key space (see :func:`held_out`); ``batch["index"]`` then counts
            the covered examples only, in store order.
        eval_fraction: the held-out fraction for ``split``, in (0, 1).
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
        samples_seen: int = 0,
        drop_last: bool = False,
        shards: Sequence[int] | None = None,
        split: str = "all",
        eval_fraction: float = 0.0,
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
        if seed < 0 or epoch < 0 or samples_seen < 0:
            problems.append(f"seed, epoch and samples_seen must be >= 0, got {seed}, {epoch}, {samples_seen}")
        if world_size < 1 or not 0 <= rank < world_size:
            problems.append(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
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
        rows = self.reader.manifest.shards
        self._shard_rows = (
            [len(r) for r in self._rows] if self._rows is not None else [rows[i].rows for i in self.shard_ids]
        )
        self._num_examples = sum(self._shard_rows)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.block_shards = block_shards
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.fingerprint = store_fingerprint(self.reader.manifest)
        self.epoch = epoch
        self.samples_seen = samples_seen

    @property
    def num_examples(self) -> int:
        """Examples this dataset covers (all of the store's unless ``shards`` or ``split`` was given)."""
        return self._num_examples

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch from ``samples_seen`` on (the same on every rank)."""
        remaining = max(self.num_examples - self.samples_seen, 0)
        per_step = self.batch_size * self.world_size
        return remaining // per_step if self.drop_last else -(-remaining // per_step)

    def set_epoch(self, epoch: int) -> None:
        """Iterate ``epoch`` next. A new epoch starts from its beginning (a resumed ``samples_seen`` is dropped)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.samples_seen = 0
        self.epoch = epoch

    def state_dict(self, samples_seen: int) -> dict[str, Any]:
        """The loader position as a small JSON-able dict.

        Args:
            samples_seen: global examples of the current epoch consumed so far, counted from the epoch's start
                (steps * batch_size * world_size); a count past the end means the epoch is finished.
        """
        if samples_seen < 0:
            raise ValueError(f"samples_seen must be >= 0, got {samples_seen}")
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "samples_seen": min(samples_seen, self.num_examples),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "block_shards": self.block_shards,
            "shards": self.shard_ids,
            "split": self.split,
            "eval_fraction": self.eval_fraction,
            "num_examples": self.num_examples,
            "store_fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s output. Refuses a state whose order this dataset cannot reproduce.

        Raises:
            ValueError: the state is not a loader state, or comes from another store, seed, shuffle or
                block_shards (which would give another order); the message says which.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError("not a StoreDataset state (expected the dict that StoreDataset.state_dict returns)")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {_STATE_VERSION}")
        mine = self.state_dict(0)
        problems = []
        if state.get("store_fingerprint") != self.fingerprint:
            problems.append(
                f"it was saved for another store (fingerprint {str(state.get('store_fingerprint'))[:12]}, "
                f"this one is {self.fingerprint[:12]}); resume with the store the run started with"
            )
        defaults = {"split": "all", "eval_fraction": 0.0}  # states written before the split existed
        for key in ("seed", "shuffle", "block_shards", "shards", "split", "eval_fraction"):
            if state.get(key, defaults.get(key)) != mine[key]:
                problems.append(f"it has {key}={state.get(key)!r}, this dataset {key}={mine[key]!r}")
        epoch, seen = state.get("epoch"), state.get("samples_seen")
        if not isinstance(epoch, int) or not isinstance(seen, int) or epoch < 0 or seen < 0:
            problems.append(f"epoch and samples_seen must be integers >= 0, got {epoch!r} and {seen!r}")
        if problems:
            raise ValueError("cannot resume from this loader state: " + "; ".join(problems))
        assert isinstance(epoch, int) and isinstance(seen, int)
        self.epoch = epoch
        self.samples_seen = seen

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = EpochOrder(
            self._shard_rows,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
            block_shards=self.block_shards,
        )
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = len(order)
        start = min(self.samples_seen, n)
        G = self.batch_size * self.world_size
        # Decoded shards of this process; a shard leaves once no later batch of this process can need it.
        loaded: dict[int, ShardData] = {}
        for b in range(worker, len(self), num_workers):
            base = start + b * G  # first global position of global batch b
            count = min(G, n - base)
            # rank r takes positions base + r + world * t: ceil((count - r) / world) of them
            mine = max(-(-(count - self.rank) // self.world_size), 0)
            positions = base + self.rank + self.world_size * np.arange(mine, dtype=np.int64)
            weight = np.ones(mine, dtype=np.float32)
            if mine == 0:  # a short last global batch left this rank nothing: one masked stand-in keeps lockstep
                positions = np.array([base], dtype=np.int64)
                weight = np.zeros(1, dtype=np.float32)
            indices = order.indices(positions)
            shards, rows = order.shard_of(indices)
            if self._rows is not None:  # the split's r-th example of a shard is its row self._rows[s][r]
                rows = np.array([self._rows[s][r] for s, r in zip(shards.tolist(), rows.tolist(), strict=True)])
            self._load(order, loaded, shards)
            examples = [loaded[s].example(r, self.task) for s, r in zip(shards.tolist(), rows.tolist(), strict=True)]
            batch = collate(examples, self.task)
            batch["index"] = torch.from_numpy(indices)
            batch["example_weight"] = torch.from_numpy(weight)
            yield batch

    def _load(self, order: EpochOrder, loaded: dict[int, ShardData], needed: NDArray) -> None:
        """Make every shard in ``needed`` decoded in ``loaded``, dropping shards of blocks that are behind us."""
        wanted = set(needed.tolist())
        newest_block = int(order.shard_block[needed].max())
        for s in [s for s in loaded if s not in wanted and order.shard_block[s] < newest_block]:
            del loaded[s]
        for s in sorted(wanted - set(loaded)):
            record = self.reader.manifest.shards[self.shard_ids[s]]
            loaded[s] = self.reader.load_shard(record, verify=self.reader.verify)


# ---------------------------------------------------------------- collation


def collate(examples: list[dict[str, NDArray]], task: str) -> dict[str, torch.Tensor]:
    """Pad and stack examples (dicts as :meth:`ShardData.example` returns them) into a batch of tensors.

    B examples, L = the longest input in the batch, K kept ids per position. Padding holds 0 (ids, log-probs,
    tail mass); ``position_mask`` says which positions are real.

    Every task:
        input_ids: (B, L) int64, padded with 0.
        attention_mask: (B, L) int64, 1 on real tokens.

    causal-lm (target position i is the distribution of token i + 1, so it aligns with the student's
    ``logits[:, i]``, i.e. ``logits[:, :-1]`` as a whole):
        target_ids: (B, L-1, K) int64; target_logprobs: (B, L-1, K) float32; tail_mass: (B, L-1) float32.
        position_mask: (B, L-1) bool, False on padding.
        labels: (B, L-1) int64: ``input_ids[:, 1:]``, -100 on padding.

    masked-lm (P = most masked positions of an example in the batch):
        positions: (B, P) int64: each target's index in its example, 0 on padding.
        target_ids: (B, P, K) int64; target_logprobs: (B, P, K) float32; tail_mass: (B, P) float32.
        position_mask: (B, P) bool; labels: (B, P) int64, the original tokens, -100 on padding.

    seq-cls:
        target_ids: (B, K) int64; target_logprobs: (B, K) float32; tail_mass: (B,) float32.
        position_mask: (B,) bool, all True; labels: (B,) int64, -100 where the store holds no (or a -1) label.

    Sampled stores (examples with ``target_counts``): K is U, the most unique ids of any position in the batch;
    ``target_ids`` holds each position's ids padded with 0, ``target_logprobs`` log(count / num_samples) (-inf on
    padding), ``tail_mass`` 0, and an extra ``target_mask`` (B, L-1 | P, U) bool ((B, U) for seq-cls) says which
    slots are real; pass it to the losses.

    Hybrid stores (examples with ``tail_counts``): K is k + U, U the most unique tail ids of any position in the
    batch. Slots [0, k) hold the top-k ids and their exact log-probs; slots [k, k + U) the position's tail ids and
    log(tail_mass * count / num_samples) (padded with id 0 and -inf), the unbiased estimate of the teacher's
    probability of each drawn id; ``target_mask`` (True on the k head slots and the real tail slots) says which
    are real. ``tail_mass`` is then 0: the draws carry the tail's mass, so the losses must not add a tail bin.

    Ids are widened to int64 (what embedding lookups, gather and cross-entropy take) and log-probs to float32
    here, once per batch, each while copying into its padded array.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    lengths = np.fromiter((len(ex["input_ids"]) for ex in examples), dtype=np.int64, count=len(examples))
    input_ids = _pad([ex["input_ids"] for ex in examples], lengths, np.int64)  # (B, L)
    L = input_ids.shape[1]
    batch: dict[str, NDArray] = {
        "input_ids": input_ids,
        "attention_mask": (np.arange(L) < lengths[:, None]).astype(np.int64),
    }
    hybrid = "tail_counts" in examples[0]
    if "target_counts" in examples[0]:
        batch |= _sampled_targets(examples, task)
    elif hybrid:
        batch |= _hybrid_targets(examples, task)
    if task == "seq-cls":
        labels = np.full(len(examples), IGNORE_INDEX, dtype=np.int64)
        if "label" in examples[0]:
            labels = np.concatenate([ex["label"] for ex in examples]).astype(np.int64)
            labels[labels < 0] = IGNORE_INDEX
        if "target_mask" not in batch:
            batch |= {
                "target_ids": np.concatenate([ex["target_ids"] for ex in examples]).astype(np.int64),
                "target_logprobs": np.concatenate([ex["target_logprobs"] for ex in examples]).astype(np.float32),
            }
        batch |= {
            "tail_mass": np.concatenate([ex["tail_mass"] for ex in examples]).astype(np.float32),
            "position_mask": np.ones(len(examples), dtype=bool),
            "labels": labels,
        }
    elif task in ("causal-lm", "masked-lm"):
        counts = np.fromiter((len(ex["tail_mass"]) for ex in examples), dtype=np.int64, count=len(examples))
        position_mask = np.arange(counts.max()) < counts[:, None]  # (B, P)
        if task == "causal-lm":
            labels = input_ids[:, 1:].copy()  # (B, L-1): position i's hard label is token i + 1
        else:
            labels = _pad([ex["label"] for ex in examples], counts, np.int64)
            batch["positions"] = _pad([ex["positions"] for ex in examples], counts, np.int64)
        labels[~position_mask] = IGNORE_INDEX
        if "target_mask" not in batch:
            batch |= {
                "target_ids": _pad([ex["target_ids"] for ex in examples], counts, np.int64),
                "target_logprobs": _pad([ex["target_logprobs"] for ex in examples], counts, np.float32),
            }
        batch |= {
            "tail_mass": _pad([ex["tail_mass"] for ex in examples], counts, np.float32),
            "position_mask": position_mask,
            "labels": labels,
        }
    else:
        raise ValueError(f"collate: unknown task {task!r} (expected causal-lm, masked-lm or seq-cls)")
    if hybrid:  # the tail's mass is in the drawn slots (see above); a tail bin would count it twice
        batch["tail_mass"] = np.zeros_like(batch["tail_mass"])
    return {name: torch.from_numpy(arr) for name, arr in batch.items()}


def _ragged(examples: list[dict[str, NDArray]], prefix: str) -> tuple[NDArray, NDArray]:
    """The ``<prefix>_ids`` / ``<prefix>_counts`` of each position, padded to (B, P, U) int64 ids and float32
    counts (0 on padding slots), U the most entries of any position (at least 1 for "target")."""
    offsets = [ex[f"{prefix}_offsets"].astype(np.int64, copy=False) for ex in examples]
    per_position = [np.diff(o) for o in offsets]  # (P_b,) unique ids of each position
    P = max(len(n) for n in per_position)
    U = max((int(n.max()) for n in per_position if n.size), default=1 if prefix == "target" else 0)
    ids = np.zeros((len(examples), P, U), dtype=np.int64)
    counts = np.zeros((len(examples), P, U), dtype=np.float32)
    for b, (ex, off, n) in enumerate(zip(examples, offsets, per_position, strict=True)):
        pos = np.repeat(np.arange(len(n)), n)  # (U_b,) the position of each entry
        slot = np.arange(int(off[-1])) - np.repeat(off[:-1], n)  # (U_b,) its slot within the position
        ids[b, pos, slot] = ex[f"{prefix}_ids"]
        counts[b, pos, slot] = ex[f"{prefix}_counts"]
    return ids, counts


def _hybrid_targets(examples: list[dict[str, NDArray]], task: str) -> dict[str, NDArray]:
    """Hybrid targets: the top-k slots, then the tail's drawn ids weighted by tail_mass * count / num_samples,
    padded to (B, P, k + U) (seq-cls: (B, k + U)); see :func:`collate`."""
    lengths = np.fromiter((len(ex["tail_mass"]) for ex in examples), dtype=np.int64, count=len(examples))
    head_ids = _pad([ex["target_ids"] for ex in examples], lengths, np.int64)  # (B, P, k)
    head_lp = _pad([ex["target_logprobs"] for ex in examples], lengths, np.float32)  # (B, P, k)
    tail = _pad([ex["tail_mass"] for ex in examples], lengths, np.float64)  # (B, P)
    ids, counts = _ragged(examples, "tail")  # (B, P, U)
    mask = counts > 0
    total = counts.sum(axis=-1, keepdims=True)  # (B, P, 1): num_samples where the tail has draws, else 0
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = tail[..., None] * counts / np.maximum(total, 1.0)  # float64: a tiny tail stays above 0
        logprobs = np.where(mask, np.log(weight), -np.inf).astype(np.float32)
    out: dict[str, NDArray] = {
        "target_ids": np.concatenate([head_ids, ids], axis=-1),
        "target_logprobs": np.concatenate([head_lp, logprobs], axis=-1),
        "target_mask": np.concatenate([np.ones(head_ids.shape, dtype=bool), mask], axis=-1),
    }
    return {k: v[:, 0] for k, v in out.items()} if task == "seq-cls" else out


def _sampled_targets(examples: list[dict[str, NDArray]], task: str) -> dict[str, NDArray]:
    """Sampled targets, ragged per position, padded to (B, P, U) (seq-cls: (B, U)); see :func:`collate`."""
    ids, counts = _ragged(examples, "target")
    mask = counts > 0
    total = counts.sum(axis=-1, keepdims=True)  # (B, P, 1): num_samples on real positions, 0 on padding
    with np.errstate(divide="ignore", invalid="ignore"):
        logprobs = np.where(mask, np.log(counts / np.maximum(total, 1.0)), -np.inf).astype(np.float32)
    out: dict[str, NDArray] = {"target_ids": ids, "target_logprobs": logprobs, "target_mask": mask}
    return {k: v[:, 0] for k, v in out.items()} if task == "seq-cls" else out


def _pad(parts: list[NDArray], lengths: NDArray, dtype: type) -> NDArray:
    """Stack ragged (n_b, ...) arrays into a zero-padded (B, max n_b, ...) array of ``dtype``.

    One slice assignment per example: the dtype conversion happens in the copy, with no temporary.
    """
    out = np.zeros((len(parts), int(lengths.max()), *parts[0].shape[1:]), dtype=dtype)
    for b, part in enumerate(parts):
        out[b, : len(part)] = part
    return out

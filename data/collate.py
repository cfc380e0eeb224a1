"""Collation: a list of examples (as :meth:`ShardData.example` returns them) into one batch of padded tensors.

Used by :class:`data.dataset.StoreDataset`; with it, the only modules of ``data`` that import torch.
"""

from __future__ import annotations

from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch

from .shard import NDArray
from .wire_slots import reduce_to_slot

__all__ = ["IGNORE_INDEX", "WIDE_DTYPES", "WireBatch", "collate", "collate_arrays", "widen"]

# The label that torch's cross-entropy ignores by default: padding and examples without a label.
IGNORE_INDEX = -100

# The batch fields that :func:`collate_arrays` leaves as stored (ids uint16/uint32, log-probs float16 or float32,
# the attention mask bool) and their public dtypes, given by :func:`widen`. They hold ~95% of a top-k batch's
# bytes: int64 ids and float32 log-probs are 12 bytes a kept id against 4 as stored, so a DataLoader worker sends
# the narrow arrays and the receiving process widens them (data/dataset.py, ``WireBatch``).
WIDE_DTYPES: dict[str, torch.dtype] = {
    "input_ids": torch.int64,
    "attention_mask": torch.int64,
    "target_ids": torch.int64,
    "target_logprobs": torch.float32,
}


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
    once per batch: ``widen(collate_arrays(examples, task))``.
    """
    return widen(collate_arrays(examples, task))


def collate_arrays(examples: list[dict[str, NDArray]], task: str) -> dict[str, NDArray]:
    """:func:`collate`'s batch as numpy arrays, the fields of :data:`WIDE_DTYPES` in their stored dtypes.

    ``input_ids`` and ``target_ids`` keep the store's id dtype, ``target_logprobs`` its log-prob dtype (sampled
    and hybrid targets, computed here, are int64 / float32 already) and ``attention_mask`` is bool; every other
    field has its public dtype. Padding as in :func:`collate`.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    lengths = np.fromiter((len(ex["input_ids"]) for ex in examples), dtype=np.int64, count=len(examples))
    input_ids = _pad([ex["input_ids"] for ex in examples], lengths, examples[0]["input_ids"].dtype)  # (B, L)
    L = input_ids.shape[1]
    batch: dict[str, NDArray] = {
        "input_ids": input_ids,
        "attention_mask": np.arange(L) < lengths[:, None],  # (B, L) bool
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
                "target_ids": np.concatenate([ex["target_ids"] for ex in examples]),
                "target_logprobs": np.concatenate([ex["target_logprobs"] for ex in examples]),
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
            labels = input_ids[:, 1:].astype(np.int64)  # (B, L-1): position i's hard label is token i + 1
        else:
            labels = _pad([ex["label"] for ex in examples], counts, np.int64)
            batch["positions"] = _pad([ex["positions"] for ex in examples], counts, np.int64)
        labels[~position_mask] = IGNORE_INDEX
        if "target_mask" not in batch:
            batch |= {
                "target_ids": _pad([ex["target_ids"] for ex in examples], counts, examples[0]["target_ids"].dtype),
                "target_logprobs": _pad(
                    [ex["target_logprobs"] for ex in examples], counts, examples[0]["target_logprobs"].dtype
                ),
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
    return batch


def widen(batch: dict[str, NDArray]) -> dict[str, torch.Tensor]:
    """:func:`collate_arrays`'s batch as tensors of the public dtypes (:data:`WIDE_DTYPES`; the other fields as
    they are, sharing memory with the arrays)."""
    out = {}
    for name, arr in batch.items():
        if not arr.dtype.isnative:  # torch takes native byte order only
            arr = arr.astype(arr.dtype.newbyteorder("="))
        t = torch.from_numpy(arr)
        # torch's casts, not numpy's: numpy converts float16 element by element, ~10x slower
        out[name] = t.to(WIDE_DTYPES[name]) if name in WIDE_DTYPES else t
    return out


class WireBatch:
    """A collated batch (:func:`collate_arrays`) on its way out of a DataLoader worker: pickled as one buffer of
    its narrow arrays, unpickled as :func:`widen`'s dict of tensors.

    Why: torch sends each tensor a worker yields through its own shared-memory file whose descriptor the
    receiving process fetches from the worker in a socket handshake, per tensor and per batch (BENCHMARKS 3b').
    One buffer of the stored dtypes, about a third of the widened bytes at k=32, goes instead into a
    shared-memory slot of the worker's (:mod:`data.wire_slots`, only when a DataLoader worker's queue pickles it;
    through the pipe, in-band, where no slot can be had); plain ``pickle`` and ``copy`` always take it in-band.
    The receiving process (the main one, or its pin-memory thread) widens it. The
    DataLoader's default ``collate_fn`` (``default_convert``) passes it through untouched; a custom
    ``collate_fn`` receives it and can call :meth:`tensors`.
    """

    __slots__ = ("arrays",)

    def __init__(self, arrays: dict[str, NDArray]) -> None:
        self.arrays = arrays

    def tensors(self) -> dict[str, torch.Tensor]:
        """The batch as the dict of tensors that :func:`collate` returns."""
        return widen(self.arrays)

    def layout(self) -> tuple[list[tuple[str, str, tuple[int, ...], int]], int]:
        """Each array's (name, dtype, shape, byte offset) in one buffer, and the buffer's size."""
        layout, offset = [], 0
        for name, arr in self.arrays.items():
            layout.append((name, arr.dtype.str, arr.shape, offset))
            offset += -(-arr.nbytes // _ALIGN) * _ALIGN  # each array starts aligned for any dtype
        return layout, offset

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """In-band: the arrays in one buffer (plain pickle and copy; a DataLoader queue first tries a slot)."""
        layout, size = self.layout()
        buffer = bytearray(size)
        for (_, dtype, shape, start), arr in zip(layout, self.arrays.values(), strict=True):
            np.frombuffer(buffer, dtype, arr.size, start).reshape(shape)[...] = arr
        return _unpack, (layout, buffer)


def _reduce_for_queue(batch: WireBatch) -> tuple[Any, tuple[Any, ...]]:
    """How multiprocessing's ForkingPickler (a DataLoader worker's result queue) sends a WireBatch: through a
    shared-memory slot in a DataLoader worker (:mod:`data.wire_slots`), otherwise in-band."""
    layout, size = batch.layout()
    return reduce_to_slot(batch.arrays, layout, size) or batch.__reduce__()


ForkingPickler.register(WireBatch, _reduce_for_queue)  # plain pickle and copy.deepcopy stay in-band

_ALIGN = 16


def _unpack(layout: list[tuple[str, str, tuple[int, ...], int]], buffer: bytearray) -> dict[str, torch.Tensor]:
    """A pickled :class:`WireBatch`, widened: the arrays are views of ``buffer`` (writable, owned by them)."""
    arrays = {}
    for name, dtype, shape, start in layout:
        count = int(np.prod(shape))
        arrays[name] = np.frombuffer(buffer, dtype, count, start).reshape(shape) if count else np.zeros(shape, dtype)
    return widen(arrays)


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


def _pad(parts: list[NDArray], lengths: NDArray, dtype: Any) -> NDArray:
    """Stack ragged (n_b, ...) arrays into a zero-padded (B, max n_b, ...) array of ``dtype``.

    One slice assignment per example: the dtype conversion happens in the copy, with no temporary.
    """
    out = np.zeros((len(parts), int(lengths.max()), *parts[0].shape[1:]), dtype=dtype)
    for b, part in enumerate(parts):
        out[b, : len(part)] = part
    return out

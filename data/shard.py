"""One shard's content as flat (ragged) numpy arrays, the same for every backend.

A shard holds R examples. Their tokens are concatenated into one axis of length T and their labelled positions
into one axis of length P; ``token_offsets`` and ``position_offsets`` (R + 1 each) say where each example
starts. Flat arrays let a reader slice an example with two offsets and no Python loop, and let a backend
compress each column with filters that suit it.

Per-token alignment (causal-lm): an example of L input tokens has L - 1 positions; position i holds the
teacher's distribution for the *next* token, p(x[i+1] | x[0..i]), so its hard label is ``input_ids[i + 1]``.
masked-lm: one position per masked token; ``positions`` gives its index in the example, ``labels`` the original
token. seq-cls: one position per example; ``labels`` holds the class (or is absent).

Sampled stores (``targets.method == "sample"``) replace the (P, K) target columns by a third ragged axis of U
entries, one per (position, unique sampled id): ``target_ids`` (U,), ``target_counts`` (U,) and
``target_offsets`` (P + 1,); position p's ids are ``target_ids[target_offsets[p]:target_offsets[p + 1]]``, sorted
ascending, and their counts sum to ``num_samples``. They have no ``target_logprobs``; ``tail_mass`` is all 0.

Hybrid stores (``targets.method == "hybrid"``) hold every top-k column, plus the draws from each position's tail
as the same kind of ragged axis: ``tail_ids`` (U,), ``tail_counts`` (U,) and ``tail_offsets`` (P + 1,); a
position's tail ids are ascending, none of them among its top-k ids, and their counts sum to ``num_samples``,
except at a position whose ``tail_mass`` is exactly 0, which holds no draws.

Stores labelled with ``--spans`` (causal-lm, what cross-tokenizer training needs) add each example's source text
and where each input token lies in it: ``text`` (X,) uint8, the examples' texts as UTF-8 bytes, concatenated;
``text_offsets`` (R + 1,) int64; ``token_spans`` (T, 2) int32, input token t's half-open byte range
``[start, end)`` in its example's text (a special token the tokenizer added has an empty range).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import CorruptShardError
from .manifest import TargetSpec
from .values import check_values

__all__ = ["ShardBuilder", "ShardData", "example_key"]

NDArray = npt.NDArray[Any]

# Column name -> axis it runs along ("rows", "rows+1", "tokens", "positions").
COLUMNS: dict[str, str] = {
    "input_ids": "tokens",
    "token_offsets": "rows+1",
    "position_offsets": "rows+1",
    "target_ids": "positions",
    "target_logprobs": "positions",  # top-k stores only
    "target_counts": "entries",  # sampled stores only: (U,) ragged, one entry per (position, unique id)
    "target_offsets": "positions+1",  # sampled stores only
    "tail_ids": "entries",  # hybrid stores only: (U,) ragged, one entry per (position, unique tail id)
    "tail_counts": "entries",  # hybrid stores only
    "tail_offsets": "positions+1",  # hybrid stores only
    "tail_mass": "positions",
    "keys": "rows",
    "labels": "labels",  # rows (seq-cls) or positions (masked-lm)
    "positions": "positions",  # masked-lm only
    "text": "text",  # stores labelled with spans only: (X,) uint8, each example's source text as UTF-8
    "text_offsets": "rows+1",  # stores with spans only
    "token_spans": "tokens",  # stores with spans only: (T, 2) int32, each input token's byte span in its text
}


def example_key(input_ids: npt.ArrayLike) -> bytes:
    """The stable content key of an example: BLAKE2b-128 of its input ids as little-endian uint32."""
    return hashlib.blake2b(np.asarray(input_ids, dtype="<u4").tobytes(), digest_size=16).digest()


@dataclass
class ShardData:
    """A shard's arrays. Shapes: R rows, T tokens, P positions, K kept ids per position.

    Sampled stores: U entries (position, unique id), see the module docstring.

    Attributes:
        input_ids: (T,) id dtype: every example's input tokens, concatenated.
        token_offsets: (R + 1,) int64: example r's tokens are ``input_ids[token_offsets[r]:token_offsets[r+1]]``.
        position_offsets: (R + 1,) int64: the same for the position axis.
        target_ids: (P, K) id dtype: kept ids, most probable first. Sampled: (U,) the unique sampled ids.
        target_logprobs: (P, K) ``targets.logprob_dtype`` (the value dtype; float32 for q8): log softmax(logits / T)
            over the full vocabulary at those ids, decoded (backends read and write the stored encoding,
            see data/codecs.py). None for sampled stores.
        tail_mass: (P,) float32: 1 - sum of the kept probabilities, from the unquantised values.
        keys: (R, 16) uint8: content key of each example (:func:`example_key`).
        labels: (R,) int64 for seq-cls, (P,) id dtype for masked-lm, None where the task stores none.
        positions: (P,) int32 for masked-lm: index of each position within its example; None otherwise.
        target_counts: sampled stores: (U,) ``targets.count_dtype``: how often each id was drawn (>= 1).
        target_offsets: sampled stores: (P + 1,) int64: position p's entries are
            ``[target_offsets[p], target_offsets[p + 1])``.
        tail_ids: hybrid stores: (U,) id dtype: the unique ids drawn from each position's tail (the teacher's
            distribution restricted to the ids not in its top-k), ascending within a position.
        tail_counts: hybrid stores: (U,) ``targets.count_dtype``: how often each tail id was drawn (>= 1).
        tail_offsets: hybrid stores: (P + 1,) int64: position p's tail entries are
            ``[tail_offsets[p], tail_offsets[p + 1])``.
        text: stores with spans: (X,) uint8: every example's source text as UTF-8, concatenated.
        text_offsets: stores with spans: (R + 1,) int64: example r's text is ``text[text_offsets[r]:...[r+1]]``.
        token_spans: stores with spans: (T, 2) int32: each input token's byte range [start, end) in its text.
    """

    input_ids: NDArray
    token_offsets: NDArray
    position_offsets: NDArray
    target_ids: NDArray
    target_logprobs: NDArray | None
    tail_mass: NDArray
    keys: NDArray
    labels: NDArray | None = None
    positions: NDArray | None = None
    target_counts: NDArray | None = None
    target_offsets: NDArray | None = None
    tail_ids: NDArray | None = None
    tail_counts: NDArray | None = None
    tail_offsets: NDArray | None = None
    text: NDArray | None = None
    text_offsets: NDArray | None = None
    token_spans: NDArray | None = None

    @property
    def rows(self) -> int:
        return int(self.keys.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_positions(self) -> int:
        return int(self.tail_mass.shape[0])

    @property
    def num_entries(self) -> int | None:
        """Sampled shards: U, the (position, unique id) entries; hybrid shards: the (position, unique tail id)
        entries; None for top-k shards."""
        counts = self.target_counts if self.target_counts is not None else self.tail_counts
        return None if counts is None else int(counts.shape[0])

    @property
    def text_bytes(self) -> int | None:
        """Stores with spans: X, the bytes of the shard's source texts; None otherwise."""
        return None if self.text is None else int(self.text.shape[0])

    def columns(self) -> dict[str, NDArray]:
        """The arrays that exist, by column name."""
        out = {name: getattr(self, name) for name in COLUMNS}
        return {k: v for k, v in out.items() if v is not None}

    def example(self, r: int, task: str) -> dict[str, NDArray]:
        """Example ``r`` as the public dict of numpy arrays (views, no copies)."""
        t0, t1 = int(self.token_offsets[r]), int(self.token_offsets[r + 1])
        p0, p1 = int(self.position_offsets[r]), int(self.position_offsets[r + 1])
        ex: dict[str, NDArray] = {"input_ids": self.input_ids[t0:t1]}
        if self.target_offsets is not None and self.target_counts is not None:  # sampled: (U_e,) and (P_e + 1,)
            off = self.target_offsets[p0 : p1 + 1]
            e0, e1 = int(off[0]), int(off[-1])
            ex["target_ids"] = self.target_ids[e0:e1]
            ex["target_counts"] = self.target_counts[e0:e1]
            ex["target_offsets"] = off - e0  # a new (P_e + 1,) array starting at 0
        else:
            assert self.target_logprobs is not None
            ex["target_ids"] = self.target_ids[p0:p1]
            ex["target_logprobs"] = self.target_logprobs[p0:p1]
        if self.tail_offsets is not None and self.tail_ids is not None and self.tail_counts is not None:
            off = self.tail_offsets[p0 : p1 + 1]  # hybrid: (P_e + 1,)
            e0, e1 = int(off[0]), int(off[-1])
            ex["tail_ids"] = self.tail_ids[e0:e1]
            ex["tail_counts"] = self.tail_counts[e0:e1]
            ex["tail_offsets"] = off - e0  # a new (P_e + 1,) array starting at 0
        ex["tail_mass"] = self.tail_mass[p0:p1]
        if self.text is not None and self.text_offsets is not None and self.token_spans is not None:
            ex["text"] = self.text[int(self.text_offsets[r]) : int(self.text_offsets[r + 1])]  # (X_e,) uint8
            ex["token_spans"] = self.token_spans[t0:t1]  # (L, 2) int32
        ex["key"] = self.keys[r]
        if task == "causal-lm":
            ex["label"] = self.input_ids[t0 + 1 : t1]
        elif task == "masked-lm":
            assert self.labels is not None and self.positions is not None
            ex["label"] = self.labels[p0:p1]
            ex["positions"] = self.positions[p0:p1]
        elif self.labels is not None:
            ex["label"] = self.labels[r : r + 1]
        return ex

    def validate(self, task: str, targets: TargetSpec, vocab_size: int, where: str) -> None:
        """Check shapes, dtypes and offsets against the task and target spec; raise CorruptShardError.

        Called on every shard a reader opens and every shard a writer commits, so that a malformed shard from
        another team is refused before any example is served.
        """

        def bad(msg: str) -> CorruptShardError:
            return CorruptShardError(f"{where}: {msg}")

        R, T, P, K = self.rows, self.tokens, self.num_positions, targets.k
        expect: dict[str, tuple[tuple[int, ...], str]] = {
            "input_ids": ((T,), targets.id_dtype),
            "token_offsets": ((R + 1,), "int64"),
            "position_offsets": ((R + 1,), "int64"),
            "target_ids": ((P, K), targets.id_dtype),
            "target_logprobs": ((P, K), targets.logprob_dtype),
            "tail_mass": ((P,), "float32"),
            "keys": ((R, 16), "uint8"),
        }
        U = int(self.target_counts.shape[0]) if self.target_counts is not None else 0
        if targets.sampled:
            del expect["target_logprobs"]
            expect |= {
                "target_ids": ((U,), targets.id_dtype),
                "target_counts": ((U,), targets.count_dtype),
                "target_offsets": ((P + 1,), "int64"),
            }
            if self.target_logprobs is not None:
                raise bad("a sampled store has no 'target_logprobs' column")
        elif self.target_counts is not None or self.target_offsets is not None:
            raise bad("'target_counts' and 'target_offsets' belong to sampled stores only")
        tails = (self.tail_ids, self.tail_counts, self.tail_offsets)
        if targets.hybrid:
            U = int(self.tail_counts.shape[0]) if self.tail_counts is not None else 0
            expect |= {
                "tail_ids": ((U,), targets.id_dtype),
                "tail_counts": ((U,), targets.count_dtype),
                "tail_offsets": ((P + 1,), "int64"),
            }
        elif any(t is not None for t in tails):
            raise bad("'tail_ids', 'tail_counts' and 'tail_offsets' belong to hybrid stores only")
        source = (self.text, self.text_offsets, self.token_spans)
        if any(c is not None for c in source):
            X = int(self.text.shape[0]) if self.text is not None else 0
            expect |= {"text": ((X,), "uint8"), "text_offsets": ((R + 1,), "int64"), "token_spans": ((T, 2), "int32")}
        if task == "masked-lm":
            expect["labels"] = ((P,), targets.id_dtype)
            expect["positions"] = ((P,), "int32")
        elif task == "seq-cls" and self.labels is not None:
            expect["labels"] = ((R,), "int64")
        for name, (shape, dtype) in expect.items():
            arr = getattr(self, name)
            if arr is None:
                raise bad(f"column '{name}' is missing")
            if tuple(arr.shape) != shape or arr.dtype != np.dtype(dtype):
                raise bad(f"column '{name}' is {arr.dtype}{tuple(arr.shape)}, expected {dtype}{shape}")
        offsets = [("token_offsets", T), ("position_offsets", P)]
        if self.text is not None:
            offsets.append(("text_offsets", int(self.text.shape[0])))
        for name, total in offsets:
            off = getattr(self, name)
            falls = np.diff(off) < 0
            if off[0] != 0 or off[-1] != total or np.any(falls):
                r = int(np.argmax(falls))
                found = (
                    f"falls from {int(off[r])} to {int(off[r + 1])} at example {r}"
                    if falls.any()
                    else (f"runs from {int(off[0])} to {int(off[-1])}")
                )
                raise bad(f"'{name}' {found}; expected a non-decreasing run from 0 to {total}")
        per_row = np.diff(self.position_offsets)
        if task == "seq-cls" and np.any(per_row != 1):
            r = int(np.argmax(per_row != 1))
            raise bad(f"example {r} has {int(per_row[r])} positions; a per-example store must have exactly one per row")
        if task == "causal-lm":
            want = np.maximum(np.diff(self.token_offsets) - 1, 0)
            if np.any(per_row != want):
                r = int(np.argmax(per_row != want))
                raise bad(
                    f"example {r} has {int(want[r]) + 1} tokens and {int(per_row[r])} positions; a causal-lm example "
                    "of L tokens must have L - 1 positions"
                )
        if task == "seq-cls" and self.labels is not None and R:
            lab = self.labels
            wrong = (lab < -1) | (lab >= targets.num_classes)
            if np.any(wrong):
                r = int(np.argmax(wrong))
                raise bad(f"example {r}: label {int(lab[r])}; expected a label in [-1, {targets.num_classes})")
        if task == "masked-lm" and P:
            assert self.positions is not None
            lengths = np.repeat(np.diff(self.token_offsets), per_row)
            wrong = (self.positions < 0) | (self.positions >= lengths)
            if np.any(wrong):
                p = int(np.argmax(wrong))
                r = int(np.searchsorted(self.position_offsets, p, side="right")) - 1
                raise bad(
                    f"example {r}, position {p - int(self.position_offsets[r])}: masked position "
                    f"{int(self.positions[p])} is outside its example of {int(lengths[p])} tokens"
                )
        # ids, log-probs, tail and sampled counts: data/values.py
        check_values(self, task, targets, vocab_size, where)


class ShardBuilder:
    """Accumulates labelled examples and produces a :class:`ShardData` in one go.

    Args:
        task: the store's task.
        targets: the store's target spec (fixes K and the dtypes).
    """

    def __init__(self, task: str, targets: TargetSpec) -> None:
        self.task = task
        self.targets = targets
        self._reset()

    def _reset(self) -> None:
        self._parts: dict[str, list[NDArray]] = {name: [] for name in COLUMNS}
        self._rows = 0
        self._tokens = 0
        self._sources = 0

    def __len__(self) -> int:
        return self._rows

    @property
    def tokens(self) -> int:
        return self._tokens

    def add(
        self,
        input_ids: npt.ArrayLike,
        target_ids: npt.ArrayLike,
        target_logprobs: npt.ArrayLike,
        tail_mass: npt.ArrayLike,
        label: npt.ArrayLike | None = None,
        positions: npt.ArrayLike | None = None,
    ) -> None:
        """Add one example. ``target_*`` are (P, K); ``tail_mass`` is (P,). Values are cast to the store dtypes.

        q8 stores keep the log-probs in float32 here: the writer quantises them, and measures the KL divergence
        that costs, at commit.
        """
        t = self.targets
        if t.sampled or t.hybrid:
            raise ValueError(f"a {t.method} store takes add_{t.method}(...), not add(...)")
        ids = np.asarray(input_ids).astype(t.id_dtype, copy=False).reshape(-1)
        tid = np.asarray(target_ids).astype(t.id_dtype, copy=False).reshape(-1, t.k)
        tlp = np.asarray(target_logprobs).astype(t.logprob_dtype, copy=False).reshape(-1, t.k)
        tail = np.asarray(tail_mass).astype(np.float32, copy=False).reshape(-1)
        self._parts["target_ids"].append(tid)
        self._parts["target_logprobs"].append(tlp)
        self._add_example(ids, tail, label, positions)

    def add_sampled(
        self,
        input_ids: npt.ArrayLike,
        target_ids: npt.ArrayLike,
        target_counts: npt.ArrayLike,
        target_offsets: npt.ArrayLike,
        label: npt.ArrayLike | None = None,
        positions: npt.ArrayLike | None = None,
    ) -> None:
        """Add one example of a sampled store: ``target_ids`` and ``target_counts`` (U_e,), the unique ids of each
        position (ascending) and their counts; ``target_offsets`` (P_e + 1,) from 0, as in the example dict."""
        t = self.targets
        if not t.sampled:
            raise ValueError(f"add_sampled(...) is for sampled stores; this one's method is {t.method!r}")
        ids = np.asarray(input_ids).astype(t.id_dtype, copy=False).reshape(-1)
        per_position = np.diff(np.asarray(target_offsets, dtype=np.int64).reshape(-1))  # (P_e,)
        self._parts["target_ids"].append(np.asarray(target_ids).astype(t.id_dtype, copy=False).reshape(-1))
        self._parts["target_counts"].append(np.asarray(target_counts).astype(t.count_dtype, copy=False).reshape(-1))
        self._parts["target_offsets"].append(per_position)
        self._add_example(ids, np.zeros(per_position.shape[0], dtype=np.float32), label, positions)

    def add_hybrid(
        self,
        input_ids: npt.ArrayLike,
        target_ids: npt.ArrayLike,
        target_logprobs: npt.ArrayLike,
        tail_mass: npt.ArrayLike,
        tail_ids: npt.ArrayLike,
        tail_counts: npt.ArrayLike,
        tail_offsets: npt.ArrayLike,
        label: npt.ArrayLike | None = None,
        positions: npt.ArrayLike | None = None,
    ) -> None:
        """Add one example of a hybrid store: the top-k as for :meth:`add` (``target_*`` (P_e, K), ``tail_mass``
        (P_e,)), plus ``tail_ids`` and ``tail_counts`` (U_e,), the unique ids drawn from each position's tail
        (ascending) and their counts, and ``tail_offsets`` (P_e + 1,) from 0, as in the example dict."""
        t = self.targets
        if not t.hybrid:
            raise ValueError(f"add_hybrid(...) is for hybrid stores; this one's method is {t.method!r}")
        ids = np.asarray(input_ids).astype(t.id_dtype, copy=False).reshape(-1)
        tail = np.asarray(tail_mass).astype(np.float32, copy=False).reshape(-1)
        self._parts["target_ids"].append(np.asarray(target_ids).astype(t.id_dtype, copy=False).reshape(-1, t.k))
        self._parts["target_logprobs"].append(
            np.asarray(target_logprobs).astype(t.logprob_dtype, copy=False).reshape(-1, t.k)
        )
        self._parts["tail_ids"].append(np.asarray(tail_ids).astype(t.id_dtype, copy=False).reshape(-1))
        self._parts["tail_counts"].append(np.asarray(tail_counts).astype(t.count_dtype, copy=False).reshape(-1))
        self._parts["tail_offsets"].append(np.diff(np.asarray(tail_offsets, dtype=np.int64).reshape(-1)))
        self._add_example(ids, tail, label, positions)

    def add_source(self, text: bytes, token_spans: npt.ArrayLike) -> None:
        """Give the example added last its source text (UTF-8) and each of its input tokens' byte span in it,
        (L, 2) [start, end). Either every example of a shard gets one or none does."""
        if self._sources != self._rows - 1:
            raise ValueError("add_source(...) follows each add...(...) of an example, once")
        spans = np.asarray(token_spans).astype(np.int32, copy=False).reshape(-1, 2)
        self._parts["text"].append(np.frombuffer(text, dtype=np.uint8))
        self._parts["text_offsets"].append(np.array([len(text)], dtype=np.int64))
        self._parts["token_spans"].append(spans)
        self._sources += 1

    def _add_example(
        self, ids: NDArray, tail: NDArray, label: npt.ArrayLike | None, positions: npt.ArrayLike | None
    ) -> None:
        t = self.targets
        self._parts["input_ids"].append(ids)
        self._parts["tail_mass"].append(tail)
        self._parts["keys"].append(np.frombuffer(example_key(ids), dtype=np.uint8))
        if label is not None:
            dtype = "int64" if self.task == "seq-cls" else t.id_dtype
            self._parts["labels"].append(np.asarray(label).astype(dtype).reshape(-1))
        if positions is not None:
            self._parts["positions"].append(np.asarray(positions).astype(np.int32).reshape(-1))
        self._parts["token_offsets"].append(np.array([ids.shape[0]], dtype=np.int64))
        self._parts["position_offsets"].append(np.array([tail.shape[0]], dtype=np.int64))
        self._rows += 1
        self._tokens += ids.shape[0]

    def build(self) -> ShardData:
        """Concatenate everything added so far into a ShardData and reset the builder."""
        t = self.targets
        p = self._parts

        def cat(name: str, dtype: str, tail_shape: tuple[int, ...] = ()) -> NDArray:
            if not p[name]:
                return np.zeros((0, *tail_shape), dtype=dtype)
            return np.concatenate(p[name]).astype(dtype, copy=False)

        has_labels = bool(p["labels"]) or self.task == "masked-lm"
        if self._sources not in (0, self._rows):
            raise ValueError(f"{self._sources} of {self._rows} examples have a source text; give every one or none")
        sources = self._rows > 0 and self._sources == self._rows

        def offsets(name: str) -> NDArray:
            return np.concatenate([[0], np.cumsum(cat(name, "int64"))]).astype(np.int64)

        data = ShardData(
            input_ids=cat("input_ids", t.id_dtype),
            token_offsets=offsets("token_offsets"),
            position_offsets=offsets("position_offsets"),
            target_ids=cat("target_ids", t.id_dtype, () if t.sampled else (t.k,)),
            target_logprobs=None if t.sampled else cat("target_logprobs", t.logprob_dtype, (t.k,)),
            tail_mass=cat("tail_mass", "float32"),
            keys=cat("keys", "uint8").reshape(-1, 16),
            labels=cat("labels", "int64" if self.task == "seq-cls" else t.id_dtype) if has_labels else None,
            positions=cat("positions", "int32") if self.task == "masked-lm" else None,
            target_counts=cat("target_counts", t.count_dtype) if t.sampled else None,
            target_offsets=offsets("target_offsets") if t.sampled else None,
            tail_ids=cat("tail_ids", t.id_dtype) if t.hybrid else None,
            tail_counts=cat("tail_counts", t.count_dtype) if t.hybrid else None,
            tail_offsets=offsets("tail_offsets") if t.hybrid else None,
            text=cat("text", "uint8") if sources else None,
            text_offsets=offsets("text_offsets") if sources else None,
            token_spans=cat("token_spans", "int32", (2,)) if sources else None,
        )
        self._reset()
        return data


def shard_from_examples(task: str, targets: TargetSpec, examples: Iterable[Mapping[str, Any]]) -> ShardData:
    """Build a shard from public example dicts (as a reader returns them); used by merge and tests."""
    b = ShardBuilder(task, targets)
    for ex in examples:
        label = ex.get("label") if task != "causal-lm" else None
        if targets.sampled:
            b.add_sampled(
                ex["input_ids"], ex["target_ids"], ex["target_counts"], ex["target_offsets"], label, ex.get("positions")
            )
        elif targets.hybrid:
            b.add_hybrid(
                ex["input_ids"],
                ex["target_ids"],
                ex["target_logprobs"],
                ex["tail_mass"],
                ex["tail_ids"],
                ex["tail_counts"],
                ex["tail_offsets"],
                label,
                ex.get("positions"),
            )
        else:
            b.add(ex["input_ids"], ex["target_ids"], ex["target_logprobs"], ex["tail_mass"], label, ex.get("positions"))
        if "text" in ex:
            b.add_source(np.asarray(ex["text"], dtype=np.uint8).tobytes(), ex["token_spans"])
    return b.build()

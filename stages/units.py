"""Work units streamed from the input: what ``pipeline label`` labels, one unit at a time.

Units are cut in one of two ways:

* by tokens (``shard_tokens`` N, the default): a unit takes the input's examples in order while their input
  tokens fit in N; the example that would overflow starts the next unit. Every unit holds at most N tokens
  (N >= ``max_length``, so an example always fits) and every unit but the last more than N - ``max_length``.
  Examples are made from records (truncated to ``max_length``; too short ones dropped) or, with ``--pack``, are
  the packed sequences;
* by count (``shard_size`` S): a unit is S consecutive items of the input, where an item is

  * unpacked input: one **record** (unit u = records [u*S, (u+1)*S)); a record whose example is too short to
    label (fewer than 2 tokens for causal-lm) is dropped from its unit, so a unit may hold fewer than S examples
    (or none: it is still written, as an empty shard, so that every unit of the input is present);
  * ``--pack``: one **packed sequence** of ``max_length`` tokens.

Packed sequences are documents joined with EOS between them; the packer carries a batch's remainder into the
next batch, so the sequences equal packing the whole input at once.

The input is read once, in order, a bounded batch of records at a time: memory stays flat in the size of the
input. A process labels only its own units (``wanted``): unpacked and cut by count, the records of other units
are counted and skipped without being tokenised or kept; otherwise a unit's boundaries depend on every token
before it, so every process tokenises the whole input (the tokenizer is ~100x cheaper than a teacher per token)
but keeps only the examples of its own units. The number of units is known when the stream ends.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .inputs import DataError, Example, iter_records, prepare_examples, token_ids

__all__ = [
    "SHARD_TOKENS",
    "Packer",
    "Progress",
    "Unit",
    "UnitSpec",
    "first_example",
    "stream_units",
    "unit_problems",
    "unit_tokens",
]

SHARD_TOKENS = 1 << 20
"""Default input tokens per work unit (``LabelConfig.shard_tokens``)."""


def unit_tokens(shard_size: int | None, shard_tokens: int | None) -> int:
    """Input tokens per unit at most; 0 when units are ``shard_size`` examples instead."""
    if shard_size is not None:
        return 0
    return SHARD_TOKENS if shard_tokens is None else shard_tokens


def unit_problems(shard_size: int | None, shard_tokens: int | None, max_length: int) -> list[str]:
    """What is wrong with ``--shard-size`` / ``--shard-tokens`` (nothing: [])."""
    if shard_size is not None and shard_tokens is not None:
        return ["give --shard-tokens (units cut by tokens) or --shard-size (by examples), not both"]
    if shard_size is not None and shard_size < 1:
        return [f"--shard-size must be >= 1, got {shard_size}"]
    tokens = unit_tokens(shard_size, shard_tokens)
    if shard_size is None and tokens < max_length:
        return [f"--shard-tokens must be >= --max-length ({max_length}) so that every example fits, got {tokens}"]
    return []


@dataclass
class UnitSpec:
    """How records become examples (the arguments of ``prepare_examples``), and the unit size."""

    tokenizer: Any
    task: str
    text_field: str
    label_field: str | None
    max_length: int
    pack: bool
    shard_size: int
    """Items per unit (records, or packed sequences); 0: cut by ``shard_tokens`` instead."""
    label2id: dict[str, int] | None = None
    num_labels: int | None = None
    mlm_probability: float = 0.15
    seed: int = 0
    limit: int | None = None
    """Only the first N items: records (unpacked) or packed sequences."""
    spans: bool = False
    """Keep each example's source text and token spans (``--spans``)."""
    shard_tokens: int = 0
    """Input tokens per unit at most, when ``shard_size`` is 0."""

    def prepare(self, records: list[dict[str, Any]], first: int) -> list[Example]:
        return prepare_examples(
            records,
            self.tokenizer,
            task=self.task,
            text_field=self.text_field,
            label_field=self.label_field,
            max_length=self.max_length,
            pack=False,
            label2id=self.label2id,
            num_labels=self.num_labels,
            mlm_probability=self.mlm_probability,
            seed=self.seed,
            first=first,
            spans=self.spans,
        )


@dataclass
class Unit:
    """Work unit ``index``: its examples (None when this process does not label it), and how many records of the
    input have been read when it ends (for the progress bar)."""

    index: int
    examples: list[Example] | None
    records_read: int


class Packer:
    """Documents in, fixed-length sequences out: ``doc, EOS, doc, EOS, ...`` cut every ``length`` tokens. The
    remainder is carried to the next ``add``; ``finish`` returns the last, shorter sequence."""

    def __init__(self, length: int, eos: int | None) -> None:
        self.length = length
        self.sep = [np.array([eos], dtype=np.int64)] if eos is not None else []
        self.rest = np.zeros(0, np.int64)

    def add(self, docs: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        stream = np.concatenate([self.rest, *(part for doc in docs for part in (doc, *self.sep))])
        full = len(stream) // self.length * self.length
        self.rest = stream[full:].copy()
        # copies, so that a kept sequence does not hold the whole batch's stream alive
        return [stream[i : i + self.length].copy() for i in range(0, full, self.length)]

    def finish(self) -> list[np.ndarray[Any, Any]]:
        rest, self.rest = self.rest, np.zeros(0, np.int64)
        return [rest] if len(rest) else []


def stream_units(files: list[tuple[Path, str]], spec: UnitSpec, wanted: Callable[[int], bool]) -> Iterator[Unit]:
    """Every work unit of the input, in order; ``wanted(u)`` (asked once, when unit u starts) says whether this
    process labels unit u: only then are its examples built and returned."""
    if spec.pack:
        yield from _packed(files, spec, wanted)
        return
    if not spec.shard_size:
        yield from _by_tokens(files, spec, wanted)
        return
    S, limit = spec.shard_size, spec.limit
    u, n, in_unit, keep, chunk = 0, 0, 0, wanted(0), []
    for record in iter_records(files):
        if limit is not None and n >= limit:
            break
        n += 1
        in_unit += 1
        if keep:
            chunk.append(record)
        if in_unit == S:
            yield Unit(u, spec.prepare(chunk, u * S) if keep else None, n)
            u, in_unit, chunk = u + 1, 0, []
            keep = wanted(u)
    if in_unit:
        yield Unit(u, spec.prepare(chunk, u * S) if keep else None, n)


class _Cutter:
    """Examples in input order in, units out: S examples per unit, or (S = 0) as many as fit in N tokens."""

    def __init__(self, spec: UnitSpec, wanted: Callable[[int], bool]) -> None:
        self.size, self.tokens, self.wanted = spec.shard_size, spec.shard_tokens, wanted
        self.u, self.keep, self.unit, self.count, self.held = 0, wanted(0), list[Example](), 0, 0

    def add(self, ex: Example, read: int) -> Iterator[Unit]:
        """Add the next example (``read``: records read so far); yields the unit that it closes, if any."""
        if self.count and not self.size and self.held + len(ex.input_ids) > self.tokens:
            yield self.close(read)  # it would overflow this unit: it starts the next one
        self.count += 1
        self.held += len(ex.input_ids)
        if self.keep:
            self.unit.append(ex)
        if self.count == self.size:
            yield self.close(read)

    def close(self, read: int) -> Unit:
        unit = Unit(self.u, self.unit if self.keep else None, read)
        self.u, self.unit, self.count, self.held = self.u + 1, [], 0, 0
        self.keep = self.wanted(self.u)
        return unit


_BATCH = 256  # records tokenised at a time when units are cut by tokens


def _by_tokens(files: list[tuple[Path, str]], spec: UnitSpec, wanted: Callable[[int], bool]) -> Iterator[Unit]:
    """Unpacked records, tokenised ``_BATCH`` at a time, into units of at most ``shard_tokens`` tokens."""
    cut, n = _Cutter(spec, wanted), 0
    records = iter_records(files)
    if spec.limit is not None:
        records = itertools.islice(records, spec.limit)
    while batch := list(itertools.islice(records, _BATCH)):
        n += len(batch)
        for ex in spec.prepare(batch, n - len(batch)):
            yield from cut.add(ex, n)
    if cut.count:
        yield cut.close(n)


def _packed(files: list[tuple[Path, str]], spec: UnitSpec, wanted: Callable[[int], bool]) -> Iterator[Unit]:
    if spec.task != "causal-lm":
        raise DataError("--pack applies to causal-lm only (it joins documents into fixed-length sequences)")
    S, limit = spec.shard_size or _BATCH, spec.limit
    packer = Packer(spec.max_length, spec.tokenizer.eos_token_id)
    cut, made, n = _Cutter(spec, wanted), 0, 0
    batch: list[dict[str, Any]] = []

    def take(sequences: list[np.ndarray[Any, Any]]) -> Iterator[Unit]:
        nonlocal made
        for seq in sequences:
            if limit is not None and made >= limit:
                return
            if len(seq) < 2:
                continue  # only the very last sequence can be this short: nothing to predict
            made += 1
            yield from cut.add(Example(seq), n)

    for record in iter_records(files):
        if limit is not None and made >= limit:
            break
        batch.append(record)
        n += 1
        if len(batch) == S:  # tokenised S records at a time
            yield from take(packer.add(token_ids(batch, spec.tokenizer, spec.text_field, special=False, first=n - S)))
            batch = []
    if batch:
        first = n - len(batch)
        yield from take(packer.add(token_ids(batch, spec.tokenizer, spec.text_field, special=False, first=first)))
    yield from take(packer.finish())
    if cut.count:
        yield cut.close(n)


def first_example(files: list[tuple[Path, str]], spec: UnitSpec) -> bool:
    """Whether the input gives at least one example (read up to the first one): checked before a store is
    touched, so that an input with nothing to label fails at once."""
    probe = UnitSpec(**{**spec.__dict__, "shard_size": 1})
    return any(unit.examples for unit in stream_units(files, probe, lambda u: True))


class Progress:
    """Input records read (of an estimate made while fingerprinting), with this process's labelling rate. Units
    go to the parts round-robin, so the share of the input read tracks the share of this part's work done."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.tokens = 0
        self.records = 0
        self.start = time.perf_counter()

    @classmethod
    def open(cls, show: bool | None, estimate: int) -> Progress:
        """A bar when ``show`` (default: when stderr is a terminal), else a silent counter."""
        if not (show if show is not None else sys.stderr.isatty()):
            return cls(None)
        from tqdm import tqdm

        return cls(tqdm(total=max(estimate, 1), unit="rec", desc="label", dynamic_ncols=True))

    def update(self, examples: int, tokens: int) -> None:
        """``examples`` of ``tokens`` tokens labelled."""
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)

    def read(self, records: int) -> None:
        """The input has been read up to record ``records``."""
        if self.bar is not None:
            if records > self.bar.total:  # the estimate was low (blank lines, quoted CSV newlines)
                self.bar.total = records
            self.bar.update(records - self.records)
        self.records = records

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

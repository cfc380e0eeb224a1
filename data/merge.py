"""``pipeline merge``: combine the stores of independent labeling jobs (or of torchrun ranks) into one store.

Each part was written by ``pipeline label --num-shards N --shard-index I`` (or by rank I of a torchrun job):
it holds the work units u with u % N == I, under their global names, and records ``dataset.part``. Merging
checks that every part is complete and has the same provenance, then copies (or moves) the shards of all parts in
unit order, hashing each file once, and commits them in bulk (one root per segment of shards). Its time is
linear in the shards. The output is marked complete once every unit of the dataset is present, so it equals a
single-process run. A merge that stops half-way resumes when run again. Parts labelled with ``--spans`` carry
their source texts and token spans in their shards; the teacher's strings (``tokens.json``, the same in every
part: the manifests' records must agree) are checked against their SHA-256 and written once to the output.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace

from .errors import IncompleteStoreError, StoreError
from .location import Location
from .manifest import Manifest, ShardRecord
from .reader import read_manifest
from .source_text import TOKEN_STRINGS_FILE, has_spans, read_token_strings, token_strings_record
from .writer import StoreWriter, differences

__all__ = ["MergeError", "merge_stores", "without_part"]


class MergeError(StoreError, ValueError):
    """The parts cannot be merged (different provenance, overlapping units, missing units)."""


def without_part(manifest: Manifest) -> Manifest:
    """The manifest as the whole store would record it: no ``dataset.part``."""
    dataset = {k: v for k, v in manifest.dataset.items() if k != "part"}
    return replace(manifest, dataset=dataset)


def merge_stores(
    out: str | os.PathLike[str],
    parts: Sequence[str | os.PathLike[str]],
    *,
    move: bool = False,
    allow_partial: bool = False,
    log: Callable[[str], None] | None = None,
) -> Manifest:
    """Merge ``parts`` into the store ``out`` and return its manifest.

    Args:
        out: the merged store (created, or resumed if a merge of the same parts stopped half-way).
        parts: the part stores.
        move: move shard files instead of copying them (same local filesystem; used for torchrun ranks).
        allow_partial: leave ``out`` incomplete instead of failing when some units are missing.

    Raises:
        MergeError: the parts disagree, overlap, or miss units; IncompleteStoreError: a part is unfinished.
    """
    say = log or (lambda msg: None)
    if not parts:
        raise MergeError("nothing to merge: name at least one part store")
    locations = [Location(p) for p in parts]
    manifests = [read_manifest(loc) for loc in locations]
    for loc, m in zip(locations, manifests, strict=True):
        if not m.complete:
            raise IncompleteStoreError(f"{loc} is not complete; finish its labeling job before merging")
    base = without_part(manifests[0])
    for loc, m in zip(locations[1:], manifests[1:], strict=True):
        diff = differences(base.provenance_key(), without_part(m).provenance_key())
        if diff:
            raise MergeError(f"{loc} was labelled differently from {locations[0]} (differs in: {', '.join(diff)})")
    owner: dict[int, tuple[int, ShardRecord]] = {}  # unit -> (part, record): one pass over every part's records
    for p, (loc, m) in enumerate(zip(locations, manifests, strict=True)):
        for s in m.shards:
            if s.unit in owner:
                raise MergeError(f"unit {s.unit} ({s.name}) is in both {locations[owner[s.unit][0]]} and {loc}")
            owner[s.unit] = (p, s)
    total = base.dataset.get("units")
    tokens_json = _token_strings(locations, manifests)
    with StoreWriter(out, base) as writer:
        if tokens_json is not None and writer.location.size(TOKEN_STRINGS_FILE) != len(tokens_json):
            writer.location.write_once(TOKEN_STRINGS_FILE, tokens_json)
        done = writer.committed_units  # merged by an earlier, interrupted merge
        todo = [(locations[p], record) for unit, (p, record) in sorted(owner.items()) if unit not in done]
        writer.adopt_shards(todo, move=move)
        for loc, m in zip(locations, manifests, strict=True):
            say(f"merged {len(m.shards)} shards from {loc}")
        missing = sorted(set(range(total)) - writer.committed_units) if isinstance(total, int) else []
        if missing and not allow_partial:
            raise MergeError(
                f"the parts hold {len(writer.committed_units)} of {total} units; missing units "
                f"{_ranges(missing)}: label them (--shard-index) and merge again"
            )
        return writer.finish() if not missing else writer.manifest


def _token_strings(locations: list[Location], manifests: list[Manifest]) -> bytes | None:
    """Parts with spans: the body of ``tokens.json``, read from the first part and checked there against its
    record, which every part's manifest must repeat. None for parts without spans."""
    spans = [has_spans(m) for m in manifests]
    if not any(spans):
        return None
    records = [m.tokenizer.get("token_strings") for m in manifests]
    if not all(spans) or any(r != records[0] for r in records):
        which = next(loc for loc, r in zip(locations, records, strict=True) if r != records[0])
        raise MergeError(
            f"{which} records other teacher strings ({TOKEN_STRINGS_FILE}) than {locations[0]}, or none; merge parts "
            "labelled with the same --spans configuration"
        )
    body, record = token_strings_record(read_token_strings(locations[0], manifests[0]))
    if record != records[0]:  # the writer's serialisation: the same bytes the labeling run wrote
        raise MergeError(f"{locations[0]}: {TOKEN_STRINGS_FILE} does not re-serialise to its recorded bytes")
    return body


def _ranges(units: list[int]) -> str:
    out: list[str] = []
    start = prev = units[0]
    for u in [*units[1:], None]:
        if u is not None and u == prev + 1:
            prev = u
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if u is not None:
            start = prev = u
    return ", ".join(out)

"""``pipeline merge``: combine the stores of independent labeling jobs (or of torchrun ranks) into one store.

Each part was written by ``pipeline label --num-shards N --shard-index I`` (or by rank I of a torchrun job):
it holds the work units u with u % N == I, under their global names, and records ``dataset.part``. Merging
checks that every part is complete and has the same provenance, then copies (or moves) the shards of all parts in
unit order, hashing each file once, and commits them in bulk (one root per segment of shards). Its time is
linear in the shards. The output is marked complete once every unit of the dataset is present, so it equals a
single-process run. A merge that stops half-way resumes when run again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace

from .errors import IncompleteStoreError, StoreError
from .location import Location
from .manifest import Manifest, ShardRecord
from .reader import read_manifest
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
    with StoreWriter(out, base) as writer:
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

"""The writer's side of store format version 2 (data/segments.py): shard records appended in unit order, written
as immutable segments, and the root that names them replaced at each commit (the commit point).

``FANOUT`` and ``SEGMENT_SHARDS`` are read from data/segments.py when a log is made, so that a test may shrink them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from . import segments
from .location import Location
from .manifest import Manifest, ShardRecord, Totals
from .segments import (
    FileRef,
    LazyShards,
    SegmentRef,
    root_dict,
    segment_bytes,
    segment_path,
    summary_bytes,
    summary_path,
)

__all__ = ["RecordLog"]


class RecordLog:
    """The writer's side of version 2: appends records, writes segments and the root.

    Args:
        location: the store.
        refs: the segments of the committed root.
        pending: the records of the segments after the last sealed one (at most ~2 * FANOUT * FANOUT).
        totals: the committed totals.
    """

    def __init__(
        self, location: Location, refs: Sequence[SegmentRef], pending: Sequence[ShardRecord], totals: Totals
    ) -> None:
        self.location = location
        self.fanout, self.seal = segments.FANOUT, segments.SEGMENT_SHARDS  # read here: a test may shrink them
        # committed (SegmentRef) or not yet written (an int: its number of records, the last of `pending`)
        self._refs: list[SegmentRef | int] = list(refs)
        self._pending = list(pending)
        self.totals = totals
        self.last_unit = refs[-1].last_unit if refs else -1
        self._superseded: list[str] = []  # segment files the next root no longer names
        self._doomed: list[str] = []  # named by no root since the previous commit: deleted after this one

    @classmethod
    def resume(cls, location: Location, shards: LazyShards) -> RecordLog:
        """The log of a committed root: only the segments after the last sealed one are read."""
        refs = list(shards.refs)
        first = max((i + 1 for i, r in enumerate(refs) if r.shards >= segments.SEGMENT_SHARDS), default=0)
        pending = [s for j in range(first, len(refs)) for s in shards.segment(j)]
        return cls(location, refs, pending, shards.totals)

    def state(self) -> tuple[Any, ...]:
        """A copy of the log's state (O(segments + pending)), to :meth:`restore` when a commit fails."""
        return (list(self._refs), list(self._pending), self.totals, self.last_unit, list(self._superseded))

    def restore(self, state: tuple[Any, ...]) -> None:
        """Back to the state of the last commit: nothing the failed one did is named, so it is all leftovers."""
        refs, pending, self.totals, self.last_unit, superseded = state
        self._refs, self._pending, self._superseded = list(refs), list(pending), list(superseded)

    @property
    def refs(self) -> list[SegmentRef]:
        """The committed segments (call after :meth:`flush`)."""
        assert all(isinstance(r, SegmentRef) for r in self._refs)
        return [r for r in self._refs if isinstance(r, SegmentRef)]

    def append(self, record: ShardRecord) -> None:
        """Add a record (in memory until :meth:`flush`). Units must rise: segments never change once written."""
        if record.unit <= self.last_unit:
            raise ValueError(
                f"{record.name}: unit {record.unit} is not above the last committed unit {self.last_unit}; a "
                "version-2 store commits units in rising order"
            )
        self.last_unit = record.unit
        self._pending.append(record)
        self.totals = self.totals.plus(record)
        size = 1
        # the base-FANOUT carry: FANOUT - 1 segments of this size before the new one merge with it
        while size * self.fanout <= self.seal and self._tail_sizes(self.fanout - 1) == [size] * (self.fanout - 1):
            for r in self._refs[-(self.fanout - 1) :]:
                if isinstance(r, SegmentRef):
                    self._superseded.append(r.path)
            del self._refs[-(self.fanout - 1) :]
            size *= self.fanout
        self._refs.append(size)

    def _tail_sizes(self, n: int) -> list[int]:
        tail = self._refs[-n:] if len(self._refs) >= n else []
        return [r.shards if isinstance(r, SegmentRef) else r for r in tail]

    def flush(self, base: Manifest) -> None:
        """Write every new segment, then replace the root (the commit point), then delete the segments that the
        root before the previous one named and this one does not."""
        first = self._first_pending_ref()
        index = sum(r.shards for r in self._refs[:first] if isinstance(r, SegmentRef))  # of pending[0] in the store
        offset = sealed_upto = 0
        for i in range(first, len(self._refs)):
            r = self._refs[i]
            size = r.shards if isinstance(r, SegmentRef) else r
            if not isinstance(r, SegmentRef):
                records = self._pending[offset : offset + size]
                body = segment_bytes(records)
                path = segment_path(index, size)
                self.location.write_once(path, body)
                rows, summary = tuple(s.rows for s in records), None
                uniform = len(set(rows)) == 1  # the root's rows / shards says it all (see segment_counts)
                if size >= self.seal and not uniform:  # once per sealed segment: the root stays small
                    text = summary_bytes(records)
                    summary = FileRef(summary_path(index, size), len(text), hashlib.sha256(text).hexdigest())
                    self.location.write_once(summary.path, text)
                self._refs[i] = SegmentRef(
                    path=path,
                    shards=size,
                    rows=sum(rows),
                    first_unit=records[0].unit,
                    last_unit=records[-1].unit,
                    bytes=len(body),
                    sha256=hashlib.sha256(body).hexdigest(),
                    shard_rows=None if summary or uniform else rows,
                    summary=summary,
                )
            offset += size
            index += size
            if size >= self.seal:
                sealed_upto = offset
        self.write_root(base)
        self._pending = self._pending[sealed_upto:]
        with contextlib.suppress(OSError):  # committed already: a file left behind is swept by finish
            for path in self._doomed:
                self.location.remove(path)
        self._doomed, self._superseded = self._superseded, []

    def _first_pending_ref(self) -> int:
        """Index of the first segment whose records are in ``pending`` (the one after the last sealed one)."""
        for i in range(len(self._refs) - 1, -1, -1):
            r = self._refs[i]
            if isinstance(r, SegmentRef) and r.shards >= self.seal:
                return i + 1
        return 0

    def write_root(self, base: Manifest) -> None:
        text = json.dumps(root_dict(base, self.refs, self.totals), indent=1) + "\n"
        self.location.write_atomic("manifest.json", text.encode())

    def sweep(self) -> None:
        """Delete every segment file the root does not name (superseded ones, leftovers of a crash)."""
        named = {r.path.removeprefix("records/") for r in self.refs}
        named |= {r.summary.path.removeprefix("records/") for r in self.refs if r.summary is not None}
        for name in self.location.list_entries("records"):
            if name not in named:
                self.location.remove(f"records/{name}")
        self._doomed, self._superseded = [], []

    def view(self, targets: Any) -> LazyShards:
        """The committed records as a reader sees them."""
        return LazyShards(self.location, self.refs, self.totals, targets)

"""Store format version 2: shard records in immutable segment files named by a small root.

``manifest.json`` stays the single commit point, but it no longer lists every shard: it holds the provenance,
the ``totals`` over all records, and a list of *segment references* ``{path, shards, rows, first_unit,
last_unit, bytes, sha256}``. A segment (``records/segment-<start>-<count>.json``) is a JSON file of ``count``
consecutive shard records, written once and never changed. A commit writes one new segment and replaces the
root, so its cost does not grow with the store:

* the segments form a base-``FANOUT`` counter: a commit adds a segment of 1 record; when the root's last
  ``FANOUT`` segments have the same size below ``SEGMENT_SHARDS`` they are replaced by one segment of all their
  records (written from the writer's memory, never read back). A commit thus writes ~3 records' worth of
  segment bytes on average, and the root names at most ``2 * (FANOUT - 1)`` small segments plus one per
  ``SEGMENT_SHARDS`` sealed records (~1,000 references, ~170 KB, at 1,000,000 shards);
* a segment's name is unique to its content (its first record's index and its size, records being committed in
  unit order and never changed), so on an object store every segment is a write-once PUT and a crash between
  the segment write and the root PUT leaves the previous root naming only intact files. A segment the root
  stops naming is deleted one commit later (a reader that opened the store just before has time to read it).

Readers parse only the root; :class:`LazyShards` loads a segment on demand (a few kept in an LRU cache), after
checking its size and SHA-256 against the root; its records' units, names, paths and rows are checked then, and
each record in full, as a version-1 manifest's, when first used (:class:`SegmentRecords`).

Each shard's example count (what a loader's epoch order needs, data/dataset.py) is readable without any record: a
reference to a segment below ``SEGMENT_SHARDS`` records lists them inline (``shard_rows``, run-length:
``"256*31,129"``; at most ~1,000 counts in a root), and a sealed segment names a small immutable summary file
beside it (``summary``: ``{path, bytes, sha256}``, ``records/rows-<start>-<count>.json``, ~5 KB for 1,024 shards),
written once when it is sealed. Both fields are optional: roots written before them (and their segments) stay
readable; for those the counts come from the records (:meth:`LazyShards.shard_rows`, the slow path), and readers
that predate them ignore them. A root written with them says so (``segment_counts``: 1); in it, a segment with
neither field holds shards of equal example counts (rows / shards each; checked when the segment is read), so
that stores of equal-sized shards write no summary and no inline counts.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import hashlib
import itertools
import json
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, overload

from .errors import ManifestError, StoreError, StoreReadError
from .location import Location
from .manifest import Manifest, ShardRecord, Totals, _count, _get, check_entries

__all__ = [
    "FANOUT",
    "SEGMENT_SHARDS",
    "FileRef",
    "LazyShards",
    "RowIndex",
    "SegmentRecords",
    "SegmentRef",
    "parse_root",
    "root_dict",
]

# 32 x 32: a sealed segment of 1,024 records is ~2.3 MB of JSON (zarr shards list ~20 files each), read in ~20 ms.
FANOUT = 32
SEGMENT_SHARDS = 1024
SEGMENT_FORMAT = "kd-soft-labels-segment"
# Bounds no honest store reaches: a hostile root cannot make a reader allocate or download without limit.
_MAX_SEGMENT_SHARDS = 1 << 16
_MAX_SEGMENT_BYTES = 256 << 20
_MAX_SEGMENTS = 1 << 22
_SEGMENT_PATH = re.compile(r"^records/[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CACHED_SEGMENTS = 4
_ROWS_TEXT = re.compile(r"^\d{1,13}(\*\d{1,5})?(,\d{1,13}(\*\d{1,5})?)*$")


def segment_path(start: int, count: int) -> str:
    """Zero-padded, so that names sort in store order: ``records/segment-000001024-01024.json``."""
    return f"records/segment-{start:09d}-{count:05d}.json"


@dataclass(frozen=True)
class SegmentRef:
    """A segment as the root names it.

    Attributes:
        path: ``records/<plain-name>``, relative to the store root.
        shards: records in the segment (1 .. 65,536).
        rows: examples in those shards (lets a reader find an example's segment without reading any).
        first_unit, last_unit: the units of its first and last record (records are in strictly rising unit order).
        bytes, sha256: the segment file's size and SHA-256, checked before it is parsed.
        shard_rows: the examples of each of its shards, inline (segments below SEGMENT_SHARDS records), or None.
        summary: the ``{path, bytes, sha256}`` of its summary file (sealed segments), or None.
    """

    path: str
    shards: int
    rows: int
    first_unit: int
    last_unit: int
    bytes: int
    sha256: str
    shard_rows: tuple[int, ...] | None = None
    summary: FileRef | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": self.path,
            "shards": self.shards,
            "rows": self.rows,
            "first_unit": self.first_unit,
            "last_unit": self.last_unit,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }
        if self.shard_rows is not None:
            d["shard_rows"] = rows_text(self.shard_rows)
        if self.summary is not None:
            d["summary"] = self.summary.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], i: int) -> SegmentRef:
        w = f"segments[{i}]"
        path = _get(d, "path", str, w)
        if not _SEGMENT_PATH.match(path):
            raise ManifestError(f"manifest: {w}.path={path!r} is not a plain 'records/<name>' path; refusing it")
        digest = _get(d, "sha256", str, w)
        if not _SHA256.match(digest):
            raise ManifestError(f"manifest: {w}.sha256 is not a hex SHA-256")
        ref = cls(
            path=path,
            shards=_count(d, "shards", w, _MAX_SEGMENT_SHARDS),
            rows=_count(d, "rows", w),
            first_unit=_count(d, "first_unit", w),
            last_unit=_count(d, "last_unit", w),
            bytes=_count(d, "bytes", w, _MAX_SEGMENT_BYTES),
            sha256=digest,
            shard_rows=_parse_rows_text(d["shard_rows"], f"{w}.shard_rows") if "shard_rows" in d else None,
            summary=FileRef.from_dict(_get(d, "summary", dict, w), f"{w}.summary") if "summary" in d else None,
        )
        if ref.shard_rows is not None and (len(ref.shard_rows) != ref.shards or sum(ref.shard_rows) != ref.rows):
            raise ManifestError(f"manifest: {w}.shard_rows does not match its shards / rows")
        if ref.shards < 1 or ref.last_unit - ref.first_unit + 1 < ref.shards:
            raise ManifestError(
                f"manifest: {w} holds {ref.shards} records for units {ref.first_unit}..{ref.last_unit}; "
                "expected 1 or more records with distinct units"
            )
        return ref


@dataclass(frozen=True)
class FileRef:
    """A small immutable file of the store's records, as the root names it: checked before it is parsed."""

    path: str
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any], w: str) -> FileRef:
        path, digest = _get(d, "path", str, w), _get(d, "sha256", str, w)
        if not _SEGMENT_PATH.match(path) or not _SHA256.match(digest):
            raise ManifestError(f"manifest: {w} needs a plain 'records/<name>' path and a hex SHA-256")
        return cls(path, _count(d, "bytes", w, _MAX_SEGMENT_BYTES), digest)


def read_checked(location: Location, ref: FileRef | SegmentRef) -> bytes:
    """A segment's or summary's bytes, after checking its size and SHA-256 against the root.

    Raises:
        ManifestError: it is missing, or its size or SHA-256 differ. StoreReadError: the store is unreachable.
    """
    where = f"{location}: {ref.path}"
    try:
        size = location.size(ref.path)
        if size != ref.bytes:
            raise ManifestError(
                f"{where} has {size} bytes, the manifest says {ref.bytes}; the store's records are corrupt"
            )
        raw = location.read_bytes(ref.path)
    except StoreError:
        raise
    except OSError as e:
        raise StoreReadError(f"{where}: reading failed ({e}); check that the store is reachable and retry") from e
    if len(raw) != ref.bytes or hashlib.sha256(raw).hexdigest() != ref.sha256:
        raise ManifestError(f"{where} does not match its SHA-256 in the manifest; the store's records are corrupt")
    return raw


def rows_text(rows: Sequence[int]) -> str:
    """Example counts as the root writes them: run-length, ``"256*31,129"`` (one token per run), so that a root
    of equal-sized shards stays as small as before the counts existed."""
    runs = [(value, len(list(group))) for value, group in itertools.groupby(rows)]
    return ",".join(f"{value}*{n}" if n > 1 else str(value) for value, n in runs)


def _parse_rows_text(value: Any, w: str) -> tuple[int, ...]:
    if not isinstance(value, str) or len(value) > 20 * _MAX_SEGMENT_SHARDS or not _ROWS_TEXT.match(value):
        raise ManifestError(f"manifest: {w} must be run-length example counts such as '256*31,129'")
    out: list[int] = []
    for part in value.split(","):
        count, _, repeat = part.partition("*")
        n = int(repeat) if repeat else 1
        if len(out) + n > _MAX_SEGMENT_SHARDS:
            raise ManifestError(f"manifest: {w} lists more than {_MAX_SEGMENT_SHARDS} counts")
        out += [int(count)] * n
    return tuple(out)


def _shard_rows(value: Any, w: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int and 0 <= v <= 1 << 40 for v in value):
        raise ManifestError(f"manifest: {w} must be a list of example counts")
    return tuple(value)


SUMMARY_FORMAT = "kd-soft-labels-summary"


def summary_path(start: int, count: int) -> str:
    """The summary file beside ``segment_path(start, count)``: ``records/rows-000001024-01024.json``."""
    return f"records/rows-{start:09d}-{count:05d}.json"


def summary_bytes(records: Sequence[ShardRecord]) -> bytes:
    return json.dumps({"format": SUMMARY_FORMAT, "rows": [s.rows for s in records]}, separators=(",", ":")).encode()


class LazyShards(Sequence[ShardRecord]):
    """The shard records of a version-2 store, in unit order, read segment by segment on demand.

    ``len`` and ``totals`` come from the root; indexing or iterating reads (and checks) only the segments it
    touches, keeping the last few parsed. Compares equal to any sequence of the same records.
    """

    def __init__(self, location: Location, refs: Sequence[SegmentRef], totals: Totals, targets: Any) -> None:
        self.location = location
        self.refs = tuple(refs)
        self.totals = totals
        self._targets = targets
        self._starts = [0]  # (segments + 1,) index of each segment's first record
        for ref in self.refs:
            self._starts.append(self._starts[-1] + ref.shards)
        self._cache: OrderedDict[int, SegmentRecords] = OrderedDict()
        # where a remote store's segments are kept once read (set by the reader): they never change, so a later
        # reader of the same store reads them from there, offline if need be
        self.cache_dir: Path | None = None
        # a root with ``segment_counts``: a segment listing no counts has shards of rows / shards examples each
        self.uniform_unless_listed = False

    def __len__(self) -> int:
        return self._starts[-1]

    @overload
    def __getitem__(self, i: int) -> ShardRecord: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[ShardRecord, ...]: ...
    def __getitem__(self, i: int | slice) -> ShardRecord | tuple[ShardRecord, ...]:
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"shard {i} is out of range for a store of {n} shards")
        i %= n
        j = bisect.bisect_right(self._starts, i) - 1
        return self.segment(j).record(i - self._starts[j])

    def __iter__(self) -> Iterator[ShardRecord]:
        for j in range(len(self.refs)):
            yield from self.segment(j)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable cache, compared by content

    def __repr__(self) -> str:
        return f"LazyShards({len(self)} shards in {len(self.refs)} segments of {self.location})"

    def shard_rows(self) -> list[int]:
        """Every shard's example count, in store order, from the root and the sealed segments' summaries (one
        small file per 1,024 shards); a segment whose reference has neither (a root written before them) is read
        whole, record by record.

        Raises:
            ManifestError: a summary is missing, corrupt or disagrees with its segment's reference.
            StoreReadError: the store could not be read.
        """
        rows: list[int] = []
        for j, ref in enumerate(self.refs):
            if ref.shard_rows is not None:
                rows += ref.shard_rows
            elif ref.summary is not None:
                where = f"{self.location}: {ref.summary.path}"
                try:
                    d = json.loads(read_checked(self.location, ref.summary))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ManifestError(f"{where} is not valid JSON ({e})") from e
                if not isinstance(d, dict) or d.get("format") != SUMMARY_FORMAT:
                    raise ManifestError(f"{where} is not a {SUMMARY_FORMAT} file")
                counts = _shard_rows(d.get("rows"), ref.summary.path)
                if len(counts) != ref.shards or sum(counts) != ref.rows:
                    raise ManifestError(f"{where} does not match its segment's shards / rows in the manifest")
                rows += counts
            elif self.uniform_unless_listed:
                rows += [ref.rows // ref.shards] * ref.shards
            else:
                rows += self.segment(j).rows
        return rows

    def segment(self, j: int) -> SegmentRecords:
        """The records of segment ``j``, read, checked and cached.

        Raises:
            ManifestError: the segment is missing, has the wrong size or checksum, or holds invalid records.
            StoreReadError: the store could not be read.
        """
        if j in self._cache:
            self._cache.move_to_end(j)
            return self._cache[j]
        ref = self.refs[j]
        records = read_segment(self.location, ref, self._starts[j], self._targets, self.cache_dir)
        if self.uniform_unless_listed and ref.shard_rows is None and ref.summary is None:
            each = ref.rows // ref.shards  # what shard_rows() told the loader, from the root alone
            if (bad := next((k for k, n in enumerate(records.rows) if n != each), None)) is not None:
                raise ManifestError(
                    f"{self.location}: {ref.path}: the root lists no per-shard example counts for it, so each of "
                    f"its {ref.shards} shards should hold {each} examples (rows / shards), but "
                    f"shard-{records.units[bad]:06d} holds {records.rows[bad]}; the store's root or records are "
                    "corrupt: copy the store again from its source"
                )
        self._cache[j] = records
        while len(self._cache) > _CACHED_SEGMENTS:
            self._cache.popitem(last=False)
        return records


class SegmentRecords:
    """One segment's records: their units, names, paths and rows checked together when the segment is read
    (:func:`read_segment`), each record parsed and checked in full (files, stats, entries) when first used, so
    that a shard's first decode parses its own record, not its segment's 1,024 (BENCHMARKS.md 3d).

    Attributes:
        units, rows: (records,) every record's unit and example count, checked.
    """

    def __init__(self, items: list[Any], start: int, targets: Any, units: list[int], rows: list[int]) -> None:
        self._items, self._start, self._targets = items, start, targets  # the raw records, their first index
        self.units, self.rows = tuple(units), tuple(rows)
        self._parsed: dict[int, ShardRecord] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[ShardRecord]:
        return (self.record(k) for k in range(len(self)))

    def record(self, k: int) -> ShardRecord:
        """The ``k``-th record of the segment (0 <= k < len), parsed and checked the first time."""
        if k not in self._parsed:
            record = ShardRecord.from_dict(self._items[k], self._start + k)
            check_entries(self._targets, record)
            self._parsed[k] = record
        return self._parsed[k]


def read_segment(
    location: Location, ref: SegmentRef, start: int, targets: Any, cache_dir: Path | None = None
) -> SegmentRecords:
    """Read one segment file and check it against its reference in the root (size and SHA-256 before parsing);
    with ``cache_dir``, keep a copy there under its SHA-256 and read that copy when it is already there."""
    where = f"{location}: {ref.path}"
    cached = cache_dir / f"{ref.sha256}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file() and cached.stat().st_size == ref.bytes:
        raw = cached.read_bytes()
        if hashlib.sha256(raw).hexdigest() == ref.sha256:
            return _parse_segment(raw, where, ref, start, targets)
    raw = read_checked(location, ref)
    records = _parse_segment(raw, where, ref, start, targets)
    if cached is not None:  # unique temp name: DataLoader workers may cache the same segment at once
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(raw)
        os.replace(tmp, cached)
    return records


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector (if on). Parsing a sealed segment makes ~18,000 containers, none in a
    cycle; in a process holding torch (~170,000 tracked objects) the collections they set off took ~155 ms
    of a ~180 ms parse (BENCHMARKS.md 3d). Collection resumes after, as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parse_segment(raw: bytes, where: str, ref: SegmentRef, start: int, targets: Any) -> SegmentRecords:
    try:
        with paused_gc():
            d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where} is not valid JSON ({e})") from e
    if not isinstance(d, dict) or d.get("format") != SEGMENT_FORMAT:
        raise ManifestError(f"{where} is not a {SEGMENT_FORMAT} file")
    items = _get(d, "shards", list, ref.path)
    if len(items) != ref.shards:
        raise ManifestError(f"{where} holds {len(items)} records, the manifest says {ref.shards}")
    units, rows, prev = [], [], ref.first_unit - 1
    for i, item in enumerate(items):  # the fields that place a record; the rest when it is used (SegmentRecords)
        w = f"shards[{start + i}]"
        unit, name, path = _count(item, "unit", w), _get(item, "name", str, w), _get(item, "path", str, w)
        # names and paths follow from the units, which rise strictly: no two shards share a name or a path
        if unit <= prev or name != f"shard-{unit:06d}" or path not in (f"shards/{name}", f"shards/{name}.arrow"):
            raise ManifestError(f"{where}: record {name} (unit {unit}, path {path}) is out of unit order or misnamed")
        units.append(prev := unit)
        rows.append(_count(item, "rows", w))
    if units[-1] != ref.last_unit or sum(rows) != ref.rows:
        raise ManifestError(f"{where}: its records do not match the manifest's last_unit / rows")
    if ref.shard_rows is not None and tuple(rows) != ref.shard_rows:
        raise ManifestError(f"{where}: its records do not match the manifest's shard_rows")
    return SegmentRecords(items, start, targets, units, rows)


def parse_root(d: dict[str, Any], location: Location) -> Manifest:
    """Parse and check an untrusted version-2 root; its shard records stay in their segments until used."""
    base = Manifest.from_dict({**{k: v for k, v in d.items() if k not in ("segments", "segment_counts")}, "shards": []})
    raw_refs = _get(d, "segments", list, "manifest")
    if len(raw_refs) > _MAX_SEGMENTS:
        raise ManifestError(f"manifest: {len(raw_refs)} segments, more than any real store ({_MAX_SEGMENTS})")
    refs = [SegmentRef.from_dict(r, i) for i, r in enumerate(raw_refs)]
    for i in range(1, len(refs)):
        if refs[i].first_unit <= refs[i - 1].last_unit:
            raise ManifestError(f"manifest: segments[{i}] does not follow segments[{i - 1}] in unit order")
    if len({r.path for r in refs}) != len(refs):
        raise ManifestError("manifest: two segments share a path")
    totals = Totals.from_dict(_get(d, "totals", dict, "manifest"))
    if totals.shards != sum(r.shards for r in refs) or totals.rows != sum(r.rows for r in refs):
        raise ManifestError("manifest: totals.shards / totals.rows do not match the segments")
    shards = LazyShards(location, refs, totals, base.targets)
    shards.uniform_unless_listed = d.get("segment_counts") == 1
    for i, r in enumerate(refs):
        if shards.uniform_unless_listed and r.shard_rows is None and r.summary is None and r.rows % r.shards:
            raise ManifestError(
                f"manifest: segments[{i}] ({r.path}) lists no per-shard example counts, so its {r.shards} shards "
                f"must hold equal counts, but its {r.rows} rows are not a multiple of {r.shards}; the root is "
                "corrupt: copy the store again from its source"
            )
    return replace(base, shards=shards)


def root_dict(base: Manifest, refs: Sequence[SegmentRef], totals: Totals) -> dict[str, Any]:
    """The version-2 root of ``base`` (its provenance) with these segments and totals."""
    d = replace(base, shards=()).to_dict()
    del d["shards"]
    d["format_version"] = 2
    d["segment_counts"] = 1  # a segment without shard_rows or summary holds shards of equal example counts
    d["totals"] = totals.to_dict()
    d["segments"] = [r.to_dict() for r in refs]
    return d


def segment_bytes(records: Sequence[ShardRecord]) -> bytes:
    # compact: segments are read by programs; the root stays indented for people
    body = {"format": SEGMENT_FORMAT, "shards": [s.to_dict() for s in records]}
    return json.dumps(body, separators=(",", ":")).encode()


class RowIndex:
    """Finds the shard that holds an example without reading every record: by segment (the root's row counts),
    then within the one segment it needs."""

    def __init__(self, shards: Sequence[ShardRecord]) -> None:
        self.shards = shards
        lazy = shards if isinstance(shards, LazyShards) else None
        sizes = [r.rows for r in lazy.refs] if lazy is not None else [s.rows for s in shards]
        self._group_starts = [0]
        for n in sizes:
            self._group_starts.append(self._group_starts[-1] + n)
        self._lazy = lazy
        self._inner: dict[int, list[int]] = {}

    @property
    def total(self) -> int:
        return self._group_starts[-1]

    def find(self, index: int) -> tuple[int, int]:
        """(shard index, row within the shard) of example ``index`` (0 <= index < total)."""
        g = bisect.bisect_right(self._group_starts, index) - 1
        offset = index - self._group_starts[g]
        if self._lazy is None:
            return g, offset
        if g not in self._inner:
            starts = [0]
            for n in self._lazy.segment(g).rows:
                starts.append(starts[-1] + n)
            if len(self._inner) >= _CACHED_SEGMENTS:
                self._inner.pop(next(iter(self._inner)))
            self._inner[g] = starts
        starts = self._inner[g]
        i = bisect.bisect_right(starts, offset) - 1
        return self._lazy._starts[g] + i, offset - starts[i]

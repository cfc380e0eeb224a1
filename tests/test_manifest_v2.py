"""Store format version 2: shard records in immutable segments named by a small root (data/segments.py).

Stores are written through the real writer; costs are counted by wrapping the store's own write and read
methods (instrumentation, not replacement: every call still goes through).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kd_pipeline.data import (
    ManifestError,
    ShardBuilder,
    StoreWriter,
    open_store,
    read_manifest,
    verify_store,
)
from kd_pipeline.data import segments as seg
from kd_pipeline.data.errors import StoreWriteError
from kd_pipeline.data.location import Location
from kd_pipeline.data.merge import merge_stores
from tests import rawstore
from tests.conftest import make_manifest, random_example, write_store
from tests.test_store import assert_same


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments of 1, 2, 4 records: a store of a dozen shards spans several levels and sealed segments."""
    monkeypatch.setattr(seg, "FANOUT", 2)
    monkeypatch.setattr(seg, "SEGMENT_SHARDS", 4)


def _root(store: Path) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((store / "manifest.json").read_text())
    return raw


def _counting(method: Callable[..., Any], log: list[tuple[str, int]]) -> Callable[..., Any]:
    def wrapped(self: Location, rel: str, *args: Any) -> Any:
        log.append((rel, len(args[0]) if args and isinstance(args[0], bytes) else 0))
        return method(self, rel, *args)

    return wrapped


# ---------------------------------------------------------------- round trip


def test_round_trip_spans_segments(tmp_path: Path, backend: str, small_segments: None) -> None:
    written = write_store(tmp_path / "s", backend, shards=11, rows=2)
    root = _root(tmp_path / "s")
    assert root["format_version"] == 2 and "shards" not in root
    # 11 = 4 + 4 + 2 + 1: two sealed segments, then the base-2 carry's remainder
    assert [r["shards"] for r in root["segments"]] == [4, 4, 2, 1]
    assert root["totals"]["shards"] == 11 and root["totals"]["rows"] == 22
    named = {r["path"].removeprefix("records/") for r in root["segments"]}
    assert sorted(p.name for p in (tmp_path / "s" / "records").iterdir()) == sorted(named)  # finish swept the rest
    store = open_store(tmp_path / "s")
    assert [s.unit for s in store.manifest.shards] == list(range(11))
    assert store.manifest.shards[-1].name == "shard-000010" and len(store.manifest.shards) == 11
    assert store.manifest.shards[3:6] == tuple(store.manifest.shards)[3:6]
    assert store.manifest.rows == 22 and store.manifest.kept_mass_mean is None
    for r, w in zip(store, written, strict=True):
        assert_same(r, w, "causal-lm", store.manifest.targets)
    assert store[21]["input_ids"].tolist() == written[21]["input_ids"].tolist()
    assert verify_store(tmp_path / "s").ok


def test_commits_cost_the_same_late_as_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes of manifest (segments + root) written per commit, over a whole carry cycle of 32 commits, early and
    late in a store: version 2 stays flat, version 1 grows with the shards already committed."""
    log: list[tuple[str, int]] = []
    monkeypatch.setattr(Location, "write_atomic", _counting(Location.write_atomic, log))

    def per_commit(version: int) -> list[int]:
        log.clear()
        m = dataclasses.replace(make_manifest("arrow"), format_version=version)
        rng = np.random.default_rng(0)
        costs = []
        with StoreWriter(tmp_path / f"v{version}", m) as w:
            for unit in range(192):
                log.clear()
                b = ShardBuilder("causal-lm", m.targets)
                ex = random_example(rng, "causal-lm", m.targets, m.vocab_size)
                b.add(ex["input_ids"], ex["target_ids"], ex["target_logprobs"], ex["tail_mass"])
                w.write_shard(unit, b.build())
                costs.append(sum(n for _, n in log))
        return costs

    v2 = per_commit(2)
    early, late = sum(v2[:32]) / 32, sum(v2[160:192]) / 32
    assert late < 1.25 * early, (early, late)
    assert max(v2) < 40 * 2_000  # the largest commit writes one 32-record segment (~1 KB per arrow record)
    v1 = per_commit(1)
    assert sum(v1[160:192]) > 4 * sum(v1[:32])  # the cost this format removes


def test_opening_reads_only_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_segments: None) -> None:
    write_store(tmp_path / "s", "arrow", shards=11, rows=2)
    reads: list[tuple[str, int]] = []
    monkeypatch.setattr(Location, "read_bytes", _counting(Location.read_bytes, reads))
    store = open_store(tmp_path / "s")
    assert len(store) == 22 and store.manifest.tokens > 0 and len(store.manifest.shards) == 11
    assert [rel for rel, _ in reads] == ["manifest.json"]
    store[21]  # one example: the last segment only
    assert [rel for rel, _ in reads][1:] == [_root(tmp_path / "s")["segments"][-1]["path"]]


# ---------------------------------------------------------------- untrusted segments


def _refused(store: Path, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        list(read_manifest(Location(store)).shards)


def test_a_flipped_byte_in_a_segment_is_refused(tmp_path: Path, small_segments: None) -> None:
    write_store(tmp_path / "s", "arrow", shards=5)
    segment = tmp_path / "s" / _root(tmp_path / "s")["segments"][0]["path"]
    body = bytearray(segment.read_bytes())
    body[len(body) // 2] ^= 1
    segment.write_bytes(bytes(body))
    _refused(tmp_path / "s", r"records/segment-.* does not match its SHA-256 in the manifest")
    with pytest.raises(ManifestError, match="SHA-256"):
        verify_store(tmp_path / "s")
    segment.unlink()
    _refused(tmp_path / "s", r"has None bytes, the manifest says")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r: r["segments"][0].__setitem__("path", "../../etc/passwd"), "not a plain 'records/<name>' path"),
        (lambda r: r["segments"][0].__setitem__("path", "shards/shard-000000.arrow"), "not a plain 'records/"),
        (lambda r: r["segments"][0].__setitem__("shards", 1 << 30), r"segments\[0\].shards=1073741824 is outside"),
        (lambda r: r["segments"][0].__setitem__("bytes", 1 << 40), r"segments\[0\].bytes=.* is outside"),
        (lambda r: r["segments"].append(r["segments"][0]), "does not follow"),
        (lambda r: r["totals"].__setitem__("shards", 7), "totals.shards / totals.rows do not match"),
    ],
)
def test_a_hostile_root_is_refused_at_open(tmp_path: Path, edit: Callable[[Any], None], match: str) -> None:
    write_store(tmp_path / "s", "arrow", shards=3)
    raw = _root(tmp_path / "s")
    edit(raw)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=match):
        open_store(tmp_path / "s")


def _forge_segment(store: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit segment 0 and make the root's size and SHA-256 of it match, as a hostile author would."""
    raw = _root(store)
    ref = raw["segments"][0]
    body = json.loads((store / ref["path"]).read_text())
    edit(body)
    data = json.dumps(body).encode()
    (store / ref["path"]).write_bytes(data)
    ref["bytes"], ref["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (store / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda b: b["shards"][0].__setitem__("path", "../../etc"), r"path \.\./\.\./etc\) is out of unit order or"),
        (lambda b: b["shards"][0].__setitem__("rows", 1 << 50), "outside"),
        (lambda b: b["shards"].append(b["shards"][0]), "holds 4 records, the manifest says 3"),
        (lambda b: b["shards"].reverse(), "out of unit order or misnamed"),
        (lambda b: b["shards"][1].__setitem__("name", "shard-000000"), "out of unit order or misnamed"),
        (lambda b: b.__setitem__("format", "other"), "is not a kd-soft-labels-segment file"),
    ],
)
def test_a_consistent_but_hostile_segment_is_refused(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], match: str
) -> None:
    write_store(tmp_path / "s", "arrow", shards=3)  # default sizes: 3 single-record segments...
    store = tmp_path / "s"
    raw = _root(store)
    records = rawstore.load(store)["shards"]
    body = seg.segment_bytes([seg.ShardRecord.from_dict(r, i) for i, r in enumerate(records)])
    (store / "records" / "all.json").write_bytes(body)  # ... merged here into one, to edit across records
    raw["segments"] = [
        {
            "path": "records/all.json",
            "shards": 3,
            "rows": 15,
            "first_unit": 0,
            "last_unit": 2,
            "bytes": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
    ]
    (store / "manifest.json").write_text(json.dumps(raw))
    assert verify_store(store).ok
    _forge_segment(store, edit)
    _refused(store, match)


# ---------------------------------------------------------------- version 1


def test_version_1_stores_stay_readable_verifiable_and_resume_as_version_1(tmp_path: Path, backend: str) -> None:
    written = write_store(tmp_path / "s", backend, shards=3, finish=False)
    raw = rawstore.load(tmp_path / "s")
    rawstore.save(tmp_path / "s", raw)  # the layout the previous code wrote: every record inline, no records/
    assert _root(tmp_path / "s")["format_version"] == 1 and not (tmp_path / "s" / "records").exists()
    store = open_store(tmp_path / "s", allow_incomplete=True)
    assert store.manifest.format_version == 1 and len(store.manifest.shards) == 3
    for r, w in zip(store, written, strict=True):
        assert_same(r, w, "causal-lm", store.manifest.targets)
    m = make_manifest(backend)
    with StoreWriter(tmp_path / "s", m) as w:
        assert w.committed_units == {0, 1, 2}
        b = ShardBuilder("causal-lm", m.targets)
        ex = random_example(np.random.default_rng(1), "causal-lm", m.targets, m.vocab_size)
        b.add(ex["input_ids"], ex["target_ids"], ex["target_logprobs"], ex["tail_mass"])
        w.write_shard(3, b.build())
        w.finish()
    after = _root(tmp_path / "s")
    assert after["format_version"] == 1 and len(after["shards"]) == 4
    assert verify_store(tmp_path / "s").ok


# ---------------------------------------------------------------- crashes


def _write(path: Path, units: int, *, finish: bool) -> None:
    """Write (or resume) a store of ``units`` one-example shards whose content depends on the unit only."""
    m = make_manifest("arrow")
    with StoreWriter(path, m) as w:
        for unit in range(units):
            if unit in w.committed_units:
                continue
            b = ShardBuilder("causal-lm", m.targets)
            ex = random_example(np.random.default_rng(unit), "causal-lm", m.targets, m.vocab_size)
            b.add(ex["input_ids"], ex["target_ids"], ex["target_logprobs"], ex["tail_mass"])
            w.write_shard(unit, b.build())
        if finish:
            w.finish()


def test_a_crash_between_segment_and_root_keeps_the_last_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_segments: None
) -> None:
    """The segment of shard 6 is written, the root naming it is not: readers see shards 0-5, and a resumed
    writer ends with the same store as an uninterrupted one."""
    _write(tmp_path / "whole", 9, finish=True)
    _write(tmp_path / "s", 6, finish=False)
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    original = Location.write_atomic
    segments: list[str] = []

    def dies_at_the_root(self: Location, rel: str, data: bytes) -> None:
        if rel == "manifest.json":
            raise OSError(28, "No space left on device")
        segments.append(rel)
        original(self, rel, data)

    monkeypatch.setattr(Location, "write_atomic", dies_at_the_root)
    with pytest.raises(StoreWriteError, match="writing shard-000006 .* No space left"):
        _write(tmp_path / "s", 9, finish=False)
    monkeypatch.setattr(Location, "write_atomic", original)
    assert segments and (tmp_path / "s" / segments[0]).is_file()  # written, but named by no root
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before
    assert len(open_store(tmp_path / "s", allow_incomplete=True)) == 6
    assert verify_store(tmp_path / "s").problems == [
        "the store is incomplete: its labeling run has not finished",
        "shards/shard-000006.arrow: present in the store but not listed in the manifest",
    ]
    _write(tmp_path / "s", 9, finish=True)
    a, b = open_store(tmp_path / "s"), open_store(tmp_path / "whole")
    assert list(a.manifest.shards) == list(b.manifest.shards)
    assert _root(tmp_path / "s")["segments"] == _root(tmp_path / "whole")["segments"]
    assert verify_store(tmp_path / "s").ok


# ---------------------------------------------------------------- merge


def _part(path: Path, index: int, parts: int, units: int) -> None:
    m = make_manifest("zarr")
    m = dataclasses.replace(m, dataset={**m.dataset, "units": units, "part": {"index": index, "of": parts}})
    rng = np.random.default_rng(index)
    with StoreWriter(path, m) as w:
        for unit in range(index, units, parts):
            b = ShardBuilder("causal-lm", m.targets)
            ex = random_example(rng, "causal-lm", m.targets, m.vocab_size)
            b.add(ex["input_ids"], ex["target_ids"], ex["target_logprobs"], ex["tail_mass"])
            w.write_shard(unit, b.build())
        w.finish()


@pytest.mark.parametrize("move", [False, True])
def test_merge_writes_few_roots_and_hashes_each_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, move: bool
) -> None:
    units = 40
    for i in range(3):
        _part(tmp_path / f"p{i}", i, 3, units)
    files = sum(len(s.files) for i in range(3) for s in read_manifest(Location(tmp_path / f"p{i}")).shards)
    writes: list[tuple[str, int]] = []
    monkeypatch.setattr(Location, "write_atomic", _counting(Location.write_atomic, writes))
    digests = 0
    original = hashlib.file_digest

    def counting_digest(*args: Any, **kwargs: Any) -> Any:
        nonlocal digests
        digests += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(hashlib, "file_digest", counting_digest)
    m = merge_stores(tmp_path / "out", [tmp_path / f"p{i}" for i in range(3)], move=move)
    assert [s.unit for s in m.shards] == list(range(units)) and m.complete
    assert digests == files  # each shard file hashed once (the previous merge hashed every file twice)
    roots = [rel for rel, _ in writes if rel == "manifest.json"]
    assert len(roots) == 3  # created, the one batch of 40 shards, finished
    assert len(writes) - len(roots) == 9  # the segments of 40 records in base 32: one of 32, eight of 1
    monkeypatch.setattr(hashlib, "file_digest", original)
    assert verify_store(tmp_path / "out").ok

"""A loader that starts without reading shard records: example counts from the root and the segments' summaries;
a segment without counts whose shards are not equal is refused; a shard's first decode parses its own record only.

Stores written through the real writer with small segments (FANOUT 2, 4 records sealed), shards of different
sizes; reads are counted by wrapping the real ``Location.read_bytes`` (every read still happens).
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import kd_pipeline.data.segments as seg
from kd_pipeline.data import ShardBuilder, StoreWriter
from kd_pipeline.data.dataset import StoreDataset, store_fingerprint
from kd_pipeline.data.errors import CorruptShardError, ManifestError
from kd_pipeline.data.location import Location
from kd_pipeline.data.manifest import ShardRecord
from kd_pipeline.data.reader import open_store
from kd_pipeline.pipeline.cli import cli
from tests.conftest import make_manifest, random_example
from tests.rawstore import strip_counts

ROWS = [3, 1, 4, 1, 5, 2, 6, 2, 3, 5, 1]  # 11 shards: two sealed segments of 4, then 2 + 1 inline
# segments: 4 equal shards (no counts in the root), 4 unequal (a summary), 2 unequal (inline "1,5"), 1
UNEVEN = [3, 3, 3, 3, 2, 4, 3, 3, 1, 5, 3]


def write(path: Path, rows: list[int]) -> list[dict[str, np.ndarray]]:
    """A store of shards holding ``rows`` examples each, through the real writer; the examples in store order."""
    m = make_manifest("arrow")
    rng = np.random.default_rng(5)
    written = []
    with StoreWriter(path, m) as w:
        for unit, n in enumerate(rows):
            b = ShardBuilder("causal-lm", m.targets)
            for _ in range(n):
                ex = random_example(rng, "causal-lm", m.targets, m.vocab_size)
                b.add(ex["input_ids"], ex["target_ids"], ex["target_logprobs"], ex["tail_mass"])
                written.append(ex)
            w.write_shard(unit, b.build(), {"entropy_sum": 1.0, "count": 1.0})
        w.finish()
    return written


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seg, "FANOUT", 2)
    monkeypatch.setattr(seg, "SEGMENT_SHARDS", 4)


@pytest.fixture
def store(tmp_path: Path, small_segments: None) -> tuple[Path, list[dict[str, np.ndarray]]]:
    return tmp_path / "s", write(tmp_path / "s", ROWS)


def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    log: list[str] = []
    real: Callable[..., bytes] = Location.read_bytes

    def counting(self: Location, rel: str) -> bytes:
        log.append(rel)
        return real(self, rel)

    monkeypatch.setattr(Location, "read_bytes", counting)
    return log


def epoch(path: Path, **kw: Any) -> list[tuple[list[int], list[int]]]:
    ds = StoreDataset(path, batch_size=3, seed=7, block_shards=2, **kw)
    return [(b["index"].tolist(), b["input_ids"].flatten().tolist()) for b in ds]


def test_the_root_holds_the_counts(store: tuple[Path, Any]) -> None:
    root = json.loads((store[0] / "manifest.json").read_text())
    refs = root["segments"]
    assert [r["shards"] for r in refs] == [4, 4, 2, 1]
    assert root["segment_counts"] == 1
    assert [r.get("shard_rows") for r in refs[2:]] == ["3,5", None]  # ROWS[8:10] run-length; one shard: its rows
    for i, ref in enumerate(refs[:2]):
        assert "shard_rows" not in ref
        summary = json.loads((store[0] / ref["summary"]["path"]).read_text())
        assert summary["rows"] == ROWS[4 * i : 4 * i + 4]


def test_start_up_reads_no_shard_record(store: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = store
    log = reads(monkeypatch)
    ds = StoreDataset(path, batch_size=3, seed=7, block_shards=2, num_workers=2)
    assert len(ds) > 0 and ds.num_examples == sum(ROWS)
    ds.state_dict(0)
    assert log == ["manifest.json", "records/rows-000000000-00004.json", "records/rows-000000004-00004.json"]


def test_order_and_batches_equal_the_records_path(store: tuple[Path, Any]) -> None:
    path, written = store
    new = epoch(path)
    strip_counts(path)  # an older root: the counts come from the records
    assert epoch(path) == new
    # and the batches hold the written examples at their indices
    for idx, _ in new:
        assert all(0 <= i < len(written) for i in idx)
    assert sorted(i for idx, _ in new for i in idx) == list(range(sum(ROWS)))
    first = StoreDataset(path, batch_size=1, shuffle=False)
    for i, b in enumerate(first):
        np.testing.assert_array_equal(b["input_ids"][0].numpy(), written[i]["input_ids"])


def test_an_older_root_still_loads_and_resumes(store: tuple[Path, Any]) -> None:
    path, _ = store
    strip_counts(path)
    ds = StoreDataset(path, batch_size=3, seed=7, block_shards=2)
    assert ds.num_examples == sum(ROWS)
    state = ds.state_dict(6)
    # a state saved by the loader before the root digest holds the digest of every record: still accepted
    state["store_fingerprint"] = store_fingerprint(ds.reader.manifest)
    again = StoreDataset(path, batch_size=3, seed=7, block_shards=2)
    again.load_state_dict(state)
    assert [b["index"].tolist() for b in again] == [b["index"].tolist() for b in list(ds)[2:]]
    state["store_fingerprint"] = "0" * 64
    with pytest.raises(ValueError, match="another store"):
        again.load_state_dict(state)


def test_a_tampered_record_is_caught_on_first_read(store: tuple[Path, Any]) -> None:
    path, _ = store
    ds = StoreDataset(path, batch_size=50, shuffle=False)  # starts: the records are not read
    segment = path / json.loads((path / "manifest.json").read_text())["segments"][0]["path"]
    text = segment.read_bytes()
    segment.write_bytes(text.replace(b'"rows":3', b'"rows":4', 1))
    with pytest.raises(ManifestError, match="segment"):
        list(ds)


def test_a_tampered_shard_is_caught_on_first_read(store: tuple[Path, Any]) -> None:
    path, _ = store
    ds = StoreDataset(open_store(path, verify=True), batch_size=50, shuffle=False)
    shard = next((path / "shards").glob("shard-000002*"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="shard-000002"):
        list(ds)


def test_a_tampered_summary_is_refused_at_start(store: tuple[Path, Any]) -> None:
    path, _ = store
    summary = path / "records" / "rows-000000004-00004.json"
    summary.write_bytes(summary.read_bytes().replace(b"[5,", b"[6,"))
    with pytest.raises(ManifestError, match="rows-000000004-00004.json does not match its SHA-256"):
        StoreDataset(path, batch_size=3)


def test_a_root_whose_counts_disagree_is_refused(store: tuple[Path, Any]) -> None:
    path, _ = store
    root = json.loads((path / "manifest.json").read_text())
    root["segments"][2]["shard_rows"] = "3,6"  # ROWS[8:10] is 3, 5
    (path / "manifest.json").write_text(json.dumps(root))
    with pytest.raises(ManifestError, match=r"segments\[2\].shard_rows does not match"):
        open_store(path)


@pytest.fixture
def uneven(tmp_path: Path, small_segments: None) -> Path:
    write(tmp_path / "u", UNEVEN)
    return tmp_path / "u"


def edit_root(path: Path) -> dict[str, Any]:
    root: dict[str, Any] = json.loads((path / "manifest.json").read_text())
    assert root["segment_counts"] == 1
    return root


def cli_error(*args: str) -> str:
    """The one line a CLI command prints for an expected error (exit 1, no traceback)."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_an_uncounted_segment_whose_rows_are_not_a_multiple_of_its_shards_is_refused(uneven: Path) -> None:
    root = edit_root(uneven)
    ref = root["segments"][0]
    assert (ref["shards"], ref["rows"]) == (4, 12) and "shard_rows" not in ref and "summary" not in ref
    ref["rows"] += 1  # the totals too, so that only the segment's own check can catch it
    root["totals"]["rows"] += 1
    (uneven / "manifest.json").write_text(json.dumps(root))
    expected = (
        r"segments\[0\] \(records/segment-000000000-00004\.json\) lists no per-shard example counts, so its 4 "
        r"shards must hold equal counts, but its 13 rows are not a multiple of 4; .*copy the store again"
    )
    with pytest.raises(ManifestError, match=expected):
        open_store(uneven)
    with pytest.raises(ManifestError, match=expected):
        StoreDataset(uneven, batch_size=3)
    for command in ("verify", "inspect"):
        assert re.search(expected, cli_error(command, str(uneven)))


@pytest.mark.parametrize(("segment", "field", "shard", "holds"), [(1, "summary", 4, 2), (2, "shard_rows", 8, 1)])
def test_unequal_shards_in_an_uncounted_segment_are_refused_on_first_read(
    uneven: Path, segment: int, field: str, shard: int, holds: int
) -> None:
    root = edit_root(uneven)
    del root["segments"][segment][field]  # the segment and its shards unchanged: their checksums still hold
    (uneven / "manifest.json").write_text(json.dumps(root))
    name = root["segments"][segment]["path"]
    each = root["segments"][segment]["rows"] // root["segments"][segment]["shards"]
    expected = (
        rf"{re.escape(name)}: the root lists no per-shard example counts for it, so each of its "
        rf"{root['segments'][segment]['shards']} shards should hold {each} examples \(rows / shards\), but "
        rf"shard-{shard:06d} holds {holds}; .*copy the store again"
    )
    ds = StoreDataset(uneven, batch_size=4, shuffle=False)  # starts from the root: no record read yet
    assert ds.num_examples == sum(UNEVEN)
    batches = iter(ds)
    for _ in range(3 if segment == 1 else 6):  # the segments before it read fine
        next(batches)
    with pytest.raises(ManifestError, match=expected):
        next(batches)
    assert re.search(expected, cli_error("verify", str(uneven)))


def test_a_first_decode_parses_only_its_own_record(store: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    path, written = store
    parsed: list[int] = []
    real = ShardRecord.from_dict.__func__

    def counting(cls: type[ShardRecord], d: dict[str, Any], i: int) -> ShardRecord:
        parsed.append(i)
        result: ShardRecord = real(cls, d, i)
        return result

    monkeypatch.setattr(ShardRecord, "from_dict", classmethod(counting))
    first = next(iter(StoreDataset(path, batch_size=1, shuffle=False)))
    assert parsed == [0]  # not the other 3 records of its sealed segment
    np.testing.assert_array_equal(first["input_ids"][0].numpy(), written[0]["input_ids"])


def rewrite_segment(path: Path, j: int, edit: Callable[[list[dict[str, Any]]], None]) -> None:
    """Edit segment ``j``'s records and record the new file's size and SHA-256 in the root, as a writer would."""
    root = json.loads((path / "manifest.json").read_text())
    ref = root["segments"][j]
    d = json.loads((path / ref["path"]).read_text())
    edit(d["shards"])
    body = json.dumps(d, separators=(",", ":")).encode()
    (path / ref["path"]).write_bytes(body)
    ref["bytes"], ref["sha256"] = len(body), hashlib.sha256(body).hexdigest()
    (path / "manifest.json").write_text(json.dumps(root))


def test_a_malformed_record_is_refused_when_first_used(store: tuple[Path, Any]) -> None:
    path, _ = store
    rewrite_segment(path, 0, lambda records: records[1].update(entries=5))  # a top-k store's records have none
    shards = open_store(path).manifest.shards
    assert shards[0].rows == ROWS[0]  # its neighbour in the segment reads
    with pytest.raises(ManifestError, match=r"shard shard-000001 records entries, but a top-k store has none"):
        shards[1]
    with pytest.raises(ManifestError, match="shard-000001 records entries"):
        list(StoreDataset(path, batch_size=2, shuffle=False))
    assert "shard-000001 records entries" in cli_error("verify", str(path))


def test_a_misplaced_record_refuses_its_whole_segment(store: tuple[Path, Any]) -> None:
    path, _ = store
    rewrite_segment(path, 0, lambda records: records[3].update(unit=9, name="shard-000009"))
    with pytest.raises(ManifestError, match=r"record shard-000009 \(unit 9, .*out of unit order or misnamed"):
        open_store(path).manifest.shards[0]  # record 0 is sound: its segment is refused as a whole when read


@pytest.mark.parametrize("enabled", [True, False])
def test_reading_a_segment_leaves_the_garbage_collector_as_it_was(store: tuple[Path, Any], enabled: bool) -> None:
    path, _ = store
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        assert open_store(path).manifest.shards[0].rows == ROWS[0]  # the collector is paused while it parses
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()

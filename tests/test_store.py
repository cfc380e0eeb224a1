"""The store's conformance suite: every test runs against both backends (zarr and arrow)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd_pipeline import data
from kd_pipeline.data import (
    CorruptShardError,
    IncompatibleStoreError,
    IncompleteStoreError,
    ManifestError,
    NotAStoreError,
    ShardBuilder,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    StoreWriter,
    UnsupportedFormatError,
    check_compatible,
    example_key,
    id_dtype_for,
    open_store,
    verify_store,
)
from tests import rawstore
from tests.conftest import make_manifest, random_example, write_store

TASKS = ("causal-lm", "seq-cls", "masked-lm")


def assert_same(read: dict[str, np.ndarray], written: dict[str, np.ndarray], task: str, spec: data.TargetSpec) -> None:
    np.testing.assert_array_equal(read["input_ids"], written["input_ids"])
    np.testing.assert_array_equal(read["target_ids"], written["target_ids"])
    np.testing.assert_array_equal(
        read["target_logprobs"], np.asarray(written["target_logprobs"]).astype(spec.value_dtype)
    )
    np.testing.assert_array_equal(read["tail_mass"], np.asarray(written["tail_mass"]).astype(np.float32))
    assert bytes(read["key"]) == example_key(written["input_ids"])
    if task == "causal-lm":
        np.testing.assert_array_equal(read["label"], written["input_ids"][1:])
    else:
        np.testing.assert_array_equal(read["label"], written["label"])
    if task == "masked-lm":
        np.testing.assert_array_equal(read["positions"], written["positions"])


@pytest.mark.parametrize("task", TASKS)
def test_round_trip(tmp_path: Path, backend: str, task: str) -> None:
    written = write_store(tmp_path / "s", backend, task)
    store = open_store(tmp_path / "s")
    assert len(store) == len(written) == 15
    assert store.manifest.task == task and store.manifest.backend == backend
    for i, (r, w) in enumerate(zip(store, written, strict=True)):
        assert_same(r, w, task, store.manifest.targets)
        assert_same(store[i], w, task, store.manifest.targets)
    assert_same(store[-1], written[-1], task, store.manifest.targets)
    with pytest.raises(IndexError):
        store[15]


def test_dtypes_are_narrow(tmp_path: Path, backend: str) -> None:
    write_store(tmp_path / "s", backend)
    ex = open_store(tmp_path / "s")[0]
    assert ex["input_ids"].dtype == np.uint16 and ex["target_ids"].dtype == np.uint16
    assert ex["target_logprobs"].dtype == np.float16 and ex["tail_mass"].dtype == np.float32
    assert id_dtype_for(65536) == "uint16" and id_dtype_for(65537) == "uint32"
    assert id_dtype_for(200_000) == "uint32"  # no cap like 131,072


def test_large_vocab_ids_survive(tmp_path: Path, backend: str) -> None:
    """Ids above 131,072 (where Megatron caps) round-trip in uint32."""
    spec = data.TargetSpec("topk", 2, 1.0, 300_000, "float16", "uint32")
    m = data.Manifest(backend=backend, task="causal-lm", targets=spec, vocab_size=300_000)
    with StoreWriter(tmp_path / "s", m) as w:
        b = ShardBuilder("causal-lm", spec)
        b.add(
            [299_999, 131_073, 5], [[299_998, 131_072], [7, 200_000]], [[-0.1, -3.0]] * 2, [0.0454] * 2
        )  # kept 0.9546
        w.write_shard(0, b.build())
        w.finish()
    ex = open_store(tmp_path / "s")[0]
    assert ex["target_ids"].dtype == np.uint32
    assert ex["target_ids"].tolist() == [[299_998, 131_072], [7, 200_000]]
    assert ex["input_ids"].tolist() == [299_999, 131_073, 5]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    task=st.sampled_from(TASKS),
    backend=st.sampled_from(("zarr", "arrow")),
    k=st.integers(1, 8),
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    seed=st.integers(0, 2**31),
)
def test_hypothesis_round_trip(
    tmp_path_factory: pytest.TempPathFactory, task: str, backend: str, k: int, sizes: list[int], seed: int
) -> None:
    path = tmp_path_factory.mktemp("h") / "s"
    m = make_manifest(backend, task, k=k)
    rng = np.random.default_rng(seed)
    written = []
    with StoreWriter(path, m) as w:
        for unit, n in enumerate(sizes):
            b = ShardBuilder(task, m.targets)
            for _ in range(n):
                ex = random_example(rng, task, m.targets, m.vocab_size)
                b.add(
                    ex["input_ids"],
                    ex["target_ids"],
                    ex["target_logprobs"],
                    ex["tail_mass"],
                    ex.get("label"),
                    ex.get("positions"),
                )
                written.append(ex)
            w.write_shard(unit, b.build())
        w.finish()
    store = open_store(path)
    assert len(store) == len(written)
    for r, wr in zip(store, written, strict=True):
        assert_same(r, wr, task, m.targets)
    assert verify_store(path).ok


def test_manifest_provenance_and_checksums(tmp_path: Path, backend: str) -> None:
    write_store(tmp_path / "s", backend)
    raw = rawstore.load(tmp_path / "s")
    assert raw["format"] == "kd-soft-labels" and raw["format_version"] == data.FORMAT_VERSION
    assert raw["complete"] is True and raw["granularity"] == "token"
    assert raw["targets"] == {
        "method": "topk",
        "k": 4,
        "temperature": 2.0,
        "num_classes": 50,
        "value_dtype": "float16",
        "id_dtype": "uint16",
        "encoding": "delta" if backend == "zarr" else "plain",  # resolved by the writer (data/codecs.py)
    }
    assert raw["totals"]["rows"] == 15
    for shard in raw["shards"]:  # every file of the shard, with its size and SHA-256, as computed here
        where = tmp_path / "s" / shard["path"]
        files = (
            {where.name: where}
            if where.is_file()
            else {f.relative_to(where).as_posix(): f for f in where.rglob("*") if f.is_file()}
        )
        assert shard["files"] == {
            rel: {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
            for rel, f in files.items()
        }
    names = [s["name"] for s in raw["shards"]]
    assert names == ["shard-000000", "shard-000001", "shard-000002"]


def test_incomplete_store_is_refused_unless_asked(tmp_path: Path, backend: str) -> None:
    write_store(tmp_path / "s", backend, finish=False)
    with pytest.raises(IncompleteStoreError, match="has not finished"):
        open_store(tmp_path / "s")
    assert len(open_store(tmp_path / "s", allow_incomplete=True)) == 15


def test_resume_keeps_committed_shards(tmp_path: Path, backend: str) -> None:
    write_store(tmp_path / "s", backend, shards=2, finish=False)
    with StoreWriter(tmp_path / "s", make_manifest(backend)) as w:
        assert w.committed_units == {0, 1}
    with pytest.raises(StoreExistsError, match=r"differs in: targets\.k"):
        StoreWriter(tmp_path / "s", make_manifest(backend, k=5))
    with StoreWriter(tmp_path / "s", make_manifest(backend, k=5), overwrite=True) as w:
        assert w.committed_units == set()
    assert not list((tmp_path / "s" / "shards").iterdir())


def test_writer_refuses_a_path_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(StoreExistsError, match="not a store"):
            StoreWriter(tmp_path / "d", make_manifest(), overwrite=overwrite)
    assert (tmp_path / "d" / "precious.txt").read_text() == "keep me"
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreExistsError, match="is a file"):
        StoreWriter(tmp_path / "f", make_manifest())


def test_second_writer_is_locked_out(tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "s", make_manifest()):
        with pytest.raises(StoreLockedError, match="another process"):
            StoreWriter(tmp_path / "s", make_manifest())
    StoreWriter(tmp_path / "s", make_manifest()).close()  # released on exit


def test_a_finished_store_keeps_no_lock_file(tmp_path: Path) -> None:
    """The lock exists while a store is written and is gone once it is finished (label runs and merges end with
    the same finish; test_label.py checks a label run's store)."""
    with StoreWriter(tmp_path / "s", make_manifest()) as w:
        assert (tmp_path / "s" / ".lock").is_file()
        w.finish()
        assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.json", "shards"]
        # finish ends the writing: the store is free for the next writer at once
        with StoreWriter(tmp_path / "s", make_manifest()) as again:
            assert (tmp_path / "s" / ".lock").is_file()
            again.finish()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.json", "shards"]


def test_a_lock_file_replaced_between_open_and_lock_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a finished store's unlinked lock file opens: we open ``.lock``, its holder unlinks it and another
    writer creates and locks a new one, then our flock succeeds on the unlinked file. lock_store must notice (the
    path names another file) and try again, so that it ends up refused by the real holder. The race is injected
    by running the other writer's steps right after our first open."""
    import os

    from kd_pipeline.data.location import Location
    from kd_pipeline.data.writer import lock_store

    (tmp_path / "s").mkdir()
    loc = Location(tmp_path / "s")
    real_open = os.open
    other: list[int] = []

    def open_then_race(path: Any, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        if not other:
            other.append(-1)
            Path(path).unlink()  # the old holder finished the store ...
            other[0] = lock_store(loc, shared=False)  # ... and a new writer took a new lock file
        return fd

    monkeypatch.setattr(os, "open", open_then_race)
    with pytest.raises(StoreLockedError, match="another process"):
        lock_store(loc, shared=False)
    os.close(other[0])


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="no such store"):
        open_store(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAStoreError, match="no manifest.json"):
        open_store(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(NotAStoreError, match="not valid JSON"):
        open_store(tmp_path / "empty")
    write_store(tmp_path / "s")
    raw = rawstore.load(tmp_path / "s")
    raw["format_version"] = 99
    rawstore.save(tmp_path / "s", raw)
    with pytest.raises(UnsupportedFormatError, match="version 99 is not supported"):
        open_store(tmp_path / "s")


def _edit_manifest(path: Path, edit: object) -> None:
    raw = rawstore.load(path)
    edit(raw)  # type: ignore[operator]
    rawstore.save(path, raw)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["shards"][0].__setitem__("path", "../../etc"), "not a plain"),
        (lambda m: m["shards"][0].__setitem__("path", "/etc/passwd"), "not a plain"),
        (
            lambda m: m["shards"][0]["files"].__setitem__("../../x", {"bytes": 1, "sha256": "0" * 64}),
            "leaves",
        ),
        (lambda m: m["shards"][0].__setitem__("rows", 1 << 50), "outside"),
        (lambda m: m["shards"][0].__setitem__("rows", True), "boolean"),
        (lambda m: m["targets"].__setitem__("value_dtype", "object"), "not one of"),
        (lambda m: m["targets"].__setitem__("k", 0), "must be in"),
        (lambda m: m["targets"].__setitem__("temperature", -1), "must be > 0"),
        (lambda m: m.__setitem__("vocab_size", 1 << 20), "does not fit"),
        (lambda m: m["shards"].append(m["shards"][0]), "share a name"),
    ],
)
def test_untrusted_manifest_is_rejected(tmp_path: Path, edit: object, match: str) -> None:
    write_store(tmp_path / "s")
    _edit_manifest(tmp_path / "s", edit)
    with pytest.raises(ManifestError, match=match):
        open_store(tmp_path / "s")
    with pytest.raises(ManifestError):
        verify_store(tmp_path / "s")


def _a_data_file(store: Path) -> Path:
    return max(
        (p for p in (store / "shards").rglob("*") if p.is_file() and p.name != "zarr.json"),
        key=lambda p: p.stat().st_size,
    )


def test_verify_catches_a_flipped_byte(tmp_path: Path, backend: str) -> None:
    write_store(tmp_path / "s", backend)
    assert verify_store(tmp_path / "s").ok
    victim = _a_data_file(tmp_path / "s")
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    report = verify_store(tmp_path / "s")
    assert not report.ok
    assert any("SHA-256" in p for p in report.problems)
    shard = victim.relative_to(tmp_path / "s" / "shards").parts[0].removesuffix(".arrow")
    assert all(shard in p for p in report.problems)


def test_verify_catches_truncation_and_missing_files(tmp_path: Path, backend: str) -> None:
    write_store(tmp_path / "s", backend)
    victim = _a_data_file(tmp_path / "s")
    victim.write_bytes(victim.read_bytes()[:-10])
    report = verify_store(tmp_path / "s")
    assert any("bytes, the manifest says" in p for p in report.problems)
    with pytest.raises(CorruptShardError, match="bytes, the manifest says"):
        list(open_store(tmp_path / "s"))
    victim.unlink()
    report = verify_store(tmp_path / "s")
    assert any("is missing" in p for p in report.problems)


def test_verify_catches_missing_and_unlisted_shards(tmp_path: Path, backend: str) -> None:
    write_store(tmp_path / "s", backend)
    shards = sorted((tmp_path / "s" / "shards").iterdir())
    moved = tmp_path / "s" / "shards" / ("shard-000099" + shards[0].suffix)
    shutil.copytree(shards[1], moved) if shards[1].is_dir() else shutil.copy(shards[1], moved)
    report = verify_store(tmp_path / "s")
    assert any("shard-000099" in p and "not listed" in p for p in report.problems)
    shutil.rmtree(shards[2]) if shards[2].is_dir() else shards[2].unlink()
    report = verify_store(tmp_path / "s")
    assert any("shard-000002" in p and "missing" in p for p in report.problems)


def test_zarr_missing_chunk_is_not_read_as_fill_value(tmp_path: Path) -> None:
    write_store(tmp_path / "s", "zarr")
    chunk = next(
        p
        for p in (tmp_path / "s" / "shards" / "shard-000001" / "target_ids").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    chunk.unlink()
    with pytest.raises(CorruptShardError, match="missing"):
        open_store(tmp_path / "s")[6]
    assert any("shard-000001" in p for p in verify_store(tmp_path / "s").problems)


def test_consistent_but_wrong_content_is_caught(tmp_path: Path, backend: str) -> None:
    """A shard swapped for another valid shard fails the manifest's counts even if checksums were forged."""
    write_store(tmp_path / "s", backend, rows=5)
    write_store(tmp_path / "t", backend, rows=4)
    raw = rawstore.load(tmp_path / "s")
    other = rawstore.load(tmp_path / "t")
    raw["shards"][0]["files"] = other["shards"][0]["files"]
    rawstore.save(tmp_path / "s", raw)
    target = tmp_path / "s" / raw["shards"][0]["path"]
    source = tmp_path / "t" / other["shards"][0]["path"]
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.copytree(source, target) if source.is_dir() else shutil.copy(source, target)
    report = verify_store(tmp_path / "s")
    assert any("shard-000000" in p and "manifest says" in p for p in report.problems)


def test_check_compatible(tmp_path: Path) -> None:
    write_store(tmp_path / "s")
    m = open_store(tmp_path / "s").manifest
    check_compatible(m, vocab_size=50, tokenizer_digest="a" * 64, task="causal-lm", temperature=2.0)
    check_compatible(m, vocab_size=64)  # padded rows are fine
    with pytest.raises(IncompatibleStoreError, match="at least 50 vocabulary rows"):
        check_compatible(m, vocab_size=49)
    with pytest.raises(IncompatibleStoreError, match="tokenizer differs"):
        check_compatible(m, vocab_size=50, tokenizer_digest="b" * 64)
    with pytest.raises(IncompatibleStoreError, match="labeling temperature 2.0"):
        check_compatible(m, vocab_size=50, temperature=1.0)
    with pytest.raises(IncompatibleStoreError, match="seq-cls") as info:
        check_compatible(m, vocab_size=10, task="seq-cls")
    assert "vocabulary rows" in str(info.value)  # every problem in one message


def test_crashed_staging_is_not_visible_and_is_replaced(tmp_path: Path, backend: str) -> None:
    """A shard written to disk but not committed (crash before the manifest) does not exist for readers."""
    write_store(tmp_path / "s", backend, shards=1, finish=False)
    m = make_manifest(backend)
    with StoreWriter(tmp_path / "s", m) as w:
        b = ShardBuilder("causal-lm", m.targets)
        b.add([1, 2, 3], [[1, 2, 3, 4]] * 2, [[-2.0] * 4] * 2, [1 - 4 * np.exp(-2.0)] * 2)
        w.write_shard(1, b.build())
    raw = rawstore.load(tmp_path / "s")
    raw["shards"] = raw["shards"][:1]  # the commit of shard 1 "never happened"
    rawstore.save(tmp_path / "s", raw)
    assert len(open_store(tmp_path / "s", allow_incomplete=True)) == 5
    assert any("not listed" in p for p in verify_store(tmp_path / "s").problems)
    with StoreWriter(tmp_path / "s", m) as w:
        assert w.committed_units == {0}
        b = ShardBuilder("causal-lm", m.targets)
        b.add([4, 5], [[1, 2, 3, 4]], [[-2.0] * 4], [1 - 4 * np.exp(-2.0)])
        w.write_shard(1, b.build())
        w.finish()
    assert verify_store(tmp_path / "s").ok
    assert open_store(tmp_path / "s")[5]["input_ids"].tolist() == [4, 5]
    assert not (tmp_path / "s" / ".staging").exists()


def test_shard_validation_refuses_bad_content(tmp_path: Path) -> None:
    m = make_manifest()
    b = ShardBuilder("causal-lm", m.targets)
    b.add([1, 2, 3], [[1, 2, 3, 4]], [[-1.0] * 4], [0.5])  # 3 tokens need 2 positions
    with StoreWriter(tmp_path / "s", m) as w, pytest.raises(CorruptShardError, match="L - 1 positions"):
        w.write_shard(0, b.build())
    b.add([1, 2], [[1, 2, 3, 99]], [[-1.0] * 4], [0.5])
    with StoreWriter(tmp_path / "s", m) as w, pytest.raises(CorruptShardError, match="target id"):
        w.write_shard(0, b.build())

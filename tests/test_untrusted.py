"""Hostile stores: a reader refuses them with a clear error before any large allocation or read outside the store.

Each forged store here has a manifest whose sizes and SHA-256s match the forged files (as a hostile author would
make it), so that the checks under test, not the checksums, are what refuse it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from kd_pipeline.data import CorruptShardError, backends, open_store, verify_store
from kd_pipeline.data.location import Location
from tests import rawstore
from tests.conftest import write_store


def _manifest(store: Path) -> dict[str, Any]:
    raw: dict[str, Any] = rawstore.load(store)
    return raw


def _forge(store: Path, rel: str, content: bytes) -> None:
    """Replace the store file ``rel`` and make the manifest's size and SHA-256 of it match."""
    (store / rel).write_bytes(content)
    raw = _manifest(store)
    for shard in raw["shards"]:
        if rel == shard["path"]:  # an arrow shard: listed under its own name
            key = rel.rsplit("/", 1)[-1]
        elif rel.startswith(shard["path"] + "/"):
            key = rel.removeprefix(shard["path"] + "/")
        else:
            continue
        shard["files"][key] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    rawstore.save(store, raw)


def _edit_zarr_json(store: Path, column: str, edit: Any) -> None:
    rel = f"shards/shard-000000/{column}/zarr.json"
    meta = json.loads((store / rel).read_text())
    edit(meta)
    _forge(store, rel, json.dumps(meta).encode())


def _refused(store: Path, match: str) -> None:
    """open_store + a read raise CorruptShardError naming shard-000000; verify reports the same."""
    with pytest.raises(CorruptShardError, match=match) as info:
        open_store(store)[0]
    assert "shard-000000" in str(info.value)
    report = verify_store(store)
    assert not report.ok and any("shard-000000" in p for p in report.problems)


# ---------------------------------------------------------------- zarr metadata, checked before decoding


@pytest.mark.parametrize("dtype", ["|O", "object", "float64"])
def test_zarr_object_or_wrong_dtype_is_refused(tmp_path: Path, dtype: object) -> None:
    write_store(tmp_path / "s", "zarr", shards=2)
    _edit_zarr_json(tmp_path / "s", "target_ids", lambda m: m.__setitem__("data_type", dtype))
    _refused(tmp_path / "s", "array 'target_ids': data_type .* the manifest says 'uint16'")


@pytest.mark.parametrize("codec", ["numcodecs.pickle", "vlen-utf8"])
def test_zarr_pickle_or_unknown_codec_is_refused(tmp_path: Path, codec: str) -> None:
    write_store(tmp_path / "s", "zarr", shards=2)

    def inner(meta: dict[str, Any]) -> None:  # inside the sharding codec, where a real pickle codec would sit
        meta["codecs"][0]["configuration"]["codecs"].insert(0, {"name": codec, "configuration": {}})

    _edit_zarr_json(tmp_path / "s", "tail_mass", inner)
    _refused(tmp_path / "s", f"array 'tail_mass': codec '{codec}' is not one of")
    write_store(tmp_path / "t", "zarr", shards=2)
    _edit_zarr_json(tmp_path / "t", "keys", lambda m: m["codecs"].insert(0, {"name": codec}))
    _refused(tmp_path / "t", f"array 'keys': codec '{codec}'")


def test_zarr_shape_larger_than_the_manifest_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_store(tmp_path / "s", "zarr", shards=2)
    huge = 10**12

    def grow(meta: dict[str, Any]) -> None:
        meta["shape"] = [huge, 4]
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [huge, 4]
        meta["codecs"][0]["configuration"]["chunk_shape"] = [huge, 4]

    _edit_zarr_json(tmp_path / "s", "target_ids", grow)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("zarr was asked to open the shard")

    import zarr

    monkeypatch.setattr(zarr, "open_group", no_decoding)
    _refused(tmp_path / "s", r"array 'target_ids': declares shape \[1000000000000, 4\], the manifest says \[\d+, 4\]")


def test_zarr_chunk_larger_than_the_array_is_refused(tmp_path: Path) -> None:
    """A chunk buffer is allocated whole, so a huge declared chunk is as bad as a huge array."""
    write_store(tmp_path / "s", "zarr", shards=2)
    _edit_zarr_json(
        tmp_path / "s", "tail_mass", lambda m: m["codecs"][0]["configuration"].__setitem__("chunk_shape", [10**9])
    )
    _refused(tmp_path / "s", r"array 'tail_mass': chunk shape \[1000000000\] does not fit")


def test_zarr_consolidated_metadata_and_unexpected_arrays_are_refused(tmp_path: Path) -> None:
    write_store(tmp_path / "s", "zarr", shards=2)
    group = json.loads((tmp_path / "s" / "shards/shard-000000/zarr.json").read_text())
    group["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {}}
    _forge(tmp_path / "s", "shards/shard-000000/zarr.json", json.dumps(group).encode())
    _refused(tmp_path / "s", "consolidated")
    # a causal-lm shard holds no labels: an extra (listed, checksummed) array is not read
    write_store(tmp_path / "t", "zarr", shards=2)
    shard = tmp_path / "t" / "shards" / "shard-000000"
    shutil.copytree(shard / "tail_mass", shard / "labels")
    raw = _manifest(tmp_path / "t")
    files = raw["shards"][0]["files"]
    files.update({k.replace("tail_mass/", "labels/"): v for k, v in files.items() if k.startswith("tail_mass/")})
    rawstore.save(tmp_path / "t", raw)
    _refused(tmp_path / "t", "array 'labels' does not belong")


# ---------------------------------------------------------------- arrow schema, checked before reading batches


@pytest.mark.parametrize(
    ("column", "new_type"),
    [
        ("target_logprobs", pa.large_list(pa.list_(pa.float64(), 4))),
        ("input_ids", pa.list_(pa.int64())),
        ("input_ids", pa.large_list(pa.int64())),
        ("tail_mass", pa.large_list(pa.float16())),
        ("target_ids", pa.large_list(pa.list_(pa.uint16(), 5))),
    ],
)
def test_arrow_schema_with_unexpected_types_is_refused(tmp_path: Path, column: str, new_type: pa.DataType) -> None:
    write_store(tmp_path / "s", "arrow", shards=2)
    rel = "shards/shard-000000.arrow"
    with pa.OSFile(str(tmp_path / "s" / rel), "rb") as f:
        table = pa.ipc.open_file(f).read_all()
    i = table.schema.get_field_index(column)
    if column == "target_ids":  # a different K cannot be cast to: build the column from scratch
        values = pa.FixedSizeListArray.from_arrays(pa.array([1] * 5 * 3, pa.uint16()), 5)
        new = pa.LargeListArray.from_arrays(pa.array([0, 3, 3, 3, 3, 3], pa.int64()), values)
    else:
        new = table.column(i).cast(new_type)
    table = table.set_column(i, pa.field(column, new_type), new)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    _forge(tmp_path / "s", rel, sink.getvalue().to_pybytes())
    _refused(tmp_path / "s", f"column '{column}' has type .*, the manifest says")


def test_arrow_unexpected_and_missing_columns_are_refused(tmp_path: Path) -> None:
    write_store(tmp_path / "s", "arrow", shards=2)
    rel = "shards/shard-000000.arrow"
    with pa.OSFile(str(tmp_path / "s" / rel), "rb") as f:
        table = pa.ipc.open_file(f).read_all()
    for forged, match in (
        (table.append_column("payload", pa.array([b"x"] * table.num_rows)), "unexpected columns"),
        (table.drop_columns(["tail_mass"]), "missing columns"),
    ):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, forged.schema) as writer:
            writer.write_table(forged)
        _forge(tmp_path / "s", rel, sink.getvalue().to_pybytes())
        _refused(tmp_path / "s", match)


# ---------------------------------------------------------------- sizes: refused by stat, never by reading


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_a_claimed_terabyte_file_is_refused_without_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    write_store(tmp_path / "s", backend, shards=2)
    raw = _manifest(tmp_path / "s")
    files = raw["shards"][0]["files"]
    victim = max(files, key=lambda k: files[k]["bytes"])
    files[victim]["bytes"] = 10**12
    rawstore.save(tmp_path / "s", raw)

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a shard file was read")

    monkeypatch.setattr(Location, "sha256", no_reading)
    monkeypatch.setattr(backends, "_read_zarr", no_reading)
    monkeypatch.setattr(backends, "_read_arrow", no_reading)
    with pytest.raises(CorruptShardError, match=r"shard-000000: file .* has \d+ bytes, the manifest says 10{12}"):
        open_store(tmp_path / "s")[0]
    monkeypatch.undo()  # verify hashes the other, honest shards
    assert any("the manifest says 1000000000000" in p for p in verify_store(tmp_path / "s").problems)


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_absurd_counts_are_refused_before_any_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """Counts the manifest parser accepts (< 2**40) but that no shard of these few bytes could hold."""
    write_store(tmp_path / "s", backend, shards=2)
    raw = _manifest(tmp_path / "s")
    raw["shards"][0].update(rows=1 << 30, tokens=1 << 36, positions=1 << 36)
    rawstore.save(tmp_path / "s", raw)
    store = open_store(tmp_path / "s")
    monkeypatch.setattr(Location, "size", lambda *a: pytest.fail("a file was looked at"))
    with pytest.raises(CorruptShardError, match="shard-000000: the manifest's counts .* refusing to decode it"):
        store[0]


# ---------------------------------------------------------------- symlinks and files the manifest does not list


def _copy_outside(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest) if src.is_dir() else shutil.copy(src, dest)


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_a_shard_symlinked_outside_the_store_is_refused(tmp_path: Path, backend: str) -> None:
    """An identical shard, so sizes and checksums match: only where it lives is wrong."""
    write_store(tmp_path / "s", backend, shards=2)
    shard = next(p for p in sorted((tmp_path / "s" / "shards").iterdir()))
    (tmp_path / "outside").mkdir()
    _copy_outside(shard, tmp_path / "outside" / shard.name)
    shutil.rmtree(shard) if shard.is_dir() else shard.unlink()
    shard.symlink_to(tmp_path / "outside" / shard.name)
    _refused(tmp_path / "s", "leads outside the store through a symlink")


def test_a_file_symlinked_outside_a_zarr_shard_is_refused(tmp_path: Path) -> None:
    write_store(tmp_path / "s", "zarr", shards=2)
    victim = tmp_path / "s" / "shards" / "shard-000000" / "input_ids" / "zarr.json"
    (tmp_path / "outside.json").write_bytes(victim.read_bytes())
    victim.unlink()
    victim.symlink_to(tmp_path / "outside.json")
    _refused(tmp_path / "s", "leads outside the store")


def test_symlinks_that_stay_inside_the_store(tmp_path: Path) -> None:
    """A shard path may resolve elsewhere inside the store; inside a zarr shard, every entry is a plain file."""
    write_store(tmp_path / "s", "arrow", shards=2)
    shard = tmp_path / "s" / "shards" / "shard-000000.arrow"
    shard.rename(tmp_path / "s" / "moved.arrow")
    shard.symlink_to(tmp_path / "s" / "moved.arrow")
    assert len(list(open_store(tmp_path / "s"))) == 10
    write_store(tmp_path / "t", "zarr", shards=2)
    chunk_dir = tmp_path / "t" / "shards" / "shard-000000" / "tail_mass"
    shutil.move(chunk_dir / "c", tmp_path / "t" / "c")
    (chunk_dir / "c").symlink_to(tmp_path / "t" / "c")
    _refused(tmp_path / "t", "tail_mass/c is a symlink")


def test_files_the_manifest_does_not_list_are_refused(tmp_path: Path) -> None:
    """zarr reads what a folder holds, so a shard folder holds only listed (size-checked) files."""
    write_store(tmp_path / "s", "zarr", shards=2)
    (tmp_path / "s" / "shards" / "shard-000000" / "tail_mass" / "c" / "1").write_bytes(b"\0" * 64)
    _refused(tmp_path / "s", "file tail_mass/c/1 is not listed in the manifest")

"""`data.export.export_store`: a store as one Parquet or Arrow file, read back with plain pyarrow, losslessly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd_pipeline import data
from kd_pipeline.data import Manifest, ShardBuilder, StoreWriter, open_store
from kd_pipeline.data.errors import StoreExistsError
from kd_pipeline.data.export import export_store
from tests.conftest import make_manifest, random_example, write_store

TASKS = ("causal-lm", "seq-cls", "masked-lm")


def _read_back(path: Path, to: str) -> pa.Table:
    if to == "parquet":
        return pq.read_table(path)
    with pa.OSFile(str(path), "rb") as f:
        return pa.ipc.open_file(f).read_all()


def _assert_export_equals_store(table: pa.Table, store_path: Path) -> None:
    """Every array of every example, dtype included, as data.open_store returns it."""
    store = open_store(store_path)
    assert table.num_rows == len(store)
    rows = table.to_pylist()
    for row, ex in zip(rows, store, strict=True):
        assert row["key"] == ex["key"].tobytes()
        for name in ("input_ids", "target_ids", "target_logprobs", "tail_mass", "positions"):
            if name not in ex:
                assert name not in row
                continue
            got = np.asarray(row[name], dtype=ex[name].dtype).reshape(ex[name].shape)
            np.testing.assert_array_equal(got, ex[name], strict=True)
        if store.manifest.task == "masked-lm":
            np.testing.assert_array_equal(np.asarray(row["label"], dtype=ex["label"].dtype), ex["label"])
        elif store.manifest.task == "seq-cls":
            assert [row["label"]] == ex["label"].tolist()
        else:
            assert "label" not in row  # derived: input_ids[1:]
    # the column types carry the store's dtypes, so a reader needs no cast to get the same values
    t = store.manifest.targets
    ids = pa.from_numpy_dtype(np.dtype(t.id_dtype))
    assert table.schema.field("key").type == pa.binary(16)
    assert table.schema.field("input_ids").type == pa.list_(ids)
    assert table.schema.field("target_ids").type == pa.list_(pa.list_(ids, t.k))
    lp = pa.from_numpy_dtype(np.dtype(t.logprob_dtype))
    assert table.schema.field("target_logprobs").type == pa.list_(pa.list_(lp, t.k))
    assert table.schema.field("tail_mass").type == pa.list_(pa.float32())


@pytest.mark.parametrize("to", ["parquet", "arrow"])
@pytest.mark.parametrize("task", TASKS)
def test_export_is_lossless(tmp_path: Path, backend: str, task: str, to: str) -> None:
    write_store(tmp_path / "s", backend, task, shards=3, rows=4)
    out = tmp_path / "out" / f"s.{to}"
    summary = export_store(tmp_path / "s", to=to, out=out)  # type: ignore[arg-type]
    assert summary["rows"] == 12 and summary["files"] == 1 and summary["bytes"] == out.stat().st_size > 0
    assert summary["shards"] == 3 and summary["path"] == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary file left behind
    table = _read_back(out, to)
    _assert_export_equals_store(table, tmp_path / "s")
    meta = json.loads(table.schema.metadata[b"kd-soft-labels"])
    assert Manifest.from_dict(meta) == open_store(tmp_path / "s").manifest  # provenance, readable as a manifest
    assert "decoded" in meta["export"]["targets"]
    if to == "parquet":
        assert pq.ParquetFile(out).num_row_groups == 3  # one per shard: the export streams shard by shard


@pytest.mark.parametrize("value_dtype", ["float32", "q8"])
def test_export_of_float32_and_q8_stores_holds_decoded_values(tmp_path: Path, value_dtype: str) -> None:
    spec = data.TargetSpec("topk", 3, 1.0, 50, value_dtype, "uint16")
    m = Manifest(backend="zarr", task="causal-lm", targets=spec, vocab_size=50)
    rng = np.random.default_rng(1)
    with StoreWriter(tmp_path / "s", m) as w:
        b = ShardBuilder("causal-lm", spec)
        for _ in range(5):
            ex = random_example(rng, "causal-lm", spec, 50)
            b.add(ex["input_ids"], ex["target_ids"], ex["target_logprobs"], ex["tail_mass"])
        w.write_shard(0, b.build())
        w.finish()
    export_store(tmp_path / "s", to="parquet", out=tmp_path / "s.parquet")
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.schema.field("target_logprobs").type == pa.list_(pa.list_(pa.float32(), 3))
    _assert_export_equals_store(table, tmp_path / "s")


@pytest.mark.parametrize("to", ["parquet", "arrow"])
@pytest.mark.parametrize("task", TASKS)
def test_export_of_sampled_stores_holds_ids_and_counts_per_position(
    tmp_path: Path, backend: str, task: str, to: str
) -> None:
    from tests.test_sampled import sampled_manifest, write_sampled_store

    m = sampled_manifest(backend, task, n=300)  # 300 draws: uint16 counts
    write_sampled_store(tmp_path / "s", m, [3, 0, 4])
    export_store(tmp_path / "s", to=to, out=tmp_path / f"s.{to}")  # type: ignore[arg-type]
    table = _read_back(tmp_path / f"s.{to}", to)
    store = open_store(tmp_path / "s")
    t = store.manifest.targets
    assert t.count_dtype == "uint16"
    assert table.schema.field("target_ids").type == pa.list_(pa.list_(pa.from_numpy_dtype(np.dtype(t.id_dtype))))
    assert table.schema.field("target_counts").type == pa.list_(pa.list_(pa.uint16()))
    assert "target_logprobs" not in table.schema.names and "tail_mass" not in table.schema.names
    assert "300 draws" in json.loads(table.schema.metadata[b"kd-soft-labels"])["export"]["targets"]
    rows = table.to_pylist()
    assert len(rows) == len(store) == 7
    for row, ex in zip(rows, store, strict=True):
        np.testing.assert_array_equal(np.asarray(row["input_ids"], dtype=ex["input_ids"].dtype), ex["input_ids"])
        off = ex["target_offsets"]
        assert len(row["target_ids"]) == len(row["target_counts"]) == len(off) - 1
        for p, (got_ids, got_counts) in enumerate(zip(row["target_ids"], row["target_counts"], strict=True)):
            assert got_ids == ex["target_ids"][off[p] : off[p + 1]].tolist()
            assert got_counts == ex["target_counts"][off[p] : off[p + 1]].tolist()
            assert sum(got_counts) == 300
        if task == "masked-lm":
            assert row["positions"] == ex["positions"].tolist()


def test_export_refuses_to_clobber_and_replaces_atomically(tmp_path: Path) -> None:
    write_store(tmp_path / "s", shards=1)
    out = tmp_path / "s.arrow"
    out.write_bytes(b"precious")
    with pytest.raises(StoreExistsError, match="already exists"):
        export_store(tmp_path / "s", to="arrow", out=out)
    assert out.read_bytes() == b"precious"
    export_store(tmp_path / "s", to="arrow", out=out, overwrite=True)
    assert _read_back(out, "arrow").num_rows == 5
    with pytest.raises(ValueError, match="one of parquet, arrow"):
        export_store(tmp_path / "s", to="csv", out=tmp_path / "x")  # type: ignore[arg-type]


def test_a_failed_export_leaves_nothing(tmp_path: Path) -> None:
    """A store that fails its checks mid-export leaves neither ``out`` nor a temporary file."""
    write_store(tmp_path / "s", shards=2)
    victim = next((tmp_path / "s" / "shards" / "shard-000001" / "tail_mass" / "c").rglob("*"))
    victim.write_bytes(victim.read_bytes()[:-1])
    out = tmp_path / "out" / "s.parquet"
    with pytest.raises(data.CorruptShardError, match="shard-000001"):
        export_store(tmp_path / "s", to="parquet", out=out)
    assert list(out.parent.iterdir()) == []


def test_empty_and_incomplete_stores(tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "e", make_manifest()) as w:
        w.finish()
    summary = export_store(tmp_path / "e", to="parquet", out=tmp_path / "e.parquet")
    assert summary["rows"] == 0 and pq.read_table(tmp_path / "e.parquet").num_rows == 0
    write_store(tmp_path / "i", shards=2, finish=False)
    with pytest.raises(data.IncompleteStoreError):
        export_store(tmp_path / "i", to="arrow", out=tmp_path / "i.arrow")
    assert export_store(tmp_path / "i", to="arrow", out=tmp_path / "i.arrow", allow_incomplete=True)["rows"] == 10


def test_cli_export(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kd_pipeline.pipeline.cli import cli

    write_store(tmp_path / "s", shards=2)
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(tmp_path / "s"), str(tmp_path / "s.parquet")])
    assert result.exit_code == 0, result.output
    assert "parquet, 10 examples" in result.output
    _assert_export_equals_store(pq.read_table(tmp_path / "s.parquet"), tmp_path / "s")
    # an existing file is refused with one line, and kept
    before = (tmp_path / "s.parquet").read_bytes()
    result = runner.invoke(cli, ["export", str(tmp_path / "s"), str(tmp_path / "s.parquet")])
    assert result.exit_code == 1 and "already exists" in result.output and "Traceback" not in result.output
    assert (tmp_path / "s.parquet").read_bytes() == before
    # the format from --to when the suffix does not say, uncompressed arrow
    args = ["export", str(tmp_path / "s"), str(tmp_path / "s.bin"), "--to", "arrow", "--compression", "none"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    _assert_export_equals_store(_read_back(tmp_path / "s.bin", "arrow"), tmp_path / "s")
    result = runner.invoke(cli, ["export", str(tmp_path / "s"), str(tmp_path / "s.csv")])
    assert result.exit_code == 2 and "--to parquet|arrow" in result.output
    result = runner.invoke(cli, ["export", str(tmp_path / "missing"), str(tmp_path / "m.parquet")])
    assert result.exit_code == 1 and result.output.startswith("Error:") and not (tmp_path / "m.parquet").exists()

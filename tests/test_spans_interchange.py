"""Stores labelled with --spans through `pipeline export`, `pipeline merge` and `pipeline verify`: the source texts,
token spans and the teacher's strings (tokens.json) survive, each checked against the store's own files."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from kd_pipeline import data
from kd_pipeline.data.export import TOKEN_STRINGS_KEY
from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.label import LabelConfig
from kd_pipeline.stages.label import run as label

from .test_scale_out import assert_same_store
from .tiny import labelling_world, write_jsonl

DOCS = [
    "the teacher labels the data once",
    "naïve café – the student learns  from   the teacher",  # unicode, runs of spaces
    "python is a programming language with readable syntax and many libraries",
    "ünïcödé everywhere: 数据 and ελληνικά",
    "a fifth short text",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    w = labelling_world(tmp_path_factory.mktemp("spans-io"))
    w["docs"] = write_jsonl(w["root"] / "docs.jsonl", [{"text": t} for t in DOCS])
    w["args"] = {"teacher": str(w["root"] / "teacher"), "data": str(w["docs"]), "top_k": 4, "spans": True}
    single = LabelConfig(out=str(w["root"] / "single"), shard_size=8, method="hybrid", samples=6, **w["args"])
    label(single, log=lambda m: None)
    return w


def _tamper(path: Path) -> None:
    """One letter of ``path`` changed: the same size, other content."""
    body = path.read_bytes()
    i = re.search(rb"[a-z]", body).start()  # type: ignore[union-attr]
    path.write_bytes(body[:i] + (b"b" if body[i : i + 1] != b"b" else b"c") + body[i + 1 :])


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_export_keeps_texts_spans_and_token_strings(world: dict[str, Any], tmp_path: Path, fmt: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = world["root"] / "single"
    out = tmp_path / f"out.{fmt}"
    result = _run("export", str(store), str(out), "--to", fmt)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out) if fmt == "parquet" else pa.ipc.open_file(str(out)).read_all()
    assert table.column("text").to_pylist() == DOCS  # the source texts, as the label run read them
    spans = table.column("token_spans").to_pylist()
    for ex, got in zip(data.open_store(store), spans, strict=True):
        assert np.array_equal(np.array(got, dtype=np.int32).reshape(-1, 2), ex["token_spans"])
    body = table.schema.metadata[TOKEN_STRINGS_KEY.encode()]
    assert body == (store / "tokens.json").read_bytes()
    manifest = json.loads(table.schema.metadata[b"kd-soft-labels"])
    assert hashlib.sha256(body).hexdigest() == manifest["tokenizer"]["token_strings"]["sha256"]


def test_export_refuses_tampered_token_strings_in_one_line(world: dict[str, Any], tmp_path: Path) -> None:
    store = tmp_path / "s"
    shutil.copytree(world["root"] / "single", store)
    _tamper(store / "tokens.json")
    result = _run("export", str(store), str(tmp_path / "x.parquet"), "--to", "parquet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert "tokens.json: does not match its SHA-256" in line


def test_merged_parts_equal_one_job(world: dict[str, Any], tmp_path: Path) -> None:
    """Two --num-shards jobs with --spans, merged: the same store as one job (every column, texts and spans
    included), the same tokens.json, and it verifies."""
    parts = []
    for i in range(2):
        out = tmp_path / f"part{i}"
        cfg = LabelConfig(
            out=str(out), shard_size=8, method="hybrid", samples=6, num_shards=2, shard_index=i, **world["args"]
        )
        label(cfg, log=lambda m: None)
        assert (out / "tokens.json").is_file()
        parts.append(str(out))
    result = _run("merge", str(tmp_path / "merged"), *parts)
    assert result.exit_code == 0, result.output
    single = world["root"] / "single"
    assert_same_store(single, tmp_path / "merged")  # shard by shard, every column (text, token_spans too)
    assert "text" in data.open_store(tmp_path / "merged")[0]
    assert (tmp_path / "merged" / "tokens.json").read_bytes() == (single / "tokens.json").read_bytes()
    # a part whose teacher strings were tampered with is refused, in one line
    shutil.copytree(parts[1], tmp_path / "bad1")
    (tmp_path / "bad1" / "tokens.json").write_bytes(b"[]")
    result = _run("merge", str(tmp_path / "m2"), str(tmp_path / "bad1"), parts[0])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert "tokens.json" in line


def test_verify_checks_token_strings(world: dict[str, Any], tmp_path: Path) -> None:
    store = tmp_path / "s"
    shutil.copytree(world["root"] / "single", store)
    assert data.verify_store(store).ok
    clean = data.verify_store(store)
    _tamper(store / "tokens.json")
    report = data.verify_store(store)
    assert not report.ok and report.files_checked == clean.files_checked
    assert any("tokens.json: does not match its SHA-256" in p for p in report.problems), report.problems
    result = _run("verify", str(store))
    assert result.exit_code != 0 and "tokens.json" in result.output
    (store / "tokens.json").unlink()
    report = data.verify_store(store)
    assert any("tokens.json: missing" in p for p in report.problems), report.problems

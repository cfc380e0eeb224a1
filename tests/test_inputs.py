"""Label inputs: every accepted data format gives the same examples; bad data gives a clear DataError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from kd_pipeline.stages.inputs import DataError, load_records, prepare_examples
from tests.tiny import SENTENCES, make_tokenizer

ROWS = [{"text": s, "label": i % 3} for i, s in enumerate(SENTENCES)]


def _write_all(root: Path) -> dict[str, Path]:
    table = pa.Table.from_pylist(ROWS)
    paths = {"jsonl": root / "d.jsonl", "parquet": root / "d.parquet", "csv": root / "d.csv", "txt": root / "d.txt"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pq.write_table(table, paths["parquet"])
    pcsv.write_csv(table, paths["csv"])
    paths["txt"].write_text("\n\n".join(r["text"] for r in ROWS) + "\n")
    saved = root / "saved"  # the layout `datasets.Dataset.save_to_disk` writes: Arrow stream files + json
    saved.mkdir()
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (saved / "dataset_info.json").write_text("{}")
    (saved / "state.json").write_text("{}")
    paths["saved"] = saved
    folder = root / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    pq.write_table(pa.Table.from_pylist(ROWS[3:]), folder / "b.parquet")
    paths["folder"] = folder
    return paths


def test_every_format_reads_the_same_records(tmp_path: Path) -> None:
    paths = _write_all(tmp_path)
    texts = [r["text"] for r in ROWS]
    for kind, path in paths.items():
        records, fingerprint = load_records(str(path))
        assert [r["text"] for r in records] == texts, kind
        assert len(fingerprint) == 64
        if kind not in ("txt",):
            assert [int(r["label"]) for r in records] == [r["label"] for r in ROWS], kind
    # the fingerprint follows the bytes
    before = load_records(str(paths["jsonl"]))[1]
    paths["jsonl"].write_text(paths["jsonl"].read_text() + json.dumps({"text": "one more"}) + "\n")
    assert load_records(str(paths["jsonl"]))[1] != before


def test_pre_tokenised_ids_and_truncation(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tok")
    records: list[dict[str, Any]] = [{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [1]}, {"input_ids": [4, 3]}]
    examples = prepare_examples(
        records, tok, task="causal-lm", text_field="text", label_field=None, max_length=4, pack=False
    )
    assert [e.input_ids.tolist() for e in examples] == [[5, 6, 7, 8], [4, 3]]  # 1-token docs have no target
    tokenised = prepare_examples(
        [{"text": SENTENCES[0]}], tok, task="causal-lm", text_field="text", label_field=None, max_length=512, pack=False
    )
    assert tokenised[0].input_ids.tolist() == tok(SENTENCES[0])["input_ids"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no records"),
        ("{not json}\n", "not a JSON object per line"),
    ],
)
def test_bad_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_records(str(path))


def test_missing_paths_fields_and_labels(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(str(tmp_path / "d.xml"))
    tok = make_tokenizer(tmp_path / "tok")
    with pytest.raises(DataError, match="no text field 'body'"):
        prepare_examples(ROWS, tok, task="causal-lm", text_field="body", label_field=None, max_length=8, pack=False)
    with pytest.raises(DataError, match="outside the teacher's 3 classes"):
        prepare_examples(
            [{"text": "a b", "label": 7}],
            tok,
            task="seq-cls",
            text_field="text",
            label_field="label",
            max_length=8,
            pack=False,
            num_labels=3,
        )
    labelled = prepare_examples(
        [{"text": "a b", "label": "class2"}],
        tok,
        task="seq-cls",
        text_field="text",
        label_field="label",
        max_length=8,
        pack=False,
        label2id={"class2": 2},
        num_labels=3,
    )
    assert labelled[0].label == 2


def test_streamed_units_pack_like_the_whole_input_and_skip_others_untokenised(tmp_path: Path) -> None:
    from kd_pipeline.stages.units import UnitSpec, stream_units

    tok = make_tokenizer(tmp_path / "tok")
    docs = [{"text": s} for s in SENTENCES * 5]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    files = [(path, "jsonl")]
    # packed: batches of 3 records carry their remainder, so the sequences equal packing everything at once
    whole = prepare_examples(docs, tok, task="causal-lm", text_field="text", label_field=None, max_length=7, pack=True)
    spec = UnitSpec(tok, "causal-lm", "text", None, 7, True, 3)
    units = list(stream_units(files, spec, lambda u: True))
    streamed = [x.input_ids.tolist() for u in units for x in u.examples or []]
    assert streamed == [x.input_ids.tolist() for x in whole] and len(units) == -(-len(whole) // 3)
    # unpacked: unit u = records [4u, 4u + 4); the records of units not wanted are never tokenised
    texts: list[str] = []

    def counting(batch: list[str], **kw: Any) -> Any:
        texts.extend(batch)
        return tok(batch, **kw)

    counting.eos_token_id = tok.eos_token_id  # type: ignore[attr-defined]
    spec = UnitSpec(counting, "causal-lm", "text", None, 64, False, 4)
    units = list(stream_units(files, spec, lambda u: u % 2 == 1))
    assert [u.index for u in units] == list(range(10)) and [u.records_read for u in units][-1] == 40
    assert texts == [d["text"] for u in range(1, 10, 2) for d in docs[4 * u : 4 * u + 4]]
    assert all((u.examples is None) == (u.index % 2 == 0) for u in units)

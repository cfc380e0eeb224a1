"""`pipeline label --spans`: source texts, token byte spans and the teacher's strings in the store; their value
checks; older stores still read and refused for cross-tokenizer training with one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from kd_pipeline import data
from kd_pipeline.data.errors import CorruptShardError, IncompatibleStoreError
from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.label import LabelConfig, LabelConfigError
from kd_pipeline.stages.label import run as label
from kd_pipeline.stages.source_spans import byte_spans

from .tiny import labelling_world, write_jsonl

DOCS = [
    "the teacher labels the data once",
    "naïve café – the student learns  from   the teacher",  # unicode, an unknown word, runs of spaces
    "python is a programming language with readable syntax and many libraries",
]


def _quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    w = labelling_world(tmp_path_factory.mktemp("spans"))
    w["docs"] = write_jsonl(w["root"] / "unicode.jsonl", [{"text": t} for t in DOCS])
    return w


def _label(w: dict[str, Any], out: Path, **kw: Any) -> data.StoreReader:
    cfg = LabelConfig(teacher=str(w["root"] / "teacher"), data=str(w["docs"]), out=str(out), top_k=4, **kw)
    label(cfg, log=_quiet)
    return data.open_store(str(out))


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
@pytest.mark.parametrize("method", ["topk", "sample", "hybrid"])
def test_spans_cover_each_token_text(world: dict[str, Any], tmp_path: Path, backend: str, method: str) -> None:
    from transformers import AutoTokenizer

    store = _label(world, tmp_path / "s", spans=True, format=backend, method=method, samples=8)
    tok = AutoTokenizer.from_pretrained(world["root"] / "teacher")
    assert store.manifest.dataset["spans"] == "utf-8"
    assert data.verify_store(str(tmp_path / "s")).ok
    for doc, ex in zip(DOCS, store, strict=True):
        text = bytes(ex["text"])
        assert doc.encode().startswith(text) and text == doc.encode()  # not truncated at max_length 512
        for tid, (s, e) in zip(ex["input_ids"].tolist(), ex["token_spans"].tolist(), strict=True):
            piece = text[s:e].decode()
            # the word-level teacher: a token's text is its word, or an unknown word for [UNK]
            assert piece == tok.convert_ids_to_tokens(tid) or (tid == tok.unk_token_id and piece in doc.split())
    # hand-checked: "naïve" is 6 bytes (ï is 2), then a space, "café" 5 bytes, a space, "–" 3 bytes
    spans = store[1]["token_spans"].tolist()
    assert spans[:3] == [[0, 6], [7, 12], [13, 16]]
    strings = data.source_text.read_token_strings(store.location, store.manifest)
    assert len(strings) == store.manifest.targets.num_classes
    for i in range(len(tok)):
        word = tok.convert_ids_to_tokens(i)
        assert strings[i] == (None if word in tok.all_special_tokens else word)


def test_byte_spans_from_character_offsets() -> None:
    text = "aé😀 b"  # 1, 2, 4, 1, 1 bytes
    got = byte_spans(text, [(0, 1), (1, 2), (2, 3), (4, 5), (0, 0)])
    # the last, empty (special) token sits where the text before it ends
    assert got.tolist() == [[0, 1], [1, 3], [3, 7], [8, 9], [9, 9]]


def test_truncated_example_keeps_text_up_to_its_last_token(world: dict[str, Any], tmp_path: Path) -> None:
    store = _label(world, tmp_path / "s", spans=True, max_length=3)
    ex = store[2]
    assert ex["token_spans"].shape == (3, 2)
    assert bytes(ex["text"]) == b"python is a"


def test_resume_with_spans_and_refusals(world: dict[str, Any], tmp_path: Path) -> None:
    _label(world, tmp_path / "s", spans=True)
    again = LabelConfig(teacher=str(world["root"] / "teacher"), data=str(world["docs"]), out=str(tmp_path / "s"))
    again.top_k, again.spans = 4, True
    assert label(again, log=_quiet).resumed_units == 1  # tokens.json present and matching: resumes
    for bad in ({"pack": True}, {"task": "masked-lm"}):
        with pytest.raises(LabelConfigError, match="--spans"):
            LabelConfig(out="x", spans=True, **bad).validate()


def test_store_without_spans_reads_and_is_refused_for_cross_tokenizer(world: dict[str, Any], tmp_path: Path) -> None:
    store = _label(world, tmp_path / "plain")
    assert "text" not in store[0] and "spans" not in store.manifest.dataset
    assert data.verify_store(str(tmp_path / "plain")).ok
    with pytest.raises(IncompatibleStoreError, match="label the data again with `pipeline label --spans`"):
        data.source_text.read_token_strings(store.location, store.manifest)


def test_tampered_token_strings_are_refused(world: dict[str, Any], tmp_path: Path) -> None:
    _label(world, tmp_path / "s", spans=True)
    path = tmp_path / "s" / "tokens.json"
    body = json.loads(path.read_text())
    body[5] = "x" * len(body[5])  # same size, other content
    path.write_text(json.dumps(body, separators=(",", ":")))
    store = data.open_store(str(tmp_path / "s"))
    with pytest.raises(CorruptShardError, match="does not match its SHA-256"):
        data.source_text.read_token_strings(store.location, store.manifest)
    path.unlink()
    with pytest.raises(CorruptShardError, match="missing"):
        data.source_text.read_token_strings(store.location, store.manifest)


def _spec() -> data.TargetSpec:
    return data.TargetSpec(method="topk", k=2, temperature=1.0, num_classes=10)


def _shard(spans: list[list[int]], text: bytes) -> data.ShardData:
    b = data.ShardBuilder("causal-lm", _spec())
    lp = np.log(np.array([[0.5, 0.25]] * 2))
    b.add([1, 2, 3], [[1, 2], [3, 4]], lp, [0.25, 0.25])
    b.add_source(text, spans)
    return b.build()


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        ([[0, 3], [4, 9], [10, 14]], r"example 0, token 2: span \[10, 14\); expected 0 <= start <= end <= 13"),
        ([[0, 3], [2, 1], [4, 8]], r"token 1: span \[2, 1\); expected 0 <= start <= end"),
        ([[0, 3], [8, 13], [4, 7]], r"token 2: span \[4, 7\) after \[8, 13\); expected spans in text order"),
        ([[-1, 3], [4, 8], [9, 13]], r"token 0: span \[-1, 3\)"),
        ([[0, 3], [4, 9], [5, 7]], r"token 2: span \[5, 7\) after \[4, 9\); expected spans in text order"),
    ],
)
def test_hostile_spans_get_one_line_errors(spans: list[list[int]], message: str) -> None:
    text = b"the cat sat !"  # 13 bytes
    _shard([[0, 3], [4, 7], [8, 11]], text).validate("causal-lm", _spec(), 10, "shard-000000")  # a sane one passes
    with pytest.raises(CorruptShardError, match=message) as e:
        _shard(spans, text).validate("causal-lm", _spec(), 10, "shard-000000")
    assert "\n" not in str(e.value)


def test_cli_label_spans_flag(world: dict[str, Any], tmp_path: Path) -> None:
    args = ["label", "--teacher", str(world["root"] / "teacher"), "--data", str(world["docs"])]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "s"), "--spans", "--top-k", "4"])
    assert result.exit_code == 0, result.output
    assert data.open_store(str(tmp_path / "s")).manifest.dataset["spans"] == "utf-8"
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "p"), "--spans", "--pack"])
    assert result.exit_code == 1
    assert "--spans applies to causal-lm without --pack" in result.output and "Traceback" not in result.output


def test_hostile_text_offsets_get_one_line_errors() -> None:
    shard = _shard([[0, 3], [4, 7], [8, 11]], b"the cat sat !")
    assert shard.text_offsets is not None
    shard.text_offsets[-1] = 12  # one byte short of the text column
    with pytest.raises(CorruptShardError, match=r"'text_offsets' runs from 0 to 12; expected a non-decreasing run"):
        shard.validate("causal-lm", _spec(), 10, "shard-000000")

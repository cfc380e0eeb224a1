"""Shards sized by tokens (`pipeline label --shard-tokens N`, the default): the real labeler and writer, the unit
boundaries checked against a greedy cut written out here, resume, independent jobs + merge, torchrun ranks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from kd_pipeline import data
from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.label import LabelConfig
from kd_pipeline.stages.label import run as label
from tests import rawstore
from tests.test_scale_out import assert_same_store, torchrun
from tests.tiny import SENTENCES, make_model, make_tokenizer, write_jsonl

MAX_LENGTH = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("shard-tokens")
    tok = make_tokenizer(root / "tok")
    make_model(root / "teacher", "causal-lm", vocab_size=len(tok))
    # lengths from 1 word (dropped: nothing to predict) to whole sentences (truncated to MAX_LENGTH)
    texts = [" ".join(s.split()[: 1 + (i * 5) % 14]) for i, s in enumerate(SENTENCES * 4)]
    docs = write_jsonl(root / "docs.jsonl", [{"text": t} for t in texts])
    args = {"teacher": str(root / "teacher"), "data": str(docs), "top_k": 4, "max_length": MAX_LENGTH}
    return {"root": root, "tok": tok, "texts": texts, "args": args}


def _quiet(msg: str) -> None:
    pass


def _greedy(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive lengths grouped while their sum stays <= budget (the next one that would not fit starts a group)."""
    groups: list[list[int]] = [[]]
    for n in lengths:
        if groups[-1] and sum(groups[-1]) + n > budget:
            groups.append([])
        groups[-1].append(n)
    return groups


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_units_hold_at_most_n_tokens_in_input_order(world: dict[str, Any], tmp_path: Path, backend: str) -> None:
    label(LabelConfig(out=str(tmp_path / "s"), shard_tokens=30, format=backend, **world["args"]), log=_quiet)
    store = data.open_store(tmp_path / "s")
    m = store.manifest
    # the examples, independently: each text tokenised alone, truncated, those under 2 tokens dropped
    expected = [ids[:MAX_LENGTH] for ids in (world["tok"](t)["input_ids"] for t in world["texts"])]
    expected = [ids for ids in expected if len(ids) >= 2]
    groups = _greedy([len(ids) for ids in expected], 30)
    assert len(groups) > 3 and max(sum(g) for g in groups) <= 30
    assert [s.tokens for s in m.shards] == [sum(g) for g in groups]
    assert [s.rows for s in m.shards] == [len(g) for g in groups]
    assert [ex["input_ids"].tolist() for ex in store] == expected
    assert m.config["shard_tokens"] == 30 and "shard_size" not in m.config  # recorded, resolved
    assert data.verify_store(tmp_path / "s").ok


def test_unit_boundaries_for_every_budget(world: dict[str, Any]) -> None:
    """The streamed cut (tokeniser only, no teacher) equals the greedy cut at every budget, exact fits included,
    and a process that labels only some units gets the same boundaries."""
    from kd_pipeline.stages.inputs import input_files
    from kd_pipeline.stages.units import UnitSpec, stream_units

    files = input_files(world["args"]["data"])
    expected = [ids[:MAX_LENGTH] for ids in (world["tok"](t)["input_ids"] for t in world["texts"])]
    lengths = [len(ids) for ids in expected if len(ids) >= 2]
    for budget in range(MAX_LENGTH, 3 * MAX_LENGTH):
        spec = UnitSpec(world["tok"], "causal-lm", "text", None, MAX_LENGTH, False, 0, shard_tokens=budget)
        units = list(stream_units(files, spec, lambda u: True))
        assert [u.index for u in units] == list(range(len(units)))
        assert [[len(x.input_ids) for x in u.examples or []] for u in units] == _greedy(lengths, budget), budget
        odd = list(stream_units(files, spec, lambda u: u % 2 == 1))
        assert [u.examples is None for u in odd] == [i % 2 == 0 for i in range(len(units))]
        assert [len(u.examples or []) for u in odd[1::2]] == [len(u.examples or []) for u in units[1::2]]


def test_packed_units_are_whole_sequences_within_n_tokens(world: dict[str, Any], tmp_path: Path) -> None:
    label(LabelConfig(out=str(tmp_path / "p"), shard_tokens=20, pack=True, **world["args"]), log=_quiet)
    store = data.open_store(tmp_path / "p")
    # every document's tokens and an EOS, cut into sequences of MAX_LENGTH (a last piece under 2 tokens dropped)
    total = sum(len(world["tok"](t, add_special_tokens=False)["input_ids"]) + 1 for t in world["texts"])
    lengths = [MAX_LENGTH] * (total // MAX_LENGTH) + ([total % MAX_LENGTH] if total % MAX_LENGTH >= 2 else [])
    groups = _greedy(lengths, 20)  # one 12-token sequence per unit: two would be 24 > 20
    assert [s.tokens for s in store.manifest.shards] == [sum(g) for g in groups]
    assert [len(ex["input_ids"]) for ex in store] == lengths


def test_default_is_a_million_tokens_per_shard(world: dict[str, Any], tmp_path: Path) -> None:
    cfg = LabelConfig(out=str(tmp_path / "d"), **world["args"])
    assert cfg.shard_tokens is None and cfg.shard_size is None
    label(cfg, log=_quiet)
    m = data.open_store(tmp_path / "d").manifest
    assert m.config["shard_tokens"] == 1 << 20 and len(m.shards) == 1  # the tiny corpus is one unit
    # the same store whether the default is given or written out
    label(LabelConfig(out=str(tmp_path / "d"), shard_tokens=1 << 20, **world["args"]), log=_quiet)


def test_resume_after_a_partial_run_equals_one_run(world: dict[str, Any], tmp_path: Path) -> None:
    args = {**world["args"], "shard_tokens": 30}
    label(LabelConfig(out=str(tmp_path / "full"), **args), log=_quiet)
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    raw = rawstore.load(tmp_path / "part")  # what a crash after 2 committed units leaves
    raw["complete"] = False
    raw["shards"] = raw["shards"][:2]
    rawstore.save(tmp_path / "part", raw)
    for other, field in (({"shard_tokens": 31}, "config.shard_tokens"), ({"shard_size": 5}, "config.shard_size")):
        with pytest.raises(data.StoreExistsError, match=field):
            label(LabelConfig(out=str(tmp_path / "part"), **{**world["args"], **other}), log=_quiet)
    result = label(LabelConfig(out=str(tmp_path / "part"), **args), log=_quiet)
    units = len(data.open_store(tmp_path / "full").manifest.shards)
    assert result.resumed_units == 2 and result.labelled_units == units - 2
    assert_same_store(tmp_path / "full", tmp_path / "part")


def test_jobs_and_torchrun_ranks_equal_one_process(world: dict[str, Any], tmp_path: Path) -> None:
    args = {**world["args"], "shard_tokens": 30}
    label(LabelConfig(out=str(tmp_path / "single"), **args), log=_quiet)
    parts = []
    for i in range(3):
        parts.append(str(tmp_path / f"part{i}"))
        label(LabelConfig(out=parts[-1], num_shards=3, shard_index=i, **args), log=_quiet)
        assert all(s.unit % 3 == i for s in data.open_store(parts[-1]).manifest.shards)
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "merged"), *parts])
    assert result.exit_code == 0, result.output
    assert_same_store(tmp_path / "single", tmp_path / "merged")
    a = world["args"]
    proc = torchrun(
        "label", "--teacher", a["teacher"], "--data", a["data"], "--top-k", "4", "--max-length", str(MAX_LENGTH),
        "--shard-tokens", "30", "--out", str(tmp_path / "ranked"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_store(tmp_path / "single", tmp_path / "ranked")


def test_bad_unit_sizes_are_one_line_errors(world: dict[str, Any], tmp_path: Path) -> None:
    a = world["args"]
    good = ["label", "--teacher", a["teacher"], "--data", a["data"], "--out", str(tmp_path / "x")]
    cases = {
        "not both": ["--shard-size", "4", "--shard-tokens", "100"],
        "--shard-tokens must be >= --max-length (12)": ["--max-length", "12", "--shard-tokens", "11"],
        "--shard-size must be >= 1": ["--shard-size", "0"],
    }
    for message, extra in cases.items():
        result = CliRunner().invoke(cli, [*good, *extra])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_units_by_examples_are_unchanged(world: dict[str, Any], tmp_path: Path) -> None:
    """--shard-size S still cuts units of S input records (short ones dropped from their unit), as stores made
    before --shard-tokens were, and records it the same way."""
    label(LabelConfig(out=str(tmp_path / "s"), shard_size=5, **world["args"]), log=_quiet)
    m = data.open_store(tmp_path / "s").manifest
    lengths = [len(world["tok"](t)["input_ids"][:MAX_LENGTH]) for t in world["texts"]]
    per_unit = [[n for n in lengths[u : u + 5] if n >= 2] for u in range(0, len(lengths), 5)]
    assert [s.rows for s in m.shards] == [len(g) for g in per_unit]
    assert [s.tokens for s in m.shards] == [sum(g) for g in per_unit]
    assert m.config["shard_size"] == 5 and "shard_tokens" not in m.config
    assert np.sum([s.rows for s in m.shards]) == sum(n >= 2 for n in lengths)

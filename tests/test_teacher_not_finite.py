"""A teacher whose logits are NaN at some positions (a float16 overflow, a corrupt checkpoint): `pipeline label`
stops with one line naming the work unit, example and position, for every method and draw scheme, and the
shards committed before it stay committed and verifiable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from kd_pipeline.data import open_store
from kd_pipeline.pipeline.cli import cli
from tests.tiny import SENTENCES, make_model, make_tokenizer, write_jsonl

POISON = "python"  # a word of one sentence only: its embedding row is made NaN
SHARD = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Units 0 and 1 without the poisoned word; unit 2 holds it in one example (its 7th), the rest clean. Batches
    of 4 go longest first, so the poisoned example is the second of unit 2's second batch: the error must find
    its row past another example's."""
    root = tmp_path_factory.mktemp("notfinite")
    tok = make_tokenizer(root / "tok")
    clean = [s for s in SENTENCES if POISON not in s.split()]
    poisoned = next(s for s in SENTENCES if POISON in s.split())
    texts = [clean[i % len(clean)] for i in range(2 * SHARD)] + clean[:6] + [poisoned] + clean[6:7]
    docs = [{"text": t, "label": i % 3} for i, t in enumerate(texts)]
    ids = tok(poisoned)["input_ids"]
    out: dict[str, Any] = {"root": root, "data": write_jsonl(root / "docs.jsonl", docs)}
    out["position"] = ids.index(tok.convert_tokens_to_ids(POISON))
    assert out["position"] < len(ids) - 1  # a stored causal-LM position (the last token predicts nothing)
    for task in ("causal-lm", "seq-cls"):
        model = make_model(root / task, task, vocab_size=len(tok))
        with torch.no_grad():
            model.get_input_embeddings().weight[tok.convert_tokens_to_ids(POISON)] = float("nan")
        model.save_pretrained(root / task)
    return out


def _one_line_error(result: Any) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize(
    "method",
    [["--method", "topk"], ["--method", "sample"], ["--method", "sample", "--draws", "systematic"],
     ["--method", "hybrid", "--top-k", "4"], ["--method", "hybrid", "--top-k", "4", "--draws", "systematic"]],
)  # fmt: skip
def test_nan_logits_stop_labelling_with_one_line_and_keep_committed_shards(
    world: dict[str, Any], tmp_path: Path, method: list[str]
) -> None:
    out = tmp_path / "s"
    args = ["label", "--teacher", str(world["root"] / "causal-lm"), "--data", str(world["data"]), "--out", str(out),
            "--batch-size", "4", "--shard-size", str(SHARD), *method]  # fmt: skip
    line = _one_line_error(CliRunner().invoke(cli, args))
    assert "NaN or infinite" in line and "--dtype float32" in line, line
    # unit 2's 7th example, at the poisoned word (the hidden state is NaN from there on; earlier positions are not)
    assert f"work unit 2 (example 6, position {world['position']} of the unit)" in line, line
    # the two clean units were committed, and stay so: listed, readable and verified
    store = open_store(out, allow_incomplete=True)
    assert [s.unit for s in store.manifest.shards] == [0, 1]
    assert sum(1 for _ in store) == 2 * SHARD
    verified = CliRunner().invoke(cli, ["verify", str(out), "--json"])
    report = json.loads(verified.output)  # every committed file checks out; only the unfinished run is reported
    assert report["shards_checked"] == 2 and report["problems"] == [
        "the store is incomplete: its labeling run has not finished"
    ], verified.output


def test_nan_logits_of_a_classifier_name_the_example(world: dict[str, Any], tmp_path: Path) -> None:
    args = ["label", "--teacher", str(world["root"] / "seq-cls"), "--data", str(world["data"]), "--task", "seq-cls",
            "--label-field", "label", "--out", str(tmp_path / "c"), "--batch-size", "4",
            "--shard-size", str(SHARD)]  # fmt: skip
    line = _one_line_error(CliRunner().invoke(cli, args))
    assert "work unit 2 (example 6 of the unit)" in line, line
    assert [s.unit for s in open_store(tmp_path / "c", allow_incomplete=True).manifest.shards] == [0, 1]

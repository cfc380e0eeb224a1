"""Scale-out: label split over independent jobs and merged, and over torchrun ranks (gloo, 2 processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from kd_pipeline import data
from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.label import LabelConfig
from kd_pipeline.stages.label import run as label
from tests.tiny import SENTENCES, hostile_dir, make_model, make_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("scale")
    vocab = len(make_tokenizer(root / "tok"))
    make_model(root / "teacher", "causal-lm", vocab_size=vocab)
    write_jsonl(root / "docs.jsonl", [{"text": s} for s in SENTENCES * 4])
    args = {"teacher": str(root / "teacher"), "data": str(root / "docs.jsonl"), "top_k": 4, "shard_size": 5}
    label(LabelConfig(out=str(root / "single"), **args), log=lambda m: None)
    label(LabelConfig(out=str(root / "single-sample"), method="sample", samples=12, **args), log=lambda m: None)
    return {"root": root, "args": args}


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m kd_pipeline ARGS`` (gloo on CPU), run
    from a directory holding its own ``data/`` package and ``pipeline.py`` (as a user's repository does)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kd_pipeline"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cwd = hostile_dir(Path(tempfile.mkdtemp(prefix="user-repo-")))
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = data.open_store(a), data.open_store(b)
    assert len(sa) == len(sb) and sa.manifest.complete and sb.manifest.complete
    assert [s.name for s in sa.manifest.shards] == [s.name for s in sb.manifest.shards]
    for x, y in zip(sa, sb, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert data.verify_store(b).ok
    assert "part" not in sb.manifest.dataset


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_independent_jobs_and_merge(setup: dict[str, Any], tmp_path: Path, method: str) -> None:
    args = {**setup["args"], **({"method": "sample", "samples": 12} if method == "sample" else {})}
    single = setup["root"] / ("single" if method == "topk" else "single-sample")
    parts = []
    for i in range(3):
        out = tmp_path / f"part{i}"
        label(LabelConfig(out=str(out), num_shards=3, shard_index=i, **args), log=lambda m: None)
        m = data.open_store(out).manifest
        assert m.dataset["part"] == {"index": i, "of": 3} and all(s.unit % 3 == i for s in m.shards)
        assert m.targets.method == method
        parts.append(str(out))
    runner = CliRunner()
    result = runner.invoke(cli, ["merge", str(tmp_path / "partial"), parts[0], parts[2]])
    assert result.exit_code == 1 and "missing units 1, 4" in result.output
    result = runner.invoke(cli, ["merge", str(tmp_path / "merged"), *parts])
    assert result.exit_code == 0, result.output
    assert_same_store(single, tmp_path / "merged")
    # a part labelled differently is refused
    odd = {"top_k": 3} if method == "topk" else {"samples": 11}
    label(LabelConfig(out=str(tmp_path / "odd"), num_shards=3, shard_index=1, **{**args, **odd}), log=lambda m: None)
    result = runner.invoke(cli, ["merge", str(tmp_path / "m2"), parts[0], str(tmp_path / "odd"), parts[2]])
    assert result.exit_code == 1 and "targets." in result.output, result.output
    result = runner.invoke(cli, ["merge", str(tmp_path / "m3"), parts[0], parts[0]])
    assert result.exit_code == 1 and "is in both" in result.output


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_torchrun_two_ranks_equal_one_process(setup: dict[str, Any], tmp_path: Path, method: str) -> None:
    out, a = tmp_path / "ranked", setup["args"]
    extra = ["--method", "sample", "--samples", "12"] if method == "sample" else []
    proc = torchrun(
        "label", "--teacher", a["teacher"], "--data", a["data"], "--top-k", "4", "--shard-size", "5", *extra,
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / ".ranks").exists()
    assert_same_store(setup["root"] / ("single" if method == "topk" else "single-sample"), out)


def test_torchrun_ddp_training(setup: dict[str, Any], tmp_path: Path) -> None:
    """Two DDP ranks (gloo) train from the store; rank 0 writes the run, and the two ranks stay in step."""
    from tests.test_train import _student_config

    student = _student_config(tmp_path / "student", len(make_tokenizer(tmp_path / "tok")))
    out = tmp_path / "run"
    proc = torchrun(
        "train", "--store", str(setup["root"] / "single"), "--student", str(student), "--out", str(out),
        "--steps", "4", "--batch-size", "2", "--log-every", "1", "--eval-every", "2", "--save-every", "2",
        "--eval-fraction", "0.3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    # 2 ranks x batch 2 per step: the global data position advances by 4 examples a step
    assert [r["samples_seen"] for r in train_rows] == [4, 8, 12, 16]
    assert (out / "final" / "config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]

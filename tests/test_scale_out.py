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

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("scale")
    vocab = len(make_tokenizer(root / "tok"))
    make_model(root / "teacher", "causal-lm", vocab_size=vocab)
    write_jsonl(root / "docs.jsonl", [{"text": s} for s in SENTENCES * 4])
    args = {"teacher": str(root / "teacher"), "data": str(root / "docs.jsonl"), "top_k": 4, "shard_size": 5}
    label(LabelConfig(out=str(root / "single"), method="topk", **args), log=lambda m: None)
    label(LabelConfig(out=str(root / "single-sample"), method="sample", samples=12, **args), log=lambda m: None)
    label(LabelConfig(out=str(root / "single-hybrid"), method="hybrid", samples=12, **args), log=lambda m: None)
    return {"root": root, "args": args}


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m kd_pipeline ARGS`` (gloo on CPU), run
    from a directory holding its own ``data/`` package and ``pipeline.py`` (as a user's repository does)."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd = [*run, "-m", "kd_pipeline"]
    # the ranks import the kd_pipeline of this checkout (the code under test), not whichever one is installed
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
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


@pytest.mark.parametrize("method", ["topk", "sample", "hybrid"])
def test_independent_jobs_and_merge(setup: dict[str, Any], tmp_path: Path, method: str) -> None:
    args = {**setup["args"], "method": method, **({"samples": 12} if method != "topk" else {})}
    single = setup["root"] / ("single" if method == "topk" else f"single-{method}")
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


@pytest.mark.parametrize("method", ["topk", "sample", "hybrid"])
def test_torchrun_two_ranks_equal_one_process(setup: dict[str, Any], tmp_path: Path, method: str) -> None:
    out, a = tmp_path / "ranked", setup["args"]
    extra = ["--method", method, *(["--samples", "12"] if method != "topk" else [])]
    proc = torchrun(
        "label", "--teacher", a["teacher"], "--data", a["data"], "--top-k", "4", "--shard-size", "5", *extra,
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / ".ranks").exists()
    assert_same_store(setup["root"] / ("single" if method == "topk" else f"single-{method}"), out)


def test_torchrun_ddp_training(setup: dict[str, Any], tmp_path: Path) -> None:
    """Two DDP ranks (gloo) train from the store; rank 0 writes the run. The ranks' traces show that they split
    every epoch into disjoint halves that together cover it exactly, and hold the same weights after every step."""
    from tests.test_train import _student_config

    # 29 examples in 6 shards of 5 (one of 4): with 4 shards per block, rank 0 reads a block of 4 shards and rank 1
    # one of 2, each rank taking 2 a step; rank 1 runs out first and takes weight-0 stand-ins until rank 0's block
    # is done (the loader's lockstep). 12 steps are one whole epoch and the first steps of the next.
    n_examples, steps = 29, 12
    write_jsonl(tmp_path / "docs.jsonl", [{"text": s} for s in (SENTENCES * 4)[:n_examples]])
    store = tmp_path / "store"
    label(LabelConfig(**{**setup["args"], "data": str(tmp_path / "docs.jsonl")}, out=str(store)), log=lambda m: None)
    student = _student_config(tmp_path / "student", len(make_tokenizer(tmp_path / "tok")))
    out = tmp_path / "run"
    proc = torchrun(
        "train", "--store", str(store), "--student", str(student), "--out", str(out),
        "--steps", str(steps), "--batch-size", "2", "--log-every", "1", "--eval-every", "6", "--save-every", "6",
        "--eval-fraction", "0", "--trace",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, steps + 1))
    # the same batches as the loader yields for each rank: what every step counts, and the epoch's length
    from kd_pipeline.data.dataset import StoreDataset

    def counted(epoch: int) -> list[int]:
        ranks = [list(StoreDataset(store, batch_size=2, rank=r, world_size=2, epoch=epoch)) for r in (0, 1)]
        return [int(a["example_weight"].sum() + b["example_weight"].sum()) for a, b in zip(*ranks, strict=True)]

    per_step, next_epoch = counted(0), counted(1)
    epoch_steps = len(per_step)
    assert epoch_steps < steps and sum(per_step) == n_examples and min(per_step) < 4  # some steps hold stand-ins
    # 2 ranks x batch 2 per step: the trainer's data position advances by 4 a step, and restarts at epoch 1
    assert [(r["epoch"], r["samples_seen"]) for r in rows if r["split"] == "train"] == [
        (0, 4 * s) for s in range(1, epoch_steps + 1)
    ] + [(1, 4 * s) for s in range(1, steps - epoch_steps + 1)]
    assert (out / "final" / "config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000012"]
    assert sorted(p.name for p in (out / "trace").iterdir()) == ["rank-00000.jsonl", "rank-00001.jsonl"]
    traces = [
        [json.loads(line) for line in (out / "trace" / f"rank-{r:05d}.jsonl").read_text().splitlines()] for r in (0, 1)
    ]
    for trace in traces:
        assert [t["step"] for t in trace] == list(range(1, steps + 1))
    seen: dict[int, list[int]] = {0: [], 1: []}  # epoch -> indices seen by either rank, in step order
    for a, b in zip(*traces, strict=True):
        epochs = sorted({e for t in (a, b) for e, _ in t["examples"]})
        assert len(epochs) == 1, (a["step"], epochs)  # both ranks are in the same epoch
        ia, ib = ([i for _, i in t["examples"]] for t in (a, b))
        assert not set(ia) & set(ib), (a["step"], ia, ib)  # no example on both ranks in a step
        seen[epochs[0]] += ia + ib
        # DDP averaged the gradients: both ranks took the same step, to the same weights
        assert a["weights_sha256"] == b["weights_sha256"], a["step"]
    # every example of the epoch exactly once across the two ranks (a repeat would make the list longer)
    assert sorted(seen[0]) == list(range(n_examples))
    # the first steps of epoch 1: distinct examples, none twice
    assert len(seen[1]) == len(set(seen[1])) == sum(next_epoch[: steps - epoch_steps])
    assert set(seen[1]) <= set(range(n_examples))
    # per step: the examples the two ranks' batches count (stand-ins are not counted)
    counts = [len(a["examples"]) + len(b["examples"]) for a, b in zip(*traces, strict=True)]
    assert counts == per_step + next_epoch[: steps - epoch_steps]
    # the weights move every step (the digests compare something that changes)
    digests = [t["weights_sha256"] for t in traces[0]]
    assert len(set(digests)) == steps

"""Fault injection: SIGKILL at random points, a write failure, and a second writer. Real processes, real signals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kd_pipeline import data
from tests.tiny import SENTENCES, make_model, make_tokenizer, write_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("faults")
    vocab = len(make_tokenizer(root / "tok"))
    make_model(root / "teacher", "causal-lm", vocab_size=vocab, hidden=64)
    rng = random.Random(0)
    docs = [{"text": " ".join(rng.choice(SENTENCES).split()[: rng.randint(3, 14)])} for _ in range(600)]
    write_jsonl(root / "docs.jsonl", docs)
    args = [
        "--teacher",
        str(root / "teacher"),
        "--data",
        str(root / "docs.jsonl"),
        "--shard-size",
        "12",
        "--batch-size",
        "4",
    ]
    # the uninterrupted reference runs in the same kind of process (one thread): float results depend on it
    done = subprocess.run(_pipeline("label", *args, "--out", str(root / "clean")), env=ENV, capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # the default store, sampled: a resumed labeling must draw exactly the ids of an uninterrupted one
    targets = data.open_store(root / "clean").manifest.targets
    assert (targets.method, targets.num_samples) == ("sample", 50)
    return {"root": root, "args": args}


def _pipeline(*args: str) -> list[str]:
    return [sys.executable, "-m", "kd_pipeline", *args]


def _run_killed(cmd: list[str], when: Callable[[], bool], extra: float) -> int:
    """Start ``cmd``; once ``when()`` holds, wait ``extra`` seconds more and SIGKILL it. Returns its exit code.

    Progress-based rather than time-based, so the kill lands mid-run on a fast or a slow machine alike.
    """
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and not when() and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        time.sleep(extra)
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def _committed(store: Path) -> int:
    try:
        return len(data.read_manifest(data.location.Location(store)).shards)
    except data.StoreError:
        return 0


def _logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)
    except (OSError, ValueError):
        return 0


def test_label_killed_at_random_points_resumes_to_the_same_store(setup: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "store"
    cmd = _pipeline("label", *setup["args"], "--out", str(out))
    rng = random.Random(1)
    kills = 0
    for _ in range(6):
        target = _committed(out) + rng.randint(1, 12)
        code = _run_killed(cmd, lambda t=target: _committed(out) >= t, extra=rng.uniform(0.0, 0.3))
        if code == 0:
            break
        kills += 1
        assert code == -signal.SIGKILL
        if (out / "manifest.json").exists():  # whatever is committed is always readable and intact
            partial = data.open_store(out, allow_incomplete=True)
            for s in range(partial.num_shards):
                partial.shard(s)
    else:
        assert subprocess.run(cmd, env=ENV, capture_output=True).returncode == 0
    assert kills >= 1, "the run finished before the first kill: make the dataset bigger"
    clean, resumed = data.open_store(setup["root"] / "clean"), data.open_store(out)
    assert data.verify_store(out).ok
    assert len(clean) == len(resumed)
    # the same examples (by content key) in the same order: nothing lost, nothing twice; and every array equal
    for ex, ref in zip(resumed, clean, strict=True):
        assert bytes(ex["key"]) == bytes(ref["key"])
        for name in ex:
            np.testing.assert_array_equal(ex[name], ref[name])


def test_train_killed_and_resumed_reaches_the_same_weights(setup: dict[str, Any], tmp_path: Path) -> None:
    from tests.test_train import _student_config

    student = _student_config(tmp_path / "student", len(make_tokenizer(tmp_path / "tok")))
    common = [
        "--store",
        str(setup["root"] / "clean"),
        "--student",
        str(student),
        "--steps",
        "300",
        "--batch-size",
        "4",
        "--save-every",
        "7",
        "--eval-every",
        "100",
        "--log-every",
        "1",
    ]
    assert (
        subprocess.run(
            _pipeline("train", *common, "--out", str(tmp_path / "a")), env=ENV, capture_output=True
        ).returncode
        == 0
    )
    out = tmp_path / "b"
    rng = random.Random(2)
    kills = 0
    for attempt in range(12):
        resume = ["--resume"] if attempt else []
        target = _logged_step(out) + rng.randint(5, 90)
        code = _run_killed(
            _pipeline("train", *common, "--out", str(out), *resume),
            lambda t=target: _logged_step(out) >= t,
            extra=rng.uniform(0.0, 0.2),
        )
        if code == 0:
            break
        kills += 1
    else:
        pytest.fail("training never finished")
    assert kills >= 1
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise, on CPU with one thread
    assert a.keys() == b.keys()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # each step logged once, in order, after the truncation on resume; evaluations at 100, 200, 300 once each
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 301))
    assert [r["step"] for r in rows if r["split"] == "eval"] == [100, 200, 300]


def test_write_failure_keeps_committed_shards(setup: dict[str, Any], tmp_path: Path) -> None:
    """A real write failure: the file-size limit (RLIMIT_FSIZE) makes a shard write fail with EFBIG."""
    out = tmp_path / "store"
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000)); "
        "from kd_pipeline.pipeline.cli import main; sys.argv = ['pipeline'] + sys.argv[1:]; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "label", *setup["args"], "--out", str(out), "--format", "arrow"],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: writing shard-") and "File too large" in last and "re-run" in last
    assert "Traceback" not in proc.stderr
    partial = data.read_manifest(data.location.Location(out))
    assert not partial.complete
    for s in range(len(partial.shards)):  # every committed shard is intact
        data.open_store(out, allow_incomplete=True).shard(s)
    proc = subprocess.run(
        _pipeline("label", *setup["args"], "--out", str(out), "--format", "arrow"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert data.verify_store(out).ok


def test_a_second_writer_is_refused(setup: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "store"
    first = subprocess.Popen(
        _pipeline("label", *setup["args"], "--out", str(out)),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not (out / "manifest.json").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = subprocess.run(
            _pipeline("label", *setup["args"], "--out", str(out)), env=ENV, capture_output=True, text=True, timeout=120
        )
        if first.poll() is None:  # still writing: the second must have been refused
            assert second.returncode == 1
            assert "being written by another process" in second.stderr
    finally:
        first.wait(timeout=120)
    assert first.returncode == 0
    assert data.verify_store(out).ok

"""Shared fixtures: small random stores written through the real writer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from kd_pipeline.data import Manifest, ShardBuilder, StoreWriter, TargetSpec

BACKENDS = ("zarr", "arrow")


def make_manifest(backend: str = "zarr", task: str = "causal-lm", k: int = 4, num_classes: int = 50) -> Manifest:
    spec = TargetSpec(method="topk", k=k, temperature=2.0, num_classes=num_classes)
    return Manifest(
        backend=backend,
        task=task,
        targets=spec,
        vocab_size=num_classes if task != "seq-cls" else 300,
        teacher={"name_or_path": "test-teacher", "weights_digest": "0" * 64},
        tokenizer={"digest": "a" * 64, "vocab_size": num_classes},
        dataset={"source": "synthetic", "fingerprint": "f" * 64},
        created="2026-11-22T00:00:00Z",
    )


def random_example(rng: np.random.Generator, task: str, spec: TargetSpec, vocab: int) -> dict[str, np.ndarray]:
    """One example in the public dict layout, with log-probs that are a real (sub-)distribution."""
    length = int(rng.integers(1, 12))
    input_ids = rng.integers(0, vocab, length)
    n_pos = {"causal-lm": length - 1, "seq-cls": 1, "masked-lm": int(rng.integers(0, length + 1))}[task]
    logits = rng.normal(size=(n_pos, spec.num_classes)) * 3
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    top = np.argsort(-logp, axis=1)[:, : spec.k]
    kept = np.take_along_axis(logp, top, axis=1)
    ex: dict[str, np.ndarray] = {
        "input_ids": input_ids,
        "target_ids": top,
        "target_logprobs": kept,
        "tail_mass": 1.0 - np.exp(kept).sum(axis=1),
    }
    if task == "seq-cls":
        ex["label"] = rng.integers(0, spec.num_classes, 1)
    if task == "masked-lm":
        ex["positions"] = np.sort(rng.choice(length, n_pos, replace=False))
        ex["label"] = rng.integers(0, vocab, n_pos)
    return ex


def write_store(
    path: Path,
    backend: str = "zarr",
    task: str = "causal-lm",
    shards: int = 3,
    rows: int = 5,
    seed: int = 0,
    k: int = 4,
    finish: bool = True,
) -> list[dict[str, np.ndarray]]:
    """Write a store of random examples; returns the examples in store order."""
    m = make_manifest(backend, task, k=k)
    rng = np.random.default_rng(seed)
    written: list[dict[str, np.ndarray]] = []
    with StoreWriter(path, m) as w:
        for unit in range(shards):
            b = ShardBuilder(task, m.targets)
            for _ in range(rows):
                ex = random_example(rng, task, m.targets, m.vocab_size)
                b.add(
                    ex["input_ids"],
                    ex["target_ids"],
                    ex["target_logprobs"],
                    ex["tail_mass"],
                    ex.get("label"),
                    ex.get("positions"),
                )
                written.append(ex)
            w.write_shard(unit, b.build(), {"entropy_sum": 1.0, "count": 1.0})
        if finish:
            w.finish()
    return written


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def with_backend(m: Manifest, backend: str) -> Manifest:
    return dataclasses.replace(m, backend=backend)

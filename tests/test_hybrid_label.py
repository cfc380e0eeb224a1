"""``pipeline label --method hybrid``: the top-k of a top-k store, plus draws from the teacher restricted to the other
ids; reproducible, resumable (torchrun and merge: tests/test_scale_out.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kd_pipeline import data
from kd_pipeline.data import open_store, verify_store
from kd_pipeline.data.inspect import summarize
from kd_pipeline.stages.label import LabelConfig, LabelConfigError
from kd_pipeline.stages.label import run as label
from tests import rawstore
from tests.tiny import labelling_world


def _quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return labelling_world(tmp_path_factory.mktemp("hybrid"))


def label_cfg(tiny: dict[str, Any], out: Path, **kw: Any) -> LabelConfig:
    base: dict[str, Any] = {
        "teacher": str(tiny["root"] / "teacher"),
        "data": str(tiny["data"]),
        "out": str(out),
        "method": "hybrid",
        "top_k": 4,
        "samples": 30,
        "temperature": 2.0,
        "batch_size": 4,
        "shard_size": 8,
        "chunk_positions": 16,
    }
    base.update(kw)
    return LabelConfig(**base)


def _teacher_probs(model: Any, ids: np.ndarray, temperature: float) -> np.ndarray:
    """(L, V) float64: the teacher's softmax(logits / T), computed independently of the labeler."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].double()
    return torch.softmax(logits / temperature, dim=-1).numpy()


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_label_hybrid_head_equals_topk_and_draws_come_from_the_tail(
    tiny: dict[str, Any], tmp_path: Path, backend: str
) -> None:
    logs: list[str] = []
    label(label_cfg(tiny, tmp_path / "h", format=backend), log=logs.append)
    label(label_cfg(tiny, tmp_path / "t", format=backend, method="topk"), log=_quiet)
    hybrid, topk = open_store(tmp_path / "h"), open_store(tmp_path / "t")
    t = hybrid.manifest.targets
    assert (t.method, t.k, t.num_samples, t.temperature, t.num_classes) == ("hybrid", 4, 30, 2.0, tiny["vocab"] + 3)
    assert hybrid.manifest.config["method"] == "hybrid" and hybrid.manifest.config["samples"] == 30
    teacher = tiny["teacher"].eval()
    entries = positions = 0
    for h, k in zip(hybrid, topk, strict=True):
        for key in ("input_ids", "target_ids", "target_logprobs", "tail_mass", "key"):  # the head, exactly
            np.testing.assert_array_equal(h[key], k[key])
        probs = _teacher_probs(teacher, h["input_ids"].astype(np.int64), 2.0)
        off = h["tail_offsets"]
        assert len(off) == len(h["input_ids"])  # L - 1 positions
        for p in range(len(off) - 1):
            u = h["tail_ids"][off[p] : off[p + 1]].astype(np.int64)
            c = h["tail_counts"][off[p] : off[p + 1]]
            assert int(c.sum()) == 30 and (c >= 1).all() and (np.diff(u) > 0).all()
            assert not np.isin(u, h["target_ids"][p]).any()  # never a kept id
            assert (probs[p, u] > 1e-12).all()
            entries, positions = entries + len(u), positions + 1
    for a, b in zip(hybrid.manifest.shards, topk.manifest.shards, strict=True):
        assert a.stats["kept_mass_sum"] == pytest.approx(b.stats["kept_mass_sum"], rel=1e-12)
        assert a.stats["count"] == b.stats["count"] and a.entries is not None
    assert sum(s.entries or 0 for s in hybrid.manifest.shards) == entries
    assert verify_store(tmp_path / "h").ok
    s = summarize(hybrid)
    assert s["hybrid"]["unique_tail_ids_per_position"]["mean"] == pytest.approx(entries / positions)
    assert any(f"top-4 + 30 tail samples, {entries / positions:.1f} unique tail ids/position" in line for line in logs)


def test_label_hybrid_draws_follow_the_restricted_teacher(tiny: dict[str, Any], tmp_path: Path) -> None:
    """Empirical frequencies of 20,000 draws per position against a float64 softmax restricted to the unkept ids;
    the same bound rejects the unrestricted distribution (the draws are checked against the right one)."""
    n = 20_000
    label(label_cfg(tiny, tmp_path / "s", samples=n, limit=2), log=_quiet)
    store = open_store(tmp_path / "s")
    assert store.manifest.targets.count_dtype == "uint16"
    teacher = tiny["teacher"].eval()
    for ex in store:
        probs = _teacher_probs(teacher, ex["input_ids"].astype(np.int64), 2.0)
        off = ex["tail_offsets"]
        for p in range(len(off) - 1):
            restricted = probs[p].copy()
            restricted[ex["target_ids"][p]] = 0.0
            assert restricted.sum() == pytest.approx(float(ex["tail_mass"][p]), rel=1e-4)  # the stored tail is exact
            restricted /= restricted.sum()
            freq = np.zeros(probs.shape[1])
            freq[ex["tail_ids"][off[p] : off[p + 1]]] = ex["tail_counts"][off[p] : off[p + 1]] / n

            assert _within(freq, restricted, n)
            assert 0.5 * np.abs(freq - restricted).sum() < 0.05  # total variation
            assert not _within(freq, probs[p], n)  # draws from the whole distribution would fail the same bound


def _within(freq: np.ndarray, expected: np.ndarray, n: int) -> bool:
    """Every frequency of n draws within 5 standard deviations of its probability (plus a little slack)."""
    sd = np.sqrt(expected * (1 - expected) / n)
    return bool(np.all(np.abs(freq - expected) <= 5 * sd + 1e-3))


def test_label_hybrid_is_reproducible_and_resumes_exactly(tiny: dict[str, Any], tmp_path: Path) -> None:
    label(label_cfg(tiny, tmp_path / "a"), log=_quiet)
    label(label_cfg(tiny, tmp_path / "b"), log=_quiet)
    raw = rawstore.load(tmp_path / "b")  # the state a crash leaves after 2 of 4 units
    raw["complete"] = False
    raw["shards"] = raw["shards"][:2]
    rawstore.save(tmp_path / "b", raw)
    with pytest.raises(data.StoreExistsError, match="samples"):
        label(label_cfg(tiny, tmp_path / "b", samples=31), log=_quiet)
    result = label(label_cfg(tiny, tmp_path / "b"), log=_quiet)
    assert result.resumed_units == 2 and result.labelled_units == 2
    label(label_cfg(tiny, tmp_path / "c", seed=1), log=_quiet)
    a, b, c = (open_store(tmp_path / x) for x in "abc")
    assert len(a) == len(b) == len(c)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert any(not np.array_equal(x["tail_ids"], z["tail_ids"]) for x, z in zip(a, c, strict=True))


def test_label_hybrid_config_problems(tiny: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(LabelConfigError, match="--samples"):
        LabelConfig(teacher="t", data="d", out="o", method="hybrid", samples=0).validate()
    with pytest.raises(LabelConfigError, match="--samples"):
        LabelConfig(teacher="t", data="d", out="o", method="hybrid", samples=65536).validate()
    width = tiny["vocab"] + 3
    with pytest.raises(LabelConfigError, match=f"--top-k {width} keeps all of the teacher's {width} output ids"):
        label(label_cfg(tiny, tmp_path / "x", top_k=width), log=_quiet)
    assert not (tmp_path / "x").exists()


def test_label_hybrid_q8(tiny: dict[str, Any], tmp_path: Path) -> None:
    """The head takes every value dtype a top-k store takes (q8: lossy codes, decoded against the exact tail)."""
    label(label_cfg(tiny, tmp_path / "q", value_dtype="q8", limit=6), log=_quiet)
    m = open_store(tmp_path / "q").manifest
    assert m.targets.value_dtype == "q8" and m.targets.encoding == "q8" and verify_store(tmp_path / "q").ok

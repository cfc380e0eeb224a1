"""Hybrid targets (``--method hybrid``): the exact top-k plus counts of draws from the tail; the store format, its
export and inspect, and the manifest checks. Labeling, the loss and training: tests/test_hybrid_train.py."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd_pipeline import data
from kd_pipeline.data import ManifestError, ShardBuilder, StoreWriter, open_store, verify_store
from kd_pipeline.data.export import export_store
from kd_pipeline.data.inspect import summarize
from tests import rawstore
from tests.conftest import make_manifest

TASKS = ("causal-lm", "seq-cls", "masked-lm")


def hybrid_manifest(
    backend: str = "zarr",
    task: str = "causal-lm",
    k: int = 4,
    n: int = 20,
    num_classes: int = 50,
    dtype: str = "float16",
) -> data.Manifest:
    m = make_manifest(backend, task, k=k, num_classes=num_classes)
    spec = data.TargetSpec("hybrid", k, 2.0, num_classes, dtype, num_samples=n)
    return dataclasses.replace(m, targets=spec)


def random_hybrid_example(
    rng: np.random.Generator, task: str, spec: data.TargetSpec, vocab: int, zero_tail: float = 0.0
) -> dict[str, Any]:
    """One example in the public hybrid layout: the exact top-k of a random distribution, its tail mass, and per
    position the unique ids of N draws from the distribution restricted to the other ids, with their counts. A
    fraction ``zero_tail`` of the positions put all their mass on the top-k (tail 0, no draws)."""
    length = int(rng.integers(1, 12))
    n_pos = {"causal-lm": length - 1, "seq-cls": 1, "masked-lm": int(rng.integers(0, length + 1))}[task]
    assert spec.num_samples is not None
    logits = rng.normal(size=(n_pos, spec.num_classes)) * 3
    order = np.argsort(-logits, axis=1)
    zero = rng.random(n_pos) < zero_tail
    logits[zero[:, None] & (np.argsort(order, axis=1) >= spec.k)] = -np.inf  # exactly 0 outside the top-k
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    top = order[:, : spec.k]
    kept = np.take_along_axis(logp, top, axis=1)
    tail = np.where(zero, 0.0, 1.0 - np.exp(kept).sum(axis=1))
    ids, counts, offsets = [], [], [0]
    for p in range(n_pos):
        if not zero[p]:
            rest = np.exp(logp[p])
            rest[top[p]] = 0.0
            draws = rng.choice(spec.num_classes, spec.num_samples, p=rest / rest.sum())
            u, c = np.unique(draws, return_counts=True)
            ids.append(u)
            counts.append(c)
        offsets.append(offsets[-1] + (len(ids[-1]) if not zero[p] else 0))
    ex: dict[str, Any] = {
        "input_ids": rng.integers(0, vocab, length),
        "target_ids": top,
        "target_logprobs": kept,
        "tail_mass": tail.astype(np.float32),
        "tail_ids": np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64),
        "tail_counts": np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64),
        "tail_offsets": np.array(offsets, dtype=np.int64),
    }
    if task == "seq-cls":
        ex["label"] = rng.integers(0, spec.num_classes, 1)
    if task == "masked-lm":
        ex["positions"] = np.sort(rng.choice(length, n_pos, replace=False))
        ex["label"] = rng.integers(0, vocab, n_pos)
    return ex


def write_hybrid_store(
    path: Path, m: data.Manifest, sizes: list[int], seed: int = 0, zero_tail: float = 0.2
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    written = []
    with StoreWriter(path, m) as w:
        for unit, n in enumerate(sizes):
            b = ShardBuilder(m.task, m.targets)
            for _ in range(n):
                ex = random_hybrid_example(rng, m.task, m.targets, m.vocab_size, zero_tail)
                b.add_hybrid(
                    ex["input_ids"],
                    ex["target_ids"],
                    ex["target_logprobs"],
                    ex["tail_mass"],
                    ex["tail_ids"],
                    ex["tail_counts"],
                    ex["tail_offsets"],
                    ex.get("label"),
                    ex.get("positions"),
                )
                written.append(ex)
            w.write_shard(unit, b.build())
        w.finish()
    return written


def assert_same_hybrid(read: dict[str, np.ndarray], written: dict[str, Any], spec: data.TargetSpec) -> None:
    np.testing.assert_array_equal(read["input_ids"], written["input_ids"])
    np.testing.assert_array_equal(read["target_ids"], written["target_ids"])
    want = np.asarray(written["target_logprobs"]).astype(spec.logprob_dtype)
    np.testing.assert_array_equal(read["target_logprobs"], want)  # bit-exact through every lossless encoding
    np.testing.assert_array_equal(read["tail_mass"], np.asarray(written["tail_mass"], dtype=np.float32))
    for name, dtype in (("tail_ids", spec.id_dtype), ("tail_counts", spec.count_dtype), ("tail_offsets", "int64")):
        np.testing.assert_array_equal(read[name], written[name])
        assert read[name].dtype == np.dtype(dtype), name
    assert read["tail_offsets"][0] == 0
    if "label" in written:
        np.testing.assert_array_equal(read["label"], written["label"])


@pytest.mark.parametrize("task", TASKS)
def test_hybrid_round_trip(tmp_path: Path, backend: str, task: str) -> None:
    m = hybrid_manifest(backend, task)
    written = write_hybrid_store(tmp_path / "s", m, [5, 4, 6])
    store = open_store(tmp_path / "s")
    assert store.manifest.targets.hybrid and store.manifest.targets.num_samples == 20
    assert len(store) == len(written)
    for i, (r, w) in enumerate(zip(store, written, strict=True)):
        assert_same_hybrid(r, w, store.manifest.targets)
        assert_same_hybrid(store[i], w, store.manifest.targets)
    raw = rawstore.load(tmp_path / "s")
    assert raw["targets"]["method"] == "hybrid" and raw["targets"]["num_samples"] == 20 and raw["targets"]["k"] == 4
    assert raw["targets"]["encoding"] == ("delta" if backend == "zarr" else "plain")
    assert [s["entries"] for s in raw["shards"]] == [
        sum(len(ex["tail_ids"]) for ex in part) for part in (written[:5], written[5:9], written[9:])
    ]
    assert verify_store(tmp_path / "s").ok


def test_hybrid_layout_on_disk(tmp_path: Path) -> None:
    """zarr: three new arrays beside the top-k columns; arrow: large_list<large_list<...>> tail columns."""
    import pyarrow as pa

    write_hybrid_store(tmp_path / "z", hybrid_manifest("zarr"), [3])
    arrays = {p.name for p in (tmp_path / "z" / "shards" / "shard-000000").iterdir() if p.is_dir()}
    assert {"tail_ids", "tail_counts", "tail_offsets", "target_ids", "target_logprobs", "tail_mass"} <= arrays
    meta = json.loads((tmp_path / "z" / "shards" / "shard-000000" / "tail_ids" / "zarr.json").read_text())
    assert meta["data_type"] == "uint16"
    write_hybrid_store(tmp_path / "a", hybrid_manifest("arrow"), [3])
    schema = pa.ipc.open_file(str(tmp_path / "a" / "shards" / "shard-000000.arrow")).schema
    assert schema.field("tail_ids").type == pa.large_list(pa.large_list(pa.uint16()))
    assert schema.field("tail_counts").type == pa.large_list(pa.large_list(pa.uint8()))
    assert schema.field("target_logprobs").type == pa.large_list(pa.list_(pa.float16(), 4))


@pytest.mark.parametrize("dtype", ["float32", "q8"])
def test_hybrid_value_dtypes(tmp_path: Path, dtype: str) -> None:
    m = hybrid_manifest("zarr", dtype=dtype, n=300)
    assert m.targets.count_dtype == "uint16"
    written = write_hybrid_store(tmp_path / "s", m, [4])
    for r, w in zip(open_store(tmp_path / "s"), written, strict=True):
        for name in ("tail_ids", "tail_counts", "tail_offsets", "target_ids"):
            np.testing.assert_array_equal(r[name], w[name])
        if dtype == "q8":  # lossy values; kept mass exactly 1 - tail
            kept = np.exp(r["target_logprobs"].astype(np.float64)).sum(axis=1)
            np.testing.assert_allclose(kept + r["tail_mass"], 1.0, atol=1e-6)
    assert verify_store(tmp_path / "s").ok


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    task=st.sampled_from(TASKS),
    backend=st.sampled_from(("zarr", "arrow")),
    n=st.integers(1, 300),
    k=st.integers(1, 49),
    sizes=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    zero_tail=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_hybrid_hypothesis_round_trip(
    tmp_path_factory: pytest.TempPathFactory,
    task: str,
    backend: str,
    n: int,
    k: int,
    sizes: list[int],
    zero_tail: float,
    seed: int,
) -> None:
    path = tmp_path_factory.mktemp("h") / "s"
    m = hybrid_manifest(backend, task, k=k, n=n)
    written = write_hybrid_store(path, m, sizes, seed, zero_tail)
    store = open_store(path)
    assert len(store) == len(written)
    for r, w in zip(store, written, strict=True):
        assert_same_hybrid(r, w, m.targets)


def test_hybrid_manifest_checks(tmp_path: Path) -> None:
    write_hybrid_store(tmp_path / "s", hybrid_manifest(), [3])
    raw = rawstore.load(tmp_path / "s")

    def refused(edit: Any, match: str) -> None:
        bad = json.loads(json.dumps(raw))
        edit(bad)
        with pytest.raises(ManifestError, match=match):
            data.Manifest.from_dict(bad)

    data.Manifest.from_dict(raw)
    refused(lambda d: d["targets"].pop("num_samples"), "hybrid spec needs num_samples")
    refused(lambda d: d["targets"].__setitem__("num_samples", 0), "hybrid spec needs num_samples")
    refused(lambda d: d["targets"].__setitem__("k", 50), "k < num_classes")
    refused(lambda d: d["shards"][0].pop("entries"), "hybrid store needs between 0 and")
    refused(lambda d: d["shards"][0].__setitem__("entries", d["shards"][0]["positions"] * 20 + 1), "hybrid store")
    refused(lambda d: d["targets"].__setitem__("method", "hybrid-v2"), "method='hybrid-v2' is not one of")
    # a top-k store records no entries; the same shard record in a hybrid manifest must
    topk = dict(raw, targets={**raw["targets"], "method": "topk"})
    topk["targets"].pop("num_samples")
    with pytest.raises(ManifestError, match="targets.draws is set, but method='topk' draws nothing"):
        data.Manifest.from_dict(topk)
    topk["targets"].pop("draws")
    with pytest.raises(ManifestError, match="top-k store has none"):
        data.Manifest.from_dict(topk)


def test_hybrid_builder_refuses_the_wrong_add(tmp_path: Path) -> None:
    b = ShardBuilder("causal-lm", hybrid_manifest().targets)
    with pytest.raises(ValueError, match="add_hybrid"):
        b.add([1, 2], [[1, 2, 3, 4]], [[-1.0, -2, -3, -4]], [0.5])
    with pytest.raises(ValueError, match="add_hybrid"):
        ShardBuilder("causal-lm", make_manifest().targets).add_hybrid(
            [1, 2], [[1, 2, 3, 4]], [[-1.0] * 4], [0.5], [], [], [0, 0]
        )


@pytest.mark.parametrize("to", ["parquet", "arrow"])
def test_export_of_hybrid_stores(tmp_path: Path, to: str) -> None:
    m = hybrid_manifest("zarr", "masked-lm")
    written = write_hybrid_store(tmp_path / "s", m, [3, 2])
    export_store(tmp_path / "s", to=to, out=tmp_path / f"x.{to}")
    if to == "parquet":
        table = pq.read_table(tmp_path / f"x.{to}")
    else:
        import pyarrow as pa

        table = pa.ipc.open_file(str(tmp_path / f"x.{to}")).read_all()
    assert table.num_rows == len(written)
    assert {"target_ids", "target_logprobs", "tail_mass", "tail_ids", "tail_counts"} <= set(table.column_names)
    meta = json.loads(table.schema.metadata[b"kd-soft-labels"])
    assert meta["targets"]["method"] == "hybrid" and "tail_ids/tail_counts" in meta["export"]["targets"]
    for row, ex in zip(table.to_pylist(), written, strict=True):
        off = ex["tail_offsets"]
        assert row["tail_ids"] == [ex["tail_ids"][a:b].tolist() for a, b in itertools.pairwise(off)]
        assert row["tail_counts"] == [ex["tail_counts"][a:b].tolist() for a, b in itertools.pairwise(off)]
        np.testing.assert_array_equal(np.array(row["target_ids"]).reshape(-1, 4), ex["target_ids"])
        lp = np.array(row["target_logprobs"], dtype=np.float16).reshape(-1, 4)
        np.testing.assert_array_equal(lp, ex["target_logprobs"].astype(np.float16))


def test_inspect_hybrid_store(tmp_path: Path) -> None:
    written = write_hybrid_store(tmp_path / "s", hybrid_manifest("zarr"), [4, 4])
    s = summarize(open_store(tmp_path / "s"))
    per_position = np.concatenate([np.diff(ex["tail_offsets"]) for ex in written])
    assert s["hybrid"]["num_samples"] == 20 and s["hybrid"]["k"] == 4
    assert s["hybrid"]["unique_tail_ids_per_position"]["mean"] == pytest.approx(per_position.mean())
    assert s["column_bytes_per_position"]["tail_ids"] > 0 and s["sampled"] is None
    kept = np.concatenate([1.0 - ex["tail_mass"].astype(np.float64) for ex in written])
    assert s["kept_mass"]["mean"] == pytest.approx(kept.mean())

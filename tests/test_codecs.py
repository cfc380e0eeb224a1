"""The log-prob encodings (data/codecs.py): lossless delta, lossy q8 and its KL, and the manifest's encoding field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd_pipeline import data
from kd_pipeline.data import (
    CorruptShardError,
    ManifestError,
    ShardBuilder,
    StoreExistsError,
    StoreWriter,
    TargetSpec,
    open_store,
)
from kd_pipeline.data.codecs import (
    Q8_STEP,
    decode_logprobs,
    encode_logprobs,
    encoding_kl,
    position_kl,
    resolve_targets,
    stored_logprob_dtype,
)
from kd_pipeline.data.inspect import summarize
from kd_pipeline.data.writer import differences
from tests import rawstore
from tests.conftest import make_manifest, write_store

VOCAB = 49152
# every codec in a store's zarr.json is one of these: Zarr v3 core codecs plus the registered zstd extension
STANDARD_ZARR_CODECS = {"sharding_indexed", "transpose", "bytes", "blosc", "zstd", "crc32c"}


def teacher_topk(
    rng: np.random.Generator, positions: int, k: int, vocab: int, temperature: float = 1.0
) -> dict[str, np.ndarray]:
    """Top-k of real-looking teacher distributions: (P, K) ids, (P, K) float32 log-probs sorted descending,
    (P,) float32 exact tail. Logits have a heavy head (a few strong candidates) like an LM's."""
    logits = rng.standard_normal((positions, vocab)) * 2.0
    logits[:, : min(vocab, 64)] += rng.gamma(2.0, 2.0, (positions, min(vocab, 64)))
    z = logits / temperature
    logp = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(logp, ids, axis=1)
    tail = np.clip(1.0 - np.exp(kept).sum(axis=1), 0.0, 1.0)
    return {"ids": ids, "logprobs": kept.astype(np.float32), "tail": tail.astype(np.float32)}


def spec(value_dtype: str = "float16", encoding: str = "delta", k: int = 4) -> TargetSpec:
    return TargetSpec("topk", k, 1.0, VOCAB, value_dtype, "uint16", encoding)


# ---------------------------------------------------------------- lossless delta


@settings(max_examples=60, deadline=None)
@given(
    value_dtype=st.sampled_from(("float16", "float32")),
    positions=st.integers(0, 40),
    k=st.integers(1, 33),
    seed=st.integers(0, 2**31),
)
def test_delta_round_trip_is_bit_exact(value_dtype: str, positions: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    lp = -np.sort(rng.exponential(rng.uniform(0.05, 5.0), (positions, k)), axis=1).astype(value_dtype)
    if positions:  # the values a top-k really holds at its edges: p = 1 exactly, p = 0, a positive zero
        lp[0, 0] = -0.0
        lp[-1, -1] = -np.inf
        lp[positions // 2, 0] = 0.0
    s = spec(value_dtype, "delta", k)
    stored = encode_logprobs(s, lp, np.zeros(positions, np.float32))
    assert stored.dtype == np.dtype(stored_logprob_dtype(s)) and stored.shape == lp.shape
    back = decode_logprobs(s, stored, np.zeros(positions, np.float32))
    assert back.dtype == lp.dtype and np.array_equal(back.view(stored.dtype), lp.view(stored.dtype))
    # the documented layout: the first bit pattern, then differences along k modulo 2**bits (np.diff of unsigned
    # integers wraps); for sorted negative floats these are small non-negative integers
    bits = lp.view(stored.dtype)
    assert np.array_equal(stored, np.concatenate([bits[:, :1], np.diff(bits, axis=1)], axis=1))


@settings(max_examples=30, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 2**16 - 1), min_size=6, max_size=6), min_size=1, max_size=10))
def test_delta_round_trips_any_bit_pattern(rows: list[list[int]]) -> None:
    """Unsorted values, NaN payloads, subnormals: delta coding is modular, so every pattern survives."""
    raw = np.array(rows, dtype=np.uint16)
    s = spec("float16", "delta", 6)
    tail = np.zeros(len(raw), np.float32)
    back = decode_logprobs(s, encode_logprobs(s, raw.view(np.float16), tail), tail)
    assert np.array_equal(back.view(np.uint16), raw)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    backend=st.sampled_from(("zarr", "arrow")),
    k=st.sampled_from((1, 2, 8, 32)),
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    temperature=st.sampled_from((1.0, 2.0)),
    seed=st.integers(0, 2**31),
)
def test_store_round_trip_is_bit_exact_on_real_looking_data(
    tmp_path_factory: pytest.TempPathFactory, backend: str, k: int, lengths: list[int], temperature: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("c") / "s"
    m = make_manifest(backend, k=k, num_classes=VOCAB)
    written = []
    with StoreWriter(path, m) as w:
        b = ShardBuilder("causal-lm", w.manifest.targets)
        for n in lengths:
            top = teacher_topk(rng, n - 1, k, 512, temperature)
            ids = rng.permutation(VOCAB)[:512][top["ids"]]  # spread over the whole vocabulary
            ex = {"input_ids": rng.integers(0, VOCAB, n), "target_ids": ids, **top}
            b.add(ex["input_ids"], ids, top["logprobs"], top["tail"])
            written.append(ex)
        w.write_shard(0, b.build())
        w.finish()
    store = open_store(path)
    assert store.manifest.targets.encoding == ("delta" if backend == "zarr" else "plain")
    for r, ex in zip(store, written, strict=True):
        assert r["target_logprobs"].dtype == np.float16
        assert np.array_equal(r["target_logprobs"].view(np.uint16), ex["logprobs"].astype(np.float16).view(np.uint16))
        assert np.array_equal(r["target_ids"], ex["target_ids"]) and r["target_ids"].dtype == np.uint16
        assert np.array_equal(r["tail_mass"].view(np.uint32), ex["tail"].view(np.uint32))
        assert np.array_equal(r["input_ids"], ex["input_ids"])
    assert data.verify_store(path).ok


def test_zarr_store_needs_only_standard_codecs_and_the_documented_inverse(tmp_path: Path) -> None:
    """Another team decodes a store with zarr + numpy alone, following the README."""
    import zarr

    written = write_store(tmp_path / "s", "zarr", k=4)
    m = rawstore.load(tmp_path / "s")
    assert m["targets"]["encoding"] == "delta" and m["targets"]["value_dtype"] == "float16"
    shard = tmp_path / "s" / m["shards"][0]["path"]
    for meta in shard.glob("*/zarr.json"):
        codecs = json.loads(meta.read_text())["codecs"]
        names = {c["name"] for c in codecs} | {
            c["name"] for outer in codecs for c in outer.get("configuration", {}).get("codecs", [])
        }
        assert names <= STANDARD_ZARR_CODECS, (meta, names)
    assert json.loads((shard / "target_logprobs" / "zarr.json").read_text())["data_type"] == "uint16"
    stored = np.asarray(zarr.open_array(str(shard / "target_logprobs"), mode="r")[...])
    values = np.cumsum(stored, axis=1, dtype=np.uint16).view(np.float16)
    expected = np.concatenate([np.asarray(ex["target_logprobs"]) for ex in written[:5]]).astype(np.float16)
    assert np.array_equal(values, expected)


def test_a_stored_column_that_does_not_fit_the_encoding_is_corrupt(tmp_path: Path) -> None:
    write_store(tmp_path / "s", "zarr", shards=1)
    raw = rawstore.load(tmp_path / "s")
    raw["targets"]["encoding"] = "plain"  # the column holds uint16 deltas, not float16 values
    rawstore.save(tmp_path / "s", raw)
    with pytest.raises(CorruptShardError, match="encoding 'plain' stores float16"):
        open_store(tmp_path / "s")[0]
    with pytest.raises(CorruptShardError, match="encoding 'delta' stores uint16"):
        decode_logprobs(spec(), np.zeros((2, 3), np.uint16), np.zeros(2, np.float32))


# ---------------------------------------------------------------- lossy q8


@settings(max_examples=40, deadline=None)
@given(
    positions=st.integers(1, 60),
    k=st.sampled_from((1, 2, 5, 32)),
    temperature=st.sampled_from((0.5, 1.0, 2.0, 4.0)),
    seed=st.integers(0, 2**31),
)
def test_q8_kl_is_small_and_bounded_and_the_tail_is_exact(
    positions: int, k: int, temperature: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    top = teacher_topk(rng, positions, k, 300, temperature)
    s = spec("q8", "q8", k)
    stored = encode_logprobs(s, top["logprobs"], top["tail"])
    assert stored.dtype == np.uint8
    decoded = decode_logprobs(s, stored, top["tail"])
    assert decoded.dtype == np.float32 and np.all(np.isfinite(decoded))
    kl = dense_kl(top["logprobs"], top["tail"], decoded)
    np.testing.assert_allclose(position_kl(top["logprobs"], top["tail"], decoded), kl, rtol=1e-6, atol=1e-12)
    # every log-ratio lies within one grid step, so Hoeffding's lemma bounds KL by step^2 / 8
    unclipped = (top["logprobs"][:, :1] - top["logprobs"]).max(axis=1) < 255 * Q8_STEP
    assert np.all(kl[unclipped] <= Q8_STEP**2 / 8 * 1.001)
    mean, worst = encoding_kl(top["logprobs"], top["tail"], decoded)
    assert mean == pytest.approx(kl.mean(), rel=1e-6, abs=1e-12) and worst == pytest.approx(kl.max(), rel=1e-6)
    assert worst <= Q8_STEP**2 / 8 * 1.001 and mean < 3e-4
    # a sub-distribution whose kept mass is exactly 1 - tail: the tail bin is not re-derived
    kept = np.exp(decoded.astype(np.float64)).sum(axis=1)
    target = 1.0 - top["tail"].astype(np.float64)
    assert np.all(kept <= target * (1 + 1e-12)) and np.all(kept >= target * (1 - 1e-5))
    assert np.all(np.diff(decoded, axis=1) <= 0)  # the ranking survives
    # decoding is idempotent: re-encoding what a reader got gives the same codes
    assert np.array_equal(encode_logprobs(s, decoded, top["tail"]), stored)


def dense_kl(exact: np.ndarray, tail: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """KL(p || q) per position over the k+1 bins (the kept ids and the tail), each side normalised, in float64."""
    p = np.concatenate([np.exp(exact.astype(np.float64)), tail.astype(np.float64)[:, None]], axis=1)
    q = np.concatenate([np.exp(decoded.astype(np.float64)), tail.astype(np.float64)[:, None]], axis=1)
    p, q = p / p.sum(axis=1, keepdims=True), q / q.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    out: np.ndarray = terms.sum(axis=1)
    return out


def test_q8_survives_the_edges_of_a_topk() -> None:
    s = spec("q8", "q8", 3)
    lp = np.array([[0.0, -30.0, -np.inf], [-1.0, -1.0, -1.0], [-np.inf] * 3, [-2.0, -0.5, -3.0]], np.float32)
    tail = np.array([0.0, 1.0, 1.0, 0.4], np.float32)  # tail 1.0: a kept mass below float32's resolution
    out = decode_logprobs(s, encode_logprobs(s, lp, tail), tail)
    assert np.all(np.isfinite(out)) and np.all(np.exp(out.astype(np.float64)).sum(axis=1) <= 1 - tail + 1e-12)
    assert out[0, 0] == 0.0 or out[0, 0] > -1e-6  # p = 1: the top-1 keeps (nearly) all the mass
    assert out[3].argmax() == 1  # unsorted input still decodes in place (codes are relative to the row's max)


def test_position_kl_equals_the_dense_kl_over_k_plus_one_bins() -> None:
    rng = np.random.default_rng(0)
    top = teacher_topk(rng, 5, 4, 50)
    decoded = top["logprobs"] + rng.normal(0, 0.05, top["logprobs"].shape).astype(np.float32)
    dense = dense_kl(top["logprobs"], top["tail"], decoded)
    np.testing.assert_allclose(position_kl(top["logprobs"], top["tail"], decoded), dense, rtol=1e-9, atol=1e-15)
    assert encoding_kl(top["logprobs"], top["tail"], top["logprobs"]) == (0.0, 0.0)
    assert encoding_kl(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4))) == (0.0, 0.0)


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_q8_store_records_its_kl_and_keeps_the_exact_tail(tmp_path: Path, backend: str) -> None:
    rng = np.random.default_rng(1)
    m = make_manifest(backend, k=8, num_classes=VOCAB)
    m = dataclasses.replace(m, targets=dataclasses.replace(m.targets, value_dtype="q8"))
    shards = []
    with StoreWriter(tmp_path / "s", m) as w:
        for unit in range(2):
            b = ShardBuilder("causal-lm", w.manifest.targets)
            tops = [teacher_topk(rng, 30, 8, 400) for _ in range(3)]
            for top in tops:
                b.add(rng.integers(0, VOCAB, 31), top["ids"], top["logprobs"], top["tail"])
            built = b.build()
            assert built.target_logprobs.dtype == np.float32  # kept unquantised until the writer encodes it
            shards.append(tops)
            w.write_shard(unit, built, {"kept_mass_sum": 1.0, "count": 90.0})
        w.finish()
    store = open_store(tmp_path / "s")
    assert store.manifest.targets.encoding == "q8" and store.manifest.targets.value_dtype == "q8"
    exact = np.concatenate([t["logprobs"] for tops in shards for t in tops])
    tail = np.concatenate([t["tail"] for tops in shards for t in tops])
    got = np.concatenate([ex["target_logprobs"] for ex in store])
    assert got.dtype == np.float32
    assert np.array_equal(np.concatenate([ex["tail_mass"] for ex in store]), tail)
    mean, worst = encoding_kl(exact, tail, got)
    stats = [s.stats for s in store.manifest.shards]
    assert all(set(s) >= {"kl_sum", "kl_max", "count", "kept_mass_sum"} and s["count"] == 90 for s in stats)
    assert sum(s["kl_sum"] for s in stats) / 180 == pytest.approx(mean, rel=1e-9)
    assert max(s["kl_max"] for s in stats) == pytest.approx(worst, rel=1e-9)
    assert summarize(store)["encoding_kl"] == {"mean": pytest.approx(mean, rel=1e-9), "max": pytest.approx(worst)}
    assert data.verify_store(tmp_path / "s").ok


# ---------------------------------------------------------------- manifest field


def test_target_spec_parses_old_and_new_manifests() -> None:
    old = {
        "method": "topk",
        "k": 4,
        "temperature": 1.0,
        "num_classes": 50,
        "value_dtype": "float16",
        "id_dtype": "uint16",
    }
    assert TargetSpec.from_dict(old).encoding == "plain"  # stores from before the field existed
    for value_dtype, encoding in (("float16", "delta"), ("float32", "delta"), ("float32", "plain"), ("q8", "q8")):
        s = TargetSpec.from_dict({**old, "value_dtype": value_dtype, "encoding": encoding})
        assert TargetSpec.from_dict(s.to_dict()) == s
    assert TargetSpec.from_dict({**old, "value_dtype": "q8", "encoding": "q8"}).logprob_dtype == "float32"
    for bad, match in (
        ({"encoding": "auto"}, "not one of"),
        ({"encoding": "zip"}, "not one of"),
        ({"encoding": 3}, "expected"),
        ({"encoding": "q8"}, "does not fit"),
        ({"value_dtype": "q8"}, "does not fit"),
        ({"value_dtype": "q8", "encoding": "delta"}, "does not fit"),
    ):
        with pytest.raises(ManifestError, match=match):
            TargetSpec.from_dict({**old, **bad})


def test_the_writer_resolves_auto_and_resumes_an_old_store_in_its_own_encoding(tmp_path: Path) -> None:
    assert resolve_targets("zarr", spec(encoding="auto")).encoding == "delta"
    assert resolve_targets("arrow", spec(encoding="auto")).encoding == "plain"
    assert resolve_targets("arrow", spec("q8", "auto")).encoding == "q8"
    assert resolve_targets("zarr", spec(encoding="plain")).encoding == "plain"  # explicit wins
    # a template ("auto") matches the store it made, so a job can tell its own store from another's
    write_store(tmp_path / "new", "zarr", shards=1)
    made = open_store(tmp_path / "new").manifest
    assert made.targets.encoding == "delta"
    assert not differences(made.provenance_key(), make_manifest("zarr").provenance_key())
    # a store written before encodings existed: plain float16 zarr, no "encoding" key in its manifest
    m = make_manifest("zarr")
    plain = dataclasses.replace(m, targets=dataclasses.replace(m.targets, encoding="plain"))
    with StoreWriter(tmp_path / "s", plain) as w:
        b = ShardBuilder("causal-lm", plain.targets)
        b.add([1, 2, 3], [[1, 2, 3, 4]] * 2, [[-1.0, -1.5, -2.0, -3.0]] * 2, [0.2239] * 2)  # kept 0.7761
        w.write_shard(0, b.build())
    raw = rawstore.load(tmp_path / "s")
    del raw["targets"]["encoding"]
    rawstore.save(tmp_path / "s", raw)
    with StoreWriter(tmp_path / "s", m) as w:  # the template says "auto"
        assert w.manifest.targets.encoding == "plain" and w.committed_units == {0}
        b = ShardBuilder("causal-lm", m.targets)
        b.add([4, 5], [[1, 2, 3, 4]], [[-1.25, -1.5, -2.0, -3.0]], [0.3053])  # kept 0.6947
        w.write_shard(1, b.build())
        w.finish()
    store = open_store(tmp_path / "s")
    assert store[1]["target_logprobs"].tolist() == [[-1.25, -1.5, -2.0, -3.0]]
    with pytest.raises(StoreExistsError, match=r"targets\.encoding"):
        StoreWriter(tmp_path / "s", dataclasses.replace(m, targets=dataclasses.replace(m.targets, encoding="delta")))

"""Shard value checks (data/values.py): a store whose checksums are right but whose values are insane is refused.

Every bad shard is built as a ShardData through the real ShardBuilder, then either handed to the writer (which
refuses it) or written through the backend directly over a healthy store's shard, with the manifest's sizes and
SHA-256s recomputed, so that only a value check can catch it. Each case names the example (1) and position (1)
it corrupts; every reader must name that row: verify, the loader, ``StoreReader`` and export; the CLI prints one
``Error:`` line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from kd_pipeline import data
from kd_pipeline.data import CorruptShardError, ShardBuilder, ShardData, StoreWriter, open_store, verify_store
from kd_pipeline.data.backends import shard_relpath, write_shard
from kd_pipeline.data.codecs import encode_shard
from kd_pipeline.data.dataset import StoreDataset
from kd_pipeline.data.export import export_store
from kd_pipeline.data.values import kept_mass_tolerance
from kd_pipeline.pipeline.cli import cli
from tests import rawstore
from tests.conftest import make_manifest
from tests.test_sampled import sampled_manifest

Edit = Callable[[ShardData, int], None]

ROWS, LENGTH = 3, 5  # every example: 5 tokens, 4 positions; the corrupted one is example 1, position 1
P_BAD = (LENGTH - 1) + 1  # its flat index on the shard's position axis
AT = "SHARD: example 1, position 1"  # SHARD: shard-000000 where the writer refuses it, shard-000001 in a store


def _topk_shard(m: data.Manifest, seed: int = 0) -> ShardData:
    """A healthy causal-lm top-k shard: real log-softmax values over num_classes, the exact tail."""
    rng = np.random.default_rng(seed)
    t = m.targets
    b = ShardBuilder(m.task, t)
    for _ in range(ROWS):
        logits = rng.normal(size=(LENGTH - 1, t.num_classes)) * 3
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        top = np.argsort(-logp, axis=1)[:, : t.k]
        kept = np.take_along_axis(logp, top, axis=1)
        b.add(rng.integers(0, m.vocab_size, LENGTH), top, kept, 1.0 - np.exp(kept).sum(axis=1))
    return b.build()


def _sampled_shard(m: data.Manifest) -> ShardData:
    """A healthy sampled shard whose position 1 of example 1 holds ids {3, 7, 9} with counts 10 + 6 + 4 = 20."""
    assert m.targets.num_samples == 20
    b = ShardBuilder(m.task, m.targets)
    for _ in range(ROWS):
        ids = [1, 4, 3, 7, 9, 2, 5, 6]
        counts = [15, 5, 10, 6, 4, 20, 19, 1]
        b.add_sampled(list(range(LENGTH)), ids, counts, [0, 2, 5, 6, 8])
    return b.build()


def _hybrid_shard(m: data.Manifest) -> ShardData:
    """A healthy hybrid shard: top-4 of real log-softmax values over 50 ids, and at every position 3 tail ids
    (the three smallest ids outside its top-4) with counts 10 + 6 + 4 = 20."""
    assert m.targets.num_samples == 20 and m.targets.k == 4
    rng = np.random.default_rng(0)
    b = ShardBuilder(m.task, m.targets)
    for _ in range(ROWS):
        logits = rng.normal(size=(LENGTH - 1, m.targets.num_classes)) * 3
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        top = np.argsort(-logp, axis=1)[:, :4]
        kept = np.take_along_axis(logp, top, axis=1)
        tail_ids = np.concatenate([np.setdiff1d(np.arange(50), row)[:3] for row in top])
        tail = 1.0 - np.exp(kept).sum(axis=1)
        b.add_hybrid(range(LENGTH), top, kept, tail, tail_ids, [10, 6, 4] * (LENGTH - 1), np.arange(LENGTH) * 3)
    return b.build()


def _healthy(m: data.Manifest) -> ShardData:
    if m.targets.sampled:
        return _sampled_shard(m)
    return _hybrid_shard(m) if m.targets.hybrid else _topk_shard(m)


def _set_lp(p: int, j: int, value: float) -> Edit:
    def edit(s: ShardData, _: int) -> None:
        assert s.target_logprobs is not None
        s.target_logprobs[p, j] = value

    return edit


def _swap_ranks(s: ShardData, p: int) -> None:  # the same mass, in the wrong order
    assert s.target_logprobs is not None
    s.target_logprobs[p, [1, 2]] = s.target_logprobs[p, [2, 1]]


def _repeat_id(s: ShardData, p: int) -> None:
    s.target_ids[p, 2] = s.target_ids[p, 1]


def _id_too_large(s: ShardData, p: int) -> None:
    s.target_ids[p, 3] = 50


def _input_id_too_large(s: ShardData, p: int) -> None:
    s.input_ids[LENGTH + 1] = 50  # example 1, token 1


def _set_tail(value: float) -> Edit:
    def edit(s: ShardData, p: int) -> None:
        s.tail_mass[p] = value

    return edit


def _lose_mass(s: ShardData, p: int) -> None:  # every kept probability x 0.6: still sorted, still <= 0
    assert s.target_logprobs is not None
    s.target_logprobs[p] = (s.target_logprobs[p].astype(np.float32) - 0.5).astype(s.target_logprobs.dtype)


def _token_offsets_fall(s: ShardData, p: int) -> None:
    s.token_offsets[2] = s.token_offsets[1] - 1


# (id, edit, message regex, value dtypes, backends able to hold it)
TOPK_CASES: list[tuple[str, Edit, str, tuple[str, ...], tuple[str, ...]]] = [
    (
        "nan",
        _set_lp(P_BAD, 2, np.nan),
        rf"{AT}: log-prob nan at rank 2 \(NaN\)",
        ("float16", "float32"),
        ("zarr", "arrow"),
    ),
    ("inf", _set_lp(P_BAD, 0, np.inf), rf"{AT}: log-prob inf at rank 0 \(infinite\)", ("float16",), ("zarr", "arrow")),
    (
        "positive",
        _set_lp(P_BAD, 0, 0.5),
        rf"{AT}: log-prob 0.5 at rank 0 \(positive\)",
        ("float16", "float32"),
        ("zarr", "arrow"),
    ),
    (
        "increasing",
        _swap_ranks,
        rf"{AT}: log-prob .* at rank 2 is above .* at rank 1",
        ("float16", "float32"),
        ("zarr", "arrow"),
    ),
    (
        "repeated-id",
        _repeat_id,
        rf"{AT}: target id \d+ appears more than once",
        ("float16",),
        ("zarr", "arrow"),
    ),
    (
        "id-too-large",
        _id_too_large,
        rf"{AT}: target id 50 at rank 3; expected < num_classes 50",
        ("float16",),
        ("zarr", "arrow"),
    ),
    (
        "input-id-too-large",
        _input_id_too_large,
        r"SHARD: example 1, token 1: input id 50; expected < vocab_size 50",
        ("float16",),
        ("zarr", "arrow"),
    ),
    ("tail-5", _set_tail(5.0), rf"{AT}: tail_mass 5.0; expected a mass in \[0, 1\]", ("float16",), ("zarr", "arrow")),
    (
        "tail-negative",
        _set_tail(-0.25),
        rf"{AT}: tail_mass -0.25; expected a mass in \[0, 1\]",
        ("float16",),
        ("zarr", "arrow"),
    ),
    (
        "kept-plus-tail",
        _lose_mass,
        rf"{AT}: kept mass .* expected 1 within",
        ("float16", "float32"),
        ("zarr", "arrow"),
    ),
    # arrow holds each example as its own list, so falling offsets cannot be written there
    (
        "token-offsets-fall",
        _token_offsets_fall,
        r"SHARD: 'token_offsets' falls from \d+ to \d+ at example 1",
        ("float16",),
        ("zarr",),
    ),
]


def _sampled_edit(fn: Callable[[ShardData], None]) -> Edit:
    return lambda s, p: fn(s)


E0 = 8 + 2  # flat entry index of example 1, position 1's first entry (8 entries per example)
SAMPLED_CASES: list[tuple[str, Edit, str, tuple[str, ...]]] = [
    (
        "count-zero",
        _sampled_edit(lambda s: s.target_counts.__setitem__(slice(E0, E0 + 3), [16, 0, 4])),
        rf"{AT}, sampled entry 1: a sampled id has a count of 0",
        ("zarr", "arrow"),
    ),
    (
        "counts-sum",
        _sampled_edit(lambda s: s.target_counts.__setitem__(E0 + 2, 5)),
        rf"{AT}: the counts of a position do not sum to num_samples=20 \(they sum to 21\)",
        ("zarr", "arrow"),
    ),
    (
        "ids-not-ascending",
        _sampled_edit(lambda s: s.target_ids.__setitem__(slice(E0, E0 + 2), [7, 3])),
        rf"{AT}, sampled entry 1: target id 3 follows 7; expected the ids of a position unique and ascending",
        ("zarr", "arrow"),
    ),
    (
        "sampled-id-too-large",
        _sampled_edit(lambda s: s.target_ids.__setitem__(E0 + 2, 50)),
        rf"{AT}, sampled entry 2: target id 50; expected < num_classes 50",
        ("zarr", "arrow"),
    ),
    (
        "target-offsets-fall",
        _sampled_edit(lambda s: s.target_offsets.__setitem__(5, 3)),
        r"SHARD: example 1, position 0: 'target_offsets' gives -5 ids",
        ("zarr",),
    ),
]


def _in(shard: str, message: str) -> str:
    return message.replace("SHARD", shard)


def _topk_manifest(backend: str, dtype: str = "float16") -> data.Manifest:
    m = make_manifest(backend, k=4, num_classes=50)
    return dataclasses.replace(m, targets=dataclasses.replace(m.targets, value_dtype=dtype))


def _bad(m: data.Manifest, edit: Edit) -> ShardData:
    shard = _healthy(m)
    shard.validate(m.task, m.targets, m.vocab_size, "healthy")  # the edit alone makes it bad
    edit(shard, P_BAD)
    return shard


def _store_with_bad_shard(path: Path, m: data.Manifest, bad: ShardData) -> None:
    """Two shards through the writer, then shard 1's files replaced by ``bad`` and its checksums recomputed."""
    healthy = _healthy(m)
    with StoreWriter(path, m) as w:
        w.write_shard(0, healthy)
        w.write_shard(1, healthy)
        w.finish()
        targets = w.manifest.targets  # the resolved encoding
    rel = shard_relpath(m.backend, "shard-000001")
    target = path / rel
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    write_shard(m.backend, target, encode_shard(targets, bad)[0], {"format": "kd-soft-labels", "shard": "x", "unit": 1})
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    base = target.parent if target.is_file() else target
    raw = rawstore.load(path)
    raw["shards"][1]["files"] = {
        p.relative_to(base).as_posix(): {
            "bytes": p.stat().st_size,
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
        }
        for p in files
    }
    if bad.num_entries is not None:  # an edit that drops ragged entries changes the count the manifest records
        raw["shards"][1]["entries"] = bad.num_entries
    rawstore.save(path, raw)


def _assert_readers_refuse(path: Path, message: str) -> None:
    """verify names the shard and row; StoreReader, the loader and export raise CorruptShardError saying so."""
    report = verify_store(path)
    assert not report.ok and report.shards_checked == 2
    assert len(report.problems) == 1 and re.search(message, report.problems[0]), report.problems
    store = open_store(path)
    assert store[0]["input_ids"].shape == (LENGTH,)  # shard 0 is healthy
    with pytest.raises(CorruptShardError, match=message):
        store[ROWS]
    with pytest.raises(CorruptShardError, match=message):
        for _ in StoreDataset(open_store(path), batch_size=2, shuffle=False):
            pass
    with pytest.raises(CorruptShardError, match=message):
        export_store(path, to="arrow", out=path.parent / "out.arrow")
    assert not (path.parent / "out.arrow").exists()


# ---------------------------------------------------------------------------------------------------- top-k


@pytest.mark.parametrize(
    ("edit", "message", "dtype", "backend"),
    [
        pytest.param(edit, msg, dtype, backend, id=f"{name}-{dtype}-{backend}")
        for name, edit, msg, dtypes, backends in TOPK_CASES
        for dtype in dtypes
        for backend in backends
    ],
)
def test_topk_bad_values_are_refused_by_writer_and_readers(
    tmp_path: Path, edit: Edit, message: str, dtype: str, backend: str
) -> None:
    m = _topk_manifest(backend, dtype)
    with StoreWriter(tmp_path / "w", m) as w, pytest.raises(CorruptShardError, match=_in("shard-000000", message)):
        w.write_shard(0, _bad(m, edit))
    _store_with_bad_shard(tmp_path / "s", m, _bad(m, edit))
    _assert_readers_refuse(tmp_path / "s", _in("shard-000001", message))


def test_q8_store_decodes_to_exact_kept_mass_and_refuses_a_bad_tail(tmp_path: Path) -> None:
    m = _topk_manifest("zarr", "q8")
    healthy = _topk_shard(m)
    with StoreWriter(tmp_path / "ok", m) as w:
        w.write_shard(0, healthy)
        w.finish()
    got = open_store(tmp_path / "ok").shard(0)
    assert got.target_logprobs is not None
    err = np.abs(np.exp(got.target_logprobs.astype(np.float64)).sum(axis=1) + got.tail_mass - 1)
    assert err.max() < kept_mass_tolerance("float32", m.targets.k)
    _store_with_bad_shard(tmp_path / "s", m, _bad(m, _set_tail(5.0)))
    _assert_readers_refuse(tmp_path / "s", _in("shard-000001", rf"{AT}: tail_mass 5.0"))


def test_tolerance_admits_float16_rounding_of_real_values(tmp_path: Path) -> None:
    """A flat distribution over many kept ids, rounded to float16, is the worst case of the bound; it passes."""
    m = make_manifest("zarr", k=256, num_classes=300)
    b = ShardBuilder(m.task, m.targets)
    rng = np.random.default_rng(1)
    for _ in range(20):
        logits = rng.normal(size=(7, 300)) * 0.3
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        top = np.argsort(-logp, axis=1)[:, :256]
        kept = np.take_along_axis(logp, top, axis=1)
        b.add(rng.integers(0, 50, 8), top, kept, 1.0 - np.exp(kept).sum(axis=1))
    with StoreWriter(tmp_path / "s", m) as w:
        w.write_shard(0, b.build())
        w.finish()
    assert verify_store(tmp_path / "s").ok


# ---------------------------------------------------------------------------------------------------- sampled


@pytest.mark.parametrize(
    ("edit", "message", "backend"),
    [
        pytest.param(edit, msg, backend, id=f"{name}-{backend}")
        for name, edit, msg, backends in SAMPLED_CASES
        for backend in backends
    ],
)
def test_sampled_bad_values_are_refused_by_writer_and_readers(
    tmp_path: Path, edit: Edit, message: str, backend: str
) -> None:
    m = sampled_manifest(backend, n=20)
    with StoreWriter(tmp_path / "w", m) as w, pytest.raises(CorruptShardError, match=_in("shard-000000", message)):
        w.write_shard(0, _bad(m, edit))
    _store_with_bad_shard(tmp_path / "s", m, _bad(m, edit))
    _assert_readers_refuse(tmp_path / "s", _in("shard-000001", message))


# ---------------------------------------------------------------------------------------------------- CLI


def _one_error_line(result: Any, message: str, alone: bool = True) -> None:
    """Exit 1, no traceback, and one ``Error:`` line matching ``message``: the only line when ``alone``, else
    the last (a run that got going has printed its progress line before it)."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and (len(lines) == 1 or not alone), result.output
    assert [line for line in lines if line.startswith("Error:")] == lines[-1:], result.output
    assert re.search(message, lines[-1]), lines[-1]


@pytest.fixture
def bad_store(tmp_path: Path) -> Path:
    m = _topk_manifest("zarr")
    _store_with_bad_shard(tmp_path / "s", m, _bad(m, _set_lp(P_BAD, 2, np.nan)))
    return tmp_path / "s"


def test_cli_verify_names_shard_and_row(bad_store: Path) -> None:
    result = CliRunner().invoke(cli, ["verify", str(bad_store)])
    assert result.exit_code == 1
    assert f"BAD  {_in('shard-000001', AT)}: log-prob nan at rank 2 (NaN)" in result.output
    report = json.loads(CliRunner().invoke(cli, ["verify", "--json", str(bad_store)]).output)
    assert not report["ok"] and report["problems"][0].startswith(_in("shard-000001", AT))


def test_cli_export_refuses_in_one_line(bad_store: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["export", str(bad_store), str(tmp_path / "x.parquet")])
    _one_error_line(result, _in("shard-000001", rf"{AT}: log-prob nan"))
    assert not (tmp_path / "x.parquet").exists()


def _student(folder: Path) -> Path:
    """A fresh config-only student covering the conftest stores' 50 ids (no tokenizer: nothing to compare)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(cfg.to_json_string())
    return folder


@pytest.mark.parametrize(
    ("extra", "alone"),
    [
        pytest.param(["--verify", "full"], True, id="verify-full"),
        pytest.param([], False, id="loader-first-read"),
        pytest.param(["--verify", "none", "--workers", "1"], False, id="loader-worker"),
    ],
)
def test_cli_train_refuses_in_one_line(bad_store: Path, tmp_path: Path, extra: list[str], alone: bool) -> None:
    """--verify full: refused before the model loads, one line in all. The default (checksums on first read;
    the bad shard's checksums are right, its values are not) and --verify none: at the loader's first read of
    the bad shard, after the run's own progress line, as one Error line (from a worker too)."""
    args = ["train", "--store", str(bad_store), "--student", str(_student(tmp_path / "student")), "--steps", "3"]
    result = CliRunner().invoke(
        cli, [*args, "--out", str(tmp_path / "run"), "--batch-size", "2", "--eval-fraction", "0", *extra]
    )
    _one_error_line(result, _in("shard-000001", rf"{AT}: log-prob nan at rank 2 \(NaN\); expected finite"), alone)
    assert not (tmp_path / "run" / "final").exists()


def test_cli_train_refuses_a_bad_sampled_store_in_one_line(tmp_path: Path) -> None:
    m = sampled_manifest("arrow", n=20)
    _store_with_bad_shard(tmp_path / "s", m, _bad(m, SAMPLED_CASES[1][1]))
    args = ["train", "--store", str(tmp_path / "s"), "--student", str(_student(tmp_path / "student")), "--steps", "3"]
    result = CliRunner().invoke(
        cli, [*args, "--out", str(tmp_path / "run"), "--verify", "none", "--loss", "forward-kl", "--eval-fraction", "0"]
    )
    _one_error_line(result, _in("shard-000001", rf"{AT}: the counts of a position do not sum"), alone=False)


# ---------------------------------------------------------------------------------------------------- hybrid

H0 = (LENGTH - 1) * 3 + 3  # flat tail entry of example 1, position 1's first tail id (3 per position)


def _hybrid_edit(fn: Callable[[ShardData], None]) -> Edit:
    def edit(s: ShardData, _: int) -> None:
        assert s.tail_ids is not None and s.tail_counts is not None and s.tail_offsets is not None
        fn(s)

    return edit


def _tail_takes_a_kept_id(s: ShardData) -> None:
    assert s.tail_ids is not None
    s.tail_ids[H0 : H0 + 3] = np.sort([s.target_ids[P_BAD, 0], *s.tail_ids[H0 + 1 : H0 + 3]])


def _drop_tail(s: ShardData) -> None:  # no draws at a position whose tail is not 0
    assert s.tail_ids is not None and s.tail_counts is not None and s.tail_offsets is not None
    s.tail_ids = np.delete(s.tail_ids, np.s_[H0 : H0 + 3])
    s.tail_counts = np.delete(s.tail_counts, np.s_[H0 : H0 + 3])
    s.tail_offsets[P_BAD + 1 :] -= 3


def _zero_tail_with_draws(s: ShardData) -> None:  # the top-4 renormalised to hold all the mass, draws kept
    assert s.target_logprobs is not None
    lp = s.target_logprobs[P_BAD].astype(np.float64)
    s.target_logprobs[P_BAD] = lp - np.log(np.exp(lp).sum())
    s.tail_mass[P_BAD] = 0.0


def _tail_offsets_fall(s: ShardData) -> None:
    assert s.tail_offsets is not None
    s.tail_offsets[P_BAD + 1] = s.tail_offsets[P_BAD] - 1


HYBRID_CASES: list[tuple[str, Edit, str, tuple[str, ...]]] = [
    (
        "tail-id-is-kept",
        _hybrid_edit(_tail_takes_a_kept_id),
        rf"{AT}, tail entry \d: tail id \d+ is one of the position's top-4 ids; expected tail ids outside the top-k",
        ("zarr", "arrow"),
    ),
    (
        "tail-count-zero",
        _hybrid_edit(lambda s: s.tail_counts.__setitem__(slice(H0, H0 + 3), [16, 0, 4])),
        rf"{AT}, tail entry 1: a sampled id has a count of 0",
        ("zarr", "arrow"),
    ),
    (
        "tail-counts-sum",
        _hybrid_edit(lambda s: s.tail_counts.__setitem__(H0 + 2, 5)),
        rf"{AT}: the counts of a position do not sum to num_samples=20 \(they sum to 21\)",
        ("zarr", "arrow"),
    ),
    (
        "tail-ids-not-ascending",
        _hybrid_edit(lambda s: s.tail_ids.__setitem__(slice(H0, H0 + 2), s.tail_ids[H0 : H0 + 2][::-1].copy())),
        rf"{AT}, tail entry 1: tail id \d+ follows \d+; expected the ids of a position unique and ascending",
        ("zarr", "arrow"),
    ),
    (
        "tail-id-too-large",
        _hybrid_edit(lambda s: s.tail_ids.__setitem__(H0 + 2, 50)),
        rf"{AT}, tail entry 2: tail id 50; expected < num_classes 50",
        ("zarr", "arrow"),
    ),
    (
        "no-draws-beside-a-tail",
        _hybrid_edit(_drop_tail),
        rf"{AT}: 'tail_offsets' gives 0 tail ids; expected 1..min\(num_samples, num_classes - k\)=20",
        ("zarr", "arrow"),
    ),
    (
        "draws-beside-a-zero-tail",
        _hybrid_edit(_zero_tail_with_draws),
        rf"{AT}: 'tail_offsets' gives 3 tail ids; expected none \(its tail_mass is 0\)",
        ("zarr", "arrow"),
    ),
    (
        "tail-offsets-fall",
        _hybrid_edit(_tail_offsets_fall),
        rf"{AT}: 'tail_offsets' gives -1 tail ids",
        ("zarr",),
    ),
]


def _hybrid_manifest(backend: str) -> data.Manifest:
    m = make_manifest(backend, k=4, num_classes=50)
    return dataclasses.replace(m, targets=data.TargetSpec("hybrid", 4, 2.0, 50, num_samples=20))


@pytest.mark.parametrize(
    ("edit", "message", "backend"),
    [
        pytest.param(edit, msg, backend, id=f"{name}-{backend}")
        for name, edit, msg, backends in HYBRID_CASES
        for backend in backends
    ],
)
def test_hybrid_bad_values_are_refused_by_writer_and_readers(
    tmp_path: Path, edit: Edit, message: str, backend: str
) -> None:
    m = _hybrid_manifest(backend)
    with StoreWriter(tmp_path / "w", m) as w, pytest.raises(CorruptShardError, match=_in("shard-000000", message)):
        w.write_shard(0, _bad(m, edit))
    _store_with_bad_shard(tmp_path / "s", m, _bad(m, edit))
    _assert_readers_refuse(tmp_path / "s", _in("shard-000001", message))


def test_hybrid_shard_without_its_tail_columns_is_refused() -> None:
    m = _hybrid_manifest("zarr")
    shard = dataclasses.replace(_hybrid_shard(m), tail_ids=None, tail_counts=None, tail_offsets=None)
    with pytest.raises(CorruptShardError, match="column 'tail_ids' is missing"):
        shard.validate(m.task, m.targets, m.vocab_size, "x")
    topk = _topk_manifest("zarr")
    with pytest.raises(CorruptShardError, match="belong to hybrid stores only"):
        _hybrid_shard(m).validate(topk.task, topk.targets, topk.vocab_size, "x")

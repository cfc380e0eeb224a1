"""Held-out evaluation by content key: the same examples whatever the shard size, ranks or backend; one shard is
enough; ``pipeline train`` with its defaults works on a one-shard store."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from kd_pipeline.data import CorruptShardError, open_store
from kd_pipeline.data.dataset import StoreDataset
from kd_pipeline.pipeline.cli import cli
from tests.conftest import write_store
from tests.tiny import SENTENCES, make_model, make_tokenizer, write_jsonl

FRACTION = 0.3


def content_key(input_ids: np.ndarray) -> bytes:
    """The documented content key, written out: BLAKE2b-128 of the input ids as little-endian uint32."""
    return hashlib.blake2b(np.asarray(input_ids, dtype="<u4").tobytes(), digest_size=16).digest()


def held_keys(keys: list[bytes], fraction: float) -> Counter[bytes]:
    """The documented rule, written out: the round(fraction * N) keys (at least 1, at most N - 1) whose first 8
    bytes, as a little-endian integer, are smallest; copies of a key go with it. A multiset."""
    count = min(max(1, round(fraction * len(keys))), len(keys) - 1)
    threshold = sorted(int.from_bytes(k[:8], "little") for k in keys)[count - 1]
    return Counter(k for k in keys if int.from_bytes(k[:8], "little") <= threshold)


def keys_seen(path: Path, split: str, *, world: int = 1, batch_size: int = 3, **kw: Any) -> list[bytes]:
    """The content keys of every real example that the ranks' datasets of ``split`` yield, recomputed from the
    tokens in the batches (not from the store's key column)."""
    out = []
    for rank in range(world):
        ds = StoreDataset(
            path, batch_size=batch_size, split=split, eval_fraction=FRACTION, rank=rank, world_size=world, **kw
        )
        for batch in ds:
            for ids, mask, weight in zip(
                batch["input_ids"], batch["attention_mask"], batch["example_weight"], strict=True
            ):
                if weight > 0:
                    out.append(content_key(ids[mask.bool()].numpy()))
    return out


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_split_is_by_content_key_whatever_the_shard_size_or_ranks(tmp_path: Path, backend: str) -> None:
    # the same 60 examples in one shard and in 12 shards of 5 (write_store draws them in the same order)
    write_store(tmp_path / "one", backend, shards=1, rows=60, seed=3)
    write_store(tmp_path / "many", backend, shards=12, rows=5, seed=3)
    every = [content_key(ex["input_ids"]) for ex in open_store(tmp_path / "one")]
    # a multiset: random short examples can repeat, and duplicates must land on the same side
    held = held_keys(every, FRACTION)
    assert sum(held.values()) == 18 == round(FRACTION * 60)
    for store in ("one", "many"):
        for world in (1, 2):
            ev = keys_seen(tmp_path / store, "eval", world=world)
            tr = keys_seen(tmp_path / store, "train", world=world, seed=5)
            assert Counter(ev) == held, (store, world)  # each held-out example once, nothing else
            assert Counter(tr) == Counter(every) - held, (store, world)


def test_split_datasets_count_and_resume_with_the_split(tmp_path: Path) -> None:
    write_store(tmp_path / "s", shards=4, rows=10, seed=1)
    every = [content_key(ex["input_ids"]) for ex in open_store(tmp_path / "s")]
    n_held = sum(held_keys(every, FRACTION).values())
    assert n_held == 12
    ev = StoreDataset(tmp_path / "s", batch_size=4, split="eval", eval_fraction=FRACTION)
    tr = StoreDataset(tmp_path / "s", batch_size=4, split="train", eval_fraction=FRACTION)
    assert (ev.num_examples, tr.num_examples) == (n_held, 40 - n_held)
    assert len(tr) == -(-(40 - n_held) // 4)
    # exact resume inside the split: the tail after 2 batches equals the uninterrupted run's tail
    full = np.concatenate([b["index"].numpy() for b in tr])
    state = json.loads(json.dumps(tr.state_dict(samples_seen=8)))
    again = StoreDataset(tmp_path / "s", batch_size=4, split="train", eval_fraction=FRACTION)
    again.load_state_dict(state)
    assert np.array_equal(np.concatenate([b["index"].numpy() for b in again]), full[8:])
    assert sorted(full.tolist()) == list(range(40 - n_held))
    other = StoreDataset(tmp_path / "s", batch_size=4, split="train", eval_fraction=0.5)
    with pytest.raises(ValueError, match="eval_fraction"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="split 'eval' needs 0 < eval_fraction < 1"):
        StoreDataset(tmp_path / "s", batch_size=4, split="eval")
    with pytest.raises(ValueError, match="split must be one of"):
        StoreDataset(tmp_path / "s", batch_size=4, split="test", eval_fraction=0.1)


def test_the_split_reads_only_the_key_column(tmp_path: Path) -> None:
    """A zarr shard whose log-prob file is damaged cannot be decoded, but its keys still split it: making the
    split reads (and checks) the keys' files only."""
    write_store(tmp_path / "s", "zarr", shards=2, rows=10, seed=2)
    victim = next((tmp_path / "s" / "shards" / "shard-000000" / "target_logprobs").rglob("c/*/*"))
    victim.write_bytes(victim.read_bytes()[:-1])  # wrong size: any read of it fails
    with pytest.raises(CorruptShardError, match="target_logprobs"):
        open_store(tmp_path / "s").shard(0)
    shard1 = open_store(tmp_path / "s").shard(1)
    keys = [k.tobytes() for k in _keys_of_shard0(tmp_path / "s")]
    keys += [content_key(shard1.example(r, "causal-lm")["input_ids"]) for r in range(shard1.rows)]
    expected = sum(held_keys(keys, 0.5).values())
    assert StoreDataset(tmp_path / "s", batch_size=4, split="eval", eval_fraction=0.5).num_examples == expected
    key_file = next((tmp_path / "s" / "shards" / "shard-000000" / "keys").rglob("c/*/*"))
    key_file.write_bytes(key_file.read_bytes()[:-1])
    with pytest.raises(CorruptShardError, match="keys"):
        StoreDataset(tmp_path / "s", batch_size=4, split="eval", eval_fraction=0.5)


def _keys_of_shard0(path: Path) -> np.ndarray:
    """Shard 0's key column read with plain zarr (the shard itself cannot be decoded in the test above)."""
    import zarr

    return np.asarray(zarr.open_array(path / "shards" / "shard-000000" / "keys", mode="r")[...])


def test_train_with_defaults_on_a_one_shard_store(tmp_path: Path) -> None:
    """The issue's case: a small file labels into one shard, and `pipeline train` with its defaults trains on it,
    holding out --eval-fraction (0.1) of the examples by content key; the evaluation covers exactly those."""
    vocab = len(make_tokenizer(tmp_path / "tok"))
    make_model(tmp_path / "teacher", "causal-lm", vocab_size=vocab)
    docs = [{"text": f"{a} {b}"} for a in SENTENCES for b in SENTENCES[:6]]  # distinct texts
    write_jsonl(tmp_path / "docs.jsonl", docs)
    runner = CliRunner()
    store = tmp_path / "store"
    result = runner.invoke(
        cli,
        ["label", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "docs.jsonl"), "--out", str(store)],
    )
    assert result.exit_code == 0, result.output
    assert open_store(store).num_shards == 1
    assert not (store / ".lock").exists()
    student = tmp_path / "student"
    make_model(student, "causal-lm", vocab_size=vocab, seed=1)
    run = tmp_path / "run"
    args = ["train", "--store", str(store), "--student", str(student), "--out", str(run), "--steps", "2"]
    result = runner.invoke(cli, [*args, "--eval-every", "2", "--eval-batches", "1000"])
    assert result.exit_code == 0, result.output
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]
    examples = list(open_store(store))
    held = held_keys([content_key(ex["input_ids"]) for ex in examples], 0.1)
    assert sum(held.values()) == round(0.1 * len(docs))
    positions = sum(len(ex["input_ids"]) - 1 for ex in examples if content_key(ex["input_ids"]) in held)
    assert evals[-1]["positions"] == positions

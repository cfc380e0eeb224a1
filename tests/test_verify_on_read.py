"""`pipeline train --verify first-read|full|none`: when a store's checksums are checked during training.

first-read (the default) hashes each shard's files when this process first loads the shard, once per process;
full checks the whole store before step one; none checks sizes only. The hash calls are counted by wrapping
``Location.sha256`` (the one place a local file is hashed), which records and then calls the real method.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kd_pipeline import data
from kd_pipeline.data.location import Location
from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.label import LabelConfig
from kd_pipeline.stages.label import run as label
from kd_pipeline.stages.train import TrainConfig
from kd_pipeline.stages.train import run as train
from tests.test_train import _student_config
from tests.tiny import SENTENCES, make_model, make_tokenizer, write_jsonl


def _quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 4-shard causal-lm store (8 examples a shard) and a fresh student."""
    root = tmp_path_factory.mktemp("verify-on-read")
    vocab = len(make_tokenizer(root / "tok"))
    write_jsonl(root / "docs.jsonl", [{"text": s} for s in SENTENCES * 4])
    make_model(root / "teacher", "causal-lm", vocab_size=vocab)
    docs, store = str(root / "docs.jsonl"), str(root / "store")
    label(LabelConfig(teacher=str(root / "teacher"), data=docs, out=store, top_k=4, shard_size=8), log=_quiet)
    return {"store": root / "store", "student": _student_config(root / "student", vocab)}


def _cfg(world: dict[str, Any], store: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "store": str(store),
        "student": str(world["student"]),
        "out": str(out),
        "steps": 20,  # 32 examples in batches of 4: 8 steps an epoch, so 2.5 epochs
        "batch_size": 4,
        "eval_every": 1000,
        "save_every": 1000,
        "log_every": 1,
        "eval_fraction": 0.0,
    }
    return TrainConfig(**{**base, **kw})


def _counting(hashed: list[str]) -> Callable[..., Any]:
    real = Location.sha256

    def sha256(self: Location, rel: str) -> str:
        hashed.append(rel)
        return real(self, rel)

    return sha256


def _shard_files(store: Path) -> dict[str, list[str]]:
    from kd_pipeline.data.backends import shard_files

    m = data.open_store(store).manifest
    return {s.name: sorted(shard_files(m.backend, s)) for s in m.shards}


def _train_rows(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "train"]


def test_first_read_hashes_each_shard_once_per_process(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    monkeypatch.setattr(Location, "sha256", _counting(hashed))
    train(_cfg(world, world["store"], tmp_path / "run"), log=_quiet)
    every = [rel for files in _shard_files(world["store"]).values() for rel in files]
    # every file of every shard hashed, and exactly once over 2.5 epochs
    assert Counter(hashed) == Counter(every)


def test_a_flipped_byte_fails_when_its_shard_is_first_loaded(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # which shard this seed loads last: its corruption must only surface after some steps have run
    hashed: list[str] = []
    monkeypatch.setattr(Location, "sha256", _counting(hashed))
    train(_cfg(world, world["store"], tmp_path / "clean", steps=8), log=_quiet)
    files = _shard_files(world["store"])
    last = next(name for name, rels in files.items() if hashed[-1] in rels)
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    victim = max((store / rel for rel in files[last]), key=lambda p: p.stat().st_size)  # a data file, not keys
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))

    with pytest.raises(data.CorruptShardError) as err:
        train(_cfg(world, store, tmp_path / "first-read"), log=_quiet)
    assert last in str(err.value) and "SHA-256" in str(err.value) and "\n" not in str(err.value)
    assert len(_train_rows(tmp_path / "first-read")) >= 1  # steps ran before that shard was needed

    with pytest.raises(data.CorruptShardError, match="fails verification") as err:
        train(_cfg(world, store, tmp_path / "full", verify="full"), log=_quiet)
    assert last in str(err.value)
    assert _train_rows(tmp_path / "full") == []  # refused before step one


def test_none_hashes_nothing_but_checks_sizes(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    monkeypatch.setattr(Location, "sha256", _counting(hashed))
    train(_cfg(world, world["store"], tmp_path / "run", steps=10), log=_quiet)
    assert hashed  # the default hashes
    hashed.clear()
    train(_cfg(world, world["store"], tmp_path / "none", steps=10, verify="none"), log=_quiet)
    assert hashed == [] and len(_train_rows(tmp_path / "none")) == 10
    # a truncated file is still refused: sizes are always checked
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    victim = store / sorted(rel for rels in _shard_files(store).values() for rel in rels)[-1]
    victim.write_bytes(victim.read_bytes()[:-1])
    with pytest.raises(data.CorruptShardError, match="bytes"):
        train(_cfg(world, store, tmp_path / "none-bad", verify="none"), log=_quiet)


def test_cli_verify_modes(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["train", "--verify", "sometimes", "--store", "s", "--student", "x"])
    assert result.exit_code != 0 and "first-read" in result.output and "full" in result.output

"""Stage one end to end with tiny real teachers: correctness against the teacher's own logits, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kd_pipeline import data
from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.label import LabelConfig, LabelConfigError, run
from tests import rawstore
from tests.tiny import SENTENCES, make_model, make_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tiny")
    vocab = len(make_tokenizer(root / "tok"))
    out: dict[str, Any] = {"root": root, "vocab": vocab}
    for task in ("causal-lm", "seq-cls", "masked-lm"):
        out[task] = make_model(root / task, task, vocab_size=vocab, pad_rows=3 if task == "causal-lm" else 0)
    docs = [{"text": s, "label": i % 3} for i, s in enumerate(SENTENCES * 3)]
    docs[1]["text"] = "short text"  # lengths differ, so batches need padding
    out["data"] = write_jsonl(root / "docs.jsonl", docs)
    return out


def _cfg(tiny: dict[str, Any], out: Path, **kw: Any) -> LabelConfig:
    base: dict[str, Any] = {
        "teacher": str(tiny["root"] / "causal-lm"),
        "data": str(tiny["data"]),
        "out": str(out),
        "method": "topk",  # these tests check top-k targets against the teacher's own; the default: test_default_method
        "top_k": 5,
        "temperature": 2.0,
        "batch_size": 4,
        "shard_size": 7,
        "chunk_positions": 16,
    }
    base.update(kw)
    return LabelConfig(**base)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _quiet(msg: str) -> None:
    pass


def _teacher_logprobs(model: Any, ids: np.ndarray, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_causal_lm_targets_equal_the_teachers_own_topk(tiny: dict[str, Any], tmp_path: Path, backend: str) -> None:
    run(_cfg(tiny, tmp_path / "s", format=backend), log=_quiet)
    store = data.open_store(tmp_path / "s")
    m = store.manifest
    assert m.task == "causal-lm" and m.targets.k == 5 and m.targets.temperature == 2.0
    assert m.targets.num_classes == tiny["vocab"] + 3  # padded embedding rows count
    assert len(store) == len(SENTENCES) * 3 and m.complete
    teacher = tiny["causal-lm"].eval()
    nll = 0.0
    for ex in store:
        ids = ex["input_ids"].astype(np.int64)
        lp = _teacher_logprobs(teacher, ids, 2.0)  # (L, V), alone: no padding anywhere
        # position i holds the distribution of token i+1: L-1 positions, the last input position has none
        assert ex["target_ids"].shape == (len(ids) - 1, 5)
        top_lp, top_id = torch.topk(lp[:-1], 5, dim=-1)
        np.testing.assert_array_equal(ex["target_ids"].astype(np.int64), top_id.numpy())
        np.testing.assert_allclose(ex["target_logprobs"].astype(np.float32), top_lp.numpy(), rtol=1e-3, atol=2e-3)
        exact_tail = 1.0 - top_lp.double().exp().sum(-1)
        np.testing.assert_allclose(ex["tail_mass"], exact_tail.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(ex["label"], ids[1:])
        lp1 = _teacher_logprobs(teacher, ids, 1.0)
        nll -= float(lp1[torch.arange(len(ids) - 1), torch.as_tensor(ids[1:])].double().sum())
    # the teacher's own cross-entropy (T=1) on the stored tokens, for perplexity comparisons
    assert sum(s.stats["teacher_nll_sum"] for s in m.shards) == pytest.approx(nll, rel=1e-5)
    assert data.verify_store(tmp_path / "s").ok


def test_padding_does_not_leak(tiny: dict[str, Any], tmp_path: Path) -> None:
    """Batched labeling (with padding) equals labeling every example alone."""
    run(_cfg(tiny, tmp_path / "b", batch_size=8), log=_quiet)
    run(_cfg(tiny, tmp_path / "one", batch_size=1), log=_quiet)
    for a, b in zip(data.open_store(tmp_path / "b"), data.open_store(tmp_path / "one"), strict=True):
        np.testing.assert_array_equal(a["target_ids"], b["target_ids"])
        np.testing.assert_allclose(
            a["target_logprobs"].astype(np.float32), b["target_logprobs"].astype(np.float32), atol=2e-3
        )


def test_resume_after_a_partial_run_equals_one_run(tiny: dict[str, Any], tmp_path: Path) -> None:
    run(_cfg(tiny, tmp_path / "full"), log=_quiet)
    run(_cfg(tiny, tmp_path / "part"), log=_quiet)
    # the state a crash leaves after committing 2 of 4 units: an older manifest, and (at most) leftover
    # files of the uncommitted shards, which readers ignore and the resumed run replaces
    raw = rawstore.load(tmp_path / "part")
    raw["complete"] = False
    raw["shards"] = raw["shards"][:2]
    rawstore.save(tmp_path / "part", raw)
    victim = next(p for p in (tmp_path / "part" / "shards" / "shard-000003").rglob("*") if p.is_file())
    victim.write_bytes(b"garbage")
    # a different configuration is refused, naming what differs
    with pytest.raises(data.StoreExistsError, match="top_k"):
        run(_cfg(tiny, tmp_path / "part", top_k=6), log=_quiet)
    logs: list[str] = []
    result = run(_cfg(tiny, tmp_path / "part"), log=logs.append)
    assert any("resuming" in line for line in logs)
    assert result.resumed_units == 2 and result.labelled_units == 2
    assert victim.read_bytes() != b"garbage"  # the leftover file was replaced, not trusted
    assert data.verify_store(tmp_path / "part").ok
    full, part = data.open_store(tmp_path / "full"), data.open_store(tmp_path / "part")
    assert len(full) == len(part)
    for a, b in zip(full, part, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # --overwrite starts over
    result = run(_cfg(tiny, tmp_path / "part", overwrite=True, top_k=6), log=_quiet)
    assert result.resumed_units == 0 and data.open_store(tmp_path / "part").manifest.targets.k == 6


def test_seq_cls_per_example(tiny: dict[str, Any], tmp_path: Path) -> None:
    cfg = _cfg(
        tiny,
        tmp_path / "s",
        teacher=str(tiny["root"] / "seq-cls"),
        task="seq-cls",
        label_field="label",
        top_k=3,
        temperature=1.0,
    )
    run(cfg, log=_quiet)
    store = data.open_store(tmp_path / "s")
    assert store.manifest.granularity == "example" and store.manifest.targets.num_classes == 3
    model = tiny["seq-cls"].eval()
    for i, ex in enumerate(store):
        assert ex["target_ids"].shape == (1, 3) and int(ex["label"][0]) == i % 3
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ex["input_ids"], dtype=torch.long)[None]).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        top_lp, top_id = torch.topk(lp, 3)
        np.testing.assert_array_equal(ex["target_ids"][0], top_id.numpy())
        np.testing.assert_allclose(ex["target_logprobs"][0].astype(np.float32), top_lp.numpy(), atol=2e-3)
        assert ex["tail_mass"][0] == pytest.approx(0.0, abs=1e-6)


def test_masked_lm_positions_are_fixed_and_stored(tiny: dict[str, Any], tmp_path: Path) -> None:
    cfg = _cfg(tiny, tmp_path / "s", teacher=str(tiny["root"] / "masked-lm"), task="masked-lm", mlm_probability=0.3)
    run(cfg, log=_quiet)
    run(
        _cfg(tiny, tmp_path / "t", teacher=str(tiny["root"] / "masked-lm"), task="masked-lm", mlm_probability=0.3),
        log=_quiet,
    )
    store = data.open_store(tmp_path / "s")
    tok = make_tokenizer(tmp_path / "tok")
    mask_id, special = tok.mask_token_id, set(tok.all_special_ids)
    model = tiny["masked-lm"].eval()
    for ex, again in zip(store, data.open_store(tmp_path / "t"), strict=True):
        np.testing.assert_array_equal(ex["positions"], again["positions"])  # deterministic masking
        # round(0.3 x the maskable tokens), at least 1: the unmasked ids are the input with the labels put back
        original = ex["input_ids"].copy()
        original[ex["positions"]] = ex["label"]
        maskable = sum(t not in special for t in original.tolist())
        assert len(ex["positions"]) == max(1, round(0.3 * maskable))
        assert np.all(ex["input_ids"][ex["positions"]] == mask_id)
        assert np.all(ex["label"] != mask_id)
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ex["input_ids"], dtype=torch.long)[None]).logits[0]
        lp = torch.log_softmax(logits.float() / 2.0, -1)[torch.as_tensor(ex["positions"], dtype=torch.long)]
        top_lp, top_id = torch.topk(lp, 5)
        np.testing.assert_array_equal(ex["target_ids"].astype(np.int64), top_id.numpy())
        np.testing.assert_allclose(ex["target_logprobs"].astype(np.float32), top_lp.numpy(), atol=2e-3)


def test_packing_makes_fixed_length_sequences(tiny: dict[str, Any], tmp_path: Path) -> None:
    run(_cfg(tiny, tmp_path / "s", pack=True, max_length=16), log=_quiet)
    store = data.open_store(tmp_path / "s")
    lengths = [len(ex["input_ids"]) for ex in store]
    tok = make_tokenizer(tmp_path / "tok")
    # the documents' tokens, each document followed by EOS, cut into 16s (a last piece of 1 token has no target)
    total = sum(len(tok(r["text"], add_special_tokens=False)["input_ids"]) + 1 for r in _records(tiny["data"]))
    assert lengths == [16] * (total // 16) + ([total % 16] if total % 16 >= 2 else [])
    eos = tok.eos_token_id
    assert sum(int((ex["input_ids"] == eos).sum()) for ex in store) == len(SENTENCES) * 3
    assert store.manifest.dataset["packing"] is True


def test_config_problems_are_collected() -> None:
    with pytest.raises(LabelConfigError) as info:
        LabelConfig(teacher="t", data="d", out="o", top_k=0, temperature=0.0).validate()
    assert "--top-k" in str(info.value) and "--temperature" in str(info.value)


def _invoke(args: list[str]) -> Any:
    return CliRunner().invoke(cli, ["label", *args])


def test_cli_bad_inputs_give_one_line_errors(tiny: dict[str, Any], tmp_path: Path) -> None:
    teacher = str(tiny["root"] / "causal-lm")
    good = ["--teacher", teacher, "--data", str(tiny["data"])]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    notastore = tmp_path / "notastore"
    notastore.mkdir()
    (notastore / "keep.txt").write_text("mine")
    cases = {
        "does not exist": ["--teacher", str(tmp_path / "missing"), "--data", str(tiny["data"])],
        "holds no records": ["--teacher", teacher, "--data", str(empty)],
        "no text field 'body'": [*good, "--text-field", "body"],
        "larger than the teacher": [*good, "--method", "topk", "--top-k", "1000"],
        "--top-k must be >= 1": [*good, "--top-k", "0"],
        "--temperature must be": [*good, "--temperature", "0"],
        "is not one of the teacher's classes": [
            "--teacher",
            str(tiny["root"] / "seq-cls"),
            "--data",
            str(tiny["data"]),
            "--task",
            "seq-cls",
            "--label-field",
            "text",
        ],
    }
    for i, (message, args) in enumerate(cases.items()):
        out = tmp_path / f"out{i}"
        result = _invoke([*args, "--out", str(out)])
        assert result.exit_code == 1, (message, result.output)
        assert message in result.output, (message, result.output)
        assert "Traceback" not in result.output
        assert not out.exists() or not (out / "manifest.json").exists()
    result = _invoke([*good, "--out", str(notastore)])
    assert result.exit_code == 1 and "not a store" in result.output
    assert (notastore / "keep.txt").read_text() == "mine"


def test_cli_label_with_config_file(tiny: dict[str, Any], tmp_path: Path) -> None:
    cfg = tmp_path / "label.toml"
    cfg.write_text(f'teacher = "{tiny["root"] / "causal-lm"}"\ndata = "{tiny["data"]}"\ntop_k = 3\ntemperature = 1.5\n')
    result = _invoke(["--config", str(cfg), "--out", str(tmp_path / "s"), "--top-k", "4"])
    assert result.exit_code == 0, result.output
    m = data.open_store(tmp_path / "s").manifest
    assert m.targets.k == 4 and m.targets.temperature == 1.5  # the command line wins over the file
    cfg.write_text("tpo_k = 3\n")
    result = _invoke(["--config", str(cfg)])
    assert result.exit_code == 2 and "unknown keys tpo_k" in result.output

"""`pipeline label` without --method: a hybrid store (the 4 most probable ids exactly, 12 draws from the rest), each
method's own defaults when it is given, every id exactly for a teacher with few output ids, and `pipeline train` on
a default store with its default options (tiny teachers built from configs; real label, real reader)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kd_pipeline.data import open_store
from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.label import LabelConfig
from kd_pipeline.stages.label import run as label
from tests.tiny import labelling_world, make_model


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny causal-LM teacher and corpus of the labelling tests, a 3-class seq-cls teacher and a masked-LM."""
    w = labelling_world(tmp_path_factory.mktemp("default"))
    w["seq-cls"] = make_model(w["root"] / "seq-cls", "seq-cls", vocab_size=w["vocab"], num_labels=3)
    w["masked-lm"] = make_model(w["root"] / "masked-lm", "masked-lm", vocab_size=w["vocab"])
    return w


def _label(w: dict[str, Any], out: Path, teacher: str = "teacher", **kw: Any) -> list[str]:
    """Label with only what the test names (no method, k or draws unless given); returns the log lines."""
    logs: list[str] = []
    cfg = LabelConfig(teacher=str(w["root"] / teacher), data=str(w["data"]), out=str(out), shard_size=8, **kw)
    label(cfg, log=logs.append)
    return logs


def _teacher_probs(model: Any, ids: np.ndarray) -> np.ndarray:
    """(L, V) float64 softmax of the teacher's logits at T=1, computed here, apart from the labeler."""
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].double()
    return torch.softmax(logits, dim=-1).numpy()


def _draws(ex: dict[str, Any], p: int) -> tuple[np.ndarray, np.ndarray]:
    off = ex["tail_offsets"]
    return ex["tail_ids"][off[p] : off[p + 1]].astype(np.int64), ex["tail_counts"][off[p] : off[p + 1]]


def test_default_is_a_hybrid_store_of_4_exact_ids_and_12_draws(world: dict[str, Any], tmp_path: Path) -> None:
    _label(world, tmp_path / "d")
    store = open_store(tmp_path / "d")
    t, config = store.manifest.targets, store.manifest.config
    assert (t.method, t.k, t.num_samples, t.temperature) == ("hybrid", 4, 12, 1.0)
    assert (config["method"], config["top_k"], config["samples"]) == ("hybrid", 4, 12)
    positions = 0
    for ex in store:
        probs = _teacher_probs(world["teacher"], ex["input_ids"].astype(np.int64))
        for p in range(len(ex["tail_offsets"]) - 1):
            head = ex["target_ids"][p].astype(np.int64)
            assert set(head) == set(np.argsort(-probs[p])[:4])  # the teacher's 4 most probable ids
            np.testing.assert_allclose(np.exp(ex["target_logprobs"][p].astype(np.float64)), probs[p, head], rtol=2e-3)
            assert float(ex["tail_mass"][p]) == pytest.approx(1 - probs[p, head].sum(), rel=1e-3, abs=1e-6)
            ids, counts = _draws(ex, p)
            assert int(counts.sum()) == 12 and (counts >= 1).all()  # 12 draws per position
            assert not np.isin(ids, head).any() and (probs[p, ids] > 0).all()  # from the tail only
            positions += 1
    assert positions == store.manifest.positions > 0
    again = label(LabelConfig(teacher=str(world["root"] / "teacher"), data=str(world["data"]),
                              out=str(tmp_path / "d"), shard_size=8), log=lambda m: None)  # fmt: skip
    assert again.labelled_units == 0 and again.resumed_units == len(store.manifest.shards)  # resumes as it was


def test_an_explicit_method_keeps_its_own_defaults(world: dict[str, Any], tmp_path: Path) -> None:
    _label(world, tmp_path / "t", method="topk", limit=4)
    topk = open_store(tmp_path / "t")
    assert (topk.manifest.targets.method, topk.manifest.targets.k) == ("topk", 32)
    # a top-k store's recorded configuration is what it was before hybrid became the default (old stores resume)
    assert topk.manifest.config["top_k"] == 32 and not {"method", "samples"} & set(topk.manifest.config)
    ex = next(iter(topk))
    probs = _teacher_probs(world["teacher"], ex["input_ids"].astype(np.int64))
    for p in range(len(ex["input_ids"]) - 1):
        assert set(ex["target_ids"][p].astype(np.int64)) == set(np.argsort(-probs[p])[:32])
    _label(world, tmp_path / "s", method="sample", limit=4)
    sample = open_store(tmp_path / "s")
    assert (sample.manifest.targets.method, sample.manifest.targets.num_samples) == ("sample", 50)
    ex = next(iter(sample))
    sums = np.add.reduceat(ex["target_counts"].astype(np.int64), ex["target_offsets"][:-1])
    assert (sums == 50).all() and len(sums) == len(ex["input_ids"]) - 1
    _label(world, tmp_path / "k", top_k=6, limit=4)  # --top-k alone: a hybrid store with a 6-id head
    t = open_store(tmp_path / "k").manifest.targets
    assert (t.method, t.k, t.num_samples) == ("hybrid", 6, 12)


def test_masked_lm_default_is_hybrid(world: dict[str, Any], tmp_path: Path) -> None:
    _label(world, tmp_path / "m", teacher="masked-lm", task="masked-lm", limit=8)
    store = open_store(tmp_path / "m")
    t = store.manifest.targets
    assert (t.method, t.k, t.num_samples, t.num_classes) == ("hybrid", 4, 12, world["vocab"])
    for ex in store:
        for p in range(len(ex["tail_offsets"]) - 1):
            ids, counts = _draws(ex, p)
            assert int(counts.sum()) == 12 and not np.isin(ids, ex["target_ids"][p]).any()


def test_few_classes_keep_every_class_exactly(world: dict[str, Any], tmp_path: Path) -> None:
    """A 3-class teacher has no tail to draw from after a 4-id head: the default keeps all 3 classes, exactly."""
    logs = _label(world, tmp_path / "c", teacher="seq-cls", task="seq-cls", label_field="label")
    assert sum("keeping all 3 output ids exactly" in line for line in logs) == 1
    store = open_store(tmp_path / "c")
    assert (store.manifest.targets.method, store.manifest.targets.k) == ("topk", 3)
    model = world["seq-cls"].eval()
    for ex in store:
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ex["input_ids"], dtype=torch.long)[None]).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1).numpy()
        ids = ex["target_ids"].reshape(-1).astype(np.int64)
        assert sorted(ids) == [0, 1, 2]
        np.testing.assert_allclose(ex["target_logprobs"].reshape(-1).astype(np.float64), logp[ids], atol=2e-3)
        assert float(np.asarray(ex["tail_mass"]).reshape(-1)[0]) == pytest.approx(0.0, abs=1e-6)


def test_cli_explicit_hybrid_with_few_classes_is_a_one_line_error(world: dict[str, Any], tmp_path: Path) -> None:
    args = ["label", "--teacher", str(world["root"] / "seq-cls"), "--data", str(world["data"]), "--task", "seq-cls",
            "--label-field", "label", "--method", "hybrid", "--out", str(tmp_path / "x")]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if "--method hybrid" in line]
    assert len(errors) == 1 and "keeps all of the teacher's 3 output ids" in errors[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "x" / "manifest.json").exists()


def test_train_on_a_default_store_with_default_options(world: dict[str, Any], tmp_path: Path) -> None:
    """`pipeline train` with nothing but paths: a cut student (its healing schedule), forward KL, --tail bin."""
    root = world["root"]
    _label(world, tmp_path / "store")
    runner = CliRunner()
    cut = runner.invoke(cli, ["init-student", "--teacher", str(root / "teacher"), "--layers", "1", "--out",
                              str(tmp_path / "student"), "--data", str(world["data"]), "--calibration-length", "16",
                              "--calibration-tokens", "64"], catch_exceptions=False)  # fmt: skip
    assert cut.exit_code == 0, cut.output
    result = runner.invoke(cli, ["train", "--store", str(tmp_path / "store"), "--student", str(tmp_path / "student"),
                                 "--out", str(tmp_path / "run"), "--steps", "3", "--batch-size", "4", "--eval-every",
                                 "3", "--log-every", "1"], catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output and "top-4 + 12 tail samples" in result.output
    used = json.loads((tmp_path / "run" / "config.json").read_text())
    healing = json.loads((tmp_path / "student" / "init_student.json").read_text())["healing"]
    assert {k: used[k] for k in healing} == healing
    assert (used["loss"], used["tail"]) == ("forward-kl", "bin")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if r["split"] == "train"]
    assert len(kd) == 3 and all(np.isfinite(kd)) and all(x >= -1e-4 for x in kd)
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_store_trainer_loss_on_a_default_store_equals_a_float64_reference(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """transformers' Trainer route (StoreTrainer, default options) on a default store: its loss on one batch of the
    whole store is alpha * KL(p̂ ‖ q) + (1 - alpha) * CE, p̂ the stored head plus tail_mass * count / 12 per draw,
    written out here in float64 per example from the store's reader."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from kd_pipeline.data.dataset import StoreDataset
    from kd_pipeline.stages.hf_trainer import StoreTrainer

    _label(world, tmp_path / "store", limit=6)
    make_model(tmp_path / "student", "causal-lm", vocab_size=world["vocab"], pad_rows=3, seed=1)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    args = TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=8, report_to=[], use_cpu=True)
    trainer = StoreTrainer(model=student, args=args, store=str(tmp_path / "store"))
    (batch,) = list(StoreDataset(tmp_path / "store", batch_size=8))
    got = float(trainer.compute_loss(trainer.model, batch).detach())

    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "student").double().eval()
    kl, ce = [], []
    for ex in open_store(tmp_path / "store"):
        ids = ex["input_ids"].astype(np.int64)
        with torch.no_grad():
            log_q = torch.log_softmax(reference(input_ids=torch.as_tensor(ids)[None]).logits[0], -1).numpy()
        for p in range(len(ids) - 1):
            p_hat = np.zeros(log_q.shape[1])
            p_hat[ex["target_ids"][p].astype(np.int64)] = np.exp(ex["target_logprobs"][p].astype(np.float64))
            draws, counts = _draws(ex, p)
            p_hat[draws] += float(ex["tail_mass"][p]) * counts / 12
            p_hat /= p_hat.sum()
            on = p_hat > 0
            kl.append(float((p_hat[on] * (np.log(p_hat[on]) - log_q[p, on])).sum()))
            ce.append(-float(log_q[p, ids[p + 1]]))
    assert got == pytest.approx(0.5 * np.mean(kl) + 0.5 * np.mean(ce), rel=1e-4)

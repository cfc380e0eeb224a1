"""Stage two end to end with tiny real models: files written, loss falls, exact resume, no teacher, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kd_pipeline import data
from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.label import LabelConfig
from kd_pipeline.stages.label import run as label
from kd_pipeline.stages.train import TrainConfig, TrainConfigError
from kd_pipeline.stages.train import run as train
from tests.tiny import SENTENCES, make_model, make_tokenizer, write_jsonl


def _quiet(msg: str) -> None:
    pass


def _student_config(folder: Path, vocab: int, task: str = "causal-lm", layers: int = 1) -> Path:
    """A fresh student: a folder with only a config.json (and the teacher's tokenizer)."""
    from transformers import LlamaConfig

    make_tokenizer(folder)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
    )
    cfg.architectures = ["LlamaForSequenceClassification" if task == "seq-cls" else "LlamaForCausalLM"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(cfg.to_json_string())
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A teacher, its stores (causal-lm and seq-cls) and a student config, shared by the tests here."""
    root = tmp_path_factory.mktemp("train")
    vocab = len(make_tokenizer(root / "tok"))
    docs = [{"text": s, "label": i % 3} for i, s in enumerate(SENTENCES * 4)]
    write_jsonl(root / "docs.jsonl", docs)
    out: dict[str, Any] = {"root": root, "vocab": vocab}
    for task in ("causal-lm", "seq-cls", "masked-lm"):
        make_model(root / f"teacher-{task}", task, vocab_size=vocab)
        label(
            LabelConfig(
                teacher=str(root / f"teacher-{task}"),
                data=str(root / "docs.jsonl"),
                out=str(root / task),
                task=task,
                method="topk",  # the tests here check top-k losses and the top-k kept-mass warning
                top_k=8,
                temperature=2.0,
                shard_size=8,
                label_field="label",
                mlm_probability=0.3,
            ),
            log=_quiet,
        )
    out["student"] = _student_config(root / "student", vocab)
    return out


def _held_out_metrics(model_dir: Path, store: Path, task: str, weights: Path | None = None) -> dict[str, float]:
    """The evaluation metrics recomputed here, independently of stages/train.py: every example of ``store`` run
    alone (no padding) through the saved model loaded with ``transformers`` (with a checkpoint's ``weights`` if
    given), in float64 from the logits on."""
    import transformers
    from safetensors.torch import load_model

    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq-cls": transformers.AutoModelForSequenceClassification,
        "masked-lm": transformers.AutoModelForMaskedLM,
    }[task]
    model = auto.from_pretrained(model_dir).eval()
    if weights is not None:
        load_model(model, str(weights))
    nll, correct, count = 0.0, 0, 0
    for ex in data.open_store(store):
        ids = torch.as_tensor(ex["input_ids"].astype("int64"))[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        if task == "causal-lm":
            logits = logits[:-1]  # position i predicts token i + 1
        elif task == "masked-lm":
            logits = logits[torch.as_tensor(ex["positions"].astype("int64"))]
        labels = torch.as_tensor(ex["label"].astype("int64")).reshape(-1)
        logp = torch.log_softmax(logits.reshape(len(labels), -1), dim=-1)
        nll -= float(logp[torch.arange(len(labels)), labels].sum())
        correct += int((logp.argmax(-1) == labels).sum())
        count += len(labels)
    return {"ce": nll / count, "perplexity": math.exp(nll / count), "accuracy": correct / count, "positions": count}


def _cfg(world: dict[str, Any], out: Path, task: str = "causal-lm", **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "store": str(world["root"] / task),
        "student": str(world["student"]),
        "out": str(out),
        "steps": 12,
        "batch_size": 4,
        "lr": 3e-3,
        "warmup": 2,
        "eval_every": 6,
        "save_every": 6,
        "log_every": 1,
        "alpha": 0.9,
    }
    base.update(kw)
    return TrainConfig(**base)


def test_causal_lm_end_to_end(world: dict[str, Any], tmp_path: Path) -> None:
    store = world["root"] / "causal-lm"
    cfg = _cfg(world, tmp_path / "run", steps=30, save_every=10, eval_every=10, lr=1e-2, eval_store=str(store))
    result = train(cfg, log=_quiet)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.jsonl", "loss_curve.png", "checkpoints", "final"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000010", "step-000020", "step-000030"]
    assert {p.name for p in (run / "checkpoints" / "step-000010").iterdir()} == {
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    }
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if r["split"] == "train"]
    assert len(kd) == 30
    assert sum(kd[-5:]) / 5 < 0.8 * sum(kd[:5]) / 5  # the distillation loss falls
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["kd"] < evals[0]["kd"]
    # each evaluation equals the one recomputed from that step's saved weights
    for row in evals:
        weights = run / "checkpoints" / f"step-{row['step']:06d}" / "model.safetensors"
        want = _held_out_metrics(run / "final", store, "causal-lm", weights)
        assert row["positions"] == want["positions"]
        assert row["ce"] == pytest.approx(want["ce"], rel=1e-5)
        assert row["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert result.steps == 30
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(run / "final")
    assert student.config.num_hidden_layers == 1
    assert len(AutoTokenizer.from_pretrained(run / "final")) == world["vocab"]
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_low_kept_mass_warns_with_what_to_do(world: dict[str, Any], tmp_path: Path) -> None:
    m = data.open_store(world["root"] / "causal-lm").manifest
    kept = sum(s.stats["kept_mass_sum"] for s in m.shards) / sum(s.stats["count"] for s in m.shards)
    assert kept < 0.5  # a random tiny teacher at T=2: top-8 of its vocabulary holds little
    logs: list[str] = []
    train(_cfg(world, tmp_path / "run", steps=1), log=logs.append)
    warned = [line for line in logs if "of the teacher's probability mass" in line]
    assert len(warned) == 1 and f"{kept:.2f}" in warned[0] and "--method sample" in warned[0]
    # a store that keeps most of the mass (every id of the 3 classes) says nothing
    logs.clear()
    student = _student_config(tmp_path / "cls-student", world["vocab"], task="seq-cls")
    train(_cfg(world, tmp_path / "run-cls", task="seq-cls", student=str(student), steps=1), log=logs.append)
    assert not [line for line in logs if "probability mass" in line]


def test_resume_reaches_the_same_weights(world: dict[str, Any], tmp_path: Path) -> None:
    """Stopping after a checkpoint and resuming gives bitwise the same weights as not stopping (CPU)."""
    train(_cfg(world, tmp_path / "a"), log=_quiet)
    # the state an interrupted run leaves after its step-6 checkpoint
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000012")
    shutil.rmtree(tmp_path / "b" / "final")
    logs: list[str] = []
    train(_cfg(world, tmp_path / "b", resume=True), log=logs.append)
    assert any("resumed from" in line and "step-000006" in line for line in logs)
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-000012" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-000012" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_trains_with_the_teacher_deleted(world: dict[str, Any], tmp_path: Path) -> None:
    teacher = world["root"] / "teacher-causal-lm"
    moved = tmp_path / "elsewhere"
    shutil.move(teacher, moved)
    try:
        train(_cfg(world, tmp_path / "run", steps=2, eval_every=100), log=_quiet)
    finally:
        shutil.move(moved, teacher)
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_seq_cls_and_masked_lm(world: dict[str, Any], tmp_path: Path) -> None:
    student = _student_config(tmp_path / "cls-student", world["vocab"], task="seq-cls")
    cls_store = world["root"] / "seq-cls"
    train(_cfg(world, tmp_path / "cls", task="seq-cls", student=str(student), eval_store=str(cls_store)), log=_quiet)
    rows = [json.loads(line) for line in (tmp_path / "cls" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["split"] == "eval" and rows[-1]["step"] == 12 and "perplexity" not in rows[-1]
    want = _held_out_metrics(tmp_path / "cls" / "final", cls_store, "seq-cls")
    assert rows[-1]["positions"] == want["positions"] == len(SENTENCES) * 4  # one per example
    assert rows[-1]["accuracy"] == want["accuracy"]  # a ratio of two counts: exact
    assert rows[-1]["ce"] == pytest.approx(want["ce"], rel=1e-5)
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls" / "final").config.num_labels == 3
    bert = tmp_path / "bert-student"
    make_model(bert, "masked-lm", vocab_size=world["vocab"], layers=1, hidden=16)
    mlm_store = world["root"] / "masked-lm"
    train(_cfg(world, tmp_path / "mlm", task="masked-lm", student=str(bert), eval_store=str(mlm_store)), log=_quiet)
    rows = [json.loads(line) for line in (tmp_path / "mlm" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["split"] == "eval" and rows[-1]["step"] == 12 and "accuracy" not in rows[-1]
    want = _held_out_metrics(tmp_path / "mlm" / "final", mlm_store, "masked-lm")
    assert rows[-1]["positions"] == want["positions"]
    assert rows[-1]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)


def test_iterative_distillation(world: dict[str, Any], tmp_path: Path) -> None:
    """The saved student teaches the next round."""
    train(_cfg(world, tmp_path / "run", steps=3, eval_every=100), log=_quiet)
    label(
        LabelConfig(
            teacher=str(tmp_path / "run" / "final"),
            data=str(world["root"] / "docs.jsonl"),
            out=str(tmp_path / "round2"),
            top_k=4,
            temperature=2.0,
            shard_size=8,
        ),
        log=_quiet,
    )
    store = data.open_store(tmp_path / "round2")
    assert store.manifest.teacher["name_or_path"] == str(tmp_path / "run" / "final")
    assert data.verify_store(tmp_path / "round2").ok
    train(_cfg(world, tmp_path / "run2", steps=3, eval_fraction=0.3, store=str(tmp_path / "round2")), log=_quiet)
    assert (tmp_path / "run2" / "final").is_dir()


def _invoke(args: list[str]) -> Any:
    return CliRunner().invoke(cli, ["train", *args])


def test_bad_inputs_give_one_line_errors(world: dict[str, Any], tmp_path: Path) -> None:
    store = str(world["root"] / "causal-lm")
    small = tmp_path / "small"
    _student_config(small, world["vocab"] - 5)
    shutil.copytree(world["root"] / "causal-lm", tmp_path / "corrupt")
    victim = max(
        (p for p in (tmp_path / "corrupt" / "shards").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    victim.write_bytes(b"\x00" + victim.read_bytes()[1:])
    cases = {
        "labeling temperature 2.0": ["--store", store, "--temperature", "1.0"],
        "vocabulary rows": ["--store", store, "--student", str(small)],
        "does not match its SHA-256": ["--store", str(tmp_path / "corrupt")],  # first read, by default
        "fails verification": ["--store", str(tmp_path / "corrupt"), "--verify", "full"],
        "no such store": ["--store", str(tmp_path / "missing")],
        "the student is causal-lm": ["--store", str(world["root"] / "seq-cls")],
        "--alpha must be in [0, 1]": ["--store", store, "--alpha", "2"],
    }
    for i, (message, args) in enumerate(cases.items()):
        if "--student" not in args:
            args = [*args, "--student", str(world["student"])]
        result = _invoke([*args, "--out", str(tmp_path / f"out{i}"), "--steps", "1"])
        assert result.exit_code == 1, (message, result.output)
        assert message in result.output, (message, result.output)
        lines = result.output.strip().splitlines()
        assert "Traceback" not in result.output and lines[-1].startswith("Error:") and message in lines[-1]
        # a shard checked on first read fails once training has started (after its log lines); the rest at once
        assert len(lines) == 1 or message == "does not match its SHA-256", (message, lines)
        assert not (tmp_path / f"out{i}" / "final").exists()


def test_empty_store_and_existing_run_dir(world: dict[str, Any], tmp_path: Path) -> None:
    m = data.open_store(world["root"] / "causal-lm").manifest
    with data.StoreWriter(tmp_path / "empty", m) as w:
        w.finish()
    with pytest.raises(TrainConfigError, match="holds no labelled positions"):
        train(_cfg(world, tmp_path / "run", store=str(tmp_path / "empty")), log=_quiet)
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "config.json").write_text("{}")
    with pytest.raises(TrainConfigError, match="pass --resume"):
        train(_cfg(world, tmp_path / "run2"), log=_quiet)


class _Bigram(torch.nn.Module):
    """A causal-LM student that evaluate() can call like train's wrapper: logits of token i+1 from token i only,
    at the selected positions, (N, V) float32; ``logits`` is the identity, and evaluate() applies it to 3 rows at
    a time (``loss_chunk``), as it does a chunked student's head."""

    loss_chunk = 3

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 2)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        select: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.table[input_ids[:, :-1][select]]


@pytest.mark.parametrize("tail", ["bin", "renormalise"])
def test_evaluate_uses_the_configured_tail(tmp_path: Path, tail: str) -> None:
    """evaluate's KD figure is the loss trained with --tail: the k+1 bins, or the renormalised top-k baseline,
    each equal to its float64 formula over the store's positions (it used to ignore --tail: always bins)."""
    from kd_pipeline.data.dataset import StoreDataset
    from kd_pipeline.stages.train import evaluate
    from tests.conftest import write_store

    write_store(tmp_path / "store", k=4)  # causal-lm, 50 ids, top-4 at T=2: tails ~0.1-0.6
    store = data.open_store(tmp_path / "store")
    student, t = _Bigram(50), 2.0
    cfg = TrainConfig(tail=tail, batch_size=4, eval_batches=1000)
    got = evaluate(student, (store, {}), cfg, "causal-lm", t, torch.device("cpu"), 0, 1)

    per_position = []
    for batch in StoreDataset(store, batch_size=4, shuffle=False):
        select = batch["position_mask"] & (batch["labels"] >= 0)
        z = student.table.detach().double()[batch["input_ids"][:, :-1][select]]  # (N, V)
        s = torch.softmax(z / t, -1)
        ids = batch["target_ids"][select]  # (N, K)
        p_kept, q_kept = batch["target_logprobs"][select].double().exp(), s.gather(1, ids)
        if tail == "bin":  # k+1 bins: kept ids, then everything else
            p = torch.cat([p_kept, batch["tail_mass"][select].double()[:, None]], 1)
            q = torch.cat([q_kept, 1 - q_kept.sum(-1, keepdim=True)], 1)  # tails ~0.1 here: no cancellation
        else:  # both renormalised over the kept ids, tail dropped
            p, q = p_kept, q_kept
        p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
        per_position.append((p * (p.log() - q.log())).sum(-1) * t**2)
    expected = torch.cat(per_position)
    assert got["positions"] == len(expected)
    assert got["kd"] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_chunked_head_and_loss_follow_the_dense_path(world: dict[str, Any], tmp_path: Path) -> None:
    """``pipeline train`` runs a causal-LM student's head and loss in chunks by default (here one chunk: a tiny
    vocabulary), and in chunks of 7 positions (several per batch, the last one ragged): both reach the same loss
    curve, gradient norms and evaluations as the dense head and loss (``--loss-chunk 0``)."""
    from kd_pipeline.stages.losses import rows_per_chunk

    runs = {}
    for name, chunk in (("default", None), ("chunk7", 7), ("dense", 0)):
        logs: list[str] = []
        cfg = _cfg(world, tmp_path / name, steps=5, eval_every=5, save_every=5, alpha=0.5, loss_chunk=chunk)
        train(cfg, log=logs.append)
        rows = chunk if chunk is not None else rows_per_chunk(world["vocab"])  # > any batch's positions here
        expected = "dense head and loss" if chunk == 0 else f"head and loss in chunks of {rows} positions"
        assert any(expected in line for line in logs), logs
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    dense = runs.pop("dense")
    for name, rows in runs.items():
        assert [(r["step"], r["split"]) for r in rows] == [(r["step"], r["split"]) for r in dense]
        for got, want in zip(rows, dense, strict=True):
            # float32 both ways, summed in another order (per chunk): measured <= 2e-7 relative over the 5 steps
            for key in ("loss", "kd", "ce", "grad_norm", "perplexity"):
                if key in want:
                    assert got[key] == pytest.approx(want[key], rel=2e-6), (name, got["step"], key)

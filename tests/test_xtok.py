"""Cross-tokenizer training: the loss against a dense float64 reference written out here, the collated batch of
top-k, sampled and hybrid stores against the same reference computed from the raw stored columns (dense and
chunked head), a training step's gradient against the reference's (accumulation, 2 torchrun ranks), exact resume,
the refusal of a student with another tokenizer without --cross-tokenizer, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kd_pipeline import data
from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.batch_loss import at_positions
from kd_pipeline.stages.label import LabelConfig
from kd_pipeline.stages.label import run as label
from kd_pipeline.stages.train import TrainConfig
from kd_pipeline.stages.train import run as train
from kd_pipeline.stages.xtok import CrossCollator, xtok_soft_loss
from kd_pipeline.stages.xtok_align import aligned_positions
from kd_pipeline.stages.xtok_train import cross_evaluate, cross_loss

from .test_weighting import _trained, assert_same_gradients
from .tiny import SENTENCES, labelling_world, make_model


def _quiet(msg: str) -> None:
    pass


# ------------------------------------------------------------------ the dense float64 reference


def _log_softmax(z: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    z = z.astype(np.float64)
    return z - (z.max() + np.log(np.exp(z - z.max()).sum()))


def reference_soft(z: np.ndarray[Any, Any], entries: list[tuple[int | None, float]], temperature: float) -> float:
    """One aligned pair: sum over shared ids q log(q / p) + q_rest log(q_rest / p_rest), plus the sorted L1 between
    the teacher's unshared probabilities and the student's largest probabilities off the matched ids."""
    s = _log_softmax(z / temperature)
    shared = [(sid, q) for sid, q in entries if sid is not None]
    matched = {sid for sid, _ in shared}
    total = sum(q * (math.log(q) - s[sid]) for sid, q in shared if q > 0)
    q_rest = max(0.0, 1.0 - sum(q for _, q in shared))
    others = [math.exp(s[j]) for j in range(len(s)) if j not in matched]
    if q_rest > 0:
        total += q_rest * (math.log(q_rest) - math.log(sum(others)))
    u = sorted((q for sid, q in entries if sid is None), reverse=True)
    p = sorted(others, reverse=True)[: len(u)]
    return total + sum(abs(a - b) for a, b in zip(u, p, strict=True))


def reference_soft_torch(z: torch.Tensor, entries: list[tuple[int | None, float]], temperature: float) -> torch.Tensor:
    """``reference_soft`` in torch float64 (differentiable in ``z``): the same terms, written out the same way."""
    s = torch.log_softmax(z.double() / temperature, -1)
    shared = [(sid, q) for sid, q in entries if sid is not None]
    matched = {sid for sid, _ in shared}
    total = sum((q * (math.log(q) - s[sid]) for sid, q in shared if q > 0), torch.zeros((), dtype=torch.float64))
    q_rest = max(0.0, 1.0 - sum(q for _, q in shared))
    others = s[[j for j in range(len(s)) if j not in matched]].exp()
    if q_rest > 0:
        total = total + q_rest * (math.log(q_rest) - others.sum().log())
    u = sorted((q for sid, q in entries if sid is None), reverse=True)
    p = others.sort(descending=True).values[: len(u)]
    return total + sum(((a - b).abs() for a, b in zip(u, p, strict=True)), torch.zeros((), dtype=torch.float64))


def test_soft_loss_matches_the_dense_reference() -> None:
    rng = np.random.default_rng(0)
    V, N, W, T = 13, 6, 5, 2.0
    z = rng.normal(size=(N, V)) * 2
    rows: list[list[tuple[int | None, float]]] = []
    for _ in range(N):
        width = int(rng.integers(0, W + 1))  # rows of every width, padding included
        probs = rng.dirichlet(np.ones(width + 1))[:width] if width else np.zeros(0)  # leaves a tail
        sids = rng.choice(V, size=width, replace=False)
        keep = rng.random(width) < 0.5
        rows.append([(int(sid) if k else None, float(p)) for sid, p, k in zip(sids, probs, keep, strict=True)])
    rows[0] = [(3, 0.7), (5, 0.3)]  # every id shared, no rest mass
    rows[1] = [(None, 0.6), (None, 0.4)]  # nothing shared
    rows[2] = [(0, 0.5), (None, 0.2)]  # student id 0 shared, then an unshared entry and padding
    rows[3] = [(0, 0.5)]  # student id 0 shared, then padding only
    sid = torch.full((N, W), -1, dtype=torch.long)
    prob = torch.zeros((N, W))
    known = torch.zeros((N, W), dtype=torch.bool)
    for n, row in enumerate(rows):
        for j, (s, q) in enumerate(row):
            sid[n, j] = -1 if s is None else s
            prob[n, j] = q
            known[n, j] = True
    kl, uld = xtok_soft_loss(torch.tensor(z, dtype=torch.float32), sid, prob, known, T)
    want = [reference_soft(z[n], rows[n], T) for n in range(N)]
    assert np.allclose((kl + uld).double().numpy(), want, rtol=1e-5, atol=1e-6)
    want_t = [float(reference_soft_torch(torch.tensor(z[n]), rows[n], T)) for n in range(N)]
    assert np.allclose(want_t, want, rtol=1e-12)  # the two references agree


# ------------------------------------------------------------------ a store, a student with its own tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    w = labelling_world(tmp_path_factory.mktemp("xtok"))
    root = w["root"]
    for method in ("topk", "sample", "hybrid"):
        cfg = LabelConfig(teacher=str(root / "teacher"), data=str(w["data"]), out=str(root / method), top_k=4)
        cfg.method, cfg.samples, cfg.spans, cfg.shard_size = method, 8, True, 10
        label(cfg, log=_quiet)
    plain = LabelConfig(teacher=str(root / "teacher"), data=str(w["data"]), out=str(root / "plain"), top_k=4)
    label(plain, log=_quiet)
    # the student's own tokenizer: a BPE (words split into pieces) with a BOS token it adds to every text
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[BOS]"]))
    from tokenizers.processors import TemplateProcessing

    bpe.post_processor = TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]")
    student = root / "student"
    make_model(student, "causal-lm", vocab_size=len(fast))  # a 2-layer Llama; [PAD] is id 0 in both tokenizers
    fast.save_pretrained(student)  # the student's own tokenizer replaces the teacher's that make_model saved
    w["student"], w["tokenizer"] = student, fast
    return w


def _byte_spans(text: str, offsets: list[tuple[int, int]]) -> np.ndarray[Any, Any]:
    """Character offsets -> UTF-8 byte offsets, the slow way; an empty (special) token sits at the last end."""
    out, end = [], 0
    for s, e in offsets:
        if s == e:
            out.append([end, end])
        else:
            out.append([len(text[:s].encode()), len(text[:e].encode())])
        end = max(end, out[-1][1])
    return np.array(out)


def _teacher_entries(ex: dict[str, Any], p: int, targets: data.TargetSpec) -> list[tuple[int, float]]:
    """(teacher id, probability) at position p, read from the raw stored columns."""
    if targets.sampled:
        a, b = int(ex["target_offsets"][p]), int(ex["target_offsets"][p + 1])
        n = targets.num_samples or 1
        return [(int(i), int(c) / n) for i, c in zip(ex["target_ids"][a:b], ex["target_counts"][a:b], strict=True)]
    out = [(int(i), math.exp(float(lp))) for i, lp in zip(ex["target_ids"][p], ex["target_logprobs"][p], strict=True)]
    if targets.hybrid:
        a, b = int(ex["tail_offsets"][p]), int(ex["tail_offsets"][p + 1])
        n, tail = targets.num_samples or 1, float(ex["tail_mass"][p])
        out += [(int(i), tail * int(c) / n) for i, c in zip(ex["tail_ids"][a:b], ex["tail_counts"][a:b], strict=True)]
    return out


def _vocab(world: dict[str, Any], method: str) -> np.ndarray[Any, Any]:
    """teacher id -> student id of the same string or -1, from the two string lists (not ``vocab_map``)."""
    tok = world["tokenizer"]
    teacher_strings = json.loads((world["root"] / method / "tokens.json").read_text())
    student_strings = {tok.decode([i]): i for i in range(len(tok)) if i not in tok.all_special_ids}
    return np.array([student_strings.get(t, -1) if t is not None else -1 for t in teacher_strings])


def _reference(
    world: dict[str, Any], method: str, examples: list[dict[str, Any]], alpha: float, temperature: float
) -> tuple[float, float, float, dict[str, torch.Tensor]]:
    """The loss over ``examples`` (its kd and ce parts) and its gradient, in float64, from the raw stored columns:
    each text encoded alone by the student's tokenizer and run alone through the float64 student, every aligned
    pair's soft term (``reference_soft_torch``) and every student position's next-token NLL, summed over all the
    examples and divided by the number of pairs / positions."""
    from transformers import AutoModelForCausalLM

    store = data.open_store(str(world["root"] / method))
    tok, vocab = world["tokenizer"], _vocab(world, method)
    model = AutoModelForCausalLM.from_pretrained(world["student"], dtype=torch.float64)
    soft = ce = torch.zeros((), dtype=torch.float64)
    n_pairs = n_tokens = 0
    for ex in examples:
        text = bytes(ex["text"]).decode()
        enc = tok(text, return_offsets_mapping=True)
        ids = enc["input_ids"]
        z = model(torch.tensor([ids])).logits[0]  # (M, V), unpadded
        ce = ce - torch.log_softmax(z[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).sum()
        n_tokens += len(ids) - 1
        pairs = aligned_positions(ex["token_spans"], _byte_spans(text, enc["offset_mapping"]))
        assert len(pairs) > 0
        for tp, sp in pairs.tolist():
            entries = [
                (int(vocab[t]) if vocab[t] >= 0 else None, q)
                for t, q in _teacher_entries(ex, tp, store.manifest.targets)
            ]
            soft = soft + reference_soft_torch(z[sp], entries, temperature)
            n_pairs += 1
    kd, ce = soft / n_pairs * temperature**2, ce / n_tokens
    loss = alpha * kd + (1 - alpha) * ce
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), float(kd.detach()), float(ce.detach()), grads


@pytest.mark.parametrize(("method", "chunk"), [("topk", 0), ("topk", 3), ("sample", 0), ("hybrid", 3)])
def test_batch_loss_matches_a_reference_from_the_stored_columns(world: dict[str, Any], method: str, chunk: int) -> None:
    """One batch's loss, with the dense head (chunk 0) and with the head + loss in chunks of 3 positions under
    activation checkpointing, and its gradient in the chunked case, against the float64 reference."""
    from transformers import AutoModelForCausalLM

    store = data.open_store(str(world["root"] / method))
    collate = CrossCollator(world["tokenizer"], store.manifest.targets, _vocab(world, method), 128)
    examples = [store[i] for i in (0, 5, 9)]
    model = AutoModelForCausalLM.from_pretrained(world["student"])
    net = at_positions(model, "causal-lm", chunk)
    assert net.loss_chunk == chunk
    batch = {**collate(examples), "example_weight": torch.ones(3)}
    alpha, T = 0.3, 2.0  # any T: the parity is arithmetic (the store was labelled at 1)
    cfg = TrainConfig(alpha=alpha)
    loss, parts = cross_loss(net, batch, "causal-lm", cfg, T)
    want_loss, want_kd, want_ce, want_grads = _reference(world, method, examples, alpha, T)
    assert parts["kd"] == pytest.approx(want_kd, rel=1e-5)
    assert parts["ce"] == pytest.approx(want_ce, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-5)
    if chunk:
        loss.backward()
        grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
        assert_same_gradients(grads, want_grads)


@pytest.mark.parametrize("bos", [True, False])
def test_bits_per_char_matches_a_reference(world: dict[str, Any], bos: bool) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    store = data.open_store(str(world["root"] / "topk"))
    tok = world["tokenizer"]
    if not bos:  # the same tokenizer without its BOS: the first word is not predicted, its characters not counted
        raw = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        raw.post_processor = None
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    collate = CrossCollator(tok, store.manifest.targets, np.full(store.manifest.targets.num_classes, -1), 128)
    model = AutoModelForCausalLM.from_pretrained(world["student"])
    cfg = TrainConfig(batch_size=3, eval_batches=100)  # every example, in batches of 3 (the last one short)
    net = at_positions(model, "causal-lm", 5)
    got = cross_evaluate(net, (store, {}), cfg, "causal-lm", 1.0, torch.device("cpu"), 0, 1, collate=collate)
    nll = chars = 0.0
    for ex in store:
        text = bytes(ex["text"]).decode()
        enc = tok(text, return_offsets_mapping=True)
        with torch.no_grad():
            z = model(torch.tensor([enc["input_ids"]])).logits[0].double().numpy()
        nll -= sum(_log_softmax(z[j])[enc["input_ids"][j + 1]] for j in range(len(enc["input_ids"]) - 1))
        # the predicted tokens (all but the first) cover the text from the second token's start to its end
        chars += len(text[enc["offset_mapping"][1][0] :])
    assert got["bits_per_char"] == pytest.approx(nll / math.log(2) / chars, rel=1e-6)


# ------------------------------------------------------------------ training, refusals, one-line errors


def test_cross_tokenizer_training_lowers_the_soft_loss(world: dict[str, Any], tmp_path: Path) -> None:
    cfg = TrainConfig(store=str(world["root"] / "hybrid"), student=str(world["student"]), out=str(tmp_path / "run"))
    cfg.cross_tokenizer, cfg.steps, cfg.alpha, cfg.lr, cfg.log_every, cfg.eval_every = True, 30, 1.0, 1e-2, 1, 30
    result = train(cfg, log=_quiet)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if r["split"] == "train"]
    assert np.mean(kd[-5:]) < 0.8 * np.mean(kd[:5])
    assert result.eval["bits_per_char"] > 0
    assert (tmp_path / "run" / "final" / "tokenizer.json").is_file()


def _step_cfg(world: dict[str, Any], out: Path, **kw: Any) -> TrainConfig:
    """One step over all 32 examples of the hybrid store (no held-out split, no clipping, no warm-up)."""
    cfg = TrainConfig(
        store=str(world["root"] / "hybrid"), student=str(world["student"]), out=str(out), steps=1, alpha=0.5,
        max_grad_norm=0.0, eval_fraction=0.0, save_every=1, log_every=1, warmup=0, cross_tokenizer=True,
    )  # fmt: skip
    return dataclasses.replace(cfg, **kw)


@pytest.fixture(scope="module")
def step_reference(world: dict[str, Any]) -> tuple[float, float, float, dict[str, torch.Tensor]]:
    store = data.open_store(str(world["root"] / "hybrid"))
    return _reference(world, "hybrid", list(store), 0.5, 1.0)


def test_accumulated_step_takes_the_reference_step(world: dict[str, Any], step_reference: Any, tmp_path: Path) -> None:
    """4 micro-batches of 8 (chunked head and loss, 5 positions a chunk) take the float64 reference's step over the
    32 examples: the logged loss, and the gradient (from AdamW's first moment, see test_weighting._trained)."""
    train(_step_cfg(world, tmp_path / "run", batch_size=8, grad_accum=4, loss_chunk=5), log=_quiet)
    row, grads, _ = _trained(tmp_path / "run")
    assert row["loss"] == pytest.approx(step_reference[0], rel=1e-5)
    assert_same_gradients(grads, step_reference[3])


def test_two_ranks_take_the_reference_step(world: dict[str, Any], tmp_path: Path) -> None:
    """2 torchrun ranks (gloo) of 2 micro-batches of 8 take the float64 reference's step over the examples their
    traces list (the loader may give a rank lockstep stand-ins, so not necessarily all 32)."""
    from tests.test_scale_out import torchrun

    out = tmp_path / "ranked"
    proc = torchrun(
        "train", "--cross-tokenizer", "--store", str(world["root"] / "hybrid"), "--student", str(world["student"]),
        "--out", str(out), "--steps", "1", "--batch-size", "8", "--grad-accum", "2", "--max-grad-norm", "0",
        "--eval-fraction", "0", "--save-every", "1", "--log-every", "1", "--warmup", "0", "--alpha", "0.5",
        "--trace",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    traces = [json.loads((out / "trace" / f"rank-{r:05d}.jsonl").read_text()) for r in (0, 1)]
    seen = sorted(i for t in traces for _, i in t["examples"])
    assert len(seen) == len(set(seen)) > 0  # the ranks' shares are disjoint (stand-ins, weight 0, are not listed)
    store = data.open_store(str(world["root"] / "hybrid"))
    want = _reference(world, "hybrid", [store[i] for i in seen], 0.5, 1.0)  # the step over what the ranks took
    row, grads, _ = _trained(out)
    assert row["loss"] == pytest.approx(want[0], rel=1e-5)
    assert_same_gradients(grads, want[3])


def test_resume_reaches_the_same_weights(world: dict[str, Any], tmp_path: Path) -> None:
    """Stopping after the step-3 checkpoint (mid-epoch: 3 steps of 6 examples) and resuming gives bitwise the same
    weights at step 6 as not stopping (CPU), with evaluation and accumulation."""
    from kd_pipeline.data.dataset import held_out

    store = data.open_store(str(world["root"] / "hybrid"))
    keys = np.concatenate([store.shard_keys(s) for s in range(store.num_shards)])
    # the 32 examples are 8 texts 4 times: hold out a fraction that leaves some of them on each side
    fraction = next(f for f in (0.1, 0.2, 0.3, 0.4, 0.5) if 0 < held_out(keys, f).sum() < len(keys) - 18)
    kw = {"steps": 6, "batch_size": 3, "grad_accum": 2, "save_every": 3, "eval_every": 2, "eval_fraction": fraction}
    train(_step_cfg(world, tmp_path / "a", **kw), log=_quiet)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the state an interrupted run leaves after step 3
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000006")
    shutil.rmtree(tmp_path / "b" / "final")
    logs: list[str] = []
    train(_step_cfg(world, tmp_path / "b", resume=True, **kw), log=logs.append)
    assert any("resumed from" in line and "step-000003" in line for line in logs)
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-000006" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _invoke(args: list[str]) -> Any:
    return CliRunner().invoke(cli, ["train", *args, "--steps", "1"])


def test_refusals_are_one_line(world: dict[str, Any], tmp_path: Path) -> None:
    spans, plain, student = str(world["root"] / "topk"), str(world["root"] / "plain"), str(world["student"])
    cases = {
        # without the flag, a student with another tokenizer is refused as before, and told about the flag
        "tokenizer differs from the teacher's": ["--store", spans],
        "train it on purpose with --cross-tokenizer": ["--store", spans],
        "label the data again with `pipeline label --spans`": ["--store", plain, "--cross-tokenizer"],
        "has its own soft loss": ["--store", spans, "--cross-tokenizer", "--loss", "reverse-kl"],
        "runs under DDP; drop --fsdp": ["--store", spans, "--cross-tokenizer", "--fsdp"],
    }
    for i, (message, args) in enumerate(cases.items()):
        result = _invoke([*args, "--student", student, "--out", str(tmp_path / f"out{i}")])
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]  # beside load bars
        assert len(errors) == 1 and message in errors[0], result.output

"""`pipeline label` without --method: a sampled store (50 draws per position from the teacher), the method that
--top-k / --samples imply when they are given alone, each method's own defaults when it is given, every id exactly
for a teacher with few output ids, and `pipeline train` on a default store with its default options (tiny teachers
built from configs; real label, real reader)."""

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
from kd_pipeline.stages.label import LabelConfig, LabelConfigError
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


def _draws(ex: dict[str, Any], p: int, kind: str = "target") -> tuple[np.ndarray, np.ndarray]:
    """Position p's drawn ids and their counts: ``target`` in a sampled store, ``tail`` in a hybrid one."""
    off = ex[f"{kind}_offsets"]
    return ex[f"{kind}_ids"][off[p] : off[p + 1]].astype(np.int64), ex[f"{kind}_counts"][off[p] : off[p + 1]]


def test_default_is_a_sampled_store_of_50_draws(world: dict[str, Any], tmp_path: Path) -> None:
    _label(world, tmp_path / "d")
    store = open_store(tmp_path / "d")
    t, config = store.manifest.targets, store.manifest.config
    assert (t.method, t.num_samples, t.temperature) == ("sample", 50, 1.0)
    assert (config["method"], config["samples"]) == ("sample", 50)
    drawn, expected = [], []  # per position: mean log p of the 50 draws, and its expectation under the teacher
    for ex in store:
        probs = _teacher_probs(world["teacher"], ex["input_ids"].astype(np.int64))
        assert len(ex["target_offsets"]) - 1 == len(ex["input_ids"]) - 1
        for p in range(len(ex["target_offsets"]) - 1):
            ids, counts = _draws(ex, p)
            assert int(counts.sum()) == 50 and (counts >= 1).all()  # 50 draws per position
            assert len(np.unique(ids)) == len(ids) and (probs[p, ids] > 0).all()  # unique ids the teacher can draw
            drawn.append(float((counts / 50 * np.log(probs[p, ids])).sum()))
            expected.append(float((probs[p] * np.log(probs[p])).sum()))
    assert len(drawn) == store.manifest.positions > 0
    # drawn from the teacher: over all positions, draws at random from the vocabulary would be ~2.8 nats lower
    assert np.mean(drawn) == pytest.approx(np.mean(expected), abs=0.1)
    again = label(LabelConfig(teacher=str(world["root"] / "teacher"), data=str(world["data"]),
                              out=str(tmp_path / "d"), shard_size=8), log=lambda m: None)  # fmt: skip
    assert again.labelled_units == 0 and again.resumed_units == len(store.manifest.shards)  # resumes as it was


def test_explicit_methods_and_options_given_alone(world: dict[str, Any], tmp_path: Path) -> None:
    _label(world, tmp_path / "t", method="topk", limit=4)
    topk = open_store(tmp_path / "t")
    assert (topk.manifest.targets.method, topk.manifest.targets.k) == ("topk", 32)
    # a top-k store's recorded configuration is what it was when top-k was the default (old stores resume)
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
    _label(world, tmp_path / "y", method="hybrid", limit=4)
    y = open_store(tmp_path / "y").manifest.targets
    assert (y.method, y.k, y.num_samples) == ("hybrid", 4, 12)
    _label(world, tmp_path / "k", top_k=6, limit=4)  # --top-k alone: a top-6 store
    k = open_store(tmp_path / "k")
    assert (k.manifest.targets.method, k.manifest.targets.k) == ("topk", 6)
    ex = next(iter(k))
    probs = _teacher_probs(world["teacher"], ex["input_ids"].astype(np.int64))
    for p in range(len(ex["input_ids"]) - 1):
        assert set(ex["target_ids"][p].astype(np.int64)) == set(np.argsort(-probs[p])[:6])
    _label(world, tmp_path / "h", top_k=6, samples=9, limit=4)  # --top-k and --samples: a hybrid store, 6 + 9
    h = open_store(tmp_path / "h")
    assert (h.manifest.targets.method, h.manifest.targets.k, h.manifest.targets.num_samples) == ("hybrid", 6, 9)
    ex = next(iter(h))
    probs = _teacher_probs(world["teacher"], ex["input_ids"].astype(np.int64))
    for p in range(len(ex["input_ids"]) - 1):
        head = ex["target_ids"][p].astype(np.int64)
        assert set(head) == set(np.argsort(-probs[p])[:6])
        ids, counts = _draws(ex, p, "tail")
        assert int(counts.sum()) == 9 and not np.isin(ids, head).any()  # 9 draws from the tail
    _label(world, tmp_path / "n", samples=7, limit=4)  # --samples alone: a sampled store of 7 draws
    n = open_store(tmp_path / "n")
    assert (n.manifest.targets.method, n.manifest.targets.num_samples) == ("sample", 7)
    ex = next(iter(n))
    assert all(int(_draws(ex, p)[1].sum()) == 7 for p in range(len(ex["input_ids"]) - 1))


def test_masked_lm_default_is_sampled(world: dict[str, Any], tmp_path: Path) -> None:
    """50 draws at each masked position, from the masked-LM teacher's own distribution there (float64, here)."""
    _label(world, tmp_path / "m", teacher="masked-lm", task="masked-lm")
    store = open_store(tmp_path / "m")
    t = store.manifest.targets
    assert (t.method, t.num_samples, t.num_classes) == ("sample", 50, world["vocab"])
    drawn, expected = [], []
    for ex in store:
        probs = _teacher_probs(world["masked-lm"], ex["input_ids"].astype(np.int64))
        for p, at in enumerate(ex["positions"].astype(np.int64)):
            ids, counts = _draws(ex, p)
            assert int(counts.sum()) == 50 and (probs[at, ids] > 0).all()
            drawn.append(float((counts / 50 * np.log(probs[at, ids])).sum()))
            expected.append(float((probs[at] * np.log(probs[at])).sum()))
    assert len(drawn) == store.manifest.positions > 30
    # drawn from the teacher at the masked position: draws from another position's (or a flatter) distribution
    # land lower on the teacher's log-probs there
    assert np.mean(drawn) == pytest.approx(np.mean(expected), abs=0.1)


def test_few_classes_keep_every_class_exactly(world: dict[str, Any], tmp_path: Path) -> None:
    """A 3-class teacher is not sampled by default: the default keeps all 3 classes, exactly, and says so once."""
    logs = _label(world, tmp_path / "c", teacher="seq-cls", task="seq-cls", label_field="label")
    said = [line for line in logs if "keeping all 3 output ids exactly" in line]
    assert len(said) == 1 and "hybrid" not in said[0], logs
    store = open_store(tmp_path / "c")
    assert (store.manifest.targets.method, store.manifest.targets.k) == ("topk", 3)
    _assert_class_logprobs(store, world["seq-cls"], atol=2e-3)
    for ex in store:
        assert sorted(ex["target_ids"].reshape(-1).tolist()) == [0, 1, 2]
        assert float(np.asarray(ex["tail_mass"]).reshape(-1)[0]) == pytest.approx(0.0, abs=1e-6)


def _assert_class_logprobs(store: Any, model: Any, atol: float) -> None:
    """Every example's stored log-probs equal the seq-cls teacher's own (float64 log-softmax) within ``atol``."""
    model.eval()
    for ex in store:
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ex["input_ids"], dtype=torch.long)[None]).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1).numpy()
        ids = ex["target_ids"].reshape(-1).astype(np.int64)
        np.testing.assert_allclose(ex["target_logprobs"].reshape(-1).astype(np.float64), logp[ids], atol=atol)


def test_a_value_dtype_with_few_classes_is_kept(world: dict[str, Any], tmp_path: Path) -> None:
    """A 3-class teacher with --value-dtype q8 and no method: its store keeps every class exactly (top-k, where q8
    applies), so the early refusal of q8 on an inferred sampled store (which reads the tokenizer, ~100 ids here)
    must not apply to seq-cls, and the q8 values stay within q8's step of the teacher's log-probs."""
    assert world["vocab"] > 32  # the tokenizer alone would say "more output ids than a store keeps whole"
    logs = _label(world, tmp_path / "q", teacher="seq-cls", task="seq-cls", label_field="label", value_dtype="q8")
    assert any("keeping all 3 output ids exactly" in line for line in logs), logs
    store = open_store(tmp_path / "q")
    targets = store.manifest.targets
    assert (targets.method, targets.k, targets.value_dtype) == ("topk", 3, "q8")
    _assert_class_logprobs(store, world["seq-cls"], atol=0.1)


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
    assert "warning" not in result.output and "50 samples at T=1" in result.output
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
    whole store is alpha * KL(p̂ ‖ q) + (1 - alpha) * CE, p̂ = count / 50 per drawn id, written out here in float64
    per example from the store's reader."""
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
            draws, counts = _draws(ex, p)
            p_hat[draws] = counts / 50
            on = p_hat > 0
            kl.append(float((p_hat[on] * (np.log(p_hat[on]) - log_q[p, on])).sum()))
            ce.append(-float(log_q[p, ids[p + 1]]))
    assert got == pytest.approx(0.5 * np.mean(kl) + 0.5 * np.mean(ce), rel=1e-4)


def test_options_without_method_on_narrow_teachers_and_q8() -> None:
    """Without --method: a --top-k that covers the teacher keeps every id (one line, naming hybrid only when
    --samples asked for it), so does a teacher of at most 32 ids; q8 values on a sampled store are refused."""
    logs: list[str] = []
    cfg = LabelConfig(out="o", top_k=100).resolved(100, logs.append)
    assert (cfg.method, cfg.top_k) == ("topk", 100) and len(logs) == 1
    assert "keeping all 100 output ids exactly" in logs[0] and "hybrid" not in logs[0]
    logs.clear()
    cfg = LabelConfig(out="o", top_k=100, samples=5).resolved(100, logs.append)
    assert (cfg.method, cfg.top_k) == ("topk", 100) and len(logs) == 1 and "hybrid" in logs[0]
    logs.clear()
    cfg = LabelConfig(out="o", samples=5).resolved(32, logs.append)
    assert (cfg.method, cfg.top_k) == ("topk", 32) and len(logs) == 1 and "hybrid" not in logs[0]
    assert LabelConfig(out="o", samples=5).resolved(33, logs.append).method == "sample" and len(logs) == 1
    with pytest.raises(LabelConfigError, match="--top-k 101 is larger than the teacher's 100 output ids"):
        LabelConfig(out="o", method="topk", top_k=101).resolved(100, logs.append)
    # an explicit method on a narrow teacher: the error says the top-k is that method's default, not the user's
    with pytest.raises(
        LabelConfigError, match=r"--top-k 32 \(--method topk's default\) is larger than the teacher's 20"
    ):
        LabelConfig(out="o", method="topk").resolved(20, logs.append)
    with pytest.raises(LabelConfigError, match=r"--top-k 4 \(--method hybrid's default\) keeps all of the teacher's 4"):
        LabelConfig(out="o", method="hybrid").resolved(4, logs.append)
    with pytest.raises(LabelConfigError, match="q8 applies to stored log-probs"):
        LabelConfig(out="o", value_dtype="q8").resolved(100, logs.append)
    assert LabelConfig(out="o", top_k=8, value_dtype="q8").resolved(100, logs.append).method == "topk"


def test_a_store_of_the_old_default_is_refused_naming_the_options_that_resume_it(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """A store labelled by default before session 14 (top-32: what `--method topk` labels, its recorded config the
    same, test_explicit_methods_and_options_given_alone) and the same command now, with no options: one line, exit
    1, the store untouched, and the options it names resume it without labelling anything again."""
    _label(world, tmp_path / "old", method="topk", limit=16)
    before = (tmp_path / "old" / "manifest.json").read_bytes()
    args = ["label", "--teacher", str(world["root"] / "teacher"), "--data", str(world["data"]), "--shard-size", "8",
            "--limit", "16", "--out", str(tmp_path / "old")]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert "it holds topk targets (top-32) where these options label sample (50 multinomial draws)" in line
    assert "add --method topk --top-k 32 to resume it" in line
    assert (tmp_path / "old" / "manifest.json").read_bytes() == before
    again = CliRunner().invoke(cli, [*args, "--method", "topk", "--top-k", "32"], catch_exceptions=False)
    assert again.exit_code == 0 and "labelled 0 shards" in again.output, again.output
    assert (tmp_path / "old" / "manifest.json").read_bytes() == before


def test_a_value_dtype_on_a_sampled_store_is_refused() -> None:
    """A sampled store holds counts, no log-probs: --value-dtype float32 (or q8) would be silently ignored."""
    for given in ({}, {"samples": 7}):
        for dtype in ("float32", "q8"):
            with pytest.raises(LabelConfigError, match=f"--value-dtype {dtype} applies to stored log-probs"):
                LabelConfig(out="o", value_dtype=dtype, **given).resolved(100, print)
    with pytest.raises(LabelConfigError, match="--value-dtype float32 applies to --method topk and hybrid only"):
        LabelConfig(out="o", method="sample", value_dtype="float32").validate()
    cfg = LabelConfig(out="o", top_k=8, value_dtype="float32").resolved(100, print)
    assert (cfg.method, cfg.value_dtype) == ("topk", "float32")
    assert LabelConfig(out="o", value_dtype="float32").resolved(20, print).method == "topk"  # stored whole


def test_a_value_dtype_on_an_inferred_sampled_store_is_refused_before_the_teacher_loads(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pipeline label --value-dtype q8`` without --method or --top-k: one line, exit 1, before the teacher loads
    (its tokenizer already says the store would be sampled), and before the slow steps that precede that load (the
    input's streamed scan, the weight files' hash: minutes for a billion tokens or a 70B teacher), nothing written;
    with --top-k the same run labels."""
    from kd_pipeline.stages import inputs, models

    args = ["label", "--teacher", str(world["root"] / "teacher"), "--data", str(world["data"]), "--shard-size", "8",
            "--limit", "8", "--value-dtype", "q8", "--out", str(tmp_path / "q8")]  # fmt: skip
    slow = ((inputs, "scan_files"), (models, "weights_digest"))
    with monkeypatch.context() as probes:  # each slow step fails loudly if the refusal has not come first
        for module, name in slow:
            probes.setattr(module, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran before the refusal"))
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert "--value-dtype q8 applies to stored log-probs" in line and "add --method topk" in line
    assert "loading teacher" not in result.output, result.output
    assert not (tmp_path / "q8").exists()
    called: list[str] = []  # the probes above are where label looks the slow steps up: it calls them there
    for module, name in slow:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real, **k: called.append(_n) or _f(*a, **k))
    ok = CliRunner().invoke(cli, [*args, "--top-k", "8"], catch_exceptions=False)
    assert ok.exit_code == 0, ok.output
    assert open_store(tmp_path / "q8").manifest.targets.value_dtype == "q8"
    assert sorted(called) == ["scan_files", "weights_digest"], called


def test_torchrun_against_a_store_of_the_old_default_is_refused_before_labelling(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """Under torchrun the same: refused up front (not at the merge, after every rank labelled the whole input)."""
    from tests.test_scale_out import torchrun

    out = tmp_path / "old"
    _label(world, out, method="topk", limit=16)
    before = (out / "manifest.json").read_bytes()
    proc = torchrun("label", "--teacher", str(world["root"] / "teacher"), "--data", str(world["data"]),
                    "--shard-size", "8", "--limit", "16", "--out", str(out))  # fmt: skip
    assert proc.returncode != 0
    assert "add --method topk --top-k 32 to resume it" in proc.stderr, proc.stderr[-3000:]
    # the rank that failed left with its one-line error's exit code, not killed by an abort at exit (torchrun
    # may stop the other rank with SIGTERM)
    assert "(exitcode: 1)" in proc.stderr, proc.stderr[-3000:]
    assert "Signal 6" not in proc.stderr and "terminate called" not in proc.stderr, proc.stderr[-3000:]
    assert not (out / ".ranks").exists() and (out / "manifest.json").read_bytes() == before  # nothing labelled


def test_torchrun_overwrite_replaces_a_store_of_another_configuration_at_the_merge(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """``--overwrite`` under torchrun over a finished store of other settings: the ranks label, the old store is
    replaced at the merge (it was refused there before: the merge found a store of another configuration), and the
    result equals the same labelling done by one process; the ranks' folders are gone."""
    from tests.test_scale_out import assert_same_store, torchrun

    out, single = tmp_path / "old", tmp_path / "single"
    _label(world, out, method="topk", limit=16)
    _label(world, single, limit=16)
    args = ["label", "--teacher", str(world["root"] / "teacher"), "--data", str(world["data"]),
            "--shard-size", "8", "--limit", "16", "--out", str(out), "--overwrite"]  # fmt: skip
    proc = torchrun(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "removed the store of another configuration" in proc.stderr + proc.stdout
    store = open_store(out)
    assert (store.manifest.targets.method, store.manifest.targets.num_samples) == ("sample", 50)
    assert_same_store(single, out)
    assert not (out / ".ranks").exists()


def test_many_classes_are_sampled_by_default_and_train(world: dict[str, Any], tmp_path: Path) -> None:
    """A 40-class teacher (more ids than a default top-k keeps) gets the default sampled store, 50 draws per
    example over its 40 classes; with 20,000 draws each example's class frequencies sit within 5 standard errors
    of the teacher's float64 softmax on that example (so the draws come from the right example's classes), and a
    permutation of the classes does not; `pipeline train` on the default store with a 40-class student and
    default options runs, its distillation term finite and >= 0."""
    root = world["root"]
    teacher = make_model(root / "seq-cls-40", "seq-cls", vocab_size=world["vocab"], num_labels=40).eval()
    logs = _label(world, tmp_path / "s", teacher="seq-cls-40", task="seq-cls", label_field="label")
    assert not any("keeping all" in line for line in logs), logs
    store = open_store(tmp_path / "s")
    t = store.manifest.targets
    assert (t.method, t.num_samples, t.k, t.num_classes, t.draws) == ("sample", 50, 40, 40, "multinomial")
    for ex in store:
        ids, counts = ex["target_ids"].astype(np.int64), ex["target_counts"]
        assert ex["target_offsets"].tolist() == [0, len(ids)] and int(counts.sum()) == 50
        assert (np.diff(ids) > 0).all() and ids.max() < 40
    n = 20_000
    _label(world, tmp_path / "many", teacher="seq-cls-40", task="seq-cls", label_field="label", samples=n, limit=6)
    permuted = 0
    for ex in open_store(tmp_path / "many"):
        with torch.no_grad():
            logits = teacher(input_ids=torch.as_tensor(ex["input_ids"].astype(np.int64))[None]).logits[0]
        p = torch.softmax(logits.double(), -1).numpy()  # (40,) float64, this example's
        freq = np.zeros(40)
        freq[ex["target_ids"].astype(np.int64)] = ex["target_counts"] / n
        bound = 5 * np.sqrt(p * (1 - p) / n) + 1e-4
        assert np.all(np.abs(freq - p) <= bound), np.abs(freq - p).max()
        permuted += int(np.any(np.abs(freq - np.roll(p, 1)) > bound))
    assert permuted == 6
    make_model(tmp_path / "student", "seq-cls", vocab_size=world["vocab"], num_labels=40)
    result = CliRunner().invoke(cli, ["train", "--store", str(tmp_path / "s"), "--student", str(tmp_path / "student"),
                                      "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4",
                                      "--eval-every", "2", "--log-every", "1"], catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if r["split"] == "train"]
    assert len(kd) == 2 and all(np.isfinite(kd)) and all(x >= -1e-4 for x in kd)

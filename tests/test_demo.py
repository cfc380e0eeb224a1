"""The demo's code path end to end with a tiny teacher built from a config: label, cut, two trainings from the
same start, and a report whose numbers are checked against a float64 forward written out here; a re-run reuses
everything (nothing downloaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kd_pipeline.pipeline.demo import DemoConfig, report_lines, run_demo
from tests.tiny import labelling_world

LENGTH = 16


def _reference(model_dir: Path, store: Path) -> tuple[float, int, int]:
    """(perplexity, positions, parameters) of a model on the store's held-out examples: float64, next-token
    log-softmax gathered by hand over every pair of real tokens."""
    from transformers import AutoModelForCausalLM

    from kd_pipeline.data.dataset import StoreDataset

    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    held = StoreDataset(store, batch_size=64, shuffle=False, split="eval", eval_fraction=0.2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in held:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, dim=-1)  # (B, L, V)
            pairs = (mask[:, :-1] * mask[:, 1:]).bool()  # (B, L-1): this token and the next are real
            picked = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # (B, L-1)
            nll -= float(picked[pairs].sum())
            count += int(pairs.sum())
    params = sum(t.numel() for t in {p.data_ptr(): p for p in model.state_dict().values()}.values())
    return math.exp(nll / count), count, params


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    w = labelling_world(tmp_path_factory.mktemp("demo"))
    cfg = DemoConfig(
        work_dir=str(w["root"] / "work"),
        teacher=str(w["root"] / "teacher"),
        data=str(w["data"]),
        tokens=20 * LENGTH,
        max_length=LENGTH,
        blocks="",
        layers=1,
        steps=3,
        batch_size=4,
    )
    lines: list[str] = []
    report = run_demo(cfg, say=lines.append)
    return {"world": w, "cfg": cfg, "report": report, "lines": lines}


def test_report_matches_an_independent_forward(demo: dict[str, Any]) -> None:
    work = Path(demo["cfg"].work_dir)
    folders = {
        "teacher": demo["world"]["root"] / "teacher",
        "cut, untrained": work / "student",
        "distilled": work / "run-distilled" / "final",
        "hard labels": work / "run-hard" / "final",
    }
    models = demo["report"]["models"]
    assert set(models) == set(folders)
    for key, folder in folders.items():
        ppl, positions, params = _reference(folder, work / "store")
        assert models[key]["perplexity"] == pytest.approx(ppl, rel=1e-5), key
        assert (models[key]["positions"], models[key]["parameters"]) == (positions, params), key
        assert 0 < models[key]["tokens_per_second"] < math.inf
    r = demo["report"]
    assert r["ratio_distilled_to_teacher"] == models["distilled"]["perplexity"] / models["teacher"]["perplexity"]
    assert r["distilled_wins"] is (models["distilled"]["perplexity"] < models["hard labels"]["perplexity"])
    text = "\n".join(demo["lines"])
    assert f"{models['distilled']['perplexity']:.2f}" in text and "[4/4]" in text
    assert report_lines(r, "t")[-1] in text.replace("teacher " + str(folders["teacher"]), "teacher t")


def test_demo_labels_the_default_store(demo: dict[str, Any]) -> None:
    """The demo's store is `pipeline label`'s default: sampled, 50 draws per position from the teacher."""
    from kd_pipeline.data import open_store

    store = open_store(Path(demo["cfg"].work_dir) / "store")
    t = store.manifest.targets
    assert (t.method, t.num_samples, t.temperature) == ("sample", 50, 1.0)
    positions = 0
    for ex in store:
        off = ex["target_offsets"]
        assert all(int(ex["target_counts"][off[p] : off[p + 1]].sum()) == 50 for p in range(len(off) - 1))
        positions += len(off) - 1
    assert positions == store.manifest.positions > 0


def test_two_trainings_differ_only_in_alpha(demo: dict[str, Any]) -> None:
    """The same cut student, steps, batches, seed and schedule; the hard run at alpha 0, the distilled one at the
    schedule init-student recorded; the student keeps ``layers`` of the teacher's blocks."""
    from transformers import AutoConfig

    work = Path(demo["cfg"].work_dir)
    distilled = json.loads((work / "run-distilled" / "config.json").read_text())
    hard = json.loads((work / "run-hard" / "config.json").read_text())
    schedule = json.loads((work / "student" / "init_student.json").read_text())["healing"]
    assert hard["alpha"] == 0.0 and distilled["alpha"] == schedule["alpha"] > 0
    same = {k: v for k, v in distilled.items() if k not in ("alpha", "out", "resume")}
    assert same == {k: v for k, v in hard.items() if k not in ("alpha", "out", "resume")}
    assert {k: distilled[k] for k in schedule if k != "alpha"} == {k: v for k, v in schedule.items() if k != "alpha"}
    assert distilled["steps"] == demo["cfg"].steps and distilled["student"] == str(work / "student")
    assert AutoConfig.from_pretrained(work / "student").num_hidden_layers == demo["cfg"].layers


def test_rerun_reuses_store_student_and_runs(demo: dict[str, Any]) -> None:
    work = Path(demo["cfg"].work_dir)
    student = work / "student" / "model.safetensors"  # not cut again: not even rewritten
    stamp = student.stat().st_mtime_ns
    # rewritten on resume (the manifest's commit, the metrics truncated to the checkpoint), but unchanged: no
    # shard labelled again, no step trained again
    watched = [work / "store" / "manifest.json", student]
    watched += [work / run / "metrics.jsonl" for run in ("run-distilled", "run-hard")]
    before = {p: p.read_bytes() for p in watched}
    again = run_demo(demo["cfg"], say=lambda msg: None)
    assert {p: p.read_bytes() for p in watched} == before
    assert student.stat().st_mtime_ns == stamp
    for key, row in demo["report"]["models"].items():
        assert again["models"][key]["perplexity"] == pytest.approx(row["perplexity"], rel=1e-6), key


def _rerun_and_fresh(demo: dict[str, Any], tmp: pytest.TempPathFactory, **changes: Any) -> tuple[Path, Path, str]:
    """The module's work dir copied and re-run with ``changes``, and a fresh demo with them: (re-run, fresh, log)."""
    import dataclasses
    import shutil

    reused = tmp.mktemp("rerun") / "work"
    shutil.copytree(demo["cfg"].work_dir, reused)
    lines: list[str] = []
    run_demo(dataclasses.replace(demo["cfg"], work_dir=str(reused), **changes), say=lines.append)
    fresh = tmp.mktemp("fresh") / "work"
    run_demo(dataclasses.replace(demo["cfg"], work_dir=str(fresh), **changes), say=lambda msg: None)
    return reused, fresh, "\n".join(lines)


def _assert_same_runs(reused: Path, fresh: Path) -> None:
    """Both runs' final students are bit-identical in the two work dirs."""
    from safetensors.torch import load_file

    for run in ("run-distilled", "run-hard"):
        got = load_file(reused / run / "final" / "model.safetensors")
        want = load_file(fresh / run / "final" / "model.safetensors")
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (run, key)


def test_rerun_with_other_steps_trains_again_from_the_start(
    demo: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A work dir left by a demo of other settings (an earlier version's step count) is not resumed into another
    schedule: both runs are trained again from the start, and equal a fresh demo of the new settings."""
    steps = demo["cfg"].steps + 2  # the old runs' last checkpoint (step 3) is below: resuming would be possible
    reused, fresh, log = _rerun_and_fresh(demo, tmp_path_factory, steps=steps)
    for run in ("run-distilled", "run-hard"):
        assert f"{reused / run} holds a run with other settings" in log, run
        assert json.loads((reused / run / "config.json").read_text())["steps"] == steps
    _assert_same_runs(reused, fresh)


def test_rerun_with_another_cut_cuts_and_trains_again(
    demo: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A work dir holding a student of other blocks (an earlier version's cut) is cut again, and both students
    trained again: the same as a fresh demo of the new blocks (the run settings themselves are unchanged)."""
    kept = json.loads((Path(demo["cfg"].work_dir) / "student" / "init_student.json").read_text())["result"]
    other = 1 - kept["kept_layers"][0]  # the tiny teacher has 2 blocks; greedy removal kept one
    reused, fresh, log = _rerun_and_fresh(demo, tmp_path_factory, blocks=str(other))
    assert "holds a student of blocks" in log
    info = json.loads((reused / "student" / "init_student.json").read_text())
    assert info["result"]["kept_layers"] == [other]
    _assert_same_runs(reused, fresh)


def test_rerun_with_another_store_labels_and_trains_again(
    demo: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A work dir holding a store of other settings (here a top-6 store against the default sampled one) is labelled
    again, and both students trained again (they learnt from the old store): the same as a fresh demo of the new
    settings."""
    reused, fresh, log = _rerun_and_fresh(demo, tmp_path_factory, top_k=6)
    assert "holds a store of other settings" in log
    from kd_pipeline.data import open_store

    t = open_store(reused / "store").manifest.targets
    assert (t.method, t.k) == ("topk", 6)
    _assert_same_runs(reused, fresh)

"""bench/quality.train_online's teacher cache (``cache_hidden``): the teacher's hidden states kept per training
sequence after its first pass give the same student as running the teacher at every step, with fewer teacher passes;
a teacher in train mode (dropout) is refused. Tiny real models (tests/tiny), a real top-4 store."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kd_pipeline.stages import models
from kd_pipeline.stages.label import run as label
from kd_pipeline.stages.train import TrainConfig
from tests.test_hybrid_label import label_cfg
from tests.test_sampled import _student
from tests.tiny import labelling_world, make_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import quality  # bench/quality.py


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("online-cache")
    tiny = labelling_world(root)
    shutil.rmtree(root / "teacher")  # a teacher whose head matches the student's vocabulary (no padded rows)
    make_model(root / "teacher", "causal-lm", vocab_size=tiny["vocab"])
    cfg = label_cfg(tiny, root / "store", method="topk", top_k=4, samples=None, temperature=1.0)
    label(cfg, log=lambda msg: None)
    teacher = models.load_model(str(root / "teacher"), "causal-lm", device=torch.device("cpu"), dtype=torch.float32)
    return {"root": root, "student": _student(root / "student", tiny["vocab"]), "teacher": teacher}


def _run(world: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[dict[str, Any], int]:
    """40 steps of batches of 4 (5 epochs of the store's 8 training batches); the result and the teacher passes."""
    passes = []
    real = models.OutputHead.hidden_or_logits

    def counted(self: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        passes.append(input_ids.shape[0])
        return real(self, input_ids, attention_mask)

    monkeypatch.setattr(models.OutputHead, "hidden_or_logits", counted)
    cfg = TrainConfig(
        store=str(world["root"] / "store"),
        student=str(world["student"]),
        out=str(world["root"] / name),
        alpha=0.5,
        steps=40,
        batch_size=4,
        eval_fraction=0.2,
        eval_every=40,
        save_every=40,
        seed=0,
        progress=False,
    )
    return quality.train_online(cfg, world["teacher"], 1.0, **kw), len(passes)


@pytest.mark.parametrize("fresh", [None, (0, 20), (2, 10)], ids=["full", "sampled", "hybrid"])
def test_cached_teacher_states_train_the_same_student(
    world: dict[str, Any], fresh: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, plain_passes = _run(world, "plain", monkeypatch, fresh=fresh)
    cached, cached_passes = _run(world, "cached", monkeypatch, fresh=fresh, cache_hidden=True)
    assert cached["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)
    assert cached["final_train_loss"] == pytest.approx(plain["final_train_loss"], rel=1e-6)
    # every training step ran the teacher without the cache; with it only the first epoch's 8 batches did (the
    # evaluation's passes, if any, are the same in both)
    assert plain_passes - cached_passes == 40 - 8


def test_a_teacher_in_train_mode_is_refused(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    world["teacher"].train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            _run(world, "refused", monkeypatch, cache_hidden=True)
    finally:
        world["teacher"].eval()

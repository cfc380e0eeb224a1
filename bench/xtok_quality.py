"""Cross-tokenizer distillation on the real teacher: a student with its own ~8k byte-level BPE, trained from the
teacher's store with ``--cross-tokenizer`` against the same student on hard labels, equal steps, 3 seeds; held-out
bits per character (perplexities of two tokenizers do not compare).

    KD_PIPELINE_CACHE=/tmp/kdcache .venv/bin/python bench/xtok_quality.py [--steps 300] [--seeds 0 1 2]

Data: the built-in corpus (the Python docs' topics), cut into its paragraphs of more than 200 characters (one
record each, so that examples are short and many), the first --records of them; labelled once with the built-in
teacher (SmolLM2-135M-Instruct) with ``--spans`` (top-32 at T=1, --max-length 128). The held-out split is
``pipeline train``'s (10% by content key); the student's BPE is trained on the training split's texts only.
Both arms run ``pipeline train --cross-tokenizer`` (``stages.train.run``; alpha 0.5 vs alpha 0: the same loop,
order, schedule and evaluation).
Writes bench/results/xtok_quality.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import environment, markdown_table, write_results

from kd_pipeline import data
from kd_pipeline.data.dataset import held_out
from kd_pipeline.stages.label import LabelConfig
from kd_pipeline.stages.label import run as label
from kd_pipeline.stages.train import TrainConfig
from kd_pipeline.stages.train import run as train


def _paragraphs(path: Path, records: int) -> Path:
    from pydoc_data.topics import topics

    paras = [p.strip() for k in sorted(topics) for p in topics[k].split("\n\n") if len(p.strip()) > 200]
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[:records]))
    return path


def _student(folder: Path, texts: list[str], vocab: int, seed: int) -> dict[str, Any]:
    """A byte-level BPE of ``vocab`` ids trained on ``texts`` (with a BOS it adds), and a fresh 2-layer Llama."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>")
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=384,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return {"vocab": len(tok), "hidden": 128, "layers": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/kd-bench-xtok", help="folder for the store, student and runs")
    ap.add_argument("--records", type=int, default=192)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store_path = work / "store"
    t0 = time.perf_counter()
    if not (store_path / "manifest.json").is_file():
        docs = _paragraphs(work / "paragraphs.jsonl", args.records)
        cfg = LabelConfig(data=str(docs), out=str(store_path), spans=True, max_length=args.max_length, shard_size=64)
        label(cfg, log=lambda m: print(m, file=sys.stderr))
    label_s = time.perf_counter() - t0
    store = data.open_store(str(store_path))
    held = held_out(np.concatenate([store.shard_keys(s) for s in range(store.num_shards)]), 0.1)  # as train's split
    train_idx, eval_idx = np.flatnonzero(~held), np.flatnonzero(held)
    texts = [bytes(store[int(i)]["text"]).decode() for i in train_idx]
    student_dir = work / "student"
    student = _student(student_dir, texts, args.vocab, 0)
    report: dict[str, Any] = {
        "env": environment("cpu"),
        "config": {**vars(args), "label_seconds": label_s, "store": store.manifest.config, "student": student},
        "store": {"examples": len(store), "tokens": store.manifest.tokens, "bytes": store.manifest.bytes},
        "runs": [],
    }
    for seed in args.seeds:
        for arm, alpha in (("cross-tokenizer", args.alpha), ("hard labels", 0.0)):
            out = work / f"run-{arm.replace(' ', '-')}-{seed}"
            if out.exists():
                shutil.rmtree(out)
            cfg = TrainConfig(store=str(store_path), student=str(student_dir), out=str(out), cross_tokenizer=True)
            cfg.steps, cfg.batch_size, cfg.lr, cfg.alpha, cfg.seed = args.steps, args.batch_size, args.lr, alpha, seed
            cfg.eval_every, cfg.eval_batches, cfg.warmup, cfg.log_every = args.steps, 1000, 20, 50
            start = time.perf_counter()
            result = train(cfg, log=lambda m: print(m, file=sys.stderr))
            row = {"seed": seed, "arm": arm, "alpha": alpha, **result.eval, "seconds": time.perf_counter() - start}
            report["runs"].append(row)
            print(json.dumps(row), file=sys.stderr)
            write_results("xtok_quality", report)
    arms = ("cross-tokenizer", "hard labels")
    bpc = {arm: [r["bits_per_char"] for r in report["runs"] if r["arm"] == arm] for arm in arms}
    wins = [c < h for c, h in zip(bpc["cross-tokenizer"], bpc["hard labels"], strict=True)]
    report["summary"] = {
        "bits_per_char": {k: {"per_seed": v, "mean": float(np.mean(v))} for k, v in bpc.items()},
        "cross_better_on_every_seed": all(wins),
        "held_out_examples": len(eval_idx),
    }
    path = write_results("xtok_quality", report)
    rows = [[s, f"{c:.4f}", f"{h:.4f}", f"{h - c:+.4f}"] for s, c, h in zip(args.seeds, *bpc.values(), strict=True)]
    print(markdown_table(["seed", "cross-tokenizer bits/char", "hard labels bits/char", "gain"], rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

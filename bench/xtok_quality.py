"""Cross-tokenizer distillation on the real teacher: a student with its own ~8k byte-level BPE, trained from the
teacher's store with ``--cross-tokenizer`` against the same student on hard labels, equal steps, 3 seeds; held-out
bits per character (perplexities of two tokenizers do not compare).

    KD_PIPELINE_CACHE=/tmp/kdcache .venv/bin/python bench/xtok_quality.py [--steps 300] [--seeds 0 1 2]

Data: the built-in corpus (the Python docs' topics), cut into its paragraphs; those of more than 200 characters
(one record each, so that examples are short and many; --records caps them, 0: all 783) are labelled once with the
built-in teacher (SmolLM2-135M-Instruct) with ``--spans`` (top-32 at T=1, --max-length 128). The held-out split is
``pipeline train``'s (10% of the labelled examples by content key). The student's BPE is trained on every paragraph
of the corpus (labelled or not, any length) but those that hold a held-out example's text or lie inside one: the
labelled training texts alone (243,527 characters, cut at 128 teacher tokens) stop at 6,960 ids. Both arms run
``pipeline train --cross-tokenizer`` (``stages.train.run``; alpha --alpha vs alpha 0: the same student, loop,
example order, schedule and evaluation).
A run whose ``bench.json`` records the same settings is not run again (delete --work to start over).
Writes bench/results/xtok_quality.json (--results names another).
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

NDArray = np.ndarray[Any, Any]


def _corpus() -> list[str]:
    """The built-in corpus's paragraphs (stripped, non-empty), in a fixed order."""
    from pydoc_data.topics import topics

    return [p.strip() for k in sorted(topics) for p in topics[k].split("\n\n") if p.strip()]


def _paragraphs(path: Path, records: int) -> Path:
    paras = [p for p in _corpus() if len(p) > 200]
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[: records or None]))
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


def _bpe_texts(store: data.StoreReader, held: NDArray) -> tuple[list[str], list[str]]:
    """(the BPE's training texts, the held-out texts): every corpus paragraph that neither holds a held-out
    example's text (a stored text is its paragraph cut after the teacher's last kept token) nor lies inside one."""
    held_texts = [bytes(store[int(i)]["text"]).decode() for i in np.flatnonzero(held)]
    return [p for p in _corpus() if not any(h in p or p in h for h in held_texts)], held_texts


def _train_arm(args: argparse.Namespace, work: Path, arm: str, alpha: float, seed: int) -> dict[str, Any]:
    """One training run, or its recorded row when ``bench.json`` in its folder holds the same settings."""
    out = work / f"run-{arm.replace(' ', '-')}-{seed}"
    settings = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "warmup", "vocab", "max_length")}
    settings |= {"alpha": alpha, "seed": seed}
    done = out / "bench.json"
    if done.is_file() and json.loads(done.read_text())["settings"] == settings:
        row: dict[str, Any] = json.loads(done.read_text())["row"]
        print(f"{out}: done before, {row}", file=sys.stderr)
        return row
    if out.exists():
        shutil.rmtree(out)
    cfg = TrainConfig(store=str(work / "store"), student=str(work / "student"), out=str(out), cross_tokenizer=True)
    cfg.steps, cfg.batch_size, cfg.lr, cfg.alpha, cfg.seed = args.steps, args.batch_size, args.lr, alpha, seed
    cfg.eval_every, cfg.eval_batches, cfg.warmup, cfg.log_every = args.steps, 1000, args.warmup, 50
    start = time.perf_counter()
    result = train(cfg, log=lambda m: print(m, file=sys.stderr))
    row = {"seed": seed, "arm": arm, "alpha": alpha, **result.eval, "seconds": time.perf_counter() - start}
    done.write_text(json.dumps({"settings": settings, "row": row}) + "\n")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/kd-bench-xtok", help="folder for the store, student and runs")
    ap.add_argument("--records", type=int, default=0, help="labelled paragraphs (0: all 783 of > 200 characters)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (labelling and training)")
    ap.add_argument("--results", default="xtok_quality", help="results file name under bench/results/")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store_path = work / "store"
    label_s = None  # None: the store was in --work already (labelled by an earlier run)
    if not (store_path / "manifest.json").is_file():
        t0 = time.perf_counter()
        docs = _paragraphs(work / "paragraphs.jsonl", args.records)
        cfg = LabelConfig(
            data=str(docs),
            out=str(store_path),
            method="topk",  # top-32, as its recorded results (the default changed after them)
            spans=True,
            max_length=args.max_length,
            shard_size=64,
        )
        label(cfg, log=lambda m: print(m, file=sys.stderr))
        label_s = time.perf_counter() - t0
    store = data.open_store(str(store_path))
    held = held_out(np.concatenate([store.shard_keys(s) for s in range(store.num_shards)]), 0.1)  # as train's split
    bpe_texts, held_texts = _bpe_texts(store, held)
    student = _student(work / "student", bpe_texts, args.vocab, 0)
    student |= {"bpe_texts": len(bpe_texts), "bpe_chars": sum(map(len, bpe_texts))}
    report: dict[str, Any] = {
        "env": environment("cpu"),
        "config": {**vars(args), "label_seconds": label_s, "store": store.manifest.config, "student": student},
        "store": {"examples": len(store), "tokens": store.manifest.tokens, "bytes": store.manifest.bytes},
        "held_out": {"examples": len(held_texts), "chars": sum(map(len, held_texts))},
        "runs": [],
    }
    for seed in args.seeds:
        for arm, alpha in (("cross-tokenizer", args.alpha), ("hard labels", 0.0)):
            row = _train_arm(args, work, arm, alpha, seed)
            report["runs"].append(row)
            print(json.dumps(row), file=sys.stderr)
            write_results(args.results, report)
    arms = ("cross-tokenizer", "hard labels")
    bpc = {arm: [r["bits_per_char"] for r in report["runs"] if r["arm"] == arm] for arm in arms}
    gain = [h - c for c, h in zip(bpc["cross-tokenizer"], bpc["hard labels"], strict=True)]
    report["summary"] = {
        "bits_per_char": {k: {"per_seed": v, "mean": float(np.mean(v))} for k, v in bpc.items()},
        "gain_hard_minus_cross": {"per_seed": gain, "mean": float(np.mean(gain)), "min": min(gain), "max": max(gain)},
        "cross_better_on_every_seed": all(g > 0 for g in gain),
    }
    path = write_results(args.results, report)
    rows = [[s, f"{c:.4f}", f"{h:.4f}", f"{h - c:+.4f}"] for s, c, h in zip(args.seeds, *bpc.values(), strict=True)]
    print(markdown_table(["seed", "cross-tokenizer bits/char", "hard labels bits/char", "gain"], rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

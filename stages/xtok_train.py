"""``pipeline train --cross-tokenizer``: train a student whose tokenizer differs from the teacher's, from a store
labelled with ``--spans``. No teacher is loaded: the store's texts, spans and teacher strings are enough.

    pipeline train --store STORE --student STUDENT_DIR --out RUN_DIR --cross-tokenizer [--alpha 0.5] ...

STUDENT_DIR holds the student's config (or weights) and its own fast tokenizer. Reads top to bottom: setup (the
store must have spans; the loss options this path supports) -> model and vocabularies (the teacher -> student
id map, from the strings) -> data (the store's examples, the held-out split by content key, a seeded order per
epoch) -> loop (AdamW, warmup + cosine, accumulation, clipping; periodic held-out bits per character) -> save.

A first version, kept apart from ``stages/train.py``'s loop: one process (no torchrun), no mid-run checkpoints or
resume, the student's dense head (the (B, M, V) logits exist at once), DataLoader workers unused. The loss is
``stages.xtok``'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import data
from .run_dir import Metrics

if TYPE_CHECKING:
    import torch

    from .train_config import TrainConfig, TrainResult

__all__ = ["bits_per_char", "run_cross", "split_examples"]


def _refusals(cfg: TrainConfig) -> list[str]:
    """What this path does not support, each with what to do."""
    p = []
    if cfg.loss != "forward-kl" or cfg.tail != "bin":
        p.append("--cross-tokenizer has its own soft loss (forward KL on shared ids + ULD); leave --loss and --tail")
    if cfg.resume:
        p.append("--cross-tokenizer does not resume yet; start a new --out")
    if cfg.eval_store:
        p.append("--cross-tokenizer evaluates on --eval-fraction of --store; leave --eval-store")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.append("--cross-tokenizer runs in one process; launch it without torchrun")
    return p


def run_cross(cfg: TrainConfig, log: Any = None) -> TrainResult:
    """Train ``cfg.student`` (with its own tokenizer) on ``cfg.store`` (with spans) into ``cfg.out``."""
    import torch

    from .models import copy_tokenizer, load_student, load_tokenizer, resolve_device
    from .source_spans import token_strings
    from .train_config import TrainConfigError, TrainResult
    from .train_setup import check_run_dir, warmup_cosine
    from .xtok import CrossCollator
    from .xtok_align import vocab_map

    say = log or (lambda msg: print(msg, file=sys.stderr))
    problems = _refusals(cfg)
    if problems:
        raise TrainConfigError("; ".join(problems))
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    check_run_dir(out, False)
    store = data.open_store(cfg.store, verify=cfg.verify != "none")
    m = store.manifest
    if m.task != "causal-lm":
        raise TrainConfigError(f"--cross-tokenizer needs a causal-lm store; {cfg.store} holds {m.task} targets")
    teacher_strings = data.source_text.read_token_strings(store.location, m)  # refuses a store without spans
    T = cfg.temperature if cfg.temperature is not None else m.targets.temperature
    data.check_compatible(m, task="causal-lm", temperature=T)
    torch.manual_seed(cfg.seed)

    # ---- model and vocabularies
    model, tokenizer_dir = load_student(cfg.student, m)
    if tokenizer_dir is None:
        raise TrainConfigError(f"--cross-tokenizer needs the student's own tokenizer in {cfg.student}; save it there")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    width = int(model.get_output_embeddings().weight.shape[0])
    vocab = vocab_map(teacher_strings, token_strings(tokenizer, width))
    max_length = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
    collate = CrossCollator(tokenizer, m.targets, vocab, max_length)
    model.to(device)
    shared = int((vocab >= 0).sum())
    train_idx, eval_idx = split_examples(store, cfg.eval_fraction)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(train_idx) / (cfg.batch_size * cfg.grad_accum)))
    say(
        f"cross-tokenizer: student {cfg.student} ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{width} ids, {shared:,} of the teacher's {len(vocab):,} ids shared); {len(train_idx):,} training and "
        f"{len(eval_idx):,} held-out examples; {total_steps} steps of {cfg.batch_size * cfg.grad_accum} at T={T}"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")

    # ---- optimizer, schedule
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup, total_steps))

    # ---- loop
    metrics = Metrics(out / "metrics.jsonl", True)
    batches = _batches(store, train_idx, cfg.batch_size, cfg.seed)
    start = time.perf_counter()
    step, last, result = 0, float("nan"), {}
    model.train()
    while step < total_steps:
        optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in collate(next(batches)).items()}
            loss, parts = cross_loss(model, batch, cfg.alpha, T)
            torch.autograd.backward(loss / cfg.grad_accum)
            for k in sums:
                sums[k] += parts[k] / cfg.grad_accum
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        last = sums["loss"]
        if step % cfg.log_every == 0 or step == total_steps:
            metrics.write({"step": step, "split": "train", **sums, "lr": scheduler.get_last_lr()[0]})
        if eval_idx.size and (step % cfg.eval_every == 0 or step == total_steps):
            result = bits_per_char(model, store, eval_idx, collate, cfg.batch_size, cfg.eval_batches, device)
            metrics.write({"step": step, "split": "eval", **result})
            say(f"step {step}: held-out {result['bits_per_char']:.4f} bits/char, ce {result['ce']:.4f}")
            model.train()

    # ---- save
    final = out / "final"
    model.save_pretrained(final)
    copy_tokenizer(tokenizer_dir, final)
    return TrainResult(str(out), step, last, result, time.perf_counter() - start)


def cross_loss(
    model: Any, batch: dict[str, torch.Tensor], alpha: float, temperature: float
) -> tuple[Any, dict[str, float]]:
    """alpha * T^2 * mean over aligned pairs of the soft terms + (1 - alpha) * the student's hard-label CE."""
    import torch

    from .xtok import xtok_soft_loss

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # (B, M, V)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    if alpha == 0 or batch["pair_row"].numel() == 0:
        kd = ce * 0.0
    else:
        z = logits[batch["pair_row"], batch["pair_pos"]]  # (N, V)
        kl, uld = xtok_soft_loss(z, batch["t_sid"], batch["t_prob"], batch["t_known"], temperature)
        kd = (kl + uld).mean() * temperature**2
    loss = alpha * kd + (1 - alpha) * ce
    return loss, {"loss": float(loss.detach()), "kd": float(kd.detach()), "ce": float(ce.detach())}


def bits_per_char(
    model: Any, store: Any, idx: np.ndarray[Any, Any], collate: Any, batch_size: int, max_batches: int, device: Any
) -> dict[str, float]:
    """Held-out bits per character of the student's own tokens: summed next-token NLL / ln 2 / the characters those
    tokens cover (comparable across tokenizers, unlike perplexity), and the per-token CE."""
    import torch

    nll = chars = tokens = 0.0
    model.eval()
    with torch.no_grad():
        for b in range(0, min(len(idx), batch_size * max_batches), batch_size):
            batch = collate([store[int(i)] for i in idx[b : b + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"].flatten()
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels, reduction="sum"))
            chars += float(batch["chars"].sum())
            tokens += float((labels >= 0).sum())
    return {"bits_per_char": nll / math.log(2) / max(chars, 1.0), "ce": nll / max(tokens, 1.0), "chars": chars}


def split_examples(store: Any, fraction: float) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(training, held-out) example indices, held out by content key as ``pipeline train`` does."""
    from ..data.dataset import held_out

    keys = np.concatenate([store.shard_keys(s) for s in range(store.num_shards)]) if store.num_shards else None
    if keys is None or fraction == 0:
        return np.arange(len(store)), np.zeros(0, dtype=np.int64)
    held = held_out(keys, fraction)
    return np.flatnonzero(~held), np.flatnonzero(held)


def _batches(store: Any, idx: np.ndarray[Any, Any], batch_size: int, seed: int) -> Any:
    """Endless lists of stored examples: each epoch a fresh seeded permutation of ``idx``."""
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(idx)
        for b in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield [store[int(i)] for i in order[b : b + batch_size]]
        epoch += 1

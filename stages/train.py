"""Stage two: train a student from a store of cached soft labels. No teacher is imported, loaded or needed.

    pipeline train --store STORE --student PATH_OR_CONFIG --out RUN_DIR [--loss forward-kl] [--alpha 0.5] ...
    torchrun --nproc-per-node 2 -m kd_pipeline train ...     # DDP (gloo on CPU, nccl on GPU)

Reads top to bottom: setup (config, distributed, store checks) -> model (student, compatibility with the
store) -> data (streaming loaders, resumable) -> loop (AdamW, warmup + cosine, accumulation, clipping, bf16
autocast on GPU, periodic evaluation and checkpoints) -> save (``RUN_DIR/final`` via ``save_pretrained``).

Run directory::

    RUN_DIR/config.json                      the resolved TrainConfig
    RUN_DIR/metrics.jsonl                    one JSON object per logged step and per evaluation
    RUN_DIR/loss_curve.png                   training and evaluation loss against step
    RUN_DIR/checkpoints/step-000100/         model.safetensors, optimizer.safetensors, state.json
    RUN_DIR/final/                           the student, loadable with AutoModelFor...from_pretrained
    RUN_DIR/trace/rank-00000.jsonl           with --trace, per rank: per step the examples seen, a weight digest

Checkpoints hold no pickle: tensors in safetensors, everything else (optimizer hyper-parameters, scheduler
position, data position, RNG state as a tensor) in JSON.

The pieces the loop is built from live beside it: ``train_config`` (TrainConfig), ``train_setup`` (distributed
start, checks, data split and batch stream, AdamW and schedule), ``batch_loss`` (the student at the selected
positions and one batch's loss), ``train_eval`` (evaluation), ``run_dir`` (checkpoints, metrics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .. import data
from .batch_loss import at_positions, train_loss
from .run_dir import Metrics, latest_checkpoint, load_checkpoint, plot_metrics, save_checkpoint, truncate_metrics
from .train_config import VERIFY_MODES, TrainConfig, TrainConfigError, TrainResult
from .train_eval import evaluate
from .train_setup import (
    adamw,
    batch_stream,
    check_kept_mass,
    check_run_dir,
    check_sampled,
    data_split,
    matching_student,
    progress_bar,
    setup_distributed,
    verify_full,
    weights_digest,
)
from .weighting import step_counts, summed_over_ranks
from .xtok_train import cross_counts, cross_evaluate, cross_loss, cross_refusals, cross_student

__all__ = ["VERIFY_MODES", "TrainConfig", "TrainConfigError", "TrainResult", "evaluate", "run"]


def run(cfg: TrainConfig, log: Any = None) -> TrainResult:
    """Train ``cfg.student`` on ``cfg.store`` into ``cfg.out``."""
    import torch

    from ..data.dataset import StoreDataset
    from . import process_group
    from .models import (
        copy_tokenizer,
        resolve_device,
    )
    from .sharding import full_model_state, in_forward, shard_student

    cfg.validate()
    refused = cross_refusals(cfg) if cfg.cross_tokenizer else []
    if refused:
        raise TrainConfigError("; ".join(refused))
    rank, world, device = setup_distributed(resolve_device(cfg.device))
    if cfg.fsdp and world == 1:
        raise TrainConfigError(
            "--fsdp shards the student over torchrun's processes; launch with torchrun --nproc-per-node N (N >= 2) "
            "-m kd_pipeline train ..., or drop --fsdp"
        )
    main = rank == 0
    say = (log or (lambda msg: print(msg, file=sys.stderr))) if main else (lambda msg: None)
    out = Path(cfg.out)
    check_run_dir(out, cfg.resume)
    store = data.open_store(cfg.store, verify=cfg.verify == "first-read")
    if cfg.verify == "full":
        verify_full(cfg.store, rank, world)
    m = store.manifest
    if m.positions == 0:
        raise TrainConfigError(f"{cfg.store} holds no labelled positions; nothing to train on")
    temperature = cfg.temperature if cfg.temperature is not None else m.targets.temperature
    check_sampled(cfg, m, say)
    torch.manual_seed(cfg.seed)

    # ---- model (a student with its own tokenizer: its batches, counts, loss and evaluation from xtok_train)
    loss_fn, count_fn, eval_fn, collate, note = train_loss, None, evaluate, None, ""
    if cfg.cross_tokenizer:
        model, tokenizer_dir, collate, shared = cross_student(cfg, store, temperature)
        loss_fn, count_fn, eval_fn = cross_loss, cross_counts, functools.partial(cross_evaluate, collate=collate)
        note = f"; cross-tokenizer, {shared:,} of the teacher's {m.targets.num_classes:,} ids shared"
    else:
        model, tokenizer_dir = matching_student(cfg, m, temperature)
    check_kept_mass(m, say)  # once the run is known to go ahead: a refused run prints its one error line only
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    model.to(device)
    net = at_positions(model, m.task, cfg.loss_chunk)
    ddp_model = net
    if cfg.fsdp:  # the loss and evaluation then run inside its forward: see stages/sharding.py
        ddp_model = shard_student(net, cfg.fsdp_dtype)
    elif world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )

    # ---- data
    train_split, eval_source = data_split(cfg, store)

    def train_set(epoch: int, samples_seen: int) -> StoreDataset:
        return StoreDataset(
            store,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            epoch=epoch,
            samples_seen=samples_seen,
            rank=rank,
            world_size=world,
            num_workers=cfg.workers,
            collate_fn=collate,
            **train_split,
        )

    per_step = cfg.batch_size * cfg.grad_accum * world
    n_train = train_set(0, 0).num_examples
    # an epoch is len() batches per rank: the examples plus the lockstep stand-ins (data/dataset.py, promise 4)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(train_set(0, 0)) / cfg.grad_accum))
    targets = f"{m.targets.num_samples} samples" if m.targets.sampled else f"top-{m.targets.k}"
    targets += f" + {m.targets.num_samples} tail samples" if m.targets.hybrid else ""
    say(
        f"student {cfg.student}: {sum(p.numel() for p in model.parameters()):,} parameters on {device}; "
        f"store {cfg.store}: {n_train:,} training examples, {m.task}, {targets} at T={temperature}; "
        f"{total_steps} steps of {per_step} examples; "
        + (f"head and loss in chunks of {net.loss_chunk} positions" if net.loss_chunk else "dense head and loss")
        + (f"; FSDP over {world} ranks, {cfg.fsdp_dtype} compute" if cfg.fsdp else "")
        + note
    )

    # ---- optimizer, schedule, resume
    optimizer, scheduler = adamw(model, cfg, total_steps)
    step, position = 0, {"epoch": 0, "samples_seen": 0}  # + "loader" once running
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            step, position = load_checkpoint(ckpt, model, optimizer, scheduler, sharded=cfg.fsdp)
            if main:
                truncate_metrics(out / "metrics.jsonl", step)
            say(f"resumed from {ckpt} at step {step}")
    trace = out / "trace" / f"rank-{rank:05d}.jsonl" if cfg.trace else None
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(trace, step)  # rows after the checkpoint are about to be written again
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")

    # ---- loop
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    metrics = Metrics(out / "metrics.jsonl", main)
    batches = batch_stream(train_set, cfg, world, position)
    bar = progress_bar(cfg, total_steps, step, main)
    start = time.perf_counter()
    last_loss = float("nan")
    eval_result: dict[str, float] = {}
    model.train()
    while step < total_steps:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        seen: list[list[int]] = []  # [epoch, index] of this step's counted examples (--trace)
        # the whole step's micro-batches first: each one's loss is its sum over the step's positions on every rank
        # (stages/weighting.py), so that every token of the step weighs the same
        step_batches = [next(batches) for _ in range(cfg.grad_accum)]
        position = step_batches[-1][1]
        counts = step_counts([b for b, _ in step_batches], world, device, count_fn)
        for micro, (batch, after) in enumerate(step_batches):
            if trace is not None:
                counted = batch["index"][batch["example_weight"] > 0].tolist()
                seen += [[after["epoch"], int(i)] for i in counted]  # this micro-batch's epoch
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sync = micro == cfg.grad_accum - 1 or world == 1
            ctx = ddp_model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx, autocast:
                loss, parts = in_forward(ddp_model, loss_fn, batch, m.task, cfg, temperature, counts)
            torch.autograd.backward(loss * world)  # DDP averages the ranks' gradients; the counts hold every rank
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value  # this rank's shares of the step's loss
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)) if cfg.max_grad_norm else 0.0
        )
        optimizer.step()
        scheduler.step()
        step += 1
        if trace is not None:
            with open(trace, "a") as f:
                f.write(json.dumps({"step": step, "examples": seen, "weights_sha256": weights_digest(model)}) + "\n")
        last_loss = parts_sum.get("loss", float("nan"))
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            parts_sum = summed_over_ranks(parts_sum, world, device)  # on every rank: the step's loss
            last_loss = parts_sum.get("loss", float("nan"))
            metrics.write(
                {
                    "step": step,
                    "split": "train",
                    **parts_sum,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens": int(counts[0]),
                    "step_seconds": time.perf_counter() - t0,
                    "epoch": position["epoch"],
                    "samples_seen": position["samples_seen"],
                }
            )
        if eval_source is not None and (step % cfg.eval_every == 0 or step == total_steps):
            eval_model = ddp_model if cfg.fsdp else net
            eval_result = in_forward(eval_model, eval_fn, eval_source, cfg, m.task, temperature, device, rank, world)
            metrics.write({"step": step, "split": "eval", **eval_result})
            say(f"step {step}: eval " + ", ".join(f"{k} {v:.4g}" for k, v in eval_result.items()))
            model.train()
        if (main or cfg.fsdp) and (step % cfg.save_every == 0 or step == total_steps):
            save_checkpoint(out, step, model, optimizer, scheduler, position, sharded=cfg.fsdp, write=main)
    bar.close()

    # ---- save
    seconds = time.perf_counter() - start
    gathered = full_model_state(model) if cfg.fsdp else None  # every rank takes part
    if main:
        final = out / "final"
        model.save_pretrained(final, state_dict=gathered)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, final)
        plot_metrics(out)
        say(f"trained {step} steps in {seconds:.1f}s; final loss {last_loss:.4f}; student saved to {final}")
    if world > 1:
        torch.distributed.barrier()
        process_group.teardown()  # the group pipeline started, destroyed while the interpreter is alive
    return TrainResult(out=str(out), steps=step, final_loss=last_loss, eval=eval_result, seconds=seconds)

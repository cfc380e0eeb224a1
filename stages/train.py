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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import data
from .losses import UNBIASED_WITH_SAMPLES, check_loss_options
from .run_dir import Metrics, latest_checkpoint, load_checkpoint, plot_metrics, save_checkpoint, truncate_metrics
from .sharding import FSDP_DTYPES
from .weighting import selected as _selected
from .weighting import step_counts, summed_over_ranks

if TYPE_CHECKING:  # torch loads inside run(), so that `pipeline --help` stays instant
    import torch

__all__ = ["VERIFY_MODES", "TrainConfig", "TrainConfigError", "TrainResult", "run"]

VERIFY_MODES = ("first-read", "full", "none")
"""``--verify``: checksums on each shard's first load (default), the whole store up front, or sizes only."""

# The CLI's flag for each loss option, so that the losses' own validator names them in its messages.
_LOSS_FLAGS = {"kind": "--loss", "temperature": "--temperature", "beta": "--beta", "tail": "--tail", "alpha": "--alpha"}


class TrainConfigError(ValueError):
    """One or more configuration problems, all listed."""


@dataclass
class TrainConfig:
    """Everything ``pipeline train`` needs. Defaults live here and nowhere else."""

    store: str = ""
    """The soft-label store to train from (path or fsspec URL)."""
    student: str = ""
    """Student: a model folder (weights: fine-tune) or a config.json / folder with only a config (fresh model)."""
    out: str = ""
    """Run directory for checkpoints, metrics and the final model."""
    loss: str = "forward-kl"
    """Soft loss over the k+1 bins: forward-kl, reverse-kl, jsd, skew-kl, skew-rkl, tvd."""
    beta: float = 0.5
    """jsd: mixture weight in (0, 1); skew-kl / skew-rkl: skew in [0, 1)."""
    alpha: float = 0.5
    """Weight of the soft (distillation) term; 1 - alpha weighs the hard-label cross-entropy."""
    temperature: float | None = None
    """Must equal the store's labeling temperature (default: take it from the store)."""
    tail: str = "bin"
    """bin: the unbiased k+1-bin loss; renormalise: the usual biased top-k loss, for comparison only (in training
    and evaluation)."""
    loss_chunk: int | None = None
    """Positions per chunk of the output head + loss for students whose head is one linear layer (causal-lm): the
    (positions x vocabulary) logits are never built. Default: as many as fit one 256 MiB float32 block of logits
    (512 at a 131,072-id vocabulary); 0: the dense head and loss, for comparison."""
    steps: int | None = None
    """Optimizer steps (default: derived from --epochs)."""
    epochs: float = 1.0
    """Passes over the training examples, used when --steps is not given."""
    batch_size: int = 8
    """Examples per micro-batch (per rank)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    warmup: int = 10
    """Linear warm-up steps, then cosine decay to 10% of the peak."""
    freeze_embeddings: bool = False
    """Keep the input embeddings (and an output head tied to them) fixed: a student cut from the teacher has the
    teacher's already, and a step skips their gradient and update."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    eval_store: str | None = None
    """A separate store for evaluation (default: hold out --eval-fraction of --store's examples)."""
    eval_fraction: float = 0.1
    """Fraction of --store's examples held out for evaluation when there is no --eval-store, chosen by each
    example's content key, so the same examples whatever the shard size or number of ranks (0 disables)."""
    eval_every: int = 50
    """Evaluate every N optimizer steps (and at the end)."""
    eval_batches: int = 50
    """At most N batches per evaluation."""
    save_every: int = 100
    """Write a checkpoint every N optimizer steps (and at the end)."""
    log_every: int = 10
    """Log training metrics every N optimizer steps."""
    seed: int = 0
    """Seed of initialisation, shuffling and dropout."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda, cuda:N."""
    workers: int = 0
    """DataLoader worker processes per rank."""
    resume: bool = False
    """Continue from the latest checkpoint in --out."""
    verify: str = "first-read"
    """When the store's checksums are checked: first-read (each shard's files when this process first loads
    them; remote files as they are downloaded), full (the whole store up front, as `pipeline verify`, on rank 0
    before step one), or none (sizes, decoding and value checks only; remote downloads are still checked)."""
    progress: bool | None = None
    """Show a progress bar (default: when stderr is a terminal)."""
    fsdp: bool = False
    """Shard the student's parameters, gradients and optimizer state over torchrun's ranks with FSDP (PyTorch's
    fully_shard) instead of replicating it with DDP: for students that do not fit on one device."""
    fsdp_dtype: str = "bfloat16"
    """With --fsdp: the dtype the parameters are gathered in for compute (bfloat16: mixed precision; float32).
    Weights, gradient reduction and AdamW stay float32."""
    cross_tokenizer: bool = False
    """Train a student whose tokenizer differs from the teacher's, from a store labelled with --spans: positions
    aligned through the text, shared tokens matched exactly, the rest by a sorted-probability term
    (stages/xtok_train.py; README, "Cross-tokenizer training"). Without it such a student is refused."""
    trace: bool = False
    """Write RUN_DIR/trace/rank-NNNNN.jsonl: per step, the [epoch, index] of each example this rank trained on and
    a SHA-256 of its weights after the step (for debugging data-parallel runs)."""

    def validate(self) -> None:
        """Collect every problem into one error."""
        p = []
        for name in ("store", "student", "out"):
            if not getattr(self, name):
                p.append(f"--{name} is required")
        # the losses' one validator: the same rules kd_loss and distill_loss enforce (T None: taken from the store)
        p += check_loss_options(self.loss, self.temperature, self.beta, self.tail, self.alpha, _LOSS_FLAGS)
        if self.steps is not None and self.steps < 1:
            p.append(f"--steps must be >= 1, got {self.steps}")
        if self.steps is None and not self.epochs > 0:
            p.append(f"--epochs must be > 0, got {self.epochs}")
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            p.append(f"--lr must be > 0, got {self.lr}")
        if self.loss_chunk is not None and self.loss_chunk < 0:
            p.append(f"--loss-chunk must be >= 0 (0: dense), got {self.loss_chunk}")
        if self.warmup < 0 or self.workers < 0:
            p.append("--warmup and --workers must be >= 0")
        if not 0 <= self.eval_fraction < 1:
            p.append(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.fsdp_dtype not in FSDP_DTYPES:
            p.append(f"--fsdp-dtype must be one of {', '.join(FSDP_DTYPES)}, got {self.fsdp_dtype!r}")
        if self.verify not in VERIFY_MODES:
            p.append(f"--verify {self.verify!r} is not one of {', '.join(VERIFY_MODES)}")
        if p:
            raise TrainConfigError("; ".join(p))


@dataclass
class TrainResult:
    out: str
    steps: int
    final_loss: float
    eval: dict[str, float]
    seconds: float


# ---------------------------------------------------------------------------------------------------- setup


def run(cfg: TrainConfig, log: Any = None) -> TrainResult:
    """Train ``cfg.student`` on ``cfg.store`` into ``cfg.out``."""
    import torch

    from ..data.dataset import StoreDataset
    from .models import (
        copy_tokenizer,
        declared_task,
        load_student,
        output_width,
        resolve_device,
        student_tokenizer_digest,
    )
    from .sharding import full_model_state, in_forward, shard_student

    cfg.validate()
    if cfg.cross_tokenizer:
        from .xtok_train import run_cross

        return run_cross(cfg, log)
    rank, world, device = _setup_distributed(resolve_device(cfg.device))
    if cfg.fsdp and world == 1:
        raise TrainConfigError(
            "--fsdp shards the student over torchrun's processes; launch with torchrun --nproc-per-node N (N >= 2) "
            "-m kd_pipeline train ..., or drop --fsdp"
        )
    main = rank == 0
    say = (log or (lambda msg: print(msg, file=sys.stderr))) if main else (lambda msg: None)
    out = Path(cfg.out)
    _check_run_dir(out, cfg.resume)
    store = data.open_store(cfg.store, verify=cfg.verify == "first-read")
    if cfg.verify == "full":
        _verify_full(cfg.store, rank, world)
    m = store.manifest
    if m.positions == 0:
        raise TrainConfigError(f"{cfg.store} holds no labelled positions; nothing to train on")
    temperature = cfg.temperature if cfg.temperature is not None else m.targets.temperature
    _check_sampled(cfg, m, say)
    torch.manual_seed(cfg.seed)

    # ---- model
    student_task = declared_task(cfg.student)
    data.check_compatible(m, task=student_task, temperature=temperature)  # before any loading
    model, tokenizer_dir = load_student(cfg.student, m)
    if model.config.pad_token_id is None:  # HF classifiers find each sequence's last token by the pad id
        model.config.pad_token_id = m.tokenizer.get("pad_token_id") or 0
    width = output_width(model)
    digest = student_tokenizer_digest(tokenizer_dir)
    data.check_compatible(m, vocab_size=width, tokenizer_digest=digest, task=student_task, temperature=temperature)
    in_rows = int(model.get_input_embeddings().weight.shape[0])
    if in_rows < m.vocab_size:
        raise data.IncompatibleStoreError(
            f"the student's input embeddings have {in_rows} rows but the store's input ids go up to "
            f"{m.vocab_size - 1}; use a student with at least {m.vocab_size} embedding rows"
        )
    _check_kept_mass(m, say)  # once the run is known to go ahead: a refused run prints its one error line only
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    model.to(device)
    net = _at_positions(model, m.task, cfg.loss_chunk)
    ddp_model = net
    if cfg.fsdp:  # the loss and evaluation then run inside its forward: see stages/sharding.py
        ddp_model = shard_student(net, cfg.fsdp_dtype)
    elif world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )

    # ---- data
    train_split, eval_source = _split(cfg, store)

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
    )

    # ---- optimizer, schedule, resume
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        foreach=False,  # identical update order on every run: resume must reproduce the same weights
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(cfg.warmup, total_steps))
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
    batches = _batch_stream(train_set, cfg, world, position)
    bar = _progress(cfg, total_steps, step, main)
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
        counts = step_counts([b for b, _ in step_batches], world, device)
        for micro, (batch, after) in enumerate(step_batches):
            if trace is not None:
                counted = batch["index"][batch["example_weight"] > 0].tolist()
                seen += [[after["epoch"], int(i)] for i in counted]  # this micro-batch's epoch
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sync = micro == cfg.grad_accum - 1 or world == 1
            ctx = ddp_model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx, autocast:
                loss, parts = in_forward(ddp_model, _loss, batch, m.task, cfg, temperature, counts)
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
                f.write(json.dumps({"step": step, "examples": seen, "weights_sha256": _weights_digest(model)}) + "\n")
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
            eval_result = in_forward(eval_model, evaluate, eval_source, cfg, m.task, temperature, device, rank, world)
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
    return TrainResult(out=str(out), steps=step, final_loss=last_loss, eval=eval_result, seconds=seconds)


def _weights_digest(model: Any) -> str:
    """SHA-256 of the parameters as float32 bytes, in ``named_parameters`` order (name included)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode() + b"\0")
        p = p.full_tensor() if hasattr(p, "full_tensor") else p  # an FSDP shard: the whole parameter (collective)
        h.update(p.detach().to("cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_sampled(cfg: TrainConfig, m: data.Manifest, say: Any) -> None:
    """Sampled and hybrid targets: refuse --tail renormalise, and say (once) when the loss has no unbiased estimator.

    With sampled ids and counts, count / num_samples is an unbiased estimate of the teacher's distribution, so a
    loss linear in it (forward-kl: its student-dependent part is the cross-entropy) is unbiased; the others are
    not linear in it and are biased. Such a run still proceeds (it is a valid, if biased, objective, and the
    comparison is worth making); the warning says so.
    """
    if not (m.targets.sampled or m.targets.hybrid):  # hybrid: the same holds for the draws from the tail
        return
    if cfg.tail == "renormalise":
        raise TrainConfigError(
            f"--tail renormalise compares against the biased top-k loss; a {m.targets.method} store has no tail to "
            "drop (the draws carry it): use --tail bin"
        )
    if cfg.loss not in UNBIASED_WITH_SAMPLES:
        where = "per position" if m.targets.sampled else "per position from the tail"
        say(
            f"warning: --loss {cfg.loss} has no unbiased estimator with {m.targets.method} targets (this store "
            f"holds {m.targets.num_samples} samples {where}); the run proceeds with a biased loss. Unbiased: "
            f"{', '.join(UNBIASED_WITH_SAMPLES)}"
        )


# Below this mean kept mass a top-k store tells the student little about the teacher beyond its top ids: measured on
# SmolLM2-135M (BENCHMARKS.md, section 5), top-32 at T=2 (kept mass 0.20) trained a worse student than hard labels.
_LOW_KEPT_MASS = 0.5


def _check_kept_mass(m: data.Manifest, say: Any) -> None:
    """Say when a top-k store keeps little of the teacher's mass, and what to label instead."""
    kept = m.kept_mass_mean
    if m.targets.method == "topk" and kept is not None and kept < _LOW_KEPT_MASS:
        t = m.targets
        say(
            f"warning: this store's top-{t.k} ids at T={t.temperature:g} hold on average {kept:.2f} of the teacher's "
            "probability mass; the rest is one tail bin that says nothing about which other ids are likely, and on "
            "a real teacher such stores trained worse students than hard labels. Label at T=1, with a larger "
            "--top-k, or with --method sample (BENCHMARKS.md, section 5)"
        )


def _setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Rank, world size and device; initialises torch.distributed when launched by torchrun."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return rank, world, device


def _verify_full(store: str, rank: int, world: int) -> None:
    """``--verify full``: rank 0 checks the whole store (as `pipeline verify`) and every rank gets its verdict,
    so that the store is read once per job, not once per rank, and every rank stops on a bad store."""
    problems: list[str | None] = [None]
    if rank == 0:
        report = data.verify_store(store)
        problems[0] = None if report.ok else "; ".join(report.problems)
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(problems, src=0)
    if problems[0] is not None:
        raise data.CorruptShardError(f"{store} fails verification: {problems[0]}")


def _check_run_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not resume:
        if (out / "config.json").is_file():
            raise TrainConfigError(
                f"--out {out} already holds a run; pass --resume to continue it or choose a new --out"
            )
        raise TrainConfigError(f"--out {out} exists and is not empty; choose a new or empty directory")


# ---------------------------------------------------------------------------------------------------- model


# ---------------------------------------------------------------------------------------------------- data


def _split(cfg: TrainConfig, store: data.StoreReader) -> tuple[dict[str, Any], Any]:
    """The training StoreDataset's split arguments, and the evaluation source (a store and its StoreDataset's
    split arguments), or None. Without --eval-store, --eval-fraction of the examples is held out by content key
    (``data.dataset.held_out``): one shard is enough, and the split is the same for any shard size or ranks."""
    from ..data.dataset import StoreDataset

    if cfg.eval_store:
        ev = data.open_store(cfg.eval_store)
        if ev.manifest.task != store.manifest.task:
            raise TrainConfigError(f"--eval-store holds {ev.manifest.task} targets, --store {store.manifest.task}")
        return {}, (ev, {})
    if cfg.eval_fraction == 0:
        return {}, None
    split: dict[str, Any] = {"eval_fraction": cfg.eval_fraction}
    held = StoreDataset(store, batch_size=1, split="eval", rank=0, world_size=1, **split).num_examples
    if held in (0, len(store)):
        raise TrainConfigError(
            f"holding out {cfg.eval_fraction:.0%} of --store's {len(store)} examples by content key leaves "
            f"{held} for evaluation and {len(store) - held} for training; pass --eval-store, another "
            "--eval-fraction, or --eval-fraction 0"
        )
    return {"split": "train", **split}, (store, {"split": "eval", **split})


def _batch_stream(make_dataset: Any, cfg: TrainConfig, world: int, position: dict[str, Any]) -> Any:
    """Endless (batch, position-after-it) pairs across epochs, starting at ``position`` (exact resume).

    Every rank takes one batch per micro-step (the loader keeps the ranks in lockstep), so after b batches of an
    epoch the count is b * batch_size * world on every rank. The position also carries the loader's own state
    (``loader``), which lets a checkpoint resume exactly under another world size or --workers.
    """
    import torch

    epoch, seen = position["epoch"], position["samples_seen"]
    loader_state = position.get("loader")
    while True:
        dataset = make_dataset(epoch, 0 if loader_state else seen)
        if loader_state:
            dataset.load_state_dict(loader_state)
            loader_state = None
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=cfg.workers)
        try:
            for batch in loader:
                seen += cfg.batch_size * world
                yield batch, {"epoch": epoch, "samples_seen": seen, "loader": dataset.state_dict(seen)}
        except data.StoreError as e:
            raise _unwrapped(e) from None
        epoch, seen = epoch + 1, 0


def _unwrapped(e: data.StoreError) -> data.StoreError:
    """A store error raised in a DataLoader worker, as its one-line message (a bad shard stays one CLI line).

    torch re-raises a worker's exception as the same type whose message is "Caught X in DataLoader worker
    process N." plus the worker's whole traceback; its last line is "module.X: <the original message>".
    """
    text = str(e)
    if "\n" not in text:
        return e
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
    return type(e)(last.removeprefix(prefix))


# ---------------------------------------------------------------------------------------------------- loss


def _loss(
    model: Any,
    batch: dict[str, torch.Tensor],
    task: str,
    cfg: TrainConfig,
    temperature: float,
    counts: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The distillation loss of one collated batch; returns the loss and its parts for logging.

    ``counts``: the soft and the hard term's denominators, the whole optimizer step's (``weighting.step_counts``);
    the loss is then this batch's share of the step's. None: this batch's own (its mean).

    ``model`` is ``_at_positions``'s module, or DDP around it. With a chunked head, the head's weight enters the loss
    outside the module's forward, as an input of ``chunked_distill_loss``'s autograd Function: its gradient still
    reaches the parameter through autograd, where DDP's hooks reduce it like any other (for a tied student, summed
    with the input embedding's own gradient first).
    """
    from .batch_loss import batch_loss

    net = getattr(model, "module", model)  # the module under DDP
    select = _selected(batch)  # (B, P) bool: real positions of examples that count
    rows = model(batch["input_ids"], batch["attention_mask"], select, batch.get("positions"))  # (N, H) or (N, V)
    options = {"alpha": cfg.alpha, "kind": cfg.loss, "temperature": temperature, "beta": cfg.beta, "tail": cfg.tail}
    return batch_loss(rows, batch, select, net.head, net.loss_chunk, options, counts)


def _at_positions(model: Any, task: str, loss_chunk: int | None = None) -> Any:
    """The student as a module that returns its output at the selected positions only, and the head to apply to it.

    A causal LM runs its backbone once and returns the (N, H) hidden states of the selected positions; its output
    head (``logits``, or the chunked head and loss) is applied to those rows only, so the (B, L, V) logits are never
    built. Other students run their full forward and are indexed: (N, V) or (N, C) logits. An ``nn.Module``, so
    that DDP can wrap it; its parameters are the student's.

    Args:
        model: the Hugging Face student.
        task: the store's task.
        loss_chunk: ``TrainConfig.loss_chunk``: rows per chunk of the head + loss, None to size them by
            ``losses.rows_per_chunk``, 0 for the dense head. Resolved to the module's ``loss_chunk``, which is 0
            (dense) for a student whose head is not one linear layer.
    """
    import torch

    from .batch_loss import at_selected
    from .losses import rows_per_chunk
    from .models import OutputHead, output_width

    class _AtPositions(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.head = OutputHead(model, task)
            chunk = rows_per_chunk(output_width(model)) if loss_chunk is None else loss_chunk
            self.loss_chunk = chunk if self.head.split else 0

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            select: torch.Tensor,
            positions: torch.Tensor | None = None,
        ) -> torch.Tensor:
            """(N, H) hidden states where the head is split off, else (N, V) / (N, C) logits."""
            # the loader pads with 0; the model must see its own pad id there (classifiers locate the last
            # token by it)
            pad = int(model.config.pad_token_id or 0)
            input_ids = input_ids.masked_fill(attention_mask == 0, pad)
            out = self.head.hidden_or_logits(input_ids, attention_mask)  # (B, L, H) or (B, L, V) or (B, C)
            return at_selected(out, task, select, positions)

        def logits(self, rows: torch.Tensor) -> torch.Tensor:
            """``forward``'s rows -> (N, V) float32 logits (the dense head)."""
            return self.head.logits(rows)

    return _AtPositions()


def evaluate(
    model: Any,
    source: Any,
    cfg: TrainConfig,
    task: str,
    temperature: float,
    device: torch.device,
    rank: int,
    world: int,
) -> dict[str, float]:
    """Held-out metrics: hard-label loss (and perplexity for LMs, accuracy for classification) and the KD loss.

    As in training, each is a sum over all the evaluated positions of every rank divided by their number: the KD
    loss over the positions with targets, the others over those that also have a label ("positions")."""
    import torch

    from ..data.dataset import StoreDataset
    from .losses import hard_ce, kd_loss

    store, split = source
    dataset = StoreDataset(store, batch_size=cfg.batch_size, shuffle=False, rank=rank, world_size=world, **split)
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # ce_sum, kd_sum, correct, labelled, kd positions
    with torch.no_grad():
        for i, batch in enumerate(dataset):
            if i >= cfg.eval_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            select = _selected(batch)
            # every rank runs the forward, also on a batch of stand-ins: under FSDP it gathers parameters together
            rows = model(batch["input_ids"], batch["attention_mask"], select, batch.get("positions"))
            if not bool(select.any()):
                continue
            mask = select.reshape(-1)
            k = batch["target_ids"].shape[-1]
            tid = batch["target_ids"].reshape(-1, k)[mask]
            tlp = batch["target_logprobs"].reshape(-1, k)[mask]
            tail = batch["tail_mass"].reshape(-1)[mask]
            tmask = batch["target_mask"].reshape(-1, k)[mask] if "target_mask" in batch else None
            labels = batch["labels"].reshape(-1)[mask]
            step = model.loss_chunk or rows.shape[0]  # as in training: (step, V) logits at a time, never (N, V)
            for c in range(0, rows.shape[0], step):
                part = slice(c, c + step)
                z = model.logits(rows[part])  # (n, V) float32
                sums[0] += hard_ce(z, labels[part], count=1.0).double()  # count 1: the sum
                kd = kd_loss(
                    z,
                    tid[part],
                    tlp[part],
                    tail[part],
                    kind=cfg.loss,
                    temperature=temperature,
                    beta=cfg.beta,
                    target_mask=tmask[part] if tmask is not None else None,
                    tail=cfg.tail,  # the KD figure measures the loss being trained, renormalised baseline included
                    count=1.0,
                )
                sums[1] += kd.double()
                sums[2] += (z.argmax(-1) == labels[part]).sum().double()  # an unlabelled row's -100 never matches
                sums[3] += (labels[part] >= 0).sum().double()
                sums[4] += z.shape[0]
    if world > 1:
        torch.distributed.all_reduce(sums)
    ce_sum, kd_sum, correct, count, kd_count = (float(x) for x in sums)
    count = max(count, 1.0)
    result = {"ce": ce_sum / count, "kd": kd_sum / max(kd_count, 1.0), "positions": count}
    if task == "seq-cls":
        result["accuracy"] = correct / count
    else:
        result["perplexity"] = math.exp(min(ce_sum / count, 50.0))
    return result


# ---------------------------------------------------------------------------------------------------- checkpoints


def _warmup_cosine(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _progress(cfg: TrainConfig, total: int, initial: int, main: bool) -> Any:
    show = main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty())
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="train", dynamic_ncols=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass

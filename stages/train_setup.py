"""``pipeline train``'s set-up: distributed start, run-directory and store checks, the train / eval split, the
resumable batch stream, AdamW with its warmup + cosine schedule, the progress bar and the ``--trace`` digest.

Each piece is a function ``stages/train.py``'s ``run`` calls in order; ``stages/xtok_train.py`` (cross-tokenizer
students) calls the same ones.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import data
from .losses import UNBIASED_WITH_SAMPLES
from .train_config import TrainConfig, TrainConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "adamw",
    "batch_stream",
    "check_kept_mass",
    "check_run_dir",
    "check_sampled",
    "data_split",
    "matching_student",
    "progress_bar",
    "setup_distributed",
    "verify_full",
    "warmup_cosine",
    "weights_digest",
]


def weights_digest(model: Any) -> str:
    """SHA-256 of the parameters as float32 bytes, in ``named_parameters`` order (name included)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode() + b"\0")
        p = p.full_tensor() if hasattr(p, "full_tensor") else p  # an FSDP shard: the whole parameter (collective)
        h.update(p.detach().to("cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def check_sampled(cfg: TrainConfig, m: data.Manifest, say: Any) -> None:
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


def check_kept_mass(m: data.Manifest, say: Any) -> None:
    """Say when a top-k store keeps little of the teacher's mass, and what to label instead."""
    kept = m.kept_mass_mean
    if m.targets.method == "topk" and kept is not None and kept < _LOW_KEPT_MASS:
        t = m.targets
        say(
            f"warning: this store's top-{t.k} ids at T={t.temperature:g} hold on average {kept:.2f} of the teacher's "
            "probability mass; the rest is one tail bin that says nothing about which other ids are likely, and on "
            "a real teacher such stores trained worse students than hard labels. Label at T=1, with a larger "
            "--top-k, or with --method sample (the default) or --method hybrid (BENCHMARKS.md, sections 5 and 11)"
        )


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Rank, world size and device; initialises torch.distributed when launched by torchrun."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    from . import process_group

    process_group.init("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return rank, world, device


def verify_full(store: str, rank: int, world: int) -> None:
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


def check_run_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not resume:
        if (out / "config.json").is_file():
            raise TrainConfigError(
                f"--out {out} already holds a run; pass --resume to continue it or choose a new --out"
            )
        raise TrainConfigError(f"--out {out} exists and is not empty; choose a new or empty directory")


def data_split(cfg: TrainConfig, store: data.StoreReader) -> tuple[dict[str, Any], Any]:
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


def batch_stream(make_dataset: Any, cfg: TrainConfig, world: int, position: dict[str, Any]) -> Any:
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


# ---------------------------------------------------------------------------------------------------- model


def matching_student(cfg: TrainConfig, m: data.Manifest, temperature: float) -> tuple[Any, Any]:
    """The student and its tokenizer's folder, refused before any work unless it matches the store: its task, its
    output width and tokenizer (the teacher's), embedding rows for every stored input id."""
    from .models import declared_task, load_student, output_width, student_tokenizer_digest

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
    return model, tokenizer_dir


# ---------------------------------------------------------------------------------------------------- optimizer


def adamw(model: Any, cfg: TrainConfig, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters (weight decay on matrices only) and its warmup + cosine schedule."""
    import torch

    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        foreach=False,  # identical update order on every run: resume must reproduce the same weights
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup, total_steps))
    return optimizer, scheduler


def warmup_cosine(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def progress_bar(cfg: TrainConfig, total: int, initial: int, main: bool) -> Any:
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

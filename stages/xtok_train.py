"""``pipeline train --cross-tokenizer``: the pieces ``stages/train.py``'s loop takes for a student whose tokenizer
differs from the teacher's, from a store labelled with ``--spans``. No teacher is loaded: the store's texts, spans
and teacher strings are enough.

    pipeline train --store STORE --student STUDENT_DIR --out RUN_DIR --cross-tokenizer [--alpha 0.5] ...
    torchrun --nproc-per-node 2 -m kd_pipeline train --cross-tokenizer ...     # DDP, as without the flag

STUDENT_DIR holds the student's config (or weights) and its own fast tokenizer. The run is ``pipeline train``'s:
the same streaming loader (``StoreDataset``: its order, its exact mid-epoch resume), checkpoints and resume, DDP,
gradient accumulation with exact token weighting, clipping, schedule, logging and progress. What differs is set
up here: the student and its vocabulary map (:func:`cross_student`), the batches (``stages.xtok.CrossCollator``,
run inside the loader: the student's tokenizer encodes each stored text), the step's counts (:func:`cross_counts`),
the loss (:func:`cross_loss`) and the evaluation (:func:`cross_evaluate`: held-out bits per character).

The output head: the backbone runs once and returns the (N, H) hidden states of the labelled positions; the head
and the loss then run over chunks of ``--loss-chunk`` rows under activation checkpointing, so that only one chunk's
(rows, V) logits (and the soft loss's few (rows, V) buffers) exist at a time, in the forward and in the backward,
which recomputes them. ``--loss-chunk 0``: the dense head, (N, V) at once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .. import data
from .train_config import TrainConfig, TrainConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["cross_counts", "cross_evaluate", "cross_loss", "cross_refusals", "cross_student"]


def cross_refusals(cfg: TrainConfig) -> list[str]:
    """What this path does not support, each with what to do."""
    p = []
    if cfg.loss != "forward-kl" or cfg.tail != "bin":
        p.append("--cross-tokenizer has its own soft loss (forward KL on shared ids + ULD); leave --loss and --tail")
    if cfg.eval_store:
        p.append("--cross-tokenizer evaluates on --eval-fraction of --store; leave --eval-store")
    if cfg.fsdp:
        p.append("--cross-tokenizer runs under DDP; drop --fsdp")
    return p


def cross_student(cfg: TrainConfig, store: data.StoreReader, temperature: float) -> tuple[Any, Any, Any, int]:
    """The student, its tokenizer's folder, the loader's collate function and the number of shared ids.

    Raises:
        TrainConfigError: the store is not a causal-LM one, or the student has no tokenizer of its own.
        data.IncompatibleStoreError: the store has no spans (one line, says to label with ``--spans``).
    """
    from .models import load_student, load_tokenizer
    from .source_spans import token_strings
    from .xtok import CrossCollator
    from .xtok_align import vocab_map

    m = store.manifest
    if m.task != "causal-lm":
        raise TrainConfigError(f"--cross-tokenizer needs a causal-lm store; {cfg.store} holds {m.task} targets")
    teacher_strings = data.source_text.read_token_strings(store.location, m)  # refuses a store without spans
    data.check_compatible(m, task="causal-lm", temperature=temperature)
    model, tokenizer_dir = load_student(cfg.student, m)
    if tokenizer_dir is None:
        raise TrainConfigError(f"--cross-tokenizer needs the student's own tokenizer in {cfg.student}; save it there")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    width = int(model.get_output_embeddings().weight.shape[0])
    vocab = vocab_map(teacher_strings, token_strings(tokenizer, width))
    max_length = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
    collate = CrossCollator(tokenizer, m.targets, vocab, max_length)
    return model, tokenizer_dir, collate, int((vocab >= 0).sum())


def _counted(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What counts in a cross-tokenizer batch: (B, M - 1) bool labelled positions of weighted examples (a rank's
    lockstep stand-in has weight 0), (B, M - 1) labels, (N,) bool aligned pairs of weighted examples."""
    weight = batch["example_weight"] > 0  # (B,)
    select = (batch["labels"] >= 0) & weight[:, None]  # (B, M - 1)
    return select, batch["labels"], weight[batch["pair_row"]]


def cross_counts(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's (aligned pairs, labelled student positions) that count: ``weighting.step_counts``'s ``count``."""
    select, _, pairs = _counted(batch)
    return pairs.sum(), select.sum()


def _chunked_sum(fn: Any, chunk: int, *tensors: torch.Tensor) -> torch.Tensor:
    """sum over chunks of rows of ``fn(*chunk_rows)``: each chunk under activation checkpointing (its (rows, V)
    intermediates are dropped after the forward and recomputed in the backward); one call when ``chunk`` is 0."""
    import torch
    from torch.utils.checkpoint import checkpoint

    n = tensors[0].shape[0]
    if not chunk or n <= chunk:
        return fn(*tensors)  # type: ignore[no-any-return]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    parts = [[t[c : c + chunk] for t in tensors] for c in range(0, n, chunk)]
    return torch.stack([checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part) for part in parts]).sum()


def cross_loss(
    model: Any,
    batch: dict[str, torch.Tensor],
    task: str,
    cfg: TrainConfig,
    temperature: float,
    counts: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * T^2 * (sum over aligned pairs of the soft terms) / kd_count + (1 - alpha) * (sum over labelled
    student positions of the hard-label CE) / ce_count; ``train_loss``'s signature, for the same loop.

    Args:
        model: ``batch_loss.at_positions``' module over the student (or DDP around it).
        batch: ``CrossCollator``'s batch plus the loader's ``index`` and ``example_weight``.
        task: "causal-lm".
        cfg: alpha from it.
        temperature: T.
        counts: (kd_count, ce_count), the whole optimizer step's (``weighting.step_counts`` with
            :func:`cross_counts`); None: this batch's own (its mean).
    """
    import torch

    from .xtok import xtok_soft_loss

    net = getattr(model, "module", model)  # the module under DDP
    select, labels, keep = _counted(batch)
    rows = model(batch["input_ids"], batch["attention_mask"], select)  # (N, H), or (N, V) for a head not split
    # each aligned pair's row among the selected positions: pair_pos < M - 1 is always a labelled position
    width = select.shape[1]
    row_of = torch.cumsum(select.reshape(-1).long(), 0) - 1  # (B * (M - 1),)
    pair_rows = row_of[batch["pair_row"][keep] * width + batch["pair_pos"][keep]]  # (n,)
    kd_count, ce_count = counts if counts is not None else (float(keep.sum()), float(select.sum()))

    def ce_sum(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(net.logits(h), y, reduction="sum")

    def soft_sum(h: torch.Tensor, sid: torch.Tensor, prob: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        kl, uld = xtok_soft_loss(net.logits(h), sid, prob, known, temperature)  # (n,) each
        return (kl + uld).sum()

    ce = _chunked_sum(ce_sum, net.loss_chunk, rows, labels[select]) / max(ce_count, 1.0)
    if cfg.alpha == 0:
        kd = rows.sum() * 0.0
    else:
        soft = (batch["t_sid"][keep], batch["t_prob"][keep], batch["t_known"][keep])
        kd = _chunked_sum(soft_sum, net.loss_chunk, rows[pair_rows], *soft) * temperature**2 / max(kd_count, 1.0)
    loss = cfg.alpha * kd + (1 - cfg.alpha) * ce
    return loss, {"loss": float(loss.detach()), "kd": float(kd.detach()), "ce": float(ce.detach())}


def cross_evaluate(
    model: Any,
    source: Any,
    cfg: TrainConfig,
    task: str,
    temperature: float,
    device: torch.device,
    rank: int,
    world: int,
    *,
    collate: Any,
) -> dict[str, float]:
    """Held-out bits per character of the student's own tokens, over every rank's share of the held-out split:
    summed next-token NLL / ln 2 / the characters those tokens cover (comparable across tokenizers, unlike
    perplexity); and the per-token CE. ``evaluate``'s signature plus the loader's ``collate``."""
    import torch

    from ..data.dataset import StoreDataset

    store, split = source
    dataset = StoreDataset(
        store, batch_size=cfg.batch_size, shuffle=False, rank=rank, world_size=world, collate_fn=collate, **split
    )
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, chars, tokens
    with torch.no_grad():
        for i, batch in enumerate(dataset):
            if i >= cfg.eval_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            select, labels, _ = _counted(batch)
            rows = model(batch["input_ids"], batch["attention_mask"], select)
            step = model.loss_chunk or rows.shape[0] or 1  # (step, V) logits at a time
            y = labels[select]
            for c in range(0, rows.shape[0], step):
                z = model.logits(rows[c : c + step])
                sums[0] += torch.nn.functional.cross_entropy(z, y[c : c + step], reduction="sum").double()
            sums[1] += batch["chars"][batch["example_weight"] > 0].sum().double()
            sums[2] += select.sum().double()
    if world > 1:
        torch.distributed.all_reduce(sums)
    nll, chars, tokens = (float(x) for x in sums)
    return {"bits_per_char": nll / math.log(2) / max(chars, 1.0), "ce": nll / max(tokens, 1.0), "chars": chars}

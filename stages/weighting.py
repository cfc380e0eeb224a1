"""Exact token weighting: an optimizer step's loss is the sum over ALL of its positions, divided by their number.

A step of ``grad_accum`` micro-batches on R data-parallel ranks used to take, per micro-batch, the mean over its
own positions divided by ``grad_accum``, and DDP then averaged the ranks' gradients. With unpacked data of unequal
lengths that weighs a token in a short micro-batch, or on a rank with fewer positions, more than one in a long
one: the step's gradient is not the gradient of the mean over its tokens, and it changes with the accumulation
and the number of ranks (the bug transformers fixed in 2024 with ``num_items_in_batch``). Here:

1. the trainer takes the step's micro-batches first and counts their positions: those whose soft targets count
   (``selected``) and those that also have a hard label, which differ where a store holds no label (seq-cls);
2. one all-reduce (SUM) of those two counts over the ranks (``step_counts``);
3. each micro-batch's loss is its SUM divided by the step's counts (the losses' ``kd_count`` / ``ce_count``), so
   the micro-batches' losses add up to the step's mean, whatever the split;
4. DDP averages gradients over the R ranks, so each rank back-propagates R times its loss: the average of R
   times the shares is their sum (FSDP's reduce-scatter averages too).

The logged loss is the step's, summed over micro-batches and, at logging steps, over ranks (``summed_over_ranks``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["selected", "step_counts", "summed_over_ranks"]


def selected(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, P) bool (seq-cls: (B,)): the positions whose targets count, i.e. real ones of weighted examples."""
    weight = batch["example_weight"] > 0  # (B,): a rank's lockstep stand-in example has weight 0
    mask = batch["position_mask"]
    return mask & weight.reshape(-1, *([1] * (mask.dim() - 1)))


def step_counts(
    batches: Sequence[dict[str, torch.Tensor]],
    world: int,
    device: torch.device,
    count: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[float, float]:
    """The positions of one optimizer step: (with soft targets, with a hard label too), over its micro-batches
    on every rank: one all-reduce of two numbers when ``world`` > 1 (every rank must call it, once a step).

    Args:
        batches: this rank's collated micro-batches of the step (``StoreDataset``'s), on any device.
        world: the number of data-parallel ranks.
        device: where the all-reduce runs (the process group's device: CUDA for nccl).
        count: one batch's (kd, ce) counts; by default its selected positions and those with a label
            (``stages.xtok_train.cross_counts`` for cross-tokenizer batches).

    Returns:
        (kd_count, ce_count) as floats: what the losses' ``kd_count`` and ``ce_count`` divide by.
    """
    import torch

    counts = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        kd, ce = (count or _store_counts)(batch)
        counts[0] += kd
        counts[1] += ce
    if world > 1:
        counts = counts.to(device)
        torch.distributed.all_reduce(counts)
    return float(counts[0]), float(counts[1])


def _store_counts(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    select = selected(batch)
    return select.sum(), (select & (batch["labels"] >= 0)).sum()


def summed_over_ranks(parts: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """The step's logged parts ("loss", "kd", "ce": each rank's shares, summed over its micro-batches), summed over
    the ranks: the step's loss. Every rank must call it at the same steps (one all-reduce)."""
    if world == 1 or not parts:
        return dict(parts)
    import torch

    keys = sorted(parts)
    values = torch.tensor([parts[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    return dict(zip(keys, values.tolist(), strict=True))
